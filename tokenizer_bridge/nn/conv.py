"""Convolutional encoder and decoder for grid tokenizers (the VQGAN family, Esser et al. 2021).

The encoder halves the resolution ``len(channel_mult)`` times (downsample 8 = three stages, 16 = four), each stage a
stack of pre-activation residual blocks; the decoder mirrors it with nearest-neighbour upsampling + conv, which avoids
the checkerboard artefacts of transposed convolutions.

Shapes: pixel_values ``(B, 3, H, W)`` -> latents ``(B, D, H/f, W/f)`` -> pixel_values ``(B, 3, H, W)``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


def run_blocks(owner: nn.Module, blocks, x: torch.Tensor, *args) -> torch.Tensor:
    """``x`` through ``blocks`` in order; with ``owner.gradient_checkpointing`` (while training) each block's
    activations are recomputed in the backward pass instead of kept (``torch.utils.checkpoint``, non-reentrant)."""
    recompute = getattr(owner, "gradient_checkpointing", False) and owner.training and torch.is_grad_enabled()
    run = getattr(owner, "_gradient_checkpointing_func", None) or partial(checkpoint, use_reentrant=False)
    for block in blocks:
        x = run(block, x, *args) if recompute else block(x, *args)
    return x


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1, self.conv1 = norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class ConvEncoder(nn.Module):
    """``(B, in_ch, H, W)`` -> ``(B, latent_dim, H / 2**len(channel_mult), W / 2**len(channel_mult))``."""

    def __init__(self, in_channels: int, base_channels: int, channel_mult: list[int], num_res_blocks: int, latent_dim: int):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        blocks, ch = [], base_channels
        for mult in channel_mult:
            out = base_channels * mult
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, out))
                ch = out
            blocks.append(nn.Conv2d(ch, ch, 4, stride=2, padding=1))  # halve resolution
        blocks.append(ResBlock(ch, ch))
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, latent_dim, 1))
        self.gradient_checkpointing = False  # set by PreTrainedModel.gradient_checkpointing_enable

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.out(run_blocks(self, self.blocks, self.stem(pixel_values)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ConvDecoder(nn.Module):
    """``(B, latent_dim, h, w)`` -> ``(B, out_ch, h * 2**len(channel_mult), w * 2**len(channel_mult))``."""

    def __init__(self, out_channels: int, base_channels: int, channel_mult: list[int], num_res_blocks: int, latent_dim: int):
        super().__init__()
        ch = base_channels * channel_mult[-1]
        self.stem = nn.Sequential(nn.Conv2d(latent_dim, ch, 3, padding=1), ResBlock(ch, ch))
        blocks = []
        for mult in reversed(channel_mult):
            out = base_channels * mult
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, out))
                ch = out
            blocks.append(Upsample(ch))
        self.blocks = nn.Sequential(*blocks)
        self.gradient_checkpointing = False
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.out(run_blocks(self, self.blocks, self.stem(latents)))
