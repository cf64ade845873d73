"""Tests for `load_image` (mode conversion, alpha, errors) and `VisualTokenizerImageProcessor` (geometry, ranges,
save/load, round trips). Images are a few pixels, built in code."""

import inspect
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub.dataclasses import validate_typed_dict
from PIL import Image, ImageFile

from tokenizer_bridge.image_processing_visual_tokenizer import (
    ImageLoadError,
    VisualTokenizerImageProcessor,
    load_image,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
TEAL = (10, 120, 130)  # a background colour that cannot be mistaken for white or black


def pixel(image: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    assert image.mode == "RGB"
    return image.getpixel(xy)


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# load_image: modes


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.new("1", (2, 2), 1), (255, 255, 255)),
        (Image.new("1", (2, 2), 0), (0, 0, 0)),
        (Image.new("L", (2, 2), 77), (77, 77, 77)),
        (Image.new("RGB", (2, 2), (1, 2, 3)), (1, 2, 3)),
        (Image.new("RGBX", (2, 2), (1, 2, 3, 0)), (1, 2, 3)),
        (Image.new("HSV", (2, 2), (0, 255, 255)), RED),
        (Image.new("F", (2, 2), 77.0), (77, 77, 77)),
        (Image.new("I;16", (2, 2), 65535), (255, 255, 255)),
        (Image.new("I;16", (2, 2), 32768), (128, 128, 128)),
        (Image.new("I;16", (2, 2), 257), (1, 1, 1)),
        (Image.frombytes("I;16B", (1, 1), (32768).to_bytes(2, "big")), (128, 128, 128)),
        (Image.new("I", (2, 2), 65535), (255, 255, 255)),
    ],
    ids=lambda v: v.mode if isinstance(v, Image.Image) else None,
)
def test_opaque_and_high_depth_modes(image, expected):
    assert pixel(load_image(image)) == expected


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.new("CMYK", (2, 2), (255, 0, 0, 0)), (0, 255, 255)),  # pure cyan
        (Image.new("YCbCr", (2, 2), (255, 128, 128)), (255, 255, 255)),
        (Image.new("LAB", (2, 2), (255, 128, 128)), (255, 255, 255)),
    ],
    ids=["CMYK", "YCbCr", "LAB"],
)
def test_colour_model_modes_convert_via_pillow(image, expected):
    assert np.abs(np.subtract(pixel(load_image(image)), expected)).max() <= 2


def test_sixteen_bit_is_scaled_not_clipped():
    # Pillow's convert("RGB") clips 16-bit values to 255; mid-grey must stay mid-grey.
    assert Image.new("I;16", (1, 1), 32768).convert("RGB").getpixel((0, 0)) == (255, 255, 255)
    assert pixel(load_image(Image.new("I;16", (1, 1), 32768))) == (128, 128, 128)


def test_alpha_is_composited_onto_background():
    half_red = Image.new("RGBA", (2, 2), (255, 0, 0, 128))
    assert pixel(load_image(half_red)) == (255, 127, 127)
    assert pixel(load_image(Image.new("RGBA", (2, 2), (255, 0, 0, 0)), background=TEAL)) == TEAL
    assert pixel(load_image(Image.new("RGBA", (2, 2), (5, 6, 7, 255)), background=TEAL)) == (5, 6, 7)
    assert pixel(load_image(Image.new("LA", (2, 2), (0, 128)))) == (127, 127, 127)
    assert pixel(load_image(Image.new("LA", (2, 2), (200, 0)), background=TEAL)) == TEAL
    assert pixel(load_image(Image.new("RGBa", (2, 2), (128, 0, 0, 128)))) == (255, 127, 127)  # premultiplied
    assert pixel(load_image(Image.new("La", (2, 2), (0, 0)), background=TEAL)) == TEAL


def test_palette_with_and_without_transparency():
    image = Image.new("P", (2, 1))
    image.putpalette([*RED, *GREEN])
    image.putpixel((1, 0), 1)
    assert [pixel(load_image(image), (x, 0)) for x in (0, 1)] == [RED, GREEN]
    image.info["transparency"] = 0  # palette index 0 is transparent
    assert [pixel(load_image(image, background=TEAL), (x, 0)) for x in (0, 1)] == [TEAL, GREEN]
    pa = Image.new("PA", (1, 1), (1, 0))
    pa.putpalette([*RED, *GREEN])
    assert pixel(load_image(pa, background=TEAL)) == TEAL


