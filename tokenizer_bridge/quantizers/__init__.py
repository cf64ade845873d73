"""Quantizers: one module each, one output type (:class:`QuantizerOutput`).

``QUANTIZERS`` is the one place where a config string becomes a quantizer class.
"""

from .base import DEFAULT_TILE_ELEMENTS, Quantizer, QuantizerOutput, nearest_codes, usage_metrics
from .vq import VectorQuantizer, kmeans

QUANTIZERS = {"vq": VectorQuantizer}

__all__ = [
    "DEFAULT_TILE_ELEMENTS",
    "QUANTIZERS",
    "Quantizer",
    "QuantizerOutput",
    "VectorQuantizer",
    "kmeans",
    "nearest_codes",
    "usage_metrics",
]
