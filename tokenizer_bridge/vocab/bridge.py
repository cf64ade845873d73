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
- Other layouts (see :mod:`tokenizer_bridge.vocab.layout`) name their plain image tokens ``<img_L{l}_{k}>`` (one
  range per residual level), ``<img_F{j}_{d}>`` (factorized sub-tokens, Open-MAGVIT2 style) or ``<img_L{l}_F{j}_{d}>``;
  variable-size grids add plain size tokens ``<h_1>..<h_H>``, ``<w_1>..<w_W>``, budgeted sequences one plain
  ``<n_b>`` per token budget; the unified-codebook (UniCode) mode adds no image token at all (image id ``k`` is the
  text token ``token_ids[k]``), and the layout's ``special_tokens`` may reuse existing tokens as
  ``<boi>``/``<eoi>``/``<eol>`` so that nothing is added.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from tokenizers import AddedToken
from transformers import PreTrainedTokenizer

from .image_vocab import ImageVocab
from .layout import ImageLayout, as_image_layout

Init = Union[str, torch.Tensor]
INITS = ("mean", "normal")
_MARKERS = tuple(ImageVocab.__dataclass_fields__[name].default for name in ("boi_token", "eoi_token", "eol_token"))


# ---------------------------------------------------------------------------------------------------- tokenizer
def add_image_tokens(tokenizer, image_layout: Union[ImageLayout, int, None] = None, *,
                     tokenizer_fingerprint: Optional[str] = None, visual_tokenizer=None,
                     **layout_fields) -> ImageVocab:
    """Add the image vocabulary of ``image_layout`` to ``tokenizer`` in place and return its :class:`ImageVocab`.

    New ids, in order: ``<boi>``, ``<eoi>`` (``<eol>`` for grids) unless the layout's ``special_tokens`` names
    existing tokens to reuse; ``<h_1>..<h_H>``, ``<w_1>..<w_W>`` for variable-size grids (``<n_b>`` per token budget
    for budgeted sequences); then the image tokens, one contiguous range ``[offset, offset + vocab.num_image_tokens)``
    (none in unified-codebook mode). See :mod:`tokenizer_bridge.vocab.layout` for each layout's span.

    Args:
        image_layout: an :class:`ImageLayout`; or its fields as keywords (``layout_fields``), with the codebook size
            in its place: ``add_image_tokens(tokenizer, 1024, grid_size=(16, 16))``.
        tokenizer_fingerprint: fingerprint of the visual tokenizer whose ids the vocabulary spells.
        visual_tokenizer: that visual tokenizer, to record its fingerprint (instead of ``tokenizer_fingerprint``).
            A vocabulary recorded without a fingerprint is refused by ``UnifiedProcessor`` together with a visual
            tokenizer unless it is built with ``allow_missing_fingerprint=True``.

    Raises:
        ValueError: the layout is invalid or would overlap existing tokens (checked before the tokenizer is
            touched), the tokenizer already holds one of the new tokens (already bridged), or the ids it assigned are
            not contiguous.
    """
    layout = as_image_layout(image_layout, **layout_fields)
    tokenizer_fingerprint = _fingerprint(tokenizer_fingerprint, visual_tokenizer)
    plan = _plan_vocab(tokenizer, layout, tokenizer_fingerprint)  # validates everything before any mutation
    new_markers = [] if layout.special_tokens is not None else _marker_strings(layout)
    plain = _plain_token_strings(plan)
    _check_not_bridged(tokenizer, new_markers, plain)

    if new_markers:
        tokenizer.add_special_tokens({"extra_special_tokens": new_markers}, replace_extra_special_tokens=False)
    if plain:
        _add_plain_tokens(tokenizer, plain)
    return _vocab_from_tokenizer(tokenizer, plan)


