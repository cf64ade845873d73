"""Photos: real photographs shipped inside installed packages, for offline tokenizer training and evaluation.

The images are package data of scikit-image (``skimage/data``), scikit-learn (``sklearn/datasets/images``) and
matplotlib (``mpl-data/sample_data``). Their files are located with `importlib.util.find_spec` and decoded with PIL
directly, so no package is imported and no downloader (scikit-image's pooch fetcher) can ever touch the network. A
package that is missing only removes its photos (logged); the ``data``/``dev`` extras install all three.

`photo_splits` fixes which photos are held out: a tokenizer trained on random crops of the training photos is
evaluated on photos it never saw.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path
from typing import Optional, Sequence, Union

from PIL import Image

from tokenizer_bridge.image_processing_visual_tokenizer import (
    random_crops as image_crops,
)

logger = logging.getLogger(__name__)

# name -> (package, file inside the package). Grayscale ones (camera, coins, moon, textures) are returned as RGB.
PHOTO_FILES: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "brick": ("skimage", "data/brick.png"),
    "camera": ("skimage", "data/camera.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "coins": ("skimage", "data/coins.png"),
    "grass": ("skimage", "data/grass.png"),
    "gravel": ("skimage", "data/gravel.png"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg"),
    "immunohistochemistry": ("skimage", "data/ihc.png"),
    "moon": ("skimage", "data/moon.png"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "retina": ("skimage", "data/retina.jpg"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}
# Held out from tokenizer training: two faces, an animal and an object, all colour photos of everyday subjects.
HELDOUT_PHOTOS: tuple[str, ...] = ("astronaut", "chelsea", "coffee", "grace_hopper")


def _package_dir(package: str) -> Optional[Path]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=None)
def _photo_paths() -> dict[str, Path]:
    """Paths of the photos whose files exist, logging the ones that do not."""
    paths = {}
    for name, (package, relative) in PHOTO_FILES.items():
        root = _package_dir(package)
        if root is not None and (root / relative).is_file():
            paths[name] = root / relative
        else:
            logger.info("photo %r skipped: %s is not installed or lacks %s", name, package, relative)
    return paths


def list_photos() -> list[str]:
    """Names of the photos available in this environment, sorted."""
    return sorted(_photo_paths())


@functools.lru_cache(maxsize=None)
def _decode(name: str) -> Image.Image:
    paths = _photo_paths()
    if name not in paths:
        raise KeyError(f"no photo {name!r}; available: {sorted(paths)}")
    with Image.open(paths[name]) as image:
        return image.convert("RGB")


def load_photo(name: str) -> Image.Image:
    """Photo `name` as an RGB PIL image (decoded once, then served as copies so callers may modify it)."""
    return _decode(name).copy()


def photo_splits() -> tuple[list[str], list[str]]:
    """(train names, held-out names) among the available photos; held-out = `HELDOUT_PHOTOS`."""
    names = list_photos()
    return [n for n in names if n not in HELDOUT_PHOTOS], [n for n in names if n in HELDOUT_PHOTOS]


def _as_image(image: Union[str, Image.Image]) -> Image.Image:
    return load_photo(image) if isinstance(image, str) else image.convert("RGB")


def random_crops(images: Sequence[Union[str, Image.Image]], size: int, n: int, seed: int = 0,
                 scale: tuple[float, float] = (0.25, 1.0)) -> list[Image.Image]:
    """`n` random square crops resized to `size` x `size`, from images (PIL or photo names) chosen uniformly
    (:func:`tokenizer_bridge.image_processing_visual_tokenizer.random_crops` after loading the named photos)."""
    return image_crops([_as_image(image) for image in images], size, n, seed, scale)


def load_photos(which: Union[str, Sequence[str]] = "heldout") -> dict[str, Image.Image]:
    """``{name: photo}`` for ``"heldout"`` (the photos no demo tokenizer trains on), ``"all"`` or a list of names."""
    if which == "heldout":
        names = photo_splits()[1]
    elif which == "all":
        names = list_photos()
    else:
        names = list(which)
        missing = sorted(set(names) - set(list_photos()))
        if missing:
            raise KeyError(f"unknown photo(s) {missing}; available: {list_photos()}")
    return {name: load_photo(name) for name in names}


def center_resize(image: Union[str, Image.Image], size: int) -> Image.Image:
    """Resize the shorter side to `size` and take the centred `size` x `size` square (evaluation preprocessing)."""
    image = _as_image(image)
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))  # crop first: no pixels from outside bleed in
    return square.resize((size, size), Image.Resampling.BICUBIC)
