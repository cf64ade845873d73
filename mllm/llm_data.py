"""The ``llm`` training stage: bridge a causal LM to a trained visual tokenizer and train on the task mixture.

The image tokens are laid out as ``model.image_vocab`` says (:class:`~mllm.recipe.ImageVocabRecipe`: fixed or
variable-size grid, sequence, level order and id ranges, factorized sub-tokens, unified codebook); residual tokenizers
always get one level per residual level (:func:`layout_options`).

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

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tokenizer_bridge import ImageVocab, VisualTokenizer
from tokenizer_bridge.bridge import bridge_llm
from tokenizer_bridge.image_processing_visual_tokenizer import VisualTokenizerImageProcessor
from tokenizer_bridge.pretrained import image_ids_shape, image_vocab_layout, load_visual_tokenizer
from tokenizer_bridge.processing_unified import UnifiedProcessor

from .bundle import save_bundle
from .data import shapes
from .data.conversation import encode_examples, pad
from .data.tasks import (TASK_WORDS, TINY_CHAT_TEMPLATE, Record, choose_task, compress_pixels, extra_words,
                         make_example, records_needed)
from .losses import lm_loss
from .packing import PackingCollator
from .pretokenize import load_pretokenized
from .inference import DEFAULT_IMAGE_SIZE_KEY
from .recipe import ImageVocabRecipe, Recipe, TrainRecipe, image_vocab_recipe
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
    :func:`~tokenizer_bridge.pretrained.image_vocab_layout`), the others a grid of the ``image_size`` id map; residual tokenizers one level per residual level, in separate id
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


class ArrowRecords:
    """The training records of a pre-tokenized ``datasets`` dataset, read one record at a time.

    ``load_from_disk`` memory-maps the dataset's Arrow files, so ids are read from disk (the page cache) when a record
    is asked for and never gathered into one tensor: a dataset of millions of images trains with the memory of one
    batch. Records are the ones the columns read whole would give: the caption (a string), ``image_ids`` and
    ``compressed_ids`` as int64 tensors (the integer type of the ``numpy`` format of ``datasets``) of the stored shape
    (``(h, w)``, ``(N,)`` or ``(h, w, L)``). ``captions`` (the whole caption column as a list, e.g. for a word-level
    vocabulary) is read on first use.

    Args:
        dataset (`datasets.Dataset`):
            A dataset with ``caption`` and ``image_ids`` columns (and ``compressed_ids`` if ``compressed``).
        compressed (`bool`, *optional*, defaults to `False`):
            Also read ``compressed_ids`` (the decompression task's prompt).
    """

    def __init__(self, dataset, compressed: bool = False):
        columns = ["caption", "image_ids"] + (["compressed_ids"] if compressed else [])
        missing = sorted(set(columns) - set(dataset.column_names))
        if missing:
            raise ValueError(f"the pre-tokenized dataset has no column(s) {missing} (it has {dataset.column_names})")
        self.dataset = dataset.select_columns(columns).with_format("numpy")
        self.compressed = compressed
        self._captions: Optional[list[str]] = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Record:
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} is out of range for {len(self)} records")
        row = self.dataset[int(i) % len(self)]
        compressed = torch.from_numpy(np.array(row["compressed_ids"])) if self.compressed else None
        return Record(str(row["caption"]), torch.from_numpy(np.array(row["image_ids"])), compressed)

    @property
    def captions(self) -> list[str]:
        if self._captions is None:
            self._captions = [str(c) for c in self.dataset.with_format(None)["caption"]]
        return self._captions


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


def pretokenized_records(recipe: Recipe, visual_tokenizer: VisualTokenizer) -> ArrowRecords:
    """The first ``data.num_train`` records of a ``vtok pretokenize`` dataset, refused unless its ids were made by
    ``visual_tokenizer`` and fit ``data.image_size``; read lazily from the memory-mapped dataset (see
    :class:`ArrowRecords`)."""
    data = recipe.data
    dataset = load_pretokenized(data.path, visual_tokenizer.fingerprint())
    if not len(dataset):
        raise ValueError(f"the pre-tokenized dataset {data.path} has no records")
    grid = image_ids_shape(visual_tokenizer, data.image_size)  # (h, w[, L]) or, for slot tokenizers, (N[, L])
    found = tuple(torch.as_tensor(dataset[0]["image_ids"]).shape)
    if found != grid:
        raise ValueError(f"the pre-tokenized ids in {data.path} are {found} grids but data.image_size="
                         f"{data.image_size} gives {grid}: set data.image_size to the size vtok pretokenize used")
    if uses(data.tasks, "decompression") and "compressed_ids" not in dataset.column_names:
        raise ValueError(f"the mixture has decompression but {data.path} has no compressed_ids: pre-tokenize it with "
                         "--compressed")
    n = min(data.num_train, len(dataset)) if data.num_train > 0 else len(dataset)
    print(f"training on {n} of {len(dataset)} pre-tokenized records from {data.path}", file=sys.stderr)
    subset = dataset.select(range(n)) if n < len(dataset) else dataset
    return ArrowRecords(subset, compressed="compressed_ids" in dataset.column_names)


RECORD_SOURCES = {"shapes": shapes_records, "pretokenized": pretokenized_records}


def build_llm_stage(recipe: Recipe) -> Stage:
    if recipe.model.get("depth_head"):  # true, or {depth_layers: 2, depth_heads: 4}: one position, all levels
        from .depth_head import build_depth_head_stage

        return build_depth_head_stage(recipe)
    data, cfg = recipe.data, recipe.train
    if data.dataset not in RECORD_SOURCES:
        raise ValueError(f"the llm stage trains on datasets {sorted(RECORD_SOURCES)}, got {data.dataset!r}")
    visual_tokenizer = load_visual_tokenizer(recipe.visual_tokenizer).eval()  # grid, slot or wrapped pretrained VQ
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
