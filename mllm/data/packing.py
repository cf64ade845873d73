"""Batch collators for causal-LM training: sequence packing with document boundaries, and plain padding.

Packing puts several samples into one row of at most ``max_tokens`` tokens, so a batch carries almost no padding.
Samples stay independent the way transformers' padding-free path (``DataCollatorWithFlattening``) expects:

- ``position_ids`` restart at 0 at every sample, and the batch has **no** ``attention_mask``. transformers'
  ``masking_utils`` then reads each boundary off the position ids (a step that is not +1) and builds a block-diagonal
  causal mask for ``sdpa``/``eager``/``flex`` attention; flash attention takes the same boundaries from the position
  ids (batch of one row) or from ``cu_seq_lens_*`` (``return_flash_attn_kwargs=True``, any number of rows).
- ``use_cache=False`` travels with the batch: with a cache (``config.use_cache`` defaults to True, in training too)
  transformers skips the packed-sequence detection and attention would silently cross samples.
- ``labels`` are -100 at each sample's first position, so no token is trained to predict the start of the next
  sample.
- the padding at the end of a row is a segment of its own (positions restart there too); its labels are -100.

Two packing strategies, both deterministic: ``"greedy"`` fills rows in stream order and opens a new row when the next
sample does not fit; ``"ffd"`` (first-fit-decreasing bin packing, Johnson 1973; used for LM packing by Krell et al.,
2021, "Efficient sequence packing without cross-contamination") sorts each buffer of ``buffer_size`` samples by
length and puts each into the first row with room. A sample longer than ``max_tokens`` is an error by default (it is
never truncated: cutting an image span would corrupt it); with ``oversize="alone"`` it gets a row of its own, and the
batch is as wide as that sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

IGNORE_INDEX = -100
OVERSIZE = ("error", "alone")


def pack_greedy(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Rows of sample indices in stream order: a new row starts when the next sample does not fit."""
    rows, row, used = [], [], 0
    for i, n in enumerate(lengths):
        if row and used + n > max_tokens:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    return rows + [row] if row else rows


def pack_ffd(lengths: Sequence[int], max_tokens: int, buffer_size: int = 1024) -> list[list[int]]:
    """First-fit-decreasing over consecutive buffers of ``buffer_size`` samples; rows never mix buffers.

    Within a buffer, samples are placed longest first (ties by index) into the first row with room; each row lists
    its samples in stream order.
    """
    if buffer_size < 1:
        raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
    rows = []
    for start in range(0, len(lengths), buffer_size):
        order = sorted(range(start, min(start + buffer_size, len(lengths))), key=lambda i: (-lengths[i], i))
        chunk_rows: list[list[int]] = []
        room: list[int] = []
        for i in order:
            slot = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
            if slot is None:
                chunk_rows.append([])
                room.append(max_tokens)
                slot = len(room) - 1
            chunk_rows[slot].append(i)
            room[slot] -= lengths[i]
        rows += [sorted(row) for row in chunk_rows]
    return rows


PACKERS = {"greedy": pack_greedy, "ffd": pack_ffd}


def split_columns(columns: Mapping[str, Sequence]) -> list[dict[str, Any]]:
    """``{"input_ids": [s0, s1, ...], ...}`` (e.g. the processor's ``padding=False`` output) -> one dict per sample."""
    names = list(columns)
    return [dict(zip(names, values)) for values in zip(*(columns[n] for n in names))]


def _as_list(values) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _mask_names(feature: Mapping[str, Any]) -> list[str]:
    """Per-token boolean columns carried along (``image_loss_mask`` ...); ``attention_mask`` is rebuilt, not carried."""
    return sorted(k for k in feature if k.endswith("_mask") and k != "attention_mask")


def _check_unpadded(features: Sequence[Mapping[str, Any]]) -> None:
    for i, f in enumerate(features):
        if not len(f["input_ids"]):
            raise ValueError(f"sample {i} has no tokens")
        if "attention_mask" in f and not all(_as_list(f["attention_mask"])):
            raise ValueError(f"sample {i} is already padded: pass unpadded samples (processor(..., padding=False))")


@dataclass
class PaddingCollator:
    """Pad samples to the longest one (or a multiple of ``pad_to_multiple_of``), with an ``attention_mask``."""

    pad_token_id: int = 0
    padding_side: str = "right"
    pad_to_multiple_of: Optional[int] = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        _check_unpadded(features)
        width = _round_up(max(len(f["input_ids"]) for f in features), self.pad_to_multiple_of)
        fills = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        fills.update({name: False for name in _mask_names(features[0])})
        columns: dict[str, list] = {name: [] for name in fills}
        for f in features:
            ids = _as_list(f["input_ids"])
            values = {"input_ids": ids, "attention_mask": [1] * len(ids),
                      "labels": _as_list(f["labels"]) if "labels" in f else list(ids)}
            values.update({name: _as_list(f[name]) for name in fills if name not in values})
            for name, fill in fills.items():
                pad = [fill] * (width - len(ids))
                columns[name].append(pad + values[name] if self.padding_side == "left" else values[name] + pad)
        return {name: _tensor(name, rows) for name, rows in columns.items()}


