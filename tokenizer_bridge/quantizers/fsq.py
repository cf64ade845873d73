"""Finite scalar quantization (FSQ, Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Each of the ``len(levels)`` channels is squashed into a bounded interval and rounded to one of ``levels[i]`` values;
the implicit codebook is the product grid, ``codebook_size = prod(levels)``. There is no codebook to learn and no
auxiliary loss. Ids are the mixed-radix integer of the per-channel level indices, **channel 0 least significant**:
``id = d_0 + L_0 * (d_1 + L_1 * (d_2 + ...))``. Consecutive channel groups therefore map to sub-tokens with
:func:`split_ids` / :func:`merge_ids` (see :meth:`FiniteScalarQuantizer.sub_token_factors`).

Also holds the mixed-radix id helpers and size-safe usage metrics shared with the LFQ quantizer.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from .base import Quantizer, usage_metrics

# Above this many codes the dense bincount of ``usage_metrics`` is replaced by ``torch.unique`` over the batch.
DENSE_USAGE_MAX_CODES = 1 << 20


def code_usage_metrics(ids: torch.Tensor, codebook_size: int) -> dict:
    """:func:`~tokenizer_bridge.quantizers.base.usage_metrics` that never allocates ``codebook_size`` counters."""
    if codebook_size <= DENSE_USAGE_MAX_CODES:
        return usage_metrics(ids, codebook_size)
    _, counts = torch.unique(ids.reshape(-1), return_counts=True)
    probs = counts.double() / max(ids.numel(), 1)
    entropy = -(probs * probs.log()).sum()
    return {"perplexity": float(entropy.exp()), "codebook_usage": counts.numel() / codebook_size}


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs are quantized in float32 (level grids and entropies need it); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_factors(factors: Sequence[int]) -> list[int]:
    factors = [int(f) for f in factors]
    if not factors or any(f < 1 for f in factors):
        raise ValueError(f"factors must be a non-empty list of positive integers, got {factors}")
    return factors


def split_ids(ids: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Mixed-radix split of ids ``(...)`` in ``[0, prod(factors))`` into sub-ids ``(..., len(factors))``.

    Sub-id ``j`` lies in ``[0, factors[j])``; sub-id 0 holds the least significant digits. For LFQ with
    ``factors=[2**9, 2**9]`` sub-id 0 is bits 0-8 (channels 0-8) and sub-id 1 bits 9-17.
    """
    factors = _check_factors(factors)
    ids = torch.as_tensor(ids)
    total = math.prod(factors)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= total):
        got = f"[{int(ids.min())}, {int(ids.max())}]"
        raise ValueError(f"ids must lie in [0, {total}) to split by {factors}, got {got}")
    digits, rest = [], ids.long()
    for f in factors:
        digits.append(rest % f)
        rest = rest // f
    return torch.stack(digits, dim=-1)


