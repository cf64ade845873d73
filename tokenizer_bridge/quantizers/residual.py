"""Residual quantization: L levels, each quantizing what the levels before it left over.

Follows SoundStream's residual VQ (Zeghidour et al. 2021) and RQ-VAE (Lee et al. 2022): level ``l`` quantizes the
residual ``r_{l-1} = x - (q_1 + ... + q_{l-1})``, so the sum of the first ``n`` codes approximates ``x`` ever more
closely and ``image_ids`` carry a trailing level axis, ``(B, h, w, L)`` or ``(B, N, L)``. Any single-level
:class:`~tokenizer_bridge.quantizers.base.Quantizer` can serve as a level (VQ, FSQ, LFQ, unified codebook); the levels
either share one module (one codebook reused at every depth, as in RQ-VAE) or own one each.

Gradients. Each level sees the residual with the earlier codes detached, so every level's commitment loss pulls the
encoder output towards its partial sum (RQ-VAE's depth-wise commitment loss); the returned ``quantized`` is the
straight-through estimate ``x + sg(sum_l q_l - x)``, so the reconstruction gradient reaches the encoder unchanged.

Quantizer dropout (SoundStream, section 3.3): in training, each *sample* independently is, with probability
``quantizer_dropout``, reconstructed from only its first ``n ~ U{1..L}`` levels, so the decoder learns to decode any
prefix of levels (``lookup(image_ids, levels=n)``). Every level is still computed for every sample — all codebooks
keep training and ``image_ids`` always hold all L levels; only the ``quantized`` output drops the deeper codes.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .base import (
    Quantizer,
)

QuantizerSpec = Union[Quantizer, Callable[[], Quantizer], Sequence[Quantizer]]


class ResidualQuantizer(Quantizer):
    """Residual quantizer over ``num_levels`` single-level quantizers.

    Args:
        quantizer: what quantizes one level — a factory ``() -> Quantizer`` (called once per level, or once when
            ``shared_codebook``), a list of quantizer instances (one per level; ``num_levels`` may be omitted), or a
            single instance (reused at every level: needs ``shared_codebook=True``).
        num_levels: number of levels L (required unless a list is given).
        shared_codebook: one quantizer module (and so one codebook) for every level.
        quantizer_dropout: per-sample probability, in training, of using only a random prefix of the levels.

    All levels must have the same ``dim`` and ``codebook_size`` (``codebook_size`` is the per-level size).
    """

    def __init__(
        self,
        quantizer: QuantizerSpec,
        num_levels: Optional[int] = None,
        shared_codebook: bool = False,
        quantizer_dropout: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= quantizer_dropout <= 1.0:
            raise ValueError(f"quantizer_dropout must lie in [0, 1], got {quantizer_dropout}")
        levels = _build_levels(quantizer, num_levels, shared_codebook)
        _check_levels_match(levels)
        unique: list[Quantizer] = []
        for q in levels:
            if not any(q is u for u in unique):
                unique.append(q)
        self.quantizers = nn.ModuleList(unique)
        self.level_index = [next(i for i, u in enumerate(unique) if u is q) for q in levels]  # level -> module
        self.num_levels, self.quantizer_dropout = len(levels), quantizer_dropout
        self.dim, self.codebook_size = levels[0].dim, levels[0].codebook_size

    @property
    def shared_codebook(self) -> bool:
        return len(self.quantizers) == 1 and self.num_levels > 1

    def level_quantizer(self, level: int) -> Quantizer:
        """The module quantizing level ``level`` (the same object for every level when the codebook is shared)."""
        return self.quantizers[self.level_index[level]]

    # ------------------------------------------------------------------ forward
    def flat_options(self, flat: torch.Tensor, key: tuple) -> dict:
        """The levels each row keeps under quantizer dropout (see :meth:`quantize_flat`)."""
        return {"active_levels": self._sample_active_levels(batch=key[1], rows=flat.shape[0], device=flat.device)}

    def _sample_active_levels(self, batch: int, rows: int, device) -> Optional[torch.Tensor]:
        """Levels each row decodes from ``(M,)`` under quantizer dropout, or None (all levels)."""
        if not self.training or self.quantizer_dropout == 0 or rows == 0:
            return None
        prefix = torch.randint(1, self.num_levels + 1, (batch,), device=device)  # (B,)
        dropped = torch.rand(batch, device=device) < self.quantizer_dropout
        per_sample = torch.where(dropped, prefix, torch.full_like(prefix, self.num_levels))
        return per_sample.repeat_interleave(rows // batch)  # rows are sample-major after flatten_latents

    def quantize_flat(self, flat: torch.Tensor, active_levels: Optional[torch.Tensor] = None):
        """Quantize ``flat (M, D)`` level by level; ``active_levels (M,)`` masks the output to a prefix per row.

        Returns ``(quantized (M, D), ids (M, L), loss, metrics)``; ids are ``(M,)`` when L == 1.
        """
        residual, total = flat, torch.zeros_like(flat)  # (M, D) each
        ids, loss, metrics = [], flat.new_zeros(()), {}
        x_energy = flat.detach().pow(2).mean().clamp_min(1e-12)
        for level in range(self.num_levels):
            q, level_ids, level_loss, level_metrics = self.level_quantizer(level).quantize_flat(residual)
            q = q.detach()
            keep = 1.0 if active_levels is None else (active_levels > level).unsqueeze(1).to(q.dtype)
            total = total + q * keep
            residual = residual - q  # earlier codes are constants for the deeper levels
            ids.append(level_ids)
            loss = loss + level_loss
            metrics.update({f"level{level}/{name}": value for name, value in (level_metrics or {}).items()})
            metrics[f"level{level}/loss"] = float(level_loss.detach() if torch.is_tensor(level_loss) else level_loss)
            metrics[f"level{level}/residual_error"] = float(residual.detach().pow(2).mean() / x_energy)
        metrics.update(_mean_over_levels(metrics, self.num_levels))
        if active_levels is not None:
            metrics["active_levels"] = float(active_levels.float().mean())
        quantized = flat + (total - flat).detach()  # straight-through estimator
        ids = torch.stack(ids, dim=1)  # (M, L)
        return quantized, (ids[:, 0] if self.num_levels == 1 else ids), loss, metrics

    # ------------------------------------------------------------------ lookup
    def lookup(
        self, image_ids: torch.Tensor, channels_first: bool = True, levels: Optional[int] = None
    ) -> torch.Tensor:
        """Sum of the code vectors of ``image_ids`` ``(B, h, w, L)`` -> ``(B, D, h, w)`` (``(B, N, L)`` ->
        ``(B, N, D)``); ``levels=n`` decodes from the first ``n`` levels only."""
        n = self._check_prefix(levels)
        image_ids = self.check_image_ids(image_ids)
        vectors = self.lookup_flat(image_ids.reshape(-1, self.num_levels), levels=n)  # (M, D)
        positions = image_ids.shape[:-1] if self.num_levels > 1 else image_ids.shape
        return self.shape_like_ids(vectors, positions, channels_first)

    def lookup_flat(self, ids: torch.Tensor, levels: Optional[int] = None) -> torch.Tensor:
        ids = ids.unsqueeze(1) if ids.dim() == 1 else ids  # (M, L)
        n = self._check_prefix(levels)
        vectors = self.level_quantizer(0).lookup_flat(ids[:, 0])
        for level in range(1, n):
            vectors = vectors + self.level_quantizer(level).lookup_flat(ids[:, level])
        return vectors

    def _check_prefix(self, levels: Optional[int]) -> int:
        if levels is None:
            return self.num_levels
        if not 1 <= int(levels) <= self.num_levels:
            raise ValueError(f"levels must lie in [1, {self.num_levels}], got {levels}")
        return int(levels)


def _build_levels(quantizer: QuantizerSpec, num_levels: Optional[int], shared: bool) -> list[Quantizer]:
    """One quantizer per level (the same object repeated when shared)."""
    if isinstance(quantizer, nn.Module) and not isinstance(quantizer, nn.ModuleList):
        if not shared:
            raise ValueError(
                "a single quantizer instance can only be shared across levels: pass shared_codebook=True, or a "
                "factory / a list of instances for separate codebooks"
            )
        return [quantizer] * _require_levels(num_levels)
    if isinstance(quantizer, (list, tuple, nn.ModuleList)):
        levels = list(quantizer)
        if shared:
            raise ValueError("shared_codebook=True takes one quantizer instance or a factory, not a list")
        if not levels:
            raise ValueError("the list of level quantizers is empty")
        if num_levels is not None and num_levels != len(levels):
            raise ValueError(f"num_levels={num_levels} but {len(levels)} level quantizers were given")
        return levels
    if callable(quantizer):
        n = _require_levels(num_levels)
        if shared:
            return [quantizer()] * n
        return [quantizer() for _ in range(n)]
    raise TypeError(f"quantizer must be a Quantizer, a list of them or a factory, got {type(quantizer).__name__}")


def _require_levels(num_levels: Optional[int]) -> int:
    if num_levels is None or int(num_levels) < 1:
        raise ValueError(f"num_levels must be a positive integer, got {num_levels}")
    return int(num_levels)


def _check_levels_match(levels: list) -> None:
    for level, q in enumerate(levels):
        if not isinstance(q, Quantizer):
            raise TypeError(f"level {level} is a {type(q).__name__}, not a Quantizer")
        if q.num_levels != 1:
            raise ValueError(f"level {level} is itself a {q.num_levels}-level quantizer; levels must be single-level")
    sizes, dims = [q.codebook_size for q in levels], [q.dim for q in levels]
    if len(set(sizes)) > 1:
        raise ValueError(f"all levels must have the same codebook size, got {sizes}")
    if len(set(dims)) > 1:
        raise ValueError(f"all levels must have the same dim, got {dims}")


def _mean_over_levels(metrics: dict, num_levels: int) -> dict:
    """Totals: each per-level metric that every level reports, averaged over levels."""
    totals = {}
    for name in {key.split("/", 1)[1] for key in metrics if key.startswith("level0/")} - {"loss", "residual_error"}:
        values = [metrics.get(f"level{level}/{name}") for level in range(num_levels)]
        if all(isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1) for v in values):
            totals[name] = sum(float(v) for v in values) / num_levels
    totals["residual_error"] = metrics[f"level{num_levels - 1}/residual_error"]  # what all levels leave over
    return totals
