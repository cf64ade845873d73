import numpy as np
import pytest
from PIL import Image

from mllm.data.photos import (
    HELDOUT_PHOTOS,
    PHOTO_FILES,
    center_resize,
    list_photos,
    load_photo,
    photo_splits,
    random_crops,
)

# The dev extras install scikit-image, scikit-learn and matplotlib, so every photo must be there.
EXPECTED_SIZES = {"astronaut": (512, 512), "camera": (512, 512), "chelsea": (451, 300), "coffee": (600, 400),
                  "china": (640, 427), "flower": (640, 427), "grace_hopper": (512, 600), "rocket": (640, 427)}


def test_all_photos_are_available():
    assert list_photos() == sorted(PHOTO_FILES)


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
def test_known_photos_load_as_rgb(name):
    image = load_photo(name)
    pixels = np.asarray(image)
    assert image.mode == "RGB" and image.size == EXPECTED_SIZES[name]
    assert pixels.dtype == np.uint8 and pixels.shape == (*EXPECTED_SIZES[name][::-1], 3)
    assert pixels.std() > 20  # a real picture, not a blank


def test_photos_match_their_packages_loaders():
    import skimage.data
    from sklearn.datasets import load_sample_image

    assert (np.asarray(load_photo("astronaut")) == skimage.data.astronaut()).all()
    camera = np.asarray(load_photo("camera"))
    assert (camera == skimage.data.camera()[..., None]).all()  # grayscale replicated to 3 channels
    assert (np.asarray(load_photo("china")) == load_sample_image("china.jpg")).all()


def test_load_photo_returns_independent_copies():
    first = load_photo("rocket")
    first.paste((0, 0, 0), (0, 0, 10, 10))
    assert np.asarray(load_photo("rocket"))[:10, :10].any()
    with pytest.raises(KeyError):
        load_photo("no_such_photo")


def test_split_is_fixed_and_disjoint():
    train, heldout = photo_splits()
    assert heldout == sorted(HELDOUT_PHOTOS) == ["astronaut", "chelsea", "coffee", "grace_hopper"]
    assert not set(train) & set(heldout) and sorted(train + heldout) == list_photos()
    assert len(train) >= 10


def test_random_crops_size_and_determinism():
    train, _ = photo_splits()
    crops = random_crops(train, size=48, n=12, seed=5, scale=(0.3, 0.8))
    assert len(crops) == 12 and all(c.size == (48, 48) and c.mode == "RGB" for c in crops)
    again = random_crops(train, size=48, n=12, seed=5, scale=(0.3, 0.8))
    assert all((np.asarray(a) == np.asarray(b)).all() for a, b in zip(crops, again))
    other = random_crops(train, size=48, n=12, seed=6, scale=(0.3, 0.8))
    assert any((np.asarray(a) != np.asarray(b)).any() for a, b in zip(crops, other))
    with pytest.raises(ValueError):
        random_crops(train, size=48, n=1, scale=(0.5, 1.5))


def test_random_crops_full_scale_of_a_square_image_is_the_image():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    (crop,) = random_crops([image], size=40, n=1, seed=0, scale=(1.0, 1.0))
    assert (np.asarray(crop) == np.asarray(image)).all()


def test_center_resize_takes_the_centre_square():
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 10:30] = 255  # a white centre square between black side bands
    out = np.asarray(center_resize(Image.fromarray(pixels), 10))
    assert out.shape == (10, 10, 3) and (out == 255).all()
    assert center_resize("astronaut", 64).size == (64, 64)
