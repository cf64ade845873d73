"""The adversarial loss of visual-tokenizer training: GAN losses, LeCAM, R1 and VQGAN's adaptive generator weight.

- Hinge (Lim & Ye 2017) and non-saturating (Goodfellow et al. 2014) losses, with VQGAN's 1/2 on the
  discriminator's two terms; the generator maximises the logits (hinge: ``-mean(D(x_hat))``) or minimises
  ``softplus(-D(x_hat))`` (non-saturating).
- LeCAM regularisation (Tseng et al. 2021, "Regularizing Generative Adversarial Networks under Limited Data"):
  ``mean(relu(D(x) - a_fake)^2) + mean(relu(a_real - D(x_hat))^2)`` where ``a_real`` / ``a_fake`` are EMAs of the
  mean logits (the form of the authors' code and Open-MAGVIT2). The anchors are buffers, so they are checkpointed
  with the discriminator; under ``torch.distributed`` they average the logits of every process.
- R1 (Mescheder et al. 2018): ``gamma / 2 * E ||grad_x D(x)||^2`` on real images.
- The adaptive weight (Esser et al. 2021): ``||grad nll|| / (||grad g_loss|| + 1e-4)`` at the decoder's last layer,
  clamped to [0, 1e4], times ``weight`` (:func:`~tokenizer_bridge.nn.foundation.adaptive_weight`).

:class:`AdversarialLoss` holds the discriminator and these settings; its ``forward`` is the discriminator's loss
(what a data-parallel wrapper calls), :meth:`AdversarialLoss.generator_loss` the tokenizer's adversarial term.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .foundation import adaptive_weight


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def non_saturating_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits_fake).mean()


def non_saturating_image_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The non-saturating loss of each image's mean patch logit, ``mean_i softplus(-mean_patches D(x_hat_i))``: the
    form Open-MAGVIT2 and IBQ train their generators with (beside a hinge discriminator loss)."""
    return F.softplus(-logits_fake.flatten(1).mean(1)).mean()


# name -> (discriminator loss, generator loss)
GAN_LOSSES = {
    "hinge": (hinge_discriminator_loss, hinge_generator_loss),
    "non_saturating": (non_saturating_discriminator_loss, non_saturating_generator_loss),
}
# what ``generator_loss`` may name (None: the generator loss of ``loss``)
GENERATOR_LOSSES = {
    "hinge": hinge_generator_loss,
    "non_saturating": non_saturating_generator_loss,
    "non_saturating_image": non_saturating_image_generator_loss,
}


def lecam_penalty(logits_real: torch.Tensor, logits_fake: torch.Tensor, anchor_real: torch.Tensor,
                  anchor_fake: torch.Tensor) -> torch.Tensor:
    """LeCAM's regulariser: real logits pulled below the fake anchor, fake logits above the real one."""
    return F.relu(logits_real - anchor_fake).pow(2).mean() + F.relu(anchor_real - logits_fake).pow(2).mean()


