"""The state of one tokenizer evaluation: its settings, the images it was given (fitted to the tokenizer and round
tripped once, shared by every suite), and the samples and baselines the suites leave for the report."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch
from PIL import Image

from ..image_processing_visual_tokenizer import to_pixel_values
from ..metrics import FeatureExtractor, psnr, ssim
from .patterns import TEXT_FONTS, TEXT_SAMPLES, TEXT_SIZES

Images = Union[Mapping[str, Image.Image], Sequence[Image.Image]]


@dataclass
class EvalSettings:
    """Knobs of the suites (defaults are the documented protocol; see eval/README.md).

    Args:
        max_side: cap on the long side of an evaluated image (downscaled, aspect kept); ``None`` keeps native size.
        detail_size: side of the detail patterns.
        text_languages / text_fonts / text_sizes: the grid of rendered strings (keys of ``TEXT_SAMPLES``, font
            files of matplotlib's bundle, pixel sizes); ``text_width`` is the canvas width.
        ocr_workers: parallel Tesseract processes; ``tesseract``: the binary to call.
        codecs: classical codecs to compare with.
        alignment_crops / alignment_crop_size / alignment_k: samples, crop side and neighbours for (SE-)CKNNA.
        max_feature_tiles: cap on paired tiles fed to the feature extractor (random subset, seeded).
        keep_samples: attach ``_samples`` (PIL images of originals and reconstructions) for report figures.
    """

    max_side: Optional[int] = 512
    detail_size: int = 256
    text_languages: Sequence[str] = tuple(TEXT_SAMPLES)
    text_fonts: Sequence[str] = TEXT_FONTS
    text_sizes: Sequence[int] = TEXT_SIZES
    text_width: int = 512
    ocr_workers: int = 2
    tesseract: str = "tesseract"
    codecs: Sequence[str] = ("jpeg", "webp")
    alignment_crops: int = 256
    alignment_crop_size: int = 64
    alignment_k: int = 10
    max_feature_tiles: int = 1024
    batch_size: int = 8
    seed: int = 0
    keep_samples: bool = False


@dataclass
class Sample:
    """One evaluated image for report figures: original and reconstruction, its score and a caption."""

    label: str
    original: Image.Image
    reconstruction: Image.Image
    score: float
    caption: str = ""


@dataclass
class Reconstructed:
    name: str
    pixel_values: torch.Tensor  # (1, 3, H, W) in [-1, 1]
    image_ids: torch.Tensor  # (1, h, w) or (1, h, w, L)
    reconstruction: torch.Tensor  # (1, 3, H, W), clamped to [-1, 1]


# --------------------------------------------------------------------------------------------------- image helpers
def fit_to_tokenizer(image: Image.Image, divisor: int, max_side: Optional[int] = None) -> Image.Image:
    """Downscale so the long side is at most ``max_side`` (aspect kept), then centre-crop both sides to a multiple
    of ``divisor``: the largest image the tokenizer accepts without padding or distortion."""
    image = image.convert("RGB")
    if max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(divisor, round(image.width * scale)), max(divisor, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    width, height = image.width - image.width % divisor, image.height - image.height % divisor
    if width == 0 or height == 0:
        raise ValueError(f"image of {image.size} px is smaller than the tokenizer's downsample {divisor}")
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


@torch.no_grad()
def round_trip(model, pixel_values: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode`` then ``decode`` in batches -> (image ids, reconstruction clamped to [-1, 1]) on the CPU."""
    ids, recon = [], []
    for start in range(0, len(pixel_values), batch_size):
        chunk = pixel_values[start : start + batch_size].to(model.device, model.dtype)
        chunk_ids = model.encode(chunk)
        ids.append(chunk_ids.cpu())
        recon.append(model.decode(chunk_ids).clamp(-1, 1).float().cpu())
    return torch.cat(ids), torch.cat(recon)


# ------------------------------------------------------------------------------------------------------ the run
def named_images(images: Images) -> dict[str, Image.Image]:
    """``{name: RGB image}`` from a mapping or a sequence (named ``image_0``, ``image_1``, ...); at least one."""
    items = images.items() if isinstance(images, Mapping) else ((f"image_{i}", im) for i, im in enumerate(images))
    named = {}
    for name, image in items:
        if not isinstance(image, Image.Image):
            raise TypeError(f"evaluation images must be PIL images, got {type(image).__name__} for {name!r} (load "
                            "files with tokenizer_bridge.load_image)")
        named[str(name)] = image.convert("RGB")
    if not named:
        raise ValueError("no images to evaluate: pass at least one PIL image")
    return named


class TokenizerRun:
    """State shared by the suites of one evaluation: model, settings, the evaluated images and their round trips
    (computed once), and the samples and baselines the suites leave for the report."""

    def __init__(self, model, images: Images, settings: EvalSettings,
                 feature_extractor: Optional[FeatureExtractor] = None):
        self.model, self.settings, self.feature_extractor = model, settings, feature_extractor
        self.images = named_images(images)
        self.samples: dict[str, list[Sample]] = {}
        self.baselines: Optional[dict] = None

    @property
    def downsample(self) -> int:
        return int(self.model.config.downsample)

    @functools.cached_property
    def photos(self) -> list[Reconstructed]:
        """The given images at native resolution (capped at ``max_side``), each round tripped once."""
        out = []
        for name, image in self.images.items():
            pixel_values = to_pixel_values(fit_to_tokenizer(image, self.downsample, self.settings.max_side))
            ids, recon = round_trip(self.model, pixel_values)
            out.append(Reconstructed(name, pixel_values, ids, recon))
        return out

    @functools.cached_property
    def photo_scores(self) -> list[dict]:
        return [
            {"name": p.name, "height": p.pixel_values.shape[2], "width": p.pixel_values.shape[3],
             "psnr": float(psnr(p.reconstruction, p.pixel_values)[0]),
             "ssim": float(ssim(p.reconstruction, p.pixel_values)[0])}
            for p in self.photos
        ]

    def keep(self, suite: str, samples: list[Sample]) -> None:
        if self.settings.keep_samples:
            self.samples[suite] = samples
