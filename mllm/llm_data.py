"""The ``llm`` training stage: bridge a causal LM to a trained visual tokenizer and train on the task mixture.

Images are encoded once into ``image_ids`` (the visual tokenizer is not needed again while training), or come
pre-tokenized (``data.dataset: pretokenized``, ``data.path: DIR`` written by ``vtok pretokenize``; the dataset's
visual-tokenizer fingerprint is checked against the recipe's tokenizer before the model is built). Every task of
:mod:`mllm.data.tasks` can be in the mixture; decompression needs compressed ids (encoded once here for shapes,
``vtok pretokenize --compressed`` for pre-tokenized data). Each step builds its batch from ``(seed, step)`` through
the processor, so resumed runs see the same batches. With ``data.packing`` each process packs its share of the
step's samples into rows (:mod:`mllm.packing`); with ``train.*_loss_weight`` / ``train.z_loss_weight`` the loss is
:func:`mllm.losses.lm_loss`.
"""

from __future__ import annotations

import random
import sys
from typing import Optional

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tokenizer_bridge import ImageVocab, VisualTokenizer
from tokenizer_bridge.bridge import bridge_llm
from tokenizer_bridge.image_processing_visual_tokenizer import VisualTokenizerImageProcessor
from tokenizer_bridge.processing_unified import UnifiedProcessor

from .bundle import save_bundle
from .data import shapes
from .data.conversation import encode_examples, pad
from .data.tasks import (TASK_WORDS, TINY_CHAT_TEMPLATE, Record, choose_task, compress_pixels, extra_words,
                         make_example, records_needed)
from .losses import lm_loss
from .packing import PackingCollator
from .pretokenize import load_pretokenized
from .recipe import Recipe, TrainRecipe
from .stages import images_to_pixels
from .text_tokenizers import build_word_tokenizer
from .train import Stage, shard_indices, step_indices

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "use_cache", "labels")
DEFAULT_LLM = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False)


def shapes_vocabulary(tasks: Optional[dict] = None) -> list[str]:
    """Every word the shapes captions and the templates of the mixture's tasks use."""
    words = [*TASK_WORDS, "a", "at", "the", "top", "bottom", "left", "right"]
    return words + list(shapes.COLOURS) + list(shapes.SHAPES) + extra_words(tasks or {})


def build_text_model(model_section: dict, words: Optional[list[str]] = None):
    """(tokenizer, causal LM) from ``model.base`` (a path) or a Llama built from ``model.config`` with a word-level
    tokenizer over ``words`` (default: the shapes vocabulary) and a tiny chat template."""
    unknown = sorted(set(model_section) - {"base", "config", "gguf_file"})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in the llm recipe's model section (base, config, gguf_file)")
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
    """Build the text model and bridge it: returns (model, processor)."""
    tokenizer, model = build_text_model(model_section, words)
    grid = visual_tokenizer.config.grid_size(image_size, image_size)
    vocab = bridge_llm(model, tokenizer, visual_tokenizer.codebook_size, grid_size=grid,
                       tokenizer_fingerprint=visual_tokenizer.fingerprint())
    return model, build_processor(tokenizer, visual_tokenizer, image_size, vocab)


@torch.no_grad()
def encode_images(visual_tokenizer: VisualTokenizer, images, batch_size: int = 256,
                  compressed: bool = False) -> torch.LongTensor:
    """PIL images -> image ids ``(n, h, w)``, batched, with a progress bar; ``compressed`` encodes the images'
    :func:`~mllm.data.tasks.compress_pixels` form instead (the decompression task's prompt)."""
    ids = []
    for start in tqdm(range(0, len(images), batch_size), desc="encode images", mininterval=2):
        pixels = images_to_pixels(images[start : start + batch_size])
        ids.append(visual_tokenizer.encode(compress_pixels(pixels) if compressed else pixels))
    return torch.cat(ids)


class Records:
    """The training records as columns: captions, image ids ``(n, h, w)`` and optional compressed ids."""

    def __init__(self, captions: list[str], image_ids: torch.Tensor, compressed_ids: Optional[torch.Tensor] = None):
        self.captions, self.image_ids, self.compressed_ids = captions, image_ids, compressed_ids

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> Record:
        compressed = self.compressed_ids[i] if self.compressed_ids is not None else None
        return Record(self.captions[i], self.image_ids[i], compressed)


def uses(tasks: dict, name: str) -> bool:
    return tasks.get(name, 0) > 0


