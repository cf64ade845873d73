"""Slot encoder: patch features -> N object-centric slot vectors ``(B, N, D)``, with a variable token budget.

Follows Slot-MLLM (Chi et al. 2025, "Slot-MLLM: Object-Centric Visual Tokenization for Multimodal LLM"): learned
queries, optionally refined by Q-Former blocks (Li et al. 2023, BLIP-2: self-attention among the queries, then
cross-attention to the patch features), initialise **slot attention** (Locatello et al. 2020, "Object-Centric Learning
with Slot Attention"), whose attention is a softmax over the *slots* for every pixel, so slots compete for pixels; each
slot is then updated with the attention-weighted mean of the pixel values through a GRU and a residual MLP. Learned
slot initialisations use the implicit-gradient trick of BO-QSA (Jia et al. 2023): the last iteration starts from the
detached slots plus a straight-through copy of the initialisation, which keeps training stable.

Variable token count (HOOK-style budgets; the nested training follows Matryoshka representations, Kusupati et al.
2022): the model holds ``max_slots`` learned queries and runs with the first ``n`` of them for a budget ``n``; only
those ``n`` slots compete, so the pixels are shared out among ``n`` slots and the first ``n`` queries form a complete
``n``-token code. Training draws ``n`` at random per batch so every prefix stays a valid code.

Shapes: features ``(B, C, h, w)`` or ``(B, P, C)`` -> slots ``(B, N, D)``; attention masks ``(B, N, h, w)`` (softmax
over N: they sum to 1 over the slots at every position).

Also the spatial-broadcast slot decoder of slot-attention autoencoders (Watters et al. 2019; Locatello et al. 2020),
:class:`BroadcastDecoder`, the deterministic alternative to the diffusion decoder.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers.utils import ModelOutput

from .conv import ConvDecoder


class Attention(nn.Module):
    """Multi-head attention of ``x (B, Q, dim)`` over ``context (B, K, context_dim)`` (self-attention without it)."""

    def __init__(self, dim: int, num_heads: int = 4, context_dim: Optional[int] = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, q_len, dim = x.shape
        k, v = self.to_kv(x if context is None else context).chunk(2, dim=-1)  # (B, K, dim) each

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, T, dim) -> (B, heads, T, dim / heads)
            return t.view(b, t.shape[1], self.num_heads, -1).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.to_q(x)), heads(k), heads(v))  # (B, heads, Q, dim / heads)
        return self.out(y.transpose(1, 2).reshape(b, q_len, dim))


def mlp(dim: int, hidden: int, out: Optional[int] = None) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out or dim))


class QFormerBlock(nn.Module):
    """Pre-norm Q-Former block: queries self-attend, cross-attend to the features, then pass through an MLP."""

    def __init__(self, dim: int, num_heads: int = 4, mlp_ratio: int = 2):
        super().__init__()
        self.norm_self, self.self_attn = nn.LayerNorm(dim), Attention(dim, num_heads)
        self.norm_cross, self.norm_context = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads)
        self.norm_mlp, self.mlp = nn.LayerNorm(dim), mlp(dim, mlp_ratio * dim)

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        queries = queries + self.self_attn(self.norm_self(queries))
        queries = queries + self.cross_attn(self.norm_cross(queries), self.norm_context(features))
        return queries + self.mlp(self.norm_mlp(queries))


class SlotAttention(nn.Module):
    """Slot attention (Locatello et al. 2020) from given initial slots.

    Args:
        dim: slot and feature dimension D.
        iters: refinement iterations (3 in the paper).
        hidden_dim: width of the residual MLP (default ``2 * dim``).
        implicit_grad: BO-QSA's implicit differentiation (detach before the last iteration, straight-through to the
            initial slots); needed for stable training of learned initialisations.
        eps: added to the attention before the weighted mean, so a slot that wins no pixel still gets a defined update.
    """

    def __init__(self, dim: int, iters: int = 3, hidden_dim: Optional[int] = None, implicit_grad: bool = True,
                 eps: float = 1e-8):
        super().__init__()
        if iters < 1:
            raise ValueError(f"slot attention needs at least one iteration, got iters={iters}")
        self.iters, self.implicit_grad, self.eps, self.scale = iters, implicit_grad, eps, dim**-0.5
        self.norm_inputs, self.norm_slots, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = mlp(dim, hidden_dim or 2 * dim)

    def forward(self, inputs: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``inputs (B, P, D)``, initial ``slots (B, N, D)`` -> ``(slots (B, N, D), attention (B, N, P))``."""
        inputs = self.norm_inputs(inputs)
        k, v = self.to_k(inputs), self.to_v(inputs)  # (B, P, D) each
        init, attn = slots, None
        for i in range(self.iters):
            if self.implicit_grad and i == self.iters - 1:
                slots = slots.detach() + init - init.detach()
            slots, attn = self.step(slots, k, v)
        return slots, attn

    def step(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d = slots.shape
        q = self.to_q(self.norm_slots(slots))  # (B, N, D)
        attn = torch.einsum("bnd,bpd->bnp", q, k).mul(self.scale).softmax(dim=1)  # (B, N, P): slots compete
        weights = attn + self.eps
        weights = weights / weights.sum(dim=-1, keepdim=True)  # weighted mean over the pixels each slot won
        updates = weights @ v  # (B, N, D)
        slots = self.gru(updates.reshape(-1, d), slots.reshape(-1, d)).view(b, n, d)
        return slots + self.mlp(self.norm_mlp(slots)), attn


def position_grid(h: int, w: int, device=None) -> torch.Tensor:
    """``(h * w, 4)`` coordinates ``(y, x, 1 - y, 1 - x)`` in [0, 1], raster order (Locatello et al.'s soft
    position embedding input)."""
    ys = torch.linspace(0.0, 1.0, h, device=device)
    xs = torch.linspace(0.0, 1.0, w, device=device)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([yy, xx], dim=-1).reshape(-1, 2)
    return torch.cat([grid, 1.0 - grid], dim=-1)


def features_to_tokens(features: torch.Tensor) -> tuple[torch.Tensor, Optional[tuple[int, int]]]:
    """Backbone output ``(B, C, h, w)`` or ``(B, P, C)`` -> ``(tokens (B, P, C), (h, w) or None)``.

    Sequences of a square number of tokens are taken as a raster grid (a ViT's patch tokens without its class token).
    """
    if features.dim() == 4:
        b, c, h, w = features.shape
        return features.flatten(2).transpose(1, 2), (h, w)
    if features.dim() != 3:
        raise ValueError(f"backbone features must be (B, C, h, w) or (B, P, C), got shape {tuple(features.shape)}")
    side = math.isqrt(features.shape[1])
    return features, ((side, side) if side * side == features.shape[1] else None)


@dataclass
class SlotEncoderOutput(ModelOutput):
    """Args:
    slots: ``(B, N, D)`` slot vectors (the latents the quantizer sees).
    masks: slot-attention masks of the last iteration, ``(B, N, h, w)`` (``(B, N, P)`` when the features have no
        grid); they sum to 1 over the slots at every position.
    """

    slots: Optional[torch.Tensor] = None
    masks: Optional[torch.Tensor] = None


class SlotEncoder(nn.Module):
    """Backbone features -> slots: projection + soft position embedding, learned queries, Q-Former, slot attention.

    Args:
        feature_dim: channels C of the backbone features.
        dim: slot dimension D.
        max_slots: number of learned queries; any budget ``n <= max_slots`` uses the first ``n``.
        iters: slot-attention iterations.
        qformer_layers: Q-Former blocks refining the queries before slot attention (0: plain learned slot init).
        num_heads: attention heads of the Q-Former blocks.
    """

    def __init__(self, feature_dim: int, dim: int, max_slots: int, iters: int = 3, qformer_layers: int = 1,
                 num_heads: int = 4):
        super().__init__()
        self.max_slots = max_slots
        self.project = nn.Linear(feature_dim, dim)
        self.position = nn.Linear(4, dim)
        self.norm_features, self.mlp_features = nn.LayerNorm(dim), mlp(dim, dim)
        self.queries = nn.Parameter(torch.randn(max_slots, dim) * dim**-0.5)  # (max_slots, D)
        self.qformer = nn.ModuleList(QFormerBlock(dim, num_heads) for _ in range(qformer_layers))
        self.slot_attention = SlotAttention(dim, iters)

    def check_num_slots(self, num_slots: Optional[int]) -> int:
        n = self.max_slots if num_slots is None else int(num_slots)
        if not 1 <= n <= self.max_slots:
            raise ValueError(f"num_slots must lie in [1, {self.max_slots}] (the learned queries), got {num_slots}")
        return n

    def forward(self, features: torch.Tensor, num_slots: Optional[int] = None) -> SlotEncoderOutput:
        n = self.check_num_slots(num_slots)
        tokens, grid = features_to_tokens(features)  # (B, P, C)
        x = self.project(tokens)  # (B, P, D)
        if grid is not None:
            x = x + self.position(position_grid(*grid, device=x.device).to(x.dtype))
        x = x + self.mlp_features(self.norm_features(x))
        # Slicing keeps the unused queries in the graph with zero gradient (DDP sees every parameter used).
        slots = self.queries[:n].unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, n, D)
        for block in self.qformer:
            slots = block(slots, x)
        slots, attn = self.slot_attention(x, slots)  # (B, n, D), (B, n, P)
        masks = attn.view(*attn.shape[:2], *grid) if grid is not None else attn
        return SlotEncoderOutput(slots=slots, masks=masks)


