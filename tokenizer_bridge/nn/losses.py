"""Feature-space losses for tokenizer training: perceptual (LPIPS-style) and Gram-matrix (style) losses.

- :class:`PerceptualLoss` follows LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
  Perceptual Metric") over *any* Hugging Face vision backbone saved locally: features of several layers are
  normalised to unit length along channels, their squared differences are weighted per channel (uniform, or
  learned non-negative weights as LPIPS' linear heads), summed over channels, averaged over positions and layers.
  No LPIPS/VGG weights ship with the library or can be downloaded here, so a backbone path is required.
- :func:`gram_matrix` / :func:`gram_loss` are the style loss of Gatys et al. 2016 ("Image Style Transfer Using
  Convolutional Neural Networks"): channel co-activation statistics, blind to where features occur.

Inputs are ``pixel_values`` in [-1, 1]; the backbone's own normalisation is applied by
:class:`~tokenizer_bridge.nn.foundation.VisionBackbone`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .foundation import PathLike, VisionBackbone

PERCEPTUAL_HINT = (
    "LPIPS/VGG weights cannot be downloaded here and none ship with tokenizer-bridge: save any Hugging Face vision "
    "backbone (DINOv2, SigLIP, CLIP, ViT, ConvNeXt, ...) with save_pretrained and pass its directory, or set "
    "perceptual_weight=0"
)


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` feature maps -> ``(B, C, C)`` Gram matrices ``F F^T / (h * w)``."""
    flat = features.float().flatten(2)  # (B, C, h*w)
    return flat @ flat.transpose(1, 2) / flat.shape[-1]


def gram_loss(features: Sequence[torch.Tensor], target_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the mean squared difference between Gram matrices (Gatys et al.'s style loss)."""
    terms = [(gram_matrix(a) - gram_matrix(b)).pow(2).mean() for a, b in zip(features, target_features)]
    return torch.stack(terms).mean()


def unit_channels(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Scale each position's channel vector of ``(B, C, h, w)`` to unit length (LPIPS' normalisation)."""
    return features / (features.pow(2).sum(1, keepdim=True).sqrt() + eps)


class PerceptualLoss(nn.Module):
    """LPIPS-style distance in the feature space of a frozen vision backbone: ``loss(reconstruction, target)``.

    Args:
        backbone: the :class:`VisionBackbone` (build it with :meth:`from_pretrained`).
        layers: hidden-state indices to compare (default: the output of every block).
        channel_weights: ``"uniform"`` or ``"learned"`` (non-negative per-channel weights, initialised to 1, trained
            by whoever optimises this module's parameters, e.g. on human similarity judgements as LPIPS did).
        style_weight: > 0 adds ``style_weight *`` :func:`gram_loss` over the same layers.

    The backbone is frozen and always in eval mode; gradients flow to ``reconstruction`` only. The module moves
    itself to the device of its inputs, so it can stay outside the tokenizer's own parameters.
    """

    def __init__(self, backbone: VisionBackbone, layers: Optional[Sequence[int]] = None,
                 channel_weights: str = "uniform", style_weight: float = 0.0):
        super().__init__()
        if channel_weights not in ("uniform", "learned"):
            raise ValueError(f"channel_weights must be 'uniform' or 'learned', got {channel_weights!r}")
        self.backbone = backbone.requires_grad_(False)
        self.layers = list(layers) if layers is not None else list(range(1, backbone.num_layers() + 1))
        self.style_weight = style_weight
        self.channel_weights = None
        if channel_weights == "learned":
            self.channel_weights = nn.ParameterList(nn.Parameter(torch.ones(w))
                                                    for w in backbone.layer_widths(self.layers))

    @classmethod
    def from_pretrained(cls, path: Optional[PathLike], layers: Optional[Sequence[int]] = None,
                        channel_weights: str = "uniform", style_weight: float = 0.0) -> "PerceptualLoss":
        """Perceptual loss over the vision model saved in the local directory ``path``.

        Raises ``ValueError`` when ``path`` is None or not a saved model: no default weights exist offline.
        """
        backbone = VisionBackbone.from_pretrained(path, "the perceptual loss", PERCEPTUAL_HINT)
        return cls(backbone, layers, channel_weights, style_weight)

    def layer_distance(self, index: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Weighted squared distance of unit-normalised features, summed over channels, averaged over B and space."""
        d = (unit_channels(a.float()) - unit_channels(b.float())).pow(2)  # (B, C, h, w)
        if self.channel_weights is not None:
            d = d * self.channel_weights[index].clamp_min(0).view(1, -1, 1, 1)
        return d.sum(1).mean()

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if reconstruction.shape != target.shape:
            raise ValueError(f"reconstruction {tuple(reconstruction.shape)} and target {tuple(target.shape)} differ")
        if self.backbone.image_mean.device != reconstruction.device:
            self.to(reconstruction.device)
        features = self.backbone.feature_maps(reconstruction, self.layers)
        with torch.no_grad():
            target_features = self.backbone.feature_maps(target, self.layers)
        loss = torch.stack([self.layer_distance(i, a, b)
                            for i, (a, b) in enumerate(zip(features, target_features))]).mean()
        if self.style_weight > 0:
            loss = loss + self.style_weight * gram_loss(features, target_features)
        return loss
