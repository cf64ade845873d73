"""What an ``ImageVocab`` refuses: ids that collide, and a tokenizer, an LLM or a visual tokenizer it was not made for.

:func:`check_ids` runs whenever a vocabulary is made or loaded (after the layout's own rules in
:mod:`tokenizer_bridge.vocab.layout`): the ids it records must not overlap each other or the text vocabulary.
The other checks compare it with what it is used with; the ``ImageVocab.check_*`` methods call them, and
``UnifiedProcessor`` runs the tokenizer and visual-tokenizer checks when it is built or loaded, so that a bundle whose
ids were produced by a different visual tokenizer is refused instead of silently decoding garbage.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import torch

from ..interface import is_slot_tokenizer

# `ImageVocab` in annotations: tokenizer_bridge.vocab.image_vocab.ImageVocab (not imported: it imports this module)

# The JSON type of every field of image_vocab.json; ids and counts are int32, as token ids are in every tokenizer,
# except codebook_size, the number of image ids (not token ids): a factorized vocabulary spells ids of up to 2**63 - 1
# with sub-tokens whose token ids are int32 (check_ids checks that the image token range stays below 2**31).
_INTS = ("num_tokens", "num_levels", "offset", "boi_token_id", "eoi_token_id", "eol_token_id",
         "size_token_offset", "budget_token_offset", "text_vocab_size")
_BOOLS = ("separate_level_ranges", "variable_size")
_STRINGS = ("layout", "level_order", "tokenizer_fingerprint", "boi_token", "eoi_token", "eol_token",
            "image_token_format", "height_token_format", "width_token_format", "budget_token_format",
            "image_placeholder")
_INT_LISTS = ("grid_size", "factors", "budgets", "token_ids")
_FORMATS = ("image_token_format", "height_token_format", "width_token_format", "budget_token_format")
_REQUIRED = ("codebook_size", "offset", "boi_token_id", "eoi_token_id")
MAX_ID = 2**31 - 1
MAX_IMAGE_ID = 2**63 - 1  # image ids are int64 tensors


def check_record(data: Any, names: set) -> None:
    """Raise ``ValueError`` unless ``data`` (a parsed ``image_vocab.json``) has only the fields in ``names``, the
    required ones among them, each of its JSON type (``null`` where the field may be unset), ints in
    ``[-2**31, 2**31)`` and format strings that take one ``{}``."""
    if not isinstance(data, dict):
        raise ValueError(f"image_vocab.json must hold a JSON object, got {type(data).__name__}")
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"image_vocab.json has unknown fields {sorted(unknown)}")
    missing = [name for name in _REQUIRED if name not in data]
    if missing:
        raise ValueError(f"image_vocab.json lacks the required fields {missing}")
    for name, value in data.items():
        if value is None and name not in ("codebook_size", "boi_token_id", "eoi_token_id", "num_levels", "layout",
                                          "level_order") + _BOOLS + _FORMATS:
            continue
        _check_type(name, value)


def _check_type(name: str, value: Any) -> None:
    def wrong(what: str) -> ValueError:
        return ValueError(f"image_vocab.json field {name!r} must be {what}, got {value!r}"[:300])

    if name in _INTS and not _is_id(value):
        raise wrong("an integer below 2**31")
    if name == "codebook_size" and not (_is_integer(value) and 1 <= value <= MAX_IMAGE_ID):
        raise wrong("an integer in [1, 2**63)")
    if name in _BOOLS and not isinstance(value, bool):
        raise wrong("true or false")
    if name in _STRINGS and not isinstance(value, str):
        raise wrong("a string")
    if name in _INT_LISTS and not (isinstance(value, list) and all(_is_id(v) for v in value)):
        raise wrong("a list of integers below 2**31")
    if name == "special_tokens" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise wrong("a list of token strings")
    if name == "extra" and not isinstance(value, dict):
        raise wrong("an object")
    if name in _FORMATS:
        try:
            value.format("0")
        except (IndexError, KeyError, ValueError, AttributeError):
            raise wrong("a format string with one {} field") from None


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_id(value: Any) -> bool:
    return _is_integer(value) and -MAX_ID - 1 <= value <= MAX_ID


def check_ids(vocab: ImageVocab) -> None:
    """Raise unless the recorded ids are complete for the layout, distinct, and outside the text vocabulary."""
    _check_assigned(vocab)
    specials = vocab.special_token_ids
    if len(set(specials)) != len(specials):
        raise ValueError(f"special token ids must be distinct, got {specials}")
    for sid in specials:
        if _image_ids_meet(vocab, sid, sid + 1):
            raise ValueError(f"special token id {sid} overlaps the image ids ({vocab._image_ids_text()})")
    for what, (low, high) in vocab._head_ranges().items():
        if any(low <= sid < high for sid in specials) or _image_ids_meet(vocab, low, high):
            raise ValueError(f"{what} tokens [{low}, {high}) overlap the special or image token ids")
    if vocab.text_vocab_size is None:
        return
    if not vocab.is_unified and vocab.offset < vocab.text_vocab_size:
        raise ValueError(
            f"image ids start at {vocab.offset} but the text vocabulary has {vocab.text_vocab_size} tokens: "
            "the image range would overlap existing text tokens"
        )
    for what, (low, _) in vocab._head_ranges().items():
        if low < vocab.text_vocab_size:
            raise ValueError(f"{what} tokens start at {low} but the text vocabulary has {vocab.text_vocab_size} "
                             "tokens: they would overlap existing text tokens")


def _image_ids_meet(vocab: ImageVocab, low: int, high: int) -> bool:
    """Whether an image token id lies in ``[low, high)`` (without listing a range of new ids, which may be long)."""
    if vocab.is_unified:
        return any(low <= t < high for t in vocab.token_ids)
    return vocab.offset < high and low < vocab.offset + vocab.num_image_tokens


def _check_assigned(vocab: ImageVocab) -> None:
    """Every id the layout needs is recorded, and no id it does not need."""
    if vocab.layout == "grid" and vocab.eol_token_id is None:
        raise ValueError("grid layout needs an eol_token_id (one <eol> closes each row)")
    if vocab.variable_size and vocab.size_token_offset is None:
        raise ValueError("variable_size needs size_token_offset (the id of <h_1>; add_image_tokens sets it)")
    if vocab.has_budgets and vocab.budget_token_offset is None:
        raise ValueError("budgets need budget_token_offset (the id of the first budget token; add_image_tokens "
                         "sets it)")
    if not vocab.has_budgets and vocab.budget_token_offset is not None:
        raise ValueError("budget_token_offset is set but budgets is not: pass the allowed token budgets")
    if not vocab.is_unified:
        if vocab.offset is None or vocab.offset < 0:
            raise ValueError(f"offset must be a non-negative token id (or pass token_ids), got {vocab.offset}")
        if vocab.offset + vocab.num_image_tokens - 1 > MAX_ID:
            hint = "" if vocab.factors is not None else ": split each id into sub-tokens with factors"
            raise ValueError(f"{vocab.num_image_tokens} image tokens from offset {vocab.offset} reach past token id "
                             f"2**31 - 1{hint} (codebook_size={vocab.codebook_size})")
        return
    if vocab.offset is not None:
        raise ValueError("unified-codebook mode (token_ids) has no offset: pass offset=None")
    if vocab.text_vocab_size is not None and max(vocab.token_ids) >= vocab.text_vocab_size:
        raise ValueError(
            f"token_ids reaches {max(vocab.token_ids)} but the text vocabulary has {vocab.text_vocab_size} "
            "tokens: unified-codebook image ids must be existing text tokens"
        )


def check_fits(vocab: ImageVocab, vocab_size: int) -> None:
    """Raise if an LLM with ``vocab_size`` embedding rows cannot hold every id of ``vocab``."""
    top = vocab.max_token_id
    if top >= vocab_size:
        raise ValueError(f"ImageVocab uses token ids up to {top} but the LLM vocabulary has only {vocab_size} rows")


def check_fingerprint(vocab: ImageVocab, fingerprint: Optional[str], what: str = "visual tokenizer") -> None:
    """Raise if ``fingerprint`` is not the one ``vocab`` was made for (no check when either is unknown)."""
    if vocab.tokenizer_fingerprint is None or fingerprint is None:
        return
    if fingerprint != vocab.tokenizer_fingerprint:
        raise ValueError(
            f"image_vocab.json was made for a visual tokenizer with fingerprint {vocab.tokenizer_fingerprint[:16]}..., "
            f"but the {what} has fingerprint {fingerprint[:16]}...: its image ids would be decoded by the wrong "
            "codebook. Re-bridge the LLM with this tokenizer or load the matching one."
        )


def check_tokenizer(vocab: ImageVocab, tokenizer) -> None:
    """Raise unless ``tokenizer`` holds every token of ``vocab`` at the id ``vocab`` records for it."""
    expected = dict(zip([vocab.boi_token, vocab.eoi_token, vocab.eol_token], vocab.special_token_ids))
    expected.update(zip(vocab.size_token_strings(), vocab.size_token_ids))
    expected.update(zip(vocab.budget_token_strings(), vocab.budget_token_ids))
    names = vocab.image_token_strings()  # empty in unified-codebook mode: image ids are text tokens
    if names:
        expected.update(zip(names, range(*vocab.id_range)))
    elif vocab.is_unified and max(vocab.token_ids) >= len(tokenizer):
        raise ValueError(
            f"mismatched vocabulary: image_vocab.json's unified codebook uses token id {max(vocab.token_ids)} but the "
            f"text tokenizer has only {len(tokenizer)} tokens"
        )
    found = tokenizer.convert_tokens_to_ids(list(expected))
    wrong = [(tok, want, got) for (tok, want), got in zip(expected.items(), found) if got != want]
    if wrong:
        shown = ", ".join(f"{tok!r} is {got} (expected {want})" for tok, want, got in wrong[:3])
        raise ValueError(
            f"mismatched vocabulary: the text tokenizer does not hold the image tokens where image_vocab.json "
            f"records them ({len(wrong)} of {len(expected)} differ: {shown}). The tokenizer and image_vocab.json "
            "must come from the same bridge_llm call."
        )


def check_visual_tokenizer(vocab: ImageVocab, visual_tokenizer, image_size: Optional[tuple[int, int]] = None,
                           allow_missing_fingerprint: bool = False) -> None:
    """Raise unless ``visual_tokenizer`` gives the ids ``vocab`` spells: its codebook size, its residual levels, a
    sequence of at most its slots for a slot tokenizer, for a fixed grid the ``grid_size`` it gives images of
    ``image_size = (height, width)`` pixels (when given), and the recorded fingerprint.

    A vocabulary that records no fingerprint is refused unless ``allow_missing_fingerprint``: without one nothing
    shows that its ids come from this tokenizer's codebook, and a swapped tokenizer would decode them to garbage.
    """
    if visual_tokenizer.codebook_size != vocab.codebook_size:
        raise ValueError(f"the visual tokenizer has {visual_tokenizer.codebook_size} codes but image_vocab.json "
                         f"expects {vocab.codebook_size}")
    if visual_tokenizer.num_levels != vocab.num_levels:
        raise ValueError(f"the visual tokenizer has {visual_tokenizer.num_levels} residual levels but "
                         f"image_vocab.json expects {vocab.num_levels}")
    if is_slot_tokenizer(visual_tokenizer):
        slots = visual_tokenizer.config.num_slots
        if vocab.layout != "sequence":
            raise ValueError(f"a slot tokenizer emits a sequence of slots, but image_vocab.json has the "
                             f"{vocab.layout!r} layout (bridge it with layout='sequence')")
        if vocab.num_tokens > slots:
            raise ValueError(f"image_vocab.json expects up to {vocab.num_tokens} slots per image but the slot "
                             f"tokenizer has only num_slots={slots}")
    elif image_size is not None and vocab.layout == "grid" and not vocab.variable_size:
        _check_grid(vocab, visual_tokenizer, image_size)
    if vocab.tokenizer_fingerprint is None and not allow_missing_fingerprint:
        raise ValueError(
            "image_vocab.json records no visual-tokenizer fingerprint, so nothing shows that its ids come from this "
            "visual tokenizer's codebook: bridge with tokenizer_fingerprint=visual_tokenizer.fingerprint() (or "
            "visual_tokenizer=), or pass allow_missing_fingerprint=True to use it anyway"
        )
    check_fingerprint(vocab, visual_tokenizer.fingerprint())


def _check_grid(vocab: ImageVocab, visual_tokenizer, image_size: tuple[int, int]) -> None:
    """A fixed grid's ``grid_size`` is the id map the tokenizer gives the image processor's images."""
    grid_size = getattr(getattr(visual_tokenizer, "config", None), "grid_size", None)
    if not callable(grid_size):
        return
    try:
        expected = list(grid_size(*image_size))
    except ValueError:
        return  # a size the tokenizer cannot encode: encoding says so, with the sizes it takes
    if expected != list(vocab.grid_size):
        raise ValueError(
            f"image_vocab.json has grid_size {list(vocab.grid_size)} but the visual tokenizer turns the image "
            f"processor's {image_size[0]}x{image_size[1]} images into {expected[0]}x{expected[1]} ids: its spans "
            "would decode to images of the wrong shape"
        )
