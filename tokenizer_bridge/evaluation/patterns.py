"""Synthetic test images for the evaluation suites: high-frequency patterns and rendered text with known content.

- :func:`detail_patterns`: sinusoidal gratings (several spatial frequencies and orientations), checkerboards
  (several cell sizes), families of one-pixel lines (several spacings) and glyphs of PIL's default font (several
  sizes). Each pattern knows the parameter it sweeps, so errors can be read per frequency / cell / spacing / size.
- :func:`render_text`: a ground-truth string drawn in a TrueType font (matplotlib's bundled DejaVu fonts cover
  Latin with diacritics, Greek and Cyrillic), word-wrapped to a fixed width, on a canvas whose sides are multiples
  of the tokenizer's ``downsample`` so no pixel is cropped away.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GRATING_FREQUENCIES = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 3 / 8)  # cycles per pixel (Nyquist is 1/2)
GRATING_ORIENTATIONS = (0, 45, 90)  # degrees
CHECKER_CELLS = (1, 2, 4, 8, 16, 32)  # pixels per cell side
LINE_SPACINGS = (2, 3, 4, 6, 8, 16)  # pixels between one-pixel lines
GLYPH_SIZES = (8, 10, 12, 16, 24)  # PIL default font size in pixels
DARK, LIGHT = 32, 224  # pattern extremes in uint8: away from 0/255 so a decoder's clamp does not flatter it

# language code -> (Tesseract language, ground-truth string); pangrams where the language has a well-known one.
TEXT_SAMPLES: dict[str, tuple[str, str]] = {
    "en": ("eng", "The quick brown fox jumps over the lazy dog"),
    "en-digits": ("eng", "Invoice 2024-07-15: total 1,234.56 EUR, ref. A7-QX9"),
    "de": ("deu", "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich"),
    "fr": ("fra", "Voix ambiguë d'un cœur qui, au zéphyr, préfère les jattes de kiwis"),
    "el": ("ell", "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία"),
    "ru": ("rus", "Съешь же ещё этих мягких французских булок, да выпей чаю"),
}
TEXT_FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
TEXT_SIZES = (12, 16, 24, 32)


@dataclass(frozen=True)
class Pattern:
    """One test image: ``family`` (grating, checkerboard, lines, glyphs), the swept ``parameter`` (frequency in
    cycles/px, cell size, line spacing or font size), a ``variant`` (orientation) and the RGB ``image``."""

    family: str
    parameter: float
    variant: str
    image: Image.Image

    @property
    def label(self) -> str:
        return f"{self.family} {format_parameter(self.family, self.parameter)} {self.variant}".strip()


def format_parameter(family: str, value: float) -> str:
    """Readable key of a swept value: frequencies as fractions ("1/64"), sizes as integers ("8")."""
    if family == "grating":
        return str(Fraction(value).limit_denominator(1024))
    return str(int(value))


def _gray(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(np.clip(np.round(values), 0, 255).astype(np.uint8)[..., None], 3, axis=2))


def grating(size: int, frequency: float, degrees: float) -> Image.Image:
    """Sinusoid of ``frequency`` cycles/px along direction ``degrees``, between ``DARK`` and ``LIGHT``."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    theta = math.radians(degrees)
    phase = 2 * math.pi * frequency * (x * math.cos(theta) + y * math.sin(theta))
    return _gray((DARK + LIGHT) / 2 + (LIGHT - DARK) / 2 * np.sin(phase))


def checkerboard(size: int, cell: int) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    return _gray(np.where(((x // cell) + (y // cell)) % 2 == 0, DARK, LIGHT))


def lines(size: int, spacing: int, orientation: str) -> Image.Image:
    """One-pixel dark lines every ``spacing`` pixels on a light field: horizontal, vertical or diagonal."""
    y, x = np.mgrid[0:size, 0:size]
    coordinate = {"horizontal": y, "vertical": x, "diagonal": x + y}[orientation]
    return _gray(np.where(coordinate % spacing == 0, DARK, LIGHT))


def glyphs(size: int, font_size: int, seed: int = 0) -> Image.Image:
    """Lines of random letters and digits in PIL's default font at ``font_size`` px, dark on light."""
    rng = random.Random(seed * 1009 + font_size)
    font = ImageFont.load_default(size=font_size)
    image = Image.new("RGB", (size, size), (LIGHT,) * 3)
    draw = ImageDraw.Draw(image)
    alphabet = string.ascii_letters + string.digits
    line_height = int(font_size * 1.3) + 1
    for top in range(2, size - line_height, line_height):
        text = "".join(rng.choice(alphabet) for _ in range(size // max(1, font_size // 2)))
        draw.text((2, top), text, fill=(DARK,) * 3, font=font)
    return image


def detail_patterns(size: int = 256) -> list[Pattern]:
    """Every detail pattern at ``size`` x ``size`` px (``size`` should be a multiple of the tokenizer's downsample)."""
    patterns = [Pattern("grating", f, f"{d}deg", grating(size, f, d))
                for f in GRATING_FREQUENCIES for d in GRATING_ORIENTATIONS]
    patterns += [Pattern("checkerboard", c, "", checkerboard(size, c)) for c in CHECKER_CELLS if c < size]
    patterns += [Pattern("lines", s, o, lines(size, s, o))
                 for s in LINE_SPACINGS for o in ("horizontal", "vertical", "diagonal")]
    patterns += [Pattern("glyphs", g, "", glyphs(size, g)) for g in GLYPH_SIZES]
    return patterns


def font_path(name: str) -> Path:
    """Path of a font bundled with matplotlib (``mpl-data/fonts/ttf``)."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
    if not path.is_file():
        raise FileNotFoundError(f"font {name!r} not found in matplotlib's bundled fonts ({path.parent})")
    return path


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    lines_out, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and font.getlength(candidate) > width:
            lines_out.append(current)
            current = word
        else:
            current = candidate
    return lines_out + ([current] if current else [])


def render_text(text: str, font: str, font_size: int, width: int = 512, divisor: int = 16,
                margin: int = 8) -> Image.Image:
    """``text`` in black on white, wrapped to ``width`` px; both sides are multiples of ``divisor``."""
    face = ImageFont.truetype(str(font_path(font)), font_size)
    wrapped = _wrap(text, face, width - 2 * margin)
    line_height = int(round(font_size * 1.35))
    height = 2 * margin + line_height * len(wrapped)
    height = -(-height // divisor) * divisor
    width = -(-width // divisor) * divisor
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for row, line in enumerate(wrapped):
        draw.text((margin, margin + row * line_height), line, fill="black", font=face)
    return image
