"""Shapes: a tiny, deterministic captioned-image dataset whose images can be judged on their pixels.

One coloured shape (circle, square or triangle) sits in one quadrant of a plain neutral background and is described
by a caption such as ``"a red circle at the top left"``. The set is small enough to train a visual tokenizer and a
tiny LLM on a CPU in minutes, and every attribute can be read back from pixels (`classify`) or from generated text
(`parse_caption`), so captioning and text-to-image are scored exactly, without a learned judge.

`make_splits` holds out whole (colour, shape, position) combinations while keeping every attribute value and every
pair of values in training: a held-out caption tests compositional generalisation in the sense of the CLEVR
CoGenT / "systematic generalisation" splits (Johnson et al., 2017; Bahdanau et al., 2019).
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
from PIL import Image

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
# Every shape colour is >= 220 (L2 in RGB) away from every background.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "position")

SHAPE_FRACTION = 0.72  # shape side / quadrant side
MAX_SHIFT = 1.5 / 32  # jitter of the shape centre, as a fraction of the image side (1.5 px at 32 px)
MAX_SCALE = 0.10  # jitter of the shape side, relative
_SUPERSAMPLE = 4  # 4x4 coverage samples per pixel: antialiased edges, exact colours inside


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    position: str
    background: str = "black"

    def __post_init__(self):
        for value, allowed in ((self.colour, COLOURS), (self.shape, SHAPES), (self.position, POSITIONS),
                               (self.background, BACKGROUNDS)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {tuple(allowed)}")

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} at the {self.position}"

    @property
    def combo(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.position)


# ---------------------------------------------------------------------------------------------------------- text
_SYNONYMS = {"grey": "gray", "disc": "circle", "disk": "circle", "upper": "top", "lower": "bottom"}


def parse_caption(text: str) -> dict[str, Optional[str]]:
    """Attributes a free-form text mentions: dict(colour, shape, position, background), None where absent.

    The first mention wins; plurals ("circles") and a few synonyms ("grey", "disk", "upper") are accepted. A position
    needs both a vertical (top/bottom) and a horizontal (left/right) word. A neutral colour word (black, white,
    gray) names the background, since shapes never have those colours.
    """
    words = [_SYNONYMS.get(w, w) for w in re.findall(r"[a-z]+", text.lower())]
    words = [w[:-1] if w.endswith("s") and w[:-1] in SHAPES else w for w in words]
    vertical = next((w for w in words if w in ("top", "bottom")), None)
    horizontal = next((w for w in words if w in ("left", "right")), None)
    return {
        "colour": next((w for w in words if w in COLOURS), None),
        "shape": next((w for w in words if w in SHAPES), None),
        "position": f"{vertical} {horizontal}" if vertical and horizontal else None,
        "background": next((w for w in words if w in BACKGROUNDS), None),
    }


# ------------------------------------------------------------------------------------------------------ pixels
def _shape_box(spec: ShapeSpec, size: int, rng: Optional[np.random.Generator], jitter: float):
    """(left, top, right, bottom) of the shape in pixels, centred in its quadrant, optionally jittered."""
    half = size / 2
    side = SHAPE_FRACTION * half
    cx = half * (0.5 + spec.position.endswith("right"))
    cy = half * (0.5 + spec.position.startswith("bottom"))
    if rng is not None and jitter > 0:
        dx, dy = rng.uniform(-1, 1, size=2) * MAX_SHIFT * size * jitter
        side *= 1 + rng.uniform(-1, 1) * MAX_SCALE * jitter
        cx, cy = cx + dx, cy + dy
    return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2


def shape_mask(shape: str, box: tuple[float, float, float, float], width: int, height: int) -> np.ndarray:
    """Antialiased coverage (H, W) in [0, 1] of `shape` filling `box` = (left, top, right, bottom) in pixels.

    Coverage is the fraction of a 4x4 grid of sample points per pixel inside the exact shape, so fully covered
    pixels are exactly 1 (pure colours inside a rendered shape) and areas match the geometry.
    """
    offsets = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    ys = (np.arange(height)[:, None] + offsets).reshape(-1, 1)  # (H*S, 1) sample rows
    xs = (np.arange(width)[:, None] + offsets).reshape(1, -1)  # (1, W*S) sample columns
    left, top, right, bottom = box
    cx, cy, half_w, half_h = (left + right) / 2, (top + bottom) / 2, (right - left) / 2, (bottom - top) / 2
    if shape == "circle":
        inside = ((xs - cx) / half_w) ** 2 + ((ys - cy) / half_h) ** 2 <= 1
    elif shape == "square":
        inside = (np.abs(xs - cx) <= half_w) & (np.abs(ys - cy) <= half_h)
    elif shape == "triangle":  # upward isosceles filling its box: half width grows linearly from apex to base
        inside = (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= half_w * (ys - top) / (bottom - top))
    else:
        raise ValueError(f"{shape!r} is not one of {SHAPES}")
    samples = inside.reshape(height, _SUPERSAMPLE, width, _SUPERSAMPLE)  # (H*S, W*S) -> (H, S, W, S)
    return samples.mean(axis=(1, 3), dtype=np.float32)


def render(spec: ShapeSpec, size: int = 32, rng: Optional[np.random.Generator] = None,
           jitter: float = 1.0) -> Image.Image:
    """An RGB `size` x `size` image of `spec`; with `rng`, position (+-1.5 px at 32 px) and side (+-10%) are jittered,
    both scaled by `jitter`."""
    alpha = shape_mask(spec.shape, _shape_box(spec, size, rng, jitter), size, size)[..., None]  # (H, W, 1)
    background = np.asarray(BACKGROUNDS[spec.background], dtype=np.float32)
    pixels = background + alpha * (np.asarray(COLOURS[spec.colour], dtype=np.float32) - background)
    return Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB")


_MIN_FOREGROUND = 4.0  # pixels' worth of foreground below which an image counts as empty
_SIGMAS = (0.0, 0.4, 0.7, 1.0, 1.3, 1.6, 2.0)  # blur levels tried by `_classify_shape`, in pixels at 32 px
_NOISE_FLOOR = 0.15  # alpha below this is background noise (noise of std 10/255 gives alpha std ~0.04)


def _to_array(image: Union[Image.Image, np.ndarray]) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
    return image.astype(np.float32)


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(np.sum((rgb - np.asarray(palette[name])) ** 2)))


def _foreground_alpha(pixels: np.ndarray, background: np.ndarray):
    """(alpha (H, W) in [0, 1], foreground colour) from each pixel's projection on the background->foreground line."""
    offset = pixels - background  # (H, W, 3)
    core = np.linalg.norm(offset, axis=-1) > 110  # half the smallest colour-background distance
    if core.sum() == 0:
        return None, None
    colour = np.median(pixels[core], axis=0)
    direction = colour - background
    alpha = np.clip((offset @ direction) / max(float(direction @ direction), 1.0), 0.0, 1.0)
    return np.where(alpha > _NOISE_FLOOR, alpha, 0.0), colour


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) Gaussian blur operator along one axis, zero outside the image (the surroundings are background)."""
    if sigma < 0.05:
        return np.eye(n, dtype=np.float32)
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum(axis=1, keepdims=True)).astype(np.float32)


def _moments(alpha: np.ndarray) -> tuple[float, float, float]:
    """(area, centre x, centre y) of a soft mask, in pixels."""
    ys, xs = np.mgrid[0:alpha.shape[0], 0:alpha.shape[1]] + 0.5
    area = float(alpha.sum())
    return area, float((alpha * xs).sum()) / area, float((alpha * ys).sum()) / area


def _candidate_box(shape: str, area: float, cx: float, cy: float) -> tuple[float, float, float, float]:
    """Box of an ideal `shape` with the observed area and mass centre (a triangle's centre sits 1/6 below its box's)."""
    side = np.sqrt({"circle": 4 / np.pi, "square": 1.0, "triangle": 2.0}[shape] * area)
    cy -= side / 6 if shape == "triangle" else 0.0
    return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2


def _classify_shape(alpha: np.ndarray) -> str:
    """The shape whose ideal mask, matched in area and mass centre and blurred by the best of a few sigmas, fits best.

    Blur, resizing and JPEG roughly preserve a soft mask's area and centre but spread it; trying each candidate at
    several blur levels lets the true shape explain the spread while a wrong shape keeps a residual at its corners.
    """
    area, cx, cy = _moments(alpha)
    height, width = alpha.shape
    scale = max(height, width) / 32
    errors = {}
    for shape in SHAPES:
        candidate = shape_mask(shape, _candidate_box(shape, area, cx, cy), width, height)
        errors[shape] = min(_fit_error(candidate, alpha, sigma * scale) for sigma in _SIGMAS)
    return min(errors, key=errors.get)


def _fit_error(candidate: np.ndarray, alpha: np.ndarray, sigma: float) -> float:
    blurred = _blur_matrix(alpha.shape[0], sigma) @ candidate @ _blur_matrix(alpha.shape[1], sigma).T
    blurred = np.where(blurred > _NOISE_FLOOR, blurred, 0.0)
    return float(((blurred - alpha) ** 2).sum())


def classify(image: Union[Image.Image, np.ndarray]) -> dict[str, Optional[str]]:
    """Read (colour, shape, position, background) back from an image; None values where there is no foreground.

    Background = nearest neutral to the median border pixel; foreground = pixels far from it; colour = palette colour
    nearest the foreground's median; position = quadrant of the foreground's mass centre; shape = best-fitting ideal
    mask (`_classify_shape`). Robust to mild blur, noise, JPEG, resizing and colour shifts.
    """
    pixels = _to_array(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = np.median(border, axis=0)
    result = dict.fromkeys(ATTRIBUTES, None) | {"background": _nearest(background, BACKGROUNDS)}
    alpha, colour = _foreground_alpha(pixels, background)
    if alpha is None or alpha.sum() < _MIN_FOREGROUND:
        return result
    _, cx, cy = _moments(alpha)
    vertical = "top" if cy < alpha.shape[0] / 2 else "bottom"
    horizontal = "left" if cx < alpha.shape[1] / 2 else "right"
    result.update(colour=_nearest(colour, COLOURS), shape=_classify_shape(alpha), position=f"{vertical} {horizontal}")
    return result


# ------------------------------------------------------------------------------------------------------ splits
_SPLIT_ATTEMPTS = 200  # greedy passes tried by `make_splits`: enough for every seed tried up to a fraction of 0.6


class ShapesSplit(NamedTuple):
    train: list[ShapeSpec]
    heldout: list[ShapeSpec]


def _pairs(combo: tuple[str, str, str]) -> list[tuple]:
    """The three (attribute index, attribute index, value, value) pairs inside a combination."""
    return [(i, j, combo[i], combo[j]) for i, j in ((0, 1), (0, 2), (1, 2))]


def _pick_heldout(combos: list[tuple], target: int, rng: np.random.Generator) -> Optional[set]:
    """Greedy pass in random order: hold out a combination if all its pairs stay in training and no value exceeds
    its balanced share; None if the pass ends short of `target`."""
    caps = [-(-target // len(values)) for values in (COLOURS, SHAPES, POSITIONS)]
    pair_left = Counter(pair for combo in combos for pair in _pairs(combo))  # training combos containing each pair
    value_used = Counter()  # held-out combos containing each (attribute index, value)
    heldout = set()
    for index in rng.permutation(len(combos)):
        combo = combos[index]
        if len(heldout) == target:
            break
        if any(pair_left[pair] == 1 for pair in _pairs(combo)):
            continue
        if any(value_used[i, value] == cap for i, (value, cap) in enumerate(zip(combo, caps))):
            continue
        heldout.add(combo)
        pair_left.subtract(_pairs(combo))
        value_used.update(enumerate(combo))
    return heldout if len(heldout) == target else None


def make_splits(seed: int = 0, holdout_fraction: float = 0.2) -> ShapesSplit:
    """Split the 72 (colour, shape, position) combinations into train and held-out, each crossed with every background.

    Held-out combinations never occur in training, yet every pair of attribute values they contain (and hence every
    single value) does, so a held-out caption is new only as a combination. The held-out set is balanced: no value
    occurs in it more than ceil(n_heldout / n_values) times. Deterministic for a seed.
    """
    if not 0 <= holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    combos = list(itertools.product(COLOURS, SHAPES, POSITIONS))
    target = round(holdout_fraction * len(combos))
    rng = np.random.default_rng(seed)
    for _ in range(_SPLIT_ATTEMPTS):
        heldout = _pick_heldout(combos, target, rng)
        if heldout is not None:
            break
    else:
        raise ValueError(f"found no balanced hold-out of {target} combinations with every pair kept in training")

    def specs(keep):
        return [ShapeSpec(*c, background=b) for c in combos if keep(c) for b in BACKGROUNDS]

    return ShapesSplit(specs(lambda c: c not in heldout), specs(lambda c: c in heldout))


class ShapesDataset:
    """Map-style dataset (works with torch's DataLoader) of `samples_per_spec` jittered renders of each spec.

    Item `i` renders `specs[i % len(specs)]` with a generator seeded by (seed, i), so any worker produces the same
    pixels for the same index. Items are dict(image=PIL.Image, caption=str, spec=ShapeSpec).
    """

    def __init__(self, specs: Sequence[ShapeSpec], size: int = 32, samples_per_spec: int = 1, seed: int = 0,
                 jitter: float = 1.0):
        if not specs:
            raise ValueError("ShapesDataset needs at least one spec")
        self.specs, self.size, self.samples_per_spec = list(specs), size, samples_per_spec
        self.seed, self.jitter = seed, jitter

    def __len__(self) -> int:
        return len(self.specs) * self.samples_per_spec

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        spec = self.specs[index % len(self.specs)]
        rng = np.random.default_rng([self.seed, index])
        return {"image": render(spec, self.size, rng, self.jitter), "caption": spec.caption, "spec": spec}


# ------------------------------------------------------------------------------------------------------ scoring
def chance_levels() -> dict[str, float]:
    """Accuracy of uniform guessing per attribute and for all three jointly."""
    levels = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS)}
    return levels | {"all": levels["colour"] * levels["shape"] * levels["position"]}


def attribute_accuracy(predicted: Sequence[Union[dict, ShapeSpec, None]],
                       target: Sequence[ShapeSpec]) -> dict[str, float]:
    """Per-attribute and joint ("all") accuracy of predictions (dicts from `classify`/`parse_caption`, ShapeSpecs or
    None) against target specs; a missing or None attribute counts as wrong."""
    if len(predicted) != len(target):
        raise ValueError(f"{len(predicted)} predictions for {len(target)} targets")
    if not target:
        raise ValueError("attribute_accuracy needs at least one example")
    hits = {name: 0 for name in (*ATTRIBUTES, "all")}
    for guess, spec in zip(predicted, target):
        if isinstance(guess, ShapeSpec):
            guess = {name: getattr(guess, name) for name in ATTRIBUTES}
        guess = guess or {}
        correct = [guess.get(name) == getattr(spec, name) for name in ATTRIBUTES]
        for name, ok in zip(ATTRIBUTES, correct):
            hits[name] += ok
        hits["all"] += all(correct)
    return {name: count / len(target) for name, count in hits.items()}
