"""Image loading and the image processor of the visual tokenizer.

`load_image` turns any image source (a path, encoded bytes, a PIL image or a numpy array) into an RGB PIL image.
It converts every Pillow mode explicitly instead of trusting ``Image.convert("RGB")``, which clips 16-bit data
instead of scaling it and drops alpha instead of compositing it; it refuses truncated files even when other code has
set Pillow's global ``LOAD_TRUNCATED_IMAGES``; and every failure is an `ImageLoadError` naming the problem and
the source.

`VisualTokenizerImageProcessor` fits those images to the tokenizer's input size ("crop", "stretch", "pad", or
"none" for tokenizers that take any resolution) and maps them to ``pixel_values`` (B, 3, H, W) float32 in [-1, 1],
the pixel range of VQGAN (Esser et al., 2021, "Taming Transformers for High-Resolution Image Synthesis");
`postprocess` maps ``pixel_values`` back to PIL images. Its ``__init__`` arguments are its config, saved by
``save_pretrained`` as ``preprocessor_config.json``.

Resampling defaults to Pillow's bicubic filter, which is antialiased when downscaling (its support grows with the
scale factor, unlike ``torch.nn.functional.interpolate``), with ``reducing_gap=3.0``: on a 2048 -> 256 downscale
that halves the time and changes pixels by 0.2 grey levels on average (2 at most).
"""

import contextlib
import io
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Union

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

WHITE = (255, 255, 255)
RESIZE_MODES = ("crop", "stretch", "pad", "none")
REDUCING_GAP = 3.0  # see the module docstring for what it costs and buys