def test_colour_key_transparency_from_png_file(tmp_path):
    rgb = Image.new("RGB", (2, 1), RED)
    rgb.putpixel((1, 0), BLUE)
    path = tmp_path / "key.png"
    rgb.save(path, transparency=RED)  # tRNS colour key
    loaded = load_image(path, background=TEAL)
    assert [pixel(loaded, (x, 0)) for x in (0, 1)] == [TEAL, BLUE]
    gray = tmp_path / "gray16.png"
    Image.new("I;16", (1, 1), 4096).save(gray, transparency=4096)
    assert pixel(load_image(gray, background=TEAL)) == TEAL


def test_files_bytes_and_pathlike_sources(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((3, 4), 32768, dtype=np.uint16)).save(path)  # a real 16-bit PNG
    for source in (path, str(path), path.read_bytes()):
        image = load_image(source)
        assert image.size == (4, 3) and pixel(image) == (128, 128, 128)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image = load_image(encoded(Image.new("RGB", (8, 4)), "JPEG", exif=exif))
    assert image.size == (4, 8)


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.full((2, 3), 77, dtype=np.uint8), (77, 77, 77)),
        (np.full((2, 3, 1), 77, dtype=np.uint8), (77, 77, 77)),
        (np.full((2, 3, 3), (1, 2, 3), dtype=np.uint8), (1, 2, 3)),
        (np.full((2, 3, 4), (255, 0, 0, 128), dtype=np.uint8), (255, 127, 127)),
        (np.full((2, 3, 3), 65535, dtype=np.uint16), (255, 255, 255)),
        (np.full((2, 3), 32768, dtype=np.dtype(">u2")), (128, 128, 128)),
        (np.ones((2, 3), dtype=bool), (255, 255, 255)),
        (np.full((2, 3, 3), (0.0, 0.5, 1.0), dtype=np.float32), (0, 128, 255)),
        (np.full((2, 3), 0.2, dtype=np.float16), (51, 51, 51)),
    ],
    ids=["HW", "HW1", "HW3", "HW4", "uint16", "uint16-big-endian", "bool", "float32", "float16"],
)
def test_arrays(array, expected):
    image = load_image(array)
    assert image.size == (3, 2) and pixel(image) == expected


# ---------------------------------------------------------------------------------------------------------------
# load_image: errors