def merge_ids(sub_ids: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`split_ids`: ``(..., len(factors))`` sub-ids -> ids ``(...)``."""
    factors = _check_factors(factors)
    sub_ids = torch.as_tensor(sub_ids).long()
    if sub_ids.shape[-1] != len(factors):
        raise ValueError(f"sub_ids have {sub_ids.shape[-1]} parts but {len(factors)} factors were given")
    bounds = torch.tensor(factors, device=sub_ids.device)
    if sub_ids.numel() and ((sub_ids < 0).any() or (sub_ids >= bounds).any()):
        raise ValueError(f"sub-id j must lie in [0, factors[j]) for factors {factors}")
    ids = torch.zeros(sub_ids.shape[:-1], dtype=torch.long, device=sub_ids.device)
    for j in reversed(range(len(factors))):
        ids = ids * factors[j] + sub_ids[..., j]
    return ids


def group_products(sizes: Sequence[int], groups: Sequence[int]) -> list[int]:
    """Products of consecutive runs of ``sizes``: ``groups`` gives the run lengths and must sum to ``len(sizes)``."""
    if sum(groups) != len(sizes) or any(g < 1 for g in groups):
        raise ValueError(f"groups {list(groups)} must be positive and sum to {len(sizes)}")
    out, start = [], 0
    for g in groups:
        out.append(math.prod(sizes[start : start + g]))
        start += g
    return out


class FiniteScalarQuantizer(Quantizer):
    """FSQ with tanh bounding and straight-through rounding.

    Args:
        levels: number of values per channel, e.g. ``[8, 8, 8, 5, 5, 5]`` (64,000 codes); each at least 2.
        dim: latent dimension D; when it differs from ``len(levels)`` a linear projection maps D -> ``len(levels)``
            before quantization and back after it (``lookup`` then returns projected codes). Defaults to
            ``len(levels)``.
        eps: keeps the bounded values strictly inside the outermost rounding interval.

    Quantized channel values are ``k / (L // 2)`` for integers ``k`` in ``[-(L // 2), L - 1 - L // 2]``: odd ``L``
    gives a grid symmetric around 0 and spanning [-1, 1]; even ``L`` uses the paper's half-step offset so that ``L``
    integers are reachable, e.g. ``L = 4`` -> ``{-1, -0.5, 0, 0.5}``.
    """

    def __init__(self, levels: Sequence[int], dim: Optional[int] = None, eps: float = 1e-3):
        super().__init__()
        levels = [int(level) for level in levels]
        if not levels or any(level < 2 for level in levels):
            raise ValueError(f"levels must be a non-empty list of integers >= 2, got {levels}")
        self.levels, self.eps = levels, eps
        self.dim = dim if dim is not None else len(levels)
        self.codebook_size = math.prod(levels)
        project = self.dim != len(levels)
        self.project_in = nn.Linear(self.dim, len(levels)) if project else nn.Identity()
        self.project_out = nn.Linear(len(levels), self.dim) if project else nn.Identity()
        self.init_derived_buffers()

    def derived_buffers(self) -> dict[str, torch.Tensor]:
        levels, eps = self.levels, self.eps
        level_t = torch.tensor(levels, dtype=torch.float64)
        radix = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))], dtype=torch.long)
        # Bounding constants in float64, then float32: half_l keeps bound(z) inside (-L/2, L/2) shifted by offset.
        half_l = (level_t - 1) * (1 - eps) / 2
        offset = torch.where(level_t.remainder(2) == 0, 0.5, 0.0)
        # atanh (the paper's code has tan) makes bound(0) == 0 exactly. For L = 2 no shift can do that (0 is a rounding
        # boundary, not a level): shift 0 puts the decision at z = 0 instead.
        ratio = offset / half_l
        shift = torch.where(ratio < 1, torch.atanh(ratio.clamp(max=0.5)), 0.0)
        return {
            "_half_l": half_l.float(),
            "_offset": offset.float(),
            "_shift": shift.float(),
            "_half_width": (level_t // 2).float(),
            "_levels": torch.tensor(levels, dtype=torch.long),
            "_radix": radix,
        }

    def sub_token_factors(self, groups: Sequence[int]) -> list[int]:
        """Sub-token sizes for :func:`split_ids` when consecutive channel groups of sizes ``groups`` form one
        sub-token each, e.g. levels ``[8, 8, 8, 5, 5, 5]`` with ``groups=[3, 3]`` -> ``[512, 125]``."""
        return group_products(self.levels, groups)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash ``z (M, C)`` so that rounding yields exactly ``L`` integers per channel."""
        return torch.tanh(z + self._shift) * self._half_l - self._offset

    def quantize_flat(self, flat: torch.Tensor):
        z = self.bound(at_least_float32(self.project_in(flat)))  # (M, C)
        rounded = torch.round(z)
        ids = ((rounded + self._half_width).long() * self._radix).sum(dim=1)  # (M,)
        # rounded + (z - sg(z)) equals `rounded` bit for bit (unlike z + sg(rounded - z)) and passes the gradient.
        codes = (rounded + (z - z.detach())) / self._half_width
        quantized = self.project_out(codes.to(self._weight_dtype(flat)))
        loss = flat.new_zeros((), dtype=torch.float32)
        return quantized, ids, loss, code_usage_metrics(ids, self.codebook_size)

    def lookup_flat(self, ids: torch.Tensor) -> torch.Tensor:
        digits = (ids.unsqueeze(1) // self._radix) % self._levels  # (M, C)
        codes = (digits.to(self._half_width.dtype) - self._half_width) / self._half_width
        return self.project_out(codes.to(self._weight_dtype(codes)))

    def _weight_dtype(self, fallback: torch.Tensor) -> torch.dtype:
        return self.project_out.weight.dtype if isinstance(self.project_out, nn.Linear) else fallback.dtype
