"""Configuration of :class:`~tokenizer_bridge.SlotTokenizer`: conv backbone, Q-Former + slot attention over learned
queries (the token budgets), residual quantizer, and a diffusion or spatial-broadcast decoder (Slot-MLLM style).

The quantizer is one nested section, exactly as for :class:`~tokenizer_bridge.VisualTokenizerConfig` (whose module
also maps the flat quantizer fields of earlier versions); backbone and decoder names are the keys of
``tokenizer_bridge.nn.BACKBONES`` / ``SLOT_DECODERS``.
"""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .configuration_visual_tokenizer import (
    RECONSTRUCTION_LOSSES,
    _channel_mult,
    _check_names,
    _stages,
    pop_legacy_fields,
    quantizer_section,
)
from .nn import BACKBONES, SLOT_DECODERS
from .quantizers import codebook_size_of


@strict
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
    quantizer: the quantizer section, as in :class:`~tokenizer_bridge.VisualTokenizerConfig` (``type``, the class's
        keyword arguments, ``num_levels`` / ``shared_codebook`` / ``quantizer_dropout``; one level has
        ``codebook_size`` codes). Default ``{"type": "vq", "codebook_size": 1024, "num_levels": 2}``: slots are
        residual-quantized into two ids each.
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
    default_quantizer = {"type": "vq", "codebook_size": 1024, "num_levels": 2}

    backbone: str = "conv"
    in_channels: int = 3
    base_channels: int = 32
    channel_mult: list[int] | tuple[int, ...] | None = None
    num_res_blocks: int = 1
    downsample: int = 4
    backbone_dim: int = 64
    latent_dim: int = 64
    num_slots: int = 32
    slot_budgets: list[int] | tuple[int, ...] | None = None
    slot_iters: int = 3
    qformer_layers: int = 1
    num_heads: int = 4
    quantizer: dict | str | None = None  # a str (the quantizer's name) only in configs of earlier versions
    quantizer_warmup_steps: int = 500
    decoder: str = "diffusion"
    decoder_channels: int = 32
    decoder_channel_mult: list[int] | tuple[int, ...] | None = None
    diffusion_steps: int = 25
    cond_dropout: float | int = 0.1
    guidance_scale: float | int = 1.0
    reconstruction_loss: str = "l1+l2"
    image_size: int = 32

    def __post_init__(self, **kwargs):
        self.quantizer, kept = quantizer_section(self.quantizer, pop_legacy_fields(kwargs), self.default_quantizer)
        self.channel_mult = _channel_mult(self.channel_mult, self.downsample, [1, 2, 2, 4, 4])
        mult = self.decoder_channel_mult
        self.decoder_channel_mult = list(mult) if mult is not None else [1, 2, 2]
        budgets = self.slot_budgets
        self.slot_budgets = sorted({int(n) for n in budgets}) if budgets else [self.num_slots]
        _check_names(backbone=(self.backbone, BACKBONES), decoder=(self.decoder, SLOT_DECODERS),
                     reconstruction_loss=(self.reconstruction_loss, RECONSTRUCTION_LOSSES))
        self._check_sizes()
        super().__post_init__(**kwargs, **kept)

    def _check_sizes(self) -> None:
        stages = _stages(self.downsample)
        if stages < 1 or 2**stages != self.downsample:
            raise ValueError(f"downsample must be a power of two >= 2, got {self.downsample}")
        if len(self.channel_mult) != stages:
            raise ValueError(f"channel_mult needs {stages} entries for downsample={self.downsample}, got "
                             f"{self.channel_mult}")
        if self.slot_budgets[0] < 1 or self.slot_budgets[-1] > self.num_slots:
            raise ValueError(f"slot_budgets must lie in [1, num_slots={self.num_slots}], got {self.slot_budgets}")
        factor = 2 ** (len(self.decoder_channel_mult) - 1)
        if self.image_size % self.downsample or self.image_size % factor:
            raise ValueError(f"image_size={self.image_size} must be a multiple of downsample={self.downsample} and "
                             f"of the diffusion U-Net's factor {factor}")

    @property
    def codebook_size(self) -> int:
        """Codes per level (the section's ``codebook_size``, or what FSQ's levels / LFQ's bits give)."""
        return codebook_size_of(self.quantizer)

    def get_text_config(self, decoder=None, encoder=None) -> "SlotTokenizerConfig":
        """The config itself: a slot tokenizer has no text part (see ``VisualTokenizerConfig.get_text_config``)."""
        return self

    @property
    def full_budget(self) -> int:
        """The largest trained token budget (``max(slot_budgets)``): what ``encode`` uses by default."""
        return self.slot_budgets[-1]

    @property
    def feature_grid(self) -> tuple[int, int]:
        """Backbone feature grid at ``image_size`` (the slot masks' resolution)."""
        return self.image_size // self.downsample, self.image_size // self.downsample
