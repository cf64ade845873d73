"""`VisualTokenizer`: pixels -> discrete image ids -> pixels, as a Hugging Face `PreTrainedModel`.

``encode(pixel_values) -> image_ids``, ``decode(image_ids) -> pixel_values`` and ``forward(pixel_values) ->
VisualTokenizerOutput`` (reconstruction, losses, metrics). The encoder and decoder are picked by config names
through the dicts of :mod:`tokenizer_bridge.nn`, the quantizer from the config's quantizer section
(:func:`~tokenizer_bridge.quantizers.build_quantizer`). Follows the VQGAN recipe (Esser et al. 2021): a perceptual
loss plugs in through :meth:`VisualTokenizer.set_perceptual_loss`, and the adversarial term is added by the trainer
(:class:`~tokenizer_bridge.nn.adversarial.AdversarialLoss`, balanced against ``nll_loss`` at
:meth:`VisualTokenizer.decoder_last_layer`), so the discriminator is never part of this model.
``decoder="diffusion"`` replaces the pixel decoder by a conditional rectified-flow U-Net
(:mod:`tokenizer_bridge.nn.diffusion`) that reads the quantized code map: training minimises its flow-matching loss
(through the codes, so the encoder trains too) and ``decode`` samples in a few steps from seeded noise, so the same
ids always give the same pixels. ``encode_images`` / ``decode_images`` take lists of images / id maps of different
sizes (one masked batch for ViT encoders and decoders).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_visual_tokenizer import (
    LEGACY_VQ_FIELDS,
    VisualTokenizerConfig,
    legacy_config_dict,
)
from .metrics import psnr
from .nn import DECODERS, ENCODERS
from .nn.foundation import (
    VisionBackbone,
    adaptive_weight,
    last_layer_weight,
)
from .nn.labels import LabelHead
from .nn.vit import pad_images
from .quantizers import Quantizer, build_quantizer


def build_encoder(config: VisualTokenizerConfig) -> nn.Module:
    options = dict(config.encoder_options)
    if config.encoder == "foundation":
        backbone = VisionBackbone.from_config(options.pop("config"))
        return ENCODERS["foundation"](backbone, config.latent_dim, **options)
    if config.encoder == "vit":
        options.setdefault("patch_size", config.downsample)
    return ENCODERS[config.encoder](in_channels=config.in_channels, **_conv_arch(config), **options)


def build_decoder(config: VisualTokenizerConfig) -> nn.Module:
    if config.decoder == "diffusion":
        settings = config.diffusion_settings()
        return DECODERS["diffusion"](
            cond_dim=config.latent_dim, cond_type="map", image_size=config.image_size, out_channels=config.in_channels,
            base_channels=settings["base_channels"], channel_mult=settings["channel_mult"],
            map_scale=config.downsample, cond_dropout=settings["cond_dropout"])
    options = dict(config.decoder_options)
    if config.decoder == "vit":
        options.setdefault("patch_size", config.downsample)
    return DECODERS[config.decoder](out_channels=config.in_channels, **_conv_arch(config), **options)


def _conv_arch(config: VisualTokenizerConfig) -> dict:
    return dict(base_channels=config.base_channels, channel_mult=config.channel_mult,
                num_res_blocks=config.num_res_blocks, latent_dim=config.latent_dim)


def gradient_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between the horizontal and between the vertical neighbour differences of two (B, C, H, W)
    images (each direction averaged over its own pixels, then the two averaged)."""
    return (F.l1_loss(reconstruction.diff(dim=-1), target.diff(dim=-1))
            + F.l1_loss(reconstruction.diff(dim=-2), target.diff(dim=-2))) / 2


