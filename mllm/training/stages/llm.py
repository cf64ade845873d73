"""The ``llm`` training stage: bridge a causal LM to a trained visual tokenizer and train on the task mixture.

The image tokens are laid out as ``model.image_vocab`` says (:class:`~mllm.training.recipe.ImageVocabRecipe`: fixed or
variable-size grid, sequence, level order and id ranges, factorized sub-tokens, unified codebook); residual tokenizers
always get one level per residual level (:meth:`~mllm.training.recipe.ImageVocabRecipe.image_layout`).

Images are encoded once into ``image_ids`` (the visual tokenizer is not needed again while training), or come
pre-tokenized (``data.dataset: pretokenized``, ``data.path: DIR`` written by ``vtok pretokenize``; the dataset's
visual-tokenizer fingerprint is checked against the recipe's tokenizer before the model is built). On captions
every task of :mod:`mllm.data.tasks` can be in the mixture (interleaved documents and conversations are synthesized
from a few captioned images); decompression needs compressed ids (encoded once here for shapes,
``vtok pretokenize --compressed`` for pre-tokenized data). Pre-tokenized documents train ``interleaved`` (loss on
everything after each document's prefix) and pre-tokenized conversations ``instruction`` (loss on the assistant
turns), one record per example. Each step builds its batch from ``(seed, step)`` through
the processor, so resumed runs see the same batches. With ``data.packing`` each process packs its share of the
step's samples into rows (:mod:`mllm.data.packing`); with ``train.*_loss_weight`` / ``train.z_loss_weight`` the loss is
:func:`mllm.training.losses.lm_loss`. With ``train.eval_every`` the last ``data.eval_size`` records are held out for
the evaluation of :mod:`mllm.training.stages.llm_eval` (a loss and generated samples for fixed prompts).
"""

from __future__ import annotations

import random

from tokenizer_bridge.interface import load_visual_tokenizer

from ...bundle.bundle import save_bundle
from ...data.conversation import encode_examples, pad
from ...data.packing import PackingCollator
from ...data.records import RECORD_SOURCES, uses
from ...data.tasks import choose_task, make_example, records_needed
from ...model import bridge, shapes_vocabulary
from ..losses import MODEL_INPUTS, needs_lm_loss, target_weight, weighted_loss
from ..recipe import Recipe
from ..stage import Stage, shard_indices, step_indices
from .llm_eval import heldout_size, llm_evaluation


def build_llm_stage(recipe: Recipe) -> Stage:
    if recipe.model.get("depth_head"):  # true, or {depth_layers: 2, depth_heads: 4}: one position, all levels
        from .depth_head import build_depth_head_stage

        return build_depth_head_stage(recipe)
    data, cfg = recipe.data, recipe.train
    if data.dataset not in RECORD_SOURCES:
        raise ValueError(f"the llm stage trains on datasets {sorted(RECORD_SOURCES)}, got {data.dataset!r}")
    visual_tokenizer = load_visual_tokenizer(recipe.visual_tokenizer).eval()  # grid, slot or wrapped pretrained VQ
    records = RECORD_SOURCES[data.dataset](recipe, visual_tokenizer)  # fingerprint checked before any model is built
    words = shapes_vocabulary(data.tasks) + (records.texts if data.dataset != "shapes" else [])
    model, processor = bridge(recipe.model, visual_tokenizer, data.image_size, words)
    if uses(data.tasks, "instruction") and not getattr(processor.tokenizer, "chat_template", None):
        raise ValueError("the mixture has the instruction task but the LLM's tokenizer has no chat template")
    collate = batch_collator(data, processor)
    weighted = needs_lm_loss(cfg)
    num_train = len(records) - heldout_size(len(records), data.eval_size, cfg.eval_every)  # the tail is held out

    def batch_for_step(step: int, rank: int, world: int) -> dict:
        idx = shard_indices(step_indices(step, cfg.batch_size, num_train, cfg.seed), rank, world)
        rng = random.Random(cfg.seed * 7_919 + step)
        examples = []
        for i in idx.tolist():
            task = choose_task(data.tasks, rng)
            chosen = [i] + [rng.randrange(num_train) for _ in range(records_needed(task, records.kind) - 1)]
            examples.append(make_example(task, [records[j] for j in chosen], data.prompt_dropout, rng,
                                         processor.tokenizer))
        return collate(encode_examples(processor, examples, return_loss_masks=weighted or data.packing))

    def loss_fn(model, batch, normalizer=None):
        if weighted or normalizer is not None:  # the loop always gives the step's weight sum (exact accumulation)
            loss, metrics = weighted_loss(model, batch, cfg, normalizer)
            return loss, metrics if weighted else {}
        return model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}).loss, {}

    def weight(batch):
        return target_weight(batch, cfg)

    evaluate = None
    if num_train < len(records):
        evaluate = llm_evaluation(records, num_train, data, cfg, processor, collate, loss_fn, weighted or data.packing)
    if recipe.lora.enabled:
        from ...lora import save_lora_bundle, wrap_lora

        model = wrap_lora(model, recipe.lora, processor.image_vocab)  # saved as merged bundle + adapter/
        return Stage(model, batch_for_step, loss_fn, lambda m, path: save_lora_bundle(path, m, processor),
                     evaluate_fn=evaluate, loss_weight=weight)
    return Stage(model, batch_for_step, loss_fn, lambda m, path: save_bundle(path, m, processor), evaluate_fn=evaluate,
                 loss_weight=weight)


def batch_collator(data, processor):
    """Unpadded samples -> a batch: packed rows (``data.packing``) or padded to the longest."""
    if not data.packing:
        return lambda samples: pad(processor, samples)
    tokenizer = processor.tokenizer
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    return PackingCollator(max_tokens=data.max_tokens, strategy=data.pack_strategy, buffer_size=data.pack_buffer,
                           pad_token_id=pad_id)


llm_stage = build_llm_stage
