"""The generated ``README.md`` of a bundle: what the LLM is, how its image tokens are laid out and how much the
vocabulary grew, which visual tokenizer it reads and writes, and the recipe that trained it."""

from __future__ import annotations

import json
import os
import re
from typing import Optional

from tokenizer_bridge.processing_unified import UnifiedProcessor


# ---------------------------------------------------------------------------------------------------- model card
def model_card(model, processor: UnifiedProcessor, base_model: Optional[str] = None,
               recipe: Optional[dict] = None) -> str:
    """README.md: Hub metadata, base model, visual tokenizer, span layout, vocabulary growth, training recipe."""
    vocab = processor.image_vocab
    base = base_model or getattr(model, "name_or_path", "") or "unknown (built in code)"
    span = f"{vocab.span_length} tokens per image including <boi>/<eoi>"
    if vocab.variable_size:
        span = f"up to {span} (at {vocab.grid_size[0]}x{vocab.grid_size[1]})"
    elif getattr(vocab, "budgets", None):
        span = f"up to {span} (at {vocab.num_tokens} ids)"
    lines = _card_metadata(base) + [
        "# tokenizer-bridge bundle",
        "",
        "A Hugging Face causal LM whose vocabulary was extended with discrete image tokens by tokenizer-bridge.",
        "",
        f"- Base model: `{base}`",
        f"- LLM: `{type(model).__name__}`, {model.get_input_embeddings().weight.shape[0]} embedding rows",
        f"- Image span layout: {layout_summary(vocab)}; {span}",
        f"- Vocabulary growth: {growth_summary(vocab)}; text vocabulary {vocab.text_vocab_size}",
        f"- Visual tokenizer: {_visual_tokenizer_summary(processor)}",
        "",
        *_recipe_section(recipe),
        "## Usage",
        "",
        "```python",
        "from mllm.bundle.bundle import Bundle",
        'bundle = Bundle.from_pretrained("path/or/repo")',
        "model, processor = bundle.model, bundle.processor",
        "```",
        "",
        "Without tokenizer-bridge installed, each piece loads with transformers alone:",
        "",
        "```python",
        "from transformers import AutoModel, AutoModelForCausalLM, AutoProcessor, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("path/or/repo")',
        'tokenizer = AutoTokenizer.from_pretrained("path/or/repo")',
        'processor = AutoProcessor.from_pretrained("path/or/repo", trust_remote_code=True)',
        'visual_tokenizer = AutoModel.from_pretrained("path/or/repo", subfolder="visual_tokenizer", '
        "trust_remote_code=True)",
        "```",
        "",
    ]
    return "\n".join(lines)


RECIPE_NAME = "training_recipe.yaml"
README_NAME = "README.md"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _card_metadata(base: str) -> list[str]:
    lines = ["---", "library_name: transformers", "tags:", "- tokenizer-bridge", "- multimodal", "- image-tokens"]
    if _HUB_ID.match(base) and not os.path.exists(base):
        lines.append(f"base_model: {base}")
    return lines + ["---", ""]



def _special_names(vocab) -> list[str]:
    names = [vocab.boi_token, vocab.eoi_token]
    return names + ([vocab.eol_token] if vocab.eol_token_id is not None else [])



def layout_summary(vocab) -> str:
    """One line saying how an image is spelled: layout and size, residual levels and their order, sub-tokens, ids."""
    budgets = getattr(vocab, "budgets", None)
    if vocab.layout == "sequence" and budgets:
        text = (f"sequence of up to {vocab.num_tokens} ids (token budgets {', '.join(map(str, budgets))}, stated by "
                "a budget token after <boi>)")
    elif vocab.layout == "sequence":
        text = f"sequence of {vocab.num_tokens} ids"
    elif vocab.variable_size:
        text = (f"variable-size grid up to {vocab.grid_size[0]}x{vocab.grid_size[1]} (each span starts with its size "
                "as <h_k> <w_k> after <boi>; one <eol> per row)")
    else:
        text = f"grid {vocab.grid_size[0]}x{vocab.grid_size[1]} (one <eol> per row)"
    if vocab.num_levels > 1:
        order = ("position-major: all levels of a position, then the next" if vocab.level_order == "position"
                 else "level-major: one full pass per level")
        ranges = "" if vocab.is_unified else (", a separate id range per level" if vocab.separate_level_ranges
                                              else ", one id range shared by every level")
        text += f", {vocab.num_levels} residual levels per position ({order}{ranges})"
    if vocab.factors is not None:
        radices = " x ".join(str(f) for f in vocab.factors)
        text += f", each image id split into {len(vocab.factors)} sub-tokens (radices {radices})"
    if vocab.is_unified:
        text += f", unified codebook: the {vocab.codebook_size} image ids are existing text tokens"
    return text



