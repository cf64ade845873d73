"""Build or load the causal LM of an ``llm`` recipe and bridge it to a visual tokenizer.

:func:`build_text_model` makes the text model (a Llama built from ``model.config`` with a word tokenizer, or a
pretrained LLM from ``model.base``, GGUF included), :func:`bridge` adds the image vocabulary laid out as the recipe's
``model.image_vocab`` says (:func:`layout_options`) and returns the model with its
:class:`~tokenizer_bridge.UnifiedProcessor`.
"""

from __future__ import annotations

from typing import Optional

from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from tokenizer_bridge import ImageVocab, VisualTokenizer
from tokenizer_bridge.image_processing_visual_tokenizer import (
    VisualTokenizerImageProcessor,
)
from tokenizer_bridge.interface import (
    image_vocab_layout,
)
from tokenizer_bridge.processing_unified import UnifiedProcessor
from tokenizer_bridge.vocab.bridge import bridge_llm

from .data import shapes
from .data.tasks import (
    TASK_WORDS,
    TINY_CHAT_TEMPLATE,
    extra_words,
)
from .generation.inference import DEFAULT_IMAGE_SIZE_KEY
from .text_tokenizers import build_word_tokenizer
from .training.recipe import ImageVocabRecipe, image_vocab_recipe

DEFAULT_LLM = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False)



def shapes_vocabulary(tasks: Optional[dict] = None) -> list[str]:
    """Every word the shapes captions and the templates of the mixture's tasks use."""
    words = [*TASK_WORDS, "a", "at", "the", "top", "bottom", "left", "right"]
    return words + list(shapes.COLOURS) + list(shapes.SHAPES) + extra_words(tasks or {})



