"""Pretrained VQ tokenizers that ship in transformers, behind the :class:`~tokenizer_bridge.VisualTokenizer` interface.

:class:`PretrainedVQTokenizer` wraps the image quantizers of three early-fusion models so they can be bridged to any
LLM exactly like a tokenizer trained here: ``encode(pixel_values) -> image_ids (B, h, w)``, ``decode(image_ids) ->
pixel_values``, ``codebook_size``, ``num_levels``, ``shared_codebook``, ``id_layout``, ``fingerprint()``,
``config.downsample`` and ``config.grid_size(H, W)``.

- **Emu3** (Wang et al., 2024, arXiv:2409.18869), ``Emu3VQVAE``: a MoVQGAN-style *video* tokenizer with a temporal
  axis. An image is encoded as a still clip of ``temporal_downsample_factor`` identical frames (one latent frame),
  and decoding keeps the first frame of the decoded clip, as the released Emu3 code does. 32768 codes, 8x downsample.
- **Janus** (Wu et al., 2024, arXiv:2410.13848), ``JanusVQVAE``: the LlamaGen VQ (Sun et al., 2024,
  arXiv:2406.06525), whose codebook is l2-normalised. The released model assigns ids by cosine similarity (latents
  and codes both normalised); transformers' ``JanusVQVAE.encode`` skips that normalisation (its ``decode`` applies
  it), so ids come from our own search, which follows the released model. 16384 codes, 16x downsample.
- **Chameleon** (Chameleon Team, 2024, arXiv:2405.09818), ``ChameleonVQVAE``: a Make-A-Scene VQGAN (Gafni et al.,
  2022). Meta released only its **encoder**, so transformers has no decoder for it: ``decode`` raises a
  ``NotImplementedError``. A Chameleon-tokenized bundle can read images (captioning) but not draw them.
  8192 codes, 16x downsample.

All three take ``pixel_values`` in [-1, 1] (their image processors normalise with mean = std = 0.5, or rescale by
1/127.5 and shift by -1), which is what :class:`~tokenizer_bridge.VisualTokenizerImageProcessor` produces.

Ids come from :func:`~tokenizer_bridge.quantizers.base.nearest_codes` (bounded memory) on the models' own latents;
for Emu3 and Chameleon they equal the models' ``encode``. The wrapper saves as ``config.json`` (``model_type``
``pretrained_vq_tokenizer``, the wrapped config under ``vq_config``) + ``model.safetensors`` (``vq.*``), and
:meth:`PretrainedVQTokenizer.from_pretrained` also takes a bare VQ checkpoint of those classes (``emu3_vqgan``,
``janus_vqgan``, ``chameleon_vqgan``) or a whole Emu3/Janus/Chameleon checkpoint, from which only the ``vqmodel``
weights are read. :func:`load_visual_tokenizer` opens any saved visual tokenizer, ours (grid ``VisualTokenizer`` or
``SlotTokenizer``) or wrapped, and :func:`image_vocab_layout` says how its ids are spelled in an LLM vocabulary (the
``bridge_llm`` layout arguments), so that every pipeline bridges a slot tokenizer exactly like a grid one.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional, Union

import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.utils import cached_file

from .modeling_visual_tokenizer import (
    VisualTokenizerOutput,
    state_fingerprint,
)
from .quantizers.base import nearest_codes

PathLike = Union[str, os.PathLike]
# Keyword arguments of from_pretrained that locate files (local folder or Hub repo).
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
_VQ_KEY = re.compile(r"^(?:.*\.)?vqmodel\.(.+)$")  # "model.vqmodel.encoder..." (v5) or "vqmodel.encoder..." (legacy)


# ---------------------------------------------------------------------------------------------------- families
class VQFamily:
    """How one transformers VQ model turns pixels into latents and image ids back into pixels."""

    name: str
    vq_model_type: str  # model_type of the bare VQ config
    composite_model_type: str  # model_type of the whole model that holds it as `vqmodel`
    codebook_key: str  # config field holding the number of codes
    normalized_codes = False  # nearest code by cosine similarity (l2-normalised latents and codes)
    has_decoder = True

    def config_class(self) -> type:
        raise NotImplementedError

    def model_class(self) -> type:
        """Imported on first use: the modeling files take seconds to import."""
        raise NotImplementedError

    def latents(self, vq, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> latents ``(B, D, h, w)`` in the codebook's space."""
        return vq.quant_conv(vq.encoder(pixel_values))

    def codebook(self, vq) -> torch.Tensor:
        return vq.quantize.embedding.weight  # (K, D)

    def decode(self, vq, image_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Emu3Family(VQFamily):
    name, vq_model_type, composite_model_type, codebook_key = "emu3", "emu3_vqgan", "emu3", "codebook_size"

    def config_class(self):
        from transformers.models.emu3.configuration_emu3 import Emu3VQVAEConfig

        return Emu3VQVAEConfig

    def model_class(self):
        from transformers.models.emu3.modeling_emu3 import Emu3VQVAE

        return Emu3VQVAE

    def latents(self, vq, pixel_values):
        frames = vq.config.temporal_downsample_factor
        clip = pixel_values.unsqueeze(1).expand(-1, frames, -1, -1, -1)  # (B, T, 3, H, W): a still clip
        hidden = vq.encoder(clip)  # (B, 1, C, h, w): T frames -> one latent frame
        hidden = vq.quant_conv(hidden.transpose(1, 2)).transpose(1, 2)  # (B, 1, D, h, w)
        if hidden.shape[1] != 1:
            raise ValueError(f"Emu3 encoded a still image into {hidden.shape[1]} latent frames, expected 1")
        return hidden[:, 0]

    def decode(self, vq, image_ids):
        return vq.decode(image_ids)  # (B, h, w) -> first frame of the decoded clip, (B, 3, H, W)


class JanusFamily(VQFamily):
    name, vq_model_type, composite_model_type, codebook_key = "janus", "janus_vqgan", "janus", "num_embeddings"
    normalized_codes = True

    def config_class(self):
        from transformers.models.janus.configuration_janus import JanusVQVAEConfig

        return JanusVQVAEConfig

    def model_class(self):
        from transformers.models.janus.modeling_janus import JanusVQVAE

        return JanusVQVAE

    def decode(self, vq, image_ids):
        # JanusVQVAE.decode only takes its training grid (num_patches^2 ids); the decoder itself is convolutional.
        codes = F.normalize(vq.quantize.embedding(image_ids), dim=-1)  # (B, h, w, D)
        return vq.decoder(vq.post_quant_conv(codes.permute(0, 3, 1, 2).contiguous()))


class ChameleonFamily(VQFamily):
    name, vq_model_type, composite_model_type = "chameleon", "chameleon_vqgan", "chameleon"
    codebook_key = "num_embeddings"
    has_decoder = False

    def config_class(self):
        from transformers.models.chameleon.configuration_chameleon import (
            ChameleonVQVAEConfig,
        )

        return ChameleonVQVAEConfig

    def model_class(self):
        from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

        return ChameleonVQVAE

    def decode(self, vq, image_ids):
        raise NotImplementedError(
            "Chameleon's VQ tokenizer cannot decode: Meta released only its encoder weights, so transformers' "
            "ChameleonVQVAE has no decoder and image ids cannot be turned back into pixels. Use a Chameleon-tokenized "
            "bundle for image understanding (captioning), or Emu3 / Janus / a tokenizer-bridge VisualTokenizer for "
            "image generation."
        )


FAMILIES = {f.name: f for f in (Emu3Family(), JanusFamily(), ChameleonFamily())}
_BY_MODEL_TYPE = {t: f for f in FAMILIES.values() for t in (f.vq_model_type, f.composite_model_type)}


def family_of(model_type: str) -> VQFamily:
    """The family whose bare VQ or whole model has ``model_type``."""
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(f"no pretrained VQ tokenizer for model_type {model_type!r}; known: {sorted(_BY_MODEL_TYPE)}")
    return _BY_MODEL_TYPE[model_type]


# ---------------------------------------------------------------------------------------------------- config
class PretrainedVQConfig(PreTrainedConfig):
    """Args:
    family: ``"emu3"``, ``"janus"`` or ``"chameleon"``.
    vq_config: the wrapped model's config fields (its architecture; e.g. ``Emu3VQVAEConfig().to_dict()``).

    ``downsample`` and ``codebook_size`` are derived from ``vq_config`` (written to config.json for readers).
    """

    model_type = "pretrained_vq_tokenizer"

    def __init__(self, family: str = "emu3", vq_config: Optional[dict] = None, **kwargs):
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
        for derived in ("downsample", "codebook_size", "in_channels"):
            kwargs.pop(derived, None)
        self.family = family
        self.vq_config = architecture(self.vq_model_config(vq_config or {}))
        self.downsample = 2 ** (len(self.vq_config["channel_multiplier"]) - 1)  # one halving per level but the last
        self.codebook_size = int(self.vq_config[FAMILIES[family].codebook_key])
        self.in_channels = int(self.vq_config["in_channels"])
        super().__init__(**kwargs)

    def vq_model_config(self, values: Optional[dict] = None):
        """The wrapped model's config object (from ``values``, default ``self.vq_config``)."""
        values = self.vq_config if values is None else values
        return FAMILIES[self.family].config_class()(**{k: v for k, v in values.items() if k != "model_type"})

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Id-map size for an image of ``height x width`` pixels."""
        if height % self.downsample or width % self.downsample:
            raise ValueError(f"image size {height}x{width} is not a multiple of downsample={self.downsample}")
        return height // self.downsample, width // self.downsample


def architecture(config) -> dict:
    """The fields a VQ config class declares itself (its architecture), without transformers' generic settings."""
    fields = vars(type(config)).get("__annotations__", {})
    return {name: _plain(getattr(config, name)) for name in fields if hasattr(config, name)}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------------------------------------------- model
class PretrainedVQTokenizer(PreTrainedModel):
    """A transformers VQ model (Emu3, Janus, Chameleon) as a visual tokenizer. Frozen: no training losses."""

    config_class = PretrainedVQConfig
    base_model_prefix = "pretrained_vq_tokenizer"
    main_input_name = "pixel_values"
    _no_split_modules = []

    def __init__(self, config: PretrainedVQConfig, vq: Optional[PreTrainedModel] = None):
        super().__init__(config)
        if vq is None:
            vq = self.family.model_class()._from_config(config.vq_model_config())
        self.vq = vq.eval()
        self.post_init()

    def _init_weights(self, module) -> None:
        pass  # the wrapper has no weights of its own; the wrapped model initialises (or loads) its own

    @property
    def family(self) -> VQFamily:
        return FAMILIES[self.config.family]

    @classmethod
    def from_vq_model(cls, vq: PreTrainedModel) -> "PretrainedVQTokenizer":
        """Wrap an ``Emu3VQVAE`` / ``JanusVQVAE`` / ``ChameleonVQVAE`` instance (weights shared, not copied)."""
        family = family_of(vq.config.model_type)
        return cls(PretrainedVQConfig(family=family.name, vq_config=architecture(vq.config)), vq=vq)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: PathLike, *model_args, **kwargs):
        """Load a saved wrapper, a bare VQ checkpoint (``Emu3VQVAE``, ``JanusVQVAE``, ``ChameleonVQVAE``) or the
        ``vqmodel`` of a whole Emu3 / Janus / Chameleon checkpoint, from a local folder or a Hub repo."""
        if kwargs.get("config") is not None:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        config_dict, _ = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub)
        model_type = config_dict.get("model_type")
        if model_type == PretrainedVQConfig.model_type:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        family = family_of(model_type)
        if model_type == family.vq_model_type:
            vq = family.model_class().from_pretrained(pretrained_model_name_or_path, **kwargs)
            return cls.from_vq_model(vq)
        vq = _load_composite_vq(pretrained_model_name_or_path, family, config_dict, hub)
        return cls.from_vq_model(vq.to(kwargs["dtype"]) if isinstance(kwargs.get("dtype"), torch.dtype) else vq)

    # ------------------------------------------------------------------ VisualTokenizer interface
    @property
    def codebook_size(self) -> int:
        """Codes K of the wrapped model: every image id lies in ``[0, K)``."""
        return self.config.codebook_size

    @property
    def num_levels(self) -> int:
        """1: one id per position, none of the wrapped models is residual."""
        return 1

    @property
    def shared_codebook(self) -> bool:
        """False: with a single level there is nothing to share."""
        return False

    @property
    def id_layout(self) -> str:
        """``"grid"``: an image becomes an ``(h, w)`` id map (``config.grid_size``)."""
        return "grid"

    @property
    def quantizer(self) -> torch.nn.Module:
        """The wrapped model's own quantizer module (transformers', not a tokenizer-bridge ``Quantizer``)."""
        return self.vq.quantize

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.in_channels:
            raise ValueError(
                f"pixel_values must be (B, {self.config.in_channels}, H, W) in [-1, 1], got {tuple(pixel_values.shape)}"
            )
        self.config.grid_size(pixel_values.shape[2], pixel_values.shape[3])

    def encode_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> continuous latents ``(B, D, h, w)`` (before quantization)."""
        self.check_pixel_values(pixel_values)
        return self.family.latents(self.vq, pixel_values.to(self.device, self.dtype))

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """``(B, 3, H, W)`` in [-1, 1] -> image ids ``(B, h, w)``."""
        latents = self.encode_latents(pixel_values).float()  # (B, D, h, w)
        codebook = self.family.codebook(self.vq).float()  # (K, D)
        if self.family.normalized_codes:
            latents, codebook = F.normalize(latents, dim=1), F.normalize(codebook, dim=-1)
        b, d, h, w = latents.shape
        ids, _ = nearest_codes(latents.permute(0, 2, 3, 1).reshape(-1, d), codebook)
        return ids.view(b, h, w)

    @torch.no_grad()
    def decode(self, image_ids: torch.Tensor) -> torch.Tensor:
        """Image ids ``(B, h, w)`` -> ``pixel_values`` ``(B, 3, H, W)`` (not clamped). Chameleon cannot decode."""
        image_ids = torch.as_tensor(image_ids, device=self.device)
        if image_ids.dim() != 3 or image_ids.is_floating_point():
            raise ValueError(f"image_ids must be integers of shape (B, h, w), got {image_ids.dtype} "
                             f"{tuple(image_ids.shape)}")
        if image_ids.numel() and (image_ids.min() < 0 or image_ids.max() >= self.codebook_size):
            raise ValueError(f"image ids must lie in [0, {self.codebook_size}), got [{int(image_ids.min())}, "
                             f"{int(image_ids.max())}]")
        return self.family.decode(self.vq, image_ids.long())

    def forward(self, pixel_values: torch.Tensor) -> VisualTokenizerOutput:
        """Ids and (except for Chameleon) the reconstruction; no losses: the wrapped models are frozen."""
        image_ids = self.encode(pixel_values)
        reconstruction = self.decode(image_ids) if self.family.has_decoder else None
        return VisualTokenizerOutput(reconstruction=reconstruction, image_ids=image_ids)

    def fingerprint(self) -> str:
        """SHA-256 over the family, the wrapped architecture and every weight: equal iff the ids are the same."""
        arch = {"family": self.config.family, "vq_config": self.config.vq_config}
        return state_fingerprint(arch, self.state_dict())


def _load_composite_vq(path: PathLike, family: VQFamily, config_dict: dict, hub: dict) -> PreTrainedModel:
    """Build the family's VQ model from a whole checkpoint's ``vq_config`` and load only its ``vqmodel`` weights."""
    values = {k: v for k, v in (config_dict.get("vq_config") or {}).items() if k != "model_type"}
    vq = family.model_class()(family.config_class()(**values))
    state = {}
    for shard in _weight_files(path, hub):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                match = _VQ_KEY.match(key)
                if match:
                    state[match.group(1)] = f.get_tensor(key)
    if not state:
        raise ValueError(f"{path} is a {family.composite_model_type} checkpoint without vqmodel weights")
    vq.load_state_dict(state, strict=True)
    return vq.eval()


def _weight_files(path: PathLike, hub: dict) -> list[str]:
    """Local paths of the safetensors files of a checkpoint (only the shards that hold vqmodel weights)."""
    lookup = dict(hub, _raise_exceptions_for_missing_entries=False)
    index = cached_file(path, "model.safetensors.index.json", **lookup)
    if index is None:
        single = cached_file(path, "model.safetensors", **lookup)
        if single is None:
            raise OSError(f"no model.safetensors (or index) in {path}: only safetensors checkpoints are read")
        return [single]
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    shards = sorted({shard for key, shard in weight_map.items() if _VQ_KEY.match(key)})
    return [cached_file(path, shard, **hub) for shard in shards]


AutoConfig.register(PretrainedVQConfig.model_type, PretrainedVQConfig, exist_ok=True)
AutoModel.register(PretrainedVQConfig, PretrainedVQTokenizer, exist_ok=True)
