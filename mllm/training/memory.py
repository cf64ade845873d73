"""Trading compute for memory: activation (gradient) checkpointing of a stage's model, ``train.gradient_checkpointing``.

Hugging Face LLMs recompute each decoder layer (``gradient_checkpointing_enable``); the visual tokenizers recompute
each conv or ViT block of their encoder and decoder (``tokenizer_bridge.nn.conv.run_blocks``). Non-reentrant
checkpointing throughout, so frozen inputs (LoRA) and keyword arguments need no special care, and the losses and
gradients are those of the plain model.
"""

from __future__ import annotations

import torch


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Turn activation checkpointing on for ``model`` (a PEFT model: for its base model), or refuse clearly."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(target, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.gradient_checkpointing: {type(target).__name__} cannot recompute its activations; "
                         "set train.gradient_checkpointing=false")
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = getattr(target, "config", None)
    if getattr(config, "use_cache", False):
        config.use_cache = False  # a KV cache is pointless while training and conflicts with recomputation