class BroadcastDecoder(nn.Module):
    """Spatial-broadcast slot decoder (Watters et al. 2019): every slot is broadcast over the ``h x w`` grid with a
    position embedding and mapped by an MLP to features + an alpha logit; alphas are a softmax over slots (the
    decoder's own masks); the alpha-weighted features ``(B, C, h, w)`` are upsampled to pixels by a
    :class:`~tokenizer_bridge.nn.conv.ConvDecoder`."""

    def __init__(self, dim: int, feature_grid: tuple[int, int], out_channels: int, base_channels: int,
                 channel_mult: list[int], num_res_blocks: int, hidden: Optional[int] = None):
        super().__init__()
        self.feature_grid, hidden = tuple(feature_grid), hidden or 2 * dim
        self.position = nn.Linear(4, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim + 1))
        self.upsampler = ConvDecoder(out_channels, base_channels, channel_mult, num_res_blocks, latent_dim=dim)

    def forward(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``slots (B, N, D)`` -> ``(pixel_values (B, 3, H, W), alpha masks (B, N, h, w))``."""
        (b, n, d), (h, w) = slots.shape, self.feature_grid
        pos = self.position(position_grid(h, w, device=slots.device).to(slots.dtype))  # (P, D)
        out = self.mlp(slots.unsqueeze(2) + pos)  # (B, N, P, D + 1)
        alpha = out[..., -1].softmax(dim=1)  # (B, N, P)
        features = torch.einsum("bnp,bnpd->bdp", alpha, out[..., :-1]).reshape(b, d, h, w)
        return self.upsampler(features), alpha.view(b, n, h, w)


# ---------------------------------------------------------------------- drawing
def slot_colours(n: int) -> np.ndarray:
    """``(n, 3)`` distinct colours in [0, 1]: hues spaced by the golden angle."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    return np.array([colorsys.hsv_to_rgb(h, 0.85, 1.0) for h in hues], dtype=np.float32)


def _image_array(image: Union[Image.Image, torch.Tensor, np.ndarray]) -> np.ndarray:
    """PIL image, ``(3, H, W)`` tensor in [-1, 1] or ``(H, W, 3)`` uint8 array -> ``(H, W, 3)`` float in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if torch.is_tensor(image):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be (3, H, W) in [-1, 1], got shape {tuple(image.shape)}")
        return ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    return np.asarray(image, dtype=np.float32) / 255.0


def draw_slot_masks(image, masks: torch.Tensor, scale: int = 4, alpha: float = 0.6) -> Image.Image:
    """Which pixels each slot covers, as one PIL image of three panels side by side:
    the image | soft masks (each slot's colour weighted by its attention) | the image tinted by the winning slot.

    ``image``: PIL image, ``(3, H, W)`` tensor in [-1, 1] or ``(H, W, 3)`` uint8 array; ``masks``: ``(N, h, w)``
    attention of one image (e.g. ``SlotTokenizer.encode_slots(x).masks[0]``), upsampled to the image size.
    ``scale`` enlarges the panels (nearest neighbour) so 32 px images stay legible.
    """
    pixels = _image_array(image)  # (H, W, 3)
    masks = torch.as_tensor(masks).detach().float().cpu()
    if masks.dim() != 3:
        raise ValueError(f"masks must be (N, h, w) for one image, got shape {tuple(masks.shape)}")
    height, width = pixels.shape[:2]
    soft = F.interpolate(masks.unsqueeze(0), size=(height, width), mode="bilinear", align_corners=False)[0]
    soft = (soft / soft.sum(0, keepdim=True).clamp_min(1e-8)).numpy()  # (N, H, W)
    colours = slot_colours(masks.shape[0])  # (N, 3)
    coloured = np.einsum("nhw,nc->hwc", soft, colours)
    tinted = (1 - alpha) * pixels + alpha * colours[soft.argmax(0)]
    panels = np.concatenate([pixels, coloured, tinted], axis=1)
    picture = Image.fromarray((panels.clip(0, 1) * 255).round().astype(np.uint8))
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
