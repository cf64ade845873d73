"""Configuration of :class:`~tokenizer_bridge.SlotTokenizer`: conv backbone, Q-Former + slot attention over learned
queries (the token budgets), residual quantizer, and a diffusion or spatial-broadcast decoder (Slot-MLLM style)."""

from __future__ import annotations

import math
from typing import Optional

from transformers import PreTrainedConfig

from .configuration_visual_tokenizer import (
    RECONSTRUCTION_LOSSES,
    VisualTokenizerConfig,
    _derived_codebook_size,
)
from .nn.conv import ConvEncoder
from .quantizers import QUANTIZERS

BACKBONES = {"conv": ConvEncoder}
SLOT_DECODERS = ("diffusion", "broadcast")


class SlotTokenizerConfig(PreTrainedConfig):
    """Args:
    backbone: patch-feature network (``"conv"``: :class:`~tokenizer_bridge.nn.conv.ConvEncoder`).
    in_channels, base_channels, channel_mult, num_res_blocks, downsample: the conv backbone (and the broadcast
        decoder's upsampler, its mirror); ``len(channel_mult) == log2(downsample)``.
    backbone_dim: channels of the backbone features.
    latent_dim: slot dimension D (the latents the quantizer sees, and the code dimension).
    num_slots: learned queries = the largest token budget.
    slot_budgets: budgets drawn uniformly per training batch (nested training); default ``[num_slots]``.
    slot_iters, qformer_layers, num_heads: slot attention iterations, Q-Former blocks, attention heads.
    quantizer, codebook_size, residual_levels, shared_codebook, quantizer_dropout, distance, codebook_update,
    commitment_weight, codebook_weight, ema_decay, kmeans_init, kmeans_iters, dead_code_threshold,
    quantizer_options: as in :class:`~tokenizer_bridge.VisualTokenizerConfig` (one level has ``codebook_size`` codes).
    quantizer_warmup_steps: training steps that decode the continuous slots before quantization starts; the k-means
        codebook init then sees trained slots (at initialisation every image's slots are nearly the same vectors,
        and a codebook fitted to them collapses to a few codes that carry no information about the image).
    decoder: ``"diffusion"`` (flow-matching U-Net) or ``"broadcast"`` (spatial-broadcast + conv, deterministic).
    decoder_channels, decoder_channel_mult: widths of the diffusion U-Net.
    diffusion_steps: default Euler steps of ``decode``; cond_dropout, guidance_scale: classifier-free guidance.
    reconstruction_loss: pixel loss of the broadcast decoder (``"l1"``, ``"l2"`` or ``"l1+l2"``).
    image_size: the size ``decode`` produces (slots carry no spatial size) and the training resolution.
    """

    model_type = "slot_tokenizer"

    def __init__(
        self,
        backbone: str = "conv",
        in_channels: int = 3,
        base_channels: int = 32,
        channel_mult: Optional[list[int]] = None,
        num_res_blocks: int = 1,
        downsample: int = 4,
        backbone_dim: int = 64,
        latent_dim: int = 64,
        num_slots: int = 32,
        slot_budgets: Optional[list[int]] = None,
        slot_iters: int = 3,
        qformer_layers: int = 1,
        num_heads: int = 4,
        quantizer: str = "vq",
        codebook_size: int = 1024,
        residual_levels: int = 2,
        shared_codebook: bool = False,
        quantizer_dropout: float = 0.0,
        quantizer_warmup_steps: int = 500,
        distance: str = "euclidean",
        codebook_update: str = "learned",
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        ema_decay: float = 0.99,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 0.04,
        quantizer_options: Optional[dict] = None,
        decoder: str = "diffusion",
        decoder_channels: int = 32,
        decoder_channel_mult: Optional[list[int]] = None,
        diffusion_steps: int = 25,
        cond_dropout: float = 0.1,
        guidance_scale: float = 1.0,
        reconstruction_loss: str = "l1+l2",
        image_size: int = 32,
        **kwargs,
    ):
        stages = int(round(math.log2(downsample))) if downsample > 0 else -1
        if stages < 1 or 2**stages != downsample:
            raise ValueError(f"downsample must be a power of two >= 2, got {downsample}")
        if channel_mult is None:
            channel_mult = [1, 2, 2, 4, 4][:stages] + [4] * max(0, stages - 5)
        channel_mult = list(channel_mult)
        if len(channel_mult) != stages:
            raise ValueError(f"channel_mult needs {stages} entries for downsample={downsample}, got {channel_mult}")
        slot_budgets = sorted({int(n) for n in slot_budgets}) if slot_budgets else [num_slots]
        if slot_budgets[0] < 1 or slot_budgets[-1] > num_slots:
            raise ValueError(f"slot_budgets must lie in [1, num_slots={num_slots}], got {slot_budgets}")
        for name, value, allowed in (("backbone", backbone, tuple(BACKBONES)), ("decoder", decoder, SLOT_DECODERS),
                                     ("quantizer", quantizer, tuple(QUANTIZERS)),
                                     ("reconstruction_loss", reconstruction_loss, RECONSTRUCTION_LOSSES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        decoder_channel_mult = list(decoder_channel_mult) if decoder_channel_mult is not None else [1, 2, 2]
        if image_size % downsample or image_size % 2 ** (len(decoder_channel_mult) - 1):
            raise ValueError(f"image_size={image_size} must be a multiple of downsample={downsample} and of the "
                             f"diffusion U-Net's factor {2 ** (len(decoder_channel_mult) - 1)}")
        if residual_levels < 1:
            raise ValueError(f"residual_levels must be >= 1, got {residual_levels}")
        quantizer_options = dict(quantizer_options or {})
        self.backbone, self.in_channels, self.base_channels = backbone, in_channels, base_channels
        self.channel_mult, self.num_res_blocks, self.downsample = channel_mult, num_res_blocks, downsample
        self.backbone_dim, self.latent_dim = backbone_dim, latent_dim
        self.num_slots, self.slot_budgets = num_slots, slot_budgets
        self.slot_iters, self.qformer_layers, self.num_heads = slot_iters, qformer_layers, num_heads
        self.quantizer, self.residual_levels = quantizer, residual_levels
        self.codebook_size = _derived_codebook_size(quantizer, quantizer_options, codebook_size)
        self.shared_codebook, self.quantizer_dropout = shared_codebook, quantizer_dropout
        self.quantizer_warmup_steps = quantizer_warmup_steps
        self.distance, self.codebook_update = distance, codebook_update
        self.commitment_weight, self.codebook_weight, self.ema_decay = commitment_weight, codebook_weight, ema_decay
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.dead_code_threshold, self.quantizer_options = dead_code_threshold, quantizer_options
        self.decoder, self.decoder_channels, self.decoder_channel_mult = decoder, decoder_channels, decoder_channel_mult
        self.diffusion_steps, self.cond_dropout, self.guidance_scale = diffusion_steps, cond_dropout, guidance_scale
        self.reconstruction_loss, self.image_size = reconstruction_loss, image_size
        super().__init__(**kwargs)

    # The quantizer fields mean exactly what they mean for VisualTokenizerConfig.
    quantizer_kwargs = VisualTokenizerConfig.quantizer_kwargs

    @property
    def full_budget(self) -> int:
        """The largest trained token budget (``max(slot_budgets)``): what ``encode`` uses by default."""
        return self.slot_budgets[-1]

    @property
    def feature_grid(self) -> tuple[int, int]:
        """Backbone feature grid at ``image_size`` (the slot masks' resolution)."""
        return self.image_size // self.downsample, self.image_size // self.downsample
