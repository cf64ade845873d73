"""Open-MAGVIT2's improved encoder/decoder (Luo et al., 2024, arXiv:2409.04410, after MAGVIT-v2, Yu et al., 2024,
arXiv:2310.05737), in the parameter layout of SEED-Voken's ``improved_model.py`` so its checkpoints load key for key.

Differences from the VQGAN of :mod:`.vqgan`: residual-block convs have no bias; no self-attention; the encoder
downsamples with a stride-2 3x3 conv padded by one on every side (``down.{i}.downsample`` is the conv itself), has
``num_res_blocks`` middle blocks and a 1x1 output conv; the decoder modulates each level's input with an adaptive
GroupNorm whose scale and shift are linear maps of the per-channel standard deviation and mean of the quantized
latent, and upsamples by a 3x3 conv to 4x the channels followed by depth-to-space. GroupNorm eps is 1e-6 everywhere;
the adaptive norm's variance is torch's default (unbiased) ``var`` plus 1e-6, as in the original.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .vqgan import swish


def _norm(channels: int, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=affine)


class ResBlock(nn.Module):
    def __init__(self, in_filters: int, out_filters: int):
        super().__init__()
        self.norm1, self.norm2 = _norm(in_filters), _norm(out_filters)
        self.conv1 = nn.Conv2d(in_filters, out_filters, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_filters, out_filters, 3, padding=1, bias=False)
        if in_filters != out_filters:
            self.nin_shortcut = nn.Conv2d(in_filters, out_filters, 1, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(swish(self.norm2(self.conv1(swish(self.norm1(x))))))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return h + skip


def depth_to_space(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(B, C * s * s, H, W)`` -> ``(B, C, H * s, W * s)``, depth-column-row order (channel = (i * s + j) * C + c)."""
    b, c, h, w = x.shape
    s = block_size
    x = x.view(b, s, s, c // (s * s), h, w).permute(0, 3, 4, 1, 5, 2)  # (B, C, H, s, W, s)
    return x.contiguous().view(b, c // (s * s), h * s, w * s)


class Upsampler(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim * 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depth_to_space(self.conv1(x), block_size=2)


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine, then ``gamma(std(z)) * x + beta(mean(z))`` with ``z`` the quantized latent."""

    def __init__(self, z_channels: int, in_filters: int, eps: float = 1e-6):
        super().__init__()
        self.gn = _norm(in_filters, affine=False)
        self.gamma = nn.Linear(z_channels, in_filters)
        self.beta = nn.Linear(z_channels, in_filters)
        self.eps = eps

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        flat = style.flatten(2)  # (B, Z, h*w)
        scale = self.gamma((flat.var(dim=-1) + self.eps).sqrt()).view(b, c, 1, 1)
        bias = self.beta(flat.mean(dim=-1)).view(b, c, 1, 1)
        return scale * self.gn(x) + bias


def _level(blocks: list, resample_name: str = "", resample=None) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    if resample is not None:
        level.add_module(resample_name, resample)
    return level


class MagvitEncoder(nn.Module):
    """``(B, in_channels, H, W)`` -> ``(B, z_channels, H / 2**(L-1), W / 2**(L-1))``."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 in_channels: int = 3):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)
        self.down, width = nn.ModuleList(), ch
        for level, out in enumerate(widths):
            blocks = [ResBlock(width if j == 0 else out, out) for j in range(num_res_blocks)]
            last = level == len(widths) - 1
            self.down.append(_level(blocks, "downsample", None if last else nn.Conv2d(out, out, 3, stride=2,
                                                                                       padding=1)))
            width = out
        self.mid_block = nn.ModuleList(ResBlock(width, width) for _ in range(num_res_blocks))
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                x = block(x)
            if hasattr(level, "downsample"):
                x = level.downsample(x)
        for block in self.mid_block:
            x = block(x)
        return self.conv_out(swish(self.norm_out(x)))


class MagvitDecoder(nn.Module):
    """``(B, z_channels, h, w)`` quantized latent (+-1 codes) -> ``(B, out_ch, h * 2**(L-1), w * 2**(L-1))``."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, out_ch: int = 3):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        width = widths[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1, bias=True)
        self.mid_block = nn.ModuleList(ResBlock(width, width) for _ in range(num_res_blocks))
        up, adaptive = [], []
        for level in reversed(range(len(widths))):
            out = widths[level]
            adaptive.insert(0, AdaptiveGroupNorm(z_channels, width))
            blocks = [ResBlock(width if j == 0 else out, out) for j in range(num_res_blocks)]
            up.insert(0, _level(blocks, "upsample", Upsampler(out) if level > 0 else None))
            width = out
        self.up, self.adaptive = nn.ModuleList(up), nn.ModuleList(adaptive)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        style = z.clone()
        x = self.conv_in(z)
        for block in self.mid_block:
            x = block(x)
        for level in reversed(range(len(self.up))):
            x = self.adaptive[level](x, style)
            for block in self.up[level].block:
                x = block(x)
            if hasattr(self.up[level], "upsample"):
                x = self.up[level].upsample(x)
        return self.conv_out(swish(self.norm_out(x)))
