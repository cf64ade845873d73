"""Image spans: built from image ids and parsed back strictly, by the span grammar of an ``ImageVocab``.

The token order of every layout is documented in :mod:`tokenizer_bridge.vocab.layout`. The grammar gives each token
of a span a *token class*, what the token there must be: ``CLASS_EOI``, ``CLASS_EOL``, ``CLASS_HEIGHT`` /
``CLASS_WIDTH`` (the size tokens ``<h_k> <w_k>`` of a variable-size grid; the budget token ``<n_b>`` of a budgeted
sequence takes ``CLASS_WIDTH``, as that sequence is a ``1 x b`` image) or ``CLASS_IMAGE + c``: an image token of
image class ``c``, one of the vocabulary's ``num_image_classes`` id ranges (one per level when the ranges are separate,
times one per factorized sub-token). :func:`span_token_classes` computes them vectorised, for one span or a batch of
spans of different sizes; building, strict parsing and constrained generation (:mod:`mllm.generation.logits`) all read
the grammar from it.

These functions take the vocabulary as their first argument; ``ImageVocab.build_span``, ``build_spans``,
``parse_span`` and ``span_token_classes`` call them. The lenient parse is in :mod:`tokenizer_bridge.vocab.repair`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

# `ImageVocab` in annotations: tokenizer_bridge.vocab.image_vocab.ImageVocab (not imported: it imports this module)

# What the token at a position of a span must be (see span_token_classes): image class c is CLASS_IMAGE + c.
CLASS_EOI, CLASS_EOL, CLASS_HEIGHT, CLASS_WIDTH, CLASS_IMAGE = range(5)


class MalformedImageSpanError(ValueError):
    """Raised when a token span does not have the shape an image span must have."""


# ---------------------------------------------------------------------------------------------------- grammar
def span_token_classes(vocab: ImageVocab, t: torch.Tensor, h=None, w=None) -> torch.LongTensor:
    """The token class of the token ``t`` positions after ``<boi>`` (``t = 0`` is the first): ``CLASS_EOI``,
    ``CLASS_EOL``, ``CLASS_HEIGHT``, ``CLASS_WIDTH`` or ``CLASS_IMAGE + c`` (image class ``c``).

    ``t``, ``h`` and ``w`` are broadcastable tensors (or ints), so one call covers a batch of rows with different
    image sizes; ``h``/``w`` default to the largest size. Positions past the end are ``CLASS_EOI``. A budgeted
    sequence is a ``1 x budget`` image whose budget token ``<n_b>`` is of class ``CLASS_WIDTH`` (``w`` is the budget).
    """
    t = torch.as_tensor(t)
    height, width = vocab._largest_size()
    h = torch.as_tensor(height if h is None else h, device=t.device)
    w = torch.as_tensor(width if w is None else w, device=t.device)
    passes, group = vocab._passes_and_group
    grid = vocab.layout == "grid"
    b = (t - vocab.head_length).clamp(min=0)  # index into the rows
    row = w * group + (1 if grid else 0)
    per_pass = h * row
    p = (b // per_pass).clamp(max=passes - 1)
    column = (b - p * per_pass) % row
    classes = CLASS_IMAGE + vocab._on(t.device)["classes"][p, column.clamp(max=w * group - 1) % group]
    if grid:
        classes = torch.where(column == w * group, CLASS_EOL, classes)
    classes = torch.where(b >= passes * per_pass, CLASS_EOI, classes)
    if vocab.variable_size:
        classes = torch.where(t == 0, CLASS_HEIGHT, torch.where(t == 1, CLASS_WIDTH, classes))
    elif vocab.has_budgets:
        classes = torch.where(t == 0, CLASS_WIDTH, classes)
    return classes


def describe_span(vocab: ImageVocab, h: Optional[int] = None, w: Optional[int] = None) -> str:
    """What a span of an ``h x w`` image holds, in words (for error messages)."""
    h, w = (h, w) if h is not None else vocab._largest_size()
    per = vocab.tokens_per_position
    unit = "ids" if per == 1 else f"positions x {per} tokens"
    order = f", {vocab.num_levels} level passes" if vocab.level_order == "level" and vocab.num_levels > 1 else ""
    if vocab.layout == "grid":
        size = "<h_k> <w_k>, " if vocab.variable_size else ""
        return f"{size}{h} rows of {w} {unit} + <eol>{order}"
    budget = f"budget token {vocab.budget_token_format.format(w)}, " if vocab.has_budgets else ""
    return f"{budget}{w} {unit}{order}"


# ---------------------------------------------------------------------------------------------------- image ids
def check_size(vocab: ImageVocab, h: int, w: int) -> None:
    """Raise unless an ``h x w`` image (``1 x N`` for a sequence) has a size the vocabulary spells."""
    if vocab.layout == "sequence":
        if vocab.has_budgets and (h != 1 or w not in vocab.budgets):
            raise ValueError(f"expected one of the token budgets {vocab.budgets} of image ids per image, got {h * w}")
        if not vocab.has_budgets and (h, w) != (1, vocab.num_tokens):
            raise ValueError(f"expected {vocab.num_tokens} image ids per image, got {h * w}")
    elif vocab.variable_size:
        if not (1 <= h <= vocab.grid_size[0] and 1 <= w <= vocab.grid_size[1]):
            raise ValueError(f"image size {h}x{w} exceeds the largest grid {vocab.grid_size[0]}x{vocab.grid_size[1]}")
    elif [h, w] != vocab.grid_size:
        raise ValueError(f"expected {vocab.num_image_ids} image ids per image ({describe_span(vocab)}), "
                         f"got a {h}x{w} grid")


def check_budget(vocab: ImageVocab, budget: Optional[int] = None) -> int:
    """The token budget an image is encoded with: ``budget`` checked against the vocabulary's budgets, or the full
    one (sequence layout only)."""
    if vocab.layout != "sequence":
        raise ValueError("token budgets apply to the sequence layout (slot tokenizers)")
    if budget is None:
        return int(vocab.num_tokens)
    allowed = vocab.budgets if vocab.has_budgets else [vocab.num_tokens]
    if int(budget) not in allowed:
        raise ValueError(f"budget={budget} is not one of this vocabulary's token budgets {allowed}")
    return int(budget)


def split_images(vocab: ImageVocab, image_ids) -> list:
    """One image's ids or a batch of them (a tensor or array ``(n, h, w[, L])``, ``(n, h*w[, L])``, ``(n, N[, L])``,
    or a list of per-image ids) -> a list of per-image ids."""
    if not isinstance(image_ids, (np.ndarray, torch.Tensor)):
        return list(image_ids)
    image_ids = torch.as_tensor(image_ids)
    return [image_ids] if _is_one_image(vocab, image_ids) else list(image_ids)


def _is_one_image(vocab: ImageVocab, image_ids: torch.Tensor) -> bool:
    """Whether a tensor holds one image's ids (else a batch)."""
    levels = 1 if vocab.num_levels > 1 else 0  # a trailing level axis
    if vocab.layout == "sequence":
        return image_ids.ndim == 1 + levels
    positions = list(image_ids.shape[: image_ids.ndim - levels])
    if vocab.variable_size:
        return len(positions) == 2
    return len(positions) == 1 or positions == vocab.grid_size


