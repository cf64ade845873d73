"""The published research tokenizers that ship as raw PyTorch/Lightning checkpoints, reimplemented so that their
weights load key for key and they behave as visual tokenizers of this library:

- **IBQ** (Shi et al., 2024, "Taming Scalable Visual Tokenizer for Autoregressive Image Generation",
  arXiv:2412.02692; TencentARC/SEED-Voken ``src/IBQ``): the VQGAN encoder/decoder (:class:`~.nn.vqgan.TamingEncoder`)
  with ``quant_conv``/``post_quant_conv`` and the index-backpropagation quantizer: the id of a latent ``z`` is the
  argmax over the softmax of its dot products with every code (no normalisation), its code the raw embedding row.
- **Open-MAGVIT2** (Luo et al., 2024, arXiv:2409.04410; ``src/Open_MAGVIT2``): the improved encoder/decoder
  (:mod:`~.nn.magvit2`) and lookup-free quantization: bit ``i`` of the id is ``z_i > 0`` (channel 0 = least
  significant bit), the code of an id its bits mapped to +-1. No ``quant_conv``. Its AR models predict the id as two
  sub-tokens (``factorized_bits=[6, 12]``: the 6 low bits, then the 12 high ones), which is the factorized image
  vocabulary ``ImageLayout(factors=config.factors)`` = ``factors=[2**6, 2**12]`` (sub-token 0 = low digits).
- **LlamaGen VQ** (Sun et al., 2024, arXiv:2406.06525; FoundationVision/LlamaGen ``tokenizer/tokenizer_image``,
  ds8 and ds16): its VQGAN layout (:class:`~.nn.vqgan.LlamaGenEncoder`) and an l2-normalised codebook: the id is
  the argmin of ``|z|^2 + |e|^2 - 2 z.e`` over normalised latent and codes, its code the normalised row.

``encode(pixel_values in [-1, 1]) -> image_ids (B, h, w)``, ``decode(image_ids) -> pixel_values`` (not clamped), and
the properties every visual tokenizer answers (``codebook_size``, ``num_levels``, ``shared_codebook``,
``id_layout``, ``fingerprint()``, ``config.downsample``, ``config.grid_size``). Frozen: there are no training losses.
Checkpoint conversion (which keys, EMA weights, safe unpickling) is :mod:`.published_checkpoints`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from .configuration_published_vq import ARCHITECTURE_FIELDS, PublishedVQConfig
from .modeling_visual_tokenizer import VisualTokenizerOutput, state_fingerprint
from .nn.magvit2 import MagvitDecoder, MagvitEncoder
from .nn.vqgan import LlamaGenDecoder, LlamaGenEncoder, TamingDecoder, TamingEncoder

TILE_ELEMENTS = 2**24  # distances or logits computed at a time: bounded memory for 2^18-code codebooks


def _row_chunks(flat: torch.Tensor, codes: int):
    step = max(1, TILE_ELEMENTS // max(codes, 1))
    for start in range(0, flat.shape[0], step):
        yield flat[start : start + step]


class IndexPropagationCodebook(nn.Module):
    """IBQ's codebook: ``quantize.embedding`` ``(K, D)``; ids by the argmax of ``softmax(z . e)``."""

    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)

    def ids(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, D, h, w)`` -> ``(B, h, w)``."""
        b, d, h, w = latents.shape
        codes = self.embedding.weight
        flat = latents.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
        # The original takes the max of the softmax, not of the logits; kept, so that ties resolve the same way.
        ids = [torch.softmax(rows @ codes.t(), dim=1).max(dim=1)[1] for rows in _row_chunks(flat, codes.shape[0])]
        return torch.cat(ids).view(b, h, w)

    def codes(self, image_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(image_ids).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)


class LlamaGenCodebook(nn.Module):
    """LlamaGen's codebook: ``quantize.embedding`` (and the ``codebook_used`` buffer its trainer keeps)."""

    def __init__(self, codebook_size: int, dim: int, l2_norm: bool, show_usage: bool):
        super().__init__()
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(codebook_size, dim)
        if show_usage:
            self.register_buffer("codebook_used", torch.zeros(65536))

    def _table(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, p=2, dim=-1) if self.l2_norm else self.embedding.weight

    def ids(self, latents: torch.Tensor) -> torch.Tensor:
        b, d, h, w = latents.shape
        flat = latents.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
        flat = F.normalize(flat, p=2, dim=-1) if self.l2_norm else flat
        table = self._table()
        table_sq = torch.sum(table**2, dim=1)
        ids = [torch.argmin(torch.sum(rows**2, dim=1, keepdim=True) + table_sq - 2 * (rows @ table.t()), dim=1)
               for rows in _row_chunks(flat, table.shape[0])]
        return torch.cat(ids).view(b, h, w)

    def codes(self, image_ids: torch.Tensor) -> torch.Tensor:
        return self._table()[image_ids].permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)


