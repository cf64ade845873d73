"""One folder holding a bridged LLM and its :class:`~tokenizer_bridge.processing_unified.UnifiedProcessor`.

Layout (every piece loadable on its own; the LLM is a vanilla Hugging Face causal LM with a bigger vocabulary)::

    bundle/
      config.json, model.safetensors, generation_config.json    AutoModelForCausalLM
      tokenizer.json, tokenizer_config.json, ...                 AutoTokenizer (holds the image tokens)
      processor_config.json, preprocessor_config.json            AutoProcessor -> UnifiedProcessor
      image_vocab.json                                           ImageVocab
      visual_tokenizer/config.json, model.safetensors            AutoModel -> VisualTokenizer
      README.md                                                  generated model card

:func:`save_bundle` writes into a temporary sibling folder and swaps it in only once everything is written, so a
failure never leaves a half-overwritten bundle.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Optional, Union

import torch
from transformers import AutoModelForCausalLM

from tokenizer_bridge.processing_unified import UnifiedProcessor

PathLike = Union[str, os.PathLike]


def save_bundle(directory: PathLike, model, processor: UnifiedProcessor, base_model: Optional[str] = None) -> Path:
    """Write ``model`` (safetensors) and ``processor`` into ``directory``, replacing it only after success.

    Args:
        directory: target folder; an existing one is replaced atomically (rename) once the new bundle is complete.
        model: the bridged causal LM.
        processor: its processor (tokenizer, image processor, image vocabulary, visual tokenizer).
        base_model: name of the LLM that was bridged, for the model card (defaults to ``model.name_or_path``).
    """
    target = Path(directory).absolute()
    check_model_fits(model, processor)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")  # same filesystem: rename is atomic
    staging.mkdir()  # not tempfile.mkdtemp: its 0700 mode would end up on the bundle
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / "README.md").write_text(model_card(model, processor, base_model))
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _swap_in(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` is moved aside first and restored on failure."""
    if not target.exists():
        os.rename(staging, target)
        return
    backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def load_bundle(
    directory: PathLike, device: Optional[Union[str, torch.device]] = None, **model_kwargs
) -> tuple[torch.nn.Module, UnifiedProcessor]:
    """Load ``(model, processor)`` from a bundle written by :func:`save_bundle`, checking they fit together.

    ``model_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype=torch.bfloat16``); ``device``
    moves both the LLM and the visual tokenizer.
    """
    directory = os.fspath(directory)
    processor = UnifiedProcessor.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, **model_kwargs)
    check_model_fits(model, processor)
    if device is not None:
        model.to(device)
        if processor.visual_tokenizer is not None:
            processor.visual_tokenizer.to(device)
    return model, processor


def check_model_fits(model, processor: UnifiedProcessor) -> None:
    """Raise unless the LLM's input embedding and output head have a row for every id of the image vocabulary."""
    rows = model.get_input_embeddings().weight.shape[0]
    head = model.get_output_embeddings()
    if head is not None:
        rows = min(rows, head.weight.shape[0])
    processor.image_vocab.check_fits(rows)


def model_card(model, processor: UnifiedProcessor, base_model: Optional[str] = None) -> str:
    """A short README.md: base model, visual tokenizer, span layout and vocabulary growth."""
    vocab = processor.image_vocab
    base = base_model or getattr(model, "name_or_path", "") or "unknown (built in code)"
    added = vocab.codebook_size + len(vocab.special_token_ids)
    if vocab.layout == "grid":
        layout = f"grid {vocab.grid_size[0]}x{vocab.grid_size[1]} (one <eol> per row)"
    else:
        layout = f"sequence of {vocab.num_tokens} ids"
    lines = [
        "# tokenizer-bridge bundle",
        "",
        "A Hugging Face causal LM whose vocabulary was extended with discrete image tokens by tokenizer-bridge.",
        "",
        f"- Base model: `{base}`",
        f"- LLM: `{type(model).__name__}`, {model.get_input_embeddings().weight.shape[0]} embedding rows",
        f"- Image span layout: {layout}, {vocab.span_length} tokens per image including <boi>/<eoi>",
        f"- Vocabulary growth: {added} tokens = {vocab.codebook_size} image ids + {len(vocab.special_token_ids)} "
        f"specials ({', '.join(_special_names(vocab))}); text vocabulary {vocab.text_vocab_size}",
        f"- Visual tokenizer: {_visual_tokenizer_summary(processor)}",
        "",
        "```python",
        "from mllm.bundle import load_bundle",
        'model, processor = load_bundle("path/to/bundle")',
        "```",
        "",
    ]
    return "\n".join(lines)


def _special_names(vocab) -> list[str]:
    names = [vocab.boi_token, vocab.eoi_token]
    return names + ([vocab.eol_token] if vocab.eol_token_id is not None else [])


def _visual_tokenizer_summary(processor: UnifiedProcessor) -> str:
    vt = processor.visual_tokenizer
    fingerprint = (processor.image_vocab.tokenizer_fingerprint or "none")[:16]
    if vt is None:
        return f"not included (fingerprint {fingerprint})"
    c = vt.config
    return (
        f"`{type(vt).__name__}` ({c.encoder} encoder, {c.quantizer} quantizer with {c.codebook_size} codes of "
        f"dimension {c.latent_dim}, {c.decoder} decoder, downsample x{c.downsample}, trained at {c.image_size} px; "
        f"fingerprint {fingerprint})"
    )