def truncated(fmt: str) -> bytes:
    data = encoded(Image.fromarray(noise(64, 64)), fmt)
    return data[: len(data) // 2]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_refused(tmp_path, fmt):
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(truncated(fmt))
    with pytest.raises(ImageLoadError, match="truncated") as info:
        load_image(path)
    assert "cut." in str(info.value)  # the message names the source


def test_truncated_files_are_refused_even_if_pillow_flag_is_set(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(truncated("JPEG"))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_lazily_opened_truncated_pil_image_is_refused():
    lazy = Image.open(io.BytesIO(truncated("PNG")))  # header parses; pixels are not decoded yet
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(lazy)


@pytest.mark.parametrize(
    "source, message",
    [
        (np.random.default_rng(0).bytes(300), "cannot identify"),
        (np.zeros((0, 4, 3), dtype=np.uint8), "zero size"),
        (Image.new("RGB", (0, 5)), "zero size"),
        (np.zeros((4, 4, 5), dtype=np.uint8), r"unsupported shape"),
        (np.zeros((3, 4, 4, 3), dtype=np.uint8), r"unsupported shape"),
        (np.array([[0.5, np.nan]]), "non-finite"),
        (np.array([[0.5, np.inf]], dtype=np.float32), "non-finite"),
        (np.array([[0.0, 200.0]]), r"outside the expected \[0, 1\]; divide by 255"),
        (np.zeros((2, 2), dtype=np.int64), "unsupported dtype int64"),
        (Image.new("I", (1, 1), 70000), "outside the 16-bit range"),
        (Image.new("F", (1, 1), float("nan")), "non-finite"),
        (12345, "expected a path, bytes"),
    ],
    ids=[
        "random-bytes", "zero-size-array", "zero-size-pil", "shape-4x4x5", "4d-array", "nan", "inf",
        "float-0-255", "int64", "mode-I-out-of-range", "mode-F-nan", "int-source",
    ],
)
def test_bad_sources_raise_image_load_error(source, message):
    with pytest.raises(ImageLoadError, match=message):
        load_image(source)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(ImageLoadError, match="not found: .*nope.png"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)
    assert issubclass(ImageLoadError, ValueError)


def test_bad_background():
    with pytest.raises(ValueError, match="background"):
        load_image(np.zeros((1, 1), np.uint8), background=(0, 0, 256))


# ---------------------------------------------------------------------------------------------------------------
# processor: geometry


def stripes() -> Image.Image:
    """100x50: red | green | blue columns, with green exactly the central 50x50 square."""
    array = np.zeros((50, 100, 3), dtype=np.uint8)
    array[:, :25], array[:, 25:75], array[:, 75:] = RED, GREEN, BLUE
    return Image.fromarray(array)


@pytest.mark.parametrize("mode", ["crop", "stretch", "pad"])
def test_fixed_size_modes_give_requested_shape(mode):
    processor = VisualTokenizerImageProcessor(size={"height": 24, "width": 40}, resize_mode=mode)
    batch = processor([noise(50, 100), noise(70, 30, seed=1)])
    assert batch["pixel_values"].shape == (2, 3, 24, 40)
    assert batch["pixel_values"].dtype == torch.float32


def test_crop_keeps_the_centre():
    processor = VisualTokenizerImageProcessor(size=32, resample=Image.Resampling.NEAREST)
    (image,) = processor.postprocess(processor(stripes())["pixel_values"])
    assert (np.asarray(image) == GREEN).all()
    (smooth,) = processor.postprocess(VisualTokenizerImageProcessor(size=32)(stripes())["pixel_values"])
    assert np.asarray(smooth)[:, 4:-4].tolist() == [[list(GREEN)] * 24] * 32  # bicubic blends only the edges


def test_pad_fits_the_whole_image_and_fills_with_background():
    processor = VisualTokenizerImageProcessor(size=32, resize_mode="pad", background=TEAL,
                                              resample=Image.Resampling.NEAREST)
    (image,) = processor.postprocess(processor(stripes())["pixel_values"])
    array = np.asarray(image)
    assert (array[:8] == TEAL).all() and (array[24:] == TEAL).all()  # 32x16 content, centred vertically
    assert (array[8:24, :8] == RED).all() and (array[8:24, 8:24] == GREEN).all() and (array[8:24, 24:] == BLUE).all()


def test_stretch_keeps_all_content():
    processor = VisualTokenizerImageProcessor(size=32, resize_mode="stretch", resample=Image.Resampling.NEAREST)
    array = np.asarray(processor.postprocess(processor(stripes())["pixel_values"])[0])
    assert (array[:, :8] == RED).all() and (array[:, 8:24] == GREEN).all() and (array[:, 24:] == BLUE).all()


def test_none_mode_centre_crops_to_multiples_of_size_divisor():
    processor = VisualTokenizerImageProcessor(resize_mode="none", size_divisor=8)
    source = noise(21, 30)
    pixel_values = processor(source)["pixel_values"]
    assert pixel_values.shape == (1, 3, 16, 24)
    (image,) = processor.postprocess(pixel_values)
    assert np.array_equal(np.asarray(image), source[2:18, 3:27])
    with pytest.raises(ValueError, match="smaller than size_divisor=8"):
        processor(noise(5, 30))


def test_none_mode_with_different_sizes():
    processor = VisualTokenizerImageProcessor(resize_mode="none")
    images = [noise(8, 12), noise(10, 6)]
    with pytest.raises(ValueError, match="fixed-size resize_mode.*one image at a time.*return_tensors=None"):
        processor(images)
    as_list = processor(images, return_tensors=None)["pixel_values"]
    assert [a.shape for a in as_list] == [(3, 8, 12), (3, 10, 6)]
    assert [np.asarray(i).shape for i in processor.postprocess(as_list)] == [(8, 12, 3), (10, 6, 3)]


def test_per_call_overrides_and_numpy_output():
    processor = VisualTokenizerImageProcessor(size=16)
    batch = processor.preprocess(noise(20, 20), return_tensors="np", size=8, resize_mode="stretch")
    assert isinstance(batch["pixel_values"], np.ndarray) and batch["pixel_values"].shape == (1, 3, 8, 8)
    with pytest.raises(TypeError, match="unexpected arguments \\['crop_size'\\]"):
        processor(noise(4, 4), crop_size=2)


# ---------------------------------------------------------------------------------------------------------------
# processor: config, values, round trips


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"resize_mode": "zoom"}, "resize_mode must be one of"),
        ({"size": 0}, "size must be positive"),
        ({"size": {"height": 8, "width": -1}}, "size must be positive"),
        ({"size": "big"}, "size must be an int"),
        ({"size_divisor": 0}, "size_divisor must be a positive int"),
        ({"size": 30, "size_divisor": 16}, "not a multiple of size_divisor"),
        ({"resample": 99}, "resample"),
        ({"background": (0, 0)}, "background"),
    ],
)
def test_invalid_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VisualTokenizerImageProcessor(**kwargs)


