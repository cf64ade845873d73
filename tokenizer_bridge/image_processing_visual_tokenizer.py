"""The image processor of the visual tokenizer.

`VisualTokenizerImageProcessor` fits images -- loaded by :func:`~tokenizer_bridge.image_loading.load_image`, which
turns any source into an RGB PIL image or raises `ImageLoadError` -- to the tokenizer's input size ("crop", "stretch",
"pad", or "none" for tokenizers that take any resolution) and maps them to ``pixel_values`` (B, 3, H, W) float32 in
[-1, 1], the pixel range of VQGAN (Esser et al., 2021, "Taming Transformers for High-Resolution Image Synthesis");
`postprocess` maps ``pixel_values`` back to PIL images. Its ``__init__`` arguments are its config, saved by
``save_pretrained`` as ``preprocessor_config.json``.

It takes what transformers' image processors take (PIL images, numpy arrays and torch tensors, channels-first or
-last, single, listed or as a 4-D batch: see :mod:`tokenizer_bridge.image_inputs`) and the standard arguments with
their transformers meaning: ``do_resize``, ``size``, ``resample``, ``do_convert_rgb``, ``do_rescale`` /
``rescale_factor``, ``do_normalize`` / ``image_mean`` / ``image_std``, ``input_data_format``, ``data_format`` and
``return_tensors``, each defaulting to the processor's attribute and overridable per call (``None`` in a call means
the configured value). Every image is first decoded to 8-bit RGB, so the values that ``rescale_factor`` multiplies
are 0..255 whatever the input (float inputs in [0, 1] included, as `load_image` reads them). The defaults --
rescale by 1/255, then normalize with mean = std = 0.5 -- give [-1, 1] by the same float32 arithmetic as before
these arguments existed, so their outputs are bit-identical.

Resampling defaults to Pillow's bicubic filter, which is antialiased when downscaling (its support grows with the
scale factor, unlike ``torch.nn.functional.interpolate``), with ``reducing_gap=3.0``: on a 2048 -> 256 downscale
that halves the time and changes pixels by 0.2 grey levels on average (2 at most).
"""

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

from .image_inputs import check_channel_format, check_rgb, flatten_images, to_source
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
RESCALE_FACTOR = 1 / 255
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)  # with RESCALE_FACTOR: [0, 255] -> [-1, 1]
_SERVICE_KEYS = {"image_processor_type", "processor_class", "feature_extractor_type", "auto_map"}
# The config, in the order of __init__'s arguments; each is also a per-call override of preprocess.
SETTINGS = ("size", "resize_mode", "size_divisor", "resample", "background", "do_normalize", "max_pixels",
            "do_resize", "do_convert_rgb", "do_rescale", "rescale_factor", "image_mean", "image_std")
CALL_ARGUMENTS = ("input_data_format", "data_format")  # per call only: they describe one call's arrays


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
    if isinstance(size, (list, tuple)) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    if _is_int(size):
        size = {"height": size, "width": size}
    if not isinstance(size, dict) or set(size) != {"height", "width"}:
        hint = ""
        if isinstance(size, dict) and set(size) & {"shortest_edge", "longest_edge"}:
            hint = ('; sizes that keep the aspect ratio are not a fixed tokenizer input: use resize_mode="pad" '
                    '(fit inside height x width) or "none" (native size)')
        raise ValueError(f'size must be an int, (height, width) or {{"height": int, "width": int}}, got {size!r}{hint}')
    if not all(_is_int(v) and v > 0 for v in size.values()):
        raise ValueError(f"size must be positive, got {size!r}")
    return {"height": int(size["height"]), "width": int(size["width"])}


def _check_switch(name: str, value: Any) -> bool | None:
    """A bool; None is kept (transformers stores an explicit None, and a None switch is off)."""
    if isinstance(value, np.bool_):
        value = bool(value)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _check_rescale_factor(value: Any) -> float:
    # any finite non-zero factor, as in transformers (its processor tests flip the sign to see the keyword arrive)
    if not _is_real(value) or not math.isfinite(value) or value == 0:
        raise ValueError(f"rescale_factor must be a finite non-zero number, got {value!r}")
    return float(value)


