"""Vector quantization (VQ-VAE, van den Oord et al. 2017) with the training aids that make it work in practice.

- Euclidean or cosine distance (cosine: latents and codes are L2-normalised, as in ViT-VQGAN, Yu et al. 2022).
- Learned codebook (codebook + commitment loss) or EMA codebook updates (Razavi et al. 2019), where the codebook gets
  no gradient and moves to the running mean of the latents assigned to it.
- k-means initialisation of the codebook from the first training batch.
- Dead-code restart: codes whose running usage falls below a threshold are re-seeded with random latents of the batch.
- Data-parallel training: with an initialised ``torch.distributed`` process group, hit counts and EMA sums are summed
  over ranks, and k-means centroids and restarted codes come from rank 0, so every rank keeps the same codebook.
- Nearest-code search in bounded-memory tiles (:func:`~tokenizer_bridge.quantizers.base.nearest_codes`).
- Factorized codes (ViT-VQGAN, Yu et al. 2022): latents are projected to a small ``lookup_dim`` where the codebook
  lives and the search runs, and the chosen code is projected back; small lookup spaces raise codebook usage.
- The rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation Trick"): the latent is
  carried onto its code by a rotation and rescaling held constant in the backward pass, so the decoder's gradient
  reaches the encoder rotated by the angle between latent and code instead of being copied unchanged (straight-through).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .base import DEFAULT_TILE_ELEMENTS, Quantizer, nearest_codes, usage_metrics

DISTANCES = ("euclidean", "cosine")
CODEBOOK_UPDATES = ("learned", "ema")


def distributed() -> bool:
    """Whether a multi-process ``torch.distributed`` group is active (statistics must then be shared)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over all ranks (in place; a no-op in a single process)."""
    if distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def from_rank0(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t`` on every rank (in place; a no-op in a single process)."""
    if distributed():
        dist.broadcast(t, src=0)
    return t


# Decay of the per-code usage EMA that drives dead-code restarts (about the last ten batches).
USAGE_DECAY = 0.9


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre is drawn with probability ~ squared distance
    to the nearest centre chosen so far, which avoids two seeds landing in one cluster."""
    first = int(torch.randint(0, x.shape[0], (1,), generator=generator))
    centres = [x[first]]
    nearest = (x - x[first]).pow(2).sum(1)  # (M,)
    for _ in range(1, k):
        weights = nearest.double().cpu()
        pick = int(torch.multinomial(weights, 1, generator=generator)) if weights.sum() > 0 else int(torch.randint(0, x.shape[0], (1,), generator=generator))
        centres.append(x[pick])
        nearest = torch.minimum(nearest, (x - x[pick]).pow(2).sum(1))
    return torch.stack(centres)


# k-means++ seeding is sequential in k; beyond this many codes plain random seeding keeps start-up fast.
KMEANS_PP_MAX_CODES = 4096


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Lloyd's k-means on ``x (M, D)`` -> centroids ``(k, D)``; empty clusters keep their previous centroid."""
    if k <= KMEANS_PP_MAX_CODES:
        centroids = kmeans_plus_plus(x, k, generator)
    else:
        centroids = x[torch.randint(0, x.shape[0], (k,), generator=generator).to(x.device)].clone()
    for _ in range(iters):
        ids, _ = nearest_codes(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, ids, x)
        counts = torch.bincount(ids, minlength=k).unsqueeze(1).to(x.dtype)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    return centroids