@dataclass
class VisualTokenizerOutput(ModelOutput):
    """Args:
    loss: total training loss (reconstruction + quantizer + weighted perceptual).
    reconstruction: decoded ``pixel_values`` ``(B, 3, H, W)``; with a diffusion decoder only in eval mode (sampled
        as ``decode`` does, with the default seed), None in training.
    image_ids: ``(B, h, w)`` code indices.
    reconstruction_loss, quantizer_loss, perceptual_loss, alignment_loss, label_loss: the loss terms (None when
        unused; the alignment and label terms are already weighted). With a diffusion decoder ``reconstruction_loss`` is its flow-matching
        loss.
    nll_loss: ``reconstruction_loss + perceptual_weight * perceptual_loss``, VQGAN's "nll": the term an adversarial
        loss is balanced against (its adaptive weight).
    metrics: detached floats: ``psnr`` (dB, mean over the batch; only when there is a reconstruction),
        ``codebook_usage``, ``perplexity``; with labels, ``label_accuracy_<k>`` of each label set.
    """

    loss: Optional[torch.Tensor] = None
    reconstruction: Optional[torch.Tensor] = None
    image_ids: Optional[torch.LongTensor] = None
    reconstruction_loss: Optional[torch.Tensor] = None
    quantizer_loss: Optional[torch.Tensor] = None
    perceptual_loss: Optional[torch.Tensor] = None
    alignment_loss: Optional[torch.Tensor] = None
    label_loss: Optional[torch.Tensor] = None
    nll_loss: Optional[torch.Tensor] = None
    metrics: Optional[dict] = None


