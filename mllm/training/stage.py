"""What the training loop runs: a :class:`Stage` (model, per-step batch, loss, saver) and the deterministic batch
order every stage uses (the batch of step ``s`` is a function of ``(seed, s)``, sharded across processes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Stage:
    """What the loop needs from a stage: the model, a batch per step, the loss, and how to save the model."""

    model: torch.nn.Module
    batch_for_step: Callable[[int, int, int], dict]  # (step, rank, world) -> batch of tensors
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]  # -> (loss, metrics)
    save_fn: Callable[[torch.nn.Module, str], None]



def shard_indices(indices: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This process's share of a global batch (every rank sees different samples)."""
    return indices[rank::world]



def step_indices(step: int, batch_size: int, num_samples: int, seed: int) -> torch.Tensor:
    """Indices of the global batch for ``step``: epochs are seeded permutations, so any step can be rebuilt."""
    per_epoch = max(1, num_samples // batch_size)
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_samples, generator=g)
    return perm[pos * batch_size : (pos + 1) * batch_size]