def _check_statistic(name: str, value: Any) -> float | list[float]:
    """``image_mean`` / ``image_std``: one number for all channels, or one per RGB channel (kept as given: JSON)."""
    many = isinstance(value, (list, tuple, np.ndarray))
    values = list(np.asarray(value).reshape(-1)) if isinstance(value, np.ndarray) else list(value) if many else [value]
    if len(values) not in (1, 3) or not all(_is_real(v) and math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be a number or a list of 3 numbers (one per RGB channel: the visual tokenizer "
                         f"takes 3-channel images), got {value!r}")
    if name == "image_std" and not all(v > 0 for v in values):
        raise ValueError(f"image_std must be positive, got {value!r}")
    return [float(v) for v in values] if many else float(values[0])


def _check_settings(
    size: Any, resize_mode: str, size_divisor: int, resample: int, background: Any, do_normalize: Any,
    max_pixels: Any = MAX_PIXELS, do_resize: Any = True, do_convert_rgb: Any = True, do_rescale: Any = True,
    rescale_factor: Any = RESCALE_FACTOR, image_mean: Any = IMAGE_MEAN, image_std: Any = IMAGE_STD,
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
    switches = {"do_normalize": do_normalize, "do_resize": do_resize, "do_convert_rgb": do_convert_rgb,
                "do_rescale": do_rescale}
    return {
        "size": size,
        "resize_mode": resize_mode,
        "size_divisor": int(size_divisor),
        "resample": int(resample),
        "background": list(_check_background(background)),
        "max_pixels": _check_max_pixels(max_pixels),
        **{name: _check_switch(name, value) for name, value in switches.items()},
        "rescale_factor": _check_rescale_factor(rescale_factor),
        "image_mean": _check_statistic("image_mean", image_mean),
        "image_std": _check_statistic("image_std", image_std),
    }


def _is_legacy_scaling(settings: dict[str, Any]) -> bool:
    """Whether the settings give [0, 1] or [-1, 1] exactly as before the standard arguments existed."""
    if not settings["do_rescale"] or settings["rescale_factor"] != RESCALE_FACTOR:
        return False
    halves = [v == 0.5 for name in ("image_mean", "image_std")
              for v in (settings[name] if isinstance(settings[name], list) else [settings[name]])]
    return not settings["do_normalize"] or all(halves)


def _channel_column(value: float | list[float]) -> np.ndarray:
    return np.asarray(value if isinstance(value, list) else [value], dtype=np.float32).reshape(-1, 1, 1)


class VisualTokenizerImageProcessor(BaseImageProcessor):
    """Images -> ``pixel_values`` (B, 3, H, W) float32 in [-1, 1] for a visual tokenizer, and back.

    Args:
        size: output size, an int (square), ``(height, width)`` or ``{"height": h, "width": w}``; unused when
            `resize_mode` is "none" or `do_resize` is False.
        resize_mode: "crop" (scale the shorter side to fit, keep the centre), "stretch" (scale to exactly `size`),
            "pad" (fit inside `size`, pad with `background`) or "none" (keep the native size, centre-cropped to
            multiples of `size_divisor`; for tokenizers that take any resolution).
        size_divisor: the tokenizer's total downsampling factor; every output side is a multiple of it.
        resample: a ``PIL.Image.Resampling`` filter (bicubic by default; see the module docstring).
        background: RGB colour that alpha is composited onto and that "pad" fills with.
        do_normalize: subtract `image_mean` and divide by `image_std` (after rescaling): [0, 1] -> [-1, 1] by
            default; when False, ``pixel_values`` are in [0, 1] (with the default rescaling).
        max_pixels: refuse (``ImageLoadError``) images whose header states more pixels than this, before decoding
            them (decompression bombs); ``None`` lifts the limit. See :mod:`tokenizer_bridge.image_loading`.
        do_resize: False keeps every image's native size, as `resize_mode` "none" does.
        do_convert_rgb: convert every image to RGB (alpha composited onto `background`); when False, images that
            are not 3-channel RGB already are refused, since the tokenizer takes 3 channels.
        do_rescale: multiply the 0..255 values by `rescale_factor` (1/255); when False they stay 0..255.
        rescale_factor, image_mean, image_std: as in transformers; means and stds are one number or one per channel.

    A switch given as None here is stored as None (and is off), as transformers' processors store it; in a call,
    None means the configured value.
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = VisualTokenizerImageProcessorKwargs
    _valid_kwargs_names = list(SETTINGS)  # what preprocess takes per call, besides CALL_ARGUMENTS
    # The defaults, as class attributes (transformers' convention; `to_dict` keeps an explicit None only for these).
    # Instances hold their own copies of the mutable ones.
    size = {"height": 256, "width": 256}
    resize_mode = "crop"
    size_divisor = 1
    resample = int(Image.Resampling.BICUBIC)
    background = list(WHITE)
    do_normalize = True
    max_pixels = MAX_PIXELS
    do_resize = True
    do_convert_rgb = True
    do_rescale = True
    rescale_factor = RESCALE_FACTOR
    image_mean = list(IMAGE_MEAN)
    image_std = list(IMAGE_STD)

    def __init__(
        self,
        size: int | Sequence[int] | dict[str, int] = 256,
        resize_mode: str = "crop",
        size_divisor: int = 1,
        resample: int = Image.Resampling.BICUBIC,
        background: Sequence[int] = WHITE,
        do_normalize: bool | None = True,
        max_pixels: int | None = MAX_PIXELS,
        do_resize: bool | None = True,
        do_convert_rgb: bool | None = True,
        do_rescale: bool | None = True,
        rescale_factor: float = RESCALE_FACTOR,
        image_mean: float | Sequence[float] = IMAGE_MEAN,
        image_std: float | Sequence[float] = IMAGE_STD,
        **kwargs: Any,
    ) -> None:
        # as in preprocess, a standard keyword this processor has no use for may come as None (unset)
        kwargs = {k: v for k, v in kwargs.items() if not (v is None and k in self.valid_kwargs.__annotations__)}
        unexpected = sorted(set(kwargs) - _SERVICE_KEYS)
        if unexpected:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {unexpected}")
        kwargs.pop("image_processor_type", None)  # written by to_dict, derived from the class on save
        super().__init__(**kwargs)
        self.__dict__.update(_check_settings(
            size, resize_mode, size_divisor, resample, background, do_normalize, max_pixels, do_resize,
            do_convert_rgb, do_rescale, rescale_factor, image_mean, image_std,
        ))

    def _settings(self, overrides: dict[str, Any]) -> dict[str, Any]:
        # A standard keyword this processor has no use for may come as None (unset), e.g. from a ProcessorMixin.
        standard = self.valid_kwargs.__annotations__
        unexpected = sorted(name for name, value in overrides.items()
                            if name not in SETTINGS and not (value is None and name in standard))
        if unexpected:
            raise TypeError(f"preprocess got unexpected arguments {unexpected}; it accepts "
                            f"{list(SETTINGS) + list(CALL_ARGUMENTS)}")
        # None means "use the configured value", as in transformers' image processors.
        merged = {name: getattr(self, name) for name in SETTINGS}
        merged.update({name: value for name, value in overrides.items() if value is not None})
        return _check_settings(**merged)

    def preprocess(
        self,
        images: ImageSource | torch.Tensor | Sequence[ImageSource | torch.Tensor],
        return_tensors: str | None = "pt",
        **overrides: Any,
    ) -> BatchFeature:
        """One image, a list of images or a 4-D batch -> ``BatchFeature(pixel_values=...)``.

        ``pixel_values`` is a (B, 3, H, W) tensor for ``return_tensors="pt"`` (or "np"), or a list of (3, H, W)
        float32 arrays for ``return_tensors=None`` (the only choice when "none" mode yields different sizes);
        ``data_format="channels_last"`` puts the channels last instead. Config values can be overridden per call,
        e.g. ``preprocess(images, resize_mode="pad")``; ``input_data_format`` says where the channels of arrays
        and tensors are when their shape leaves it open.
        """
        call = {name: overrides.pop(name, None) for name in CALL_ARGUMENTS}
        settings = self._settings(overrides)
        input_format = check_channel_format(call["input_data_format"], "input_data_format")
        channels_last = check_channel_format(call["data_format"], "data_format") == "channels_last"
        sources = flatten_images(images)
        if not sources:
            raise ValueError("preprocess got an empty list of images")
        arrays = [self._pixel_values(self._load(s, settings, input_format), settings) for s in sources]
        if channels_last:
            arrays = [np.ascontiguousarray(a.transpose(1, 2, 0)) for a in arrays]
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

    @staticmethod
    def _load(source: Any, settings: dict[str, Any], input_format: str | None) -> Image.Image:
        source = to_source(source, input_format)
        if not settings["do_convert_rgb"]:
            check_rgb(source)
        return load_image(source, settings["background"], settings["max_pixels"])

    def _pixel_values(self, image: Image.Image, settings: dict[str, Any]) -> np.ndarray:
        """Fit one RGB image to the configured geometry and scale it -> (3, H, W) float32."""
        height, width = settings["size"]["height"], settings["size"]["width"]
        mode, resample = settings["resize_mode"], settings["resample"]
        if not settings["do_resize"]:
            mode = "none"
        if mode == "crop":
            image = _resize_crop(image, width, height, resample)
        elif mode == "stretch":
            image = _resize(image, (width, height), resample)
        elif mode == "pad":
            image = _resize_pad(image, width, height, resample, tuple(settings["background"]))
        else:
            image = _crop_to_multiple(image, settings["size_divisor"])
        if _is_legacy_scaling(settings):
            return _array_to_pixel_values(image, bool(settings["do_normalize"]))
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)  # (3, H, W) in [0, 255]
        if settings["do_rescale"]:
            pixels = pixels * np.float32(settings["rescale_factor"])
        if settings["do_normalize"]:
            pixels = (pixels - _channel_column(settings["image_mean"])) / _channel_column(settings["image_std"])
        return pixels.astype(np.float32, copy=False)

    def postprocess(self, pixel_values: torch.Tensor | np.ndarray | Sequence[Any]) -> list[Image.Image]:
        """``pixel_values`` of shape (3, H, W) or (B, 3, H, W), or a list of them -> RGB images, undoing the
        configured rescaling and normalization.

        Values are clamped to the valid range and rounded, so for uint8 RGB input at the target size
        ``postprocess(preprocess(x))`` returns exactly the input pixels.
        """
        settings = {name: getattr(self, name) for name in SETTINGS}
        if _is_legacy_scaling(settings):
            return to_pil_images(pixel_values, do_normalize=bool(self.do_normalize))
        if isinstance(pixel_values, (list, tuple)):
            return [image for item in pixel_values for image in self.postprocess(item)]
        array = _checked_pixel_array(pixel_values)
        if settings["do_normalize"]:
            array = array * _channel_column(settings["image_std"]) + _channel_column(settings["image_mean"])
        array = array / (255.0 * settings["rescale_factor"] if settings["do_rescale"] else 255.0)
        return to_pil_images(array, do_normalize=False)  # [0, 1] -> 0..255, clamped and rounded


def _checked_pixel_array(pixel_values: torch.Tensor | np.ndarray) -> np.ndarray:
    """``pixel_values`` as a float32 (3, H, W) or (B, 3, H, W) array, or the error `to_pil_images` gives."""
    if isinstance(pixel_values, torch.Tensor):
        pixel_values = pixel_values.detach().to("cpu", torch.float32).numpy()
    array = np.asarray(pixel_values, dtype=np.float32)
    if array.ndim not in (3, 4) or array.shape[-3] != 3:
        raise ValueError(f"pixel_values must have shape (3, H, W) or (B, 3, H, W), got {array.shape}")
    return array


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
