"""Lookup-free quantization (LFQ, MAGVIT-v2: Yu et al. 2023, "Language Model Beats Diffusion") and its spherical
variant (BSQ: Zhao et al. 2024, "Image and Video Tokenization with Binary Spherical Quantization").

A latent of ``bits`` channels is quantized to the sign of each channel: codes are ``{-s, +s}^bits`` with ``s = 1``
(LFQ) or ``s = 1/sqrt(bits)`` after L2-normalising the latent (BSQ), so ``codebook_size = 2**bits`` and no codebook
is stored. Ids are the bits as an integer, **bit i = channel i > 0, channel 0 least significant**; a 2^18 id is two
2^9 sub-ids with :func:`~tokenizer_bridge.quantizers.fsq.split_ids` (sub-id 0 = channels 0-8).

Entropy penalty (MAGVIT-v2): ``mean_x H(p(c|x)) - diversity_weight * H(mean_x p(c|x))`` with
``p(c|x) = softmax_c(-||x - c||^2 / temperature)`` over all ``2**bits`` codes. Because ``||c||^2`` is the same for every
code, ``-||x - c||^2 = 2 x.c + const`` and ``p(c|x) ∝ prod_i exp(2 x_i c_i / temperature)``: the bits are independent
Bernoulli variables with ``P(c_i = +s) = sigmoid(4 s x_i / temperature)``. Hence

- the per-sample entropy is a sum of ``bits`` binary entropies: ``O(N * bits)``;
- the batch-average distribution does not factorize, but every sample's distribution is the outer product of its
  low-half and high-half bit distributions, so ``mean_x p(c|x) = P_lo^T @ P_hi / N`` with ``P_lo (N, 2^lo)`` and
  ``P_hi (N, 2^hi)``: ``entropy_mode="exact"`` computes it with one matmul in ``O(N * 2^(bits/2) + 2^bits)`` memory —
  exact, differentiable by plain autograd, and no ``N x 2^bits`` tensor ever exists;
- ``entropy_mode="factorized"`` replaces the batch entropy by the sum over bits of the entropy of the average bit
  probability, an upper bound (subadditivity of entropy) that costs ``O(N * bits)``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import Quantizer
from .fsq import at_least_float32, code_usage_metrics, group_products

ENTROPY_MODES = ("auto", "exact", "factorized")
# "auto" uses the exact batch entropy up to this many bits (a 2^18 code distribution is 1 MiB), factorized beyond.
EXACT_ENTROPY_MAX_BITS = 18


def bit_logits(x: torch.Tensor, scale: float, temperature: float) -> torch.Tensor:
    """Logit of ``P(bit_i = 1 | x)`` under ``softmax(-||x - c||^2 / temperature)`` over codes ``{-scale, +scale}^b``."""
    return x * (4.0 * scale / temperature)


def binary_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of Bernoulli(sigmoid(logits)), elementwise and stable for large |logits|."""
    p = torch.sigmoid(logits)
    return p * F.softplus(-logits) + (1 - p) * F.softplus(logits)


