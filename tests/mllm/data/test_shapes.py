import io
import itertools
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from mllm.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    ShapesDataset,
    ShapeSpec,
    attribute_accuracy,
    chance_levels,
    classify,
    make_splits,
    parse_caption,
    render,
)

ALL_SPECS = [ShapeSpec(*values) for values in itertools.product(COLOURS, SHAPES, POSITIONS, BACKGROUNDS)]


def random_specs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [ALL_SPECS[i] for i in rng.integers(len(ALL_SPECS), size=n)]


# ------------------------------------------------------------------------------------------------- degradations
def blur(image, rng, sigma=1.0):
    return image.filter(ImageFilter.GaussianBlur(sigma))


def noise(image, rng, std=10.0):
    pixels = np.asarray(image, np.float32) + rng.normal(0, std, size=(*image.size[::-1], 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def jpeg(image, rng, quality=50):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def down_up(image, rng):
    size = image.size[0]
    return image.resize((size // 2, size // 2), Image.Resampling.BILINEAR).resize((size, size),
                                                                                   Image.Resampling.BILINEAR)


def colour_shift(image, rng):
    pixels = np.asarray(image, np.float32) * np.array([0.85, 0.9, 1.0]) + np.array([25, 0, -10])
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def everything(image, rng):
    return jpeg(noise(blur(image, rng, 0.7), rng), rng, quality=70)


DEGRADATIONS = {"blur_0.7": lambda im, rng: blur(im, rng, 0.7), "blur_1.0": blur, "noise_10": noise, "jpeg_50": jpeg,
                "down_up_2x": down_up, "colour_shift": colour_shift, "blur+noise+jpeg": everything}


# ---------------------------------------------------------------------------------------------------- palette
def test_palette_is_well_separated():
    colours = [np.array(c, float) for c in COLOURS.values()]
    assert len(COLOURS) == 6 and SHAPES == ("circle", "square", "triangle") and len(POSITIONS) == 4
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(colours, 2)) >= 255
    assert min(np.linalg.norm(c - np.array(b)) for c in colours for b in BACKGROUNDS.values()) >= 220


def test_spec_validates_and_captions():
    spec = ShapeSpec("red", "circle", "top left")
    assert spec.caption == "a red circle at the top left" and spec.background == "black"
    with pytest.raises(ValueError):
        ShapeSpec("purple", "circle", "top left")
    with pytest.raises(ValueError):
        ShapeSpec("red", "circle", "middle")


# ------------------------------------------------------------------------------------------------------- text
def test_caption_parse_round_trip():
    for spec in ALL_SPECS:
        parsed = parse_caption(spec.caption)
        assert parsed == {"colour": spec.colour, "shape": spec.shape, "position": spec.position, "background": None}
        assert ShapeSpec(**{**parsed, "background": spec.background}) == spec


def test_parse_free_form_text():
    assert parse_caption("I see a Blue SQUARE, in the upper-right corner!") == {
        "colour": "blue", "shape": "square", "position": "top right", "background": None}
    assert parse_caption("two yellow triangles on a grey background, bottom... left") == {
        "colour": "yellow", "shape": "triangle", "position": "bottom left", "background": "gray"}
    assert parse_caption("a cyan thing at the top") == {
        "colour": "cyan", "shape": None, "position": None, "background": None}
    assert parse_caption("") == dict.fromkeys(("colour", "shape", "position", "background"))


# ----------------------------------------------------------------------------------------------------- render
def test_render_size_colours_and_layout():
    for size in (32, 64):
        spec = ShapeSpec("green", "square", "bottom right", "white")
        pixels = np.asarray(render(spec, size))
        assert pixels.shape == (size, size, 3) and pixels.dtype == np.uint8
        assert tuple(pixels[3 * size // 4, 3 * size // 4]) == COLOURS["green"]  # interior is the pure colour
        for corner in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
            assert tuple(pixels[corner]) == BACKGROUNDS["white"]
        assert (pixels[: size // 2] == 255).all() and (pixels[:, : size // 2] == 255).all()  # other quadrants empty


def test_render_shape_areas_follow_geometry():
    side = 0.72 * 32 / 2
    for shape, fraction in (("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)):
        pixels = np.asarray(render(ShapeSpec("red", shape, "top left"), 64 // 2), np.float32)
        assert pixels[..., 0].sum() / 255 == pytest.approx(fraction * side ** 2, rel=0.02)


def test_render_is_deterministic_and_jittered():
    spec = ShapeSpec("magenta", "triangle", "top right", "gray")
    first = np.asarray(render(spec, 32, np.random.default_rng(7)))
    assert (first == np.asarray(render(spec, 32, np.random.default_rng(7)))).all()
    assert (first != np.asarray(render(spec, 32, np.random.default_rng(8)))).any()
    assert (np.asarray(render(spec)) == np.asarray(render(spec, 32, np.random.default_rng(7), jitter=0))).all()


# --------------------------------------------------------------------------------------------------- classify
def test_classify_clean_renders_exactly():
    specs = ALL_SPECS + random_specs(200)
    images = [render(spec, 32, np.random.default_rng(i) if i >= len(ALL_SPECS) else None)
              for i, spec in enumerate(specs)]
    predicted = [classify(image) for image in images]
    assert attribute_accuracy(predicted, specs) == {"colour": 1.0, "shape": 1.0, "position": 1.0, "all": 1.0}
    assert all(p["background"] == s.background for p, s in zip(predicted, specs))


@pytest.mark.parametrize("name", DEGRADATIONS)
def test_classify_degraded_renders(name):
    specs = random_specs(200, seed=1)
    degraded = [DEGRADATIONS[name](render(spec, 32, np.random.default_rng(i)), np.random.default_rng(1000 + i))
                for i, spec in enumerate(specs)]
    predicted = [classify(image) for image in degraded]
    accuracy = attribute_accuracy(predicted, specs)
    assert min(accuracy["colour"], accuracy["shape"], accuracy["position"]) >= 0.95, accuracy
    assert np.mean([p["background"] == s.background for p, s in zip(predicted, specs)]) >= 0.95


def test_classify_other_sizes_and_arrays():
    specs = random_specs(30, seed=2)
    predicted = [classify(np.asarray(blur(render(s, 64, np.random.default_rng(i)), None, 2.0)))
                 for i, s in enumerate(specs)]
    assert attribute_accuracy(predicted, specs)["all"] == 1.0


def test_classify_empty_image_has_no_foreground():
    for name, rgb in BACKGROUNDS.items():
        empty = np.full((32, 32, 3), rgb, np.uint8)
        assert classify(empty) == {"colour": None, "shape": None, "position": None, "background": name}
    with pytest.raises(ValueError):
        classify(np.zeros((32, 32), np.uint8))


# ----------------------------------------------------------------------------------------------------- splits
def test_splits_hold_out_unseen_combinations_of_seen_pairs():
    train, heldout = make_splits(seed=0, holdout_fraction=0.2)
    train_combos, heldout_combos = {s.combo for s in train}, {s.combo for s in heldout}
    assert len(heldout_combos) == round(0.2 * 72) and len(train_combos) == 72 - len(heldout_combos)
    assert not train_combos & heldout_combos
    assert len(train) == 3 * len(train_combos) and {s.background for s in heldout} == set(BACKGROUNDS)
    for i, j in ((0, 1), (0, 2), (1, 2)):  # every pair of values of a held-out combo is seen in training
        seen = {(c[i], c[j]) for c in train_combos}
        assert all((c[i], c[j]) in seen for c in heldout_combos)
    for index, values in enumerate((COLOURS, SHAPES, POSITIONS)):
        assert {c[index] for c in train_combos} == set(values)


@pytest.mark.parametrize("seed, fraction", [(0, 0.2), (1, 0.1), (2, 0.5)])
def test_splits_are_balanced(seed, fraction):
    train, heldout = make_splits(seed=seed, holdout_fraction=fraction)
    combos = {s.combo for s in heldout}
    assert len(combos) == round(fraction * 72) and not combos & {s.combo for s in train}
    for index, values in enumerate((COLOURS, SHAPES, POSITIONS)):
        counts = Counter(c[index] for c in combos)
        assert max(counts.values()) <= -(-len(combos) // len(values))
        assert {s.combo[index] for s in train} == set(values)
    assert set(Counter(c[1] for c in combos)) == set(SHAPES)  # every shape is tested on unseen combinations


def test_splits_are_deterministic_per_seed():
    assert make_splits(seed=3) == make_splits(seed=3)
    assert {s.combo for s in make_splits(seed=3).heldout} != {s.combo for s in make_splits(seed=4).heldout}
    assert make_splits(holdout_fraction=0.0).heldout == []
    with pytest.raises(ValueError):
        make_splits(holdout_fraction=1.0)


# ---------------------------------------------------------------------------------------------------- dataset
def test_dataset_is_deterministic_per_index():
    specs = make_splits().train[:5]
    dataset = ShapesDataset(specs, size=32, samples_per_spec=3, seed=11)
    assert len(dataset) == 15
    item = dataset[7]
    assert item["spec"] == specs[7 % 5] and item["caption"] == specs[2].caption and item["image"].size == (32, 32)
    again = ShapesDataset(specs, size=32, samples_per_spec=3, seed=11)[7]["image"]
    assert (np.asarray(item["image"]) == np.asarray(again)).all()
    assert (np.asarray(dataset[2]["image"]) != np.asarray(item["image"])).any()  # same spec, another sample
    other_seed = ShapesDataset(specs, size=32, samples_per_spec=3, seed=12)[7]["image"]
    assert (np.asarray(other_seed) != np.asarray(item["image"])).any()
    assert (np.asarray(dataset[-1]["image"]) == np.asarray(dataset[14]["image"])).all()
    with pytest.raises(IndexError):
        dataset[15]
    assert len(list(dataset)) == 15


# ---------------------------------------------------------------------------------------------------- scoring
def test_chance_levels():
    levels = chance_levels()
    assert levels["colour"] == pytest.approx(1 / 6) and levels["shape"] == pytest.approx(1 / 3)
    assert levels["position"] == pytest.approx(1 / 4) and levels["all"] == pytest.approx(1 / 72)


def test_attribute_accuracy_by_hand():
    targets = [ShapeSpec("red", "circle", "top left"), ShapeSpec("blue", "square", "bottom right"),
               ShapeSpec("cyan", "triangle", "top right"), ShapeSpec("green", "circle", "bottom left")]
    predicted = [
        {"colour": "red", "shape": "circle", "position": "top left"},  # all right
        {"colour": "blue", "shape": "circle", "position": None},  # colour only
        None,  # nothing
        ShapeSpec("green", "circle", "bottom left", "white"),  # all right (background is not scored)
    ]
    assert attribute_accuracy(predicted, targets) == {"colour": 0.75, "shape": 0.5, "position": 0.5, "all": 0.5}
    with pytest.raises(ValueError):
        attribute_accuracy(predicted[:2], targets)
