"""`ImageVocab`: an :class:`~tokenizer_bridge.vocab.layout.ImageLayout` whose tokens got ids in an LLM vocabulary.

A small JSON-serialisable record (``image_vocab.json``) owned by the bridge. It maps image ids to LLM token ids
(``input_ids``) and back with vectorised tensor arithmetic, says which ids each image token class allows, and checks
that a tokenizer, an LLM or a visual tokenizer is the one it was made for. How an image is spelled (the token order of
every layout) is documented in :mod:`tokenizer_bridge.vocab.layout`; behind the methods here, spans are built and
parsed in :mod:`tokenizer_bridge.vocab.spans`, repaired in :mod:`tokenizer_bridge.vocab.repair`, and the checks live
in :mod:`tokenizer_bridge.vocab.checks`.

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
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

import torch

from ..quantizers.fsq import merge_ids, split_ids
from .checks import check_fingerprint as _check_fingerprint, check_fits as _check_fits, check_ids
from .checks import check_record as _check_record
from .checks import check_tokenizer as _check_tokenizer, check_visual_tokenizer as _check_visual_tokenizer
from .layout import ImageLayout, layout_fields
from .repair import ParsedSpan, repair
from .spans import MalformedImageSpanError, build_span_batch, check_size, image_ids_batch, parse_strict
from .spans import span_token_classes as _span_token_classes

IMAGE_VOCAB_NAME = "image_vocab.json"


@dataclass(kw_only=True)
class ImageVocab(ImageLayout):
    """An image layout (every :class:`ImageLayout` field) plus the ids its tokens got.

    Args:
        offset: token id of the first image token (image id ``k`` of a single-level vocabulary is ``offset + k``);
            ``None`` in unified-codebook mode (``token_ids``).
        boi_token_id / eoi_token_id / eol_token_id: special token ids (``eol`` only for the grid layout).
        size_token_offset: id of ``<h_1>``; ``<h_k>`` is ``size_token_offset + k - 1`` and ``<w_k>`` follows the
            H height tokens: ``size_token_offset + H + k - 1``.
        budget_token_offset: id of the budget token of ``budgets[0]``; budget ``budgets[i]`` is
            ``budget_token_offset + i``.
        text_vocab_size: size of the LLM's vocabulary before bridging (ids below it are text).
        tokenizer_fingerprint: fingerprint of the visual tokenizer that produced the ids.
        boi_token ... budget_token_format: the token strings (``special_tokens`` sets the first three).
    """

    offset: Optional[int]
    boi_token_id: int
    eoi_token_id: int
    eol_token_id: Optional[int] = None
    size_token_offset: Optional[int] = None
    budget_token_offset: Optional[int] = None
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
        super().__post_init__()  # the layout's own rules
        for name, value in zip(("boi_token", "eoi_token", "eol_token"), self.special_tokens or ()):
            setattr(self, name, value)  # reused tokens are the markers' names
        check_ids(self)
        self._build_tables()

    @classmethod
    def from_layout(cls, image_layout: ImageLayout, **ids) -> "ImageVocab":
        """The vocabulary of ``image_layout`` with the ids (and token strings) in ``ids``."""
        return cls(**layout_fields(image_layout), **ids)

    @property
    def image_layout(self) -> ImageLayout:
        """The layout alone, without the ids."""
        return ImageLayout(**layout_fields(self))

    # ------------------------------------------------------------------ tables
    def _head_ranges(self) -> dict[str, tuple[int, int]]:
        """Id ranges of the tokens after ``<boi>`` that state a span's size or budget."""
        ranges = {}
        if self.variable_size:
            ranges["size"] = (self.size_token_offset, self.size_token_offset + sum(self.grid_size))
        if self.has_budgets:
            ranges["budget"] = (self.budget_token_offset, self.budget_token_offset + len(self.budgets))
        return ranges

    def _build_tables(self) -> None:
        """Per-(level, sub-token) id offsets and image classes as small tensors, so every mapping is one broadcast."""
        levels, parts = self.num_levels, self.tokens_per_id
        level, part = torch.arange(levels)[:, None], torch.arange(parts)[None, :]
        classes = level * parts + part if self.separate_level_ranges else part.expand(levels, parts)
        self._sub_classes = classes.contiguous()  # (L, F): image class of each (level, sub-token)
        radices = torch.tensor(self._radices)  # (F,)
        starts = torch.cumsum(radices, 0) - radices  # (F,): start of sub-token j inside a block
        block = int(radices.sum()) * level * int(self.separate_level_ranges)  # (L, 1): start of each level's block
        base = 0 if self.offset is None else self.offset
        self._sub_offsets = (base + block + starts[None, :]).contiguous()  # (L, F): token id of sub-id 0
        # classes are numbered l * F + j (separate) or j (shared): the first C offsets in (l, j) order are theirs
        self._class_low = self._sub_offsets.reshape(-1)[: self.num_image_classes]  # (C,)
        self._class_high = self._class_low + radices.repeat(self.num_image_classes // parts)  # (C,)
        passes, group = self._passes_and_group
        self._class_table = classes.reshape(passes, group)  # (P, g): image class of token s of pass p
        if self.is_unified:
            self._table = torch.tensor(self.token_ids, dtype=torch.long)  # (K,)
            # sorted ids and their image ids: a lookup by binary search, whatever the size of the largest token id
            self._sorted_ids, self._sorted_image_ids = self._table.sort()
        self._budget_table = torch.tensor(self.budgets or [], dtype=torch.long)  # (nb,): budget of budget token i
        self._device_tables = {}

    # ------------------------------------------------------------------ ids of the non-image tokens
    @property
    def id_range(self) -> tuple[int, int]:
        """Half-open range ``[start, end)`` of the (new, contiguous) token ids that encode image ids."""
        if self.is_unified:
            raise ValueError("a unified-codebook ImageVocab has no image id range: its image tokens are the text "
                             "tokens listed in token_ids (see image_token_ids())")
        return (self.offset, self.offset + self.num_image_tokens)

    @property
    def special_token_ids(self) -> list[int]:
        ids = [self.boi_token_id, self.eoi_token_id]
        return ids + ([self.eol_token_id] if self.eol_token_id is not None else [])

    @property
    def size_token_ids(self) -> list[int]:
        """Ids of ``<h_1>..<h_H>, <w_1>..<w_W>`` (empty unless ``variable_size``)."""
        return list(range(*self._head_ranges()["size"])) if self.variable_size else []

    @property
    def budget_token_ids(self) -> list[int]:
        """Ids of the budget tokens in ``budgets`` order (empty without budgets)."""
        return list(range(*self._head_ranges()["budget"])) if self.has_budgets else []

    @property
    def max_token_id(self) -> int:
        """Largest token id this vocabulary uses."""
        top_image = max(self.token_ids) if self.is_unified else self.offset + self.num_image_tokens - 1
        return int(max(self.special_token_ids + self.size_token_ids + self.budget_token_ids + [top_image]))

    def budget_token(self, budget: int) -> int:
        """Token id of ``<n_budget>``; raises unless ``budget`` is one of ``budgets``."""
        if not self.has_budgets:
            raise ValueError("this ImageVocab has no token budgets (its sequences always have "
                             f"{self.num_tokens} positions)")
        if int(budget) not in self.budgets:
            raise ValueError(f"budget {budget} is not one of this vocabulary's token budgets {self.budgets}")
        return self.budget_token_offset + self.budgets.index(int(budget))

    def budget_of_tokens(self, input_ids: torch.Tensor) -> torch.LongTensor:
        """Budget stated by each budget token id (any shape); 0 for ids that are not budget tokens."""
        input_ids = torch.as_tensor(input_ids).long()
        if not self.has_budgets:
            return torch.zeros_like(input_ids)
        table = self._on(input_ids.device)["budgets"]
        index = input_ids - self.budget_token_offset
        inside = (index >= 0) & (index < table.numel())
        return torch.where(inside, table[index.clamp(0, table.numel() - 1)], 0)

    def size_tokens(self, h: int, w: int) -> list[int]:
        """``[<h_h>, <w_w>]`` token ids for a variable-size grid."""
        check_size(self, h, w)
        return [self.size_token_offset + h - 1, self.size_token_offset + self.grid_size[0] + w - 1]

    def size_of_tokens(self, height_id: torch.Tensor, width_id: torch.Tensor) -> tuple:
        """``(h, w)`` stated by size token ids (any shape; other ids give values outside ``[1, H]``/``[1, W]``)."""
        low = self.size_token_offset
        return height_id - low + 1, width_id - low - self.grid_size[0] + 1

    # ------------------------------------------------------------------ token strings
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

    def budget_token_strings(self) -> list[str]:
        """Names of the budget tokens in id order (empty without budgets)."""
        return [self.budget_token_format.format(b) for b in self.budgets] if self.has_budgets else []

    # ------------------------------------------------------------------ token classes
    def image_token_ids(self) -> torch.LongTensor:
        """``(T,)`` sorted token ids that spell image ids."""
        if self.is_unified:
            return torch.tensor(sorted(self.token_ids), dtype=torch.long)
        return torch.arange(self.offset, self.offset + self.num_image_tokens)

    def is_image_token(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Whether each token id spells an image id in some image class (any shape)."""
        input_ids = torch.as_tensor(input_ids)
        if self.is_unified:
            return self._unified_index(input_ids) >= 0
        return (input_ids >= self.offset) & (input_ids < self.offset + self.num_image_tokens)

    def is_span_only_token(self, input_ids: torch.Tensor) -> torch.BoolTensor:
        """Whether each id only occurs inside image spans: ``<eoi>``, ``<eol>``, size and budget tokens and (unless
        the codebook is unified with text) image tokens."""
        input_ids = torch.as_tensor(input_ids)
        reserved = torch.tensor(self.special_token_ids[1:] + self.size_token_ids + self.budget_token_ids)
        inside = torch.isin(input_ids, reserved.to(input_ids.device))
        return inside if self.is_unified else inside | self.is_image_token(input_ids)

    def class_token_mask(self, vocab_size: int) -> torch.BoolTensor:
        """``(C, vocab_size)``: which token ids image class ``c`` allows."""
        ids = torch.arange(vocab_size)
        if self.is_unified:
            return (self._unified_index(ids) >= 0)[None]
        return (ids >= self._class_low[:, None]) & (ids < self._class_high[:, None])

    def class_name(self, image_class: int) -> str:
        """Image class ``c`` in words, e.g. ``"level 1 sub-token 0"`` (``"image id"`` when there is one class)."""
        level, part = divmod(image_class, self.tokens_per_id)
        what = [f"level {level}"] if self.separate_level_ranges else []
        what += [f"sub-token {part}"] if self.factors is not None else []
        return " ".join(what) or "image id"

    def _in_class(self, input_ids: torch.Tensor, classes: torch.Tensor) -> torch.BoolTensor:
        if self.is_unified:
            return self._unified_index(input_ids) >= 0
        tables = self._on(input_ids.device)
        return (input_ids >= tables["low"][classes]) & (input_ids < tables["high"][classes])

    def _unified_index(self, input_ids: torch.Tensor) -> torch.LongTensor:
        """Image id of each token in unified-codebook mode, -1 for tokens outside the table."""
        tables = self._on(input_ids.device)
        ids, image_ids = tables["sorted_ids"], tables["sorted_image_ids"]
        position = torch.searchsorted(ids, input_ids.long().contiguous()).clamp(max=ids.numel() - 1)
        return torch.where(ids[position] == input_ids, image_ids[position], -1)

    def _on(self, device: torch.device) -> dict:
        """The lookup tables on ``device`` (copied once per device, never per call)."""
        key = str(device)
        if key not in self._device_tables:
            tables = {"classes": self._class_table, "offsets": self._sub_offsets, "low": self._class_low,
                      "high": self._class_high, "budgets": self._budget_table}
            if self.is_unified:
                tables.update(table=self._table, sorted_ids=self._sorted_ids, sorted_image_ids=self._sorted_image_ids)
            self._device_tables[key] = {k: v.to(device) for k, v in tables.items()}
        return self._device_tables[key]

    # ------------------------------------------------------------------ id mapping
    def image_ids_to_input_ids(self, image_ids: torch.Tensor) -> torch.Tensor:
        """Image ids -> LLM token ids. Single-level, unfactorized: elementwise (any shape). Otherwise ``(..., L)``
        (``(...)`` when ``L == 1``) -> ``(..., L * F)``: the ids of each position in position-major order."""
        ids = torch.as_tensor(image_ids).long()
        if self.num_levels > 1 and (ids.dim() == 0 or ids.shape[-1] != self.num_levels):
            raise ValueError(f"image ids need a trailing level axis of {self.num_levels}, got {tuple(ids.shape)}")
        leveled = ids if self.num_levels > 1 else ids[..., None]
        input_ids = self._to_input_ids(leveled)  # (..., L, F)
        if self.tokens_per_position == 1:
            return input_ids.reshape(ids.shape)
        return input_ids.reshape(*leveled.shape[:-1], self.tokens_per_position)

    def input_ids_to_image_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`image_ids_to_input_ids`; raises if an id is not of the image class of its place."""
        input_ids = torch.as_tensor(input_ids).long()
        per = self.tokens_per_position
        if per > 1 and (input_ids.dim() == 0 or input_ids.shape[-1] != per):
            raise ValueError(f"expected a trailing axis of {per} tokens per position, got {tuple(input_ids.shape)}")
        shaped = input_ids.reshape(*(input_ids.shape[:-1] if per > 1 else input_ids.shape), self.num_levels,
                                   self.tokens_per_id)
        classes = self._sub_classes.to(input_ids.device).expand_as(shaped)
        bad = ~self._in_class(shaped, classes)
        if bad.any():
            raise MalformedImageSpanError(
                f"token id {int(shaped[bad][0])} is not an image token of its image class "
                f"({self.class_name(int(classes[bad][0]))}; image tokens are {self._image_ids_text()})"
            )
        ids = self._from_input_ids(shaped)  # (..., L)
        return ids if self.num_levels > 1 else ids[..., 0]

    def _to_input_ids(self, ids: torch.Tensor) -> torch.LongTensor:
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

    def _from_input_ids(self, input_ids: torch.Tensor) -> torch.LongTensor:
        """``(..., L, F)`` token ids (already checked) -> ``(..., L)`` image ids."""
        if self.is_unified:
            return self._unified_index(input_ids[..., 0])
        sub = input_ids - self._on(input_ids.device)["offsets"]
        return merge_ids(sub, self.factors) if self.factors is not None else sub[..., 0]

    def _image_ids_text(self) -> str:
        if self.is_unified:
            return f"the {self.codebook_size} text tokens of the unified codebook"
        return str(self.id_range)

    # ------------------------------------------------------------------ spans (vocab.spans, vocab.repair)
    def span_token_classes(self, t: torch.Tensor, h=None, w=None) -> torch.LongTensor:
        """Token class of the token ``t`` positions after ``<boi>`` (see :mod:`tokenizer_bridge.vocab.spans`)."""
        return _span_token_classes(self, t, h, w)

    def build_span(self, image_ids: torch.Tensor) -> torch.Tensor:
        """Wrap one image's ids as a token span.

        Grid: ``(h, w)`` (``(h, w, L)`` with levels; ``(h*w[, L])`` for fixed grids); sequence: ``(N,)``/``(N, L)``.
        Returns ``(span_length_of(h, w),)``.
        """
        return build_span_batch(self, image_ids_batch(self, image_ids, batched=False))[0]

    def build_spans(self, image_ids: torch.Tensor) -> torch.Tensor:
        """Batched :meth:`build_span` for images of one size: ``(B, ...)`` -> ``(B, span_length_of(h, w))``."""
        return build_span_batch(self, image_ids_batch(self, image_ids, batched=True))

    def parse_span(self, span: torch.Tensor, lenient: bool = False, return_budget: bool = False):
        """Inverse of :meth:`build_span`: image ids ``(h, w)``/``(h, w, L)`` (grid) or ``(N,)``/``(N, L)``.

        Raises :class:`MalformedImageSpanError` naming what is wrong (for a budgeted sequence, also a span whose
        length is not the one its budget token states). With ``lenient=True`` a malformed span is repaired instead
        (see :meth:`repair_span`, which also says what it did). With ``return_budget=True`` returns
        ``(image_ids, budget)``: the span's token budget (``None`` for a vocabulary without budgets).
        """
        if lenient:
            parsed = repair(self, span)
            return (parsed.image_ids, parsed.budget) if return_budget else parsed.image_ids
        ids = parse_strict(self, span)
        if return_budget:
            return ids, (int(ids.shape[0]) if self.has_budgets else None)
        return ids

    def repair_span(self, span: torch.Tensor) -> ParsedSpan:
        """Lenient :meth:`parse_span`: repair a malformed span and say what was done (see
        :func:`tokenizer_bridge.vocab.repair.repair`)."""
        return repair(self, span)

    # ------------------------------------------------------------------ persistence and checks
    def to_dict(self) -> dict:
        """The ``image_vocab.json`` record (``special_tokens`` only when set, so that files stay in the format
        earlier versions read)."""
        data = asdict(self)
        if data["special_tokens"] is None:
            del data["special_tokens"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ImageVocab":
        """The vocabulary of an ``image_vocab.json`` record; ``ValueError`` names what is wrong with it (a field
        unknown, missing or of the wrong type, or values the layout and id checks refuse)."""
        _check_record(data, set(cls.__dataclass_fields__))
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
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON ({error}): the file is truncated or corrupt") from None
        try:
            return cls.from_dict(data)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def check_fingerprint(self, fingerprint: Optional[str], what: str = "visual tokenizer") -> None:
        """Raise if ``fingerprint`` is not the one this vocabulary was made for."""
        _check_fingerprint(self, fingerprint, what)

    def check_fits(self, vocab_size: int) -> None:
        """Raise if an LLM with ``vocab_size`` embedding rows cannot hold every id of this vocabulary."""
        _check_fits(self, vocab_size)

    def check_tokenizer(self, tokenizer) -> None:
        """Raise unless ``tokenizer`` holds every token of this vocabulary at the id recorded for it."""
        _check_tokenizer(self, tokenizer)

    def check_visual_tokenizer(self, visual_tokenizer, image_size: Optional[tuple[int, int]] = None,
                               allow_missing_fingerprint: bool = False) -> None:
        """Raise unless ``visual_tokenizer`` gives the ids this vocabulary spells (codebook, levels, slots, the grid
        of ``image_size`` images, fingerprint; see :func:`tokenizer_bridge.vocab.checks.check_visual_tokenizer`)."""
        _check_visual_tokenizer(self, visual_tokenizer, image_size, allow_missing_fingerprint)
