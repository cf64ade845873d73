"""Configuration of :class:`~tokenizer_bridge.VisualTokenizer`: encoder, quantizer, decoder and loss weights.

The encoder, quantizer and decoder are chosen by name (``encoder="conv"``, ``quantizer="vq"``, ...); the strings are
turned into classes in exactly one dict per choice (see ``modeling_visual_tokenizer.py`` and ``quantizers/``).
"""

from __future__ import annotations

import math
from typing import Optional

from transformers import PreTrainedConfig

ENCODER_NAMES = ("conv", "vit", "foundation")
DECODER_NAMES = ("conv", "vit", "diffusion")
# decoder="diffusion": every decoder_options key and its default (None = from the conv fields, see diffusion_settings)
DIFFUSION_DEFAULTS = dict(steps=8, sampler="euler", seed=0, base_channels=None, channel_mult=[1, 2, 2],
                          cond_dropout=0.0, guidance_scale=1.0)
QUANTIZER_NAMES = ("vq", "ibq", "fsq", "lfq")
RECONSTRUCTION_LOSSES = ("l1", "l2", "l1+l2")


class VisualTokenizerConfig(PreTrainedConfig):
    """Args:
    encoder / decoder: architecture names: ``"conv"``, ``"vit"`` (any resolution, 2-D RoPE, patch = ``downsample``),
        or for the encoder ``"foundation"`` (an HF vision backbone; ``encoder_options={"config": {...}}`` holds its
        config so reloading never needs the original path; load its weights with
        ``model.encoder.backbone.load_pretrained_weights(path)``), or for the decoder ``"diffusion"`` (a conditional
        rectified-flow U-Net, :class:`~tokenizer_bridge.nn.diffusion.DiffusionDecoder`, conditioned on the quantized
        code map and trained with its flow-matching loss; ``decode`` samples, deterministically for a given seed).
    encoder_options / decoder_options: extra keyword arguments of the encoder/decoder class (ViT: ``width``,
        ``depth``, ``num_heads``; foundation: ``config``, ``layers``, ``fusion``, ``trainable_layers``). For the
        diffusion decoder: ``steps`` (default sampling steps, 8), ``sampler`` (``"euler"`` or ``"heun"``), ``seed``
        (of the sampling noise when ``decode`` is given no generator, 0), ``base_channels`` (U-Net width, default
        the config's ``base_channels``), ``channel_mult`` (U-Net levels, ``[1, 2, 2]``; ``2 ** (len - 1)`` must
        divide ``downsample``), ``cond_dropout`` and ``guidance_scale`` (classifier-free guidance, off by default).
    alignment_weight: weight of the VA-VAE alignment loss to a vision foundation model (attach the teacher with
        ``VisualTokenizer.set_alignment``); alignment_adaptive scales it by the ratio of gradient norms at the
        encoder's last layer.
    quantizer: quantizer name: ``"vq"``, ``"ibq"`` (index backpropagation), ``"fsq"`` (needs ``quantizer_options={"levels": [...]}``) or ``"lfq"``
        (needs ``quantizer_options={"bits": b}``); ``codebook_size`` is then derived from the levels / bits.
    quantizer_options: extra keyword arguments of the quantizer class (e.g. ``lookup_dim`` for VQ, ``spherical`` or
        ``entropy_weight`` for LFQ); passed straight through, never re-declared here.
    residual_levels: > 1 wraps the quantizer in a :class:`~tokenizer_bridge.quantizers.ResidualQuantizer` with this
        many levels (image ids gain a trailing level axis); shared_codebook and quantizer_dropout configure it.
    in_channels: image channels (3).
    base_channels, channel_mult, num_res_blocks: conv widths; ``len(channel_mult) == log2(downsample)``.
    downsample: spatial reduction factor (8 or 16): a 256 px image becomes a 32x32 (or 16x16) id map.
    latent_dim: dimension D of the latent vectors and codes.
    codebook_size: number of codes K.
    distance, codebook_update, commitment_weight, codebook_weight, ema_decay, kmeans_init, kmeans_iters,
    dead_code_threshold: see :class:`~tokenizer_bridge.quantizers.VectorQuantizer`.
    reconstruction_loss: ``"l1"``, ``"l2"`` or ``"l1+l2"``.
    perceptual_weight: weight of a perceptual loss; > 0 requires a perceptual module to be attached
        (``VisualTokenizer.set_perceptual_loss``) because no perceptual weights ship with the library.
    image_size: training resolution (informational; conv tokenizers work at any multiple of ``downsample``).
    """

    model_type = "visual_tokenizer"

    def __init__(
        self,
        encoder: str = "conv",
        quantizer: str = "vq",
        decoder: str = "conv",
        in_channels: int = 3,
        base_channels: int = 64,
        channel_mult: Optional[list[int]] = None,
        num_res_blocks: int = 1,
        downsample: int = 8,
        latent_dim: int = 64,
        codebook_size: int = 1024,
        distance: str = "euclidean",
        codebook_update: str = "learned",
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        ema_decay: float = 0.99,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 0.04,
        encoder_options: Optional[dict] = None,
        decoder_options: Optional[dict] = None,
        alignment_weight: float = 0.0,
        alignment_adaptive: bool = True,
        quantizer_options: Optional[dict] = None,
        residual_levels: int = 1,
        shared_codebook: bool = False,
        quantizer_dropout: float = 0.0,
        reconstruction_loss: str = "l1+l2",
        perceptual_weight: float = 0.0,
        image_size: int = 256,
        **kwargs,
    ):
        stages = int(round(math.log2(downsample))) if downsample > 1 else 0
        conv = "conv" in (encoder, decoder)
        if downsample < 2 or (conv and 2**stages != downsample):
            raise ValueError(
                f"downsample must be >= 2 and, with a conv encoder or decoder, a power of two (e.g. 8 or 16); "
                f"got {downsample}"
            )
        default_mult = [1, 1, 2, 2, 4][:stages] + [4] * max(0, stages - 5)
        channel_mult = list(channel_mult) if channel_mult is not None else default_mult
        if conv and len(channel_mult) != stages:
            raise ValueError(f"channel_mult needs {stages} entries for downsample={downsample}, got {channel_mult}")
        if decoder == "diffusion":
            _check_diffusion_options(dict(decoder_options or {}), downsample)
            if perceptual_weight > 0:
                raise ValueError("perceptual_weight > 0 needs a pixel decoder: the diffusion decoder is trained with "
                                 "its flow-matching loss only; set perceptual_weight=0 or decoder='conv'/'vit'")
        if encoder == "foundation" and not (encoder_options or {}).get("config"):
            raise ValueError('encoder="foundation" needs encoder_options={"config": <the backbone config dict>}')
        for name, value, allowed in (
            ("encoder", encoder, ENCODER_NAMES),
            ("decoder", decoder, DECODER_NAMES),
            ("quantizer", quantizer, QUANTIZER_NAMES),
            ("reconstruction_loss", reconstruction_loss, RECONSTRUCTION_LOSSES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        quantizer_options = dict(quantizer_options or {})
        codebook_size = _derived_codebook_size(quantizer, quantizer_options, codebook_size)
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be at least 2, got {codebook_size}")
        if residual_levels < 1:
            raise ValueError(f"residual_levels must be >= 1, got {residual_levels}")
        self.encoder, self.quantizer, self.decoder = encoder, quantizer, decoder
        self.in_channels, self.base_channels = in_channels, base_channels
        self.channel_mult, self.num_res_blocks = channel_mult, num_res_blocks
        self.downsample, self.latent_dim, self.codebook_size = downsample, latent_dim, codebook_size
        self.distance, self.codebook_update = distance, codebook_update
        self.commitment_weight, self.codebook_weight, self.ema_decay = commitment_weight, codebook_weight, ema_decay
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.dead_code_threshold = dead_code_threshold
        self.encoder_options, self.decoder_options = dict(encoder_options or {}), dict(decoder_options or {})
        self.alignment_weight, self.alignment_adaptive = alignment_weight, alignment_adaptive
        self.quantizer_options, self.residual_levels = quantizer_options, residual_levels
        self.shared_codebook, self.quantizer_dropout = shared_codebook, quantizer_dropout
        self.reconstruction_loss, self.perceptual_weight = reconstruction_loss, perceptual_weight
        self.image_size = image_size
        super().__init__(**kwargs)

    def quantizer_kwargs(self) -> dict:
        """Keyword arguments of the quantizer class named by ``quantizer`` (one level)."""
        if self.quantizer == "ibq":
            return dict(dim=self.latent_dim, codebook_size=self.codebook_size, **self.quantizer_options)
        if self.quantizer != "vq":
            return dict(dim=self.latent_dim, **self.quantizer_options)
        return dict(
            dim=self.latent_dim,
            codebook_size=self.codebook_size,
            distance=self.distance,
            codebook_update=self.codebook_update,
            commitment_weight=self.commitment_weight,
            codebook_weight=self.codebook_weight,
            ema_decay=self.ema_decay,
            kmeans_init=self.kmeans_init,
            kmeans_iters=self.kmeans_iters,
            dead_code_threshold=self.dead_code_threshold,
            **self.quantizer_options,
        )

    def diffusion_settings(self) -> dict:
        """``decoder_options`` of a diffusion decoder with every default filled in (see ``DIFFUSION_DEFAULTS``)."""
        if self.decoder != "diffusion":
            raise ValueError(f"diffusion_settings() needs decoder='diffusion', this config has "
                             f"decoder={self.decoder!r}")
        settings = {**DIFFUSION_DEFAULTS, **self.decoder_options}
        if settings["base_channels"] is None:
            settings["base_channels"] = self.base_channels
        settings["channel_mult"] = list(settings["channel_mult"])
        return settings

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Id-map size for an image of ``height x width`` pixels."""
        if height % self.downsample or width % self.downsample:
            raise ValueError(f"image size {height}x{width} is not a multiple of downsample={self.downsample}")
        return height // self.downsample, width // self.downsample


def _check_diffusion_options(options: dict, downsample: int) -> None:
    """Clear errors for ``decoder_options`` of ``decoder="diffusion"``."""
    unknown = sorted(set(options) - set(DIFFUSION_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown decoder_options {unknown} for decoder='diffusion'; allowed: "
                         f"{sorted(DIFFUSION_DEFAULTS)}")
    settings = {**DIFFUSION_DEFAULTS, **options}
    steps = settings["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"decoder_options steps must be an integer >= 1, got {steps!r}")
    if settings["sampler"] not in ("euler", "heun"):
        raise ValueError(f"decoder_options sampler must be 'euler' or 'heun', got {settings['sampler']!r}")
    if isinstance(settings["seed"], bool) or not isinstance(settings["seed"], int):
        raise ValueError(f"decoder_options seed must be an integer, got {settings['seed']!r}")
    width = settings["base_channels"]
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ValueError(f"decoder_options base_channels must be a positive integer, got {width!r}")
    mult = settings["channel_mult"]
    if not isinstance(mult, (list, tuple)) or not mult or any(
            isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mult):
        raise ValueError(f"decoder_options channel_mult must be a non-empty list of positive integers, got {mult!r}")
    factor = 2 ** (len(mult) - 1)
    if downsample % factor:
        raise ValueError(f"the diffusion U-Net with channel_mult={list(mult)} halves the resolution {len(mult) - 1} "
                         f"times, so {factor} must divide downsample={downsample}; use fewer levels")
    if not 0.0 <= settings["cond_dropout"] < 1.0:
        raise ValueError(f"decoder_options cond_dropout must lie in [0, 1), got {settings['cond_dropout']}")
    scale = settings["guidance_scale"]
    if scale < 0:
        raise ValueError(f"decoder_options guidance_scale must be >= 0, got {scale}")
    if scale != 1.0 and settings["cond_dropout"] == 0:
        raise ValueError(f"decoder_options guidance_scale={scale} needs an unconditional model: set cond_dropout > 0 "
                         "(e.g. 0.1) so training also sees zeroed conditions")


def _derived_codebook_size(quantizer: str, options: dict, codebook_size: int) -> int:
    """FSQ and LFQ fix their codebook size by their levels / bits; VQ takes ``codebook_size`` as given."""
    if quantizer == "fsq":
        if "levels" not in options:
            raise ValueError('quantizer="fsq" needs quantizer_options={"levels": [...]}, e.g. [8, 5, 5, 5]')
        return math.prod(int(level) for level in options["levels"])
    if quantizer == "lfq":
        if "bits" not in options:
            raise ValueError('quantizer="lfq" needs quantizer_options={"bits": b} (2**b codes)')
        return 2 ** int(options["bits"])
    return codebook_size