def image_ids_batch(vocab: ImageVocab, image_ids, batched: bool) -> torch.LongTensor:
    """Image ids of any accepted shape -> ``(B, h, w, L)`` (sequence: ``(B, 1, N, L)``), shape-checked."""
    ids = torch.as_tensor(image_ids)
    if ids.is_floating_point():
        raise ValueError(f"image_ids must be integers, got dtype {ids.dtype}")
    ids = ids.long() if batched else ids.long()[None]
    if vocab.num_levels > 1:
        if ids.dim() < 2 or ids.shape[-1] != vocab.num_levels:
            raise ValueError(f"image ids need a trailing level axis of {vocab.num_levels}, got shape "
                             f"{tuple(ids.shape)}")
    else:
        ids = ids[..., None]
    positions = list(ids.shape[1:-1])
    if len(positions) == 1 and vocab.layout == "grid" and not vocab.variable_size:
        if positions[0] != vocab.num_image_ids:
            raise ValueError(f"expected {vocab.num_image_ids} image ids per image, got {positions[0]}")
        positions = vocab.grid_size
    if vocab.layout == "sequence":
        if len(positions) != 1:
            raise ValueError(f"sequence image ids must be (N,) or (N, L) per image, got {positions}")
        positions = [1, positions[0]]
    if len(positions) != 2:
        raise ValueError(f"grid image ids must be (h, w) (or (h, w, L)) per image, got shape {positions}")
    check_size(vocab, *positions)
    return ids.reshape(ids.shape[0], *positions, vocab.num_levels)


# ---------------------------------------------------------------------------------------------------- build
def build_span_batch(vocab: ImageVocab, ids: torch.LongTensor) -> torch.LongTensor:
    """``(B, h, w, L)`` image ids -> ``(B, span_length_of(h, w))`` spans."""
    batch, h, w, _ = ids.shape
    input_ids = vocab._to_input_ids(ids)  # (B, h, w, L, F)
    passes, group = vocab._passes_and_group
    if vocab.level_order == "level":
        input_ids = input_ids.permute(0, 3, 1, 2, 4)  # (B, L, h, w, F): one pass per level
    rows = input_ids.reshape(batch, passes, h, w * group)
    if vocab.layout == "grid":
        eol = torch.full((batch, passes, h, 1), vocab.eol_token_id, dtype=torch.long, device=rows.device)
        rows = torch.cat([rows, eol], dim=3)
    head = torch.tensor([vocab.boi_token_id] + head_input_ids(vocab, h, w), device=rows.device).expand(batch, -1)
    eoi = torch.full((batch, 1), vocab.eoi_token_id, dtype=torch.long, device=rows.device)
    return torch.cat([head, rows.reshape(batch, -1), eoi], dim=1)


def head_input_ids(vocab: ImageVocab, h: int, w: int) -> list[int]:
    """The ids after ``<boi>`` that state a span's size (``<h_h> <w_w>``) or budget (``<n_w>``)."""
    if vocab.variable_size:
        return vocab.size_tokens(h, w)
    return [vocab.budget_token(w)] if vocab.has_budgets else []


