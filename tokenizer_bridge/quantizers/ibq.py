"""Index Backpropagation Quantization (IBQ; Shi et al. 2024, "Taming Scalable Visual Tokenizer for Autoregressive
Image Generation").

A latent ``x`` takes the code with the largest logit ``x . c`` (the hard one-hot of ``argmax softmax(x C^T)``), but
the backward pass goes through the soft assignment: the output is ``(hard - sg(s) + s) @ C`` with
``s = softmax(x C^T / T)``, so *every* code receives gradient at every step and large codebooks stay in use.
An optional entropy regulariser (as in MAGVIT-2, Yu et al. 2024, and IBQ) makes each latent's code distribution
confident and the batch-average distribution spread out.

A direct implementation holds the ``N x K`` softmax for the backward pass. Here the soft path and the regulariser
are custom autograd Functions that walk row chunks in forward and recompute each chunk's softmax in backward, so
memory is ``O(chunk x K)`` for any N (the chunk comes from a ``tile_elements`` budget, like
:func:`~tokenizer_bridge.quantizers.base.nearest_codes`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import DEFAULT_TILE_ELEMENTS, Quantizer, nearest_codes, usage_metrics

# Floor for the batch-average code probabilities inside the log (codes nobody picks would give 0 * log 0).
ENTROPY_EPS = 1e-12


def softmax_backward(probs: torch.Tensor, grad_probs: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. the logits of ``probs = softmax(logits)`` given ``grad_probs`` (both ``(rows, K)``)."""
    return probs * (grad_probs - (probs * grad_probs).sum(1, keepdim=True))


class IndexBackprop(torch.autograd.Function):
    """``C[ids]`` in forward; in backward, the gradient of ``(hard - sg(s) + s) @ C`` with
    ``s = softmax(x C^T / T)``, recomputed ``rows`` rows at a time.

    Gradients: the codebook gets ``hard^T g`` (the picked codes) plus ``dl^T x``; the latents get ``dl C``, where
    ``dl = softmax_backward(s, g C^T) / T`` is the gradient w.r.t. the logits.
    """

    @staticmethod
    def forward(ctx, x, codebook, ids, temperature: float, rows: int):
        ctx.save_for_backward(x, codebook, ids)
        ctx.temperature, ctx.rows = temperature, rows
        return codebook[ids]  # (N, D)

    @staticmethod
    def backward(ctx, grad):
        x, codebook, ids = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        grad_codebook = torch.zeros_like(codebook).index_add_(0, ids, grad)  # hard one-hot path
        for r0 in range(0, x.shape[0], ctx.rows):
            xs, g = x[r0 : r0 + ctx.rows], grad[r0 : r0 + ctx.rows]
            probs = torch.softmax(xs @ codebook.t() / ctx.temperature, dim=1)  # (rows, K)
            dlogits = softmax_backward(probs, g @ codebook.t()).div_(ctx.temperature)  # (rows, K)
            grad_x[r0 : r0 + ctx.rows] = dlogits @ codebook
            grad_codebook.addmm_(dlogits.t(), xs)
        return grad_x, grad_codebook, None, None, None


class ChunkedEntropy(torch.autograd.Function):
    """``[mean_i H(p_i), H(mean_i p_i)]`` for ``p_i = softmax(x_i C^T / T)``, ``rows`` rows at a time.

    Forward accumulates the per-sample entropies and the batch-average distribution ``p_bar (K,)`` chunk by chunk;
    backward recomputes each chunk's softmax. With upstream grads ``(a, b)`` the gradient w.r.t. ``p_i`` is
    ``w_i = -(a log p_i + b log p_bar) / N`` (constants drop out of the softmax Jacobian), and the logits get
    ``softmax_backward(p_i, w_i) / T``.
    """

    @staticmethod
    def forward(ctx, x, codebook, temperature: float, rows: int):
        n = x.shape[0]
        sample_sum = x.new_zeros(())
        probs_sum = x.new_zeros(codebook.shape[0])  # (K,)
        for r0 in range(0, n, rows):
            log_probs = torch.log_softmax(x[r0 : r0 + rows] @ codebook.t() / temperature, dim=1)  # (rows, K)
            probs = log_probs.exp()
            sample_sum -= (probs * log_probs).sum()
            probs_sum += probs.sum(0)
        mean_probs = probs_sum / n
        batch_entropy = -(mean_probs * mean_probs.clamp_min(ENTROPY_EPS).log()).sum()
        ctx.save_for_backward(x, codebook, mean_probs)
        ctx.temperature, ctx.rows = temperature, rows
        return torch.stack([sample_sum / n, batch_entropy])

    @staticmethod
    def backward(ctx, grad):
        x, codebook, mean_probs = ctx.saved_tensors
        n = x.shape[0]
        grad_x, grad_codebook = torch.empty_like(x), torch.zeros_like(codebook)
        batch_term = mean_probs.clamp_min(ENTROPY_EPS).log() * (-grad[1] / n)  # (K,)
        for r0 in range(0, n, ctx.rows):
            xs = x[r0 : r0 + ctx.rows]
            log_probs = torch.log_softmax(xs @ codebook.t() / ctx.temperature, dim=1)  # (rows, K)
            grad_probs = log_probs * (-grad[0] / n) + batch_term
            dlogits = softmax_backward(log_probs.exp(), grad_probs).div_(ctx.temperature)
            grad_x[r0 : r0 + ctx.rows] = dlogits @ codebook
            grad_codebook.addmm_(dlogits.t(), xs)
        return grad_x, grad_codebook, None, None


