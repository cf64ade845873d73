"""Token samples of :class:`~tokenizer_bridge.UnifiedProcessor` before and after padding.

A :class:`Sample` is one sequence's token ids with, per position, whether it is a training target and whether it lies
inside an image span; :func:`pad_samples` pads a batch of them into the processor's output columns (``input_ids``,
``attention_mask``, ``labels``, the loss masks, ``mm_token_type_ids``) and :func:`to_tensors` converts the columns.
Sequences are never truncated: cutting an image span would corrupt it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from .vocab.pieces import IGNORE_INDEX

PADDING_SIDES = ("left", "right")
LOSS_MASKS = ("image_token_mask", "text_loss_mask", "image_loss_mask")


@dataclass
class Sample:
    """One tokenized sample before padding: token ids plus, per position, 'is target' and 'is inside an image'."""

    ids: list[int] = field(default_factory=list)
    target: list[bool] = field(default_factory=list)
    image: list[bool] = field(default_factory=list)

    def extend(self, tokens: Sequence[int], is_target: bool, is_image: bool) -> None:
        self.ids.extend(int(t) for t in tokens)
        self.target.extend([is_target] * len(tokens))
        self.image.extend([is_image] * len(tokens))


def padded_width(samples: list[Sample], padding, max_length: Optional[int], pad_to_multiple_of: Optional[int],
                 truncation) -> Optional[int]:
    """The padded length of the batch (None: no padding), with transformers' meanings of ``padding`` /
    ``max_length`` / ``pad_to_multiple_of``; a sample longer than ``max_length`` is refused, truncation or not."""
    longest = max(len(s.ids) for s in samples)
    if max_length is not None and longest > max_length and (padding == "max_length" or truncation not in
                                                             (None, False, "do_not_truncate")):
        raise ValueError(f"a sample has {longest} tokens, more than max_length={max_length}: the processor never "
                         "truncates (cutting an image span would corrupt it); raise max_length or shorten the text")
    if padding == "max_length":
        if max_length is None:
            raise ValueError('padding="max_length" needs max_length=')
        width = max_length
    elif padding in (True, "longest"):
        width = longest
    elif padding in (False, None, "do_not_pad"):
        return None
    else:
        raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    return width


def pad_samples(samples: list[Sample], width: Optional[int], side: str, pad_id: int, with_labels: bool,
                masks: bool, attention_mask: bool = True, mm_token_type_ids: bool = False) -> dict[str, list]:
    """The output columns of ``samples`` padded to ``width`` on ``side`` (each its own length when ``width`` is
    None): ``input_ids``, ``attention_mask``, ``labels`` (``with_labels``; -100 off target), the loss masks
    (``masks``) and ``mm_token_type_ids`` (1 inside image spans, 0 elsewhere)."""
    if side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {side!r}")
    columns: dict[str, list] = {"input_ids": []}
    if attention_mask:
        columns["attention_mask"] = []
    if with_labels:
        columns["labels"] = []
    if masks:
        columns.update({name: [] for name in LOSS_MASKS})
    if mm_token_type_ids:
        columns["mm_token_type_ids"] = []
    for s in samples:
        n = len(s.ids)
        rows = {
            "input_ids": (s.ids, pad_id),
            "attention_mask": ([1] * n, 0),
            "labels": ([i if t else IGNORE_INDEX for i, t in zip(s.ids, s.target)], IGNORE_INDEX),
            "image_token_mask": (s.image, False),
            "text_loss_mask": ([t and not m for t, m in zip(s.target, s.image)], False),
            "image_loss_mask": ([t and m for t, m in zip(s.target, s.image)], False),
            "mm_token_type_ids": ([int(m) for m in s.image], 0),
        }
        for name in columns:
            values, fill = rows[name]
            pad = [fill] * ((width or n) - n)
            columns[name].append(pad + values if side == "left" else values + pad)
    return columns


def to_tensors(data: dict[str, list], return_tensors: Optional[str]) -> dict[str, Any]:
    """The columns as ``"pt"`` / ``"np"`` arrays (boolean masks stay boolean) or, for None, as lists."""
    if return_tensors is None:
        return data
    return_tensors = getattr(return_tensors, "value", return_tensors)  # a TensorType
    if return_tensors not in ("pt", "np"):
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
    lengths = {len(row) for rows in data.values() for row in rows}
    if len(lengths) > 1:
        raise ValueError("samples have different lengths: use padding=True or return_tensors=None")
    out = {}
    for name, rows in data.items():
        dtype = torch.bool if name in LOSS_MASKS else torch.long
        tensor = torch.tensor(rows, dtype=dtype)
        out[name] = tensor if return_tensors == "pt" else tensor.numpy()
    return out


def image_span_length(processor, height: int, width: int, **options) -> int:
    """Tokens of the span an image of ``height x width`` pixels gets from ``processor`` (``options``: image-processor
    settings; ``budget=`` for slot tokenizers). Fixed grids and sequences: the vocabulary's span length; variable-size
    grids: the grid the preprocessed size gives at the visual tokenizer's downsample factor."""
    vocab = processor.image_vocab
    budget = options.pop("budget", None)
    if vocab.has_budgets:
        return vocab.span_length_of(1, processor.check_budget(budget))
    if not vocab.variable_size:
        return vocab.span_length
    factor = getattr(getattr(processor.visual_tokenizer, "config", None), "downsample", None)
    if not factor:
        raise ValueError("the span of a variable-size grid depends on the visual tokenizer's downsample factor: load "
                         "the processor with its visual tokenizer")
    from PIL import Image

    pixels = processor.preprocess_images([Image.new("RGB", (int(width), int(height)))], **options)
    return vocab.span_length_of(pixels.shape[-2] // factor, pixels.shape[-1] // factor)
