"""`VisualTokenizerImageProcessor` against the facts transformers checks of every image processor.

transformers' ``tests/test_image_processing_common.py`` (``ImageProcessingTestMixin``, which inherits the
serialization and kwarg tests of ``tests/test_preprocessing_common.py``'s ``PreprocessingTesterMixin``) is not in the
pip package; these are our own tests of the same facts, run on tiny images built in code. Its tests, and what
stands for each here:

PreprocessingTesterMixin
- test_to_json_string (earlier: test_image_processor_to_json_string): ``test_to_json_string``
- test_to_json_file (earlier: test_image_processor_to_json_file): ``test_to_json_file``
- test_from_and_save_pretrained (earlier: test_image_processor_from_and_save_pretrained):
  ``test_from_and_save_pretrained``
- test_save_load_with_auto_class (earlier: test_image_processor_save_load_with_autoimageprocessor):
  ``test_save_load_with_auto_class``
- test_init_without_params: ``test_init_without_params``
- test_explicit_none_preserved (earlier: test_fast_image_processor_explicit_none_preserved):
  ``test_explicit_none_preserved``
- test_override_instance_attributes_does_not_affect_other_instances: same name
- test_explicit_none_kwarg_falls_back_to_default: same name
- test_cast_dtype_device: same name
- test_save_load_backends, test_save_load_backends_auto (earlier: test_save_load_fast_slow, *_auto):
  INAPPLICABLE -- they load one backend's saved config into a sibling backend (PIL vs torchvision, earlier slow vs
  fast); there is one implementation of this processor, registered as the "pil" backend only.

ImageProcessingTestMixin
- test_call_pil, test_call_numpy, test_call_pytorch: same names
- test_call_numpy_4_channels: same name; the mixin expects 4 channels out, for processors that keep channels. A
  visual tokenizer takes 3, so (as transformers' own tests of do_convert_rgb processors do) 4-channel input is
  converted to RGB and gives 3 channels; with do_convert_rgb=False it is refused by name
  (``test_4_channels_without_convert_rgb_are_refused``).
- test_image_processor_preprocess_arguments: same name; our preprocess raises TypeError naming an unknown argument
  (stronger than the warning of transformers' ``filter_out_non_signature_kwargs``).
- test_post_process_test_mixin_inheritance: same name (no semantic-segmentation post-processing, so none of its
  tests apply).
- test_backends_equivalence, test_backends_equivalence_batched (earlier: test_slow_fast_equivalence,
  test_slow_fast_equivalence_batched, test_fast_is_faster_than_slow): INAPPLICABLE -- they compare two backends
  (and download a COCO photo); we have one backend, and the tests here assert no timings.
- test_can_compile_torchvision_backend (earlier: test_can_compile_fast_image_processor): INAPPLICABLE -- it
  compiles a torchvision backend on an accelerator; ours resizes with Pillow.
- test_new_models_require_torchvision_backend (earlier: test_new_models_require_fast_image_processor):
  INAPPLICABLE -- a policy for models inside the transformers repository (dated by its git history).

PostProcessSemanticSegmentationTestMixin (test_post_process_semantic_segmentation, *_target_sizes) and
AnnotationFormatTestMixin (test_processor_can_use_legacy_annotation_format): INAPPLICABLE -- segmentation and
detection processors only.

Facts of transformers' per-model image-processor tests that every processor shares are here too:
``test_image_processor_properties``, ``test_image_processor_from_dict_with_kwargs``, and from_pretrained keywords
overriding saved values; then the standard arguments' meaning (``do_resize``, ``size``, ``do_rescale``,
``image_mean`` / ``image_std``, ``data_format``, ``input_data_format``, ``return_tensors``) and their errors.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, BatchFeature
from transformers.image_utils import ChannelDimension
from transformers.testing_utils import check_json_file_has_correct_format
from transformers.utils import TensorType

import tokenizer_bridge  # noqa: F401  (registers the processor with AutoImageProcessor)
from tokenizer_bridge.image_processing_visual_tokenizer import ImageLoadError, VisualTokenizerImageProcessor

BATCH, HEIGHT, WIDTH = 3, 8, 12
# a config touching the standard keys and ours (every value differs from its default)
PROCESSOR_DICT = {
    "do_resize": True, "size": {"height": HEIGHT, "width": WIDTH}, "resample": 2, "do_convert_rgb": True,
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.25, 0.5, 0.75],
    "image_std": [0.5, 0.25, 0.125], "resize_mode": "pad", "background": [10, 120, 130], "size_divisor": 4,
    "max_pixels": 4096,
}


def processor(**kwargs) -> VisualTokenizerImageProcessor:
    return VisualTokenizerImageProcessor(**{**PROCESSOR_DICT, **kwargs})


def image_inputs(kind: str = "pil", channels: int = 3, seed: int = 0) -> list:
    """``BATCH`` random uint8 images of different sizes: PIL images, (H, W, C) arrays or (C, H, W) tensors."""
    rng = np.random.default_rng(seed)
    sizes = [(6, 17), (19, 9), (13, 13)]
    arrays = [rng.integers(0, 256, (h, w, channels), dtype=np.uint8) for h, w in sizes]
    if kind == "pil":
        return [Image.fromarray(a) for a in arrays]
    if kind == "numpy":
        return arrays
    return [torch.from_numpy(a).permute(2, 0, 1) for a in arrays]


def pixel_values(proc, images, **kwargs):
    return proc(images, **kwargs)["pixel_values"]


# ---------------------------------------------------------------------------------------------------------------
# serialization (PreprocessingTesterMixin)


def test_to_json_string():
    obj = json.loads(processor().to_json_string())
    for key, value in PROCESSOR_DICT.items():
        assert obj[key] == value, key


def test_to_json_file(tmp_path):
    first = processor()
    first.to_json_file(tmp_path / "image_processor.json")
    second = VisualTokenizerImageProcessor.from_json_file(tmp_path / "image_processor.json")
    assert second.to_dict() == first.to_dict()


def test_from_and_save_pretrained(tmp_path):
    first = processor()
    saved_file = first.save_pretrained(tmp_path)[0]
    check_json_file_has_correct_format(saved_file)
    second = VisualTokenizerImageProcessor.from_pretrained(tmp_path)
    assert second.to_dict() == first.to_dict()
    images = image_inputs()
    assert torch.equal(pixel_values(second, images), pixel_values(first, images))


@pytest.mark.parametrize("backend", [None, "pil"])
def test_save_load_with_auto_class(tmp_path, backend):
    first = processor()
    saved_file = first.save_pretrained(tmp_path)[0]
    check_json_file_has_correct_format(saved_file)
    second = AutoImageProcessor.from_pretrained(tmp_path, **({"backend": backend} if backend else {}))
    assert type(second) is VisualTokenizerImageProcessor
    assert second.to_dict() == first.to_dict()


def test_init_without_params():
    proc = VisualTokenizerImageProcessor()
    assert proc is not None
    assert (proc.size, proc.do_rescale, proc.image_mean) == ({"height": 256, "width": 256}, True, [0.5, 0.5, 0.5])


def test_explicit_none_preserved(tmp_path):
    # the switches transformers looks for have non-None class defaults, so an explicit None is a stored value
    for name in ("do_resize", "do_rescale", "do_normalize"):
        assert getattr(VisualTokenizerImageProcessor, name) is True
    proc = processor(do_normalize=None, max_pixels=None)
    assert proc.to_dict()["do_normalize"] is None and proc.to_dict()["max_pixels"] is None
    proc.save_pretrained(tmp_path)
    reloaded = VisualTokenizerImageProcessor.from_pretrained(tmp_path)
    assert reloaded.do_normalize is None and reloaded.max_pixels is None  # max_pixels=None used to come back 8192**2
    # a None switch is off, as transformers' `if do_normalize:` reads it
    values = pixel_values(reloaded, Image.new("RGB", (4, 4), (255, 0, 51)), size=4, size_divisor=1)
    assert values[0, :, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.2])


def test_override_instance_attributes_does_not_affect_other_instances():
    first, second = VisualTokenizerImageProcessor(), VisualTokenizerImageProcessor()
    assert isinstance(first.size, dict) and isinstance(first.image_mean, list)
    first.size["height"], first.image_mean[0], first.background[0] = -1, -1.0, 0
    assert second.size == {"height": 256, "width": 256} and second.image_mean == [0.5, 0.5, 0.5]
    assert second.background == [255, 255, 255]
    second.size["width"], second.image_std[1] = -2, -2.0
    assert first.size == {"height": -1, "width": 256} and first.image_std == [0.5, 0.5, 0.5]
    assert VisualTokenizerImageProcessor.size == {"height": 256, "width": 256}  # class defaults untouched
    assert VisualTokenizerImageProcessor.image_mean == [0.5, 0.5, 0.5]


# ---------------------------------------------------------------------------------------------------------------
# call-time keywords and casting (PreprocessingTesterMixin)


def test_explicit_none_kwarg_falls_back_to_default():
    proc = processor()
    images = image_inputs("torch")
    reference = proc(images, return_tensors="pt")
    switches = [n for n in proc._valid_kwargs_names if isinstance(getattr(proc, n, None), bool) and getattr(proc, n)]
    assert sorted(switches) == ["do_convert_rgb", "do_normalize", "do_rescale", "do_resize"]
    for name in proc._valid_kwargs_names:  # every setting, switches or not
        encoding = proc(images, return_tensors="pt", **{name: None})
        assert set(encoding) == set(reference)
        assert torch.equal(encoding["pixel_values"], reference["pixel_values"]), name


def test_cast_dtype_device():
    proc = processor()
    images = image_inputs("torch")
    encoding = proc(images, return_tensors="pt")
    assert encoding.pixel_values.device == torch.device("cpu") and encoding.pixel_values.dtype == torch.float32
    encoding = proc(images, return_tensors="pt").to(torch.float16)
    assert encoding.pixel_values.device == torch.device("cpu") and encoding.pixel_values.dtype == torch.float16
    encoding = proc(images, return_tensors="pt").to("cpu", torch.bfloat16)
    assert encoding.pixel_values.device == torch.device("cpu") and encoding.pixel_values.dtype == torch.bfloat16
    with pytest.raises(TypeError):
        proc(images, return_tensors="pt").to(torch.bfloat16, "cpu")
    encoding = proc(images, return_tensors="pt")
    encoding.update({"input_ids": torch.LongTensor([[1, 2, 3], [4, 5, 6]])})
    encoding = encoding.to(torch.float16)
    assert encoding.pixel_values.dtype == torch.float16 and encoding.input_ids.dtype == torch.long


# ---------------------------------------------------------------------------------------------------------------
# inputs (ImageProcessingTestMixin)


@pytest.mark.parametrize("kind", ["pil", "numpy", "torch"])
def test_call_pil_numpy_pytorch(kind):
    # test_call_pil, test_call_numpy and test_call_pytorch: one image -> (1, 3, h, w), a list -> (B, 3, h, w)
    proc = processor()
    images = image_inputs(kind)
    assert tuple(pixel_values(proc, images[0], return_tensors="pt").shape) == (1, 3, HEIGHT, WIDTH)
    assert tuple(pixel_values(proc, images, return_tensors="pt").shape) == (BATCH, 3, HEIGHT, WIDTH)


def test_pil_numpy_and_torch_inputs_give_the_same_pixel_values():
    proc = processor()
    expected = pixel_values(proc, image_inputs("pil"))
    hwc_tensors = [torch.from_numpy(a) for a in image_inputs("numpy")]
    chw_arrays = [np.ascontiguousarray(a.transpose(2, 0, 1)) for a in image_inputs("numpy")]
    floats = [t.float() / 255 for t in image_inputs("torch")]  # [0, 1] floats read as such, as arrays are
    for images in (image_inputs("numpy"), image_inputs("torch"), hwc_tensors, chw_arrays, floats):
        assert torch.equal(pixel_values(proc, images), expected)


@pytest.mark.parametrize("layout", ["BCHW-tensor", "BHWC-tensor", "BHWC-array", "BCHW-array"])
def test_4d_batches(layout):
    proc = processor()
    rng = np.random.default_rng(3)
    batch = rng.integers(0, 256, (2, 10, 14, 3), dtype=np.uint8)  # (B, H, W, C)
    expected = pixel_values(proc, [Image.fromarray(a) for a in batch])
    given = batch.transpose(0, 3, 1, 2) if "BCHW" in layout else batch
    given = torch.from_numpy(np.ascontiguousarray(given)) if "tensor" in layout else given
    assert torch.equal(pixel_values(proc, given), expected)
    assert torch.equal(pixel_values(proc, [given]), expected)  # a list holding a batch is flattened too


def test_bfloat16_and_grad_tensors():
    proc = processor()
    image = torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1).expand(3, 4, 4)
    expected = pixel_values(proc, image)
    assert torch.equal(pixel_values(proc, image.to(torch.bfloat16)), expected)  # 0, 0.5, 1 are exact in bfloat16
    assert torch.equal(pixel_values(proc, image.clone().requires_grad_()), expected)


def test_call_numpy_4_channels():
    proc = processor(size_divisor=1)
    images = image_inputs("numpy", channels=4)
    for mean, std in ((0, 1), ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])):
        one = pixel_values(proc, images[0], input_data_format="channels_last", image_mean=mean, image_std=std)
        assert tuple(one.shape) == (1, 3, HEIGHT, WIDTH)
        batch = pixel_values(proc, images, input_data_format="channels_last", image_mean=mean, image_std=std)
        assert tuple(batch.shape) == (BATCH, 3, HEIGHT, WIDTH)
    # RGBA is converted (do_convert_rgb): alpha composited onto the background, then rescaled to [0, 1]
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0], rgba[1, 1] = 255, (255, 0, 0, 255)  # transparent red everywhere but one opaque red pixel
    values = pixel_values(proc, rgba, size=2, resize_mode="stretch", image_mean=0, image_std=1)
    assert values[0, :, 0, 0].tolist() == pytest.approx([10 / 255, 120 / 255, 130 / 255])
    assert values[0, :, 1, 1].tolist() == pytest.approx([1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"image_mean must be a number or a list of 3 numbers"):
        proc(images, image_mean=[0.0] * 4, image_std=[1.0] * 4)


def test_4_channels_without_convert_rgb_are_refused(tmp_path):
    proc = processor(do_convert_rgb=False)
    rgb = image_inputs("pil")
    assert torch.equal(pixel_values(proc, rgb), pixel_values(processor(), rgb))
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (5, 5), (1, 2, 3, 4)).save(path)
    for source in (image_inputs("numpy", channels=4)[0], Image.new("RGBA", (5, 5)), Image.new("L", (5, 5)), path,
                   path.read_bytes(), torch.zeros(1, 5, 5, dtype=torch.uint8)):
        with pytest.raises(ImageLoadError, match="do_convert_rgb=False.*3-channel RGB"):
            proc(source)
    assert proc(Image.new("RGBA", (5, 5)), do_convert_rgb=True)["pixel_values"].shape == (1, 3, HEIGHT, WIDTH)
    with pytest.raises(ImageLoadError, match="cannot identify"):  # a corrupt file keeps its own error
        proc(b"not an image")


def test_image_processor_preprocess_arguments():
    proc = processor()
    images = image_inputs()
    with pytest.raises(TypeError, match="extra_argument"):
        proc(images, extra_argument=True)
    # every setting named in _valid_kwargs_names is a per-call argument, and giving its own value changes nothing
    reference = pixel_values(proc, images)
    for name in proc._valid_kwargs_names:
        assert torch.equal(pixel_values(proc, images, **{name: getattr(proc, name)}), reference), name
    # standard keywords without a use here are accepted only unset (None), as a ProcessorMixin may pass them
    assert torch.equal(pixel_values(proc, images, crop_size=None, do_pad=None, device=None), reference)
    with pytest.raises(TypeError, match=r"unexpected arguments \['do_center_crop'\]"):
        proc(images, do_center_crop=True)


def test_post_process_test_mixin_inheritance():
    assert not hasattr(VisualTokenizerImageProcessor, "post_process_semantic_segmentation")


# ---------------------------------------------------------------------------------------------------------------
# properties and from_dict (transformers' per-model tests)


def test_image_processor_properties():
    proc = processor()
    for name in ("do_resize", "size", "resample", "do_convert_rgb", "do_rescale", "rescale_factor", "do_normalize",
                 "image_mean", "image_std", "model_input_names"):
        assert hasattr(proc, name), name


def test_image_processor_from_dict_with_kwargs():
    proc = VisualTokenizerImageProcessor.from_dict(PROCESSOR_DICT)
    assert proc.size == {"height": HEIGHT, "width": WIDTH} and proc.image_mean == [0.25, 0.5, 0.75]
    proc = VisualTokenizerImageProcessor.from_dict(PROCESSOR_DICT, size=40, do_rescale=False, image_std=2,
                                                   resize_mode="crop")
    assert proc.size == {"height": 40, "width": 40} and proc.do_rescale is False and proc.image_std == 2.0
    assert proc.resize_mode == "crop"


def test_from_pretrained_kwargs_override_saved_values(tmp_path):
    processor().save_pretrained(tmp_path)
    loaded = VisualTokenizerImageProcessor.from_pretrained(tmp_path, do_normalize=False, size=(4, 8),
                                                           image_mean=0.5, input_data_format=None)
    assert loaded.do_normalize is False and loaded.size == {"height": 4, "width": 8} and loaded.image_mean == 0.5
    assert loaded.background == [10, 120, 130]  # not overridden: the saved value
    auto = AutoImageProcessor.from_pretrained(tmp_path, do_rescale=False)
    assert auto.do_rescale is False and auto.resize_mode == "pad"


# ---------------------------------------------------------------------------------------------------------------
# the standard arguments' meaning


def test_rescale_and_normalize_follow_transformers_formula():
    array = np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5
    chw = array.transpose(2, 0, 1).astype(np.float32)
    proc = processor(size=4, size_divisor=1, resize_mode="stretch")
    mean, std = np.float32([0.25, 0.5, 0.75]).reshape(3, 1, 1), np.float32([0.5, 0.25, 0.125]).reshape(3, 1, 1)
    expected = (chw * np.float32(1 / 255) - mean) / std
    np.testing.assert_allclose(pixel_values(proc, array, return_tensors="np")[0], expected, rtol=1e-6)
    np.testing.assert_array_equal(pixel_values(proc, array, do_normalize=False, do_rescale=False)[0].numpy(), chw)
    np.testing.assert_allclose(pixel_values(proc, array, do_normalize=False, rescale_factor=0.5)[0].numpy(),
                               chw * 0.5)
    # postprocess undoes the configured scaling exactly
    for settings in ({}, {"do_rescale": False}, {"do_normalize": False, "rescale_factor": 2.0}):
        custom = processor(size=4, size_divisor=1, resize_mode="stretch", **settings)
        (image,) = custom.postprocess(pixel_values(custom, array))
        np.testing.assert_array_equal(np.asarray(image), array)
        assert len(custom.postprocess([pixel_values(custom, array)[0]] * 2)) == 2


def test_default_scaling_is_the_legacy_arithmetic():
    array = np.arange(256, dtype=np.uint8).reshape(16, 16)[..., None].repeat(3, axis=2)
    chw = array.transpose(2, 0, 1).astype(np.float32)
    proc = VisualTokenizerImageProcessor(size=16)
    assert np.array_equal(pixel_values(proc, array, return_tensors="np")[0], chw / 127.5 - 1.0)
    assert np.array_equal(pixel_values(proc, array, return_tensors="np", do_normalize=False)[0], chw / 255.0)


def test_do_resize_false_keeps_the_native_size():
    proc = processor(size_divisor=1)
    images = image_inputs()
    shapes = [tuple(a.shape) for a in pixel_values(proc, images, do_resize=False, return_tensors=None)]
    assert shapes == [(3, 6, 17), (3, 19, 9), (3, 13, 13)]
    assert pixel_values(processor(do_resize=False), images[2]).shape == (1, 3, 12, 12)  # multiples of size_divisor


def test_size_conventions():
    assert processor(size=(4, 12)).size == {"height": 4, "width": 12}
    assert processor(size=[4, 12]).size == {"height": 4, "width": 12}
    assert processor(size=8).size == {"height": 8, "width": 8}
    with pytest.raises(ValueError, match="size must be an int.*keep the aspect ratio.*resize_mode"):
        processor(size={"shortest_edge": 8})


@pytest.mark.parametrize("data_format", ["channels_last", ChannelDimension.LAST])
def test_data_format(data_format):
    proc = processor()
    images = image_inputs()
    first = pixel_values(proc, images)
    last = pixel_values(proc, images, data_format=data_format)
    assert tuple(last.shape) == (BATCH, HEIGHT, WIDTH, 3) and torch.equal(last.permute(0, 3, 1, 2), first)
    assert torch.equal(pixel_values(proc, images, data_format=ChannelDimension.FIRST), first)
    listed = pixel_values(proc, images, data_format=data_format, return_tensors=None)
    assert listed[0].shape == (HEIGHT, WIDTH, 3) and listed[0].flags["C_CONTIGUOUS"]


def test_input_data_format_settles_ambiguous_shapes():
    proc = processor(size=3, size_divisor=1, resize_mode="stretch", resample=0)
    rng = np.random.default_rng(5)
    array = rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)
    as_hwc = pixel_values(proc, Image.fromarray(array))
    as_chw = pixel_values(proc, Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0))))
    assert torch.equal(pixel_values(proc, array), as_hwc)  # numpy arrays read channels-last first, as always
    assert torch.equal(pixel_values(proc, torch.from_numpy(array)), as_chw)  # tensors channels-first first
    assert torch.equal(pixel_values(proc, array, input_data_format="channels_first"), as_chw)
    assert torch.equal(pixel_values(proc, torch.from_numpy(array), input_data_format=ChannelDimension.LAST), as_hwc)


@pytest.mark.parametrize("return_tensors, kind", [("pt", torch.Tensor), (TensorType.PYTORCH, torch.Tensor),
                                                  ("np", np.ndarray), (TensorType.NUMPY, np.ndarray), (None, list)])
def test_return_tensors(return_tensors, kind):
    batch = processor()(image_inputs(), return_tensors=return_tensors)
    assert isinstance(batch, BatchFeature) and isinstance(batch["pixel_values"], kind)
    assert len(batch["pixel_values"]) == BATCH


# ---------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "source, kwargs, message",
    [
        (torch.zeros(5, 7, 9, dtype=torch.uint8), {}, r"tensor of shape \(5, 7, 9\) has no channel axis"),
        (np.zeros((5, 7, 9), dtype=np.uint8), {}, r"array of shape \(5, 7, 9\) has no channel axis"),
        (np.zeros((5, 7, 3), dtype=np.uint8), {"input_data_format": "channels_first"},
         r"has 5 entries on its channel axis \(input_data_format='channels_first'\)"),
        (torch.zeros(3, 4, 4, dtype=torch.int64), {}, "unsupported dtype int64"),
        (torch.full((3, 4, 4), 2.0), {}, r"outside the expected \[0, 1\]"),
        ([[Image.new("RGB", (4, 4))]], {}, "a torch tensor.*lists of lists are not flattened"),
        (12345, {}, "expected a path, bytes, a PIL image, a numpy array or a torch tensor"),
        (b"\x89PNG broken", {}, "cannot identify"),
    ],
    ids=["tensor-no-channels", "array-no-channels", "wrong-input-format", "int64-tensor", "float-0-255", "nested",
         "int", "corrupt"],
)
def test_bad_images_raise_image_load_error(source, kwargs, message):
    with pytest.raises(ImageLoadError, match=message):
        processor()(source, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"do_rescale": "yes"}, "do_rescale must be a bool"),
        ({"do_convert_rgb": 1}, "do_convert_rgb must be a bool"),
        ({"rescale_factor": 0.0}, "rescale_factor must be a finite non-zero number"),
        ({"rescale_factor": float("nan")}, "rescale_factor must be a finite non-zero number"),
        ({"image_mean": [0.5, 0.5]}, "image_mean must be a number or a list of 3 numbers"),
        ({"image_mean": "grey"}, "image_mean must be a number or a list of 3 numbers"),
        ({"image_std": [1.0, 0.0, 1.0]}, "image_std must be positive"),
        ({"input_data_format": "channels_middle"}, "input_data_format must be 'channels_first', 'channels_last'"),
        ({"data_format": 3}, "data_format must be 'channels_first', 'channels_last'"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        processor()(image_inputs()[0], **kwargs)
    init_kwargs = {k: v for k, v in kwargs.items() if "data_format" not in k}
    if init_kwargs:
        with pytest.raises(ValueError, match=message):
            processor(**init_kwargs)
