"""The one visual-tokenizer interface the rest of the library talks to, for every kind of visual tokenizer.

Grid tokenizers (:class:`~tokenizer_bridge.VisualTokenizer`), slot tokenizers (:class:`~tokenizer_bridge.SlotTokenizer`)
and wrapped pretrained VQ models (:class:`~tokenizer_bridge.modeling_pretrained_vq.PretrainedVQTokenizer`) all
``encode(pixel_values) -> image_ids`` and ``decode(image_ids) -> pixel_values`` and have ``codebook_size`` and
``fingerprint()``. What differs -- whether ids are a 2-D grid or a 1-D sequence of slots, the number of residual
levels, the token budgets, whether levels share a codebook -- is answered here and nowhere else:
:func:`load_visual_tokenizer` opens any of them from a folder, :func:`image_vocab_layout` says how its ids are spelled
in an LLM vocabulary, :func:`image_ids_shape` what ``encode`` returns for an image size.
"""

from __future__ import annotations

from typing import Union

from transformers import PreTrainedConfig

from .configuration_published_vq import PublishedVQConfig
from .configuration_slot_tokenizer import SlotTokenizerConfig
from .configuration_visual_tokenizer import VisualTokenizerConfig
from .modeling_pretrained_vq import (
    _BY_MODEL_TYPE,
    _HUB_KWARGS,
    PathLike,
    PretrainedVQConfig,
    PretrainedVQTokenizer,
)
from .modeling_published_vq import PublishedVQTokenizer
from .modeling_slot_tokenizer import SlotTokenizer
from .modeling_visual_tokenizer import (
    VisualTokenizer,
)

# ---------------------------------------------------------------------------------------------------- loading
AnyVisualTokenizer = Union[VisualTokenizer, SlotTokenizer, PretrainedVQTokenizer, PublishedVQTokenizer]


def load_visual_tokenizer(path: PathLike, **kwargs) -> AnyVisualTokenizer:
    """Open any saved visual tokenizer by its config's ``model_type``: a tokenizer-bridge ``VisualTokenizer`` (grid)
    or ``SlotTokenizer`` (sequence of slots), a converted IBQ / Open-MAGVIT2 / LlamaGen tokenizer, a wrapped
    pretrained VQ, a bare Emu3/Janus/Chameleon VQ checkpoint or a whole Emu3/Janus/Chameleon checkpoint. ``kwargs`` go to ``from_pretrained``."""
    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    model_type = PreTrainedConfig.get_config_dict(path, **hub)[0].get("model_type")
    if model_type == VisualTokenizerConfig.model_type:
        return VisualTokenizer.from_pretrained(path, **kwargs)
    if model_type == SlotTokenizerConfig.model_type:
        return SlotTokenizer.from_pretrained(path, **kwargs)
    if model_type == PretrainedVQConfig.model_type or model_type in _BY_MODEL_TYPE:
        return PretrainedVQTokenizer.from_pretrained(path, **kwargs)
    if model_type == PublishedVQConfig.model_type:  # IBQ, Open-MAGVIT2, LlamaGen converted by `vtok convert`
        return PublishedVQTokenizer.from_pretrained(path, **kwargs)
    known = sorted({VisualTokenizerConfig.model_type, SlotTokenizerConfig.model_type, PretrainedVQConfig.model_type,
                    PublishedVQConfig.model_type, *_BY_MODEL_TYPE})
    raise ValueError(f"{path} holds a {model_type!r} model, not a visual tokenizer (known model types: {known})")


def is_slot_tokenizer(visual_tokenizer) -> bool:
    """Whether ``visual_tokenizer`` encodes images into a budget of learned-query slots (``(B, N[, L])`` ids)."""
    return visual_tokenizer.id_layout == "sequence"


def image_vocab_layout(visual_tokenizer: AnyVisualTokenizer, image_size: int) -> dict:
    """The :func:`~tokenizer_bridge.bridge_llm` layout arguments for the ids ``visual_tokenizer`` gives images of
    ``image_size x image_size`` pixels: ``codebook_size``, ``num_levels`` and

    - grid tokenizers (``id_layout == "grid"``): ``layout="grid"``, ``grid_size=(h, w)``;
    - slot tokenizers (``id_layout == "sequence"``): ``layout="sequence"`` with ``budgets`` = the token budgets it
      was trained with (each span states its budget as ``<n_b>``), or ``num_tokens=N`` when it has a single budget.

    Every visual-tokenizer class answers ``codebook_size``, ``num_levels``, ``shared_codebook`` and ``id_layout``
    (and ``budgets`` for sequences) itself; nothing here looks inside it.
    """
    layout = dict(codebook_size=visual_tokenizer.codebook_size, num_levels=int(visual_tokenizer.num_levels))
    if is_slot_tokenizer(visual_tokenizer):
        budgets = list(visual_tokenizer.budgets)
        if len(budgets) > 1:
            return dict(layout, layout="sequence", budgets=budgets)
        return dict(layout, layout="sequence", num_tokens=budgets[0])
    return dict(layout, layout="grid", grid_size=tuple(visual_tokenizer.config.grid_size(image_size, image_size)))


def image_ids_shape(visual_tokenizer: AnyVisualTokenizer, image_size: int) -> tuple:
    """Shape of one image's ids at the full budget: ``(h, w[, L])`` for grids, ``(N[, L])`` for slot tokenizers."""
    layout = image_vocab_layout(visual_tokenizer, image_size)
    positions = layout.get("grid_size") or (max(layout.get("budgets") or [layout.get("num_tokens")]),)
    return tuple(positions) + ((layout["num_levels"],) if layout["num_levels"] > 1 else ())
