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

from .base import Quantizer, nearest_codes, usage_metrics

# Floor for the batch-average code probabilities inside the log (codes nobody picks would give 0 * log 0).
ENTROPY_EPS = 1e-12
# Default rows x K budget of the soft path's chunks (256 MB of float32 per block).
SOFT_TILE_ELEMENTS = 1 << 26


def softmax_backward_(probs: torch.Tensor, grad_probs: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. the logits of ``probs = softmax(logits)`` given ``grad_probs`` (both ``(rows, K)``), written
    into ``grad_probs`` (no other ``rows x K`` temporary)."""
    dot = torch.einsum("rk,rk->r", probs, grad_probs).unsqueeze(1)  # (rows, 1)
    return grad_probs.sub_(dot).mul_(probs)


class IndexBackprop(torch.autograd.Function):
    """IBQ's soft path and, optionally, its entropy regulariser, in one pass over row chunks that share the logits.

    Forward returns ``C[ids]`` (N, D) and ``[mean_i H(p_i), H(p_bar)]`` for ``p_i = softmax(x_i C^T / T_e)`` and
    the batch average ``p_bar`` (zeros when ``with_entropy`` is false; then forward does no matmul at all).

    Backward recomputes each chunk's logits ``x C^T`` once and sums the logit gradients of both terms:

    - the soft path ``(hard - sg(s) + s) @ C`` with ``s = softmax(logits / T)``: ``softmax_backward(s, g C^T) / T``;
    - the entropy with upstream grads ``(a, b)``: the gradient w.r.t. ``p_i`` is ``w_i = -(a log p_i + b log p_bar) / N``
      (constants drop out of the softmax Jacobian), giving ``softmax_backward(p_i, w_i) / T_e``;

    then the latents get ``dlogits C`` and the codebook ``dlogits^T x`` plus ``hard^T g`` (the picked codes). Per
    chunk that is four ``rows x K x D`` matmuls in backward (one more in forward with the entropy) and a few
    ``rows x K`` blocks of memory.
    """

    @staticmethod
    def forward(ctx, x, codebook, ids, temperature: float, entropy_temperature: float, with_entropy: bool, rows: int):
        n = x.shape[0]
        sample_sum = x.new_zeros(())
        probs_sum = x.new_zeros(codebook.shape[0])  # (K,)
        if with_entropy:
            for r0 in range(0, n, rows):
                log_probs = torch.log_softmax((x[r0 : r0 + rows] @ codebook.t()).div_(entropy_temperature), dim=1)
                probs = log_probs.exp()
                sample_sum -= torch.einsum("rk,rk->", probs, log_probs)
                probs_sum += probs.sum(0)
                del log_probs, probs
        mean_probs = probs_sum / n
        batch_entropy = -(mean_probs * mean_probs.clamp_min(ENTROPY_EPS).log()).sum()
        ctx.save_for_backward(x, codebook, ids, mean_probs)
        ctx.temperature, ctx.entropy_temperature = temperature, entropy_temperature
        ctx.with_entropy, ctx.rows = with_entropy, rows
        return codebook[ids], torch.stack([sample_sum / n, batch_entropy])

    @staticmethod
    def backward(ctx, grad_quantized, grad_entropies):
        x, codebook, ids, mean_probs = ctx.saved_tensors
        n, rows = x.shape[0], ctx.rows
        grad_x = torch.zeros_like(x)
        grad_codebook = torch.zeros_like(codebook)
        soft = grad_quantized is not None
        entropy = ctx.with_entropy and grad_entropies is not None
        if soft:
            grad_codebook.index_add_(0, ids, grad_quantized)  # hard one-hot path
        if entropy:
            sample_scale = float(-grad_entropies[0] / n)
            batch_term = mean_probs.clamp_min(ENTROPY_EPS).log() * (-grad_entropies[1] / n)  # (K,)
        for r0 in range(0, n, rows) if soft or entropy else ():
            xs = x[r0 : r0 + rows]
            logits = xs @ codebook.t()  # (rows, K)
            dlogits = None
            if soft:
                probs = torch.softmax(logits / ctx.temperature, dim=1)
                dlogits = softmax_backward_(probs, grad_quantized[r0 : r0 + rows] @ codebook.t()).div_(ctx.temperature)
                del probs
            if entropy:
                log_probs = torch.log_softmax(logits.div_(ctx.entropy_temperature), dim=1)
                grad_probs = log_probs.mul(sample_scale).add_(batch_term)
                term = softmax_backward_(log_probs.exp_(), grad_probs).div_(ctx.entropy_temperature)
                dlogits = term if dlogits is None else dlogits.add_(term)
                del log_probs, grad_probs, term
            del logits
            grad_x[r0 : r0 + rows] = dlogits @ codebook
            grad_codebook.addmm_(dlogits.t(), xs)
        return grad_x, grad_codebook, None, None, None, None, None


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
            Without it IBQ collapses to a handful of codes in our small-scale runs (``bench/quantizer_quality.py``),
            hence the non-zero default.
        entropy_temperature: softmax temperature of that regulariser.
        tile_elements: memory budget in ``rows x K`` elements per chunk of the soft path and the regulariser (a few
            such blocks are alive at once: 2^26 elements = 256 MB in float32); the nearest-code search additionally
            caps its tiles at a cache-sized block. Small budgets stream the whole codebook through memory for every
            few rows, so keep it large unless memory is tight.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        temperature: float = 1.0,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        double_quant_weight: float = 1.0,
        entropy_weight: float = 0.05,
        entropy_temperature: float = 0.01,
        tile_elements: int = SOFT_TILE_ELEMENTS,
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
        with_entropy = bool(self.entropy_weight) and self.training
        quantized, entropies = IndexBackprop.apply(
            flat, codebook, ids, self.temperature, self.entropy_temperature, with_entropy, self.chunk_size
        )  # (M, D), (2,)
        q = codebook[ids]
        loss = self.commitment_weight * F.mse_loss(flat, q.detach())
        loss = loss + self.codebook_weight * F.mse_loss(q, flat.detach())
        if self.double_quant_weight:
            loss = loss + self.double_quant_weight * F.mse_loss(quantized, flat)
        metrics = usage_metrics(ids, self.codebook_size)
        if with_entropy:
            loss = loss + self.entropy_weight * (entropies[0] - entropies[1])
            sample_entropy, batch_entropy = entropies.detach().tolist()
            metrics.update(sample_entropy=sample_entropy, batch_entropy=batch_entropy)
        return quantized, ids, loss, metrics