class IndexBackpropQuantizer(Quantizer):
    """IBQ quantizer: nearest code by inner product, gradients to every code through the softmax.

    Args:
        dim: latent dimension D.
        codebook_size: number of codes K.
        temperature: softmax temperature of the soft assignment that carries the gradients.
        commitment_weight: weight of ``||x - sg(q)||^2``; codebook_weight: weight of ``||sg(x) - q||^2`` (hard codes).
        double_quant_weight: weight of ``||x - quantized||^2`` through the index-backprop output (the reference
            implementation's third term: it sends the quantization error to every code via the softmax); 0 disables.
        entropy_weight: weight of ``mean H(p_i) - H(mean p_i)`` (confident per latent, diverse per batch); 0 disables.
        entropy_temperature: softmax temperature of that regulariser.
        tile_elements: memory budget in ``rows x K`` elements per chunk, for the search and the soft path alike.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        temperature: float = 1.0,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        double_quant_weight: float = 1.0,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
        tile_elements: int = DEFAULT_TILE_ELEMENTS,
    ):
        super().__init__()
        if temperature <= 0 or entropy_temperature <= 0:
            raise ValueError(f"temperatures must be positive, got {temperature} and {entropy_temperature}")
        self.dim, self.codebook_size = dim, codebook_size
        self.temperature, self.entropy_temperature = temperature, entropy_temperature
        self.commitment_weight, self.codebook_weight = commitment_weight, codebook_weight
        self.double_quant_weight, self.entropy_weight = double_quant_weight, entropy_weight
        self.tile_elements = tile_elements
        self.codebook = nn.Parameter(torch.randn(codebook_size, dim) / dim**0.5)  # (K, D)

    @property
    def chunk_size(self) -> int:
        """Rows per chunk of the soft path: ``chunk_size x K`` stays within ``tile_elements``."""
        return max(1, self.tile_elements // self.codebook_size)

    def lookup_flat(self, ids: torch.Tensor) -> torch.Tensor:
        return self.codebook[ids]

    def quantize_flat(self, flat: torch.Tensor):
        codebook = self.codebook
        # argmax_k x.c_k == argmin_k (0 - 2 x.c_k): the tiled nearest-code search with zero code norms.
        zeros = torch.zeros(self.codebook_size, dtype=flat.dtype, device=flat.device)
        ids, _ = nearest_codes(flat.detach(), codebook.detach(), self.tile_elements, codebook_sq_norms=zeros)
        quantized = IndexBackprop.apply(flat, codebook, ids, self.temperature, self.chunk_size)  # (M, D)
        q = codebook[ids]
        loss = self.commitment_weight * F.mse_loss(flat, q.detach())
        loss = loss + self.codebook_weight * F.mse_loss(q, flat.detach())
        if self.double_quant_weight:
            loss = loss + self.double_quant_weight * F.mse_loss(quantized, flat)
        metrics = usage_metrics(ids, self.codebook_size)
        if self.entropy_weight:
            entropies = ChunkedEntropy.apply(flat, codebook, self.entropy_temperature, self.chunk_size)
            loss = loss + self.entropy_weight * (entropies[0] - entropies[1])
            sample_entropy, batch_entropy = entropies.detach().tolist()
            metrics.update(sample_entropy=sample_entropy, batch_entropy=batch_entropy)
        return quantized, ids, loss, metrics
