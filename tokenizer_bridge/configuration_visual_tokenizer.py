"""Configuration of :class:`~tokenizer_bridge.VisualTokenizer`: encoder, quantizer, decoder and loss weights.

The encoder and decoder are chosen by name (``encoder="conv"``): the keys of ``tokenizer_bridge.nn.ENCODERS`` /
``DECODERS``. The quantizer is one nested section whose keys are the keyword arguments of its class, as
:mod:`tokenizer_bridge.quantizers` describes::

    VisualTokenizerConfig(quantizer={"type": "vq", "codebook_size": 1024, "distance": "cosine"})
    VisualTokenizerConfig(quantizer={"type": "fsq", "levels": [8, 5, 5, 5], "num_levels": 2})

Configs and recipes written before the section existed spell the quantizer as flat keys (``quantizer="vq"``,
``codebook_size``, ``distance``, ..., ``quantizer_options``, ``residual_levels``, ``shared_codebook``,
``quantizer_dropout``). They still work: :func:`quantizer_section` maps them into the section, once, when the config
is made, and :func:`legacy_config_dict` writes a config back in that flat form for the fingerprint, so a tokenizer
saved before keeps its fingerprint (bundles store it and refuse a tokenizer whose fingerprint changed).
"""

import math
from typing import Optional

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.utils import logging

from .nn import DECODERS, ENCODERS
from .nn.labels import check_label_classes
from .quantizers import (
    RESIDUAL_KEYS,
    check_quantizer_section,
    codebook_size_of,
    section_defaults,
    section_parameters,
)

logger = logging.get_logger(__name__)

RECONSTRUCTION_LOSSES = ("l1", "l2", "l1+l2")
# decoder="diffusion": every decoder_options key and its default (None = from the conv fields, see diffusion_settings)
DIFFUSION_DEFAULTS = dict(steps=8, sampler="euler", seed=0, base_channels=None, channel_mult=[1, 2, 2],
                          cond_dropout=0.0, guidance_scale=1.0)

# The flat VQ fields of configs written before the quantizer section, with the defaults they had. Frozen: the
# fingerprints of tokenizers saved then were computed against exactly these. They took effect for quantizer="vq" only.
LEGACY_VQ_FIELDS = dict(distance="euclidean", codebook_update="learned", commitment_weight=0.25, codebook_weight=1.0,
                        ema_decay=0.99, kmeans_init=True, kmeans_iters=10, dead_code_threshold=0.04)
# Flat residual fields of those configs -> keys of the section.
LEGACY_RESIDUAL_FIELDS = {"residual_levels": "num_levels", "shared_codebook": "shared_codebook",
                          "quantizer_dropout": "quantizer_dropout"}
LEGACY_FIELDS = ("codebook_size", "quantizer_options", *LEGACY_VQ_FIELDS, *LEGACY_RESIDUAL_FIELDS)


