"""`load_image` against decompression bombs, float images in [0, 1] and animated images (image_loading.py)."""

import io
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from tokenizer_bridge.image_loading import MAX_PIXELS, ImageLoadError, ImageLoadWarning, load_image
from tokenizer_bridge.image_processing_visual_tokenizer import VisualTokenizerImageProcessor


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A ~100 KB PNG that decodes to 10000 x 10000 pixels, under Pillow's own limit."""
    return encoded(Image.new("L", (10000, 10000)), "PNG", optimize=True)


def test_a_decompression_bomb_is_refused_from_its_header(bomb):
    assert len(bomb) < 200_000 and 10000 * 10000 > MAX_PIXELS
    start = time.perf_counter()
    with pytest.raises(ImageLoadError, match="10000x10000 = 100000000 pixels, more than max_pixels"):
        load_image(bomb)
    assert time.perf_counter() - start < 0.5  # refused before decoding (a decode takes seconds)
    processor = VisualTokenizerImageProcessor(size=8, resize_mode="none")
    with pytest.raises(ImageLoadError, match="max_pixels"):
        processor(bomb)


def test_the_limit_is_configurable_and_saved(tmp_path):
    small = encoded(Image.new("RGB", (40, 30)), "PNG")
    with pytest.raises(ImageLoadError, match="40x30 = 1200 pixels, more than max_pixels=1000"):
        load_image(small, max_pixels=1000)
    with pytest.raises(ImageLoadError, match="max_pixels=1000"):
        load_image(np.zeros((30, 40, 3), np.uint8), max_pixels=1000)
    assert load_image(small, max_pixels=None).size == (40, 30)
    with pytest.raises(ValueError, match="max_pixels must be a positive int"):
        load_image(small, max_pixels=0)
    processor = VisualTokenizerImageProcessor(size=8, max_pixels=1000)
    with pytest.raises(ImageLoadError, match="max_pixels=1000"):
        processor(small)
    assert processor(small, max_pixels=2000)["pixel_values"].shape == (1, 3, 8, 8)
    processor.save_pretrained(tmp_path)
    assert VisualTokenizerImageProcessor.from_pretrained(tmp_path).max_pixels == 1000
    assert VisualTokenizerImageProcessor().max_pixels == MAX_PIXELS


def test_pillows_guard_is_restored_when_other_code_disabled_it(monkeypatch):
    png = encoded(Image.new("RGB", (4, 4)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    seen = []
    original = Image.Image.load

    def spy(image):
        seen.append(Image.MAX_IMAGE_PIXELS)
        return original(image)

    monkeypatch.setattr(Image.Image, "load", spy)
    load_image(png)
    assert seen and all(limit is not None for limit in seen)
    assert Image.MAX_IMAGE_PIXELS is None  # the caller's setting is put back


def test_float_images_in_the_unit_range_are_read_as_unit_floats(tmp_path):
    values = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)
    path = tmp_path / "float.tif"
    Image.fromarray(values, mode="F").save(path)
    with pytest.warns(ImageLoadWarning, match="values in \\[0, 1\\]: read as \\[0, 1\\] data"):
        image = load_image(path)
    assert np.asarray(image)[..., 0].tolist() == [[0, 128], [255, 64]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(Image.new("F", (2, 2), 77.0)).getpixel((0, 0)) == (77, 77, 77)  # 0..255: as before
        assert load_image(Image.new("F", (2, 2), 0.0)).getpixel((0, 0)) == (0, 0, 0)  # black either way


def test_animated_images_keep_their_first_frame_with_a_warning():
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    with pytest.warns(ImageLoadWarning, match="has 2 frames: only the first is used"):
        image = load_image(gif)
    assert image.getpixel((0, 0)) == (255, 0, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageLoadWarning)
        with pytest.raises(ImageLoadWarning):
            load_image(gif)  # callers who want a refusal turn the warning into an error
        load_image(encoded(frames[0], "GIF"))  # a still GIF: no warning
