"""LoRA for a bridged LLM through PEFT: low-rank adapters on the linear layers plus trainable rows for the new tokens.

LoRA (Hu et al., 2021, arXiv:2106.09685) freezes the pretrained weights and learns a low-rank update ``B @ A`` per
targeted linear layer. A bridged model also needs its *new* vocabulary rows (``<boi>``, ``<eoi>``, ``<eol>``, the
size tokens of variable-size grids and every image token of every level / sub-token range; see :func:`new_token_ids`)
to learn, in the input embedding and in the output head. In unified-codebook (UniCode) mode the image ids are existing
text tokens, so only the span tokens train and the text rows stay frozen. PEFT's ``trainable_token_indices`` trains
exactly those rows and stores only them, so the adapter stays small (LoRA matrices + ``n_new x hidden`` per
embedding) instead of carrying the whole ``vocab x hidden`` matrices the way ``modules_to_save`` would.

Tied and untied embeddings:

- tied (``tie_word_embeddings=True``, e.g. SmolLM2): the rows are trained once on the input embedding and PEFT ties
  the output head's wrapper to the same rows;
- untied: the input embedding and the output head each get their own trainable rows.

Text rows are never trained (except existing tokens a bridge reused as ``<boi>``/``<eoi>``/``<eol>``, which then
belong to the image spans), so a text-only prompt sees the same embeddings and (up to the LoRA update of the linear
layers) the same head as the base model.

Saving (see :func:`save_lora_bundle`): the bundle holds the *merged* model (``merge_and_unload`` of a copy, so any
tool loads it as a vanilla causal LM) and ``adapter/`` holds the PEFT adapter alone. The adapter applies to the base
LLM bridged to the same visual tokenizer (same vocabulary): ``PeftModel.from_pretrained(bridged_base, "bundle/adapter")``.
"""

from __future__ import annotations

import copy
import os
from typing import Union

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from tokenizer_bridge.processing_unified import UnifiedProcessor
from tokenizer_bridge.vocab.image_vocab import ImageVocab

from .bundle.bundle import save_bundle
from .training.recipe import LoraRecipe

ADAPTER_DIR = "adapter"


def new_token_ids(vocab: ImageVocab) -> list[int]:
    """Token ids whose rows the image vocabulary owns (sorted): ``<boi>``/``<eoi>``/``<eol>``, the size tokens of a
    variable-size grid, the budget tokens of a budgeted sequence and the image tokens of every level and sub-token
    range.

    In unified-codebook (UniCode) mode the image ids *are* existing text tokens: their rows are shared with the text,
    so they are left out (training them would change what the text tokens mean) and only the span tokens remain --
    the new specials, or the existing tokens reused as ``<boi>``/``<eoi>``/``<eol>``.
    """
    ids = set(vocab.special_token_ids) | set(vocab.size_token_ids) | set(getattr(vocab, "budget_token_ids", []))
    if not vocab.is_unified:
        ids |= set(vocab.image_token_ids().tolist())
    return sorted(ids)


def is_tied(model) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def _module_name(model, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def lora_config(recipe: LoraRecipe, model, vocab: ImageVocab) -> LoraConfig:
    """A ``LoraConfig`` for ``model``: LoRA on ``recipe.target_modules`` and trainable rows for every new token id."""
    ids = new_token_ids(vocab)
    rows = {_module_name(model, model.get_input_embeddings()): ids}
    head = model.get_output_embeddings()
    if head is not None and not is_tied(model):
        rows[_module_name(model, head)] = ids
    return LoraConfig(
        r=recipe.r,
        lora_alpha=recipe.alpha,
        lora_dropout=recipe.dropout,
        target_modules=recipe.target_modules,
        trainable_token_indices=rows,
        task_type="CAUSAL_LM",
    )


def wrap_lora(model, recipe: LoraRecipe, vocab: ImageVocab) -> PeftModel:
    """Wrap a bridged causal LM with LoRA; only the adapters and the new token rows require grad."""
    return get_peft_model(model, lora_config(recipe, model, vocab))


def merged_model(model: PeftModel) -> torch.nn.Module:
    """A merged copy (vanilla causal LM); ``model`` itself is left untouched so training can go on exactly.

    A copy, not ``merge_adapter``/``unmerge_adapter`` in place: ``W + BA - BA`` is not bit-exact, so saving a checkpoint
    would perturb the run and break exact resume. It costs one extra model in memory on the saving rank.
    """
    return copy.deepcopy(model).merge_and_unload()


def save_lora_bundle(directory: Union[str, os.PathLike], model: PeftModel, processor: UnifiedProcessor) -> None:
    """Save the merged model as a bundle, then the adapter alone into ``directory/adapter``.

    ``save_embedding_layers=False``: PEFT would otherwise store the full embedding matrices because the vocabulary was
    resized; the adapter already holds the trained rows (``trainable_tokens_delta``) and applies to the bridged base.
    """
    save_bundle(directory, merged_model(model), processor)
    model.save_pretrained(os.path.join(directory, ADAPTER_DIR), save_embedding_layers=False)
