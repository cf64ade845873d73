"""The ``llm`` training stage: bridge a causal LM to a trained visual tokenizer and train on the task mixture.

Images are encoded once into ``image_ids`` (the visual tokenizer is not needed again while training); each step
builds its batch from ``(seed, step)`` through the processor, so resumed runs see the same batches.
"""

from __future__ import annotations

import random

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tokenizer_bridge import ImageVocab, VisualTokenizer
from tokenizer_bridge.bridge import bridge_llm
from tokenizer_bridge.image_processing_visual_tokenizer import VisualTokenizerImageProcessor
from tokenizer_bridge.processing_unified import UnifiedProcessor

from .bundle import save_bundle
from .data import shapes
from .data.tasks import TASK_WORDS, make_example, choose_task
from .recipe import Recipe
from .stages import images_to_pixels
from .text_tokenizers import build_word_tokenizer
from .train import Stage, shard_indices, step_indices

DEFAULT_LLM = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False)


def shapes_vocabulary() -> list[str]:
    """Every word the shapes captions and task templates use."""
    words = [*TASK_WORDS, "a", "at", "the", "top", "bottom", "left", "right"]
    return words + list(shapes.COLOURS) + list(shapes.SHAPES)


def build_text_model(model_section: dict):
    """(tokenizer, causal LM) from ``model.base`` (a path) or a Llama built from ``model.config``."""
    unknown = sorted(set(model_section) - {"base", "config", "gguf_file"})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in the llm recipe's model section (base, config, gguf_file)")
    base = model_section.get("base")
    if base:
        extra = {"gguf_file": model_section["gguf_file"]} if model_section.get("gguf_file") else {}
        tokenizer = AutoTokenizer.from_pretrained(base, **extra)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer, AutoModelForCausalLM.from_pretrained(base, **extra)
    tokenizer = build_word_tokenizer(shapes_vocabulary())
    config = LlamaConfig(**{**DEFAULT_LLM, **model_section.get("config", {})}, vocab_size=len(tokenizer),
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return tokenizer, LlamaForCausalLM(config)


def build_processor(tokenizer, visual_tokenizer: VisualTokenizer, image_size: int, vocab: ImageVocab) -> UnifiedProcessor:
    image_processor = VisualTokenizerImageProcessor(
        size=image_size, resize_mode="crop", size_divisor=visual_tokenizer.config.downsample
    )
    return UnifiedProcessor(image_processor, tokenizer, vocab, visual_tokenizer=visual_tokenizer)


def bridge(model_section: dict, visual_tokenizer: VisualTokenizer, image_size: int):
    """Build the text model and bridge it: returns (model, processor)."""
    tokenizer, model = build_text_model(model_section)
    grid = visual_tokenizer.config.grid_size(image_size, image_size)
    vocab = bridge_llm(model, tokenizer, visual_tokenizer.codebook_size, grid_size=grid,
                       tokenizer_fingerprint=visual_tokenizer.fingerprint())
    return model, build_processor(tokenizer, visual_tokenizer, image_size, vocab)


@torch.no_grad()
def encode_images(visual_tokenizer: VisualTokenizer, images, batch_size: int = 256) -> torch.LongTensor:
    """PIL images -> image ids ``(n, h, w)``, batched, with a progress bar."""
    ids = []
    for start in tqdm(range(0, len(images), batch_size), desc="encode images", mininterval=2):
        ids.append(visual_tokenizer.encode(images_to_pixels(images[start : start + batch_size])))
    return torch.cat(ids)


def shapes_records(recipe: Recipe, visual_tokenizer: VisualTokenizer) -> tuple[list[str], torch.LongTensor]:
    """Training captions and their image ids from the shapes train split."""
    data = recipe.data
    split = shapes.make_splits(seed=data.seed)
    per_spec = max(1, -(-data.num_train // len(split.train)))
    dataset = shapes.ShapesDataset(split.train, size=data.image_size, samples_per_spec=per_spec, seed=data.seed + 1)
    items = [dataset[i] for i in range(min(data.num_train, len(dataset)))]
    return [it["caption"] for it in items], encode_images(visual_tokenizer, [it["image"] for it in items])


def build_llm_stage(recipe: Recipe) -> Stage:
    if recipe.data.dataset != "shapes":
        raise ValueError(f"the llm stage supports dataset 'shapes' for now, got {recipe.data.dataset!r}")
    visual_tokenizer = VisualTokenizer.from_pretrained(recipe.visual_tokenizer).eval()
    model, processor = bridge(recipe.model, visual_tokenizer, recipe.data.image_size)
    captions, image_ids = shapes_records(recipe, visual_tokenizer)
    data, cfg = recipe.data, recipe.train

    def batch_for_step(step: int, rank: int, world: int) -> dict:
        idx = shard_indices(step_indices(step, cfg.batch_size, len(captions), cfg.seed), rank, world)
        rng = random.Random(cfg.seed * 7_919 + step)
        examples = [make_example(choose_task(data.tasks, rng), captions[i], data.prompt_dropout, rng) for i in idx]
        ids = [[image_ids[i]] if ex.num_images else [] for i, ex in zip(idx.tolist(), examples)]
        batch = processor(text=[e.target for e in examples], prompt=[e.prompt for e in examples], image_ids=ids)
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    def loss_fn(model, batch):
        return model(**batch).loss, {}

    return Stage(model, batch_for_step, loss_fn, lambda m, path: save_bundle(path, m, processor))