def rotate_onto(e: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rotation trick: ``lambda * R @ e`` row-wise, where ``R`` rotates ``e`` onto the direction of ``q`` and
    ``lambda = |q| / |e|``, both held constant (no gradient). Equals ``q`` in value; ``d out / d e = lambda * R``.

    ``R = I - 2 r r^T + 2 q_hat e_hat^T`` with ``r = (e_hat + q_hat) / |e_hat + q_hat|`` is applied without forming a
    ``D x D`` matrix. Rows with ``|e| ~ 0`` fall back to the identity (straight-through).
    """
    with torch.no_grad():
        e_norm, q_norm = e.norm(dim=-1, keepdim=True), q.norm(dim=-1, keepdim=True)  # (M, 1)
        tiny = e_norm < eps
        q_hat = q / q_norm.clamp_min(eps)
        e_hat = torch.where(tiny, q_hat, e / e_norm.clamp_min(eps))  # e_hat = q_hat makes R the identity
        r = F.normalize(e_hat + q_hat, dim=-1, eps=eps)  # antipodal e, q: r = 0 and R e = -e, still correct
        scale = torch.where(tiny, torch.ones_like(e_norm), q_norm / e_norm.clamp_min(eps))
    along_r = (e * r).sum(-1, keepdim=True)
    along_e = (e * e_hat).sum(-1, keepdim=True)
    return scale * (e - 2 * along_r * r + 2 * along_e * q_hat)


class VectorQuantizer(Quantizer):
    """Nearest-neighbour vector quantizer.

    Args:
        dim: latent dimension D.
        codebook_size: number of codes K.
        distance: ``"euclidean"`` or ``"cosine"``.
        codebook_update: ``"learned"`` (gradient) or ``"ema"`` (moving averages, no codebook gradient).
        commitment_weight: weight of ``||x - sg(q)||^2``; codebook_weight: weight of ``||sg(x) - q||^2`` (learned only).
        ema_decay: decay of the EMA statistics.
        kmeans_init: initialise codes by k-means on the first training batch; kmeans_iters: Lloyd iterations.
        dead_code_threshold: restart codes whose usage falls below this fraction of an even share; 0 disables.
            Usage is an EMA (decay ``USAGE_DECAY`` = 0.9, about the last ten batches, independent of ``ema_decay``) of
            each code's hits divided by the average hits per code, so 1 is an even share whatever the batch and
            codebook sizes. A restarted code moves onto a random latent of the batch and gets a grace period of about
            20 batches.
        tile_elements: bound on distance-tile size for the nearest-code search.
        lookup_dim: if set, search in a learned ``lookup_dim``-dimensional projection (codebook ``(K, lookup_dim)``)
            and project the chosen code back to ``dim``; codebook and commitment losses live in the small space.
        rotation_trick: pass gradients to the latents with the rotation trick instead of straight-through; forward
            values are identical.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        distance: str = "euclidean",
        codebook_update: str = "learned",
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        ema_decay: float = 0.99,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 0.04,
        tile_elements: int = DEFAULT_TILE_ELEMENTS,
        lookup_dim: Optional[int] = None,
        rotation_trick: bool = False,
    ):
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if codebook_update not in CODEBOOK_UPDATES:
            raise ValueError(f"codebook_update must be one of {CODEBOOK_UPDATES}, got {codebook_update!r}")
        self.dim, self.codebook_size = dim, codebook_size
        self.distance, self.codebook_update = distance, codebook_update
        self.commitment_weight, self.codebook_weight = commitment_weight, codebook_weight
        self.ema_decay, self.kmeans_iters = ema_decay, kmeans_iters
        self.dead_code_threshold, self.tile_elements = dead_code_threshold, tile_elements
        self.lookup_dim, self.rotation_trick = lookup_dim, rotation_trick
        code_dim = lookup_dim or dim
        # Factorized codes: search in a small space, decode in the latent space (both maps learned).
        self.project_in = nn.Linear(dim, code_dim) if lookup_dim else None
        self.project_out = nn.Linear(code_dim, dim) if lookup_dim else None
        init = torch.randn(codebook_size, code_dim) / code_dim**0.5  # (K, d)
        self.codebook = nn.Parameter(init, requires_grad=codebook_update == "learned")
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.register_buffer("usage", torch.ones(codebook_size))  # EMA of hits / mean hits, for dead-code restart
        if codebook_update == "ema":
            self.register_buffer("ema_count", torch.ones(codebook_size))
            self.register_buffer("ema_sum", init.clone())

    # ------------------------------------------------------------------ codebook
    def codes(self) -> torch.Tensor:
        """Codebook in the space where distances are taken ``(K, d)`` (``d = lookup_dim or dim``)."""
        return F.normalize(self.codebook, dim=-1) if self.distance == "cosine" else self.codebook

    def lookup_flat(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.codes()[ids]
        return self.project_out(q) if self.project_out is not None else q

    def _prepare(self, flat: torch.Tensor) -> torch.Tensor:
        """Latents ``(M, D)`` -> search-space vectors ``(M, d)``."""
        x = self.project_in(flat) if self.project_in is not None else flat
        return F.normalize(x, dim=-1) if self.distance == "cosine" else x

    @torch.no_grad()
    def _kmeans_init(self, x: torch.Tensor) -> None:
        centroids = from_rank0(kmeans(x.detach().float(), self.codebook_size, self.kmeans_iters).contiguous())
        self.codebook.data.copy_(centroids)
        if self.codebook_update == "ema":
            self.ema_sum.copy_(centroids)
            self.ema_count.fill_(1.0)
        self.initialized.fill_(True)

    # ------------------------------------------------------------------ forward
    def quantize_flat(self, flat: torch.Tensor):
        x = self._prepare(flat)  # (M, D)
        if self.training and not bool(self.initialized):
            self._kmeans_init(x)
        codes = self.codes()
        ids, _ = nearest_codes(x.detach(), codes.detach(), self.tile_elements)
        q = codes[ids]  # (M, D)
        loss = self.commitment_weight * F.mse_loss(x, q.detach())
        if self.codebook_update == "learned":
            loss = loss + self.codebook_weight * F.mse_loss(q, x.detach())
        if self.training:
            self._update_statistics(x.detach(), ids)
        # Forward value is exactly q in both cases (the added difference is 0); only the gradient to x differs.
        carried = rotate_onto(x, q.detach()) if self.rotation_trick else x
        quantized = q.detach() + (carried - carried.detach())
        if self.project_out is not None:
            quantized = self.project_out(quantized)
        return quantized, ids, loss, usage_metrics(ids, self.codebook_size)

    @torch.no_grad()
    def _update_statistics(self, x: torch.Tensor, ids: torch.Tensor) -> None:
        counts = sum_over_ranks(torch.bincount(ids, minlength=self.codebook_size).to(x.dtype))
        share = counts * (self.codebook_size / counts.sum().clamp_min(1.0))
        self.usage.mul_(USAGE_DECAY).add_(share, alpha=1 - USAGE_DECAY)
        if self.codebook_update == "ema":
            sums = sum_over_ranks(torch.zeros_like(self.ema_sum).index_add_(0, ids, x))
            self.ema_count.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
            self.ema_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
            # Laplace smoothing keeps rarely used codes from dividing by ~0.
            n = self.ema_count.sum()
            smoothed = (self.ema_count + 1e-5) / (n + self.codebook_size * 1e-5) * n
            self.codebook.data.copy_(self.ema_sum / smoothed.unsqueeze(1))
        if self.dead_code_threshold > 0:
            self._restart_dead_codes(x)

    @torch.no_grad()
    def _restart_dead_codes(self, x: torch.Tensor) -> None:
        dead = (self.usage < self.dead_code_threshold).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        # Every rank sees the same usage, hence the same dead codes; rank 0's latents replace them everywhere.
        picks = from_rank0(x[torch.randint(0, x.shape[0], (dead.numel(),), device=x.device)].contiguous())
        self.codebook.data[dead] = picks
        # Grace period: USAGE_DECAY ** 22 ~= 0.1, so an unpicked restarted code is eligible again after ~22 steps.
        self.usage[dead] = 10 * self.dead_code_threshold
        if self.codebook_update == "ema":
            self.ema_sum[dead] = picks
            self.ema_count[dead] = 1.0
