"""A whole token sequence cut into its text and its image spans: what ``UnifiedProcessor.decode`` reads.

Each span opened by ``<boi>`` is parsed strictly (:mod:`tokenizer_bridge.vocab.spans`), or leniently -- marked as
malformed, or repaired (:mod:`tokenizer_bridge.vocab.repair`) -- and every other token is text. Tokens that only occur
inside spans (``<eoi>``, ``<eol>``, size, budget and image tokens) are refused outside one, or dropped when lenient.
"""

from __future__ import annotations

from typing import Any

import torch

from .image_vocab import ImageVocab
from .repair import repair
from .spans import MalformedImageSpanError, parse_strict

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
