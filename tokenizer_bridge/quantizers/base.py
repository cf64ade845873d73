"""Shared quantizer interface and bounded-memory nearest-code search.

Every quantizer maps ``latents`` — ``(B, D, h, w)`` feature maps or ``(B, N, D)`` token sequences — to a
:class:`QuantizerOutput` with the straight-through ``quantized`` tensor (same shape as the latents), the integer
``image_ids`` (``(B, h, w)`` or ``(B, N)``, plus a trailing level axis for multi-level quantizers), a scalar ``loss``
and a dict of ``metrics``.  ``lookup(image_ids)`` inverts the id assignment.

Nearest-code search (:func:`nearest_codes`) never materialises the dense ``N x K`` distance matrix: it walks tiles of
``row_chunk x code_chunk`` distances and keeps a running minimum, so memory is bounded by the tile whatever N and K.
Tiles are sized to stay in cache and their minima are found with vectorised block minima, so on CPU the search runs
near matmul speed (a lookup costs ``2 N K D`` flops).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers.utils import ModelOutput

# Elements per distance tile (rows x codes). 2^22 fp32 values = 16 MiB: large enough to keep matmuls efficient,
# small enough to stay far from the machine's memory whatever N and K are.
DEFAULT_TILE_ELEMENTS = 1 << 22


@dataclass
class QuantizerOutput(ModelOutput):
    """Output of every quantizer.

    Args:
        quantized: straight-through quantized latents, same shape as the input latents.
        image_ids: code indices, ``(B, h, w)`` for map latents or ``(B, N)`` for sequence latents.
        loss: scalar quantizer loss (codebook + commitment, or the quantizer's own regularisers).
        metrics: detached scalars for logging (perplexity, usage, ...).
    """

    quantized: Optional[torch.Tensor] = None
    image_ids: Optional[torch.LongTensor] = None
    loss: Optional[torch.Tensor] = None
    metrics: Optional[dict] = None


def check_latents(latents: torch.Tensor, dim: int, name: str = "latents") -> None:
    """Raise a clear error for latents of the wrong rank/dimension or with NaN/Inf values."""
    if latents.dim() not in (3, 4):
        raise ValueError(f"{name} must be (B, D, h, w) or (B, N, D), got shape {tuple(latents.shape)}")
    got = latents.shape[1] if latents.dim() == 4 else latents.shape[-1]
    if got != dim:
        raise ValueError(f"{name} have dimension {got} but the quantizer expects {dim} (shape {tuple(latents.shape)})")
    if not torch.isfinite(latents).all():
        raise ValueError(f"{name} contain NaN or Inf values: the encoder diverged or the input is corrupt")


def flatten_latents(latents: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """``(B, D, h, w)`` -> ``(B*h*w, D)`` or ``(B, N, D)`` -> ``(B*N, D)``; returns the flat view and an undo key."""
    if latents.dim() == 4:
        b, d, h, w = latents.shape
        return latents.permute(0, 2, 3, 1).reshape(-1, d), ("map", b, h, w)
    b, n, d = latents.shape
    return latents.reshape(-1, d), ("seq", b, n)


def unflatten(flat: torch.Tensor, key: tuple) -> torch.Tensor:
    """Inverse of :func:`flatten_latents` for vectors ``(M, D)``."""
    if key[0] == "map":
        _, b, h, w = key
        return flat.view(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
    _, b, n = key
    return flat.view(b, n, -1)


def unflatten_ids(ids: torch.Tensor, key: tuple) -> torch.Tensor:
    """Ids ``(M,)`` -> ``(B, h, w)`` or ``(B, N)``; multi-level ids ``(M, L)`` -> ``(B, h, w, L)`` or ``(B, N, L)``."""
    return ids.view(*key[1:], *ids.shape[1:])


# What the search computes at once, whatever memory ``tile_elements`` allows: 16 MiB of fp32 distances stays in a
# 32 MiB last-level cache, so writing a tile (the matmul) and reading it back (the minimum) do not go to DRAM, while
# tiles stay few enough that per-op overhead (Python, thread fork/join) is a few percent of the matmul even at D=32.
CACHE_TILE_ELEMENTS = 1 << 22
# Codes per tile when rows are plentiful (2048 rows x 2048 codes at the cap above).
CODE_CHUNK = 2048
# The minimum over a tile is taken in blocks of this many codes (see _merge_tile).
ARGMIN_BLOCK = 128


def tile_shape(m: int, k: int, tile_elements: int = DEFAULT_TILE_ELEMENTS) -> tuple[int, int]:
    """``(row_chunk, code_chunk)`` of the distance tiles for ``m`` rows and ``k`` codes; their product never exceeds
    ``tile_elements`` (nor :data:`CACHE_TILE_ELEMENTS`)."""
    budget = max(1, min(tile_elements, CACHE_TILE_ELEMENTS))
    row_chunk = max(1, min(m, budget // min(k, CODE_CHUNK)))
    code_chunk = max(1, min(k, budget // row_chunk))
    if code_chunk < k and code_chunk > ARGMIN_BLOCK:
        code_chunk -= code_chunk % ARGMIN_BLOCK  # whole blocks, so only the last tile of a row is ragged
    return row_chunk, code_chunk


@torch.no_grad()
def nearest_codes(
    x: torch.Tensor,
    codebook: torch.Tensor,
    tile_elements: int = DEFAULT_TILE_ELEMENTS,
    codebook_sq_norms: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and squared distance of the nearest code for each row of ``x``.

    ``x`` is ``(M, D)``, ``codebook`` ``(K, D)``; returns ``(ids (M,), sq_dist (M,))``. Memory is bounded by
    ``tile_elements`` distances at a time; results equal a brute-force argmin (ties resolve to the lowest index).
    """
    m, k = x.shape[0], codebook.shape[0]
    row_chunk, code_chunk = tile_shape(m, k, tile_elements)
    c_sq = codebook_sq_norms if codebook_sq_norms is not None else codebook.pow(2).sum(1)
    ids = torch.empty(m, dtype=torch.long, device=x.device)
    best = torch.empty(m, dtype=x.dtype, device=x.device)
    buffer = torch.empty(row_chunk * code_chunk, dtype=x.dtype, device=x.device)  # reused by every tile
    for r0 in range(0, m, row_chunk):
        rows = x[r0 : r0 + row_chunk]
        run_best, run_ids = best[r0 : r0 + row_chunk].fill_(float("inf")), ids[r0 : r0 + row_chunk].zero_()
        for c0 in range(0, k, code_chunk):
            c1 = min(k, c0 + code_chunk)
            d = buffer[: rows.shape[0] * (c1 - c0)].view(rows.shape[0], c1 - c0)  # (rows, codes)
            # ||x||^2 is constant per row, so only ||c||^2 - 2 x.c decides the argmin.
            torch.addmm(c_sq[c0:c1], rows, codebook[c0:c1].t(), alpha=-2.0, out=d)
            _merge_tile(d, c0, run_best, run_ids)
        run_best += rows.pow(2).sum(1)
    return ids, best.clamp_min_(0)


def _merge_tile(d: torch.Tensor, offset: int, run_best: torch.Tensor, run_ids: torch.Tensor) -> None:
    """Fold the row minima of a distance tile ``d (rows, codes)`` into the running best, in place.

    Strict ``<`` keeps earlier codes on ties, and each step takes the first minimum, so ties go to the lowest index.
    On CPU ``min`` with indices is a scalar loop (~1 element/ns) while ``amin`` is vectorised (~10x faster): take
    ``amin`` over blocks of :data:`ARGMIN_BLOCK` codes and search indices only inside the best block, and only for
    rows whose running minimum improves (after the first tiles, few do).
    """
    aligned = d.shape[1] - d.shape[1] % ARGMIN_BLOCK if d.device.type == "cpu" else 0
    if aligned:
        blocks = d[:, :aligned].view(d.shape[0], aligned // ARGMIN_BLOCK, ARGMIN_BLOCK)
        val, block = blocks.amin(dim=2).min(dim=1)  # (rows,), (rows,)
        improved = (val < run_best).nonzero().squeeze(1)
        block = block[improved]
        run_best[improved] = val[improved]
        run_ids[improved] = blocks[improved, block].argmin(dim=1) + block * ARGMIN_BLOCK + offset
    if aligned < d.shape[1]:
        val, idx = d[:, aligned:].min(dim=1)
        better = val < run_best
        run_best.copy_(torch.where(better, val, run_best))
        run_ids.copy_(torch.where(better, idx + offset + aligned, run_ids))


def code_histogram(ids: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Counts of each code among ``ids`` (any shape) -> ``(K,)`` float."""
    return torch.bincount(ids.reshape(-1), minlength=codebook_size).float()


def usage_metrics(ids: torch.Tensor, codebook_size: int) -> dict:
    """Perplexity of the code distribution and fraction of codes used, for logging."""
    counts = code_histogram(ids, codebook_size)
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
    return {"perplexity": float(entropy.exp()), "codebook_usage": float((counts > 0).float().mean())}


class Quantizer(nn.Module):
    """Base class: subclasses implement ``quantize_flat`` and ``lookup_flat`` over ``(M, D)`` vectors."""

    dim: int
    codebook_size: int
    num_levels: int = 1
    shared_codebook: bool = False  # one codebook for every level (only a multi-level quantizer can share)

    def forward(self, latents: torch.Tensor) -> QuantizerOutput:
        """Quantize ``latents`` in the quantizer's own precision, outside any autocast region.

        Under mixed precision (accelerate's ``bf16``/``fp16``: fp32 weights, an autocast region) the encoder hands
        over half-precision latents and autocast would run the distance, logit and entropy matmuls in half precision:
        bf16 keeps 8 bits of mantissa, so near-ties between codes (most of them in a codebook of 2^14+) resolve to
        the wrong code and the softmax/entropy terms lose their small probabilities. Here they run in the dtype of
        the codebook (fp32 unless the whole model was cast), and the quantized vectors go back in the latents' dtype.
        """
        check_latents(latents, self.dim)
        flat, key = flatten_latents(latents)
        compute = self.compute_dtype()
        options = self.flat_options(flat, key)
        with torch.autocast(device_type=latents.device.type, enabled=False):
            quantized, ids, loss, metrics = self.quantize_flat(flat.to(compute), **options)
        return QuantizerOutput(
            quantized=unflatten(quantized.to(latents.dtype), key), image_ids=unflatten_ids(ids, key), loss=loss,
            metrics=metrics,
        )

    def flat_options(self, flat: torch.Tensor, key: tuple) -> dict:
        """Extra keyword arguments of ``quantize_flat`` for these latents (none; see the residual quantizer)."""
        return {}

    def compute_dtype(self) -> torch.dtype:
        """The dtype quantization runs in: that of the first floating parameter or buffer (fp32 for a quantizer
        without any)."""
        for tensor in (*self.parameters(), *self.buffers()):
            if tensor.dtype.is_floating_point:
                return tensor.dtype
        return torch.float32

    @property
    def level_codebook_sizes(self) -> tuple[int, ...]:
        """Codebook size of each level (all ``codebook_size``; a quantizer with unequal levels overrides this)."""
        return (self.codebook_size,) * self.num_levels

    def check_image_ids(self, image_ids: torch.Tensor) -> torch.LongTensor:
        """Validate ``image_ids`` — integer dtype, trailing level axis when ``num_levels > 1``, range per level —
        and return them as a long tensor."""
        image_ids = torch.as_tensor(image_ids)
        if image_ids.dtype.is_floating_point:
            raise TypeError(f"image_ids must be integers, got {image_ids.dtype}")
        image_ids, levels = image_ids.long(), self.num_levels
        if levels > 1 and (image_ids.dim() < 2 or image_ids.shape[-1] != levels):
            raise ValueError(
                f"image ids of a {levels}-level quantizer need a trailing level axis of size {levels} "
                f"((B, h, w, L) or (B, N, L)), got shape {tuple(image_ids.shape)}"
            )
        if image_ids.numel() == 0:
            return image_ids
        per_level = image_ids.reshape(-1, levels)  # (M, L)
        lows, highs = per_level.amin(0).tolist(), per_level.amax(0).tolist()
        for level, (low, high, size) in enumerate(zip(lows, highs, self.level_codebook_sizes)):
            if low < 0 or high >= size:
                where = f" of level {level}" if levels > 1 else ""
                raise ValueError(f"image ids{where} must lie in [0, {size}), got range [{low}, {high}]")
        return image_ids

    def lookup(self, image_ids: torch.Tensor, channels_first: bool = True) -> torch.Tensor:
        """Quantized vectors for ``image_ids``: ``(B, h, w)`` -> ``(B, D, h, w)`` (or ``(B, N)`` -> ``(B, N, D)``).

        Multi-level quantizers take ids with a trailing level axis, ``(B, h, w, L)`` or ``(B, N, L)``, and
        ``lookup_flat`` receives them as ``(M, L)``.
        """
        image_ids = self.check_image_ids(image_ids)
        if self.num_levels > 1:
            vectors = self.lookup_flat(image_ids.reshape(-1, self.num_levels))  # (M, D) from (M, L)
            return self.shape_like_ids(vectors, image_ids.shape[:-1], channels_first)
        return self.shape_like_ids(self.lookup_flat(image_ids.reshape(-1)), image_ids.shape, channels_first)

    @staticmethod
    def shape_like_ids(vectors: torch.Tensor, positions: tuple, channels_first: bool = True) -> torch.Tensor:
        """Vectors ``(M, D)`` for id positions ``(B, h, w)`` -> ``(B, D, h, w)`` (or ``(B, h, w, D)`` when not
        ``channels_first``); any other positions shape ``(...)`` -> ``(..., D)``."""
        if len(positions) == 3 and channels_first:
            b, h, w = positions
            return vectors.view(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        return vectors.view(*positions, -1)

    def derived_buffers(self) -> dict[str, torch.Tensor]:
        """Constant buffers computed from the constructor arguments (not saved with the weights)."""
        return {}

    def init_derived_buffers(self) -> None:
        """(Re)build the derived buffers as non-persistent buffers.

        transformers' ``from_pretrained`` builds models on the meta device and leaves non-persistent buffers empty;
        ``VisualTokenizer._init_weights`` calls this to restore them.
        """
        for name, value in self.derived_buffers().items():
            old = self._buffers.get(name)
            device = old.device if old is not None and old.device.type != "meta" else value.device
            self.register_buffer(name, value.to(device), persistent=False)

    def quantize_flat(self, flat: torch.Tensor):  # pragma: no cover - interface
        raise NotImplementedError

    def lookup_flat(self, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError
