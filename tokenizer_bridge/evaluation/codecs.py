"""Classical codec baselines for a visual tokenizer: JPEG and WebP (Pillow) at the tokenizer's bits per pixel.

A tokenizer with K codes and downsample f spends ``log2(K) / f^2`` bits per pixel. :func:`match_quality` finds, by
binary search over the integer quality setting, the highest quality whose file is no larger than that budget (the
codec never gets more bits than the tokenizer; file headers count, as the tokenizer has none to pay for). When even
the lowest quality overshoots, the lowest quality is used and the point is marked ``matched=False``.
:func:`sweep` traces the codec's rate-distortion curve over a list of qualities.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image

from ..image_processing_visual_tokenizer import to_pixel_values
from ..metrics import psnr, ssim

# codec -> (Pillow format, lowest quality, highest quality, save options). One explicit dict, no string factories.
CODECS: dict[str, tuple[str, int, int, dict]] = {
    "jpeg": ("JPEG", 1, 95, {"optimize": True}),  # optimised Huffman tables: the codec's best effort at each quality
    "webp": ("WEBP", 0, 100, {"method": 4}),  # Pillow's default speed/size trade-off
}
SWEEP_QUALITIES: dict[str, tuple[int, ...]] = {
    "jpeg": (2, 5, 10, 20, 30, 50, 70, 90),
    "webp": (0, 5, 10, 20, 40, 60, 80, 95),
}


def _check(codec: str) -> tuple:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; known: {sorted(CODECS)}")
    return CODECS[codec]


def compress(image: Image.Image, codec: str, quality: int) -> tuple[float, Image.Image]:
    """Encode ``image`` with ``codec`` at ``quality``; returns (bits per pixel of the file, decoded RGB image)."""
    fmt, _, _, options = _check(codec)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=fmt, quality=int(quality), **options)
    bpp = 8 * buffer.tell() / (image.width * image.height)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return bpp, decoded.convert("RGB")


def match_quality(image: Image.Image, codec: str, target_bpp: float) -> dict:
    """Highest integer quality whose bits per pixel are ``<= target_bpp`` (binary search; file size grows with
    quality). Returns ``dict(quality, bpp, matched, image)``."""
    _, low, high, _ = _check(codec)
    best = None
    while low <= high:
        mid = (low + high) // 2
        bpp, decoded = compress(image, codec, mid)
        if bpp <= target_bpp:
            best, low = (mid, bpp, decoded), mid + 1
        else:
            high = mid - 1
    if best is None:  # even the lowest quality is over budget
        quality = CODECS[codec][1]
        bpp, decoded = compress(image, codec, quality)
        return {"quality": quality, "bpp": bpp, "matched": False, "image": decoded}
    return {"quality": best[0], "bpp": best[1], "matched": True, "image": best[2]}




def quality_scores(original: Image.Image, decoded: Image.Image) -> dict:
    """PSNR and SSIM of ``decoded`` against ``original`` (same scale as the tokenizer's: [-1, 1], range 2)."""
    a, b = to_pixel_values(original), to_pixel_values(decoded)
    return {"psnr": float(psnr(b, a)[0]), "ssim": float(ssim(b, a)[0])}


def matched_point(images: Sequence[Image.Image], codec: str, target_bpp: float) -> dict:
    """Each image coded at the quality matching ``target_bpp``; means of bpp, PSNR, SSIM and quality."""
    rows = []
    for image in images:
        match = match_quality(image, codec, target_bpp)
        rows.append({"quality": match["quality"], "bpp": match["bpp"], "matched": match["matched"],
                     **quality_scores(image, match["image"])})
    return {
        "bpp": float(np.mean([r["bpp"] for r in rows])),
        "psnr": float(np.mean([r["psnr"] for r in rows])),
        "ssim": float(np.mean([r["ssim"] for r in rows])),
        "quality_mean": float(np.mean([r["quality"] for r in rows])),
        "fraction_matched": float(np.mean([r["matched"] for r in rows])),
    }


def sweep(images: Sequence[Image.Image], codec: str, qualities: Sequence[int]) -> list[dict]:
    """Rate-distortion curve: for each quality, the mean bpp, PSNR and SSIM over ``images``."""
    curve = []
    for quality in qualities:
        rows = []
        for image in images:
            bpp, decoded = compress(image, codec, quality)
            rows.append({"bpp": bpp, **quality_scores(image, decoded)})
        curve.append({"quality": int(quality), **{k: float(np.mean([r[k] for r in rows])) for k in rows[0]}})
    return curve


def codec_baselines(images: Sequence[Image.Image], target_bpp: float, codecs: Sequence[str] = ("jpeg", "webp"),
                    qualities: dict = SWEEP_QUALITIES) -> dict:
    """``{codec: {"matched": matched_point(...), "sweep": sweep(...)}}`` for each codec."""
    if not images:
        raise ValueError("codec_baselines needs at least one image")
    return {
        codec: {"matched": matched_point(images, codec, target_bpp), "sweep": sweep(images, codec, qualities[codec])}
        for codec in codecs
    }