def test_unknown_init_argument_is_refused():
    with pytest.raises(TypeError, match="resize_mod"):
        VisualTokenizerImageProcessor(resize_mod="pad")


def test_round_trip_is_exact_for_every_uint8_value():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    source = np.stack([values, values.T, 255 - values], axis=-1)  # (16, 16, 3)
    processor = VisualTokenizerImageProcessor(size=16)
    pixel_values = processor(source)["pixel_values"]
    assert pixel_values.min() == -1.0 and pixel_values.max() == 1.0
    assert torch.allclose(pixel_values[0, 0], torch.from_numpy(values / 127.5 - 1.0).float(), atol=1e-6)
    (image,) = processor.postprocess(pixel_values)
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), source)
    (from_numpy,) = processor.postprocess(pixel_values[0].numpy())  # (3, H, W) numpy also accepted
    assert np.array_equal(np.asarray(from_numpy), source)


def test_postprocess_clamps_and_checks_shape():
    processor = VisualTokenizerImageProcessor(size=2)
    (image,) = processor.postprocess(torch.tensor([3.0, -3.0, 0.0]).view(3, 1, 1))
    assert pixel(image) == (255, 0, 128)
    with pytest.raises(ValueError, match="shape"):
        processor.postprocess(torch.zeros(1, 4, 2, 2))


def test_without_normalization_values_are_in_unit_range():
    processor = VisualTokenizerImageProcessor(size=2, do_normalize=False)
    pixel_values = processor(np.full((2, 2, 3), 255, dtype=np.uint8))["pixel_values"]
    assert torch.equal(pixel_values, torch.ones(1, 3, 2, 2))
    assert pixel(processor.postprocess(pixel_values)[0]) == (255, 255, 255)


def test_save_and_load_round_trip(tmp_path):
    processor = VisualTokenizerImageProcessor(
        size={"height": 16, "width": 24}, resize_mode="pad", size_divisor=8,
        resample=Image.Resampling.LANCZOS, background=TEAL, do_normalize=True,
    )
    (path,) = processor.save_pretrained(tmp_path)
    assert path.endswith("preprocessor_config.json")
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["resize_mode"] == "pad" and saved["background"] == list(TEAL) and saved["resample"] == 1
    loaded = VisualTokenizerImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    images = [noise(30, 20), Image.new("RGBA", (9, 7), (255, 0, 0, 100))]
    assert torch.equal(loaded(images)["pixel_values"], processor(images)["pixel_values"])
    assert VisualTokenizerImageProcessor.from_pretrained(tmp_path, resize_mode="crop").resize_mode == "crop"


def test_extra_kwargs_are_declared_for_processor_routing():
    # ProcessorMixin validates and routes images_kwargs with this TypedDict.
    kwargs_type = VisualTokenizerImageProcessor.valid_kwargs
    validate_typed_dict(kwargs_type, {"resize_mode": "pad", "size_divisor": 16, "background": (0, 0, 0)})
    with pytest.raises(Exception, match="resize_mode"):
        validate_typed_dict(kwargs_type, {"resize_mode": "zoom"})
    assert VisualTokenizerImageProcessor.model_input_names == ["pixel_values"]


# ---------------------------------------------------------------------------------------------------------------
# processor: the standard transformers arguments (see also test_image_processing_common.py)


def test_a_config_saved_before_the_standard_arguments_loads_with_the_legacy_scaling():
    folder = Path(__file__).resolve().parents[1] / "fixtures" / "compat_857d9dc" / "processor"
    saved = json.loads((folder / "preprocessor_config.json").read_text())
    assert "do_rescale" not in saved and "image_mean" not in saved  # written by the earlier code
    processor = VisualTokenizerImageProcessor.from_pretrained(folder)
    assert (processor.do_rescale, processor.rescale_factor, processor.image_mean, processor.image_std) == (
        True, 1 / 255, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    source = noise(32, 32)
    expected = source.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
    assert np.array_equal(processor(source, return_tensors="np")["pixel_values"][0], expected)


def test_init_defaults_are_the_class_attributes():
    parameters = inspect.signature(VisualTokenizerImageProcessor.__init__).parameters
    processor = VisualTokenizerImageProcessor()
    for name in VisualTokenizerImageProcessor._valid_kwargs_names:
        assert getattr(processor, name) == getattr(VisualTokenizerImageProcessor, name), name
        assert name in parameters, name