class LookupFreeBits(nn.Module):
    """Open-MAGVIT2's LFQ: one bit per latent channel, no parameters."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def _weights(self, device) -> torch.Tensor:
        return 2 ** torch.arange(self.bits, device=device, dtype=torch.long)  # (D,): channel i = bit i

    def ids(self, latents: torch.Tensor) -> torch.Tensor:
        weights = self._weights(latents.device).view(1, -1, 1, 1)
        return ((latents > 0).long() * weights).sum(dim=1)  # (B, h, w)

    def codes(self, image_ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        bits = (image_ids.unsqueeze(-1) & self._weights(image_ids.device)) != 0  # (B, h, w, D)
        return (bits.to(dtype) * 2.0 - 1.0).permute(0, 3, 1, 2).contiguous()


def _networks(config: PublishedVQConfig) -> tuple[nn.Module, nn.Module, nn.Module]:
    c = config
    if c.family == "ibq":
        arch = dict(ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks, attn_resolutions=c.attn_resolutions,
                    resolution=c.resolution, z_channels=c.z_channels, dropout=c.dropout)
        return (TamingEncoder(in_channels=c.in_channels, **arch), TamingDecoder(out_ch=c.out_ch, **arch),
                IndexPropagationCodebook(c.codebook_size, c.embed_dim))
    if c.family == "llamagen":
        arch = dict(ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks, z_channels=c.z_channels,
                    dropout=c.dropout)
        return (LlamaGenEncoder(in_channels=c.in_channels, **arch), LlamaGenDecoder(out_ch=c.out_ch, **arch),
                LlamaGenCodebook(c.codebook_size, c.embed_dim, c.codebook_l2_norm, c.codebook_show_usage))
    arch = dict(ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks, z_channels=c.z_channels)
    return (MagvitEncoder(in_channels=c.in_channels, **arch), MagvitDecoder(out_ch=c.out_ch, **arch),
            LookupFreeBits(c.z_channels))


class PublishedVQTokenizer(PreTrainedModel):
    """IBQ, Open-MAGVIT2 or LlamaGen VQ (``config.family``) as a visual tokenizer; parameter names are the
    original's (``encoder.*``, ``decoder.*``, ``quantize.*``, ``quant_conv.*``, ``post_quant_conv.*``)."""

    config_class = PublishedVQConfig
    base_model_prefix = "published_vq_tokenizer"
    main_input_name = "pixel_values"
    _no_split_modules = []

    def __init__(self, config: PublishedVQConfig):
        super().__init__(config)
        self.encoder, self.decoder, self.quantize = _networks(config)
        if config.family != "open_magvit2":
            self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.post_init()
        self.eval()

    def _init_weights(self, module: nn.Module) -> None:
        # PyTorch's default init: these models are loaded from checkpoints, random weights only serve tests.
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.Embedding)):
            module.reset_parameters()
        elif isinstance(module, nn.GroupNorm) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ VisualTokenizer interface
    @property
    def codebook_size(self) -> int:
        """Codes K: every image id lies in ``[0, K)``."""
        return self.config.codebook_size

    @property
    def num_levels(self) -> int:
        return 1

    @property
    def shared_codebook(self) -> bool:
        return False

    @property
    def id_layout(self) -> str:
        """``"grid"``: an image becomes an ``(h, w)`` id map (``config.grid_size``)."""
        return "grid"

    @property
    def quantizer(self) -> nn.Module:
        return self.quantize

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.in_channels:
            raise ValueError(f"pixel_values must be (B, {self.config.in_channels}, H, W) in [-1, 1], got "
                             f"{tuple(pixel_values.shape)}")
        self.config.grid_size(pixel_values.shape[2], pixel_values.shape[3])

    def encode_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> latents ``(B, D, h, w)`` in the codebook's space (before quantization)."""
        self.check_pixel_values(pixel_values)
        h = self.encoder(pixel_values.to(self.device, self.dtype))
        return self.quant_conv(h) if hasattr(self, "quant_conv") else h

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """``(B, 3, H, W)`` in [-1, 1] -> image ids ``(B, h, w)``."""
        return self.quantize.ids(self.encode_latents(pixel_values))

    def check_image_ids(self, image_ids) -> torch.Tensor:
        image_ids = torch.as_tensor(image_ids, device=self.device)
        if image_ids.dim() != 3 or image_ids.is_floating_point() or image_ids.dtype == torch.bool:
            raise ValueError(f"image_ids must be integers of shape (B, h, w), got {image_ids.dtype} "
                             f"{tuple(image_ids.shape)}")
        if image_ids.numel() and (image_ids.min() < 0 or image_ids.max() >= self.codebook_size):
            raise ValueError(f"image ids must lie in [0, {self.codebook_size}), got [{int(image_ids.min())}, "
                             f"{int(image_ids.max())}]")
        return image_ids.long()

    @torch.no_grad()
    def decode(self, image_ids: torch.Tensor) -> torch.Tensor:
        """Image ids ``(B, h, w)`` -> ``pixel_values`` ``(B, 3, H, W)`` (not clamped)."""
        codes = self.quantize.codes(self.check_image_ids(image_ids)).to(self.dtype)  # (B, D, h, w)
        if hasattr(self, "post_quant_conv"):
            codes = self.post_quant_conv(codes)
        return self.decoder(codes)

    def forward(self, pixel_values: torch.Tensor) -> VisualTokenizerOutput:
        """Ids and their reconstruction; no losses (the published tokenizers are used frozen)."""
        image_ids = self.encode(pixel_values)
        return VisualTokenizerOutput(reconstruction=self.decode(image_ids), image_ids=image_ids)

    def fingerprint(self) -> str:
        """SHA-256 over the family, the architecture and every weight: equal iff the ids are the same."""
        arch = {name: getattr(self.config, name) for name in ARCHITECTURE_FIELDS}
        return state_fingerprint(arch, self.state_dict())


AutoConfig.register(PublishedVQConfig.model_type, PublishedVQConfig, exist_ok=True)
AutoModel.register(PublishedVQConfig, PublishedVQTokenizer, exist_ok=True)
