"""The image processor of the visual tokenizer.

`VisualTokenizerImageProcessor` fits images -- loaded by :func:`~tokenizer_bridge.image_loading.load_image`, which
turns any source into an RGB PIL image or raises `ImageLoadError` -- to the tokenizer's input size ("crop", "stretch",
"pad", or "none" for tokenizers that take any resolution) and maps them to ``pixel_values`` (B, 3, H, W) float32 in
[-1, 1], the pixel range of VQGAN (Esser et al., 2021, "Taming Transformers for High-Resolution Image Synthesis");
`postprocess` maps ``pixel_values`` back to PIL images. Its ``__init__`` arguments are its config, saved by
``save_pretrained`` as ``preprocessor_config.json``.

Resampling defaults to Pillow's bicubic filter, which is antialiased when downscaling (its support grows with the
scale factor, unlike ``torch.nn.functional.interpolate``), with ``reducing_gap=3.0``: on a 2048 -> 256 downscale
that halves the time and changes pixels by 0.2 grey levels on average (2 at most).
"""

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

from .image_loading import (  # noqa: F401  (re-exported: the names were defined here before)
    MAX_PIXELS,
    WHITE,
    ImageLoadError,
    ImageLoadWarning,
    ImageSource,
    _check_background,
    _check_max_pixels,
    _is_int,
    load_image,
)

RESIZE_MODES = ("crop", "stretch", "pad", "none")
REDUCING_GAP = 3.0  # see the module docstring for what it costs and buys
_SERVICE_KEYS = {"image_processor_type", "processor_class", "feature_extractor_type", "auto_map"}


# ----------------------------------------------------------------------------------------------------------------
# geometry


def _resize(image: Image.Image, size: tuple[int, int], resample: int, box: Any = None) -> Image.Image:
    """`image.resize` that leaves an image already at `size` untouched (exact round trips need no resampling)."""
    if box is None and image.size == size:
        return image
    return image.resize(size, resample, box=box, reducing_gap=REDUCING_GAP)


def _resize_crop(image: Image.Image, width: int, height: int, resample: int) -> Image.Image:
    """Scale the shorter side to fit and keep the centre, in one resampling (the crop box is in source pixels)."""
    scale = max(width / image.width, height / image.height)
    box_width, box_height = min(image.width, width / scale), min(image.height, height / scale)
    left, top = (image.width - box_width) / 2, (image.height - box_height) / 2
    box = (left, top, left + box_width, top + box_height)
    if image.size == (width, height):
        box = None
    return _resize(image, (width, height), resample, box)


