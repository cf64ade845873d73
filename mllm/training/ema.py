"""An exponential moving average of a model's trainable weights (``train.ema_decay``), as tokenizer papers evaluate
with (VQGAN-style trainers, Open-MAGVIT2, LlamaGen keep EMA weights for evaluation).

The average is kept in float32 on the parameters' device and updated after every optimizer step; its decay warms up
as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the first steps do not pin the average to the random
initial weights. Buffers (running statistics, EMA codebooks of VQ quantizers) are not averaged: the model's own are
used. :meth:`WeightEMA.swapped_in` puts the averaged weights into the model for saving or evaluation and restores the
raw ones afterwards; :meth:`state_dict` is plain tensors (saved as safetensors, never a pickle).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class WeightEMA:
    """The moving average of ``model``'s trainable parameters."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must lie in (0, 1) (e.g. 0.999), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), weight)
        self.updates += 1

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """``model`` holding the averaged weights inside the block, its raw weights again after it."""
        params = dict(model.named_parameters())
        raw = {name: params[name].detach().clone() for name in self.shadow}
        with torch.no_grad():
            for name, value in self.shadow.items():
                params[name].copy_(value.to(params[name].dtype))
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in raw.items():
                    params[name].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"shadow.{k}": v.contiguous() for k, v in self.shadow.items()},
                "updates": torch.tensor(self.updates, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        names = {k[len("shadow."):] for k in state if k.startswith("shadow.")}
        if names != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - names), sorted(names - set(self.shadow))
            raise ValueError(f"the saved EMA weights do not match the model (missing {missing[:5]}, unexpected "
                             f"{extra[:5]})")
        for name in names:
            self.shadow[name].copy_(state[f"shadow.{name}"])
        self.updates = int(state["updates"])