# ---------------------------------------------------------------------------------------------------- strict parse
def parse_strict(vocab: ImageVocab, span: torch.Tensor) -> torch.LongTensor:
    """Image ids of a well-formed span (the inverse of building); raises :class:`MalformedImageSpanError` naming the
    first thing that is wrong."""
    span = torch.as_tensor(span).long().reshape(-1)
    if span.numel() == 0 or int(span[0]) != vocab.boi_token_id:
        raise MalformedImageSpanError("image span does not start with <boi>")
    if int(span[-1]) != vocab.eoi_token_id:
        raise MalformedImageSpanError("image span is not closed by <eoi> (truncated generation?)")
    h, w = span_size(vocab, span)
    if span.numel() != vocab.span_length_of(h, w):
        raise MalformedImageSpanError(
            f"image span has {span.numel()} tokens, expected {vocab.span_length_of(h, w)} for layout "
            f"{vocab.layout!r} ({describe_span(vocab, h, w)})"
        )
    inner = span[1:-1]
    classes = span_token_classes(vocab, torch.arange(inner.numel(), device=inner.device), h, w)
    ok = _fits_classes(vocab, inner, classes)
    if not ok.all():
        raise _class_error(vocab, inner, classes, ok, h)
    return image_ids_of(vocab, inner[classes >= CLASS_IMAGE], h, w)


def span_size(vocab: ImageVocab, span: torch.Tensor) -> tuple[int, int]:
    """``(h, w)`` a span states with its head (``(1, budget)`` for budgets), or the fixed size."""
    if vocab.has_budgets:
        budget = int(vocab.budget_of_tokens(span[1])) if span.numel() >= 3 else 0
        if not budget:
            got = f"got token {int(span[1])}" if span.numel() >= 3 else "the span is too short"
            raise MalformedImageSpanError(
                f"image span does not start <boi> <n_b> with a budget token of the budgets {vocab.budgets} ({got})"
            )
        return 1, budget
    if not vocab.variable_size:
        return vocab._largest_size()
    if span.numel() < 4:
        raise MalformedImageSpanError("image span is too short to hold its size tokens <h_k> <w_k>")
    h, w = (int(x) for x in vocab.size_of_tokens(span[1], span[2]))
    if not (1 <= h <= vocab.grid_size[0] and 1 <= w <= vocab.grid_size[1]):
        raise MalformedImageSpanError(
            f"image span does not start <boi> <h_k> <w_k> with a size up to {vocab.grid_size[0]}x"
            f"{vocab.grid_size[1]} (got tokens {int(span[1])}, {int(span[2])})"
        )
    return h, w


def _fits_classes(vocab: ImageVocab, input_ids: torch.Tensor, classes: torch.Tensor) -> torch.BoolTensor:
    image = classes >= CLASS_IMAGE
    ok = image & vocab._in_class(input_ids, (classes - CLASS_IMAGE).clamp(min=0))
    ok |= (classes == CLASS_EOL) & (input_ids == (vocab.eol_token_id if vocab.eol_token_id is not None else -1))
    return ok | (classes == CLASS_HEIGHT) | (classes == CLASS_WIDTH)  # size tokens were checked by span_size


def _class_error(vocab: ImageVocab, input_ids, classes, ok, h: int) -> MalformedImageSpanError:
    i = int((~ok).nonzero()[0])
    token, token_class = int(input_ids[i]), int(classes[i])
    if token_class == CLASS_EOL:
        row = int((classes[:i] == CLASS_EOL).sum())
        where = f"row {row}" if vocab._passes_and_group[0] == 1 else f"row {row % h} of level {row // h}"
        return MalformedImageSpanError(f"{where} of the image span does not end with <eol>")
    position = int((classes[:i] >= CLASS_IMAGE).sum())
    if not bool(vocab.is_image_token(torch.tensor(token))):
        return MalformedImageSpanError(
            f"image span holds token id {token} at image position {position}, which is not an image token "
            f"(image tokens are {vocab._image_ids_text()})"
        )
    image_class = token_class - CLASS_IMAGE
    return MalformedImageSpanError(
        f"image span holds token id {token} at image position {position}, which is not a valid "
        f"{vocab.class_name(image_class)} token (expected ids in "
        f"[{int(vocab._class_low[image_class])}, {int(vocab._class_high[image_class])}))"
    )


def image_ids_of(vocab: ImageVocab, input_ids: torch.Tensor, h: int, w: int) -> torch.LongTensor:
    """The image tokens of a span in span order (checked) -> image ids of the canonical output shape."""
    levels, parts = vocab.num_levels, vocab.tokens_per_id
    if vocab.level_order == "level":
        grid = input_ids.view(levels, h, w, parts).permute(1, 2, 0, 3)  # (h, w, L, F)
    else:
        grid = input_ids.view(h, w, levels, parts)
    ids = vocab._from_input_ids(grid)  # (h, w, L)
    if vocab.num_levels == 1:
        ids = ids[..., 0]
    return ids[0] if vocab.layout == "sequence" else ids
