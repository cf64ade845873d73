"""`ImageLayout`: how the ids of one image are spelled as LLM tokens -- the one declaration of every layout option.

An image is a map of image ids (indices into a visual tokenizer's codebook, ``[0, K)``, with a trailing level axis
``L`` for residual tokenizers). Each image *position* (a grid cell, or an element of a 1-D sequence such as the slots
of a slot tokenizer) emits ``L * F`` tokens: one per residual level ``l < L`` (RQ-VAE, Lee et al. 2022; Slot-MLLM)
and, for very large codebooks, one per sub-token ``j < F`` of the id's mixed-radix split (``factors``, sub-token 0 =
least significant digits, as in Open-MAGVIT2, Luo et al. 2024, and :func:`~tokenizer_bridge.quantizers.fsq.split_ids`).
The order of the tokens in a span:

``grid`` (h x w positions, raster order, ``level_order="position"``)::

    <boi> [p(0,0) p(0,1) ... p(0,w-1)] <eol> ... [p(h-1,0) ... p(h-1,w-1)] <eol> <eoi>
    p(r,c) = t(l=0,j=0) .. t(0,F-1) t(1,0) .. t(L-1,F-1)        # all levels of a position, then the next

``grid`` with ``level_order="level"``: one full grid pass per level (level 0 first), each row closed by ``<eol>``::

    <boi> [level 0: h rows of w*F tokens + <eol>] [level 1: ...] ... [level L-1: ...] <eoi>

``grid`` with ``variable_size=True``: ``grid_size`` is the largest (H, W); each span starts with its size tokens, so
the span itself says how long it is (a reader -- or the logits processor -- knows its grammar after two tokens)::

    <boi> <h_h> <w_w> rows as above for an h x w grid <eoi>          # 1 <= h <= H, 1 <= w <= W

``sequence`` (N positions from a 1-D tokenizer; no ``<eol>``)::

    <boi> p(0) p(1) ... p(N-1) <eoi>                                 # position-major
    <boi> [level 0: N*F tokens] [level 1: ...] ... <eoi>             # level-major

``sequence`` with token ``budgets`` (HOOK-style variable token count of a tokenizer with learned queries, e.g. the
Slot-MLLM slot tokenizer encoding 16, 32 or 64 slots with one model): ``num_tokens`` is the largest budget; each span
states its own budget with one ``<n_b>`` token after ``<boi>``, so its length is known after that token::

    <boi> <n_b> p(0) ... p(b-1) <eoi>                                # b in budgets (levels ordered as above)

With ``token_ids`` (unified-codebook / UniCode mode, Zhu et al. 2024) image id ``k`` is spelled by the existing text
token ``token_ids[k]``; ``special_tokens`` spells ``<boi>``/``<eoi>``/``<eol>`` with existing tokens too.

Nothing here depends on token ids: an :class:`~tokenizer_bridge.vocab.image_vocab.ImageVocab` is a layout whose
tokens got ids (:func:`~tokenizer_bridge.vocab.bridge.add_image_tokens` assigns them). :func:`check_layout_fields`
is the validation of every layout, also of one only partly known (an llm recipe's ``model.image_vocab`` before the
visual tokenizer fills in its grid, levels and budgets).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence

LAYOUTS = ("grid", "sequence")
LEVEL_ORDERS = ("position", "level")


@dataclass
class ImageLayout:
    """How the ids of one image are written as tokens (see the module docstring for each layout's token order).

    Args:
        codebook_size: image ids K per level (``prod(factors)`` when factorized).
        layout: ``"grid"`` (rows closed by ``<eol>``) or ``"sequence"`` (``num_tokens`` positions).
        grid_size: ``(h, w)`` of the id map; the largest ``(H, W)`` when ``variable_size``.
        num_tokens: positions per image of the sequence layout (default with ``budgets``: the largest budget).
        num_levels: residual levels L; image ids then carry a trailing level axis.
        level_order: ``"position"`` (all levels of a position, then the next) or ``"level"`` (one pass per level).
        separate_level_ranges: each level has its own block of ids (else one block serves every level).
        factors: split every id into ``len(factors)`` sub-tokens with these radices (``prod(factors) == K``), e.g.
            ``[2**9, 2**9]`` for a 2**18 codebook.
        variable_size: grid spans state their size with ``<h_k> <w_k>`` after ``<boi>``.
        budgets: sequence spans state their token budget with ``<n_b>`` after ``<boi>`` (e.g. ``[16, 32, 64]`` for a
            slot tokenizer encoding 16, 32 or 64 slots).
        token_ids: unified-codebook (UniCode) mode: image id ``k`` is the existing text token ``token_ids[k]``.
        special_tokens: existing token strings to use as ``<boi>``, ``<eoi>`` (and ``<eol>`` for grids) instead of
            new tokens (e.g. reserved tokens of the text tokenizer).

    The field of the other layout (``num_tokens`` of a grid, ``grid_size`` of a sequence) is cleared.
    """

    codebook_size: int
    layout: str = "grid"
    grid_size: Optional[Sequence[int]] = None
    num_tokens: Optional[int] = None
    num_levels: int = 1
    level_order: str = "position"
    separate_level_ranges: bool = False
    factors: Optional[Sequence[int]] = None
    variable_size: bool = False
    budgets: Optional[Sequence[int]] = None
    token_ids: Optional[Sequence[int]] = None
    special_tokens: Optional[Sequence[str]] = None

    def __post_init__(self):
        for name, value in check_layout_fields(layout_fields(self)).items():
            setattr(self, name, value)

    # ------------------------------------------------------------------ what the layout implies
    @property
    def is_unified(self) -> bool:
        """Unified-codebook mode: image ids are existing text tokens (``token_ids``)."""
        return self.token_ids is not None

    @property
    def has_budgets(self) -> bool:
        """Whether spans state a token budget (``<boi> <n_b> ...``, sequence layout with ``budgets``)."""
        return self.budgets is not None

    @property
    def _radices(self) -> list[int]:
        return list(self.factors) if self.factors is not None else [self.codebook_size]

    @property
    def tokens_per_id(self) -> int:
        """Sub-tokens per image id F (``len(factors)``, else 1)."""
        return len(self._radices)

    @property
    def tokens_per_position(self) -> int:
        """Tokens one position emits: ``num_levels * tokens_per_id``."""
        return self.num_levels * self.tokens_per_id

    @property
    def num_image_classes(self) -> int:
        """Image token classes, the distinct id ranges image tokens draw from: one per (level, if the ranges are
        separate) x (sub-token)."""
        return (self.num_levels if self.separate_level_ranges else 1) * self.tokens_per_id

    @property
    def num_image_tokens(self) -> int:
        """Vocabulary entries that spell image ids (new ones, or the table size in unified-codebook mode)."""
        if self.is_unified:
            return self.codebook_size
        return sum(self._radices) * (self.num_levels if self.separate_level_ranges else 1)

    @property
    def num_image_ids(self) -> int:
        """Positions per image (h*w for grid -- the largest for variable grids -- N for sequence)."""
        if self.layout == "grid":
            return self.grid_size[0] * self.grid_size[1]
        return int(self.num_tokens)

    @property
    def span_length(self) -> int:
        """Tokens in one image span including <boi>, size tokens, <eol>s and <eoi> (the largest for variable grids)."""
        return self.span_length_of(*self._largest_size())

    def span_length_of(self, h: int, w: int) -> int:
        """Tokens in the span of an ``h x w`` image (``h=1, w=N`` for the sequence layout)."""
        passes, group = self._passes_and_group
        row = w * group + (1 if self.layout == "grid" else 0)
        return 2 + self.head_length + passes * h * row

    @property
    def head_length(self) -> int:
        """Tokens between ``<boi>`` and the first image token: ``<h_k> <w_k>`` (2), ``<n_b>`` (1) or none (0)."""
        return 2 if self.variable_size else (1 if self.has_budgets else 0)

    def _largest_size(self) -> tuple[int, int]:
        """``(h, w)`` of the longest span: the grid (the largest one when variable), ``(1, N)`` for a sequence."""
        return tuple(self.grid_size) if self.layout == "grid" else (1, int(self.num_tokens))

    @property
    def _passes_and_group(self) -> tuple[int, int]:
        """(passes P, tokens per position per pass g): position-major (1, L*F), level-major (L, F)."""
        if self.level_order == "level":
            return self.num_levels, self.tokens_per_id
        return 1, self.tokens_per_position


def layout_fields(layout: ImageLayout) -> dict:
    """The :class:`ImageLayout` fields of ``layout`` (also of an ``ImageVocab``), as a shallow dict."""
    return {f.name: getattr(layout, f.name) for f in fields(ImageLayout)}


def as_image_layout(image_layout=None, **values) -> ImageLayout:
    """The layout of a call that passes an :class:`ImageLayout`, or its fields as keywords (the older call form
    ``bridge_llm(model, tokenizer, codebook_size, grid_size=(4, 4))``, whose first layout argument is the codebook
    size)."""
    if isinstance(image_layout, ImageLayout):
        if values:
            raise TypeError(f"pass an ImageLayout or its fields as keywords, not both (got {sorted(values)})")
        return ImageLayout(**layout_fields(image_layout))
    if image_layout is not None:
        if "codebook_size" in values:
            raise TypeError("codebook_size given twice: positionally and as a keyword")
        values["codebook_size"] = image_layout
    return ImageLayout(**values)


# ---------------------------------------------------------------------------------------------------- validation
def check_layout_fields(values: dict) -> dict:
    """Check and normalise layout field values; return the normalised copy, raise ``ValueError`` naming the problem.

    ``values`` holds every field of an :class:`ImageLayout`, or only the fields known so far: a rule is checked once
    the fields it reads are all present, so a partial layout is checked as far as it goes.
    """
    v = dict(values)
    _check_kind(v)
    _check_budgets(v)
    _check_sizes(v)
    _check_levels(v)
    _check_token_ids(v)
    _check_special_tokens(v)
    return v


def _known(v: dict, *names: str) -> bool:
    return all(name in v for name in names)


def _check_kind(v: dict) -> None:
    if _known(v, "layout"):
        if v["layout"] not in LAYOUTS:
            raise ValueError(f"image layout must be one of {LAYOUTS}, got {v['layout']!r}")
        other = "num_tokens" if v["layout"] == "grid" else "grid_size"
        if other in v:
            v[other] = None  # the other layout's size does not apply
    if _known(v, "codebook_size") and not v["codebook_size"] > 0:
        raise ValueError(f"codebook_size must be positive, got {v['codebook_size']}")
    if _known(v, "layout", "variable_size") and v["variable_size"] and v["layout"] != "grid":
        raise ValueError("variable_size applies to the grid layout only (a sequence has num_tokens positions)")


def _check_budgets(v: dict) -> None:
    """Normalise ``budgets`` (sorted, distinct) and default ``num_tokens`` to the largest one."""
    if v.get("budgets") is None:
        return
    if _known(v, "layout") and v["layout"] != "sequence":
        raise ValueError("budgets (token budgets) apply to the sequence layout only; a grid states its size with "
                         "variable_size")
    budgets = sorted({int(b) for b in v["budgets"]})
    if not budgets or budgets[0] < 1:
        raise ValueError(f"budgets must be positive token counts, got {list(v['budgets'])}")
    if v.get("num_tokens") is None:
        v["num_tokens"] = budgets[-1]
    elif int(v["num_tokens"]) != budgets[-1]:
        raise ValueError(f"num_tokens={v['num_tokens']} must be the largest budget of {budgets} (a budgeted "
                         "sequence's longest span)")
    v["budgets"] = budgets


def _check_sizes(v: dict) -> None:
    grid = v.get("grid_size")
    if grid is not None or (_known(v, "layout", "grid_size") and v["layout"] == "grid"):
        if grid is None or len(grid) != 2 or min(grid) <= 0:
            raise ValueError(f"grid layout needs grid_size=(h, w) with positive sides, got {grid}")
        v["grid_size"] = [int(s) for s in grid]
    if _known(v, "layout", "num_tokens") and v["layout"] == "sequence":
        if not v["num_tokens"] or v["num_tokens"] <= 0:
            raise ValueError(f"sequence layout needs a positive num_tokens, got {v['num_tokens']}")


def _check_levels(v: dict) -> None:
    if _known(v, "num_levels") and v["num_levels"] < 1:
        raise ValueError(f"num_levels must be >= 1, got {v['num_levels']}")
    if _known(v, "level_order") and v["level_order"] not in LEVEL_ORDERS:
        raise ValueError(f"level_order must be one of {LEVEL_ORDERS}, got {v['level_order']!r}")
    if v.get("factors") is None:
        return
    factors = v["factors"] = [int(f) for f in v["factors"]]
    if len(factors) < 2 or min(factors) < 2:
        raise ValueError(f"factors must be at least two radices >= 2, got {factors}")
    product = 1
    for f in factors:
        product *= f
    if _known(v, "codebook_size") and product != v["codebook_size"]:
        raise ValueError(f"factors {factors} multiply to {product}, not codebook_size={v['codebook_size']}")


def _check_token_ids(v: dict) -> None:
    if v.get("token_ids") is None:
        return
    ids = v["token_ids"] = [int(t) for t in v["token_ids"]]
    if v.get("factors") is not None or v.get("separate_level_ranges"):
        raise ValueError("token_ids (unified codebook) cannot be combined with factors or separate_level_ranges")
    if _known(v, "codebook_size") and len(ids) != v["codebook_size"]:
        raise ValueError(f"token_ids has {len(ids)} entries but codebook_size is {v['codebook_size']}")
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise ValueError("token_ids must be distinct non-negative token ids")


def _check_special_tokens(v: dict) -> None:
    if v.get("special_tokens") is None:
        return
    names = v["special_tokens"] = list(v["special_tokens"])
    if not all(isinstance(name, str) for name in names):
        raise ValueError(f"special_tokens must be token strings, got {names}")
    want = 3 if v.get("layout") == "grid" else 2
    if _known(v, "layout") and len(names) != want:
        markers = "<boi>, <eoi>" + (", <eol>" if want == 3 else "")
        raise ValueError(f"special_tokens must name {want} existing tokens ({markers}), got {names}")
