"""The ``llm`` stage with ``model.depth_head``: a text model plus :class:`~mllm.generation.depth_head.DepthHeadModel`
learns captioning and text-to-image with every residual level of an image position predicted from one hidden state."""

from __future__ import annotations

import json
import os
import random

import torch

from ...data.tasks import choose_task, make_example
from ...generation.depth_head import (
    BOI,
    DEPTH_TASKS,
    EOI,
    SPAN_NAME,
    DepthHeadModel,
    DepthSamples,
)
from ..recipe import Recipe
from ..stage import Stage, shard_indices, step_indices


def build_depth_head_stage(recipe: Recipe) -> Stage:
    """The ``llm`` stage with ``model.depth_head`` set (``true``, or a dict of :class:`DepthHeadModel` keyword
    arguments such as ``depth_layers``): the recipe's text model learns text-to-image and captioning with every
    residual level of the visual tokenizer's ids in one position (a single-level tokenizer gives ``L = 1``)."""
    from tokenizer_bridge import VisualTokenizer

    from ...data.records import RECORD_SOURCES
    from ...model import build_text_model, shapes_vocabulary

    data, cfg = recipe.data, recipe.train
    unsupported = sorted(t for t, w in data.tasks.items() if w > 0 and t not in DEPTH_TASKS)
    if unsupported or recipe.lora.enabled:
        raise ValueError(f"model.depth_head trains the tasks {DEPTH_TASKS} without LoRA; got tasks {unsupported}"
                         f"{' and lora.enabled' if recipe.lora.enabled else ''}")
    options = recipe.model.get("depth_head")
    options = dict(options) if isinstance(options, dict) else {}
    visual_tokenizer = VisualTokenizer.from_pretrained(recipe.visual_tokenizer).eval()
    records = RECORD_SOURCES[data.dataset](recipe, visual_tokenizer)

    def image_ids(i: int) -> torch.Tensor:  # record i's ids as (N, L); records may be read lazily from disk
        ids = records[i].image_ids.flatten(0, 1)  # (h*w,) or (h*w, L)
        return ids[:, None] if ids.dim() == 1 else ids

    levels = image_ids(0).shape[-1]
    words = shapes_vocabulary(data.tasks) + (records.captions if data.dataset != "shapes" else [])
    tokenizer, llm = build_text_model({k: v for k, v in recipe.model.items() if k != "depth_head"}, words)
    tokenizer.add_tokens([BOI, EOI], special_tokens=True)
    llm.resize_token_embeddings(len(tokenizer))
    model = DepthHeadModel(llm, levels, visual_tokenizer.codebook_size, **options)
    samples = DepthSamples(tokenizer, levels)
    span = {"boi_token_id": samples.boi, "eoi_token_id": samples.eoi, "tokenizer_fingerprint":
            visual_tokenizer.fingerprint(), "grid_size": list(visual_tokenizer.config.grid_size(
                data.image_size, data.image_size))}

    def batch_for_step(step: int, rank: int, world: int) -> dict:
        idx = shard_indices(step_indices(step, cfg.batch_size, len(records), cfg.seed), rank, world)
        rng = random.Random(cfg.seed * 7_919 + step)
        return samples.collate([samples.sample(make_example(choose_task(data.tasks, rng), records.captions[i],
                                                            data.prompt_dropout, rng), image_ids(i))
                                for i in idx.tolist()])

    def loss_fn(model, batch):
        out = model(**batch)
        metrics = {"text_loss": float(out.text_loss)}
        if out.image_loss is not None:
            metrics["image_loss"] = float(out.image_loss)
        return out.loss, metrics

    def save(model: DepthHeadModel, path: str) -> None:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        with open(os.path.join(path, SPAN_NAME), "w") as f:
            json.dump(span, f, indent=2)

    return Stage(model, batch_for_step, loss_fn, save)
