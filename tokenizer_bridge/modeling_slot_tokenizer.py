"""`SlotTokenizer`: pixels -> N object-centric slots -> residual ids ``(B, N, L)`` -> pixels, as a `PreTrainedModel`.

Slot-MLLM (Chi et al. 2025): a backbone's patch features are grouped into N slots by learned queries, a Q-Former and
slot attention (:mod:`tokenizer_bridge.nn.slots`); each slot is residual-quantized into L ids, so an image becomes the
``sequence`` layout of N x L ids; a diffusion decoder (:mod:`tokenizer_bridge.nn.diffusion`) conditioned on the summed
slot codes turns ids back into pixels. The token count is a budget chosen at inference (HOOK-style): one model encodes
into any ``num_slots <= config.num_slots``, because training draws the budget from ``slot_budgets`` for every batch.
Bridged to an LLM, its ids use the ``sequence`` layout with one ``<n_b>`` budget token per trained budget after
``<boi>`` (:func:`tokenizer_bridge.interface.image_vocab_layout`), so a generated span says how many slots it holds.

``decoder="broadcast"`` swaps the diffusion decoder for the spatial-broadcast decoder of slot-attention autoencoders
(Watters et al. 2019; Locatello et al. 2020) followed by a conv upsampler: deterministic and fast to train, for
experiments and tests.

Training decodes the continuous slots for the first ``quantizer_warmup_steps`` steps and only then quantizes them:
slots of an untrained encoder are nearly identical across images, and a codebook k-means-fitted to them collapses.

Image ids are ``(B, N, L)``, or ``(B, N)`` with one level (``num_levels == 1``; the quantizers' convention: a trailing
level axis only for multi-level ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_slot_tokenizer import SlotTokenizerConfig
from .metrics import psnr
from .modeling_visual_tokenizer import config_fingerprint
from .nn import BACKBONES, SLOT_DECODERS
from .nn.slots import BroadcastDecoder, SlotEncoder, SlotEncoderOutput  # noqa: F401 (BroadcastDecoder lived here)
from .quantizers import Quantizer, QuantizerOutput, build_quantizer


@dataclass
class SlotTokenizerOutput(ModelOutput):
    """Args:
    loss: decoder loss + quantizer loss.
    reconstruction: decoded ``pixel_values`` (broadcast decoder only; a diffusion decoder reconstructs by sampling,
        see ``SlotTokenizer.decode``).
    image_ids: ``(B, N, L)`` (``(B, N)`` with one level).
    masks: slot-attention masks ``(B, N, h, w)``.
    decoder_loss: flow-matching loss (diffusion) or pixel loss (broadcast); quantizer_loss: the quantizer's.
    metrics: detached floats: ``num_slots``, ``perplexity``, ``codebook_usage``, and ``psnr`` when reconstructed.
    """

    loss: Optional[torch.Tensor] = None
    reconstruction: Optional[torch.Tensor] = None
    image_ids: Optional[torch.LongTensor] = None
    masks: Optional[torch.Tensor] = None
    decoder_loss: Optional[torch.Tensor] = None
    quantizer_loss: Optional[torch.Tensor] = None
    metrics: Optional[dict] = None


class SlotTokenizer(PreTrainedModel):
    config_class = SlotTokenizerConfig
    base_model_prefix = "slot_tokenizer"
    main_input_name = "pixel_values"
    _no_split_modules = []
    supports_gradient_checkpointing = True  # conv and ViT blocks recompute their activations when enabled

    def __init__(self, config: SlotTokenizerConfig):
        super().__init__(config)
        self.backbone = BACKBONES[config.backbone](config.in_channels, config.base_channels, config.channel_mult,
                                                   config.num_res_blocks, config.backbone_dim)
        self.slot_encoder = SlotEncoder(config.backbone_dim, config.latent_dim, config.num_slots, config.slot_iters,
                                        config.qformer_layers, config.num_heads)
        self.quantizer = build_quantizer(config.quantizer, dim=config.latent_dim)
        decoder_class = SLOT_DECODERS[config.decoder]
        if config.decoder == "diffusion":
            self.decoder = decoder_class(config.latent_dim, "tokens", config.image_size, config.in_channels,
                                         config.decoder_channels, config.decoder_channel_mult, config.num_heads,
                                         cond_dropout=config.cond_dropout)
        else:
            self.decoder = decoder_class(config.latent_dim, config.feature_grid, config.in_channels,
                                         config.base_channels, config.channel_mult, config.num_res_blocks)
        # Training forwards so far (saved: a resumed run must not warm up again).
        self.register_buffer("training_steps", torch.zeros((), dtype=torch.long))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # PyTorch's default inits (as in VisualTokenizer); learned queries keep their N(0, 1/D) construction init.
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.GRUCell, nn.LayerNorm, nn.GroupNorm)):
            module.reset_parameters()
        elif isinstance(module, Quantizer):
            module.init_derived_buffers()  # non-persistent constants are left empty by from_pretrained

    # ------------------------------------------------------------------ encoding
    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        c, f = self.config.in_channels, self.config.downsample
        if pixel_values.dim() != 4 or pixel_values.shape[1] != c:
            raise ValueError(f"pixel_values must be (B, {c}, H, W), got {tuple(pixel_values.shape)}")
        if pixel_values.shape[2] % f or pixel_values.shape[3] % f:
            raise ValueError(f"image size {tuple(pixel_values.shape[2:])} is not a multiple of downsample={f}")

    def encode_slots(self, pixel_values: torch.Tensor, num_slots: Optional[int] = None) -> SlotEncoderOutput:
        """``(B, 3, H, W)`` -> continuous slots ``(B, N, D)`` and their masks ``(B, N, h, w)`` (before quantization)."""
        self.check_pixel_values(pixel_values)
        return self.slot_encoder(self.backbone(pixel_values), num_slots)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor, num_slots: Optional[int] = None,
               return_masks: bool = False):
        """``(B, 3, H, W)`` in [-1, 1] -> image ids ``(B, N, L)`` with ``N = num_slots`` (default: the full trained
        budget ``config.full_budget``, i.e. every query unless ``slot_budgets`` stops short of ``num_slots``); with
        ``return_masks`` also the slot masks ``(B, N, h, w)``."""
        was_training = self.training
        self.eval()
        try:
            encoded = self.encode_slots(pixel_values, num_slots or self.config.full_budget)
            ids = self.quantizer(encoded.slots).image_ids
        finally:
            self.train(was_training)
        return (ids, encoded.masks) if return_masks else ids

    # ------------------------------------------------------------------ decoding
    def lookup(self, image_ids: torch.Tensor) -> torch.Tensor:
        """Image ids ``(B, N, L)`` (``(B, N)`` with one level) -> summed code vectors ``(B, N, D)``."""
        image_ids = torch.as_tensor(image_ids, device=self.device)
        expected = 2 if self.num_levels == 1 else 3
        if image_ids.dim() != expected:
            shape = "(B, N)" if expected == 2 else f"(B, N, {self.num_levels})"
            raise ValueError(f"image_ids must be {shape} for this tokenizer, got shape {tuple(image_ids.shape)}")
        if image_ids.shape[1] > self.config.num_slots:
            raise ValueError(f"{image_ids.shape[1]} slots exceed this tokenizer's num_slots={self.config.num_slots}")
        return self.quantizer.lookup(image_ids)

    @torch.no_grad()
    def decode(self, image_ids: torch.Tensor, steps: Optional[int] = None,
               generator: Optional[torch.Generator] = None, guidance_scale: Optional[float] = None) -> torch.Tensor:
        """Image ids -> ``pixel_values (B, 3, image_size, image_size)`` (not clamped). The diffusion decoder samples
        with ``steps`` Euler steps (default ``config.diffusion_steps``) from noise drawn with ``generator``."""
        codes = self.lookup(image_ids)  # (B, N, D)
        if self.config.decoder == "broadcast":
            return self.decoder(codes)[0]
        steps = steps or self.config.diffusion_steps
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        return self.decoder.sample(codes, steps=steps, generator=generator, guidance_scale=scale)

    # ------------------------------------------------------------------ training
    def training_budget(self) -> int:
        """Token budget of one training batch: drawn from ``slot_budgets`` (nested training of query prefixes)."""
        budgets = self.config.slot_budgets
        return budgets[int(torch.randint(len(budgets), ()))] if self.training else self.config.num_slots

    def forward(self, pixel_values: torch.Tensor, num_slots: Optional[int] = None,
                return_loss: bool = True) -> SlotTokenizerOutput:
        n = num_slots or self.training_budget()
        encoded = self.encode_slots(pixel_values, n)
        q = self.quantize_for_training(encoded.slots)  # quantized (B, N, D), image_ids (B, N, L)
        metrics = dict(q.metrics, num_slots=float(n))
        reconstruction, decoder_loss = None, None
        if self.config.decoder == "broadcast":
            reconstruction = self.decoder(q.quantized)[0]
            metrics["psnr"] = float(psnr(reconstruction.detach().clamp(-1, 1), pixel_values).mean())
            if return_loss:
                decoder_loss = self.pixel_loss(reconstruction, pixel_values)
        elif return_loss:
            decoder_loss = self.decoder.loss(pixel_values, q.quantized)
        loss = decoder_loss + q.loss if return_loss else None
        return SlotTokenizerOutput(loss=loss, reconstruction=reconstruction, image_ids=q.image_ids,
                                   masks=encoded.masks, decoder_loss=decoder_loss, quantizer_loss=q.loss,
                                   metrics=metrics)

    def quantize_for_training(self, slots: torch.Tensor) -> QuantizerOutput:
        """The quantizer, except during the warm-up, when the slots pass through unquantized (no image ids)."""
        if not self.training:
            return self.quantizer(slots)
        self.training_steps += 1
        if int(self.training_steps) > self.config.quantizer_warmup_steps:
            return self.quantizer(slots)
        # Zero-weighted codebook term: every parameter stays in the graph, as DDP requires.
        unused = sum(p.sum() for p in self.quantizer.parameters() if p.requires_grad) * 0.0
        return QuantizerOutput(quantized=slots, image_ids=None, loss=slots.new_zeros(()) + unused,
                               metrics={"quantizer_warmup": 1.0})

    def pixel_loss(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        kind, loss = self.config.reconstruction_loss, 0.0
        if "l1" in kind:
            loss = loss + F.l1_loss(reconstruction, target)
        if "l2" in kind:
            loss = loss + F.mse_loss(reconstruction, target)
        return loss

    # ------------------------------------------------------------------ identity
    @property
    def codebook_size(self) -> int:
        """Codes per level K: every image id lies in ``[0, K)``."""
        return self.quantizer.codebook_size

    @property
    def num_levels(self) -> int:
        """Residual levels L per slot (1 without residual quantization): the trailing id axis when > 1."""
        return self.quantizer.num_levels

    @property
    def shared_codebook(self) -> bool:
        """Whether every residual level looks its ids up in one codebook (False with a single level)."""
        return self.quantizer.shared_codebook

    @property
    def id_layout(self) -> str:
        """``"sequence"``: an image becomes ``(N[, L])`` ids, one per slot, ``N`` one of :attr:`budgets`."""
        return "sequence"

    @property
    def budgets(self) -> tuple[int, ...]:
        """The token budgets (slot counts) it was trained with, ascending (``config.slot_budgets``)."""
        return tuple(self.config.slot_budgets)

    def fingerprint(self) -> str:
        """Same identity rule as ``VisualTokenizer.fingerprint``: SHA-256 over the architecture config and every
        weight."""
        return config_fingerprint(self.config, self.state_dict())
