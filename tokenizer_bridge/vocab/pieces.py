"""A whole token sequence cut into its text and its image spans: what ``UnifiedProcessor.decode`` reads.

Each span opened by ``<boi>`` is parsed strictly (:mod:`tokenizer_bridge.vocab.spans`), or leniently -- marked as
malformed, or repaired (:mod:`tokenizer_bridge.vocab.repair`) -- and every other token is text. Tokens that only occur
inside spans (``<eoi>``, ``<eol>``, size, budget and image tokens) are refused outside one, or dropped when lenient.
:func:`one_sequence` turns what a user hands to ``decode`` (a tensor, array or list; ``labels`` included) into the
plain list of token ids that :func:`split_input_ids` reads, or says clearly why it cannot.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

from .image_vocab import ImageVocab
from .repair import repair
from .spans import MalformedImageSpanError, parse_strict

IGNORE_INDEX = -100  # the label of positions without loss (prompt, padding); decode skips it, as transformers does

# ("text", input ids), ("image", image ids), ("repaired", the repairs made to the next image), ("malformed", reason)
Piece = tuple[str, Any]


def split_input_ids(vocab: ImageVocab, input_ids: list[int], lenient: bool = False,
                    repair_spans: bool = False) -> list[Piece]:
    """Cut one sequence into text and image pieces, in order.

    A malformed span raises :class:`MalformedImageSpanError` naming the problem and the span's position; with
    ``lenient`` it becomes a ``("malformed", reason)`` piece and stray span-only tokens are dropped; with
    ``repair_spans`` (implies ``lenient``) it is repaired, preceded by a ``("repaired", repairs)`` piece when
    something had to be done.
    """
    lenient = lenient or repair_spans
    span_only = vocab.is_span_only_token(torch.tensor(input_ids, dtype=torch.long)).tolist() if input_ids else []
    pieces, text, i = [], [], 0
    while i < len(input_ids):
        token = input_ids[i]
        if token == vocab.boi_token_id:
            if text:
                pieces.append(("text", text))
                text = []
            end = _span_end(vocab, input_ids, i)
            pieces.extend(_parse(vocab, input_ids[i:end], i, lenient, repair_spans))
            i = end
            continue
        if not span_only[i]:
            text.append(token)
        elif not lenient:
            name = {vocab.eoi_token_id: vocab.eoi_token, vocab.eol_token_id: vocab.eol_token}.get(
                token, f"image token {token}")
            raise MalformedImageSpanError(f"{name} at position {i} lies outside an image span (no <boi>)")
        i += 1
    if text:
        pieces.append(("text", text))
    return pieces


def _span_end(vocab: ImageVocab, input_ids: list[int], start: int) -> int:
    """End (exclusive) of the span opened at ``start``: its <eoi>, or, when a <boi> or the end comes first,
    the end of the run of tokens that may stand in a span (a truncated span)."""
    for j in range(start + 1, len(input_ids)):
        if input_ids[j] == vocab.eoi_token_id:
            return j + 1
        if input_ids[j] == vocab.boi_token_id:
            break
    rest = torch.tensor(input_ids[start + 1 :], dtype=torch.long)
    in_span_only = vocab.special_token_ids[2:] + vocab.size_token_ids + vocab.budget_token_ids
    in_span = vocab.is_image_token(rest) | torch.isin(rest, torch.tensor(in_span_only, dtype=torch.long))
    outside = (~in_span).nonzero()
    return start + 1 + (int(outside[0]) if outside.numel() else rest.numel())


def _parse(vocab: ImageVocab, span: list[int], position: int, lenient: bool, repair_spans: bool) -> list[Piece]:
    try:
        if repair_spans:
            parsed = repair(vocab, torch.tensor(span, dtype=torch.long))
            return ([("repaired", parsed.repairs)] if parsed.repairs else []) + [("image", parsed.image_ids)]
        return [("image", parse_strict(vocab, torch.tensor(span, dtype=torch.long)))]
    except MalformedImageSpanError as error:
        if lenient:
            return [("malformed", str(error))]
        raise MalformedImageSpanError(f"{error} (span starting at position {position})") from None


def one_sequence(input_ids: Any, vocab_size: int) -> list[int]:
    """One sequence of token ids ``(L,)`` (or ``(1, L)``) as a list of ints, with every ``-100`` dropped.

    Raises ``ValueError`` for a batch (use ``batch_decode``), for ids that are not integers (floats, bools,
    strings: pixel values or logits passed by mistake) and for ids outside ``[0, vocab_size)`` -- negative ones other
    than ``-100``, and ids past the tokenizer such as the rows an LLM's embedding is padded with, which are no
    token and would otherwise vanish from the text without a word. Lenient decoding does not change this: it
    concerns the grammar of image spans, not ids that are no token at all.
    """
    values = _as_list(input_ids)
    if len(values) == 1 and isinstance(values[0], (list, tuple)):
        values = values[0]  # a batch of one
    out = []
    for position, value in enumerate(values):
        if isinstance(value, (list, tuple)):
            raise ValueError("decode takes one sequence (L,), got a batch of several: use batch_decode")
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise ValueError(f"token ids must be integers, got {value!r} ({type(value).__name__}) at position "
                             f"{position}")
        value = int(value)
        if value == IGNORE_INDEX:
            continue
        if not 0 <= value < vocab_size:
            raise ValueError(f"token id {value} at position {position} is outside the vocabulary [0, {vocab_size})"
                             + (" (-100 is the only negative id decode skips)" if value < 0 else ""))
        out.append(value)
    return out


def _item(value: Any) -> Any:
    """An element of a list of ids: a 0-d tensor or array becomes its (checked) number, a row stays a list."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        _as_list(value.reshape(1))  # refuses a float or bool dtype
        return value.item()
    return _as_list(value) if isinstance(value, (torch.Tensor, np.ndarray, list, tuple)) else value


def _as_list(input_ids: Any) -> list:
    """Nested Python lists of the values of a tensor, array or sequence, refusing non-integer dtypes up front."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"token ids must be integers, got a {input_ids.dtype} tensor (did you pass logits "
                             "or pixel values?)")
        input_ids = input_ids.detach().cpu()
    elif isinstance(input_ids, np.ndarray):
        if input_ids.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got an array of dtype {input_ids.dtype}")
    elif isinstance(input_ids, (list, tuple)):
        return [_item(v) for v in input_ids]
    else:
        raise ValueError(f"decode takes one sequence of token ids (a tensor, array or list), got "
                         f"{type(input_ids).__name__}")
    if input_ids.ndim > 2 or (input_ids.ndim == 2 and input_ids.shape[0] != 1) or input_ids.ndim == 0:
        raise ValueError(f"decode takes one sequence (L,), got shape {tuple(input_ids.shape)}: use batch_decode")
    return input_ids.reshape(-1).tolist()