def _fingerprint(fingerprint: Optional[str], visual_tokenizer) -> Optional[str]:
    """The fingerprint to record: the one given, or the visual tokenizer's (both must then agree)."""
    if visual_tokenizer is None:
        return fingerprint
    own = visual_tokenizer.fingerprint()
    if fingerprint is not None and fingerprint != own:
        raise ValueError("tokenizer_fingerprint is not the fingerprint of the visual_tokenizer given: pass one of them")
    return own


def _text_vocab_size(tokenizer) -> int:
    # len(tokenizer) normally; a tokenizer whose ids have holes above len() must not see them called image ids.
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def _marker_strings(layout: ImageLayout) -> list[str]:
    return list(_MARKERS[: 3 if layout.layout == "grid" else 2])


def _plain_token_strings(vocab: ImageVocab) -> list[str]:
    """The non-special tokens to add, in id order: size or budget tokens, then image tokens."""
    return vocab.size_token_strings() + vocab.budget_token_strings() + vocab.image_token_strings()


def _plan_vocab(tokenizer, layout: ImageLayout, fingerprint: Optional[str] = None) -> ImageVocab:
    """The vocabulary the tokenizer will have once the new tokens got the next free ids (checks the ids)."""
    text_vocab_size = _text_vocab_size(tokenizer)
    if layout.special_tokens is not None:
        marker_ids = _existing_ids(tokenizer, layout.special_tokens)
        next_id = text_vocab_size
    else:
        marker_ids = list(range(text_vocab_size, text_vocab_size + len(_marker_strings(layout))))
        next_id = marker_ids[-1] + 1
    return _assign_ids(layout, text_vocab_size, marker_ids, next_id, fingerprint)


def _existing_ids(tokenizer, special_tokens) -> list[int]:
    vocab = tokenizer.get_vocab()
    missing = [t for t in special_tokens if t not in vocab]
    if missing:
        raise ValueError(f"special_tokens {missing} are not tokens of the tokenizer (reuse existing tokens only)")
    return [vocab[t] for t in special_tokens]


def _assign_ids(layout: ImageLayout, text_vocab_size: int, marker_ids: list[int], first: int,
                fingerprint: Optional[str]) -> ImageVocab:
    """The vocabulary of ``layout`` whose plain tokens (size or budget tokens, then image tokens) start at ``first``."""
    heads = sum(layout.grid_size) if layout.variable_size else len(layout.budgets or ())
    return ImageVocab.from_layout(
        layout,
        offset=None if layout.is_unified else first + heads,
        boi_token_id=marker_ids[0],
        eoi_token_id=marker_ids[1],
        eol_token_id=marker_ids[2] if layout.layout == "grid" else None,
        size_token_offset=first if layout.variable_size else None,
        budget_token_offset=first if layout.has_budgets else None,
        text_vocab_size=text_vocab_size,
        tokenizer_fingerprint=fingerprint,
    )


def _vocab_from_tokenizer(tokenizer, plan: ImageVocab) -> ImageVocab:
    """The vocabulary with the ids the tokenizer really assigned; raise unless they are new and contiguous."""
    if plan.special_tokens is not None:
        marker_ids = plan.special_token_ids
    else:
        marker_ids = tokenizer.convert_tokens_to_ids(_marker_strings(plan))
        if min(marker_ids) < plan.text_vocab_size:
            raise ValueError(f"special tokens got ids {marker_ids} inside the text vocabulary")
    plain = _plain_token_strings(plan)
    first = _check_contiguous(tokenizer, plain) if plain else plan.text_vocab_size
    return _assign_ids(plan.image_layout, plan.text_vocab_size, marker_ids, first, plan.tokenizer_fingerprint)


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


