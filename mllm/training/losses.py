"""Language-model loss with per-modality weights and z-loss.

``lm_loss`` is next-token cross-entropy over the target positions (``labels != -100``, shifted inside as transformers
does), where each target token is weighted by its modality: ``image_weight`` for tokens inside image spans
(``image_loss_mask``, from ``UnifiedProcessor(..., return_loss_masks=True)``), ``text_weight`` for the others. The sum
is normalised by the **weighted token count**::

    ce = sum_i w_i * CE_i / sum_i w_i

so the weights set the text/image balance within a batch, and equal weights (any value) give the plain mean.

z-loss (PaLM, Chowdhery et al., 2022, section 5) keeps the softmax normaliser near 1: ``z_loss_weight * mean(log²Z)``
over the target positions, with ``Z = sum(exp(logits))``; PaLM uses ``z_loss_weight=1e-4``. It is unweighted by
modality.

Memory: only target positions are gathered from the logits before the float32 upcast, and ``chunk_size`` bounds the
float32 log-partition work to that many positions at a time (recomputed in backward), for large vocabularies.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from .recipe import TrainRecipe

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "use_cache", "labels")  # what the LLM's forward takes

IGNORE_INDEX = -100


def _logsumexp_float(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), dim=-1)


def log_partition(logits: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
    """``log Z`` per row of ``logits`` ``(T, V)`` in float32; in row chunks (recomputed in backward) if asked."""
    if not chunk_size or logits.shape[0] <= chunk_size:
        return _logsumexp_float(logits)
    parts = [checkpoint(_logsumexp_float, chunk, use_reentrant=False) for chunk in logits.split(chunk_size)]
    return torch.cat(parts)


def lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    image_loss_mask: Optional[torch.Tensor] = None,
    text_weight: float = 1.0,
    image_weight: float = 1.0,
    z_loss_weight: float = 0.0,
    chunk_size: Optional[int] = None,
    normalizer: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted next-token cross-entropy (+ z-loss) and its metrics.

    Args:
        logits: ``(B, L, V)``; position ``t`` predicts ``labels[:, t + 1]``.
        labels: ``(B, L)`` with -100 where there is no target (prompt, padding, sample starts).
        image_loss_mask: ``(B, L)`` bool, aligned with ``labels``: targets inside image spans. None: all text.
        text_weight, image_weight: per-token weights of text and image targets.
        z_loss_weight: coefficient of ``mean(log²Z)`` (0 turns it off).
        chunk_size: compute ``log Z`` this many positions at a time.
        normalizer: divide the weighted sum by this instead of this batch's own weight sum: the weight sum of the
            whole optimizer step (every micro-batch of every rank, :func:`target_weight`), so that gradients summed
            over micro-batches and averaged over ranks equal those of one batch (see ``Stage.loss_weight``).

    Returns:
        ``(loss, metrics)``; metrics hold ``text_tokens``, ``image_tokens``, ``z_loss`` (``mean(log²Z)``, before the
        coefficient) and ``text_loss`` / ``image_loss`` (unweighted mean CE of each modality, when it has targets).
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # (B, L-1)
    picked = logits[:, :-1][keep]  # (T, V) target positions only
    target_ids = targets[keep]  # (T,)
    if image_loss_mask is None:
        is_image = torch.zeros_like(target_ids, dtype=torch.bool)
    else:
        is_image = image_loss_mask[:, 1:][keep].bool()
    log_z = log_partition(picked, chunk_size)  # (T,) float32
    ce = log_z - picked.gather(1, target_ids[:, None]).squeeze(1).float()  # (T,)
    weights = torch.where(is_image, float(image_weight), float(text_weight)).to(ce.dtype)
    denominator = weights.sum() if normalizer is None else normalizer.to(ce.dtype)
    loss = (weights * ce).sum() / denominator.clamp_min(1e-12)  # 0 (with a graph) when nothing is weighted
    z_loss = (log_z**2).mean() if log_z.numel() else log_z.sum()
    if z_loss_weight:
        loss = loss + z_loss_weight * z_loss
    return loss, _metrics(ce.detach(), is_image, z_loss.detach())


def _metrics(ce: torch.Tensor, is_image: torch.Tensor, z_loss: torch.Tensor) -> dict[str, float]:
    metrics = {"text_tokens": int((~is_image).sum()), "image_tokens": int(is_image.sum()), "z_loss": float(z_loss)}
    if metrics["text_tokens"]:
        metrics["text_loss"] = float(ce[~is_image].mean())
    if metrics["image_tokens"]:
        metrics["image_loss"] = float(ce[is_image].mean())
    return metrics


def needs_lm_loss(cfg: TrainRecipe) -> bool:
    """Whether the recipe's loss differs from the model's own mean cross-entropy."""
    return (cfg.text_loss_weight, cfg.image_loss_weight, cfg.z_loss_weight) != (1.0, 1.0, 0.0)



def weighted_loss(model, batch: dict, cfg: TrainRecipe, normalizer: Optional[torch.Tensor] = None):
    """:func:`mllm.training.losses.lm_loss` with the recipe's modality weights and z-loss."""
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS and k != "labels"}
    logits = model(**inputs).logits
    return lm_loss(logits, batch["labels"], batch.get("image_loss_mask"), text_weight=cfg.text_loss_weight,
                   image_weight=cfg.image_loss_weight, z_loss_weight=cfg.z_loss_weight, normalizer=normalizer)


def target_weight(batch: dict, cfg: TrainRecipe) -> torch.Tensor:
    """The weight sum :func:`lm_loss` divides by for ``batch``: its target tokens, each weighted by its modality."""
    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    mask = batch.get("image_loss_mask")
    is_image = keep & mask[:, 1:].bool() if mask is not None else torch.zeros_like(keep)
    text = (keep & ~is_image).sum()
    return text.double() * cfg.text_loss_weight + is_image.sum().double() * cfg.image_loss_weight
