"""`load_image`: any image source (a path, encoded bytes, a PIL image or a numpy array) -> an RGB PIL image.

It converts every Pillow mode explicitly instead of trusting ``Image.convert("RGB")``, which clips 16-bit data
instead of scaling it and drops alpha instead of compositing it; it refuses truncated files even when other code has
set Pillow's global ``LOAD_TRUNCATED_IMAGES``; and every failure is an `ImageLoadError` naming the problem and
the source.

Decompression bombs: an image is refused when its header states more than ``max_pixels`` pixels (default
:data:`MAX_PIXELS`, 8192 x 8192), before any pixel is decoded -- a 100 KB PNG can state 10000 x 10000, which takes
seconds to decode and gigabytes as a float tensor. Pillow's own guard (``Image.MAX_IMAGE_PIXELS``) is put back to its
default for the decode when other code disabled it.

Decisions on inputs that would otherwise come out silently wrong (each announced by an `ImageLoadWarning`):

- a float image (mode ``"F"``, e.g. a 32-bit float TIFF) whose values all lie in [0, 1] is read as [0, 1] data, as
  float arrays are, instead of Pillow's 0..255 convention under which it would come out black; values above 1 are
  read as 0..255;
- an animated image (GIF, APNG, WebP, multi-page TIFF) is read as its first frame.
"""

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

WHITE = (255, 255, 255)
MAX_PIXELS = 8192 * 8192  # the default limit on decoded pixels (see the module docstring)
_PILLOW_MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)  # Pillow's default, restored when someone disabled it

# Modes Pillow converts to RGB exactly (or by a colour model we accept as is: CMYK, YCbCr, LAB, HSV).
_OPAQUE_MODES = {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_STRAIGHT_ALPHA_MODES = {"LA", "PA", "RGBA"}
_PREMULTIPLIED_MODES = {"La", "RGBa"}
# "I" (32-bit int) is what older Pillow versions and some TIFF readers produce for 16-bit files, so it is read as
# 16-bit data too; values outside 0..65535 are refused rather than guessed at.
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageLoadError(ValueError):
    """An image source could not be turned into an RGB image; the message names the problem and the source."""


class ImageLoadWarning(UserWarning):
    """An image was loaded by a documented decision the caller may not expect (a first frame, a [0, 1] float
    image); ``warnings.simplefilter("error", ImageLoadWarning)`` turns these into errors."""


# ----------------------------------------------------------------------------------------------------------------
# load_image


def load_image(source: ImageSource, background: Sequence[int] = WHITE,
               max_pixels: Optional[int] = MAX_PIXELS) -> Image.Image:
    """Load `source` as an RGB image, compositing any alpha onto `background`.

    `source` is a path, encoded bytes, a PIL image, or a numpy array of shape (H, W), (H, W, 1), (H, W, 3) or
    (H, W, 4) with dtype uint8, uint16 (scaled by 255/65535), bool, or float in [0, 1]. EXIF orientation is applied
    so the pixels are upright as image viewers show them. Images of more than `max_pixels` pixels are refused from
    their header, before decoding (``None``: no limit of ours; Pillow's own still applies).
    """
    background = _check_background(background)
    max_pixels = _check_max_pixels(max_pixels)
    name = _describe(source)
    if isinstance(source, np.ndarray):
        _check_pixels(source.shape[1] if source.ndim > 1 else 1, source.shape[0] if source.ndim else 1,
                      max_pixels, name)
        image = _image_from_array(source, name)
    elif isinstance(source, Image.Image):
        image = _decode(lambda: source, name, max_pixels)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        image = _decode(lambda: Image.open(io.BytesIO(data)), name, max_pixels)
    elif isinstance(source, (str, os.PathLike)):
        data = _read_file(source, name)
        image = _decode(lambda: Image.open(io.BytesIO(data)), name, max_pixels)
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


def _check_max_pixels(max_pixels: Any) -> Optional[int]:
    if max_pixels is not None and (not _is_int(max_pixels) or max_pixels <= 0):
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    return None if max_pixels is None else int(max_pixels)


def _check_pixels(width: int, height: int, max_pixels: Optional[int], name: str) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            f"image {name} is {width}x{height} = {width * height} pixels, more than max_pixels={max_pixels} "
            "(a decompression bomb?); raise max_pixels to load it"
        )


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
    """Make Pillow raise on truncated data even if other code set the process-wide LOAD_TRUNCATED_IMAGES flag, and
    keep its decompression-bomb guard even if other code disabled it (``Image.MAX_IMAGE_PIXELS = None``).

    The flags are only touched when someone else changed them, so the common path changes no global state.
    """
    truncated, bombs = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    if not truncated and bombs is not None:
        yield
        return
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.MAX_IMAGE_PIXELS = _PILLOW_MAX_IMAGE_PIXELS if bombs is None else bombs
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = truncated, bombs


def _decode(open_image: Callable[[], Image.Image], name: str, max_pixels: Optional[int]) -> Image.Image:
    """Open and fully decode an image (Pillow decodes lazily, and only a full load detects truncation); its size is
    checked from the header first."""
    try:
        with _strict_decoding():
            image = open_image()
            _check_pixels(image.width, image.height, max_pixels, name)
            if getattr(image, "n_frames", 1) > 1:
                warnings.warn(f"image {name} has {image.n_frames} frames: only the first is used",
                              ImageLoadWarning, stacklevel=4)
            image.load()
            return ImageOps.exif_transpose(image)
    except (ImageLoadError, ImageLoadWarning):  # ours, or our warning turned into an error by the caller
        raise
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
    "F" images follow Pillow's convention of 0..255 floats (what ``convert("F")`` produces), except those whose
    values all lie in [0, 1], which are read as [0, 1] data (see the module docstring) with a warning.
    """
    values = np.asarray(image)  # (H, W): uint16 (either byte order), int32 or float32
    if image.mode == "F":
        finite = values[np.isfinite(values)]
        unit = finite.size == values.size and 0.0 <= float(values.min()) and 0.0 < float(values.max()) <= 1.0
        if unit:
            warnings.warn(f"mode 'F' image {name} has values in [0, 1]: read as [0, 1] data (Pillow's convention for "
                          "'F' is 0..255)", ImageLoadWarning, stacklevel=5)
        return _float_to_uint8(values, 1.0 if unit else 255.0, f"mode 'F' image {name}"), None
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