def _resize_pad(
    image: Image.Image, width: int, height: int, resample: int, background: tuple[int, int, int]
) -> Image.Image:
    """Fit the whole image inside (width, height), centred on a `background` canvas."""
    scale = min(width / image.width, height / image.height)
    inner_width = min(width, max(1, round(image.width * scale)))
    inner_height = min(height, max(1, round(image.height * scale)))
    canvas = Image.new("RGB", (width, height), background)
    inner = _resize(image, (inner_width, inner_height), resample)
    canvas.paste(inner, ((width - inner_width) // 2, (height - inner_height) // 2))
    return canvas


def _crop_to_multiple(image: Image.Image, divisor: int) -> Image.Image:
    """Centre-crop to the largest size whose sides are multiples of `divisor` (for any-resolution tokenizers)."""
    width, height = image.width // divisor * divisor, image.height // divisor * divisor
    if width == 0 or height == 0:
        raise ValueError(f"image of {image.width}x{image.height} is smaller than size_divisor={divisor}")
    if (width, height) == image.size:
        return image
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


# ----------------------------------------------------------------------------------------------------------------
# the processor


class VisualTokenizerImageProcessorKwargs(ImagesKwargs, total=False):
    """Keyword arguments of `VisualTokenizerImageProcessor` beyond the standard ones.

    Declared so that ``from_pretrained(..., resize_mode="pad")`` and `ProcessorMixin` route them here.
    """

    resize_mode: Literal["crop", "stretch", "pad", "none"] | None
    size_divisor: int | None
    background: tuple[int, int, int] | list[int] | None
    max_pixels: int | None


def _check_size(size: Any) -> dict[str, int]:
    if _is_int(size):
        size = {"height": size, "width": size}
    if not isinstance(size, dict) or set(size) != {"height", "width"}:
        raise ValueError(f'size must be an int or {{"height": int, "width": int}}, got {size!r}')
    if not all(_is_int(v) and v > 0 for v in size.values()):
        raise ValueError(f"size must be positive, got {size!r}")
    return {"height": int(size["height"]), "width": int(size["width"])}


def _check_settings(
    size: Any, resize_mode: str, size_divisor: int, resample: int, background: Any, do_normalize: bool,
    max_pixels: Any = MAX_PIXELS,
) -> dict[str, Any]:
    """Validated, JSON-friendly settings (ints, lists and dicts survive a save/load round trip unchanged)."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    if not _is_int(size_divisor) or size_divisor <= 0:
        raise ValueError(f"size_divisor must be a positive int, got {size_divisor!r}")
    size = _check_size(size)
    if resize_mode != "none" and (size["height"] % size_divisor or size["width"] % size_divisor):
        raise ValueError(f"size {size} is not a multiple of size_divisor={size_divisor}")
    if not _is_int(resample) or int(resample) not in {int(r) for r in Image.Resampling}:
        raise ValueError(f"resample must be a PIL.Image.Resampling filter, got {resample!r}")
    if not isinstance(do_normalize, bool):
        raise ValueError(f"do_normalize must be a bool, got {do_normalize!r}")
    return {
        "size": size,
        "resize_mode": resize_mode,
        "size_divisor": int(size_divisor),
        "resample": int(resample),
        "background": list(_check_background(background)),
        "do_normalize": do_normalize,
        "max_pixels": _check_max_pixels(max_pixels),
    }


class VisualTokenizerImageProcessor(BaseImageProcessor):
    """Images -> ``pixel_values`` (B, 3, H, W) float32 in [-1, 1] for a visual tokenizer, and back.

    Args:
        size: output size, an int (square) or ``{"height": h, "width": w}``; unused when `resize_mode` is "none".
        resize_mode: "crop" (scale the shorter side to fit, keep the centre), "stretch" (scale to exactly `size`),
            "pad" (fit inside `size`, pad with `background`) or "none" (keep the native size, centre-cropped to
            multiples of `size_divisor`; for tokenizers that take any resolution).
        size_divisor: the tokenizer's total downsampling factor; every output side is a multiple of it.
        resample: a ``PIL.Image.Resampling`` filter (bicubic by default; see the module docstring).
        background: RGB colour that alpha is composited onto and that "pad" fills with.
        do_normalize: map [0, 255] to [-1, 1]; when False, ``pixel_values`` are in [0, 1].
        max_pixels: refuse (``ImageLoadError``) images whose header states more pixels than this, before decoding
            them (decompression bombs); ``None`` lifts the limit. See :mod:`tokenizer_bridge.image_loading`.
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = VisualTokenizerImageProcessorKwargs

    def __init__(
        self,
        size: int | dict[str, int] = 256,
        resize_mode: str = "crop",
        size_divisor: int = 1,
        resample: int = Image.Resampling.BICUBIC,
        background: Sequence[int] = WHITE,
        do_normalize: bool = True,
        max_pixels: int | None = MAX_PIXELS,
        **kwargs: Any,
    ) -> None:
        unexpected = sorted(set(kwargs) - _SERVICE_KEYS)
        if unexpected:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {unexpected}")
        kwargs.pop("image_processor_type", None)  # written by to_dict, derived from the class on save
        super().__init__(**kwargs)
        self.__dict__.update(_check_settings(size, resize_mode, size_divisor, resample, background, do_normalize,
                                             max_pixels))

    def _settings(self, overrides: dict[str, Any]) -> dict[str, Any]:
        names = ("size", "resize_mode", "size_divisor", "resample", "background", "do_normalize", "max_pixels")
        unexpected = sorted(set(overrides) - set(names))
        if unexpected:
            raise TypeError(f"preprocess got unexpected arguments {unexpected}; it accepts {list(names)}")
        # None means "use the configured value", as in transformers' image processors.
        merged = {name: getattr(self, name) for name in names}
        merged.update({name: value for name, value in overrides.items() if value is not None})
        return _check_settings(**merged)

    def preprocess(
        self,
        images: ImageSource | Sequence[ImageSource],
        return_tensors: str | None = "pt",
        **overrides: Any,
    ) -> BatchFeature:
        """One image or a list of images -> ``BatchFeature(pixel_values=...)``.

        ``pixel_values`` is a (B, 3, H, W) tensor for ``return_tensors="pt"`` (or "np"), or a list of (3, H, W)
        float32 arrays for ``return_tensors=None`` (the only choice when "none" mode yields different sizes).
        Config values can be overridden per call, e.g. ``preprocess(images, resize_mode="pad")``.
        """
        settings = self._settings(overrides)
        sources = list(images) if isinstance(images, (list, tuple)) else [images]
        if not sources:
            raise ValueError("preprocess got an empty list of images")
        arrays = [self._pixel_values(load_image(s, settings["background"], settings["max_pixels"]), settings)
                  for s in sources]
        if return_tensors is None:
            return BatchFeature({"pixel_values": arrays})
        shapes = sorted({tuple(a.shape) for a in arrays})
        if len(shapes) > 1:
            raise ValueError(
                f"images have different sizes after preprocessing ({shapes}) and cannot be stacked into one tensor; "
                f"use a fixed-size resize_mode ('crop', 'stretch' or 'pad'), pass one image at a time, or pass "
                f"return_tensors=None to get a list"
            )
        return BatchFeature({"pixel_values": np.stack(arrays)}, tensor_type=return_tensors)

    def _pixel_values(self, image: Image.Image, settings: dict[str, Any]) -> np.ndarray:
        """Fit one RGB image to the configured geometry -> (3, H, W) float32."""
        height, width = settings["size"]["height"], settings["size"]["width"]
        mode, resample = settings["resize_mode"], settings["resample"]
        if mode == "crop":
            image = _resize_crop(image, width, height, resample)
        elif mode == "stretch":
            image = _resize(image, (width, height), resample)
        elif mode == "pad":
            image = _resize_pad(image, width, height, resample, tuple(settings["background"]))
        else:
            image = _crop_to_multiple(image, settings["size_divisor"])
        return _array_to_pixel_values(image, settings["do_normalize"])

    def postprocess(self, pixel_values: torch.Tensor | np.ndarray | Sequence[Any]) -> list[Image.Image]:
        """``pixel_values`` of shape (3, H, W) or (B, 3, H, W), or a list of them -> RGB images.

        Values are clamped to the valid range and rounded, so for uint8 RGB input at the target size
        ``postprocess(preprocess(x))`` returns exactly the input pixels.
        """
        return to_pil_images(pixel_values, do_normalize=self.do_normalize)


def _array_to_pixel_values(image: Image.Image, do_normalize: bool) -> np.ndarray:
    """One RGB image -> (3, H, W) float32 in [-1, 1] (``do_normalize``) or [0, 1]."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)  # (3, H, W) in [0, 255]
    return pixels / 127.5 - 1.0 if do_normalize else pixels / 255.0


def to_pixel_values(images: Image.Image | Sequence[Image.Image], do_normalize: bool = True) -> torch.Tensor:
    """RGB image(s) of one size, taken as they are (no resizing) -> ``pixel_values`` ``(B, 3, H, W)`` float32 in
    [-1, 1] (or [0, 1] without ``do_normalize``). The one PIL -> tensor conversion of the library; use the image
    processor to fit images of any size to a tokenizer first."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    if not images:
        raise ValueError("to_pixel_values needs at least one image")
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        raise ValueError(f"to_pixel_values stacks images of one size, got sizes {sorted(sizes)}: resize them first "
                         "(VisualTokenizerImageProcessor)")
    return torch.from_numpy(np.stack([_array_to_pixel_values(image, do_normalize) for image in images]))


def to_pil_images(pixel_values: torch.Tensor | np.ndarray | Sequence[Any], do_normalize: bool = True) -> list[Image.Image]:
    """``pixel_values`` ``(3, H, W)`` or ``(B, 3, H, W)`` (or a list of them) -> RGB images, clamped to the valid
    range and rounded to uint8: the inverse of :func:`to_pixel_values`."""
    if isinstance(pixel_values, (list, tuple)):
        return [image for item in pixel_values for image in to_pil_images(item, do_normalize)]
    if isinstance(pixel_values, torch.Tensor):
        pixel_values = pixel_values.detach().to("cpu", torch.float32).numpy()
    array = np.asarray(pixel_values, dtype=np.float32)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1] != 3:
        raise ValueError(f"pixel_values must have shape (3, H, W) or (B, 3, H, W), got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("pixel_values contain non-finite values (NaN or inf)")
    if do_normalize:
        scaled = (np.clip(array, -1.0, 1.0) + 1.0) * 127.5
    else:
        scaled = np.clip(array, 0.0, 1.0) * 255.0
    pixels = np.rint(scaled).astype(np.uint8).transpose(0, 2, 3, 1)  # (B, H, W, 3)
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


def random_crops(images: Sequence[Image.Image], size: int, n: int, seed: int = 0,
                 scale: tuple[float, float] = (0.25, 1.0)) -> list[Image.Image]:
    """``n`` random square crops resized to ``size`` x ``size``, from images chosen uniformly.

    A crop's side is a uniform fraction in ``scale`` of its image's shorter side; the same seed gives the same crops.
    """
    if not images:
        raise ValueError("random_crops needs at least one image")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        image = images[rng.integers(len(images))]
        width, height = image.size
        side = rng.uniform(*scale) * min(width, height)
        left, top = rng.uniform(0, width - side), rng.uniform(0, height - side)
        crops.append(image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)))
    return crops