def growth_summary(vocab) -> str:
    """How many tokens the bridge added to the text vocabulary, and what they are."""
    text_size = vocab.text_vocab_size
    new_specials = [name for name, i in zip(_special_names(vocab), vocab.special_token_ids)
                    if text_size is None or i >= text_size]
    parts = []
    if not vocab.is_unified:
        tokens = vocab.num_image_tokens
        if tokens == vocab.codebook_size:
            parts.append(f"{tokens} image ids")
        else:
            ranges = (vocab.num_levels if vocab.separate_level_ranges else 1) * vocab.tokens_per_id
            per = " x ".join(name for name, on in (("level", vocab.separate_level_ranges),
                                                   ("sub-token", vocab.factors is not None)) if on)
            ids = f"{vocab.codebook_size} image ids" + (" per level" if vocab.num_levels > 1 else "")
            parts.append(f"{tokens} image tokens ({ranges} {per} ranges for {ids})")
    if vocab.size_token_ids:
        parts.append(f"{len(vocab.size_token_ids)} size tokens")
    if getattr(vocab, "budget_token_ids", None):
        parts.append(f"{len(vocab.budget_token_ids)} budget tokens")
    if new_specials:
        parts.append(f"{len(new_specials)} specials ({', '.join(new_specials)})")
    added = sum(int(p.split()[0]) for p in parts)
    reused = ""
    if vocab.is_unified:
        reused = f"; the {vocab.codebook_size} image ids reuse existing text tokens (unified codebook)"
        if len(new_specials) < len(vocab.special_token_ids):
            reused += ", and so do the span markers"
    if not added:
        return f"none: the vocabulary did not grow{reused}"
    return f"{added} tokens = {' + '.join(parts)}{reused}"



def _visual_tokenizer_summary(processor: UnifiedProcessor) -> str:
    vt = processor.visual_tokenizer
    fingerprint = processor.image_vocab.tokenizer_fingerprint or "none"
    if vt is None:
        return f"not included (fingerprint `{fingerprint}`)"
    c = vt.config
    if hasattr(c, "family"):  # a wrapped pretrained VQ (tokenizer_bridge.modeling_pretrained_vq)
        decoder = "" if vt.family.has_decoder else "; encoder only: its image ids cannot be decoded to pixels"
        return (f"`{type(vt).__name__}` wrapping the pretrained {c.family} VQ (`{type(vt.vq).__name__}`) with "
                f"{c.codebook_size} codes, downsample x{c.downsample}{decoder}; fingerprint `{fingerprint}`")
    if vt.id_layout == "sequence":  # a slot tokenizer (tokenizer_bridge.modeling_slot_tokenizer)
        return (f"`{type(vt).__name__}` ({c.backbone} backbone, Q-Former + slot attention into up to {c.num_slots} "
                f"slots (token budgets {', '.join(map(str, vt.budgets))}), {c.quantizer['type']} quantizer with "
                f"{vt.codebook_size} codes x {vt.num_levels} residual levels, {c.decoder} decoder, trained at "
                f"{c.image_size} px; fingerprint `{fingerprint}`)")
    return (
        f"`{type(vt).__name__}` ({c.encoder} encoder, {c.quantizer['type']} quantizer with {vt.codebook_size} codes of "
        f"dimension {c.latent_dim}, {c.decoder} decoder, downsample x{c.downsample}, trained at {c.image_size} px; "
        f"fingerprint `{fingerprint}`)"
    )



def _recipe_section(recipe: Optional[dict]) -> list[str]:
    if not recipe:
        return []
    data, train, lora = recipe.get("data") or {}, recipe.get("train") or {}, recipe.get("lora") or {}
    lines = ["## Training recipe", "", f"Saved in `{RECIPE_NAME}`.", ""]
    lines.append(f"- Stage: `{recipe.get('stage', '?')}`; model section: `{json.dumps(recipe.get('model') or {})}`")
    if data:
        lines.append(f"- Data: `{data.get('dataset', '?')}` at {data.get('image_size', '?')} px, "
                     f"tasks {json.dumps(data.get('tasks') or {})}, packing {bool(data.get('packing'))}")
    if train:
        lines.append(f"- Optimisation: {train.get('steps', '?')} steps, batch {train.get('batch_size', '?')}, "
                     f"lr {train.get('lr', '?')}, warmup {train.get('warmup_steps', '?')}, "
                     f"seed {train.get('seed', '?')}")
    if lora.get("enabled"):
        lines.append(f"- LoRA: r={lora.get('r')}, alpha={lora.get('alpha')}, targets {lora.get('target_modules')}")
    return lines + [""]
