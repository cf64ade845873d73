"""What `VisualTokenizerImageProcessor` takes as images, turned into sources that `load_image` reads.

transformers' image processors take PIL images, numpy arrays and torch tensors, channels-first or channels-last,
one at a time, as a list or as a 4-D batch; :func:`~tokenizer_bridge.image_loading.load_image` takes (H, W[, C])
arrays. This module bridges the two without changing a pixel value:

- a torch tensor becomes the numpy array of its values (bfloat16, which numpy lacks, is widened to float32);
- the channel axis of a 3-D array is ``input_data_format`` when given ("channels_first" or "channels_last"), else
  inferred: a numpy array is channels-last when its last axis has 1, 3 or 4 entries (how `load_image` always read
  arrays) and channels-first when only its first axis has; a tensor, channels-first by convention, is checked in
  the other order;
- a 4-D array or tensor is a batch of images along its first axis.

`check_rgb` is what ``do_convert_rgb=False`` means for a visual tokenizer, which takes 3-channel RGB: images are
not converted, so any other mode is refused instead of being silently converted.
"""

import io
import os
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from .image_loading import ImageLoadError, _describe

CHANNEL_FORMATS = ("channels_first", "channels_last")
_CHANNEL_COUNTS = (1, 3, 4)
_SOURCE_TYPES = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray, torch.Tensor)


def check_channel_format(value: Any, name: str) -> Optional[str]:
    """``"channels_first"``, ``"channels_last"`` or None, from a string or transformers' ``ChannelDimension``."""
    if value is None:
        return None
    text = getattr(value, "value", value)  # ChannelDimension is a str enum
    if not isinstance(text, str) or text not in CHANNEL_FORMATS:
        raise ValueError(f"{name} must be 'channels_first', 'channels_last' or None, got {value!r}")
    return text


def flatten_images(images: Any) -> list[Any]:
    """One image, a list or tuple of images, or a 4-D batch (an array or tensor) -> a flat list of single images."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    flat = []
    for item in items:
        if isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4:
            flat.extend(item[i] for i in range(item.shape[0]))
        else:
            flat.append(item)
    return flat


def to_source(source: Any, input_data_format: Optional[str] = None) -> Any:
    """A `load_image` source: arrays and tensors as (H, W[, C]) numpy arrays, other sources unchanged."""
    if not isinstance(source, _SOURCE_TYPES):
        nested = " (lists of lists are not flattened)" if isinstance(source, (list, tuple)) else ""
        raise ImageLoadError(f"cannot load an image from {_describe(source)}: expected a path, bytes, a PIL image, "
                             f"a numpy array or a torch tensor{nested}")
    is_tensor = isinstance(source, torch.Tensor)
    if is_tensor:
        source = _tensor_to_numpy(source)
    elif not isinstance(source, np.ndarray):
        return source
    return _channels_last(source, input_data_format, "tensor" if is_tensor else "array")


def _tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().to("cpu")
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    try:
        return tensor.numpy()
    except (TypeError, RuntimeError) as err:
        raise ImageLoadError(f"tensor of shape {tuple(tensor.shape)} and dtype {tensor.dtype} cannot be read as an "
                             f"image: {err}") from err


def _channels_last(array: np.ndarray, input_data_format: Optional[str], kind: str) -> np.ndarray:
    """A 3-D array as (H, W, C); 2-D arrays and shapes `load_image` refuses by name pass through unchanged."""
    if array.ndim != 3:
        return array
    first, last = array.shape[0], array.shape[-1]
    if input_data_format is None:
        order = [("channels_last", last), ("channels_first", first)]
        if kind == "tensor":
            order.reverse()
        input_data_format = next((fmt for fmt, count in order if count in _CHANNEL_COUNTS), None)
        if input_data_format is None:
            raise ImageLoadError(
                f"{kind} of shape {tuple(array.shape)} has no channel axis: expected 1, 3 or 4 channels first "
                "(C, H, W) or last (H, W, C); pass input_data_format to say which axis holds them"
            )
    else:
        count = first if input_data_format == "channels_first" else last
        if count not in _CHANNEL_COUNTS:
            raise ImageLoadError(
                f"{kind} of shape {tuple(array.shape)} has {count} entries on its channel axis "
                f"(input_data_format={input_data_format!r}): expected 1, 3 or 4 channels"
            )
    return np.moveaxis(array, 0, -1) if input_data_format == "channels_first" else array


def check_rgb(source: Any) -> None:
    """Refuse (``ImageLoadError``) a source that is not already 3-channel RGB: what ``do_convert_rgb=False`` means
    for a visual tokenizer. Sources whose header cannot be read are left to `load_image` to report."""
    if isinstance(source, np.ndarray):
        if source.ndim == 3 and source.shape[-1] == 3:
            return
        channels = 1 if source.ndim == 2 else source.shape[-1]
        problem = f"has {channels} channel{'s' if channels != 1 else ''}"
    else:
        mode = _mode(source)
        if mode is None or mode == "RGB":
            return
        problem = f"has mode {mode!r}"
    raise ImageLoadError(
        f"image {_describe(source)} {problem} and do_convert_rgb=False: the visual tokenizer takes 3-channel RGB "
        "images, so pass do_convert_rgb=True to convert it (alpha is composited onto the background)"
    )


def _mode(source: Any) -> Optional[str]:
    """The Pillow mode a source decodes to, read from its header; None when it cannot be read."""
    if isinstance(source, Image.Image):
        return source.mode
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            opened = Image.open(io.BytesIO(bytes(source)))
        else:
            opened = Image.open(source)
        with opened:
            return opened.mode
    except Exception:  # noqa: BLE001  (load_image reports unreadable sources with its own message)
        return None
