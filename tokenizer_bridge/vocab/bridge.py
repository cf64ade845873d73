"""The bridge: register a visual tokenizer's image ids as tokens of any Hugging Face causal LM.

Image ids become ordinary vocabulary entries of one shared token space, as in Chameleon (Chameleon Team, 2024,
arXiv:2405.09818) and Emu3 (Wang et al., 2024, arXiv:2409.18869): the tokenizer gains ``<boi>``, ``<eoi>``
(``<eol>`` for grids) and one token per code ``<img_0> .. <img_{K-1}>`` with contiguous ids, the LLM's input
embedding and output head grow to match, and the result is still a vanilla causal LM.

New rows default to the mean of the text rows (Hewitt, 2021, "Initializing new word embeddings for pretrained
language models"). Text behaviour is preserved exactly: text ids keep their rows, so every logit over the original
vocabulary is unchanged, and a new token's logit is the mean of the text logits, so it never wins a greedy step.

Token policy (same for fast ``tokenizers`` and slow/SentencePiece tokenizers):

- ``<boi>``, ``<eoi>``, ``<eol>`` are special tokens (``extra_special_tokens``): ``decode(skip_special_tokens=True)``
  drops them.
- ``<img_k>`` are added tokens that are *not* special (``normalized=False``): ``skip_special_tokens=True`` keeps them
  as ``<img_k>`` strings (use ``ImageVocab``/the processor to turn spans back into images). Keeping them out of the
  special-token list keeps ``tokenizer_config.json`` small and ``all_special_ids`` cheap for large K.
- Like every added token, the literal text ``"<img_5>"`` (or ``"<boi>"``) in a prompt is parsed into that token;
  ordinary text without these strings never produces image tokens.
- Other layouts (see :mod:`tokenizer_bridge.vocab.image_vocab`) name their plain image tokens ``<img_L{l}_{k}>`` (one
  range per residual level), ``<img_F{j}_{d}>`` (factorized sub-tokens, Open-MAGVIT2 style) or ``<img_L{l}_F{j}_{d}>``;
  variable-size grids add plain size tokens ``<h_1>..<h_H>``, ``<w_1>..<w_W>``, budgeted sequences one plain
  ``<n_b>`` per token budget; the unified-codebook (UniCode) mode adds no image token at all (image id ``k`` is the
  text token ``token_ids[k]``), and ``special_tokens=`` may reuse existing tokens as ``<boi>``/``<eoi>``/``<eol>``
  so that nothing is added.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Optional, Sequence, Union

import torch
from tokenizers import AddedToken
from transformers import PreTrainedTokenizer

from .image_vocab import LAYOUTS, ImageVocab

Init = Union[str, torch.Tensor]
INITS = ("mean", "normal")
_DEFAULTS = {f.name: f.default for f in fields(ImageVocab)}


# ---------------------------------------------------------------------------------------------------- tokenizer
def add_image_tokens(
    tokenizer,
    codebook_size: int,
    layout: str = "grid",
    grid_size: Optional[Sequence[int]] = None,
    num_tokens: Optional[int] = None,
    tokenizer_fingerprint: Optional[str] = None,
    *,
    num_levels: int = 1,
    level_order: str = "position",
    separate_level_ranges: bool = False,
    factors: Optional[Sequence[int]] = None,
    variable_size: bool = False,
    budgets: Optional[Sequence[int]] = None,
    token_ids: Optional[Sequence[int]] = None,
    special_tokens: Optional[Sequence[str]] = None,
) -> ImageVocab:
    """Add the image vocabulary to ``tokenizer`` in place and return its :class:`ImageVocab`.

    New ids, in order: ``<boi>``, ``<eoi>`` (``<eol>`` for grids) unless ``special_tokens`` names existing tokens to
    reuse; ``<h_1>..<h_H>``, ``<w_1>..<w_W>`` for variable-size grids (``<n_b>`` per token budget for budgeted
    sequences); then the image tokens, one contiguous range
    ``[offset, offset + vocab.num_image_tokens)``. See :mod:`tokenizer_bridge.vocab.image_vocab` for each layout's span.

    Args:
        codebook_size: image ids per level K (``prod(factors)`` when factorized).
        layout / grid_size / num_tokens: ``"grid"`` with ``grid_size=(h, w)`` (the largest size when
            ``variable_size``) or ``"sequence"`` with ``num_tokens=N``.
        num_levels / level_order / separate_level_ranges: residual levels, ``"position"``- or ``"level"``-major
            order, and one id block per level (else one shared block).
        factors: split each id into sub-tokens with these radices (e.g. ``[2**9, 2**9]`` for a 2**18 codebook).
        variable_size: grid spans state their size with ``<h_k> <w_k>`` after ``<boi>``.
        budgets: sequence spans state their token budget with ``<n_b>`` after ``<boi>`` (e.g. ``[16, 32, 64]`` for a
            slot tokenizer encoding 16, 32 or 64 slots); ``num_tokens`` defaults to the largest.
        token_ids: unified-codebook (UniCode) mode: image id ``k`` is the existing text token ``token_ids[k]``;
            no image token is added.
        special_tokens: existing token strings to use as ``<boi>``, ``<eoi>`` (and ``<eol>``) instead of adding
            new ones (e.g. reserved tokens of the text tokenizer).

    Raises:
        ValueError: the layout arguments are invalid or would overlap existing tokens (checked before the tokenizer
            is touched), the tokenizer already holds one of the new tokens (already bridged), or the ids it
            assigned are not contiguous.
    """
    options = dict(codebook_size=codebook_size, layout=layout, grid_size=grid_size, num_tokens=num_tokens,
                   num_levels=num_levels, level_order=level_order, separate_level_ranges=separate_level_ranges,
                   factors=factors, variable_size=variable_size, budgets=budgets, token_ids=token_ids,
                   tokenizer_fingerprint=tokenizer_fingerprint)
    plan = _plan_vocab(tokenizer, options, special_tokens)  # validates everything before any mutation
    new_specials = [] if special_tokens is not None else _special_strings(layout)
    plain = plan.size_token_strings() + plan.budget_token_strings() + plan.image_token_strings()
    _check_not_bridged(tokenizer, new_specials, plain)

    if new_specials:
        tokenizer.add_special_tokens({"extra_special_tokens": new_specials}, replace_extra_special_tokens=False)
    if plain:
        _add_plain_tokens(tokenizer, plain)
    return _vocab_from_tokenizer(tokenizer, plan, options, special_tokens)


def _text_vocab_size(tokenizer) -> int:
    # len(tokenizer) normally; a tokenizer whose ids have holes above len() must not see them called image ids.
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def _special_strings(layout: str) -> list[str]:
    specials = [_DEFAULTS["boi_token"], _DEFAULTS["eoi_token"]]
    return specials + ([_DEFAULTS["eol_token"]] if layout == "grid" else [])


def _plan_vocab(tokenizer, options: dict, special_tokens: Optional[Sequence[str]]) -> ImageVocab:
    """The vocabulary the tokenizer will have once the new tokens got the next free ids (validates the options)."""
    layout = options["layout"]
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    text_vocab_size = _text_vocab_size(tokenizer)
    if special_tokens is not None:
        special_ids = _existing_ids(tokenizer, special_tokens, layout)
        next_id = text_vocab_size
    else:
        special_ids = list(range(text_vocab_size, text_vocab_size + len(_special_strings(layout))))
        next_id = special_ids[-1] + 1
    variable, budgeted = options.get("variable_size", False), options.get("budgets") is not None
    size_tokens = sum(options.get("grid_size") or (0,)) if variable else 0
    size_tokens += len(set(options["budgets"])) if budgeted else 0
    return _make_vocab(options, text_vocab_size, special_ids, special_tokens,
                       size_token_offset=next_id if variable else None, offset=next_id + size_tokens,
                       budget_token_offset=next_id if budgeted else None)


def _existing_ids(tokenizer, special_tokens: Sequence[str], layout: str) -> list[int]:
    want = len(_special_strings(layout))
    if len(special_tokens) != want:
        names = "<boi>, <eoi>" + (", <eol>" if want == 3 else "")
        raise ValueError(f"special_tokens must name {want} existing tokens ({names}), got {list(special_tokens)}")
    vocab = tokenizer.get_vocab()
    missing = [t for t in special_tokens if t not in vocab]
    if missing:
        raise ValueError(f"special_tokens {missing} are not tokens of the tokenizer (reuse existing tokens only)")
    return [vocab[t] for t in special_tokens]


def _make_vocab(options: dict, text_vocab_size: int, special_ids: list[int], special_tokens, size_token_offset,
                offset, budget_token_offset=None) -> ImageVocab:
    options = dict(options)
    layout = options["layout"]
    options.pop("num_tokens" if layout == "grid" else "grid_size", None)
    names = dict(zip(("boi_token", "eoi_token", "eol_token"), special_tokens or ()))
    return ImageVocab(
        offset=None if options.get("token_ids") is not None else offset,
        boi_token_id=special_ids[0],
        eoi_token_id=special_ids[1],
        eol_token_id=special_ids[2] if layout == "grid" else None,
        size_token_offset=size_token_offset,
        budget_token_offset=budget_token_offset,
        text_vocab_size=text_vocab_size,
        **names,
        **options,
    )


def _vocab_from_tokenizer(tokenizer, plan: ImageVocab, options: dict, special_tokens) -> ImageVocab:
    """The vocabulary with the ids the tokenizer really assigned; raise unless they are new and contiguous."""
    if special_tokens is not None:
        special_ids = plan.special_token_ids
    else:
        special_ids = tokenizer.convert_tokens_to_ids(_special_strings(plan.layout))
        if min(special_ids) < plan.text_vocab_size:
            raise ValueError(f"special tokens got ids {special_ids} inside the text vocabulary")
    plain = plan.size_token_strings() + plan.budget_token_strings() + plan.image_token_strings()
    first = _check_contiguous(tokenizer, plain) if plain else plan.text_vocab_size
    size_tokens = len(plan.size_token_strings()) + len(plan.budget_token_strings())
    return _make_vocab(options, plan.text_vocab_size, special_ids, special_tokens,
                       size_token_offset=first if plan.variable_size else None, offset=first + size_tokens,
                       budget_token_offset=first if plan.has_budgets else None)


def _check_contiguous(tokenizer, names: list[str]) -> int:
    """First id of ``names``; raise unless they got the contiguous ids ``[first, first + len(names))``."""
    ids = torch.tensor(tokenizer.convert_tokens_to_ids(names))  # (n,)
    first = int(ids[0])
    expected = torch.arange(first, first + len(names))
    if not torch.equal(ids, expected):
        bad = int((ids != expected).nonzero()[0])
        raise ValueError(
            f"image tokens did not get contiguous ids: {names[bad]!r} has id {int(ids[bad])}, expected "
            f"{int(expected[bad])} (the tokenizer assigned ids around existing added tokens). ImageVocab needs the "
            "range [offset, offset + K) to be image tokens only."
        )
    return first


def _check_not_bridged(tokenizer, specials: list[str], images: list[str]) -> None:
    vocab = tokenizer.get_vocab()
    found = [t for t in specials + images if t in vocab]
    if found:
        raise ValueError(
            f"tokenizer already has {len(found)} of the tokens to add ({', '.join(found[:4])}"
            f"{', ...' if len(found) > 4 else ''}): it looks already bridged. Bridge the original text tokenizer, or "
            "load the bridged one together with its image_vocab.json."
        )


def _add_plain_tokens(tokenizer, contents: list[str]) -> None:
    """Append non-special, non-normalized added tokens in one step (ids follow ``len(tokenizer)``)."""
    tokens = [AddedToken(c, special=False, normalized=False, lstrip=False, rstrip=False) for c in contents]
    if isinstance(tokenizer, PreTrainedTokenizer):
        # Slow (Python/SentencePiece) backends: `add_tokens` is quadratic in transformers 5.23 (each token is checked
        # against every added token: ~12 s for K=16384). The public `added_tokens_decoder` setter is linear; the
        # split trie must then be refreshed so the new tokens are matched in text.
        start = _text_vocab_size(tokenizer)
        tokenizer.added_tokens_decoder = {start + i: token for i, token in enumerate(tokens)}
        tokenizer._update_trie()
    else:
        tokenizer.add_tokens(tokens)


# ---------------------------------------------------------------------------------------------------- model
def resize_llm(model, vocab: ImageVocab, init: Init = "mean", pad_to_multiple_of: Optional[int] = None) -> int:
    """Grow ``model``'s input embedding and output head to hold every id of ``vocab`` and initialise the new rows.

    Rows ``[vocab.text_vocab_size, new_rows)`` are (re)initialised, including rows the model already had beyond the
    text vocabulary (padding rows, e.g. Qwen2's) that the new ids now use; text rows are never touched (in
    unified-codebook mode the image ids are text rows, so only new special tokens get rows).

    Args:
        model: a ``PreTrainedModel`` causal LM; tied or untied head, with or without a head bias.
        vocab: from :func:`add_image_tokens` (needs ``text_vocab_size``).
        init: ``"mean"`` (mean of the text rows), ``"normal"`` (zero-mean normal with the text rows' std), or a
            ``(vocab.num_image_tokens, hidden)`` tensor for the image rows in id order (``(K, hidden)`` for a
            single-level vocabulary, e.g. projected codebook vectors; used for the input embedding and, if untied,
            the output head too; the special/padding rows then get the mean). A head bias always gets the mean
            text bias on new rows.
        pad_to_multiple_of: round the number of rows up (tensor-core friendly sizes).

    Returns:
        the new number of embedding rows (also written to ``model.config``).
    """
    if vocab.text_vocab_size is None:
        raise ValueError("resize_llm needs an ImageVocab with text_vocab_size (made by add_image_tokens)")
    embed = model.get_input_embeddings()
    _check_init(init, vocab, embed.weight.shape[1])
    rows = max(embed.weight.shape[0], vocab.max_token_id + 1)
    model.resize_token_embeddings(rows, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)

    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    with torch.no_grad():
        _init_rows(embed.weight, vocab, init)
        if head is not None and head.weight is not embed.weight:
            _init_rows(head.weight, vocab, init)
        if head is not None and getattr(head, "bias", None) is not None:
            head.bias[vocab.text_vocab_size:] = head.bias[: vocab.text_vocab_size].float().mean().to(head.bias.dtype)
    new_rows = embed.weight.shape[0]  # resize_token_embeddings already wrote it to config.vocab_size
    vocab.check_fits(new_rows)
    return new_rows


def _check_init(init: Init, vocab: ImageVocab, hidden: int) -> None:
    if isinstance(init, torch.Tensor):
        if vocab.is_unified:
            raise ValueError("an init tensor needs new image rows, but a unified-codebook vocabulary reuses text rows")
        expected = (vocab.num_image_tokens, hidden)
        if tuple(init.shape) != expected:
            raise ValueError(
                f"init tensor must have shape (image tokens, hidden) = {expected}, got {tuple(init.shape)}"
            )
    elif init not in INITS:
        raise ValueError(f"init must be one of {INITS} or a (K, hidden) tensor, got {init!r}")


def _init_rows(weight: torch.Tensor, vocab: ImageVocab, init: Init) -> None:
    """Initialise rows ``[text_vocab_size, rows)`` of ``weight`` (rows, hidden) from its text rows, in place."""
    n_text = vocab.text_vocab_size
    if weight.shape[0] <= n_text:
        return
    text = weight[:n_text].float()  # (n_text, hidden)
    mean = text.mean(dim=0)  # (hidden,)
    if isinstance(init, str) and init == "normal":
        new = torch.randn(weight.shape[0] - n_text, weight.shape[1], device=weight.device) * text.std()
        weight[n_text:] = new.to(weight.dtype)
        return
    weight[n_text:] = mean.to(weight.dtype)
    if isinstance(init, torch.Tensor):
        start, end = vocab.id_range
        weight[start:end] = init.to(device=weight.device, dtype=weight.dtype)


def bridge_llm(
    model,
    tokenizer,
    codebook_size: int,
    layout: str = "grid",
    grid_size: Optional[Sequence[int]] = None,
    num_tokens: Optional[int] = None,
    tokenizer_fingerprint: Optional[str] = None,
    init: Init = "mean",
    pad_to_multiple_of: Optional[int] = None,
    **layout_options,
) -> ImageVocab:
    """:func:`add_image_tokens` then :func:`resize_llm`: give ``model`` + ``tokenizer`` an image vocabulary in one call.

    ``layout_options`` are :func:`add_image_tokens`'s keyword-only arguments (``num_levels``, ``level_order``,
    ``separate_level_ranges``, ``factors``, ``variable_size``, ``budgets``, ``token_ids``, ``special_tokens``).
    """
    if isinstance(init, torch.Tensor) or init not in INITS:  # check before touching the tokenizer
        options = dict(layout_options, codebook_size=codebook_size, layout=layout, grid_size=grid_size,
                       num_tokens=num_tokens)
        special_tokens = options.pop("special_tokens", None)
        _check_init(init, _plan_vocab(tokenizer, options, special_tokens), model.get_input_embeddings().weight.shape[1])
    vocab = add_image_tokens(tokenizer, codebook_size, layout, grid_size, num_tokens, tokenizer_fingerprint,
                             **layout_options)
    resize_llm(model, vocab, init=init, pad_to_multiple_of=pad_to_multiple_of)
    return vocab
