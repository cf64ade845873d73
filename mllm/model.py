"""Build or load the causal LM of an ``llm`` recipe and bridge it to a visual tokenizer.

:func:`build_text_model` makes the text model (a Llama built from ``model.config`` with a word tokenizer, or a
pretrained LLM from ``model.base``, GGUF included), :func:`bridge` adds the image vocabulary laid out as the recipe's
``model.image_vocab`` says (:class:`~mllm.training.recipe.ImageVocabRecipe`) and returns the model with its
:class:`~tokenizer_bridge.UnifiedProcessor`.
"""

from __future__ import annotations

import os
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
from tokenizer_bridge.interface import image_ids_shape
from tokenizer_bridge.processing_unified import UnifiedProcessor
from tokenizer_bridge.vocab.bridge import bridge_llm, init_image_embeddings_from_codebook
from tokenizer_bridge.vocab.image_vocab import IMAGE_VOCAB_NAME

from .bundle.plain_model import as_plain_model
from .data import shapes
from .data.tasks import TASK_WORDS, TINY_CHAT_TEMPLATE, extra_words
from .generation.inference import DEFAULT_IMAGE_SIZE_KEY
from .text_tokenizers import build_word_tokenizer
from .training.recipe import image_vocab_recipe

# model.image_init: the image tokens' input embeddings start as the mean of the text rows (the bridge's default), or
# from the visual tokenizer's code vectors through a random projection (tokenizer_bridge.vocab.bridge.codebook_embeddings)
IMAGE_INITS = ("mean", "codebook")
DEFAULT_LLM = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False)



def shapes_vocabulary(tasks: Optional[dict] = None) -> list[str]:
    """Every word the shapes captions and the templates of the mixture's tasks use."""
    words = [*TASK_WORDS, "a", "at", "the", "top", "bottom", "left", "right"]
    return words + list(shapes.COLOURS) + list(shapes.SHAPES) + extra_words(tasks or {})



def build_text_model(model_section: dict, words: Optional[list[str]] = None):
    """(tokenizer, causal LM) from ``model.base`` (a path) or a Llama built from ``model.config`` with a word-level
    tokenizer over ``words`` (default: the shapes vocabulary) and a tiny chat template."""
    unknown = sorted(set(model_section) - {"base", "config", "gguf_file", "image_vocab", "image_init"})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in the llm recipe's model section (base, config, gguf_file, "
                         "image_vocab, image_init)")
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



def build_processor(tokenizer, visual_tokenizer: VisualTokenizer, image_size: int, vocab: ImageVocab) -> UnifiedProcessor:
    image_processor = VisualTokenizerImageProcessor(
        size=image_size, resize_mode="crop", size_divisor=visual_tokenizer.config.downsample
    )
    return UnifiedProcessor(image_processor, tokenizer, vocab, visual_tokenizer=visual_tokenizer)



def bridge(model_section: dict, visual_tokenizer: VisualTokenizer, image_size: int, words: Optional[list[str]] = None):
    """Build the text model and bridge it with the layout ``model.image_vocab`` chooses, completed from the visual
    tokenizer (:meth:`~mllm.training.recipe.ImageVocabRecipe.image_layout`): returns (model, processor)."""
    base = model_section.get("base")
    if base and os.path.isfile(os.path.join(base, IMAGE_VOCAB_NAME)):
        return continue_bundle(model_section, visual_tokenizer)
    recipe = image_vocab_recipe(model_section)
    image_init = model_section.get("image_init", "mean")
    if image_init not in IMAGE_INITS:  # before a pretrained LLM is loaded
        raise ValueError(f"model.image_init must be one of {IMAGE_INITS}, got {image_init!r}")
    tokenizer, model = build_text_model(model_section, words)
    token_ids = None
    if recipe.unified_codebook is not None:
        token_ids = unified_token_ids(recipe.unified_codebook, tokenizer, model, visual_tokenizer.codebook_size)
    layout = recipe.image_layout(visual_tokenizer, image_size, token_ids)
    vocab = bridge_llm(model, tokenizer, layout, tokenizer_fingerprint=visual_tokenizer.fingerprint())
    if image_init == "codebook":
        init_image_embeddings_from_codebook(model, vocab, visual_tokenizer)
    if layout.variable_size:  # what inference generates unless told otherwise: the data.image_size grid
        vocab.extra[DEFAULT_IMAGE_SIZE_KEY] = list(image_ids_shape(visual_tokenizer, image_size)[:2])
    return model, build_processor(tokenizer, visual_tokenizer, image_size, vocab)



def continue_bundle(model_section: dict, visual_tokenizer):
    """``model.base`` is a bundle that is already bridged (e.g. the result of pre-training, for instruction tuning):
    train it further with its own image vocabulary and processor. The recipe's visual tokenizer must be the one the
    bundle's ids were made with (its fingerprint is checked), and the recipe cannot lay the image tokens out anew."""
    base = model_section["base"]
    if model_section.get("image_init", "mean") != "mean":
        raise ValueError(f"model.base {base} is already bridged (it holds {IMAGE_VOCAB_NAME}): its image embeddings "
                         "are trained, so remove model.image_init from the recipe")
    if model_section.get("image_vocab"):
        raise ValueError(f"model.base {base} is already bridged (it holds {IMAGE_VOCAB_NAME}): its image tokens keep "
                         "their layout, so remove model.image_vocab from the recipe")
    try:
        processor = UnifiedProcessor.from_pretrained(base, visual_tokenizer=visual_tokenizer)
    except ValueError as error:
        raise ValueError(f"model.base {base} cannot continue with the recipe's visual tokenizer: {error}") from None
    model = AutoModelForCausalLM.from_pretrained(base)
    if model.get_input_embeddings().weight.shape[0] < processor.image_vocab.max_token_id + 1:
        raise ValueError(f"model.base {base}: the LLM's embeddings are smaller than its image vocabulary")
    return model, processor


def unified_token_ids(choice, tokenizer, model, codebook_size: int) -> list[int]:
    """The existing text tokens that become the image ids of a unified codebook: ``"first"`` (the first K text tokens
    that are not special tokens of the tokenizer or the model) or an explicit list of K ids."""
    from tokenizer_bridge.quantizers.unicode import llm_special_ids, select_token_ids

    strategy = "first" if choice == "first" else list(choice)
    ids = select_token_ids(tokenizer, codebook_size, strategy, exclude=llm_special_ids(model.config))
    return ids.tolist()