def shapes_records(recipe: Recipe, visual_tokenizer: VisualTokenizer) -> Records:
    """Training captions and their image ids (and compressed ids if the mixture decompresses) from shapes."""
    data = recipe.data
    split = shapes.make_splits(seed=data.seed)
    per_spec = max(1, -(-data.num_train // len(split.train)))
    dataset = shapes.ShapesDataset(split.train, size=data.image_size, samples_per_spec=per_spec, seed=data.seed + 1)
    items = [dataset[i] for i in range(min(data.num_train, len(dataset)))]
    images = [it["image"] for it in items]
    compressed = encode_images(visual_tokenizer, images, compressed=True) if uses(data.tasks, "decompression") else None
    return Records([it["caption"] for it in items], encode_images(visual_tokenizer, images), compressed)


def pretokenized_records(recipe: Recipe, visual_tokenizer: VisualTokenizer) -> Records:
    """The first ``data.num_train`` records of a ``vtok pretokenize`` dataset, refused unless its ids were made by
    ``visual_tokenizer`` and fit ``data.image_size``."""
    data = recipe.data
    dataset = load_pretokenized(data.path, visual_tokenizer.fingerprint())
    if not len(dataset):
        raise ValueError(f"the pre-tokenized dataset {data.path} has no records")
    grid = tuple(visual_tokenizer.config.grid_size(data.image_size, data.image_size))
    found = tuple(torch.as_tensor(dataset[0]["image_ids"]).shape)
    if found != grid:
        raise ValueError(f"the pre-tokenized ids in {data.path} are {found} grids but data.image_size="
                         f"{data.image_size} gives {grid}: set data.image_size to the size vtok pretokenize used")
    if uses(data.tasks, "decompression") and "compressed_ids" not in dataset.column_names:
        raise ValueError(f"the mixture has decompression but {data.path} has no compressed_ids: pre-tokenize it with "
                         "--compressed")
    n = min(data.num_train, len(dataset)) if data.num_train > 0 else len(dataset)
    print(f"training on {n} of {len(dataset)} pre-tokenized records from {data.path}", file=sys.stderr)
    columns = dataset.select(range(n)).with_format("numpy")[:]
    compressed = torch.as_tensor(columns["compressed_ids"]) if "compressed_ids" in columns else None
    return Records(list(columns["caption"]), torch.as_tensor(columns["image_ids"]), compressed)


RECORD_SOURCES = {"shapes": shapes_records, "pretokenized": pretokenized_records}


def build_llm_stage(recipe: Recipe) -> Stage:
    if recipe.model.get("depth_head"):  # true, or {depth_layers: 2, depth_heads: 4}: one position, all levels
        from .depth_head import build_depth_head_stage

        return build_depth_head_stage(recipe)
    data, cfg = recipe.data, recipe.train
    if data.dataset not in RECORD_SOURCES:
        raise ValueError(f"the llm stage trains on datasets {sorted(RECORD_SOURCES)}, got {data.dataset!r}")
    visual_tokenizer = VisualTokenizer.from_pretrained(recipe.visual_tokenizer).eval()
    records = RECORD_SOURCES[data.dataset](recipe, visual_tokenizer)  # fingerprint checked before any model is built
    words = shapes_vocabulary(data.tasks) + (records.captions if data.dataset != "shapes" else [])
    model, processor = bridge(recipe.model, visual_tokenizer, data.image_size, words)
    if uses(data.tasks, "instruction") and not getattr(processor.tokenizer, "chat_template", None):
        raise ValueError("the mixture has the instruction task but the LLM's tokenizer has no chat template")
    collate = batch_collator(data, processor)
    weighted = needs_lm_loss(cfg)

    def batch_for_step(step: int, rank: int, world: int) -> dict:
        idx = shard_indices(step_indices(step, cfg.batch_size, len(records), cfg.seed), rank, world)
        rng = random.Random(cfg.seed * 7_919 + step)
        examples = []
        for i in idx.tolist():
            task = choose_task(data.tasks, rng)
            chosen = [i] + [rng.randrange(len(records)) for _ in range(records_needed(task) - 1)]
            examples.append(make_example(task, [records[j] for j in chosen], data.prompt_dropout, rng,
                                         processor.tokenizer))
        return collate(encode_examples(processor, examples, return_loss_masks=weighted or data.packing))

    def loss_fn(model, batch):
        if weighted:
            return weighted_loss(model, batch, cfg)
        return model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}).loss, {}

    if recipe.lora.enabled:
        from .peft_presets import save_lora_bundle, wrap_lora

        model = wrap_lora(model, recipe.lora, processor.image_vocab)  # saved as merged bundle + adapter/
        return Stage(model, batch_for_step, loss_fn, lambda m, path: save_lora_bundle(path, m, processor))
    return Stage(model, batch_for_step, loss_fn, lambda m, path: save_bundle(path, m, processor))


def needs_lm_loss(cfg: TrainRecipe) -> bool:
    """Whether the recipe's loss differs from the model's own mean cross-entropy."""
    return (cfg.text_loss_weight, cfg.image_loss_weight, cfg.z_loss_weight) != (1.0, 1.0, 0.0)


def batch_collator(data, processor):
    """Unpadded samples -> a batch: packed rows (``data.packing``) or padded to the longest."""
    if not data.packing:
        return lambda samples: pad(processor, samples)
    tokenizer = processor.tokenizer
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    return PackingCollator(max_tokens=data.max_tokens, strategy=data.pack_strategy, buffer_size=data.pack_buffer,
                           pad_token_id=pad_id)


def weighted_loss(model, batch: dict, cfg: TrainRecipe):
    """:func:`mllm.losses.lm_loss` with the recipe's modality weights and z-loss."""
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS and k != "labels"}
    logits = model(**inputs).logits
    return lm_loss(logits, batch["labels"], batch.get("image_loss_mask"), text_weight=cfg.text_loss_weight,
                   image_weight=cfg.image_loss_weight, z_loss_weight=cfg.z_loss_weight)
