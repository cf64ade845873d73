"""The VQGAN convolutional encoder/decoder (Esser et al., 2021, "Taming Transformers", arXiv:2012.09841) in the two
parameter layouts its published descendants use, so their checkpoints load key for key:

- :class:`TamingEncoder` / :class:`TamingDecoder`: the taming-transformers layout SEED-Voken's IBQ keeps
  (``down.{i}.block.{j}``, ``down.{i}.attn.{j}``, ``mid.block_1`` / ``mid.attn_1`` / ``mid.block_2``,
  ``up.{i}.block.{j}`` indexed by resolution level); self-attention at every level whose feature-map side is in
  ``attn_resolutions`` (sides counted from ``resolution``).
- :class:`LlamaGenEncoder` / :class:`LlamaGenDecoder`: LlamaGen's layout (Sun et al., 2024, arXiv:2406.06525)
  (``conv_blocks.{i}.res.{j}``, ``conv_blocks.{i}.attn.{j}``, ``mid.{0,1,2}``; the decoder's ``conv_blocks`` run
  deepest level first); self-attention only at the deepest level.

Both share the blocks below, whose arithmetic follows the originals operation for operation so that the same weights
give the same numbers: GroupNorm(32 groups, eps 1e-6), swish written as ``x * sigmoid(x)``, attention logits scaled by
``C ** -0.5`` after the product, downsampling by a stride-2 3x3 conv after zero-padding right and bottom by one, and
nearest-neighbour upsampling followed by a 3x3 conv.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)  # not F.silu: the originals' exact arithmetic


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3, twice, plus a 1x1-projected (``nin_shortcut``) skip when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the ``h * w`` positions of a feature map, with 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_ = self.norm(x)
        b, c, h, w = x.shape
        q = self.q(h_).reshape(b, c, h * w).permute(0, 2, 1)  # (B, N, C)
        k = self.k(h_).reshape(b, c, h * w)  # (B, C, N)
        v = self.v(h_).reshape(b, c, h * w)  # (B, C, N)
        weights = torch.softmax(torch.bmm(q, k) * (int(c) ** (-0.5)), dim=2)  # (B, N queries, N keys)
        out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))  # asymmetric: right and bottom


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Named(nn.Module):
    """A level whose children carry the original's names (``block``/``res``, ``attn``, ``downsample``/``upsample``)."""

    def __init__(self, block_name: str, blocks: list, attns: list, resample_name: str = "", resample=None):
        super().__init__()
        self._block_name = block_name
        self.add_module(block_name, nn.ModuleList(blocks))
        self.attn = nn.ModuleList(attns)
        self._resample_name = resample_name if resample is not None else ""
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(getattr(self, self._block_name)):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[i](x)
        return getattr(self, self._resample_name)(x) if self._resample_name else x


def _widths(ch: int, ch_mult: Sequence[int]) -> list[int]:
    return [ch * m for m in ch_mult]


class TamingEncoder(nn.Module):
    """``(B, in_channels, H, W)`` -> ``(B, z_channels, H / 2**(L-1), W / 2**(L-1))``, ``L = len(ch_mult)``."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                 resolution: int, z_channels: int, in_channels: int = 3, dropout: float = 0.0, double_z: bool = False):
        super().__init__()
        widths, res = _widths(ch, ch_mult), resolution
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down, width = nn.ModuleList(), ch
        for level, out in enumerate(widths):
            blocks = [ResnetBlock(width if j == 0 else out, out, dropout) for j in range(num_res_blocks)]
            attns = [AttnBlock(out) for _ in blocks] if res in attn_resolutions else []
            last = level == len(widths) - 1
            self.down.append(_Named("block", blocks, attns, "downsample", None if last else Downsample(out)))
            width, res = out, res if last else res // 2
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1 = ResnetBlock(width, width, dropout), AttnBlock(width)
        self.mid.block_2 = ResnetBlock(width, width, dropout)
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class TamingDecoder(nn.Module):
    """``(B, z_channels, h, w)`` -> ``(B, out_ch, h * 2**(L-1), w * 2**(L-1))``; ``up[i]`` is level ``i``."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                 resolution: int, z_channels: int, out_ch: int = 3, dropout: float = 0.0):
        super().__init__()
        widths = _widths(ch, ch_mult)
        width, res = widths[-1], resolution // 2 ** (len(widths) - 1)
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1 = ResnetBlock(width, width, dropout), AttnBlock(width)
        self.mid.block_2 = ResnetBlock(width, width, dropout)
        levels = []
        for level in reversed(range(len(widths))):
            out = widths[level]
            blocks = [ResnetBlock(width if j == 0 else out, out, dropout) for j in range(num_res_blocks + 1)]
            attns = [AttnBlock(out) for _ in blocks] if res in attn_resolutions else []
            levels.insert(0, _Named("block", blocks, attns, "upsample", Upsample(out) if level else None))
            width, res = out, res * 2 if level else res
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


class LlamaGenEncoder(nn.Module):
    """LlamaGen's encoder: ``conv_blocks[i]`` is level ``i``; attention after every block of the deepest level."""

    def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int = 256, in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        widths = _widths(ch, ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.conv_blocks, width = nn.ModuleList(), ch
        for level, out in enumerate(widths):
            last = level == len(widths) - 1
            blocks = [ResnetBlock(width if j == 0 else out, out, dropout) for j in range(num_res_blocks)]
            attns = [AttnBlock(out) for _ in blocks] if last else []
            self.conv_blocks.append(_Named("res", blocks, attns, "downsample", None if last else Downsample(out)))
            width = out
        self.mid = nn.ModuleList([ResnetBlock(width, width, dropout), AttnBlock(width), ResnetBlock(width, width,
                                                                                                    dropout)])
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class LlamaGenDecoder(nn.Module):
    """LlamaGen's decoder: ``conv_blocks[0]`` is the deepest level (the one with attention), run first."""

    def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int = 256, out_ch: int = 3, dropout: float = 0.0):
        super().__init__()
        widths = _widths(ch, ch_mult)
        width = widths[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(width, width, dropout), AttnBlock(width), ResnetBlock(width, width,
                                                                                                    dropout)])
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(len(widths))):
            out = widths[level]
            blocks = [ResnetBlock(width if j == 0 else out, out, dropout) for j in range(num_res_blocks + 1)]
            attns = [AttnBlock(out) for _ in blocks] if level == len(widths) - 1 else []
            self.conv_blocks.append(_Named("res", blocks, attns, "upsample", Upsample(out) if level else None))
            width = out
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))