def state_fingerprint(arch: dict, state_dict: dict) -> str:
    """SHA-256 of an architecture description and every tensor of a state dict (in name order, as float32)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(arch, sort_keys=True, default=str).encode())
    for name, tensor in sorted(state_dict.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class VisualTokenizer(PreTrainedModel):
    config_class = VisualTokenizerConfig
    base_model_prefix = "visual_tokenizer"
    main_input_name = "pixel_values"
    _no_split_modules = []
    supports_gradient_checkpointing = True  # conv and ViT blocks recompute their activations when enabled

    def __init__(self, config: VisualTokenizerConfig):
        super().__init__(config)
        self.encoder = build_encoder(config)
        self.quantizer = build_quantizer(config.quantizer, dim=config.latent_dim)
        self.decoder = build_decoder(config)
        if config.label_classes:  # training-time supervision of the codes (tokenizer_bridge.nn.labels)
            self.label_head = LabelHead(config.latent_dim, config.label_classes)
        self._perceptual: Optional[Callable] = None
        self._alignment: Optional[nn.Module] = None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # PyTorch's default (Kaiming-uniform) conv init trains these residual stacks well; HF's N(0, 0.02) does not.
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.reset_parameters()
        elif isinstance(module, nn.GroupNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, Quantizer):
            module.init_derived_buffers()  # non-persistent constants are left empty by from_pretrained

    # ------------------------------------------------------------------ public API
    def set_perceptual_loss(self, loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]) -> None:
        """Attach a perceptual loss ``loss_fn(reconstruction, target) -> scalar`` (weights are not saved with us)."""
        object.__setattr__(self, "_perceptual", loss_fn)  # a loss network is not ours: keep it out of state_dict

    def set_alignment(self, alignment: Optional[nn.Module]) -> None:
        """Attach a VA-VAE alignment module ``alignment(latents, pixel_values) -> AlignmentOutput`` (e.g.
        ``FoundationAlignment.from_pretrained(path, latent_dim)``); its projection must be in the optimizer, its
        teacher is not saved with this model."""
        object.__setattr__(self, "_alignment", alignment)

    def decoder_last_layer(self) -> nn.Parameter:
        """The weight of the decoder's output layer, where VQGAN's adaptive adversarial weight compares gradients."""
        if self.config.decoder == "diffusion":
            raise ValueError("an adversarial loss needs a pixel decoder ('conv' or 'vit'), not decoder='diffusion'")
        return last_layer_weight(self.decoder)

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.in_channels:
            raise ValueError(
                f"pixel_values must be (B, {self.config.in_channels}, H, W), got {tuple(pixel_values.shape)}"
            )
        self.config.grid_size(pixel_values.shape[2], pixel_values.shape[3])

    def encode_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> continuous latents ``(B, D, h, w)`` (before quantization)."""
        self.check_pixel_values(pixel_values)
        return self.encoder(pixel_values)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """``(B, 3, H, W)`` in [-1, 1] -> image ids ``(B, h, w)``."""
        was_training = self.training
        self.eval()
        try:
            return self.quantizer(self.encode_latents(pixel_values)).image_ids
        finally:
            self.train(was_training)

    def decode(self, image_ids: torch.Tensor, steps: Optional[int] = None,
               generator: Optional[torch.Generator] = None, guidance_scale: Optional[float] = None,
               sampler: Optional[str] = None) -> torch.Tensor:
        """Image ids ``(B, h, w)`` (``(B, h, w, L)`` with residual levels) -> ``pixel_values`` ``(B, 3, H, W)``
        (not clamped).

        A diffusion decoder samples: ``steps`` / ``sampler`` / ``guidance_scale`` default to its ``decoder_options``,
        and the noise comes from ``generator``, by default a CPU generator seeded with ``decoder_options["seed"]``,
        so the same ids always decode to the same pixels. The other decoders ignore these arguments.
        """
        image_ids = torch.as_tensor(image_ids, device=self.device)
        expected = 3 if self.quantizer.num_levels == 1 else 4
        if image_ids.dim() != expected:
            shape = "(B, h, w)" if expected == 3 else f"(B, h, w, {self.quantizer.num_levels})"
            raise ValueError(f"image_ids must be {shape} for this tokenizer, got shape {tuple(image_ids.shape)}")
        return self.decode_codes(self.quantizer.lookup(image_ids), steps, generator, guidance_scale, sampler)

    def decode_codes(self, codes: torch.Tensor, steps: Optional[int] = None,
                     generator: Optional[torch.Generator] = None, guidance_scale: Optional[float] = None,
                     sampler: Optional[str] = None) -> torch.Tensor:
        """Quantized code map ``(B, D, h, w)`` -> ``pixel_values`` ``(B, 3, H, W)`` (see :meth:`decode`)."""
        if self.config.decoder != "diffusion":
            return self.decoder(codes)
        settings = self.config.diffusion_settings()
        if generator is None:
            generator = torch.Generator().manual_seed(settings["seed"])
        return self.decoder.sample(
            codes, steps=settings["steps"] if steps is None else steps, generator=generator,
            guidance_scale=settings["guidance_scale"] if guidance_scale is None else guidance_scale,
            sampler=sampler or settings["sampler"])

    # ------------------------------------------------------------------ mixed sizes
    @torch.no_grad()
    def encode_images(self, images: Sequence[torch.Tensor]) -> list[torch.LongTensor]:
        """Images ``(3, H_i, W_i)`` of different sizes (each side a multiple of ``downsample``) -> one id map
        ``(h_i, w_i)`` (``(h_i, w_i, L)`` with residual levels) per image, without resizing.

        A ViT encoder takes them as one bottom/right-padded batch whose padding is masked out of attention (the ids
        equal encoding each image alone); other encoders run one batch per distinct size.
        """
        sizes = self._check_image_list(images)
        was_training = self.training
        self.eval()
        try:
            if self.config.encoder != "vit":
                return self._per_size(images, sizes, lambda batch: self.encode(batch.to(self.device)))
            batch, sizes = pad_images([im.to(self.device) for im in images], self.config.downsample)
            ids = self.quantizer(self.encoder(batch, sizes)).image_ids  # (B, h_max, w_max[, L])
            return [ids[i, :h, :w] for i, (h, w) in enumerate((sizes // self.config.downsample).tolist())]
        finally:
            self.train(was_training)

    @torch.no_grad()
    def decode_images(self, image_ids: Sequence[torch.Tensor], **decode_kwargs) -> list[torch.Tensor]:
        """Id maps ``(h_i, w_i)`` (``(h_i, w_i, L)`` with residual levels) of different sizes -> ``pixel_values``
        ``(3, h_i * downsample, w_i * downsample)`` each (not clamped). A ViT decoder decodes them as one padded,
        masked batch; other decoders run one batch per distinct size (``decode_kwargs`` go to :meth:`decode`)."""
        extra = 0 if self.quantizer.num_levels == 1 else 1
        image_ids = [torch.as_tensor(ids, device=self.device) for ids in image_ids]
        bad = [tuple(ids.shape) for ids in image_ids if ids.dim() != 2 + extra
               or (extra and ids.shape[-1] != self.quantizer.num_levels)]
        if not image_ids or bad:
            shape = "(h, w)" if not extra else f"(h, w, {self.quantizer.num_levels})"
            raise ValueError(f"decode_images needs a non-empty list of {shape} id maps, got shapes {bad}")
        grids = [tuple(ids.shape[:2]) for ids in image_ids]
        if self.config.decoder != "vit":
            return self._per_size(image_ids, grids, lambda batch: self.decode(batch, **decode_kwargs))
        height, width = max(g[0] for g in grids), max(g[1] for g in grids)
        padded = image_ids[0].new_zeros(len(image_ids), height, width, *image_ids[0].shape[2:])
        for i, ids in enumerate(image_ids):
            padded[i, : ids.shape[0], : ids.shape[1]] = ids
        pixels = self.decoder(self.quantizer.lookup(padded), torch.tensor(grids))
        f = self.config.downsample
        return [pixels[i, :, : h * f, : w * f] for i, (h, w) in enumerate(grids)]

    def _check_image_list(self, images: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
        c = self.config.in_channels
        bad = [tuple(im.shape) for im in images if im.dim() != 3 or im.shape[0] != c]
        if not images or bad:
            raise ValueError(f"encode_images needs a non-empty list of ({c}, H, W) images, got shapes {bad}")
        for im in images:
            self.config.grid_size(im.shape[1], im.shape[2])
        return [tuple(im.shape[1:]) for im in images]

    @staticmethod
    def _per_size(items: Sequence[torch.Tensor], sizes: Sequence[tuple], fn: Callable) -> list[torch.Tensor]:
        """``fn`` on one stacked batch per distinct size; results back in input order."""
        out: list[Optional[torch.Tensor]] = [None] * len(items)
        for size in dict.fromkeys(sizes):
            members = [i for i, s in enumerate(sizes) if s == size]
            for i, result in zip(members, fn(torch.stack([items[i] for i in members]))):
                out[i] = result
        return out

    def forward(self, pixel_values: torch.Tensor, return_loss: bool = True,
                labels: Optional[torch.Tensor] = None) -> VisualTokenizerOutput:
        """Encode, quantize, decode and (with ``return_loss``) the training loss. ``labels`` ``(B, K)``: image-level
        labels for the label head (``config.label_classes``; ``-1`` = unlabelled), whose weighted loss is added."""
        if labels is not None and not self.config.label_classes:
            raise ValueError("labels were given but this tokenizer has no label head: set label_classes in its config")
        latents = self.encode_latents(pixel_values)  # (B, D, h, w)
        q = self.quantizer(latents)
        diffusion = self.config.decoder == "diffusion"
        if diffusion:  # sampling is many network calls: only outside training
            reconstruction = None if self.training and return_loss else self.decode_codes(q.quantized.detach())
        else:
            reconstruction = self.decoder(q.quantized)  # (B, 3, H, W)
        metrics = dict(q.metrics)
        if reconstruction is not None:
            metrics["psnr"] = float(psnr(reconstruction.detach().clamp(-1, 1), pixel_values).mean())
        if not return_loss:
            return VisualTokenizerOutput(reconstruction=reconstruction, image_ids=q.image_ids, metrics=metrics)
        if diffusion:
            rec_loss = self.decoder.loss(pixel_values, q.quantized)
        else:
            rec_loss = self.reconstruction_loss(reconstruction, pixel_values)
        perceptual = self.perceptual_loss(reconstruction, pixel_values)
        main = rec_loss + (self.config.perceptual_weight * perceptual if perceptual is not None else 0.0)
        alignment = self.alignment_loss(latents, pixel_values, main)
        loss = main + q.loss + (alignment if alignment is not None else 0.0)
        label_loss = None
        if labels is not None and self.config.label_weight > 0:
            label_loss, label_metrics = self.label_head.loss(q.quantized, labels)
            label_loss = self.config.label_weight * label_loss
            loss, metrics = loss + label_loss, metrics | label_metrics
        return VisualTokenizerOutput(
            loss=loss,
            reconstruction=reconstruction,
            image_ids=q.image_ids,
            reconstruction_loss=rec_loss,
            quantizer_loss=q.loss,
            perceptual_loss=perceptual,
            alignment_loss=alignment,
            label_loss=label_loss,
            nll_loss=main,
            metrics=metrics,
        )

    def alignment_loss(self, latents: torch.Tensor, pixel_values: torch.Tensor, main_loss) -> Optional[torch.Tensor]:
        """Weighted VA-VAE alignment term (None when ``alignment_weight`` is 0)."""
        if self.config.alignment_weight <= 0:
            return None
        if self._alignment is None:
            raise ValueError("alignment_weight > 0 but no alignment module is attached: call model.set_alignment(...)")
        aux = self._alignment(latents, pixel_values).loss
        weight = self.config.alignment_weight
        if self.config.alignment_adaptive and torch.is_grad_enabled():
            weight = weight * adaptive_weight(main_loss, aux, last_layer_weight(self.encoder))
        return weight * aux

    def reconstruction_loss(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        kind = self.config.reconstruction_loss
        loss = 0.0
        if "l1" in kind:
            loss = loss + F.l1_loss(reconstruction, target)
        if "l2" in kind:
            loss = loss + F.mse_loss(reconstruction, target)
        if self.config.gradient_weight > 0:
            loss = loss + self.config.gradient_weight * gradient_loss(reconstruction, target)
        return loss

    def perceptual_loss(self, reconstruction: torch.Tensor, target: torch.Tensor) -> Optional[torch.Tensor]:
        if self.config.perceptual_weight <= 0:
            return None
        if self._perceptual is None:
            raise ValueError(
                "perceptual_weight > 0 but no perceptual loss is attached: no perceptual-network weights ship with "
                "tokenizer-bridge; load one from a path and call model.set_perceptual_loss(fn), or set "
                "perceptual_weight=0"
            )
        return self._perceptual(reconstruction, target)

    # ------------------------------------------------------------------ identity
    @property
    def codebook_size(self) -> int:
        """Codes per level K: every image id lies in ``[0, K)``."""
        return self.quantizer.codebook_size

    @property
    def num_levels(self) -> int:
        """Residual levels L (1 without residual quantization): ids per position, the trailing axis when > 1."""
        return self.quantizer.num_levels

    @property
    def shared_codebook(self) -> bool:
        """Whether every residual level looks its ids up in one codebook (False with a single level)."""
        return self.quantizer.shared_codebook

    @property
    def id_layout(self) -> str:
        """``"grid"``: an image becomes an ``(h, w[, L])`` id map (``config.grid_size``)."""
        return "grid"

    def fingerprint(self) -> str:
        """SHA-256 over the architecture config and every weight: equal iff the tokenizer maps pixels to the same
        ids."""
        return config_fingerprint(self.config, self.state_dict())


# what save_pretrained writes into a config.json beside the architecture (no bearing on ids or pixels)
SAVED_ONLY_CONFIG_KEYS = ("transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path", "auto_map")


def config_fingerprint(config, state_dict: dict) -> str:
    """:func:`state_fingerprint` of a tokenizer config's non-default values and the weights.

    The config is hashed in the flat form of earlier versions (:func:`legacy_config_dict`), against the defaults of
    those versions, so that tokenizers saved by them keep their fingerprint. Only values that differ from the
    defaults: a later release adding a config field (with a default that keeps the old behaviour) must not
    invalidate every bundle made before it. Keys the config class does not know (an unknown key in a config.json,
    which ``encode`` ignores) are not hashed either, so they cannot make a bundle look made for another codebook.
    """
    defaults = {**legacy_config_dict(type(config)()), **LEGACY_VQ_FIELDS}
    values = legacy_config_dict(config)
    arch = {k: v for k, v in values.items() if k not in SAVED_ONLY_CONFIG_KEYS and k in defaults and defaults[k] != v}
    return state_fingerprint(arch, state_dict)
