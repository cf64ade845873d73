"""Optical character recognition with the Tesseract binary, for the text-preservation suite.

Tesseract is called as a subprocess (``tesseract stdin stdout -l LANG --psm 6``): no Python wrapper is needed, and
the binary comes from the system (Debian: ``apt-get install tesseract-ocr tesseract-ocr-deu ...``, see
``eval/setup_ocr.sh``). Small text is upscaled before recognition (Tesseract reads poorly below ~20 px glyphs); the
same upscaling is applied to originals and reconstructions, so both are read under equal conditions.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import subprocess
import unicodedata
from typing import Optional

from PIL import Image

OCR_MIN_FONT_PX = 32  # text is upscaled (integer factor, bicubic) until glyphs are at least this tall
SETUP_HINT = "install it with `bash eval/setup_ocr.sh` (Debian/Ubuntu, needs root: tesseract-ocr + language packs)"

# Typographic variants Tesseract emits for plain characters; folded on both sides before scoring.
_FOLD = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2014": "-", "\u2013": "-"})


def tesseract_path(command: str = "tesseract") -> Optional[str]:
    """Full path of the Tesseract binary, or ``None`` when it is not installed."""
    return shutil.which(command)


@functools.lru_cache(maxsize=None)
def tesseract_languages(command: str = "tesseract") -> frozenset:
    """Installed Tesseract language packs (e.g. ``{"eng", "deu"}``); empty when Tesseract is missing."""
    if tesseract_path(command) is None:
        return frozenset()
    out = subprocess.run([command, "--list-langs"], capture_output=True, text=True, check=False)
    return frozenset(line.strip() for line in out.stdout.splitlines()[1:] if line.strip())


def tesseract_version(command: str = "tesseract") -> Optional[str]:
    if tesseract_path(command) is None:
        return None
    out = subprocess.run([command, "--version"], capture_output=True, text=True, check=False)
    first = (out.stdout or out.stderr).splitlines()
    return first[0].strip() if first else None


def upscale_for_ocr(image: Image.Image, font_px: int) -> Image.Image:
    factor = max(1, -(-OCR_MIN_FONT_PX // max(1, font_px)))
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.BICUBIC)


def ocr(image: Image.Image, language: str, font_px: int, command: str = "tesseract") -> str:
    """Text Tesseract reads in ``image`` (one block of text, ``--psm 6``), upscaled for ``font_px`` glyphs."""
    if tesseract_path(command) is None:
        raise FileNotFoundError(f"the Tesseract binary {command!r} is not on PATH: {SETUP_HINT}")
    buffer = io.BytesIO()
    upscale_for_ocr(image.convert("RGB"), font_px).save(buffer, format="PNG")
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}  # one thread per call: the suite runs calls in parallel
    out = subprocess.run([command, "stdin", "stdout", "-l", language, "--psm", "6"], input=buffer.getvalue(),
                         capture_output=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"tesseract failed ({out.returncode}): {out.stderr.decode(errors='replace').strip()}")
    return out.stdout.decode("utf-8", errors="replace")


def normalize_text(text: str) -> str:
    """Unicode NFKC (e.g. MICRO SIGN -> Greek mu), typographic quotes and dashes folded to ASCII, whitespace
    (including line breaks from wrapping) collapsed to single spaces. Case and diacritics are kept: they are
    exactly what a tokenizer may lose."""
    return " ".join(unicodedata.normalize("NFKC", text).translate(_FOLD).split())
