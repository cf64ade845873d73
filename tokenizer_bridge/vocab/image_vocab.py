"""`ImageVocab`: where a visual tokenizer's image ids live inside an LLM vocabulary, and how an image is spelled.

A small JSON-serialisable record (``image_vocab.json``) owned by the bridge. It maps image ids (indices into a visual
tokenizer's codebook, ``[0, K)``, with a trailing level axis ``L`` for residual tokenizers) to LLM token ids
(``input_ids``) and back with vectorised tensor arithmetic, and defines the span grammar of every layout.

Each image *position* (a grid cell or a sequence slot) emits ``L * F`` tokens: one per residual level ``l < L``
(RQ-VAE, Lee et al. 2022; Slot-MLLM) and, for very large codebooks, one per sub-token ``j < F`` of the id's
mixed-radix split (``factors``, sub-token 0 = least significant digits, as in Open-MAGVIT2, Luo et al. 2024, and
:func:`~tokenizer_bridge.quantizers.fsq.split_ids`). The order of the tokens in a span:

``grid`` (h x w positions, raster order, ``level_order="position"``)::

    <boi> [p(0,0) p(0,1) ... p(0,w-1)] <eol> ... [p(h-1,0) ... p(h-1,w-1)] <eol> <eoi>
    p(r,c) = t(l=0,j=0) .. t(0,F-1) t(1,0) .. t(L-1,F-1)        # all levels of a position, then the next

``grid`` with ``level_order="level"``: one full grid pass per level (level 0 first), each row closed by ``<eol>``::

    <boi> [level 0: h rows of w*F tokens + <eol>] [level 1: ...] ... [level L-1: ...] <eoi>

``grid`` with ``variable_size=True``: ``grid_size`` is the largest (H, W); each span starts with its size tokens, so
the span itself says how long it is (a reader -- or the logits processor -- knows its grammar after two tokens)::

    <boi> <h_h> <w_w> rows as above for an h x w grid <eoi>          # 1 <= h <= H, 1 <= w <= W

``sequence`` (N slots from a 1-D tokenizer; no ``<eol>``)::

    <boi> p(0) p(1) ... p(N-1) <eoi>                                 # position-major
    <boi> [level 0: N*F tokens] [level 1: ...] ... <eoi>             # level-major

``sequence`` with token ``budgets`` (HOOK-style variable token count of a tokenizer with learned queries, e.g. the
Slot-MLLM slot tokenizer encoding 16, 32 or 64 slots with one model): ``num_tokens`` is the largest budget; each span
states its own budget with one ``<n_b>`` token after ``<boi>``, so its length is known after that token::

    <boi> <n_b> p(0) ... p(b-1) <eoi>                                # b in budgets (levels ordered as above)

Token ids. Without ``token_ids`` the image tokens are new, contiguous ids from ``offset``: one block of ``G`` ids per
level (``separate_level_ranges``) or one block for every level (shared), where ``G = K`` or, with factors,
``G = sum(factors)`` (sub-token ``j`` uses ``[offset + sum(factors[:j]), + factors[j])`` of its block); so
``factors=[2**9, 2**9]`` costs ``2 * 2**9`` new tokens instead of ``2**18``. With ``token_ids`` (unified-codebook /
UniCode mode, Zhu et al. 2024) image id ``k`` *is* the existing text token ``token_ids[k]``: nothing is added except,
possibly, ``<boi>``/``<eoi>``/``<eol>`` (which may also reuse existing tokens).

The fingerprint of the visual tokenizer the vocabulary was made for is recorded so that a bundle whose ids were
produced by a different tokenizer is refused instead of silently decoding garbage.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union

import torch

from ..quantizers.fsq import merge_ids, split_ids

IMAGE_VOCAB_NAME = "image_vocab.json"
LAYOUTS = ("grid", "sequence")
LEVEL_ORDERS = ("position", "level")
# What the token at a position of a span must be (see ImageVocab.span_slots): image slot class c is SLOT_IMAGE + c.
SLOT_EOI, SLOT_EOL, SLOT_HEIGHT, SLOT_WIDTH, SLOT_IMAGE = range(5)


class MalformedImageSpanError(ValueError):
    """Raised when a token span does not have the shape an image span must have."""


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


@dataclass
class ImageVocab:
    """Image-id <-> token-id mapping and span grammar (see the module docstring for every layout's token order).

    Args:
        offset: token id of the first image token (image id ``k`` of a single-level vocabulary is ``offset + k``);
            ``None`` in unified-codebook mode (``token_ids``).
        codebook_size: number of image ids K per level (``prod(factors)`` when factorized).
        layout: ``"grid"`` (rows closed by ``<eol>``) or ``"sequence"`` (``num_tokens`` positions).
        grid_size: ``(h, w)`` of the id map; the largest ``(H, W)`` when ``variable_size``.
        num_tokens: number of positions per image for the sequence layout.
        boi_token_id / eoi_token_id / eol_token_id: special token ids (``eol`` only for the grid layout).
        num_levels: residual levels L; image ids then carry a trailing level axis.
        level_order: ``"position"`` (all levels of a position, then the next) or ``"level"`` (one pass per level).
        separate_level_ranges: each level has its own block of ids (else one block serves every level).
        factors: split every id into ``len(factors)`` sub-tokens with these radices (``prod(factors) == K``).
        variable_size: grid spans carry their own size as ``<h_k> <w_k>`` tokens after ``<boi>``.
        size_token_offset: id of ``<h_1>``; ``<h_k>`` is ``size_token_offset + k - 1`` and ``<w_k>`` follows the
            H height tokens: ``size_token_offset + H + k - 1``.
        budgets: sequence layout only: the token budgets a span may have (sorted; the largest is ``num_tokens``,
            which defaults to it); each span then starts ``<boi> <n_b>``.
        budget_token_offset: id of the budget token of ``budgets[0]``; budget ``budgets[i]`` is
            ``budget_token_offset + i``.
        token_ids: unified-codebook mode: image id ``k`` is the existing token ``token_ids[k]`` (K entries).
        text_vocab_size: size of the LLM's vocabulary before bridging (ids below it are text).
        tokenizer_fingerprint: fingerprint of the visual tokenizer that produced the ids.
    """

    offset: Optional[int]
    codebook_size: int
    boi_token_id: int
    eoi_token_id: int
    layout: str = "grid"
    grid_size: Optional[Sequence[int]] = None
    num_tokens: Optional[int] = None
    eol_token_id: Optional[int] = None
    num_levels: int = 1
    level_order: str = "position"
    separate_level_ranges: bool = False
    factors: Optional[Sequence[int]] = None
    variable_size: bool = False
    size_token_offset: Optional[int] = None
    budgets: Optional[Sequence[int]] = None
    budget_token_offset: Optional[int] = None
    token_ids: Optional[Sequence[int]] = None
    text_vocab_size: Optional[int] = None
    tokenizer_fingerprint: Optional[str] = None
    boi_token: str = "<boi>"
    eoi_token: str = "<eoi>"
    eol_token: str = "<eol>"
    image_token_format: str = "<img_{}>"
    height_token_format: str = "<h_{}>"
    width_token_format: str = "<w_{}>"
    budget_token_format: str = "<n{}>"
    image_placeholder: str = "<image>"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self._check_layout()
        self._check_levels()
        self._check_ids()
        self._build_tables()

    # ------------------------------------------------------------------ validation
    def _check_layout(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"ImageVocab layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.codebook_size <= 0:
            raise ValueError(f"codebook_size must be positive, got {self.codebook_size}")
        if self.layout == "grid":
            if self.grid_size is None or len(self.grid_size) != 2 or min(self.grid_size) <= 0:
                raise ValueError(f"grid layout needs grid_size=(h, w) with positive sides, got {self.grid_size}")
            if self.eol_token_id is None:
                raise ValueError("grid layout needs an eol_token_id (one <eol> closes each row)")
            self.grid_size = [int(s) for s in self.grid_size]
        else:
            self._check_budgets()
            if not self.num_tokens or self.num_tokens <= 0:
                raise ValueError(f"sequence layout needs a positive num_tokens, got {self.num_tokens}")
            if self.variable_size:
                raise ValueError("variable_size applies to the grid layout only (a sequence has num_tokens slots)")
        if self.variable_size and self.size_token_offset is None:
            raise ValueError("variable_size needs size_token_offset (the id of <h_1>; add_image_tokens sets it)")
        if self.budgets is not None and self.layout != "sequence":
            raise ValueError("budgets (token budgets) apply to the sequence layout only; a grid states its size with "
                             "variable_size")
        if self.budgets is None and self.budget_token_offset is not None:
            raise ValueError("budget_token_offset is set but budgets is not: pass the allowed token budgets")

    def _check_budgets(self) -> None:
        """Normalise ``budgets`` (sorted, distinct) and default ``num_tokens`` to the largest one."""
        if self.budgets is None:
            return
        budgets = sorted({int(b) for b in self.budgets})
        if not budgets or budgets[0] < 1:
            raise ValueError(f"budgets must be positive token counts, got {list(self.budgets)}")
        if self.num_tokens is None:
            self.num_tokens = budgets[-1]
        elif int(self.num_tokens) != budgets[-1]:
            raise ValueError(f"num_tokens={self.num_tokens} must be the largest budget of {budgets} (a budgeted "
                             "sequence's longest span)")
        if self.budget_token_offset is None:
            raise ValueError("budgets need budget_token_offset (the id of the first budget token; add_image_tokens "
                             "sets it)")
        self.budgets = budgets

    def _check_levels(self) -> None:
        if self.num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {self.num_levels}")
        if self.level_order not in LEVEL_ORDERS:
            raise ValueError(f"level_order must be one of {LEVEL_ORDERS}, got {self.level_order!r}")
        if self.factors is not None:
            self.factors = [int(f) for f in self.factors]
            if len(self.factors) < 2 or min(self.factors) < 2:
                raise ValueError(f"factors must be at least two radices >= 2, got {self.factors}")
            product = 1
            for f in self.factors:
                product *= f
            if product != self.codebook_size:
                raise ValueError(
                    f"factors {self.factors} multiply to {product}, not codebook_size={self.codebook_size}"
                )
        if self.token_ids is not None:
            self._check_token_table()
        elif self.offset is None or self.offset < 0:
            raise ValueError(f"offset must be a non-negative token id (or pass token_ids), got {self.offset}")

    def _check_token_table(self) -> None:
        self.token_ids = [int(t) for t in self.token_ids]
        if self.offset is not None:
            raise ValueError("unified-codebook mode (token_ids) has no offset: pass offset=None")
        if self.factors is not None or self.separate_level_ranges:
            raise ValueError("token_ids (unified codebook) cannot be combined with factors or separate_level_ranges")
        if len(self.token_ids) != self.codebook_size:
            raise ValueError(f"token_ids has {len(self.token_ids)} entries but codebook_size is {self.codebook_size}")
        if min(self.token_ids) < 0 or len(set(self.token_ids)) != len(self.token_ids):
            raise ValueError("token_ids must be distinct non-negative token ids")
        if self.text_vocab_size is not None and max(self.token_ids) >= self.text_vocab_size:
            raise ValueError(
                f"token_ids reaches {max(self.token_ids)} but the text vocabulary has {self.text_vocab_size} tokens: "
                "unified-codebook image ids must be existing text tokens"
            )

    def _check_ids(self) -> None:
        specials = self.special_token_ids
        if len(set(specials)) != len(specials):
            raise ValueError(f"special token ids must be distinct, got {specials}")
        image = self.image_token_ids()  # (T,) sorted
        for sid in specials:
            if _contains(image, sid):
                raise ValueError(f"special token id {sid} overlaps the image ids ({self._image_ids_text()})")
        if self.variable_size:
            low, high = self._size_range
            if any(low <= sid < high for sid in specials) or bool(((image >= low) & (image < high)).any()):
                raise ValueError(f"size tokens [{low}, {high}) overlap the special or image token ids")
        if self.has_budgets:
            low, high = self._budget_range
            if any(low <= sid < high for sid in specials) or bool(((image >= low) & (image < high)).any()):
                raise ValueError(f"budget tokens [{low}, {high}) overlap the special or image token ids")
        if self.text_vocab_size is not None:
            if not self.is_unified and self.offset < self.text_vocab_size:
                raise ValueError(
                    f"image ids start at {self.offset} but the text vocabulary has {self.text_vocab_size} tokens: "
                    "the image range would overlap existing text tokens"
                )
            if self.variable_size and self._size_range[0] < self.text_vocab_size:
                raise ValueError(
                    f"size tokens start at {self._size_range[0]} but the text vocabulary has {self.text_vocab_size} "
                    "tokens: they would overlap existing text tokens"
                )
            if self.has_budgets and self._budget_range[0] < self.text_vocab_size:
                raise ValueError(
                    f"budget tokens start at {self._budget_range[0]} but the text vocabulary has "
                    f"{self.text_vocab_size} tokens: they would overlap existing text tokens"
                )

    def _build_tables(self) -> None:
        """Per-(level, sub-token) id offsets and slot classes as small tensors, so every mapping is one broadcast."""
        levels, parts = self.num_levels, self.tokens_per_id
        level, part = torch.arange(levels)[:, None], torch.arange(parts)[None, :]
        classes = level * parts + part if self.separate_level_ranges else part.expand(levels, parts)
        self._sub_classes = classes.contiguous()  # (L, F): slot class of each (level, sub-token)
        radices = torch.tensor(self._radices)  # (F,)
        starts = torch.cumsum(radices, 0) - radices  # (F,): start of sub-token j inside a block
        block = int(radices.sum()) * level * int(self.separate_level_ranges)  # (L, 1): start of each level's block
        base = 0 if self.offset is None else self.offset
        self._sub_offsets = (base + block + starts[None, :]).contiguous()  # (L, F): token id of sub-id 0
        # classes are numbered l * F + j (separate) or j (shared): the first C offsets in (l, j) order are theirs
        self._class_low = self._sub_offsets.reshape(-1)[: self.num_slot_classes]  # (C,)
        self._class_high = self._class_low + radices.repeat(self.num_slot_classes // parts)  # (C,)
        passes, group = self._passes_and_group
        self._slot_table = classes.reshape(passes, group)  # (P, g): class of slot s of pass p
        if self.is_unified:
            self._table = torch.tensor(self.token_ids, dtype=torch.long)  # (K,)
            self._inverse = torch.full((int(self._table.max()) + 1,), -1, dtype=torch.long)
            self._inverse[self._table] = torch.arange(self.codebook_size)
        self._budget_table = torch.tensor(self.budgets or [], dtype=torch.long)  # (nb,): budget of budget token i
        self._device_tables = {}

    # ------------------------------------------------------------------ sizes
    @property
    def is_unified(self) -> bool:
        """Unified-codebook mode: image ids are existing text tokens (``token_ids``)."""
        return self.token_ids is not None

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
    def num_slot_classes(self) -> int:
        """Distinct token ranges image slots draw from: one per (level if separate) x (sub-token)."""
        return (self.num_levels if self.separate_level_ranges else 1) * self.tokens_per_id

    @property
    def num_image_tokens(self) -> int:
        """LLM token ids that encode image ids (new ones, or the table size in unified-codebook mode)."""
        if self.is_unified:
            return self.codebook_size
        return sum(self._radices) * (self.num_levels if self.separate_level_ranges else 1)

    @property
    def id_range(self) -> tuple[int, int]:
        """Half-open range ``[start, end)`` of the (new, contiguous) token ids that encode image ids."""
        if self.is_unified:
            raise ValueError("a unified-codebook ImageVocab has no image id range: its image tokens are the text "
                             "tokens listed in token_ids (see image_token_ids())")
        return (self.offset, self.offset + self.num_image_tokens)

    @property
    def num_image_ids(self) -> int:
        """Positions per image (h*w for grid -- the largest for variable grids -- N for sequence)."""
        if self.layout == "grid":
            return self.grid_size[0] * self.grid_size[1]
        return int(self.num_tokens)

    @property
    def span_length(self) -> int:
        """Tokens in one image span including <boi>, size tokens, <eol>s and <eoi> (the largest for variable grids)."""
        return self.span_length_of(*self._default_size())

    def span_length_of(self, h: int, w: int) -> int:
        """Tokens in the span of an ``h x w`` image (``h=1, w=N`` for the sequence layout)."""
        passes, group = self._passes_and_group
        row = w * group + (1 if self.layout == "grid" else 0)
        return 2 + self.head_length + passes * h * row

    @property
    def head_length(self) -> int:
        """Tokens between ``<boi>`` and the first image token: ``<h_k> <w_k>`` (2), ``<n_b>`` (1) or none (0)."""
        return 2 if self.variable_size else (1 if self.has_budgets else 0)

    def _default_size(self) -> tuple[int, int]:
        return tuple(self.grid_size) if self.layout == "grid" else (1, int(self.num_tokens))

    @property
    def _passes_and_group(self) -> tuple[int, int]:
        """(passes P, tokens per position per pass g): position-major (1, L*F), level-major (L, F)."""
        if self.level_order == "level":
            return self.num_levels, self.tokens_per_id
        return 1, self.tokens_per_position

    @property
    def special_token_ids(self) -> list[int]:
        ids = [self.boi_token_id, self.eoi_token_id]
        return ids + ([self.eol_token_id] if self.eol_token_id is not None else [])

    @property
    def _size_range(self) -> tuple[int, int]:
        return (self.size_token_offset, self.size_token_offset + sum(self.grid_size))

    @property
    def has_budgets(self) -> bool:
        """Whether spans state a token budget (``<boi> <n_b> ...``, sequence layout with ``budgets``)."""
        return self.budgets is not None

    @property
    def _budget_range(self) -> tuple[int, int]:
        return (self.budget_token_offset, self.budget_token_offset + len(self.budgets))

    @property
    def budget_token_ids(self) -> list[int]:
        """Ids of the budget tokens in ``budgets`` order (empty without budgets)."""
        return list(range(*self._budget_range)) if self.has_budgets else []

    def budget_token(self, budget: int) -> int:
        """Token id of ``<n_budget>``; raises unless ``budget`` is one of ``budgets``."""
        if not self.has_budgets:
            raise ValueError("this ImageVocab has no token budgets (its sequences always have "
                             f"{self.num_tokens} positions)")
        if int(budget) not in self.budgets:
            raise ValueError(f"budget {budget} is not one of this vocabulary's token budgets {self.budgets}")
        return self.budget_token_offset + self.budgets.index(int(budget))

    def budget_of_tokens(self, tokens: torch.Tensor) -> torch.LongTensor:
        """Budget stated by each budget token (any shape); 0 for tokens that are not budget tokens."""
        tokens = torch.as_tensor(tokens).long()
        if not self.has_budgets:
            return torch.zeros_like(tokens)
        table = self._on(tokens.device)["budgets"]
        index = tokens - self.budget_token_offset
        inside = (index >= 0) & (index < table.numel())
        return torch.where(inside, table[index.clamp(0, table.numel() - 1)], 0)

    def budget_token_strings(self) -> list[str]:
        """Names of the budget tokens in id order (empty without budgets)."""
        return [self.budget_token_format.format(b) for b in self.budgets] if self.has_budgets else []

    @property
    def size_token_ids(self) -> list[int]:
        """Ids of ``<h_1>..<h_H>, <w_1>..<w_W>`` (empty unless ``variable_size``)."""
        return list(range(*self._size_range)) if self.variable_size else []

    @property
    def max_token_id(self) -> int:
        """Largest token id this vocabulary uses."""
        return int(max(self.special_token_ids + self.size_token_ids + self.budget_token_ids
                       + [int(self.image_token_ids().max())]))

    def image_token_strings(self) -> list[str]:
        """Names of the new image tokens in id order (empty in unified-codebook mode)."""
        if self.is_unified:
            return []
        levels = self.num_levels if self.separate_level_ranges else 1
        names = []
        for level in range(levels):
            for part, radix in enumerate(self._radices):
                prefix = (f"L{level}_" if self.separate_level_ranges else "") + (
                    f"F{part}_" if self.factors is not None else "")
                names.extend(self.image_token_format.format(f"{prefix}{k}") for k in range(radix))
        return names

    def size_token_strings(self) -> list[str]:
        """Names of the size tokens in id order (empty unless ``variable_size``)."""
        if not self.variable_size:
            return []
        height, width = self.grid_size
        return ([self.height_token_format.format(k) for k in range(1, height + 1)]
                + [self.width_token_format.format(k) for k in range(1, width + 1)])

    # ------------------------------------------------------------------ token classes
    def image_token_ids(self) -> torch.LongTensor:
        """``(T,)`` sorted token ids that encode image ids in some slot."""
        if self.is_unified:
            return torch.tensor(sorted(self.token_ids), dtype=torch.long)
        return torch.arange(self.offset, self.offset + self.num_image_tokens)

    def is_image_token(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Whether each token id encodes an image id in some slot (any shape)."""
        input_ids = torch.as_tensor(input_ids)
        if self.is_unified:
            return self._unified_index(input_ids) >= 0
        return (input_ids >= self.offset) & (input_ids < self.offset + self.num_image_tokens)

    def class_token_mask(self, vocab_size: int) -> torch.BoolTensor:
        """``(C, vocab_size)``: which token ids slot class ``c`` allows."""
        ids = torch.arange(vocab_size)
        if self.is_unified:
            return (self._unified_index(ids) >= 0)[None]
        return (ids >= self._class_low[:, None]) & (ids < self._class_high[:, None])

    def class_name(self, slot_class: int) -> str:
        level, part = divmod(slot_class, self.tokens_per_id)
        what = [f"level {level}"] if self.separate_level_ranges else []
        what += [f"sub-token {part}"] if self.factors is not None else []
        return " ".join(what) or "image id"

    def _in_class(self, tokens: torch.Tensor, classes: torch.Tensor) -> torch.BoolTensor:
        if self.is_unified:
            return self._unified_index(tokens) >= 0
        tables = self._on(tokens.device)
        return (tokens >= tables["low"][classes]) & (tokens < tables["high"][classes])

    def _unified_index(self, tokens: torch.Tensor) -> torch.LongTensor:
        """Image id of each token in unified-codebook mode, -1 for tokens outside the table."""
        inverse = self._on(tokens.device)["inverse"]
        inside = (tokens >= 0) & (tokens < inverse.numel())
        return torch.where(inside, inverse[tokens.long().clamp(0, inverse.numel() - 1)], -1)

    def _on(self, device: torch.device) -> dict:
        """The lookup tables on ``device`` (copied once per device, never per call)."""
        key = str(device)
        if key not in self._device_tables:
            tables = {"slots": self._slot_table, "offsets": self._sub_offsets, "low": self._class_low,
                      "high": self._class_high, "budgets": self._budget_table}
            if self.is_unified:
                tables.update(table=self._table, inverse=self._inverse)
            self._device_tables[key] = {k: v.to(device) for k, v in tables.items()}
        return self._device_tables[key]

    # ------------------------------------------------------------------ id mapping
    def image_ids_to_input_ids(self, image_ids: torch.Tensor) -> torch.Tensor:
        """Image ids -> LLM token ids. Single-level, unfactorized: elementwise (any shape). Otherwise ``(..., L)``
        (``(...)`` when ``L == 1``) -> ``(..., L * F)``: the tokens of each position in position-major order."""
        ids = torch.as_tensor(image_ids).long()
        if self.num_levels > 1 and (ids.dim() == 0 or ids.shape[-1] != self.num_levels):
            raise ValueError(f"image ids need a trailing level axis of {self.num_levels}, got {tuple(ids.shape)}")
        leveled = ids if self.num_levels > 1 else ids[..., None]
        tokens = self._to_tokens(leveled)  # (..., L, F)
        if self.tokens_per_position == 1:
            return tokens.reshape(ids.shape)
        return tokens.reshape(*leveled.shape[:-1], self.tokens_per_position)

    def input_ids_to_image_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`image_ids_to_input_ids`; raises if a token is not valid at its slot."""
        tokens = torch.as_tensor(input_ids).long()
        per = self.tokens_per_position
        if per > 1 and (tokens.dim() == 0 or tokens.shape[-1] != per):
            raise ValueError(f"expected a trailing axis of {per} tokens per position, got {tuple(tokens.shape)}")
        shaped = tokens.reshape(*(tokens.shape[:-1] if per > 1 else tokens.shape), self.num_levels,
                                self.tokens_per_id)
        classes = self._sub_classes.to(tokens.device).expand_as(shaped)
        bad = ~self._in_class(shaped, classes)
        if bad.any():
            raise MalformedImageSpanError(
                f"token id {int(shaped[bad][0])} is not an image token for its slot "
                f"({self.class_name(int(classes[bad][0]))}; image tokens are {self._image_ids_text()})"
            )
        ids = self._from_tokens(shaped)  # (..., L)
        return ids if self.num_levels > 1 else ids[..., 0]

    def _to_tokens(self, ids: torch.Tensor) -> torch.LongTensor:
        """``(..., L)`` image ids -> ``(..., L, F)`` token ids."""
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise ValueError(
                f"image ids must lie in [0, {self.codebook_size}), got range [{int(ids.min())}, {int(ids.max())}]"
            )
        tables = self._on(ids.device)
        if self.is_unified:
            return tables["table"][ids][..., None]
        sub = split_ids(ids, self.factors) if self.factors is not None else ids[..., None]
        return sub + tables["offsets"]

    def _from_tokens(self, tokens: torch.Tensor) -> torch.LongTensor:
        """``(..., L, F)`` token ids (already checked) -> ``(..., L)`` image ids."""
        if self.is_unified:
            return self._unified_index(tokens[..., 0])
        sub = tokens - self._on(tokens.device)["offsets"]
        return merge_ids(sub, self.factors) if self.factors is not None else sub[..., 0]

    def _image_ids_text(self) -> str:
        if self.is_unified:
            return f"the {self.codebook_size} text tokens of the unified codebook"
        return str(self.id_range)

    # ------------------------------------------------------------------ span grammar
    def span_slots(self, t: torch.Tensor, h=None, w=None) -> torch.LongTensor:
        """What the token ``t`` positions after ``<boi>`` (``t = 0`` is the first) must be, as a slot code:
        ``SLOT_EOI``, ``SLOT_EOL``, ``SLOT_HEIGHT``, ``SLOT_WIDTH`` or ``SLOT_IMAGE + c`` (slot class ``c``).

        ``t``, ``h`` and ``w`` are broadcastable tensors (or ints), so one call covers a batch of rows with different
        image sizes; ``h``/``w`` default to the fixed size. Positions past the end are ``SLOT_EOI``. A budgeted
        sequence is a ``1 x budget`` image whose budget token ``<n_b>`` takes the ``SLOT_WIDTH`` slot (``w`` is the
        budget).
        """
        t = torch.as_tensor(t)
        height, width = self._default_size()
        h = torch.as_tensor(height if h is None else h, device=t.device)
        w = torch.as_tensor(width if w is None else w, device=t.device)
        passes, group = self._passes_and_group
        grid = self.layout == "grid"
        b = (t - self.head_length).clamp(min=0)  # index into the rows
        row = w * group + (1 if grid else 0)
        per_pass = h * row
        p = (b // per_pass).clamp(max=passes - 1)
        column = (b - p * per_pass) % row
        slots = SLOT_IMAGE + self._on(t.device)["slots"][p, column.clamp(max=w * group - 1) % group]
        if grid:
            slots = torch.where(column == w * group, SLOT_EOL, slots)
        slots = torch.where(b >= passes * per_pass, SLOT_EOI, slots)
        if self.variable_size:
            slots = torch.where(t == 0, SLOT_HEIGHT, torch.where(t == 1, SLOT_WIDTH, slots))
        elif self.has_budgets:
            slots = torch.where(t == 0, SLOT_WIDTH, slots)
        return slots

    def size_of_tokens(self, height_token: torch.Tensor, width_token: torch.Tensor) -> tuple:
        """``(h, w)`` encoded by size tokens (any shape; invalid tokens give values outside ``[1, H]``/``[1, W]``)."""
        low = self.size_token_offset
        return height_token - low + 1, width_token - low - self.grid_size[0] + 1

    def size_tokens(self, h: int, w: int) -> list[int]:
        """``[<h_h>, <w_w>]`` token ids for a variable-size grid."""
        self._check_size(h, w)
        return [self.size_token_offset + h - 1, self.size_token_offset + self.grid_size[0] + w - 1]

    def _check_size(self, h: int, w: int) -> None:
        if self.layout == "sequence":
            if self.has_budgets and (h != 1 or w not in self.budgets):
                raise ValueError(f"expected one of the token budgets {self.budgets} of image ids per image, got "
                                 f"{h * w}")
            if not self.has_budgets and (h, w) != (1, self.num_tokens):
                raise ValueError(f"expected {self.num_tokens} image ids per image, got {h * w}")
        elif self.variable_size:
            if not (1 <= h <= self.grid_size[0] and 1 <= w <= self.grid_size[1]):
                raise ValueError(f"image size {h}x{w} exceeds the largest grid {self.grid_size[0]}x{self.grid_size[1]}")
        elif [h, w] != self.grid_size:
            raise ValueError(f"expected {self.num_image_ids} image ids per image ({self._shape_text()}), "
                             f"got a {h}x{w} grid")

    # ------------------------------------------------------------------ spans: build
    def build_span(self, image_ids: torch.Tensor) -> torch.Tensor:
        """Wrap one image's ids as a token span.

        Grid: ``(h, w)`` (``(h, w, L)`` with levels; ``(h*w[, L])`` for fixed grids); sequence: ``(N,)``/``(N, L)``.
        Returns ``(span_length_of(h, w),)``.
        """
        return self._build(self._as_batch(image_ids, batched=False))[0]

    def build_spans(self, image_ids: torch.Tensor) -> torch.Tensor:
        """Batched :meth:`build_span` for images of one size: ``(B, ...)`` -> ``(B, span_length_of(h, w))``."""
        return self._build(self._as_batch(image_ids, batched=True))

    def _build(self, ids: torch.LongTensor) -> torch.LongTensor:
        """``(B, h, w, L)`` image ids -> ``(B, span_length_of(h, w))`` spans."""
        batch, h, w, _ = ids.shape
        tokens = self._to_tokens(ids)  # (B, h, w, L, F)
        passes, group = self._passes_and_group
        if self.level_order == "level":
            tokens = tokens.permute(0, 3, 1, 2, 4)  # (B, L, h, w, F): one pass per level
        rows = tokens.reshape(batch, passes, h, w * group)
        if self.layout == "grid":
            eol = torch.full((batch, passes, h, 1), self.eol_token_id, dtype=torch.long, device=rows.device)
            rows = torch.cat([rows, eol], dim=3)
        head = [self.boi_token_id] + self._head_tokens(h, w)
        head = torch.tensor(head, device=rows.device).expand(batch, -1)
        eoi = torch.full((batch, 1), self.eoi_token_id, dtype=torch.long, device=rows.device)
        return torch.cat([head, rows.reshape(batch, -1), eoi], dim=1)

    def _head_tokens(self, h: int, w: int) -> list[int]:
        """The tokens after ``<boi>`` that state a span's size (``<h_h> <w_w>``) or budget (``<n_w>``)."""
        if self.variable_size:
            return self.size_tokens(h, w)
        return [self.budget_token(w)] if self.has_budgets else []

    def _as_batch(self, image_ids, batched: bool) -> torch.LongTensor:
        """Image ids of any accepted shape -> ``(B, h, w, L)`` (sequence: ``(B, 1, N, L)``), shape-checked."""
        ids = torch.as_tensor(image_ids)
        if ids.is_floating_point():
            raise ValueError(f"image_ids must be integers, got dtype {ids.dtype}")
        ids = ids.long() if batched else ids.long()[None]
        if self.num_levels > 1:
            if ids.dim() < 2 or ids.shape[-1] != self.num_levels:
                raise ValueError(f"image ids need a trailing level axis of {self.num_levels}, got shape "
                                 f"{tuple(ids.shape)}")
        else:
            ids = ids[..., None]
        positions = list(ids.shape[1:-1])
        if len(positions) == 1 and self.layout == "grid" and not self.variable_size:
            if positions[0] != self.num_image_ids:
                raise ValueError(f"expected {self.num_image_ids} image ids per image, got {positions[0]}")
            positions = self.grid_size
        if self.layout == "sequence":
            if len(positions) != 1:
                raise ValueError(f"sequence image ids must be (N,) or (N, L) per image, got {positions}")
            positions = [1, positions[0]]
        if len(positions) != 2:
            raise ValueError(f"grid image ids must be (h, w) (or (h, w, L)) per image, got shape {positions}")
        self._check_size(*positions)
        return ids.reshape(ids.shape[0], *positions, self.num_levels)

    # ------------------------------------------------------------------ spans: parse
    def parse_span(self, span: torch.Tensor, lenient: bool = False, return_budget: bool = False):
        """Inverse of :meth:`build_span`: image ids ``(h, w)``/``(h, w, L)`` (grid) or ``(N,)``/``(N, L)``.

        Raises :class:`MalformedImageSpanError` naming what is wrong (for a budgeted sequence, also a span whose
        length is not the one its budget token states). With ``lenient=True`` a malformed span is repaired instead
        (see :meth:`repair_span`, which also says what it did). With ``return_budget=True`` returns
        ``(image_ids, budget)``: the span's token budget (``None`` for a vocabulary without budgets).
        """
        if lenient:
            parsed = self.repair_span(span)
            return (parsed.image_ids, parsed.budget) if return_budget else parsed.image_ids
        ids = self._parse_strict(span)
        if return_budget:
            return ids, (int(ids.shape[0]) if self.has_budgets else None)
        return ids

    def _parse_strict(self, span: torch.Tensor) -> torch.LongTensor:
        span = torch.as_tensor(span).long().reshape(-1)
        if span.numel() == 0 or int(span[0]) != self.boi_token_id:
            raise MalformedImageSpanError("image span does not start with <boi>")
        if int(span[-1]) != self.eoi_token_id:
            raise MalformedImageSpanError("image span is not closed by <eoi> (truncated generation?)")
        h, w = self._span_size(span)
        if span.numel() != self.span_length_of(h, w):
            raise MalformedImageSpanError(
                f"image span has {span.numel()} tokens, expected {self.span_length_of(h, w)} for layout "
                f"{self.layout!r} ({self._shape_text(h, w)})"
            )
        inner = span[1:-1]
        slots = self.span_slots(torch.arange(inner.numel(), device=inner.device), h, w)
        ok = self._slot_ok(inner, slots)
        if not ok.all():
            raise self._slot_error(inner, slots, ok, h)
        return self._image_ids_of(inner[slots >= SLOT_IMAGE], h, w)

    def _span_size(self, span: torch.Tensor) -> tuple[int, int]:
        if self.has_budgets:
            budget = int(self.budget_of_tokens(span[1])) if span.numel() >= 3 else 0
            if not budget:
                got = f"got token {int(span[1])}" if span.numel() >= 3 else "the span is too short"
                raise MalformedImageSpanError(
                    f"image span does not start <boi> <n_b> with a budget token of the budgets {self.budgets} ({got})"
                )
            return 1, budget
        if not self.variable_size:
            return self._default_size()
        if span.numel() < 4:
            raise MalformedImageSpanError("image span is too short to hold its size tokens <h_k> <w_k>")
        h, w = (int(x) for x in self.size_of_tokens(span[1], span[2]))
        if not (1 <= h <= self.grid_size[0] and 1 <= w <= self.grid_size[1]):
            raise MalformedImageSpanError(
                f"image span does not start <boi> <h_k> <w_k> with a size up to {self.grid_size[0]}x"
                f"{self.grid_size[1]} (got tokens {int(span[1])}, {int(span[2])})"
            )
        return h, w

    def _slot_ok(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.BoolTensor:
        image = slots >= SLOT_IMAGE
        ok = image & self._in_class(tokens, (slots - SLOT_IMAGE).clamp(min=0))
        ok |= (slots == SLOT_EOL) & (tokens == (self.eol_token_id if self.eol_token_id is not None else -1))
        return ok | (slots == SLOT_HEIGHT) | (slots == SLOT_WIDTH)  # size tokens were checked by _span_size

    def _slot_error(self, tokens, slots, ok, h: int) -> MalformedImageSpanError:
        i = int((~ok).nonzero()[0])
        token, slot = int(tokens[i]), int(slots[i])
        if slot == SLOT_EOL:
            row = int((slots[:i] == SLOT_EOL).sum())
            where = f"row {row}" if self._passes_and_group[0] == 1 else f"row {row % h} of level {row // h}"
            return MalformedImageSpanError(f"{where} of the image span does not end with <eol>")
        position = int((slots[:i] >= SLOT_IMAGE).sum())
        if not bool(self.is_image_token(torch.tensor(token))):
            return MalformedImageSpanError(
                f"image span holds token id {token} at image position {position}, which is not an image token "
                f"(image tokens are {self._image_ids_text()})"
            )
        slot_class = slot - SLOT_IMAGE
        return MalformedImageSpanError(
            f"image span holds token id {token} at image position {position}, which is not a valid "
            f"{self.class_name(slot_class)} token (expected ids in "
            f"[{int(self._class_low[slot_class])}, {int(self._class_high[slot_class])}))"
        )

    def _image_ids_of(self, tokens: torch.Tensor, h: int, w: int) -> torch.LongTensor:
        """Image-slot tokens in span order (checked) -> image ids of the canonical output shape."""
        levels, parts = self.num_levels, self.tokens_per_id
        if self.level_order == "level":
            grid = tokens.view(levels, h, w, parts).permute(1, 2, 0, 3)  # (h, w, L, F)
        else:
            grid = tokens.view(h, w, levels, parts)
        ids = self._from_tokens(grid)  # (h, w, L)
        if self.num_levels == 1:
            ids = ids[..., 0]
        return ids[0] if self.layout == "sequence" else ids

    def _shape_text(self, h: Optional[int] = None, w: Optional[int] = None) -> str:
        h, w = (h, w) if h is not None else self._default_size()
        per = self.tokens_per_position
        unit = "ids" if per == 1 else f"positions x {per} tokens"
        order = f", {self.num_levels} level passes" if self.level_order == "level" and self.num_levels > 1 else ""
        if self.layout == "grid":
            size = "<h_k> <w_k>, " if self.variable_size else ""
            return f"{size}{h} rows of {w} {unit} + <eol>{order}"
        budget = f"budget token {self.budget_token_format.format(w)}, " if self.has_budgets else ""
        return f"{budget}{w} {unit}{order}"

    # ------------------------------------------------------------------ spans: repair
    def repair_span(self, span: torch.Tensor) -> ParsedSpan:
        """Lenient :meth:`parse_span`: repair a malformed span and say what was done.

        Rows are cut at ``<eol>`` (grid; a sequence is one row) and fitted to the expected ``w`` positions: missing
        tokens and missing rows are filled with the most frequent valid token of the same slot class in this span
        (sub-id 0 when there is none), extra tokens and rows are dropped, tokens that are not valid at their slot are
        replaced the same way, and a missing ``<eoi>`` is added. ``repairs`` lists each kind of repair with counts
        (empty for a well-formed span). A variable-size span without readable size tokens cannot be repaired and
        raises :class:`MalformedImageSpanError`. A budgeted sequence is fitted to the budget its ``<n_b>`` states;
        when that token is missing, the budget is inferred as the smallest allowed one that holds the span's image
        tokens (the largest if none does), and the repair says so.
        """
        span = torch.as_tensor(span).long().reshape(-1).cpu()
        try:
            ids, budget = self.parse_span(span, return_budget=True)
            return ParsedSpan(ids, [], budget)
        except MalformedImageSpanError:
            pass
        if span.numel() == 0 or int(span[0]) != self.boi_token_id:
            raise MalformedImageSpanError("image span does not start with <boi>: nothing to repair")
        repairs, body = [], span[1:]
        if body.numel() and int(body[-1]) == self.eoi_token_id:
            body = body[:-1]
        else:
            repairs.append("added the missing <eoi>")
        h, w = self._default_size()
        if self.variable_size:
            h, w = self._span_size(torch.cat([span[:1], body[:2], torch.tensor([self.eoi_token_id])]))
            body = body[2:]
        elif self.has_budgets:
            w = int(self.budget_of_tokens(body[0])) if body.numel() else 0
            if w:
                body = body[1:]
            else:
                w = self._infer_budget(body)
                repairs.append(f"inferred the missing budget token {self.budget_token_format.format(w)} from "
                               f"{int(self.is_image_token(body).sum())} image tokens")
        tokens, notes = self._fit_rows(self._cut_rows(body), h, w)
        return ParsedSpan(self._image_ids_of(tokens, h, w), repairs + notes, w if self.has_budgets else None)

    def _infer_budget(self, body: torch.Tensor) -> int:
        """The smallest budget whose positions hold the image tokens of ``body`` (the largest when none does)."""
        positions = -(-int(self.is_image_token(body).sum()) // self.tokens_per_position)
        return next((b for b in self.budgets if b >= positions), self.budgets[-1])

    def _cut_rows(self, body: torch.Tensor) -> list[torch.Tensor]:
        if self.layout == "sequence":
            return [body]
        ends = (body == self.eol_token_id).nonzero().flatten().tolist()
        starts = [0] + [e + 1 for e in ends]
        rows = [body[a:b] for a, b in zip(starts, ends + [body.numel()])]
        return rows if rows[-1].numel() else rows[:-1]  # a trailing piece without <eol> is a row cut short

    def _fit_rows(self, rows: list[torch.Tensor], h: int, w: int) -> tuple[torch.Tensor, list[str]]:
        """Fit rows to the expected ``(rows, width)`` grid of image-slot tokens; return them in span order."""
        classes = self._repair_classes(h, w)  # (R, width)
        grid = torch.full(classes.shape, -1, dtype=torch.long)
        extra = sum(max(0, r.numel() - classes.shape[1]) for r in rows[: classes.shape[0]])
        extra += sum(r.numel() for r in rows[classes.shape[0]:])
        for i, row in enumerate(rows[: classes.shape[0]]):
            grid[i, : min(row.numel(), classes.shape[1])] = row[: classes.shape[1]]
        present = grid >= 0
        valid = present & self._in_class(grid.clamp(min=0), classes)
        notes = _counted(int((~present).sum()), "missing image token", "filled", _rows_of(~present))
        notes += _counted(int((present & ~valid).sum()), "invalid image token", "replaced",
                          _rows_of(present & ~valid))
        notes += _counted(extra, "extra token", "dropped", [])
        for c in range(self.num_slot_classes):
            here = classes == c
            grid[here & ~valid] = self._fill_token(grid[here & valid], c)
        return grid.reshape(-1), notes

    def _repair_classes(self, h: int, w: int) -> torch.LongTensor:
        """Slot class of every image-slot token, shaped as the rows a repair fits: grid ``(P*h, w*g)``, sequence
        ``(1, P*N*g)``."""
        passes, group = self._passes_and_group
        column = torch.arange(w * group)
        classes = self._slot_table[:, column % group]  # (P, w*g)
        if self.layout == "grid":
            return classes.repeat_interleave(h, dim=0)
        return classes.reshape(1, -1)

    def _fill_token(self, valid_tokens: torch.Tensor, slot_class: int) -> int:
        if valid_tokens.numel():
            return Counter(valid_tokens.tolist()).most_common(1)[0][0]
        return int(self._table[0]) if self.is_unified else int(self._class_low[slot_class])

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ImageVocab":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"image_vocab.json has unknown fields {sorted(unknown)}")
        return cls(**data)

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> str:
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, IMAGE_VOCAB_NAME)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
        return path

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> "ImageVocab":
        path = os.path.join(directory, IMAGE_VOCAB_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {IMAGE_VOCAB_NAME} in {directory}")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def check_fingerprint(self, fingerprint: Optional[str], what: str = "visual tokenizer") -> None:
        """Raise if ``fingerprint`` is not the one this vocabulary was made for."""
        if self.tokenizer_fingerprint is None or fingerprint is None:
            return
        if fingerprint != self.tokenizer_fingerprint:
            raise ValueError(
                f"image_vocab.json was made for a visual tokenizer with fingerprint {self.tokenizer_fingerprint[:16]}..., "
                f"but the {what} has fingerprint {fingerprint[:16]}...: its image ids would be decoded by the wrong "
                "codebook. Re-bridge the LLM with this tokenizer or load the matching one."
            )

    def check_fits(self, vocab_size: int) -> None:
        """Raise if an LLM with ``vocab_size`` embedding rows cannot hold every id of this vocabulary."""
        top = self.max_token_id
        if top >= vocab_size:
            raise ValueError(
                f"ImageVocab uses token ids up to {top} but the LLM vocabulary has only {vocab_size} rows"
            )


def _contains(sorted_ids: torch.Tensor, value: int) -> bool:
    pos = int(torch.searchsorted(sorted_ids, torch.tensor(value)))
    return pos < sorted_ids.numel() and int(sorted_ids[pos]) == value


def _rows_of(mask: torch.Tensor) -> list[int]:
    return mask.any(dim=1).nonzero().flatten().tolist()


def _counted(count: int, what: str, done: str, rows: list[int]) -> list[str]:
    if not count:
        return []
    where = "" if not rows else f" (row{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows[:6]))}" + (
        ", ...)" if len(rows) > 6 else ")")
    return [f"{count} {what}{'s' if count > 1 else ''} {done}{where}"]
