"""What the training loop runs: a :class:`Stage` (model, per-step batch, loss, saver; optionally an :class:`Adversary`
trained against the model, as a GAN discriminator) and the deterministic batch order every stage uses (the batch of
step ``s`` is a function of ``(seed, s)``, sharded across processes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset


@dataclass
class Adversary:
    """A second model trained against the stage's model with its own optimizer, both updated every step (a GAN
    discriminator and its loss).

    Per micro-batch the loop calls ``generator_loss(model, adversary, batch, step) -> (loss, metrics, inputs)`` with
    the adversary unwrapped and its parameters frozen (the model's update; this replaces ``Stage.loss_fn``), then,
    from step ``start`` on, ``adversary(**inputs) -> (loss, metrics)`` (its own update, on the detached ``inputs``).
    Its weights and optimizer go into every checkpoint's ``state/``, never into the saved model; ``config`` (its
    architecture) is written beside them, and a resume builds the adversary with ``build(config)`` from the
    checkpoint's copy.
    """

    model: torch.nn.Module
    generator_loss: Callable[[torch.nn.Module, torch.nn.Module, dict, int], tuple[torch.Tensor, dict, dict]]
    config: dict
    build: Callable[[dict], torch.nn.Module]
    start: int = 0
    lr: float = 1e-4
    betas: tuple = (0.5, 0.9)
    weight_decay: float = 0.0


@dataclass
class Stage:
    """What the loop needs from a stage: the model, a batch per step, the loss, and how to save the model."""

    model: torch.nn.Module
    batch_for_step: Callable[[int, int, int], dict]  # (step, rank, world) -> batch of tensors
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]  # -> (loss, metrics)
    save_fn: Callable[[torch.nn.Module, str], None]
    adversary: Optional[Adversary] = None
    # held-out evaluation every train.eval_every steps: model (eval mode, no grad) -> (metrics, picture or None)
    evaluate_fn: Optional[Callable[[torch.nn.Module], tuple[dict, Any]]] = None
    # A loss that is a sum over items divided by their weight (tokens of an LM loss): batch -> its weight sum. The
    # loop then calls loss_fn(model, micro_batch, normalizer) with the weight sum of the whole step (all micro-batches,
    # all ranks), so accumulation and data parallelism give the gradient of one batch even when micro-batches hold
    # different numbers of tokens (a mean of per-micro-batch means would weigh short ones up).
    loss_weight: Optional[Callable[[dict], torch.Tensor]] = None
    # model -> the trainable parameters its forward may overwrite (a quantizer's k-means init and dead-code restarts):
    # under DeepSpeed ZeRO-1/2 the loop copies such writes into the optimizer's fp32 master weights, which would
    # otherwise overwrite them at the next step
    forward_writes: Optional[Callable[[torch.nn.Module], list]] = None


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


class _StepBatches(Dataset):
    """Steps ``start .. stop - 1`` as a map-style dataset whose item ``i`` is the whole batch of step ``start + i``."""

    def __init__(self, batch_for_step: Callable[[int, int, int], dict], start: int, stop: int, rank: int, world: int):
        self.batch_for_step, self.start, self.stop, self.rank, self.world = batch_for_step, start, stop, rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, i: int) -> dict:
        return self.batch_for_step(self.start + i, self.rank, self.world)


def step_batches(batch_for_step: Callable[[int, int, int], dict], start: int, stop: int, rank: int = 0,
                 world: int = 1, num_workers: int = 0) -> Iterator[dict]:
    """The batches of steps ``start .. stop - 1`` in order, built by ``num_workers`` DataLoader workers ahead of the
    loop (0: in the loop's own process). Each batch is still a function of its step, so the result is the same."""
    if num_workers <= 0:
        return (batch_for_step(step, rank, world) for step in range(start, stop))
    loader = DataLoader(_StepBatches(batch_for_step, start, stop, rank, world), batch_size=None, shuffle=False,
                        num_workers=num_workers, prefetch_factor=2)
    return iter(loader)
