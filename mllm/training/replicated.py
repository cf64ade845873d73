"""A second trained model kept outside DeepSpeed: the GAN discriminator of a tokenizer trained under ZeRO-1/2.

accelerate gives one DeepSpeed engine per ``Accelerator`` and refuses a second model in ``prepare``. A discriminator
is small (a PatchGAN at 256 px has ~2.8M parameters), so the loop keeps it as a plain module on every process, as
data parallelism would: the loss of each micro-batch is divided by the accumulation, gradients are averaged over the
processes with one ``all_reduce`` per parameter on the last micro-batch, then clipped and stepped. The generator stays
the engine's (sharded optimizer states and gradients).

Its weights and AdamW state are saved by the loop into ``checkpoint-N/adversary/`` as two safetensors files (the
optimizer's non-tensor fields as JSON metadata), so a resume is exact and no pickle is written or read.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """An optimizer's ``state_dict`` as flat tensors ``state.<param>.<key>`` and string metadata (the param groups
    and any non-tensor state as JSON)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}


def optimizer_state(tensors: dict, metadata: dict) -> dict:
    """The inverse of :func:`optimizer_tensors`: a ``state_dict`` for ``optimizer.load_state_dict``."""
    state: dict = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in json.loads(metadata["scalars"]).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = json.loads(metadata["param_groups"])
    for group in groups:  # JSON made the tuples (AdamW's betas) lists
        for key, value in group.items():
            if key != "params" and isinstance(value, list):
                group[key] = tuple(value)
    return {"state": state, "param_groups": groups}


class ReplicatedModel:
    """``module`` and its ``optimizer`` trained on every process with averaged gradients, outside any engine."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        self.module, self.optimizer = module.to(device), optimizer

    @staticmethod
    def world() -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def update(self, loss: torch.Tensor, accumulation: int, sync: bool, grad_clip: Optional[float]) -> None:
        """Backward of one micro-batch's ``loss``; on the last one (``sync``) average, clip and step."""
        (loss / accumulation if accumulation > 1 else loss).backward()
        if not sync:
            return
        params = [p for p in self.module.parameters() if p.grad is not None]
        world = self.world()
        if world > 1:
            for p in params:
                dist.all_reduce(p.grad)
                p.grad.div_(world)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        save_file(state, os.path.join(folder, WEIGHTS))
        tensors, metadata = optimizer_tensors(self.optimizer)
        save_file(tensors, os.path.join(folder, OPTIMIZER), metadata=metadata)

    def load(self, folder: str) -> None:
        weights, optimizer = os.path.join(folder, WEIGHTS), os.path.join(folder, OPTIMIZER)
        if not (os.path.isfile(weights) and os.path.isfile(optimizer)):
            raise FileNotFoundError(f"{folder} lacks {WEIGHTS} or {OPTIMIZER}: this checkpoint was not written by a "
                                    "DeepSpeed run with an adversary (resume it under the accelerate config it was "
                                    "trained with)")
        device = next(self.module.parameters()).device
        self.module.load_state_dict(load_file(weights, device=str(device)))
        from safetensors import safe_open

        with safe_open(optimizer, "pt", device="cpu") as f:  # load_state_dict moves them
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        self.optimizer.load_state_dict(optimizer_state(tensors, metadata))
