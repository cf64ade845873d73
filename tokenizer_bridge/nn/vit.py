"""Vision-transformer encoder and decoder for grid tokenizers at any resolution and aspect ratio.

Follows the AToken recipe (Lu et al. 2025, "AToken: A Unified Tokenizer for Vision"): pixels are cut into ``p x p``
patches and run through pre-norm transformer blocks whose attention uses **2-D rotary position embeddings** (RoPE,
Su et al. 2021, applied per axis as in Heo et al. 2024, "Rotary Position Embedding for Vision Transformer"). Half of
each head's channels rotate with the patch's row, the other half with its column, so attention scores depend only on
relative offsets and nothing is tied to a training resolution: a 256x384 image simply becomes a 16x24 id map
(patch 16) without resizing to a square. The decoder mirrors the encoder (tokens -> blocks -> a linear map to
``p * p * 3`` pixels per token -> unpatchify).

Shapes: pixel_values ``(B, 3, H, W)`` -> latents ``(B, D, H/p, W/p)`` -> pixel_values ``(B, 3, H, W)``.

**Mixed sizes in one batch.** Images of different sizes share a batch without resizing: :func:`pad_images` pads them
at the bottom and right to a common size and returns each image's size; ``ViTEncoder(pixel_values, image_sizes)`` and
``ViTDecoder(latents, grid_sizes)`` then mask the padding tokens out of every attention (as keys), so each image's
tokens see only its own tokens. Because padding is at the bottom/right, a token keeps its (row, column) and hence its
RoPE angles, and the result for each image equals encoding/decoding it alone (up to float rounding); padded
positions of the outputs are zero.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .conv import run_blocks


def rope_angles(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, theta: float = 100.0) -> torch.Tensor:
    """Rotation angles ``(N, head_dim // 2)`` for tokens at positions ``(rows[n], cols[n])``.

    Angle pair ``i < head_dim // 4`` turns with the row, the rest with the column; frequencies are
    ``theta ** (-i / (head_dim // 4))`` per axis. Computed on the fly (no buffers) so loading never leaves them empty.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    inv_freq = theta ** (-torch.arange(quarter, dtype=torch.float32, device=rows.device) / quarter)  # (hd/4,)
    return torch.cat([rows.float()[:, None] * inv_freq, cols.float()[:, None] * inv_freq], dim=1)  # (N, hd/2)


def grid_angles(height: int, width: int, head_dim: int, theta: float = 100.0, device=None) -> torch.Tensor:
    """:func:`rope_angles` for a row-major ``height x width`` token grid -> ``(height * width, head_dim // 2)``."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return rope_angles(rows, cols, head_dim, theta)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs ``(x[2i], x[2i+1])`` of ``x (..., N, head_dim)`` by ``angles (N, head_dim / 2)``."""
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def pad_images(images: Sequence[torch.Tensor], multiple: int = 1) -> tuple[torch.Tensor, torch.LongTensor]:
    """Images ``(C, H_i, W_i)`` of different sizes -> a zero-padded batch ``(B, C, max H, max W)`` (padding at the
    bottom and right) and their sizes ``(B, 2)`` as ``(H_i, W_i)``. Every side must be a multiple of ``multiple``
    (the patch size), so no patch mixes image and padding."""
    if len(images) == 0:
        raise ValueError("pad_images needs at least one image")
    channels = {im.shape[0] if im.dim() == 3 else None for im in images}
    if None in channels or len(channels) > 1:
        shapes = [tuple(im.shape) for im in images]
        raise ValueError(f"images must all be (C, H, W) with the same C, got shapes {shapes}")
    sizes = torch.tensor([tuple(im.shape[-2:]) for im in images], dtype=torch.long)
    if (sizes % multiple).any():
        bad = [tuple(s) for s in sizes.tolist() if s[0] % multiple or s[1] % multiple]
        raise ValueError(f"image sizes {bad} are not multiples of the patch size {multiple}")
    height, width = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    batch = images[0].new_zeros(len(images), images[0].shape[0], height, width)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[1], : im.shape[2]] = im
    return batch, sizes


def grid_mask(grid_sizes: Union[torch.Tensor, Sequence[Sequence[int]]], height: int, width: int,
              device=None) -> torch.Tensor:
    """Boolean ``(B, height * width)``: True for the row-major tokens of a ``height x width`` grid that lie inside
    each sample's ``(h_i, w_i)`` top-left part."""
    sizes = torch.as_tensor(grid_sizes, dtype=torch.long, device=device)
    if sizes.dim() != 2 or sizes.shape[1] != 2:
        raise ValueError(f"sizes must be (B, 2) as (height, width) per sample, got shape {tuple(sizes.shape)}")
    if (sizes < 1).any() or (sizes[:, 0] > height).any() or (sizes[:, 1] > width).any():
        raise ValueError(f"sizes {sizes.tolist()} must lie in [1, {height}] x [1, {width}] (the padded grid)")
    rows = torch.arange(height, device=sizes.device).view(1, height, 1) < sizes[:, 0].view(-1, 1, 1)
    cols = torch.arange(width, device=sizes.device).view(1, 1, width) < sizes[:, 1].view(-1, 1, 1)
    return (rows & cols).flatten(1)


class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, angles: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``mask``: True where a query may attend to a key, broadcast to ``(B, heads, N, N)``: ``(B, 1, 1, N)`` for keys
        only, ``(B or 1, 1, N, N)`` per query (:func:`attention_mask`); None: all."""
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
        q, k = apply_rope(qkv[:2], angles)  # one rotation for queries and keys: half the kernel launches
        out = F.scaled_dot_product_attention(q, k, qkv[2], attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1, self.attn = nn.LayerNorm(width, eps=1e-6), Attention(width, num_heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, angles: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), angles, mask)
        return x + self.mlp(self.norm2(x))


class ViTStack(nn.Module):
    """Blocks sharing one 2-D RoPE over an ``h x w`` token grid: ``(B, h*w, width)`` -> same shape."""

    def __init__(self, width: int, depth: int, num_heads: int, mlp_ratio: float, rope_theta: float,
                 attention_radius: Optional[int] = None):
        super().__init__()
        if width % num_heads or (width // num_heads) % 4:
            raise ValueError(f"width {width} must split into {num_heads} heads of a size divisible by 4")
        check_attention_radius(attention_radius)
        self.head_dim, self.rope_theta, self.attention_radius = width // num_heads, rope_theta, attention_radius
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.gradient_checkpointing = False  # set by PreTrainedModel.gradient_checkpointing_enable

    def forward(self, tokens: torch.Tensor, height: int, width: int,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``mask (B, height * width)``: True for real tokens; padding tokens are never attended to."""
        angles = grid_angles(height, width, self.head_dim, self.rope_theta, tokens.device)
        if self.attention_radius is not None and self.attention_radius < max(height, width) - 1:
            mask = attention_mask(height, width, self.attention_radius, mask, tokens.device)
        elif mask is not None:  # global attention, or a window that spans the grid (the same, and unmasked is faster)
            mask = mask[:, None, None, :]  # (B, 1, 1, N): keys only
        return self.norm(run_blocks(self, self.blocks, tokens, angles, mask))


def check_attention_radius(radius) -> None:
    """The ``attention_radius`` option of :class:`ViTEncoder` / :class:`ViTDecoder`: None or an integer >= 1."""
    if radius is not None and (isinstance(radius, bool) or not isinstance(radius, int) or radius < 1):
        raise ValueError(f"attention_radius must be null (global attention) or an integer >= 1, got {radius!r}")


def attention_mask(height: int, width: int, radius: int, keys: Optional[torch.Tensor] = None,
                   device=None) -> torch.Tensor:
    """Boolean ``(B or 1, 1, N, N)`` for a row-major ``height x width`` grid (``N = height * width``): a token attends
    to the tokens at most ``radius`` rows and ``radius`` columns away (a ``(2r+1) x (2r+1)`` neighbourhood, as in
    neighbourhood attention), and, with ``keys (B, N)``, only to the True ones among them (padding excluded; a
    padding token attends to itself alone).

    Local attention sees the same relative offsets at every image size, so a tokenizer trained on small grids does not
    meet offsets it never trained on when it encodes or decodes a large image."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    near = ((rows[:, None] - rows[None, :]).abs() <= radius) & ((cols[:, None] - cols[None, :]).abs() <= radius)
    if keys is None:
        return near[None, None]  # (1, 1, N, N)
    # a padding query far from every real token keeps itself as a key (no all-masked row, hence no NaN); no real
    # query ever attends to padding
    self_only = torch.eye(len(rows), dtype=torch.bool, device=device)
    return ((near[None] & keys[:, None, :].to(near.device)) | self_only)[:, None]


def vit_sizes(base_channels: int, channel_mult: Sequence[int], num_res_blocks: int, width: Optional[int],
              depth: Optional[int], num_heads: Optional[int], patch_size: Optional[int]) -> tuple[int, int, int, int]:
    """``(width, depth, num_heads, patch_size)`` from explicit values, else from the conv-style arguments:
    width ``base_channels * channel_mult[-1]``, depth ``num_res_blocks * len(channel_mult)``, one head per 64 channels,
    patch ``2 ** len(channel_mult)`` (the config's ``downsample``)."""
    width = width or base_channels * channel_mult[-1]
    depth = depth or num_res_blocks * len(channel_mult)
    num_heads = num_heads or max(1, width // 64)
    patch_size = patch_size or 2 ** len(channel_mult)
    return width, depth, num_heads, patch_size


def check_overlap(overlap, patch_size: int) -> None:
    """The ``overlap`` option of :class:`ViTEncoder` / :class:`ViTDecoder`: a bool, and only with an even patch size
    (the 2p x 2p windows and footprints are centred on their patches)."""
    if not isinstance(overlap, bool):
        raise ValueError(f"overlap must be true or false, got {overlap!r}")
    if overlap and patch_size % 2:
        raise ValueError(f"overlap needs an even patch size (2p windows centred on patches), got {patch_size}")


def tent_window(stride: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The ``(2 * stride,)`` tent ``1 - |x - stride| / stride`` sampled at pixel centres: shifted by ``stride`` its
    copies sum to exactly one, so overlap-added footprints blend neighbours like bilinear interpolation."""
    x = torch.arange(2 * stride, dtype=dtype, device=device) + 0.5
    return 1 - (x - stride).abs() / stride


def overlap_add(patches: torch.Tensor, h: int, w: int, p: int, channels: int,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(B, h*w, C*2p*2p)`` footprints (one per token, row-major, channel-major inside) -> ``(B, C, h*p, w*p)``.

    Each footprint covers its token's ``p x p`` patch and half a patch around it; it is weighted by the separable
    tent window and the overlapping footprints are summed, then divided by the summed weights, which is one inside
    the image and less on the outer half-patch ring (where a single row or column of tokens reaches). With
    ``mask (B, h*w)`` the False (padding) tokens add nothing, so a real pixel is made from real tokens only; the
    caller zeroes the padding pixels that real footprints reach into.
    """
    b, k = patches.shape[0], 2 * p
    window = tent_window(p, patches.dtype, patches.device)
    window = (window[:, None] * window[None, :]).flatten()  # (k*k,)
    weights = window.expand(1, h * w, k * k)
    if mask is not None:
        weights = weights * mask.to(patches.dtype).unsqueeze(-1)  # (B, h*w, k*k)
    patches = patches.view(b, h * w, channels, k * k) * weights.unsqueeze(2)
    fold = dict(output_size=(h * p, w * p), kernel_size=k, stride=p, padding=p // 2)
    image = F.fold(patches.flatten(2).transpose(1, 2), **fold)  # (B, C, H, W)
    total = F.fold(weights.transpose(1, 2), **fold)  # (1 or B, 1, H, W)
    return image / total.clamp_min(torch.finfo(patches.dtype).tiny) * (total > 0).to(patches.dtype)


def tiles_to_footprints(tensor: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """A tile decoder's output layer (``weight (C*p*p, width)`` or ``bias (C*p*p,)``, channel-major) as the output
    layer of an ``overlap=True`` decoder (``C*2p*2p`` rows): each ``p x p`` tile is extended by half a patch on every
    side with copies of its edge pixels. A token that painted a flat tile then paints the same flat footprint, so the
    overlap decoder starts as the tile decoder with its seams blended, and a retrained decoder (``train.freeze`` of
    the encoder and quantizer) starts from there instead of from a random head."""
    p = patch_size
    if tensor.shape[0] != channels * p * p:
        raise ValueError(f"a tile output layer has {channels * p * p} rows ({channels} channels x {p} x {p}), got "
                         f"{tensor.shape[0]}")
    rows = (torch.arange(2 * p, device=tensor.device) - p // 2).clamp(0, p - 1)  # footprint row -> tile row
    tiles = tensor.reshape(channels, p, p, *tensor.shape[1:])
    return tiles[:, rows][:, :, rows].reshape(channels * 4 * p * p, *tensor.shape[1:]).clone()


class ViTEncoder(nn.Module):
    """``(B, in_ch, H, W)`` -> latents ``(B, latent_dim, H / p, W / p)`` for any ``H, W`` divisible by ``p``.

    Takes the :class:`~tokenizer_bridge.nn.conv.ConvEncoder` arguments (so it drops into ``ENCODERS``); the keyword-only
    ``width``, ``depth``, ``num_heads`` and ``patch_size`` override the sizes derived from them (:func:`vit_sizes`).
    ``overlap=True`` embeds each patch from a ``2p x 2p`` window centred on it (zero beyond the image, the same zeros
    a bottom/right-padded batch holds, so padded and lone encodings still agree) instead of its ``p x p`` pixels.
    ``attention_radius=r`` lets each token attend only to the tokens within ``r`` rows and columns of it
    (:func:`attention_mask`); None (default) attends globally.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, channel_mult: Sequence[int] = (1, 1, 2, 2),
                 num_res_blocks: int = 1, latent_dim: int = 64, *, width: Optional[int] = None,
                 depth: Optional[int] = None, num_heads: Optional[int] = None, patch_size: Optional[int] = None,
                 mlp_ratio: float = 4.0, rope_theta: float = 100.0, overlap: bool = False,
                 attention_radius: Optional[int] = None):
        super().__init__()
        width, depth, num_heads, self.patch_size = vit_sizes(
            base_channels, channel_mult, num_res_blocks, width, depth, num_heads, patch_size)
        check_overlap(overlap, self.patch_size)
        p = self.patch_size
        self.patch_embed = (nn.Conv2d(in_channels, width, 2 * p, stride=p, padding=p // 2) if overlap
                            else nn.Conv2d(in_channels, width, p, stride=p))
        self.stack = ViTStack(width, depth, num_heads, mlp_ratio, rope_theta, attention_radius)
        self.out = nn.Linear(width, latent_dim)

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight of the layer that emits the latents (for adaptive loss weights)."""
        return self.out.weight

    def forward(self, pixel_values: torch.Tensor, image_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``image_sizes (B, 2)``: the ``(H_i, W_i)`` of each image inside a bottom/right-padded batch (see
        :func:`pad_images`); the latents of the padding are zero."""
        b, _, height, width = pixel_values.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
        mask = None
        if image_sizes is not None:
            sizes = torch.as_tensor(image_sizes, dtype=torch.long, device=pixel_values.device)
            if sizes.shape != (b, 2) or (sizes % p).any():
                raise ValueError(f"image_sizes must be ({b}, 2) multiples of the patch size {p}, got {sizes.tolist()}")
            mask = grid_mask(sizes // p, height // p, width // p)
        tokens = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # (B, h*w, width)
        tokens = self.out(self.stack(tokens, height // p, width // p, mask))  # (B, h*w, D)
        if mask is not None:
            tokens = tokens * mask.unsqueeze(-1).to(tokens.dtype)
        return tokens.transpose(1, 2).reshape(b, -1, height // p, width // p)


class ViTDecoder(nn.Module):
    """Latents ``(B, latent_dim, h, w)`` -> ``(B, out_ch, h * p, w * p)``; mirrors :class:`ViTEncoder`.

    Each token becomes its ``p x p`` pixels through one linear layer, so outputs are tiles that meet at hard edges.
    ``overlap=True`` instead lets each token paint a ``2p x 2p`` footprint centred on its patch, weighted by a tent
    (bilinear) window and overlap-added (:func:`overlap_add`): every pixel is a blend of the four nearest tokens'
    predictions whose weights vary smoothly with position and sum to one, so there are no seams (a token emitting one
    flat colour gives the bilinear interpolation of the token colours). It needs an even ``p``.
    ``refine_channels > 0`` adds a residual 3x3-conv refinement over the whole image after the tiles are put together
    (``x + conv(gelu(conv(x)))``, the second conv zero-initialised so training starts from the tiles), which can smooth
    the seams; it is convolutional, so it works at every image size (in a padded mixed-size batch the pixels next to
    a sample's padding see zeros). 0 (default) keeps the plain tiles. ``attention_radius`` as in :class:`ViTEncoder`.
    """

    def __init__(self, out_channels: int = 3, base_channels: int = 64, channel_mult: Sequence[int] = (1, 1, 2, 2),
                 num_res_blocks: int = 1, latent_dim: int = 64, *, width: Optional[int] = None,
                 depth: Optional[int] = None, num_heads: Optional[int] = None, patch_size: Optional[int] = None,
                 mlp_ratio: float = 4.0, rope_theta: float = 100.0, refine_channels: int = 0,
                 overlap: bool = False, attention_radius: Optional[int] = None):
        super().__init__()
        width, depth, num_heads, self.patch_size = vit_sizes(
            base_channels, channel_mult, num_res_blocks, width, depth, num_heads, patch_size)
        check_overlap(overlap, self.patch_size)
        self.out_channels, self.overlap = out_channels, overlap
        self.embed = nn.Linear(latent_dim, width)
        self.stack = ViTStack(width, depth, num_heads, mlp_ratio, rope_theta, attention_radius)
        footprint = 2 * self.patch_size if overlap else self.patch_size
        self.out = nn.Linear(width, footprint * footprint * out_channels)
        if isinstance(refine_channels, bool) or not isinstance(refine_channels, int) or refine_channels < 0:
            raise ValueError(f"refine_channels must be an integer >= 0, got {refine_channels!r}")
        self.refine = None
        if refine_channels:
            self.refine = nn.Sequential(nn.Conv2d(out_channels, refine_channels, 3, padding=1), nn.GELU(),
                                        nn.Conv2d(refine_channels, out_channels, 3, padding=1))
            nn.init.zeros_(self.refine[2].weight)
            nn.init.zeros_(self.refine[2].bias)

    def forward(self, latents: torch.Tensor, grid_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``grid_sizes (B, 2)``: the ``(h_i, w_i)`` token grid of each sample inside a bottom/right-padded batch of
        latents; the pixels of the padding are zero."""
        b, _, h, w = latents.shape
        p, c = self.patch_size, self.out_channels
        mask = grid_mask(grid_sizes, h, w, latents.device) if grid_sizes is not None else None
        if mask is not None and mask.shape[0] != b:
            raise ValueError(f"grid_sizes has {mask.shape[0]} rows for a batch of {b}")
        tokens = self.embed(latents.flatten(2).transpose(1, 2))  # (B, h*w, width)
        patches = self.out(self.stack(tokens, h, w, mask))  # (B, h*w, k*k*C), k = p or 2p
        if self.overlap:
            image = overlap_add(patches, h, w, p, c, mask)
        else:
            if mask is not None:
                patches = patches * mask.unsqueeze(-1).to(patches.dtype)
            patches = patches.view(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, h, p, w, p)
            image = patches.reshape(b, c, h * p, w * p)
        if self.refine is not None:
            image = image + self.refine(image)
        if mask is not None and (self.overlap or self.refine is not None):  # the padding stays zero
            pixels = mask.view(b, 1, h, 1, w, 1).expand(b, 1, h, p, w, p).reshape(b, 1, h * p, w * p)
            image = image * pixels.to(image.dtype)
        return image
