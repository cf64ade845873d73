"""``train.freeze``: modules of a stage's model that the loop keeps fixed (a new decoder for a tokenizer's frozen
encoder and quantizer, frozen LLM layers)."""

from __future__ import annotations

import torch


def freeze_modules(model: torch.nn.Module, names) -> list:
    """``train.freeze``: the submodules of ``model`` at the dotted ``names`` (``encoder``, ``quantizer``,
    ``model.layers.0``) stop training: their parameters get no gradient and no optimizer state, and they stay in eval
    mode (no dropout, and no codebook a quantizer updates in its training forward: EMA, k-means init, dead-code
    restarts), so a frozen encoder + quantizer gives exactly the image ids it gave before. Returns the modules."""
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"train.freeze must be a list of module names, got {names!r}")
    modules = []
    for name in names:
        try:
            modules.append(model.get_submodule(name))
        except AttributeError:
            children = [n for n, _ in model.named_children()]
            raise ValueError(f"train.freeze: {type(model).__name__} has no module {name!r}; its top-level modules are "
                             f"{children}") from None
    frozen = {id(p) for module in modules for p in module.parameters()}
    if names and all(id(p) in frozen for p in model.parameters() if p.requires_grad):
        raise ValueError(f"train.freeze {list(names)} leaves no parameter of {type(model).__name__} to train")
    for module in modules:
        module.requires_grad_(False)
    return modules