@dataclass
class PackingCollator:
    """Pack samples into rows of at most ``max_tokens`` tokens with per-sample ``position_ids`` (see module doc).

    Args:
        max_tokens: token budget of one row.
        strategy: ``"ffd"`` (first-fit-decreasing over ``buffer_size`` samples) or ``"greedy"`` (stream order).
        buffer_size: samples sorted together by ``"ffd"``.
        oversize: a sample longer than ``max_tokens``: ``"error"`` (default) or ``"alone"`` (a row of its own).
        pad_token_id: id written into the padding at the end of rows.
        pad_to_multiple_of: round the row width up (rows are as wide as the fullest row, not ``max_tokens``).
        return_flash_attn_kwargs: also return ``cu_seq_lens_q/k`` (int32, over the flattened rows, padding as its own
            segments) and ``max_length_q/k`` for flash attention's varlen kernels.

    Call it on a list of samples, each a mapping with ``input_ids``, optional ``labels`` (defaults to the input ids)
    and optional per-token ``*_mask`` columns (e.g. ``image_loss_mask``), which are packed alongside. Returns
    ``input_ids``, ``position_ids``, ``labels`` and the masks as ``(rows, width)`` tensors, plus ``use_cache=False``.
    """

    max_tokens: int
    strategy: str = "ffd"
    buffer_size: int = 1024
    oversize: str = "error"
    pad_token_id: int = 0
    pad_to_multiple_of: Optional[int] = None
    return_flash_attn_kwargs: bool = False

    def __post_init__(self):
        if self.strategy not in PACKERS:
            raise ValueError(f"packing strategy must be one of {sorted(PACKERS)}, got {self.strategy!r}")
        if self.oversize not in OVERSIZE:
            raise ValueError(f"oversize must be one of {OVERSIZE}, got {self.oversize!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    def plan(self, lengths: Sequence[int]) -> list[list[int]]:
        """Rows of sample indices for samples of these lengths (every index exactly once)."""
        too_long = [(i, n) for i, n in enumerate(lengths) if n > self.max_tokens]
        if too_long and self.oversize == "error":
            i, n = too_long[0]
            raise ValueError(
                f"sample {i} has {n} tokens, more than max_tokens={self.max_tokens} ({len(too_long)} such samples); "
                "samples are never truncated (that could cut an image span): raise max_tokens or use oversize='alone'"
            )
        if self.strategy == "ffd":
            return pack_ffd(lengths, self.max_tokens, self.buffer_size)
        return pack_greedy(lengths, self.max_tokens)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        _check_unpadded(features)
        return self.collate(features, self.plan([len(f["input_ids"]) for f in features]))

    def collate(self, features: Sequence[Mapping[str, Any]], rows: Sequence[Sequence[int]]) -> dict[str, Any]:
        """The batch holding ``rows`` (lists of indices into ``features``, e.g. a slice of a :meth:`plan` made over
        a bigger buffer)."""
        masks = _mask_names(features[0])
        packed = [self._row([features[i] for i in row], masks) for row in rows]
        width = _round_up(max(len(r["input_ids"]) for r in packed), self.pad_to_multiple_of)
        fills = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX, **{m: False for m in masks}}
        batch = {name: [] for name in ("input_ids", "position_ids", "labels", *masks)}
        for row in packed:
            pad = width - len(row["input_ids"])
            row["position_ids"] += list(range(pad))  # the padding is a segment of its own
            for name in batch:
                batch[name].append(row[name] + ([fills[name]] * pad if name in fills else []))
        out: dict[str, Any] = {name: _tensor(name, values) for name, values in batch.items()}
        if self.return_flash_attn_kwargs:
            out.update(flash_attn_kwargs(out["position_ids"]))
        out["use_cache"] = False
        return out

    @staticmethod
    def _row(samples: Sequence[Mapping[str, Any]], masks: list[str]) -> dict[str, list]:
        row: dict[str, list] = {"input_ids": [], "position_ids": [], "labels": [], **{m: [] for m in masks}}
        for s in samples:
            ids = _as_list(s["input_ids"])
            labels = _as_list(s["labels"]) if "labels" in s else list(ids)
            row["input_ids"] += ids
            row["position_ids"] += list(range(len(ids)))
            row["labels"] += [IGNORE_INDEX] + labels[1:]  # never predict a sample's first token from the previous one
            for m in masks:
                row[m] += _as_list(s[m])
        return row


def flash_attn_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """``cu_seq_lens_q/k`` and ``max_length_q/k`` of the segments in ``position_ids`` ``(rows, width)``, flattened."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    cu = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)  # (segments + 1,)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _round_up(n: int, multiple: Optional[int]) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _tensor(name: str, rows: list[list]) -> torch.Tensor:
    dtype = torch.bool if name.endswith("_mask") and name != "attention_mask" else torch.long
    return torch.tensor(rows, dtype=dtype)