# Modes Pillow converts to RGB exactly (or by a colour model we accept as is: CMYK, YCbCr, LAB, HSV).
_OPAQUE_MODES = {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_STRAIGHT_ALPHA_MODES = {"LA", "PA", "RGBA"}
_PREMULTIPLIED_MODES = {"La", "RGBa"}
# "I" (32-bit int) is what older Pillow versions and some TIFF readers produce for 16-bit files, so it is read as
# 16-bit data too; values outside 0..65535 are refused rather than guessed at.
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_SERVICE_KEYS = {"image_processor_type", "processor_class", "feature_extractor_type", "auto_map"}


class ImageLoadError(ValueError):
    """An image source could not be turned into an RGB image; the message names the problem and the source."""


# ----------------------------------------------------------------------------------------------------------------
# load_image


def load_image(source: ImageSource, background: Sequence[int] = WHITE) -> Image.Image:
    """Load `source` as an RGB image, compositing any alpha onto `background`.

    `source` is a path, encoded bytes, a PIL image, or a numpy array of shape (H, W), (H, W, 1), (H, W, 3) or
    (H, W, 4) with dtype uint8, uint16 (scaled by 255/65535), bool, or float in [0, 1]. EXIF orientation is applied
    so the pixels are upright as image viewers show them.
    """
    background = _check_background(background)
    name = _describe(source)
    if isinstance(source, np.ndarray):
        image = _image_from_array(source, name)
    elif isinstance(source, Image.Image):
        image = _decode(lambda: source, name)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        image = _decode(lambda: Image.open(io.BytesIO(data)), name)
    elif isinstance(source, (str, os.PathLike)):
        data = _read_file(source, name)
        image = _decode(lambda: Image.open(io.BytesIO(data)), name)
    else:
        raise ImageLoadError(
            f"cannot load an image from {name}: expected a path, bytes, a PIL image or a numpy array"
        )
    if image.width == 0 or image.height == 0:
        raise ImageLoadError(f"image {name} has zero size ({image.width}x{image.height})")
    return _to_rgb(image, background, name)


def _describe(source: Any) -> str:
    """A short name for `source` in error messages (never the whole payload)."""
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fsdecode(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{memoryview(source).nbytes} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image mode={source.mode} size={source.width}x{source.height}>"
    if isinstance(source, np.ndarray):
        return f"<array shape={source.shape} dtype={source.dtype}>"
    return f"<{type(source).__name__} object>"


def _check_background(background: Sequence[int]) -> tuple[int, int, int]:
    values = tuple(background) if isinstance(background, (tuple, list)) else ()
    if len(values) != 3 or not all(_is_int(v) and 0 <= v <= 255 for v in values):
        raise ValueError(f"background must be an RGB triple of ints in 0..255, got {background!r}")
    return tuple(int(v) for v in values)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _read_file(path: str | os.PathLike, name: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except FileNotFoundError:
        hint = " (URLs are not fetched; download the image first)" if "://" in os.fsdecode(path) else ""
        raise ImageLoadError(f"image file not found: {name}{hint}") from None
    except IsADirectoryError:
        raise ImageLoadError(f"image path is a directory, not a file: {name}") from None
    except OSError as err:
        raise ImageLoadError(f"cannot read image file {name}: {err}") from err


@contextlib.contextmanager
def _strict_decoding() -> Iterator[None]:
    """Make Pillow raise on truncated data even if other code set the process-wide LOAD_TRUNCATED_IMAGES flag.

    The flag is only touched when someone else turned it on, so the common path changes no global state.
    """
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = True


def _decode(open_image: Callable[[], Image.Image], name: str) -> Image.Image:
    """Open and fully decode an image (Pillow decodes lazily, and only a full load detects truncation)."""
    try:
        with _strict_decoding():
            image = open_image()
            image.load()
            return ImageOps.exif_transpose(image)
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"cannot identify image {name}: not a known image format, or corrupt") from err
    except Image.DecompressionBombError as err:
        raise ImageLoadError(f"image {name} is too large to decode safely: {err}") from err
    # Pillow's format plugins raise many exception types on malformed data (OSError, SyntaxError, EOFError,
    # struct.error, ...), so anything raised while decoding is reported as a broken image.
    except Exception as err:  # noqa: BLE001
        problem = "is truncated" if "truncated" in str(err).lower() else "is corrupt or unreadable"
        raise ImageLoadError(f"image {name} {problem}: {type(err).__name__}: {err}") from err


# ----------------------------------------------------------------------------------------------------------------
# numpy arrays


def _image_from_array(array: np.ndarray, name: str) -> Image.Image:
    """An L, RGB or RGBA image from an (H, W[, C]) array; alpha is composited later, like any RGBA image."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        hint = "; channels-first arrays must be transposed to (H, W, C)" if array.ndim == 3 else ""
        raise ImageLoadError(
            f"array {name} has an unsupported shape: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4){hint}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageLoadError(f"array {name} has zero size ({array.shape[1]}x{array.shape[0]})")
    pixels = np.ascontiguousarray(_array_to_uint8(array, name))  # (H, W, C) uint8
    return Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)


def _array_to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    kind, itemsize = array.dtype.kind, array.dtype.itemsize
    if kind == "b":
        return array.astype(np.uint8) * 255
    if kind == "u" and itemsize == 1:
        return array
    if kind == "u" and itemsize == 2:
        return _scale_to_uint8(array, 65535)
    if kind == "f":
        return _float_to_uint8(array, 1.0, f"array {name}")
    raise ImageLoadError(
        f"array {name} has an unsupported dtype {array.dtype}: expected uint8, uint16, bool, or float in [0, 1]"
    )


def _scale_to_uint8(values: np.ndarray, max_value: int) -> np.ndarray:
    """Map 0..max_value to 0..255 with round-half-up, in exact integer arithmetic."""
    return ((values.astype(np.int64) * 255 + max_value // 2) // max_value).astype(np.uint8)


def _float_to_uint8(values: np.ndarray, max_value: float, name: str) -> np.ndarray:
    if not np.isfinite(values).all():
        raise ImageLoadError(f"{name} contains non-finite values (NaN or inf)")
    low, high = float(values.min()), float(values.max())
    slack = 0.5 * max_value / 255  # half a uint8 step: such values round to 0 or 255 anyway
    if low < -slack or high > max_value + slack:
        hint = "; divide by 255 or pass uint8" if max_value == 1.0 and high <= 255.5 else ""
        raise ImageLoadError(
            f"{name} has float values in [{low:.4g}, {high:.4g}], outside the expected [0, {max_value:g}]{hint}"
        )
    scaled = values.astype(np.float64) * (255.0 / max_value)
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Pillow modes


def _to_rgb(image: Image.Image, background: tuple[int, int, int], name: str) -> Image.Image:
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        gray, alpha = _high_depth_to_uint8(image, name)
        return _composite(np.repeat(gray[..., None], 3, axis=2), alpha, background)
    if mode in _PREMULTIPLIED_MODES:
        pixels = np.asarray(image)  # (H, W, 2) for La, (H, W, 4) for RGBa
        color = pixels[..., :1].repeat(3, axis=2) if mode == "La" else pixels[..., :3]
        return _composite(color, pixels[..., -1], background, premultiplied=True)
    if mode in _STRAIGHT_ALPHA_MODES or (mode in _OPAQUE_MODES and image.has_transparency_data):
        # Pillow applies palette alpha and colour keys (info["transparency"]) when converting to RGBA.
        rgba = np.asarray(image.convert("RGBA"))
        return _composite(rgba[..., :3], rgba[..., 3], background)
    if mode == "RGB":
        return image
    if mode in _OPAQUE_MODES:
        return image.convert("RGB")
    raise ImageLoadError(f"image {name} has an unsupported mode {mode!r}")


def _high_depth_to_uint8(image: Image.Image, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(gray, alpha) uint8 planes of a 16-bit, 32-bit int or float image.

    Pillow's own conversion clips these to 0..255 instead of scaling, turning most 16-bit photos white.
    "F" images follow Pillow's convention of 0..255 floats (what ``convert("F")`` produces).
    """
    values = np.asarray(image)  # (H, W): uint16 (either byte order), int32 or float32
    if image.mode == "F":
        return _float_to_uint8(values, 255.0, f"mode 'F' image {name}"), None
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        raise ImageLoadError(
            f"mode {image.mode!r} image {name} has values in [{low}, {high}], outside the 16-bit range 0..65535"
        )
    key = image.info.get("transparency")  # a 16-bit PNG's tRNS colour key
    alpha = np.where(values == key, 0, 255).astype(np.uint8) if _is_int(key) else None
    return _scale_to_uint8(values, 65535), alpha


def _composite(
    color: np.ndarray,
    alpha: np.ndarray | None,
    background: tuple[int, int, int],
    premultiplied: bool = False,
) -> Image.Image:
    """Blend (H, W, 3) uint8 colour over `background` with (H, W) uint8 alpha, in exact integer arithmetic."""
    if alpha is None:
        return Image.fromarray(np.ascontiguousarray(color, dtype=np.uint8))
    color = color.astype(np.int64)
    alpha = alpha.astype(np.int64)[..., None]
    behind = np.asarray(background, dtype=np.int64) * (255 - alpha)
    if premultiplied:
        blended = color + (behind + 127) // 255
    else:
        blended = (color * alpha + behind + 127) // 255
    return Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))


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


def _check_size(size: Any) -> dict[str, int]:
    if _is_int(size):
        size = {"height": size, "width": size}
    if not isinstance(size, dict) or set(size) != {"height", "width"}:
        raise ValueError(f'size must be an int or {{"height": int, "width": int}}, got {size!r}')
    if not all(_is_int(v) and v > 0 for v in size.values()):
        raise ValueError(f"size must be positive, got {size!r}")
    return {"height": int(size["height"]), "width": int(size["width"])}


def _check_settings(
    size: Any, resize_mode: str, size_divisor: int, resample: int, background: Any, do_normalize: bool
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
        **kwargs: Any,
    ) -> None:
        unexpected = sorted(set(kwargs) - _SERVICE_KEYS)
        if unexpected:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {unexpected}")
        kwargs.pop("image_processor_type", None)  # written by to_dict, derived from the class on save
        super().__init__(**kwargs)
        self.__dict__.update(_check_settings(size, resize_mode, size_divisor, resample, background, do_normalize))

    def _settings(self, overrides: dict[str, Any]) -> dict[str, Any]:
        names = ("size", "resize_mode", "size_divisor", "resample", "background", "do_normalize")
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
        arrays = [self._pixel_values(load_image(s, settings["background"]), settings) for s in sources]
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