def build_text_model(model_section: dict, words: Optional[list[str]] = None):
    """(tokenizer, causal LM) from ``model.base`` (a path) or a Llama built from ``model.config`` with a word-level
    tokenizer over ``words`` (default: the shapes vocabulary) and a tiny chat template."""
    unknown = sorted(set(model_section) - {"base", "config", "gguf_file", "image_vocab"})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in the llm recipe's model section (base, config, gguf_file, "
                         "image_vocab)")
    base = model_section.get("base")
    if base:
        extra = {"gguf_file": model_section["gguf_file"]} if model_section.get("gguf_file") else {}
        tokenizer = AutoTokenizer.from_pretrained(base, **extra)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(base, **extra)
        return tokenizer, (as_plain_model(model) if extra else model)
    tokenizer = build_word_tokenizer(words or shapes_vocabulary())
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    config = LlamaConfig(**{**DEFAULT_LLM, **model_section.get("config", {})}, vocab_size=len(tokenizer),
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return tokenizer, LlamaForCausalLM(config)



def as_plain_model(model):
    """A GGUF checkpoint loads de-quantized into float weights, yet transformers keeps its GGUF quantizer attached and
    then refuses ``save_pretrained``: detach it, so the bridged model saves (and reloads) as an ordinary causal LM."""
    if any(not p.is_floating_point() for p in model.parameters()):
        raise ValueError("the GGUF weights stayed packed (not de-quantized): the llm stage needs float weights")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    for module in model.modules():  # set on every sub-model's config by the quantizer
        if hasattr(getattr(module, "config", None), "_is_quantized"):
            module.config._is_quantized = False
    return model



def build_processor(tokenizer, visual_tokenizer: VisualTokenizer, image_size: int, vocab: ImageVocab) -> UnifiedProcessor:
    image_processor = VisualTokenizerImageProcessor(
        size=image_size, resize_mode="crop", size_divisor=visual_tokenizer.config.downsample
    )
    return UnifiedProcessor(image_processor, tokenizer, vocab, visual_tokenizer=visual_tokenizer)



def bridge(model_section: dict, visual_tokenizer: VisualTokenizer, image_size: int, words: Optional[list[str]] = None):
    """Build the text model and bridge it with the layout of ``model.image_vocab`` (see :func:`layout_options`):
    returns (model, processor)."""
    layout = image_vocab_recipe(model_section)
    tokenizer, model = build_text_model(model_section, words)
    options, default_size = layout_options(layout, visual_tokenizer, image_size, tokenizer, model)
    vocab = bridge_llm(model, tokenizer, visual_tokenizer.codebook_size,
                       tokenizer_fingerprint=visual_tokenizer.fingerprint(), **options)
    if default_size is not None:
        vocab.extra[DEFAULT_IMAGE_SIZE_KEY] = list(default_size)  # what inference generates unless told otherwise
    return model, build_processor(tokenizer, visual_tokenizer, image_size, vocab)



def layout_options(layout: ImageVocabRecipe, visual_tokenizer, image_size: int, tokenizer,
                   model) -> tuple[dict, Optional[tuple]]:
    """``bridge_llm`` keyword arguments for ``layout`` (``model.image_vocab`` of the recipe) and the visual
    tokenizer, and the default generation size of a variable-size grid (else ``None``).

    Slot tokenizers (1-D ids) get a sequence of their slots (see
    :func:`~tokenizer_bridge.interface.image_vocab_layout`), the others a grid of the ``image_size`` id map; residual tokenizers one level per residual level, in separate id
    ranges unless their levels share one codebook (or ``separate_level_ranges`` says otherwise).
    """
    base = image_vocab_layout(visual_tokenizer, image_size)
    one_d = base["layout"] == "sequence"
    kind = layout.layout if layout.layout != "auto" else ("sequence" if one_d else "grid")
    if kind == "sequence" and not one_d:
        raise ValueError("model.image_vocab.layout: sequence needs a visual tokenizer that emits 1-D ids (a slot "
                         f"tokenizer); {type(visual_tokenizer).__name__} emits 2-D id maps: use layout grid")
    if kind == "grid" and one_d:
        raise ValueError(f"model.image_vocab.layout: grid needs 2-D id maps, but {type(visual_tokenizer).__name__} "
                         "emits 1-D slot ids: use layout sequence (or auto)")
    levels = base["num_levels"]
    shared = bool(getattr(getattr(visual_tokenizer, "quantizer", None), "shared_codebook", False))
    unified = layout.unified_codebook is not None
    separate = layout.separate_level_ranges
    if separate is None:
        separate = levels > 1 and not shared and not unified
    options = dict(layout=kind, num_levels=levels, level_order=layout.level_order, separate_level_ranges=separate,
                   factors=layout.factors, special_tokens=layout.special_tokens)
    default_size = None
    if kind == "sequence":  # the slot tokenizer's budgets (one <n_b> token each) when it was trained with several
        options.update({k: base[k] for k in ("num_tokens", "budgets") if k in base})
    else:
        grid = base["grid_size"]
        options["grid_size"] = grid
        if layout.variable_size:
            largest = tuple(int(s) for s in (layout.max_grid_size or grid))
            if grid[0] > largest[0] or grid[1] > largest[1]:
                raise ValueError(f"data.image_size={image_size} gives {grid[0]}x{grid[1]} id grids, larger than "
                                 f"model.image_vocab.max_grid_size {list(largest)}")
            options.update(grid_size=largest, variable_size=True)
            default_size = grid
    if unified:
        options["token_ids"] = unified_token_ids(layout.unified_codebook, tokenizer, model,
                                                 visual_tokenizer.codebook_size)
    return options, default_size



def unified_token_ids(choice, tokenizer, model, codebook_size: int) -> list[int]:
    """The existing text tokens that become the image ids of a unified codebook: ``"first"`` (the first K text tokens
    that are not special tokens of the tokenizer or the model) or an explicit list of K ids."""
    from tokenizer_bridge.quantizers.unicode import llm_special_ids, select_token_ids

    strategy = "first" if choice == "first" else list(choice)
    ids = select_token_ids(tokenizer, codebook_size, strategy, exclude=llm_special_ids(model.config))
    return ids.tolist()