def per_sample_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``H(p(c|x))`` over all ``2**b`` codes for bit logits ``(N, b)`` -> ``(N,)``."""
    return binary_entropy(logits).sum(dim=1)


def _bit_table(bits: int, like: torch.Tensor) -> torch.Tensor:
    """``(2**bits, bits)`` table of the bits of every integer (bit 0 least significant), dtype/device of ``like``."""
    ints = torch.arange(1 << bits, device=like.device)
    return ((ints.unsqueeze(1) >> torch.arange(bits, device=like.device)) & 1).to(like.dtype)


def _group_probs(logits: torch.Tensor) -> torch.Tensor:
    """Joint probabilities of the bit patterns of ``logits (N, g)`` -> ``(N, 2**g)``; column = pattern as integer."""
    table = _bit_table(logits.shape[1], logits)  # (2^g, g)
    # log P(pattern) = sum_i [bit_i log sig(l_i) + (1 - bit_i) log sig(-l_i)], as two small matmuls.
    log_p = F.logsigmoid(logits) @ table.t() + F.logsigmoid(-logits) @ (1 - table).t()
    return log_p.exp()


def code_distribution(logits: torch.Tensor) -> torch.Tensor:
    """Exact ``mean_x p(c|x)`` over all ``2**b`` codes for bit logits ``(N, b)`` -> ``(2**b,)``, index = code id."""
    low = logits.shape[1] // 2
    p_low = _group_probs(logits[:, :low])  # (N, 2^low)
    p_high = _group_probs(logits[:, low:])  # (N, 2^(b-low))
    # id = low_bits + 2^low * high_bits, so the (high, low) matrix flattened row-major is in id order.
    return (p_high.t() @ p_low).reshape(-1) / logits.shape[0]


def entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-30).log()).sum()


def batch_entropy(logits: torch.Tensor, mode: str = "exact") -> torch.Tensor:
    """``H(mean_x p(c|x))`` (``mode="exact"``) or its per-bit upper bound (``mode="factorized"``)."""
    if mode == "exact":
        return entropy(code_distribution(logits))
    if mode == "factorized":
        p = torch.sigmoid(logits).mean(dim=0)  # (b,) average probability of each bit being 1
        return -(p * p.clamp_min(1e-30).log() + (1 - p) * (1 - p).clamp_min(1e-30).log()).sum()
    raise ValueError(f"entropy mode must be 'exact' or 'factorized', got {mode!r}")


class LookupFreeQuantizer(Quantizer):
    """LFQ / BSQ with straight-through sign quantization, commitment loss and the MAGVIT-v2 entropy penalty.

    Args:
        bits: number of binary channels b; ``codebook_size = 2**bits``.
        dim: latent dimension D; when it differs from ``bits`` a linear projection maps D -> ``bits`` before
            quantization and back after it (``lookup`` then returns projected codes). Defaults to ``bits``.
        spherical: BSQ — L2-normalise the (projected) latent and quantize to ``±1/sqrt(bits)``.
        commitment_weight: weight of ``||x - sg(q)||^2`` (mean over elements).
        entropy_weight: weight of the entropy penalty (computed in training mode only; 0 disables it).
        diversity_weight: weight of the batch-entropy term inside the penalty (MAGVIT-v2's gamma).
        temperature: softmax temperature of ``p(c|x)``.
        entropy_mode: ``"exact"``, ``"factorized"`` or ``"auto"`` (exact up to 18 bits).
    """

    def __init__(
        self,
        bits: int,
        dim: Optional[int] = None,
        spherical: bool = False,
        commitment_weight: float = 0.25,
        entropy_weight: float = 0.1,
        diversity_weight: float = 1.0,
        temperature: float = 0.01,
        entropy_mode: str = "auto",
    ):
        super().__init__()
        if not 1 <= bits <= 62:
            raise ValueError(f"bits must lie in [1, 62] so that ids fit int64, got {bits}")
        if entropy_mode not in ENTROPY_MODES:
            raise ValueError(f"entropy_mode must be one of {ENTROPY_MODES}, got {entropy_mode!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.bits, self.spherical = bits, spherical
        self.dim = dim if dim is not None else bits
        self.codebook_size = 1 << bits
        self.scale = bits**-0.5 if spherical else 1.0
        self.commitment_weight, self.entropy_weight = commitment_weight, entropy_weight
        self.diversity_weight, self.temperature = diversity_weight, temperature
        if entropy_mode == "auto":
            entropy_mode = "exact" if bits <= EXACT_ENTROPY_MAX_BITS else "factorized"
        self.entropy_mode = entropy_mode
        project = self.dim != bits
        self.project_in = nn.Linear(self.dim, bits) if project else nn.Identity()
        self.project_out = nn.Linear(bits, self.dim) if project else nn.Identity()
        self.init_derived_buffers()

    def derived_buffers(self) -> dict[str, torch.Tensor]:
        return {"_powers": 2 ** torch.arange(self.bits, dtype=torch.long)}

    def sub_token_factors(self, groups: list[int]) -> list[int]:
        """Sub-token sizes for :func:`split_ids` when consecutive bit groups of sizes ``groups`` form one sub-token
        each, e.g. 18 bits with ``groups=[9, 9]`` -> ``[512, 512]``."""
        return group_products([2] * self.bits, groups)

    def prepare(self, flat: torch.Tensor) -> torch.Tensor:
        """Latents ``(M, D)`` -> the ``(M, bits)`` vectors to quantize (projected, BSQ-normalised, >= float32)."""
        x = at_least_float32(self.project_in(flat))
        return F.normalize(x, dim=1) if self.spherical else x

    def entropy_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean per-sample entropy and batch entropy (nats) of ``p(c|x)`` for prepared vectors ``x (M, bits)``."""
        # Entropies of near-deterministic codes need float32: keep autocast from running the matmuls in half precision.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = bit_logits(at_least_float32(x), self.scale, self.temperature)
            return per_sample_entropy(logits).mean(), batch_entropy(logits, self.entropy_mode)

    def quantize_flat(self, flat: torch.Tensor):
        x = self.prepare(flat)  # (M, b)
        positive = x > 0
        ids = (positive.long() * self._powers).sum(dim=1)  # (M,)
        q = torch.where(positive, self.scale, -self.scale).to(x.dtype)
        loss = self.commitment_weight * F.mse_loss(x, q)
        metrics = code_usage_metrics(ids, self.codebook_size)
        if self.training and self.entropy_weight > 0:
            sample_h, batch_h = self.entropy_terms(x)
            loss = loss + self.entropy_weight * (sample_h - self.diversity_weight * batch_h)
            metrics.update(per_sample_entropy=float(sample_h.detach()), batch_entropy=float(batch_h.detach()))
        # q + (x - sg(x)) keeps the exact ±s values and passes the gradient straight through.
        quantized = self.project_out((q + (x - x.detach())).to(self._weight_dtype(flat)))
        return quantized, ids, loss, metrics

    def lookup_flat(self, ids: torch.Tensor) -> torch.Tensor:
        positive = (ids.unsqueeze(1) & self._powers) != 0  # (M, b)
        q = torch.where(positive, self.scale, -self.scale)
        return self.project_out(q.to(self._weight_dtype(q)))

    def _weight_dtype(self, fallback: torch.Tensor) -> torch.dtype:
        return self.project_out.weight.dtype if isinstance(self.project_out, nn.Linear) else fallback.dtype
