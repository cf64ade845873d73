"""The lenient parse of an image span: repair what a generation got wrong, and say what was done.

A model that samples without the constrained decoding of :mod:`mllm.generation.logits` may emit rows that are too
short or too long, a token of the wrong image class, or stop before ``<eoi>``. :func:`repair` fits such a span to the
grammar of its vocabulary (:mod:`tokenizer_bridge.vocab.spans`) and returns a :class:`ParsedSpan` whose ``repairs``
list each kind of repair with counts; ``ImageVocab.repair_span`` and ``ImageVocab.parse_span(lenient=True)`` call it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch

from .spans import MalformedImageSpanError, image_ids_of, parse_strict, span_size

# `ImageVocab` in annotations: tokenizer_bridge.vocab.image_vocab.ImageVocab (not imported: it imports this module)


@dataclass
class ParsedSpan:
    """What :meth:`ImageVocab.repair_span` made of a span: the image ids, what was repaired (empty if nothing) and,
    for a vocabulary with token budgets, the span's budget."""

    image_ids: torch.LongTensor
    repairs: list = field(default_factory=list)
    budget: Optional[int] = None

    @property
    def report(self) -> str:
        return "repaired: " + "; ".join(self.repairs) if self.repairs else "well formed"


def repair(vocab: ImageVocab, span: torch.Tensor) -> ParsedSpan:
    """Lenient parse: repair a malformed span and say what was done.

    Rows are cut at ``<eol>`` (grid; a sequence is one row) and fitted to the expected ``w`` positions: missing
    tokens and missing rows are filled with the most frequent valid token of the same image class in this span
    (sub-id 0 when there is none), extra tokens and rows are dropped, tokens that are not valid at their place are
    replaced the same way, and a missing ``<eoi>`` is added. ``repairs`` lists each kind of repair with counts
    (empty for a well-formed span). A variable-size span without readable size tokens cannot be repaired and
    raises :class:`MalformedImageSpanError`. A budgeted sequence is fitted to the budget its ``<n_b>`` states;
    when that token is missing, the budget is inferred as the smallest allowed one that holds the span's image
    tokens (the largest if none does), and the repair says so. A closed grid span whose last row lacks its ``<eol>`` gets one,
    also reported (in a span cut off before ``<eoi>`` the added ``<eoi>`` says it): ``repairs`` is empty exactly
    when the span was well formed.
    """
    span = torch.as_tensor(span).long().reshape(-1).cpu()
    try:
        ids = parse_strict(vocab, span)
        return ParsedSpan(ids, [], int(ids.shape[0]) if vocab.has_budgets else None)
    except MalformedImageSpanError:
        pass
    if span.numel() == 0 or int(span[0]) != vocab.boi_token_id:
        raise MalformedImageSpanError("image span does not start with <boi>: nothing to repair")
    repairs, body = [], span[1:]
    closed = bool(body.numel()) and int(body[-1]) == vocab.eoi_token_id
    if closed:
        body = body[:-1]
    else:
        repairs.append("added the missing <eoi>")
    h, w = vocab._largest_size()
    if vocab.variable_size:
        h, w = span_size(vocab, torch.cat([span[:1], body[:2], torch.tensor([vocab.eoi_token_id])]))
        body = body[2:]
    elif vocab.has_budgets:
        w = int(vocab.budget_of_tokens(body[0])) if body.numel() else 0
        if w:
            body = body[1:]
        else:
            w = _infer_budget(vocab, body)
            repairs.append(f"inferred the missing budget token {vocab.budget_token_format.format(w)} from "
                           f"{int(vocab.is_image_token(body).sum())} image tokens")
    rows = _cut_rows(vocab, body)
    input_ids, notes = _fit_rows(vocab, rows, h, w)
    repairs += _missing_eol(vocab, body, len(rows), h) if closed else []  # a cut-off span: <eoi> says it
    if not repairs and not notes:  # strict parsing failed, so something was changed: never report "well formed"
        repairs.append("rebuilt the span from its image tokens")
    return ParsedSpan(image_ids_of(vocab, input_ids, h, w), repairs + notes, w if vocab.has_budgets else None)


