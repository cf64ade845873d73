"""Quantizers: one module each, one output type (:class:`QuantizerOutput`).

``QUANTIZERS`` is the one place where a config string becomes a quantizer class. A config describes its quantizer as
one *section*, a dict such as ``{"type": "vq", "codebook_size": 1024, "distance": "cosine"}``: ``type`` is a key of
``QUANTIZERS`` and every other key is a keyword argument of that class (all but ``dim``, which the model supplies) or
of :class:`ResidualQuantizer` (``num_levels``, ``shared_codebook``, ``quantizer_dropout``). The class signatures are
the declaration: :func:`check_quantizer_section` validates names and types against them, :func:`build_quantizer`
passes the section straight through, and absent keys take the classes' own defaults.
"""

import inspect
import math
import typing

from huggingface_hub.dataclasses import type_validator

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

# Section keys that configure the residual wrapper rather than one level: its keyword arguments but the level itself.
RESIDUAL_KEYS = tuple(name for name in inspect.signature(ResidualQuantizer).parameters if name != "quantizer")


def section_parameters(kind: str) -> dict[str, inspect.Parameter]:
    """The keys a section of type ``kind`` may hold (``type`` aside): the quantizer class's keyword arguments but
    ``dim``, then the residual wrapper's."""
    if kind not in QUANTIZERS:
        raise ValueError(f"quantizer type must be one of {sorted(QUANTIZERS)}, got {kind!r}")
    own = {n: p for n, p in inspect.signature(QUANTIZERS[kind]).parameters.items() if n != "dim"}
    residual = inspect.signature(ResidualQuantizer).parameters
    return {**own, **{name: residual[name] for name in RESIDUAL_KEYS}}


def section_defaults(kind: str) -> dict:
    """The value each optional key of a section of type ``kind`` has when absent: the classes' defaults, and one
    level (``ResidualQuantizer``'s own ``num_levels=None`` means "count the quantizers given")."""
    params = section_parameters(kind)
    return {**{n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}, "num_levels": 1}


def check_quantizer_section(section: dict) -> None:
    """Raise a clear ``ValueError`` unless ``section`` names a known type and only that class's keyword arguments
    (and the residual ones), with every required one present and each value of its declared type."""
    if not isinstance(section, dict) or "type" not in section:
        raise ValueError(f'a quantizer section is a dict with a "type" (one of {sorted(QUANTIZERS)}), got {section!r}')
    kind = section["type"]
    params = section_parameters(kind)
    name = QUANTIZERS[kind].__name__
    unknown = sorted(set(section) - set(params) - {"type"})
    if unknown:
        hint = " (dim is the model's latent_dim)" if "dim" in unknown else ""
        raise ValueError(f"unknown key(s) {unknown} in the {kind!r} quantizer section{hint}; allowed (the "
                         f"keyword arguments of {name} and of ResidualQuantizer): {sorted(params)}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in section]
    if missing:
        raise ValueError(f"the {kind!r} quantizer section needs {missing} (required arguments of {name})")
    hints = {**typing.get_type_hints(ResidualQuantizer.__init__), **typing.get_type_hints(QUANTIZERS[kind].__init__)}
    for key, value in section.items():
        if key != "type":
            _check_type(f"quantizer.{key}", value, hints.get(key, typing.Any))
    levels = section.get("num_levels", 1)
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"quantizer.num_levels must be an integer >= 1, got {levels!r}")
    if codebook_size_of(section) < 2:
        raise ValueError(f"a quantizer needs at least 2 codes, got {codebook_size_of(section)}")


def _check_type(name: str, value, hint) -> None:
    """``type_validator`` as the configs use it, except that an integer is accepted where a float is declared
    (YAML and JSON write ``1`` for ``1.0``)."""
    try:
        type_validator(name, value, hint)
        return
    except TypeError as error:
        mismatch = error
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            type_validator(name, float(value), hint)
            return
        except TypeError:
            pass
    cause = f" ({mismatch.__cause__})" if mismatch.__cause__ else ""
    raise ValueError(f"{name}: {mismatch}{cause}")


def codebook_size_of(section: dict) -> int:
    """Codes per level: ``codebook_size``, or the product of FSQ's ``levels``, or ``2 ** bits`` for LFQ."""
    if section["type"] == "fsq":
        return math.prod(int(level) for level in section["levels"])
    if section["type"] == "lfq":
        return 2 ** int(section["bits"])
    return int(section["codebook_size"])


def build_quantizer(section: dict, dim: int) -> Quantizer:
    """The quantizer a (checked) section describes, on ``dim``-dimensional latents; wrapped in a
    :class:`ResidualQuantizer` when ``num_levels > 1``."""
    kwargs = {k: v for k, v in section.items() if k != "type" and k not in RESIDUAL_KEYS}
    residual = {k: section[k] for k in RESIDUAL_KEYS if k in section}
    level_class = QUANTIZERS[section["type"]]
    if residual.get("num_levels", 1) == 1:
        return level_class(dim=dim, **kwargs)
    return ResidualQuantizer(lambda: level_class(dim=dim, **kwargs), **residual)


__all__ = [
    "DEFAULT_TILE_ELEMENTS",
    "FiniteScalarQuantizer",
    "IndexBackpropQuantizer",
    "LanguageDrivenQuantizer",
    "LookupFreeQuantizer",
    "QUANTIZERS",
    "RESIDUAL_KEYS",
    "ResidualQuantizer",
    "UnifiedCodebookQuantizer",
    "build_quantizer",
    "check_quantizer_section",
    "codebook_size_of",
    "merge_ids",
    "section_defaults",
    "section_parameters",
    "split_ids",
    "Quantizer",
    "QuantizerOutput",
    "VectorQuantizer",
    "kmeans",
    "nearest_codes",
    "usage_metrics",
]
