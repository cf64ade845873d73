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
) -> ImageVocab:
    """Add ``<boi>``, ``<eoi>`` (``<eol>`` for grids) and ``<img_0>..<img_{K-1}>`` to ``tokenizer`` in place.

    The specials take the first new ids, then the K image tokens take the contiguous range ``[offset, offset + K)``.

    Raises:
        ValueError: the layout arguments are invalid (checked before the tokenizer is touched), the tokenizer already
            holds one of the new tokens (already bridged), or the ids it assigned are not contiguous.
    """
    text_vocab_size = _text_vocab_size(tokenizer)
    specials = _special_strings(layout)
    images = [_DEFAULTS["image_token_format"].format(i) for i in range(codebook_size)]
    # Building the planned vocabulary validates layout/grid_size/num_tokens/codebook_size before any mutation.
    _make_vocab(text_vocab_size, codebook_size, layout, grid_size, num_tokens, tokenizer_fingerprint,
                special_ids=list(range(text_vocab_size, text_vocab_size + len(specials))))
    _check_not_bridged(tokenizer, specials, images)

    tokenizer.add_special_tokens({"extra_special_tokens": specials}, replace_extra_special_tokens=False)
    _add_plain_tokens(tokenizer, images)

    special_ids, offset = _check_new_ids(tokenizer, specials, images, text_vocab_size)
    return _make_vocab(text_vocab_size, codebook_size, layout, grid_size, num_tokens, tokenizer_fingerprint,
                       special_ids=special_ids, offset=offset)


def _text_vocab_size(tokenizer) -> int:
    # len(tokenizer) normally; a tokenizer whose ids have holes above len() must not see them called image ids.
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def _special_strings(layout: str) -> list[str]:
    specials = [_DEFAULTS["boi_token"], _DEFAULTS["eoi_token"]]
    return specials + ([_DEFAULTS["eol_token"]] if layout == "grid" else [])


def _make_vocab(text_vocab_size, codebook_size, layout, grid_size, num_tokens, fingerprint, special_ids, offset=None):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return ImageVocab(
        offset=text_vocab_size + len(special_ids) if offset is None else offset,
        codebook_size=codebook_size,
        boi_token_id=special_ids[0],
        eoi_token_id=special_ids[1],
        eol_token_id=special_ids[2] if layout == "grid" else None,
        layout=layout,
        grid_size=grid_size if layout == "grid" else None,
        num_tokens=num_tokens if layout == "sequence" else None,
        text_vocab_size=text_vocab_size,
        tokenizer_fingerprint=fingerprint,
    )


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


def _check_new_ids(tokenizer, specials: list[str], images: list[str], text_vocab_size: int) -> tuple[list[int], int]:
    """Return the specials' ids and the image offset; raise unless all are new and the image ids are contiguous."""
    special_ids = tokenizer.convert_tokens_to_ids(specials)
    if min(special_ids) < text_vocab_size:
        raise ValueError(f"special tokens {specials} got ids {special_ids} inside the text vocabulary")
    ids = torch.tensor(tokenizer.convert_tokens_to_ids(images))  # (K,)
    offset = int(ids[0])
    expected = torch.arange(offset, offset + len(images))
    if not torch.equal(ids, expected):
        bad = int((ids != expected).nonzero()[0])
        raise ValueError(
            f"image tokens did not get contiguous ids: {images[bad]!r} has id {int(ids[bad])}, expected "
            f"{int(expected[bad])} (the tokenizer assigned ids around existing added tokens). ImageVocab needs the "
            "range [offset, offset + K) to be image tokens only."
        )
    return special_ids, offset


# ---------------------------------------------------------------------------------------------------- model
def resize_llm(model, vocab: ImageVocab, init: Init = "mean", pad_to_multiple_of: Optional[int] = None) -> int:
    """Grow ``model``'s input embedding and output head to hold every id of ``vocab`` and initialise the new rows.

    Rows ``[vocab.text_vocab_size, new_rows)`` are (re)initialised, including rows the model already had beyond the
    text vocabulary (padding rows, e.g. Qwen2's) that the new ids now use; text rows are never touched.

    Args:
        model: a ``PreTrainedModel`` causal LM; tied or untied head, with or without a head bias.
        vocab: from :func:`add_image_tokens` (needs ``text_vocab_size``).
        init: ``"mean"`` (mean of the text rows), ``"normal"`` (zero-mean normal with the text rows' std), or a
            ``(K, hidden)`` tensor for the image rows (e.g. projected codebook vectors; used for the input embedding
            and, if untied, the output head too; the special/padding rows then get the mean). A head bias always
            gets the mean text bias on new rows.
        pad_to_multiple_of: round the number of rows up (tensor-core friendly sizes).

    Returns:
        the new number of embedding rows (also written to ``model.config``).
    """
    if vocab.text_vocab_size is None:
        raise ValueError("resize_llm needs an ImageVocab with text_vocab_size (made by add_image_tokens)")
    embed = model.get_input_embeddings()
    _check_init(init, vocab.codebook_size, embed.weight.shape[1])
    top = max(vocab.offset + vocab.codebook_size - 1, *vocab.special_token_ids)
    rows = max(embed.weight.shape[0], top + 1)
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


def _check_init(init: Init, codebook_size: int, hidden: int) -> None:
    if isinstance(init, torch.Tensor):
        if tuple(init.shape) != (codebook_size, hidden):
            expected = (codebook_size, hidden)
            raise ValueError(f"init tensor must have shape (K, hidden) = {expected}, got {tuple(init.shape)}")
    elif init not in INITS:
        raise ValueError(f"init must be one of {INITS} or a (K, hidden) tensor, got {init!r}")


def _init_rows(weight: torch.Tensor, vocab: ImageVocab, init: Init) -> None:
    """Initialise rows ``[text_vocab_size, rows)`` of ``weight`` (rows, hidden) from its text rows, in place."""
    n_text = vocab.text_vocab_size
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
) -> ImageVocab:
    """:func:`add_image_tokens` then :func:`resize_llm`: give ``model`` + ``tokenizer`` K image tokens in one call."""
    _check_init(init, codebook_size, model.get_input_embeddings().weight.shape[1])  # before touching the tokenizer
    vocab = add_image_tokens(tokenizer, codebook_size, layout, grid_size, num_tokens, tokenizer_fingerprint)
    resize_llm(model, vocab, init=init, pad_to_multiple_of=pad_to_multiple_of)
    return vocab