def _infer_budget(vocab: ImageVocab, body: torch.Tensor) -> int:
    """The smallest budget whose positions hold the image tokens of ``body`` (the largest when none does)."""
    positions = -(-int(vocab.is_image_token(body).sum()) // vocab.tokens_per_position)
    return next((b for b in vocab.budgets if b >= positions), vocab.budgets[-1])


def _cut_rows(vocab: ImageVocab, body: torch.Tensor) -> list[torch.Tensor]:
    if vocab.layout == "sequence":
        return [body]
    ends = (body == vocab.eol_token_id).nonzero().flatten().tolist()
    starts = [0] + [e + 1 for e in ends]
    rows = [body[a:b] for a, b in zip(starts, ends + [body.numel()])]
    return rows if rows[-1].numel() else rows[:-1]  # a trailing piece without <eol> is a row cut short


def _missing_eol(vocab: ImageVocab, body: torch.Tensor, rows: int, h: int) -> list[str]:
    """The note for a kept last grid row that is not closed by ``<eol>`` (the repaired span gets one)."""
    if vocab.layout != "grid" or not body.numel() or int(body[-1]) == vocab.eol_token_id:
        return []
    if rows > vocab._passes_and_group[0] * h:  # the unclosed piece lies past the last row: dropped as extra tokens
        return []
    return [f"added the missing <eol> of row {rows - 1}"]


def _fit_rows(vocab: ImageVocab, rows: list[torch.Tensor], h: int, w: int) -> tuple[torch.Tensor, list[str]]:
    """Fit rows to the expected ``(rows, width)`` grid of image tokens; return them in span order."""
    classes = _row_classes(vocab, h, w)  # (R, width)
    grid = torch.full(classes.shape, -1, dtype=torch.long)
    extra = sum(max(0, r.numel() - classes.shape[1]) for r in rows[: classes.shape[0]])
    extra += sum(r.numel() for r in rows[classes.shape[0]:])
    for i, row in enumerate(rows[: classes.shape[0]]):
        grid[i, : min(row.numel(), classes.shape[1])] = row[: classes.shape[1]]
    present = grid >= 0
    valid = present & vocab._in_class(grid.clamp(min=0), classes)
    notes = _counted(int((~present).sum()), "missing image token", "filled", _rows_of(~present))
    notes += _counted(int((present & ~valid).sum()), "invalid image token", "replaced",
                      _rows_of(present & ~valid))
    notes += _counted(extra, "extra token", "dropped", [])
    for c in range(vocab.num_image_classes):
        here = classes == c
        grid[here & ~valid] = _fill_id(vocab, grid[here & valid], c)
    return grid.reshape(-1), notes


def _row_classes(vocab: ImageVocab, h: int, w: int) -> torch.LongTensor:
    """Image class of every image token, shaped as the rows a repair fits: grid ``(P*h, w*g)``, sequence
    ``(1, P*N*g)``."""
    passes, group = vocab._passes_and_group
    column = torch.arange(w * group)
    classes = vocab._class_table[:, column % group]  # (P, w*g)
    if vocab.layout == "grid":
        return classes.repeat_interleave(h, dim=0)
    return classes.reshape(1, -1)


def _fill_id(vocab: ImageVocab, valid_ids: torch.Tensor, image_class: int) -> int:
    """The id that fills a missing or invalid image token: the most frequent valid one of its class in the span."""
    if valid_ids.numel():
        return Counter(valid_ids.tolist()).most_common(1)[0][0]
    return int(vocab._table[0]) if vocab.is_unified else int(vocab._class_low[image_class])


def _rows_of(mask: torch.Tensor) -> list[int]:
    return mask.any(dim=1).nonzero().flatten().tolist()


def _counted(count: int, what: str, done: str, rows: list[int]) -> list[str]:
    if not count:
        return []
    where = "" if not rows else f" (row{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows[:6]))}" + (
        ", ...)" if len(rows) > 6 else ")")
    return [f"{count} {what}{'s' if count > 1 else ''} {done}{where}"]
