"""Image and codebook metrics shared by training logs, the demo and the evaluation suites."""

from __future__ import annotations

import torch

from .quantizers.base import usage_metrics


def psnr(reconstruction: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image for tensors ``(B, C, H, W)``.

    ``data_range`` is the span of valid values: 2.0 for ``pixel_values`` in [-1, 1], 255 for uint8 arrays.
    """
    if reconstruction.shape != target.shape:
        raise ValueError(f"shape mismatch: {tuple(reconstruction.shape)} vs {tuple(target.shape)}")
    mse = (reconstruction.float() - target.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-10))


def codebook_metrics(image_ids: torch.Tensor, codebook_size: int) -> dict:
    """Usage (fraction of codes used at least once) and perplexity of ``image_ids`` over a whole set."""
    return usage_metrics(torch.as_tensor(image_ids), codebook_size)
