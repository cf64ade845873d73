"""Tiny text tokenizers built in code, for the demo LLM and for offline tests.

Two kinds, so that the bridge is exercised on both tokenizer backends transformers 5.x has:

- :func:`build_word_tokenizer`: a word-level ``tokenizers`` model wrapped as a fast tokenizer
  (``TokenizersBackend``, what ``AutoTokenizer`` returns for a ``tokenizer.json``).
- :func:`build_sentencepiece_tokenizer`: a SentencePiece model (Kudo & Richardson, 2018) trained in memory and loaded
  with ``transformers.SentencePieceBackend``, which tokenizes with the ``sentencepiece`` library itself.

Why ``SentencePieceBackend`` and not ``LlamaTokenizer``: in transformers 5.x ``LlamaTokenizer(vocab_file=...)`` (and
every other model tokenizer built on ``TokenizersBackend``) *converts* the ``.model`` proto into a ``tokenizers``
object at load time, so it would be a second fast tokenizer. ``SentencePieceBackend`` is a ``PreTrainedTokenizer``
(``PythonBackend``) that keeps a ``sentencepiece.SentencePieceProcessor`` as ``sp_model``; it saves
``tokenizer.model`` + ``tokenizer_config.json`` with ``"tokenizer_class": "SentencePieceBackend"``, and
``AutoTokenizer.from_pretrained`` loads it back as the same class (found through the top-level ``transformers``
namespace), so the round trip stays genuinely SentencePiece-backed.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Iterable, Optional, Union

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, SentencePieceBackend

DEFAULT_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
SPM_MODEL_NAME = "tokenizer.model"


def _word_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Split on whitespace, then isolate every punctuation character: "left." -> "left", "."
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])


def build_word_tokenizer(
    words: Iterable[str],
    extra_special: Iterable[str] = DEFAULT_SPECIALS,
    add_bos: bool = True,
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over ``words``.

    Args:
        words: words, or whole sentences (each is split with the tokenizer's own pre-tokenizer, so captions can be
            passed as they are). Duplicates are dropped; ids follow first appearance.
        extra_special: special tokens placed first (ids ``0..``). The first four are used, in order, as the pad, bos,
            eos and unk tokens; any further ones become extra special tokens.
        add_bos: prepend the bos token to every encoded sequence (stored in ``tokenizer.json``, so it survives
            ``save_pretrained``).

    Returns:
        a ``PreTrainedTokenizerFast`` (``TokenizersBackend``) whose decoder rejoins words with single spaces and no
        space before punctuation.
    """
    specials = list(dict.fromkeys(extra_special))
    if len(specials) < 4:
        raise ValueError(f"extra_special needs at least pad, bos, eos and unk tokens, got {specials}")
    pad, bos, eos, unk = specials[:4]
    split = _word_pre_tokenizer()
    vocab = {token: i for i, token in enumerate(specials)}
    for text in words:
        for word, _ in split.pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))

    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = split
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins with " ", drops " " before punctuation
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        extra_special_tokens=specials[4:],
        clean_up_tokenization_spaces=False,
    )


def train_sentencepiece_model(texts: Iterable[str], vocab_size: int = 200, model_type: str = "unigram") -> bytes:
    """Train a SentencePiece model on in-memory sentences; returns the serialized ``.model`` proto.

    ``<pad>``, ``<s>``, ``</s>``, ``<unk>`` get ids 0..3. ``vocab_size`` is an upper bound (tiny corpora cannot
    always fill it). Identity normalisation keeps the proto small and the text byte-exact.
    """
    sentences = [t for t in texts if t.strip()]
    if not sentences:
        raise ValueError("need at least one non-empty sentence to train a SentencePiece model")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type=model_type,
        hard_vocab_limit=False,
        character_coverage=1.0,
        normalization_rule_name="identity",
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        bos_piece="<s>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    return buffer.getvalue()


def build_sentencepiece_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 200,
    workdir: Optional[Union[str, os.PathLike]] = None,
    model_type: str = "unigram",
) -> SentencePieceBackend:
    """Train a tiny SentencePiece model on ``texts`` and load it as a genuinely SentencePiece-backed tokenizer.

    Args:
        texts: training sentences.
        vocab_size: upper bound on the number of pieces.
        workdir: where ``tokenizer.model`` is written; a temporary directory (removed after loading) when ``None``.
            The tokenizer keeps the proto in memory, so ``save_pretrained`` works either way.
        model_type: ``"unigram"`` or ``"bpe"``.

    Returns:
        a ``SentencePieceBackend`` (a slow ``PreTrainedTokenizer`` around ``sentencepiece.SentencePieceProcessor``)
        with pad/bos/eos/unk set. It adds no bos/eos when encoding: ``special_tokens_pattern`` would, but transformers
        5.23 does not save that setting, so a reloaded tokenizer would encode differently.
    """
    proto = train_sentencepiece_model(texts, vocab_size=vocab_size, model_type=model_type)
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)
        return _load_sentencepiece(proto, os.path.join(workdir, SPM_MODEL_NAME))
    with tempfile.TemporaryDirectory() as tmp:
        return _load_sentencepiece(proto, os.path.join(tmp, SPM_MODEL_NAME))


def _load_sentencepiece(proto: bytes, path: str) -> SentencePieceBackend:
    with open(path, "wb") as f:
        f.write(proto)
    return SentencePieceBackend(
        vocab_file=path, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