def codebook_embeddings(visual_tokenizer, like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``(K, hidden)`` embedding rows for the ``K`` codes of a single-level visual tokenizer, shaped by its codebook.

    Each code's quantized vector (``quantizer.lookup_flat``, what the decoder receives) is standardised per channel
    over the codebook and sent through a fixed random Gaussian projection to the LLM's width (seeded by ``seed``), then
    placed at the mean and per-coordinate std of ``like`` (the text rows, ``(n_text, hidden)``). Codes that decode
    alike start with alike embeddings, so an LLM can generalise from the ids it has seen to similar ids it rarely
    sees, instead of starting every image token from the same row.
    """
    quantizer = visual_tokenizer.quantizer
    if quantizer.num_levels != 1:
        raise ValueError(f"codebook embeddings need a single-level quantizer, got {quantizer.num_levels} levels")
    with torch.no_grad():
        vectors = quantizer.lookup_flat(torch.arange(visual_tokenizer.codebook_size, device=visual_tokenizer.device))
        vectors = vectors.detach().float().cpu()  # (K, D)
        vectors = (vectors - vectors.mean(0)) / vectors.std(0).clamp_min(1e-6)
        generator = torch.Generator().manual_seed(seed)
        projection = torch.randn(vectors.shape[1], like.shape[1], generator=generator) / vectors.shape[1] ** 0.5
        text = like.detach().float().cpu()
        return (vectors @ projection) * text.std() + text.mean(0)


def init_image_embeddings_from_codebook(model, vocab: ImageVocab, visual_tokenizer, seed: int = 0) -> None:
    """Overwrite the *input* embedding rows of ``vocab``'s image tokens with :func:`codebook_embeddings`.

    The output head keeps its rows (the mean of the text rows from :func:`resize_llm`), so text behaviour stays
    exactly as it was: image tokens still never win a greedy step in text, and text-only inputs never read these
    rows. Needs one new token per code (not a unified codebook, residual levels or factorized sub-tokens).
    """
    if vocab.is_unified or vocab.num_levels != 1 or vocab.tokens_per_id != 1:
        raise ValueError("codebook initialisation needs one new token per code: not a unified codebook, residual "
                         "levels or factorized sub-tokens")
    if vocab.num_image_tokens != visual_tokenizer.codebook_size:
        raise ValueError(f"the vocabulary has {vocab.num_image_tokens} image tokens but the visual tokenizer "
                         f"{visual_tokenizer.codebook_size} codes")
    weight = model.get_input_embeddings().weight
    rows = codebook_embeddings(visual_tokenizer, weight[: vocab.text_vocab_size], seed)
    start, end = vocab.id_range
    with torch.no_grad():
        weight[start:end] = rows.to(device=weight.device, dtype=weight.dtype)


def _check_init(init: Init, layout: ImageLayout, hidden: int) -> None:
    if isinstance(init, torch.Tensor):
        if layout.is_unified:
            raise ValueError("an init tensor needs new image rows, but a unified-codebook vocabulary reuses text rows")
        expected = (layout.num_image_tokens, hidden)
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


def bridge_llm(model, tokenizer, image_layout: Union[ImageLayout, int, None] = None, *,
               tokenizer_fingerprint: Optional[str] = None, visual_tokenizer=None, init: Init = "mean",
               pad_to_multiple_of: Optional[int] = None, **layout_fields) -> ImageVocab:
    """:func:`add_image_tokens` then :func:`resize_llm`: give ``model`` + ``tokenizer`` an image vocabulary in one call.

    ``image_layout`` is an :class:`ImageLayout`, or its fields are given as keywords with the codebook size in its
    place: ``bridge_llm(model, tokenizer, 1024, grid_size=(16, 16))``. Record the visual tokenizer's fingerprint
    (``tokenizer_fingerprint=`` or ``visual_tokenizer=``): a processor refuses a vocabulary without one.
    """
    layout = as_image_layout(image_layout, **layout_fields)
    _check_init(init, layout, model.get_input_embeddings().weight.shape[1])  # before touching the tokenizer
    vocab = add_image_tokens(tokenizer, layout, tokenizer_fingerprint=tokenizer_fingerprint,
                             visual_tokenizer=visual_tokenizer)
    resize_llm(model, vocab, init=init, pad_to_multiple_of=pad_to_multiple_of)
    return vocab