def r1_penalty(logits_real: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``E ||grad_x D(x)||^2`` over the batch; ``real`` must require grad and ``logits_real`` be computed from it."""
    (grad,) = torch.autograd.grad(logits_real.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over this process's values, averaged over processes when ``torch.distributed`` runs."""
    mean = x.detach().float().mean()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(mean)
        mean = mean / dist.get_world_size()
    return mean


class AdversarialLoss(nn.Module):
    """A discriminator and the losses it trains and is trained with.

    Args:
        discriminator: logits ``(B, 1, h, w)`` of ``pixel_values`` (:mod:`~tokenizer_bridge.nn.discriminator`).
        loss: ``"hinge"`` or ``"non_saturating"`` (the discriminator's loss, and the generator's unless given).
        generator_loss: the generator's loss when it differs (:data:`GENERATOR_LOSSES`): Open-MAGVIT2 and IBQ pair a
            hinge discriminator with ``"non_saturating_image"``.
        weight: the generator term's weight; with ``adaptive`` it multiplies VQGAN's adaptive weight.
        adaptive: VQGAN's gradient-norm ratio (needs the decoder's last layer); False: a fixed weight.
        lecam_weight / lecam_decay: LeCAM regulariser weight (0: off) and its anchors' EMA decay.
        r1_weight: gamma of the R1 penalty (0: off).
    """

    def __init__(self, discriminator: nn.Module, loss: str = "hinge", weight: float = 0.1, adaptive: bool = True,
                 lecam_weight: float = 0.0, lecam_decay: float = 0.999, r1_weight: float = 0.0,
                 generator_loss: Optional[str] = None):
        super().__init__()
        if loss not in GAN_LOSSES:
            raise ValueError(f"adversarial loss must be one of {sorted(GAN_LOSSES)}, got {loss!r}")
        if generator_loss is not None and generator_loss not in GENERATOR_LOSSES:
            raise ValueError(f"generator_loss must be one of {sorted(GENERATOR_LOSSES)} or None, got {generator_loss!r}")
        self.generator_loss_fn = GENERATOR_LOSSES[generator_loss] if generator_loss else GAN_LOSSES[loss][1]
        if not 0.0 <= lecam_decay < 1.0:
            raise ValueError(f"lecam_decay must lie in [0, 1), got {lecam_decay}")
        if min(weight, lecam_weight, r1_weight) < 0:
            raise ValueError("adversarial weight, lecam_weight and r1_weight must be >= 0")
        self.discriminator = discriminator
        self.loss_name, self.weight, self.adaptive = loss, float(weight), bool(adaptive)
        self.lecam_weight, self.lecam_decay, self.r1_weight = float(lecam_weight), float(lecam_decay), float(r1_weight)
        self.register_buffer("anchor_real", torch.zeros(()))  # LeCAM's EMA of the mean real / fake logits
        self.register_buffer("anchor_fake", torch.zeros(()))

    def generator_loss(self, reconstruction: torch.Tensor, nll_loss: Optional[torch.Tensor] = None,
                       last_layer: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
        """The tokenizer's weighted adversarial term for ``reconstruction`` and its metrics. ``nll_loss`` (the
        reconstruction + weighted perceptual loss) and ``last_layer`` (the decoder's output weight) are needed
        for the adaptive weight. Keep the discriminator's parameters frozen around it and its backward."""
        g_loss = self.generator_loss_fn(self.discriminator(self.as_input(reconstruction)).float())
        weight = torch.tensor(self.weight, device=g_loss.device)
        if self.adaptive:
            if nll_loss is None or last_layer is None:
                raise ValueError("the adaptive adversarial weight needs nll_loss and the decoder's last_layer")
            weight = weight * adaptive_weight(nll_loss, g_loss, last_layer)
        metrics = {"generator_adv_loss": float(g_loss.detach()), "adversarial_weight": float(weight)}
        return weight * g_loss, metrics

    def as_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images in the discriminator's weight dtype: under DeepSpeed bf16 the tokenizer's outputs are bf16 while the
        discriminator, outside the engine, stays fp32 (autocast, where it runs, casts again as it needs)."""
        weight = next(self.discriminator.parameters(), None)
        return pixel_values if weight is None or pixel_values.dtype == weight.dtype else pixel_values.to(weight.dtype)

    def update_anchors(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        with torch.no_grad():
            self.anchor_real.lerp_(global_mean(logits_real).to(self.anchor_real), 1.0 - self.lecam_decay)
            self.anchor_fake.lerp_(global_mean(logits_fake).to(self.anchor_fake), 1.0 - self.lecam_decay)

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The discriminator's loss on real images and (detached) reconstructions, and its metrics."""
        real, fake = self.as_input(real.detach()), self.as_input(fake.detach())
        if self.r1_weight > 0:
            real = real.requires_grad_(True)
        logits_real, logits_fake = self.discriminator(real).float(), self.discriminator(fake).float()
        loss = GAN_LOSSES[self.loss_name][0](logits_real, logits_fake)
        metrics = {"disc_loss": float(loss.detach()), "logits_real": float(logits_real.detach().mean()),
                   "logits_fake": float(logits_fake.detach().mean())}
        if self.lecam_weight > 0:
            self.update_anchors(logits_real, logits_fake)  # anchors first, then the penalty (as LeCAM's code does)
            lecam = lecam_penalty(logits_real, logits_fake, self.anchor_real, self.anchor_fake)
            loss = loss + self.lecam_weight * lecam
            metrics["lecam_loss"] = float(lecam.detach())
        if self.r1_weight > 0:
            r1 = r1_penalty(logits_real, real)
            loss = loss + 0.5 * self.r1_weight * r1
            metrics["r1_penalty"] = float(r1.detach())
        return loss, metrics
