"""Tokenizer evaluation: reconstruction, detail and text-preservation suites, codebook use, codec baselines and
alignment (:mod:`.suites`) on the images the caller passes (:mod:`.run`), with their test patterns, OCR and codecs."""

from .run import EvalSettings
from .suites import DEFAULT_SUITES, SUITES, evaluate_tokenizer

__all__ = ["DEFAULT_SUITES", "EvalSettings", "SUITES", "evaluate_tokenizer"]