@strict
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
    quantizer: the quantizer section: ``type`` (``"vq"``, ``"ibq"`` index backpropagation, ``"fsq"`` or ``"lfq"``)
        and that class's keyword arguments but ``dim`` (which is ``latent_dim``): e.g. ``{"type": "vq",
        "codebook_size": 1024, "distance": "cosine", "lookup_dim": 8}`` (see
        :class:`~tokenizer_bridge.quantizers.VectorQuantizer`), ``{"type": "fsq", "levels": [8, 5, 5, 5]}``,
        ``{"type": "lfq", "bits": 10}``; absent keys take the class's defaults. ``num_levels`` > 1 wraps it in a
        :class:`~tokenizer_bridge.quantizers.ResidualQuantizer` with that many levels (image ids gain a trailing
        level axis), configured by ``shared_codebook`` and ``quantizer_dropout``. Default ``{"type": "vq",
        "codebook_size": 1024}``. The flat keys of earlier versions are still accepted (see the module docstring).
    alignment_weight: weight of the VA-VAE alignment loss to a vision foundation model (attach the teacher with
        ``VisualTokenizer.set_alignment``); alignment_adaptive scales it by the ratio of gradient norms at the
        encoder's last layer.
    in_channels: image channels (3).
    base_channels, channel_mult, num_res_blocks: conv widths; ``len(channel_mult) == log2(downsample)``.
    downsample: spatial reduction factor (8 or 16): a 256 px image becomes a 32x32 (or 16x16) id map.
    latent_dim: dimension D of the latent vectors and codes.
    reconstruction_loss: ``"l1"``, ``"l2"`` or ``"l1+l2"``.
    gradient_weight: weight of an image-gradient term added to the reconstruction loss: the L1 distance between the
        horizontal and vertical pixel differences of reconstruction and target (the gradient-difference loss of
        Mathieu et al. 2016). It weighs edges and corners, which a per-pixel loss counts only by their few pixels,
        and the steps at tile seams, which the target does not have. 0 (off) by default.
    label_classes: class counts of the image-level label sets (e.g. ``[1000]`` for ImageNet classes, ``[3, 6]`` for
        two attribute columns) that a :class:`~tokenizer_bridge.nn.labels.LabelHead` predicts from the quantized
        code map during training, so the codes carry what the labels name (``None``: no head). Training passes
        ``labels`` ``(B, K)`` to ``forward`` (``-1``: unlabelled); the head is saved with the tokenizer but takes no
        part in ``encode``/``decode``.
    label_weight: weight of the head's mean cross-entropy in the training loss (1.0).
    perceptual_weight: weight of a perceptual loss; > 0 requires a perceptual module to be attached
        (``VisualTokenizer.set_perceptual_loss``) because no perceptual weights ship with the library.
    image_size: training resolution (informational; conv tokenizers work at any multiple of ``downsample``).

    ``codebook_size`` (codes per level) is read from the section, or derived from FSQ's levels / LFQ's bits.
    """

    model_type = "visual_tokenizer"
    default_quantizer = {"type": "vq", "codebook_size": 1024}

    encoder: str = "conv"
    quantizer: dict | str | None = None  # a str (the quantizer's name) only in configs of earlier versions
    decoder: str = "conv"
    in_channels: int = 3
    base_channels: int = 64
    channel_mult: list[int] | tuple[int, ...] | None = None
    num_res_blocks: int = 1
    downsample: int = 8
    latent_dim: int = 64
    encoder_options: dict | None = None
    decoder_options: dict | None = None
    alignment_weight: float | int = 0.0
    alignment_adaptive: bool = True
    reconstruction_loss: str = "l1+l2"
    perceptual_weight: float | int = 0.0
    gradient_weight: float | int = 0.0
    label_classes: list[int] | None = None
    label_weight: float | int = 1.0
    image_size: int = 256

    def __post_init__(self, **kwargs):
        self.quantizer, kept = quantizer_section(self.quantizer, pop_legacy_fields(kwargs), self.default_quantizer)
        self.channel_mult = _channel_mult(self.channel_mult, self.downsample, [1, 1, 2, 2, 4])
        self.encoder_options, self.decoder_options = dict(self.encoder_options or {}), dict(self.decoder_options or {})
        _check_names(encoder=(self.encoder, ENCODERS), decoder=(self.decoder, DECODERS),
                     reconstruction_loss=(self.reconstruction_loss, RECONSTRUCTION_LOSSES))
        self._check_architecture()
        super().__post_init__(**kwargs, **kept)

    def _check_architecture(self) -> None:
        conv = "conv" in (self.encoder, self.decoder)
        stages = _stages(self.downsample)
        if self.downsample < 2 or (conv and 2**stages != self.downsample):
            raise ValueError(f"downsample must be >= 2 and, with a conv encoder or decoder, a power of two (e.g. 8 "
                             f"or 16); got {self.downsample}")
        if conv and len(self.channel_mult) != stages:
            raise ValueError(f"channel_mult needs {stages} entries for downsample={self.downsample}, got "
                             f"{self.channel_mult}")
        if self.label_classes is not None:
            self.label_classes = check_label_classes(self.label_classes)
        if not self.label_weight >= 0:
            raise ValueError(f"label_weight must be >= 0 (0 turns the label loss off), got {self.label_weight}")
        if not self.gradient_weight >= 0:
            raise ValueError(f"gradient_weight must be >= 0 (0 turns the image-gradient loss off), got "
                             f"{self.gradient_weight}")
        if self.decoder == "diffusion" and self.gradient_weight > 0:
            raise ValueError("gradient_weight > 0 needs a pixel decoder: the diffusion decoder is trained with its "
                             "flow-matching loss only; set gradient_weight=0 or decoder='conv'/'vit'")
        if self.decoder == "diffusion":
            _check_diffusion_options(self.decoder_options, self.downsample)
            if self.perceptual_weight > 0:
                raise ValueError("perceptual_weight > 0 needs a pixel decoder: the diffusion decoder is trained with "
                                 "its flow-matching loss only; set perceptual_weight=0 or decoder='conv'/'vit'")
        if self.encoder == "foundation" and not self.encoder_options.get("config"):
            raise ValueError('encoder="foundation" needs encoder_options={"config": <the backbone config dict>}')

    @property
    def codebook_size(self) -> int:
        """Codes per level (the section's ``codebook_size``, or what FSQ's levels / LFQ's bits give)."""
        return codebook_size_of(self.quantizer)

    def get_text_config(self, decoder=None, encoder=None) -> "VisualTokenizerConfig":
        """The config itself: a visual tokenizer has no text part (transformers would otherwise take the ``decoder``
        field, an architecture name, for a text sub-config)."""
        return self

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


# ---------------------------------------------------------------------------------------------------- quantizer
def pop_legacy_fields(kwargs: dict) -> dict:
    """Remove the flat quantizer fields of earlier versions from ``kwargs`` and return them."""
    return {key: kwargs.pop(key) for key in LEGACY_FIELDS if key in kwargs}


def quantizer_section(quantizer, flat: dict, default: dict) -> tuple[dict, dict]:
    """The checked quantizer section from ``quantizer`` (a section; or, as earlier versions wrote it, a type name or
    None for ``default``'s) and ``flat``, flat fields of earlier versions, applied on top (as an override of an old
    recipe would be).

    Returns ``(section, kept)``. ``kept`` holds flat VQ fields with non-default values given with another type: the
    earlier versions ignored them, as this one does, but saved and fingerprinted them, so the config keeps them as
    plain attributes.
    """
    if isinstance(quantizer, dict):
        section = dict(quantizer)
    else:  # a type name as earlier versions took it (None: the default's), with the default settings it takes
        kind = quantizer or default["type"]
        section = {"type": kind, **{k: v for k, v in default.items() if k in section_parameters(kind)}}
    takes, defaults, kept = section_parameters(section.get("type")), section_defaults(section["type"]), {}
    for key, value in flat.items():
        if key == "quantizer_options":
            section.update(value or {})
        elif key in LEGACY_VQ_FIELDS and section["type"] != "vq":
            if value != LEGACY_VQ_FIELDS[key]:
                kept[key] = value
        elif key in takes or key in LEGACY_RESIDUAL_FIELDS:  # FSQ / LFQ derive codebook_size (as they did before)
            key = LEGACY_RESIDUAL_FIELDS.get(key, key)
            section[key] = value
            if key in defaults and _same(value, defaults[key]):
                del section[key]  # a flat field at its default adds nothing to the section
    if kept:
        logger.warning(f"the flat field(s) {sorted(kept)} apply to quantizer 'vq' only: with {section['type']!r} "
                       "they are ignored, as before, and kept in the config so that its fingerprint does not change")
    check_quantizer_section(section)
    return section, kept


def _same(value, default) -> bool:
    return value == default and isinstance(value, bool) == isinstance(default, bool)


def legacy_config_dict(config: PreTrainedConfig) -> dict:
    """``config.to_dict()`` with the quantizer section written as the flat fields of earlier versions: what
    fingerprints hash, so that tokenizers saved by those versions keep theirs."""
    values = config.to_dict()
    return {**values, **legacy_quantizer_fields(values.pop("quantizer"))}


def legacy_quantizer_fields(section: dict) -> dict:
    """A quantizer section as earlier versions' flat fields (``quantizer`` = the type name, ``codebook_size``, the
    VQ fields for ``"vq"``, ``quantizer_options`` = the other keyword arguments, the residual fields)."""
    defaults = section_defaults(section["type"])
    options = {k: v for k, v in section.items() if k not in ("type", "codebook_size", *RESIDUAL_KEYS)}
    flat = {"quantizer": section["type"], "codebook_size": codebook_size_of(section)}
    if section["type"] == "vq":
        flat.update({key: options.pop(key, defaults[key]) for key in LEGACY_VQ_FIELDS})
    flat["quantizer_options"] = options
    flat.update({old: section.get(new, defaults[new]) for old, new in LEGACY_RESIDUAL_FIELDS.items()})
    return flat


# ---------------------------------------------------------------------------------------------------- checks
def _check_names(**choices: tuple) -> None:
    """``name=(value, allowed)``: raise unless each value is one of its allowed names (a dict's keys or a tuple)."""
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def _stages(downsample: int) -> int:
    return int(round(math.log2(downsample))) if downsample > 1 else 0


def _channel_mult(channel_mult: Optional[list], downsample: int, ladder: list[int]) -> list[int]:
    """``channel_mult`` as a list; by default one entry per halving of ``downsample``, from ``ladder`` then 4s."""
    if channel_mult is not None:
        return list(channel_mult)
    stages = _stages(downsample)
    return ladder[:stages] + [4] * max(0, stages - len(ladder))


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
