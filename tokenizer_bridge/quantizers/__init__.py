"""Quantizers: one module each, one output type (:class:`QuantizerOutput`).

``QUANTIZERS`` is the one place where a config string becomes a quantizer class.
"""

from .base import (
    DEFAULT_TILE_ELEMENTS,
    Quantizer,
    QuantizerOutput,
    nearest_codes,
    usage_metrics,
)
from .fsq import FiniteScalarQuantizer, merge_ids, split_ids
from .ibq import IndexBackpropQuantizer
from .lfq import LookupFreeQuantizer
from .residual import ResidualQuantizer
from .unicode import LanguageDrivenQuantizer, UnifiedCodebookQuantizer
from .vq import VectorQuantizer, kmeans

# Quantizers that a VisualTokenizerConfig can name. The UniCode ones need an LLM's embedding matrix and are built
# with their `from_llm` constructors instead.
QUANTIZERS = {
    "vq": VectorQuantizer,
    "ibq": IndexBackpropQuantizer,
    "fsq": FiniteScalarQuantizer,
    "lfq": LookupFreeQuantizer,
}


def build_quantizer(name: str, kwargs: dict, residual_levels: int = 1, shared_codebook: bool = False,
                    quantizer_dropout: float = 0.0) -> Quantizer:
    """The quantizer ``name`` with ``kwargs``, wrapped in a residual quantizer when ``residual_levels > 1``."""
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; known: {sorted(QUANTIZERS)}")
    if residual_levels == 1:
        return QUANTIZERS[name](**kwargs)
    return ResidualQuantizer(lambda: QUANTIZERS[name](**kwargs), num_levels=residual_levels,
                             shared_codebook=shared_codebook, quantizer_dropout=quantizer_dropout)

__all__ = [
    "DEFAULT_TILE_ELEMENTS",
    "FiniteScalarQuantizer",
    "IndexBackpropQuantizer",
    "LanguageDrivenQuantizer",
    "LookupFreeQuantizer",
    "QUANTIZERS",
    "ResidualQuantizer",
    "UnifiedCodebookQuantizer",
    "build_quantizer",
    "merge_ids",
    "split_ids",
    "Quantizer",
    "QuantizerOutput",
    "VectorQuantizer",
    "kmeans",
    "nearest_codes",
    "usage_metrics",
]
