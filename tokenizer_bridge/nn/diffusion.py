"""Diffusion decoder: a small conditional U-Net trained by flow matching that turns code vectors into pixels.

Rectified flow (Liu et al. 2023, "Flow Straight and Fast"; flow matching, Lipman et al. 2023): a training pair is
``x_t = (1 - t) x0 + t eps`` for an image ``x0``, Gaussian noise ``eps`` and ``t ~ U(0, 1)``; the network predicts the
velocity ``v = eps - x0`` (the derivative of ``x_t`` in ``t``) and is trained with ``||v_pred - v||^2``. Sampling
integrates ``dx/dt = v`` from pure noise at ``t = 1`` to an image at ``t = 0`` with a few Euler steps (or Heun steps,
second order: one more network call per step, as in Karras et al. 2022); the noise comes from a ``torch.Generator``,
so a seed fixes the output. One Euler step returns the network's estimate of ``E[x0 | condition]`` (the blurry
regression answer); more steps add detail.

Two kinds of condition, fixed at construction by ``cond_type``:

- ``"map"``: a code map ``(B, C, h, w)`` (the looked-up codes of grid image ids), upsampled (nearest) to the image
  size and concatenated to the noisy input, and added again (through a 1x1 projection) at every resolution of the
  U-Net's contracting path and middle, so the deep layers see each cell's code without having to carry it up from
  the input;
- ``"tokens"``: a set of vectors ``(B, N, C)`` (summed residual slot codes), read by cross-attention at every
  resolution below the input's and, mean-pooled, added to the time embedding that FiLM-modulates every block.

Both also support classifier-free guidance (Ho & Salimans 2022): in training the condition is zeroed for a fraction
``cond_dropout`` of the samples, and ``sample(guidance_scale=s)`` mixes ``v_uncond + s (v_cond - v_uncond)``.

Shapes: ``pixel_values (B, 3, H, W)``; ``H`` and ``W`` multiples of ``2 ** (len(channel_mult) - 1)``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .conv import norm
from .slots import Attention

COND_TYPES = ("map", "tokens")
SAMPLERS = ("euler", "heun")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of ``t (B,)`` in [0, 1] (scaled to [0, 1000] like DDPM step indices) -> ``(B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float().unsqueeze(1) * freqs  # (B, half)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class FiLMResBlock(nn.Module):
    """Residual conv block whose second normalisation is scaled and shifted by the (time + condition) embedding."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2, self.conv2 = norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, out_ch, 1, 1) each
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class CrossAttention2d(nn.Module):
    """Feature map ``(B, C, H, W)`` attends to condition tokens ``(B, N, cond_dim)``; residual."""

    def __init__(self, channels: int, cond_dim: int, num_heads: int = 4):
        super().__init__()
        self.norm, self.norm_cond = norm(channels), nn.LayerNorm(cond_dim)
        self.attn = Attention(channels, num_heads, context_dim=cond_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        queries = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        out = self.attn(queries, self.norm_cond(cond))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Level(nn.Module):
    """One U-Net level: a FiLM residual block, then cross-attention to the condition tokens when it has any."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, cond_dim: Optional[int], num_heads: int):
        super().__init__()
        self.block = FiLMResBlock(in_ch, out_ch, emb_dim)
        self.attn = CrossAttention2d(out_ch, cond_dim, num_heads) if cond_dim else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.block(x, emb)
        return self.attn(x, cond) if self.attn is not None else x


class DiffusionDecoder(nn.Module):
    """Conditional rectified-flow U-Net.

    Args:
        cond_dim: channels C of the condition (code vectors).
        cond_type: ``"tokens"`` (``(B, N, C)`` sets, e.g. slots) or ``"map"`` (``(B, C, h, w)`` code maps).
        image_size: ``(H, W)`` (or one int) that ``sample`` produces from token conditions (maps set their own size
            through ``map_scale``).
        out_channels: image channels.
        base_channels, channel_mult: U-Net widths; one level per entry, halving the resolution between levels.
        num_heads: attention heads of the cross-attention.
        map_scale: pixels per code-map cell (the grid tokenizer's downsample factor), ``"map"`` only.
        cond_dropout: fraction of training samples whose condition is zeroed (for classifier-free guidance).
    """

    def __init__(self, cond_dim: int, cond_type: str = "tokens", image_size=32, out_channels: int = 3,
                 base_channels: int = 32, channel_mult: Sequence[int] = (1, 2, 2), num_heads: int = 4,
                 map_scale: int = 8, cond_dropout: float = 0.1):
        super().__init__()
        if cond_type not in COND_TYPES:
            raise ValueError(f"cond_type must be one of {COND_TYPES}, got {cond_type!r}")
        if not 0.0 <= cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must lie in [0, 1), got {cond_dropout}")
        self.cond_dim, self.cond_type, self.out_channels = cond_dim, cond_type, out_channels
        self.image_size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size, image_size)
        self.map_scale, self.cond_dropout = map_scale, cond_dropout
        self.factor = 2 ** (len(channel_mult) - 1)
        widths, emb_dim = [base_channels * m for m in channel_mult], 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond_pool = nn.Linear(cond_dim, emb_dim) if cond_type == "tokens" else None
        self.cond_map = nn.Conv2d(cond_dim, base_channels, 1) if cond_type == "map" else None
        # "map": the code map again at every contracting level and the middle (one 1x1 projection each)
        self.cond_inject = (nn.ModuleList(nn.Conv2d(cond_dim, w, 1) for w in widths + widths[-1:])
                            if cond_type == "map" else None)
        self.stem = nn.Conv2d(out_channels + (base_channels if cond_type == "map" else 0), widths[0], 3, padding=1)
        attn_dim = cond_dim if cond_type == "tokens" else None
        self.down, self.downsample, ch = nn.ModuleList(), nn.ModuleList(), widths[0]
        for i, width in enumerate(widths):
            self.down.append(Level(ch, width, emb_dim, attn_dim if i > 0 else None, num_heads))
            last = i == len(widths) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(width, width, 3, stride=2, padding=1))
            ch = width
        self.mid = nn.ModuleList([Level(ch, ch, emb_dim, attn_dim, num_heads), Level(ch, ch, emb_dim, None, num_heads)])
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            self.up.append(Level(ch + width, width, emb_dim, attn_dim if i > 0 else None, num_heads))
            self.upsample.append(nn.Conv2d(width, widths[i - 1], 3, padding=1) if i > 0 else nn.Identity())
            ch = widths[i - 1] if i > 0 else width
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    # ------------------------------------------------------------------ network
    def check_cond(self, cond: torch.Tensor) -> None:
        expected = 3 if self.cond_type == "tokens" else 4
        channels = cond.shape[-1] if expected == 3 else cond.shape[1] if cond.dim() == 4 else None
        if cond.dim() != expected or channels != self.cond_dim:
            shape = f"(B, N, {self.cond_dim})" if expected == 3 else f"(B, {self.cond_dim}, h, w)"
            raise ValueError(f"a {self.cond_type!r} condition must be {shape}, got shape {tuple(cond.shape)}")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Velocity ``(B, 3, H, W)`` at noisy images ``x_t (B, 3, H, W)``, times ``t (B,)``, condition ``cond``."""
        if x_t.shape[-2] % self.factor or x_t.shape[-1] % self.factor:
            raise ValueError(f"image size {tuple(x_t.shape[-2:])} is not a multiple of {self.factor}")
        emb = self.time_mlp(timestep_embedding(t, self.time_mlp[0].in_features))  # (B, E)
        if self.cond_type == "tokens":
            emb = emb + self.cond_pool(cond.mean(dim=1))
            h = self.stem(x_t)
        else:
            cond_map = F.interpolate(cond, size=x_t.shape[-2:], mode="nearest")  # one code per cell
            h = self.stem(torch.cat([x_t, self.cond_map(cond_map)], dim=1))
        skips = []
        for i, (level, down) in enumerate(zip(self.down, self.downsample)):
            h = self.inject(level(h, emb, cond), cond, i)
            skips.append(h)
            h = down(h)
        for i, level in enumerate(self.mid):
            h = level(h, emb, cond)
            if i == 0:
                h = self.inject(h, cond, len(self.down))
        for level, up in zip(self.up, self.upsample):
            h = level(torch.cat([h, skips.pop()], dim=1), emb, cond)
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(h)

    def inject(self, h: torch.Tensor, cond: torch.Tensor, index: int) -> torch.Tensor:
        """``h (B, C, H', W')`` plus the projected code map resized to ``H' x W'`` ("map" conditions only)."""
        if self.cond_inject is None:
            return h
        return h + self.cond_inject[index](F.interpolate(cond, size=h.shape[-2:], mode="nearest"))

    # ------------------------------------------------------------------ training
    def loss(self, pixel_values: torch.Tensor, cond: torch.Tensor,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Flow-matching loss (scalar) of ``pixel_values (B, 3, H, W)`` in [-1, 1] given ``cond``."""
        self.check_cond(cond)
        b = pixel_values.shape[0]
        t = _rand((b,), generator, pixel_values)  # (B,)
        noise = _randn(pixel_values.shape, generator, pixel_values)
        tt = t.view(b, 1, 1, 1)
        x_t = (1 - tt) * pixel_values + tt * noise
        if self.training and self.cond_dropout > 0:
            keep = (_rand((b,), generator, cond) >= self.cond_dropout).to(cond.dtype)
            cond = cond * keep.view(b, *([1] * (cond.dim() - 1)))
        return F.mse_loss(self(x_t, t, cond), noise - pixel_values)

    # ------------------------------------------------------------------ sampling
    def output_size(self, cond: torch.Tensor) -> tuple[int, int]:
        if self.cond_type == "map":
            return cond.shape[-2] * self.map_scale, cond.shape[-1] * self.map_scale
        return self.image_size

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, steps: int = 25, generator: Optional[torch.Generator] = None,
               guidance_scale: float = 1.0, size: Optional[tuple[int, int]] = None,
               sampler: str = "euler") -> torch.Tensor:
        """Integration of the learned flow from noise (``t = 1``) to ``pixel_values (B, 3, H, W)`` (not clamped)
        over ``steps`` uniform time steps. ``generator`` fixes the initial noise; ``guidance_scale > 1`` applies
        classifier-free guidance; ``sampler="heun"`` corrects every step but the last with the velocity at its end
        (``2 * steps - 1`` network calls instead of ``steps``)."""
        self.check_cond(cond)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        b = cond.shape[0]
        x = _randn((b, self.out_channels, *(size or self.output_size(cond))), generator, cond)
        times = torch.linspace(1.0, 0.0, steps + 1, device=cond.device)
        for t, t_next in zip(times[:-1], times[1:]):
            velocity = self.guided_velocity(x, t.expand(b), cond, guidance_scale)
            x_next = x + (t_next - t) * velocity
            if sampler == "heun" and t_next > 0:
                corrected = self.guided_velocity(x_next, t_next.expand(b), cond, guidance_scale)
                x_next = x + (t_next - t) * 0.5 * (velocity + corrected)
            x = x_next
        return x

    def guided_velocity(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        if scale == 1.0:
            return self(x, t, cond)
        both = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, torch.zeros_like(cond)]))
        v_cond, v_uncond = both.chunk(2)
        return v_uncond + scale * (v_cond - v_uncond)


def _randn(shape, generator: Optional[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device (so a CPU seed gives the same noise for a GPU model)."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device).to(like.device, like.dtype)


def _rand(shape, generator: Optional[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like.device, like.dtype)
