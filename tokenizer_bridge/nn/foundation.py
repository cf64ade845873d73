"""Vision foundation models inside tokenizers: frozen feature extractors, foundation encoders, VA-VAE alignment.

- :class:`VisionBackbone` wraps any Hugging Face vision model saved in a local directory (DINOv2, SigLIP, CLIP, ViT,
  ConvNeXt, ...) as a feature extractor for ``pixel_values`` in [-1, 1]: it maps them to the model's own
  normalisation (``image_mean`` / ``image_std`` of its ``preprocessor_config.json``) and returns hidden states as
  feature maps ``(B, C, h, w)``, with CLS / register tokens dropped.
- :class:`FoundationEncoder` turns a backbone into a tokenizer encoder (VFM-VAE, "Vision Foundation Models as
  Effective Visual Tokenizers"; also the frozen-encoder route of RAE): several hidden layers are layer-normed, fused
  (learned scalar mix or concatenation) and projected to ``latent_dim``; the last ``trainable_layers`` blocks may
  be fine-tuned, everything else stays frozen.
- :func:`alignment_loss` / :class:`AlignmentLoss` / :class:`FoundationAlignment` implement the vision-foundation
  alignment loss of VA-VAE (Yao et al. 2025, "Reconstruction vs. Generation: Taming Optimization Dilemma in Latent
  Diffusion Models"): a marginal cosine-similarity loss and a marginal distance-matrix similarity loss between
  (projected) latents and frozen foundation features, for latents of *any* encoder. :func:`adaptive_weight` gives
  the paper's adaptive weight, the gradient-norm ratio used for the GAN loss of VQGAN (Esser et al. 2021).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

PathLike = Union[str, Path]
NO_WEIGHTS_HINT = (
    "no pretrained vision weights ship with tokenizer-bridge and none can be downloaded here: save a Hugging Face "
    "vision model (DINOv2, SigLIP, CLIP, ViT, ConvNeXt, ...) with save_pretrained and pass its directory"
)


def check_model_dir(path: Optional[PathLike], purpose: str, hint: str = NO_WEIGHTS_HINT) -> Path:
    """``path`` as a ``Path`` if it is a local model directory (holds ``config.json``); a ``ValueError`` otherwise."""
    if path is None:
        raise ValueError(f"{purpose} needs the weights of a vision model, but no path was given; {hint}")
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{purpose}: model directory {str(path)!r} does not exist; {hint}")
    if not (path / "config.json").is_file():
        raise ValueError(f"{purpose}: {str(path)!r} holds no config.json, so it is not a saved model; {hint}")
    return path


def read_normalisation(path: Path) -> tuple[list[float], list[float]]:
    """``(image_mean, image_std)`` from the directory's ``preprocessor_config.json``; mean = std = 0.5 (inputs in
    [-1, 1] passed through unchanged) when the file or the fields are missing."""
    file = path / "preprocessor_config.json"
    cfg = json.loads(file.read_text()) if file.is_file() else {}
    if not cfg.get("do_normalize", True):
        return [0.0] * 3, [1.0] * 3
    return list(cfg.get("image_mean", [0.5] * 3)), list(cfg.get("image_std", [0.5] * 3))


def vision_tower(model: nn.Module) -> nn.Module:
    """The image tower of a two-tower model (CLIP, SigLIP) or the model itself."""
    return model.vision_model if hasattr(model, "vision_model") and hasattr(model.config, "vision_config") else model


class VisionBackbone(nn.Module):
    """A Hugging Face vision model as a feature extractor on ``pixel_values`` in [-1, 1].

    Always in eval mode (no dropout / drop-path), so features are deterministic; which parameters train is left to
    the owner (``requires_grad``). ``image_mean`` / ``image_std`` are persistent buffers so a checkpoint of an
    enclosing model restores them.
    """

    def __init__(self, model: PreTrainedModel, image_mean: Sequence[float] = (0.5,) * 3,
                 image_std: Sequence[float] = (0.5,) * 3):
        super().__init__()
        self.model = vision_tower(model)
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1))
        self._interpolates = "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters
        self.train(False)

    @classmethod
    def from_pretrained(cls, path: Optional[PathLike], purpose: str = "this vision backbone",
                        hint: str = NO_WEIGHTS_HINT) -> "VisionBackbone":
        """Load the model in the local directory ``path`` (a clear ``ValueError`` when there is none)."""
        path = check_model_dir(path, purpose, hint)
        mean, std = read_normalisation(path)
        return cls(AutoModel.from_pretrained(path), mean, std)

    @classmethod
    def from_config(cls, config: Union[PretrainedConfig, dict], image_mean: Sequence[float] = (0.5,) * 3,
                    image_std: Sequence[float] = (0.5,) * 3) -> "VisionBackbone":
        """Randomly initialised backbone of this architecture (weights come from a checkpoint afterwards)."""
        if isinstance(config, dict):
            config = AutoConfig.for_model(**config)
        return cls(AutoModel.from_config(config), image_mean, image_std)

    def load_pretrained_weights(self, path: Optional[PathLike], purpose: str = "this vision backbone") -> None:
        """Copy the weights and normalisation of the same architecture saved in ``path`` into this backbone
        (for a backbone built with :meth:`from_config` inside a model whose own checkpoint does not exist yet)."""
        path = check_model_dir(path, purpose)
        self.model.load_state_dict(vision_tower(AutoModel.from_pretrained(path)).state_dict())
        mean, std = read_normalisation(path)
        self.image_mean.copy_(torch.tensor(mean).view_as(self.image_mean))
        self.image_std.copy_(torch.tensor(std).view_as(self.image_std))

    def train(self, mode: bool = True) -> "VisionBackbone":
        return super().train(False)

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def patch_size(self) -> Optional[int]:
        p = getattr(self.config, "patch_size", None)
        return p[0] if isinstance(p, (tuple, list)) else p

    @property
    def blocks(self) -> nn.ModuleList:
        """The backbone's main stack of blocks: its longest ``ModuleList`` (the outermost on ties)."""
        lists = [m for m in self.model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
        if not lists:
            raise ValueError(f"{type(self.model).__name__} has no list of blocks to fine-tune")
        return max(lists, key=len)

    def normalise(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[-1, 1]`` -> the backbone's input normalisation."""
        return ((pixel_values + 1) / 2 - self.image_mean) / self.image_std

    def hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All hidden states (index 0 = embeddings, ``i`` = output of block ``i``) for ``pixel_values`` in [-1, 1]."""
        dtype = next(self.model.parameters()).dtype
        x = self.normalise(pixel_values.float()).to(dtype)
        kwargs = {"interpolate_pos_encoding": True} if self._interpolates else {}
        return self.model(pixel_values=x, output_hidden_states=True, **kwargs).hidden_states

    def feature_maps(self, pixel_values: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """Hidden states of ``layers`` as maps ``(B, C, h, w)`` (patch tokens only)."""
        states = self.hidden_states(pixel_values)
        return [self.to_map(states[layer], pixel_values.shape[-2:]) for layer in layers]

    def to_map(self, state: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
        """``(B, C, h, w)`` maps pass through; ``(B, N, C)`` token sequences lose their leading CLS / register
        tokens and become ``(B, C, H/p, W/p)``."""
        if state.dim() == 4:
            return state
        p = self.patch_size
        if p is None:
            raise ValueError(f"{type(self.model).__name__} returns token sequences but has no patch_size")
        h, w = image_size[0] // p, image_size[1] // p
        prefix = state.shape[1] - h * w
        if prefix < 0:
            raise ValueError(f"{state.shape[1]} tokens cannot hold a {h}x{w} patch grid")
        return state[:, prefix:].transpose(1, 2).reshape(state.shape[0], -1, h, w)

    def num_layers(self) -> int:
        """Hidden states after the embeddings (valid layer indices are ``0..num_layers``)."""
        return len(self.blocks)

    def layer_widths(self, layers: Sequence[int]) -> list[int]:
        """Channel count of each layer in ``layers``: ``hidden_size`` for transformers, else measured once."""
        if getattr(self.config, "hidden_size", None):
            return [self.config.hidden_size] * len(layers)
        size = getattr(self.config, "image_size", None) or 64
        size = size[0] if isinstance(size, (tuple, list)) else size
        probe = torch.zeros(1, self.image_mean.shape[1], size, size, device=self.image_mean.device)
        with torch.no_grad():
            return [m.shape[1] for m in self.feature_maps(probe, layers)]


def resize_maps(maps: Sequence[torch.Tensor], size: Sequence[int]) -> list[torch.Tensor]:
    """Bilinearly resize the maps whose grid is not ``size``."""
    return [m if tuple(m.shape[-2:]) == tuple(size) else
            F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False) for m in maps]


class FoundationEncoder(nn.Module):
    """A foundation model as tokenizer encoder: ``(B, 3, H, W)`` -> latents ``(B, latent_dim, H/p, W/p)``.

    Args:
        backbone: the :class:`VisionBackbone` (see :meth:`from_pretrained`).
        latent_dim: D.
        layers: hidden-state indices to fuse (0 = embeddings, -1 = last block).
        fusion: ``"concat"`` (concatenate the layer-normed layers, one projection) or ``"sum"`` (learned softmax
            scalar mix of the layer-normed layers, one projection; needs equal widths).
        trainable_layers: number of last backbone blocks left trainable; the rest of the backbone is frozen.
    """

    def __init__(self, backbone: VisionBackbone, latent_dim: int, layers: Sequence[int] = (-1,),
                 fusion: str = "concat", trainable_layers: int = 0):
        super().__init__()
        if fusion not in ("concat", "sum"):
            raise ValueError(f"fusion must be 'concat' or 'sum', got {fusion!r}")
        self.backbone, self.layers, self.fusion = backbone, list(layers), fusion
        widths = backbone.layer_widths(self.layers)
        if fusion == "sum" and len(set(widths)) > 1:
            raise ValueError(f"fusion='sum' needs layers of equal width, got {widths}; use fusion='concat'")
        self.norms = nn.ModuleList(nn.LayerNorm(w) for w in widths)
        self.mix = nn.Parameter(torch.zeros(len(widths))) if fusion == "sum" else None
        self.proj = nn.Linear(widths[0] if fusion == "sum" else sum(widths), latent_dim)
        self.trainable_layers = trainable_layers
        self.freeze(trainable_layers)

    @classmethod
    def from_pretrained(cls, path: Optional[PathLike], latent_dim: int, **kwargs) -> "FoundationEncoder":
        return cls(VisionBackbone.from_pretrained(path, "FoundationEncoder"), latent_dim, **kwargs)

    def freeze(self, trainable_layers: int) -> None:
        """Freeze the backbone except its last ``trainable_layers`` blocks."""
        blocks = self.backbone.blocks
        if not 0 <= trainable_layers <= len(blocks):
            raise ValueError(f"trainable_layers must be in [0, {len(blocks)}], got {trainable_layers}")
        self.backbone.requires_grad_(False)
        for block in blocks[len(blocks) - trainable_layers:]:
            block.requires_grad_(True)
        self.trainable_layers = trainable_layers

    @property
    def last_layer(self) -> nn.Parameter:
        return self.proj.weight

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable_layers > 0):
            maps = self.backbone.feature_maps(pixel_values, self.layers)
        b, _, h, w = maps[-1].shape
        tokens = [norm(m.flatten(2).transpose(1, 2).to(norm.weight.dtype)) for norm, m in
                  zip(self.norms, resize_maps(maps, (h, w)))]  # each (B, h*w, C_l)
        if self.fusion == "sum":
            fused = torch.einsum("l,lbnc->bnc", self.mix.softmax(0), torch.stack(tokens))
        else:
            fused = torch.cat(tokens, dim=-1)
        return self.proj(fused).transpose(1, 2).reshape(b, -1, h, w)  # (B, D, h, w)


# ---------------------------------------------------------------------------------------------- VA-VAE alignment
@dataclass
class AlignmentOutput(ModelOutput):
    """Args:
    loss: ``cosine_weight * cosine_loss + distance_weight * distance_loss`` (before any adaptive weight).
    cosine_loss: marginal cosine-similarity loss.
    distance_loss: marginal distance-matrix similarity loss.
    """

    loss: Optional[torch.Tensor] = None
    cosine_loss: Optional[torch.Tensor] = None
    distance_loss: Optional[torch.Tensor] = None


def alignment_loss(latents: torch.Tensor, features: torch.Tensor, cosine_margin: float = 0.5,
                   distance_margin: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """VA-VAE's two margin losses between maps of equal shape ``(B, C, h, w)`` (latents already projected to C).

    ``cosine_loss = mean_ij ReLU(1 - m1 - cos(z_ij, f_ij))`` over positions; ``distance_loss = mean ReLU(|cos(z_i, z_j)
    - cos(f_i, f_j)| - m2)`` over all position pairs of each image (``(B, h*w, h*w)`` similarities). The margins make
    deviations up to them free, so the latent keeps room for reconstruction detail.
    """
    if latents.dim() != 4 or latents.shape != features.shape:
        raise ValueError(f"latents and features must be maps of one shape (B, C, h, w), got "
                         f"{tuple(latents.shape)} and {tuple(features.shape)}")
    z = F.normalize(latents.float().flatten(2).transpose(1, 2), dim=-1)  # (B, N, C)
    f = F.normalize(features.float().flatten(2).transpose(1, 2), dim=-1)
    cosine = F.relu(1 - cosine_margin - (z * f).sum(-1)).mean()
    distance = F.relu((z @ z.transpose(1, 2) - f @ f.transpose(1, 2)).abs() - distance_margin).mean()
    return cosine, distance


class AlignmentLoss(nn.Module):
    """Projection ``latent_dim -> feature_dim`` (a 1x1 linear map, as in VA-VAE) + :func:`alignment_loss`.

    ``forward(latents (B, D, h, w), features (B, C, h', w'))``: features are detached and resized to the latent grid
    when their grid differs. Works with latents of any encoder.
    """

    def __init__(self, latent_dim: int, feature_dim: int, cosine_margin: float = 0.5, distance_margin: float = 0.25,
                 cosine_weight: float = 1.0, distance_weight: float = 1.0):
        super().__init__()
        self.proj = nn.Linear(latent_dim, feature_dim)
        self.cosine_margin, self.distance_margin = cosine_margin, distance_margin
        self.cosine_weight, self.distance_weight = cosine_weight, distance_weight

    def project(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, D, h, w)`` -> ``(B, C, h, w)``."""
        return self.proj(latents.movedim(1, -1)).movedim(-1, 1)

    def forward(self, latents: torch.Tensor, features: torch.Tensor) -> AlignmentOutput:
        if latents.dim() != 4:
            raise ValueError(f"alignment needs latent maps (B, D, h, w), got shape {tuple(latents.shape)}")
        (features,) = resize_maps([features.detach()], latents.shape[-2:])
        cosine, distance = alignment_loss(self.project(latents), features, self.cosine_margin, self.distance_margin)
        loss = self.cosine_weight * cosine + self.distance_weight * distance
        return AlignmentOutput(loss=loss, cosine_loss=cosine, distance_loss=distance)


class FoundationAlignment(nn.Module):
    """VA-VAE alignment against a frozen foundation model: ``forward(latents, pixel_values) -> AlignmentOutput``.

    The image is resized so that the teacher's patch grid equals the latent grid (VA-VAE feeds DINOv2 224 px for 16x16
    latents); the teacher is frozen and runs without gradients. ``loss_kwargs`` go to :class:`AlignmentLoss`.
    """

    def __init__(self, teacher: VisionBackbone, latent_dim: int, layer: int = -1, **loss_kwargs):
        super().__init__()
        self.teacher, self.layer = teacher.requires_grad_(False), layer
        self.loss = AlignmentLoss(latent_dim, teacher.layer_widths([layer])[0], **loss_kwargs)

    @classmethod
    def from_pretrained(cls, path: Optional[PathLike], latent_dim: int, **kwargs) -> "FoundationAlignment":
        return cls(VisionBackbone.from_pretrained(path, "the VA-VAE alignment loss"), latent_dim, **kwargs)

    @torch.no_grad()
    def features(self, pixel_values: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Teacher features ``(B, C, h, w)`` on the latent grid ``(h, w)``."""
        p = self.teacher.patch_size
        if p is not None:
            pixel_values = F.interpolate(pixel_values.float(), size=(grid[0] * p, grid[1] * p), mode="bicubic",
                                         align_corners=False).clamp(-1, 1)
        return self.teacher.feature_maps(pixel_values, [self.layer])[0]

    def forward(self, latents: torch.Tensor, pixel_values: torch.Tensor) -> AlignmentOutput:
        return self.loss(latents, self.features(pixel_values, latents.shape[-2:]))


def last_layer_weight(encoder: nn.Module) -> nn.Parameter:
    """The weight of the layer that emits an encoder's latents: its ``last_layer`` if it has one, else its last
    trainable parameter with two or more dimensions (``ConvEncoder``: the final 1x1 conv)."""
    last = getattr(encoder, "last_layer", None)
    if last is not None:
        return last
    weights = [p for p in encoder.parameters() if p.requires_grad and p.dim() >= 2]
    if not weights:
        raise ValueError(f"{type(encoder).__name__} has no trainable weight to take gradients against")
    return weights[-1]


def adaptive_weight(main_loss: torch.Tensor, aux_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """``||grad main_loss|| / (||grad aux_loss|| + eps)`` w.r.t. ``last_layer``, clamped to ``[0, max_weight]`` and
    detached (VQGAN's adaptive GAN weight; VA-VAE's adaptive alignment weight). Keeps the graph for ``backward``.

    Returns 1 when gradients are off (evaluation), so logged losses stay comparable.
    """
    if not (torch.is_grad_enabled() and main_loss.requires_grad and aux_loss.requires_grad):
        return torch.ones((), device=main_loss.device)
    main_grad = torch.autograd.grad(main_loss, last_layer, retain_graph=True, allow_unused=True)[0]
    aux_grad = torch.autograd.grad(aux_loss, last_layer, retain_graph=True, allow_unused=True)[0]
    if main_grad is None or aux_grad is None:
        which = "main" if main_grad is None else "auxiliary"
        raise ValueError(f"the {which} loss does not depend on last_layer, so no adaptive weight can be computed")
    return (main_grad.norm() / (aux_grad.norm() + eps)).clamp(0, max_weight).detach()
