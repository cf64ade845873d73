"""Held-out evaluation of the ``llm`` stage (``train.eval_every``): a loss on records never trained on, and a picture
of what the model makes of fixed prompts.

With ``train.eval_every`` set, the last ``data.eval_size`` records of the training source are held out: the batches
of every step draw from the others only. Every evaluation builds the same examples from them (the task of each
held-out record and the extra records a task needs are drawn from a generator seeded by ``train.seed`` and the
record's position, never from the step), so the ``eval_loss`` of successive evaluations can be compared.

The picture, for records of captions: the held-out images (decoded from their ids) labelled with the model's greedy
caption of them when the mixture captions, over the images the model generates (greedy) from their captions when the
mixture has text-to-image. Documents and conversations get the loss only.
"""

from __future__ import annotations

import random
from typing import Callable

import torch

from ...data.conversation import encode_examples
from ...data.records import uses
from ...data.tasks import choose_task, make_example, records_needed

PICTURE_PROMPTS = 4  # held-out records shown in the picture


def heldout_size(num_records: int, eval_size: int, eval_every: int) -> int:
    """How many records the evaluation holds out (0 without ``eval_every``); refuses a split that leaves no
    training record."""
    if not eval_every:
        return 0
    if eval_size < 1:
        raise ValueError(f"train.eval_every={eval_every} needs data.eval_size >= 1 held-out records, got {eval_size}")
    if eval_size >= num_records:
        raise ValueError(f"data.eval_size={eval_size} held-out records leave none of the {num_records} records to "
                         "train on: lower data.eval_size or give more records")
    return eval_size


def heldout_examples(records, first: int, data, seed: int, tokenizer) -> list:
    """The examples of records ``first ..`` (the held-out tail), the same at every evaluation."""
    count = len(records) - first
    examples = []
    for k in range(count):
        rng = random.Random(seed * 104_729 + k)
        task = choose_task(data.tasks, rng)
        chosen = [first + k] + [first + rng.randrange(count) for _ in range(records_needed(task, records.kind) - 1)]
        examples.append(make_example(task, [records[j] for j in chosen], 0.0, rng, tokenizer))
    return examples


def llm_evaluation(records, first: int, data, cfg, processor, collate: Callable, loss_fn: Callable,
                   return_loss_masks: bool) -> Callable:
    """``Stage.evaluate_fn`` of the llm stage: ``model -> ({"loss": ...}, picture or None)``."""
    examples = heldout_examples(records, first, data, cfg.seed, processor.tokenizer)

    @torch.no_grad()
    def evaluate(model):
        total, count = 0.0, 0
        for start in range(0, len(examples), cfg.batch_size):
            chunk = examples[start : start + cfg.batch_size]
            batch = collate(encode_examples(processor, chunk, return_loss_masks=return_loss_masks))
            batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss, _ = loss_fn(model, batch)
            total, count = total + float(loss) * len(chunk), count + len(chunk)
        metrics = {"loss": total / count}
        picture = None
        if records.kind == "captions" and processor.visual_tokenizer is not None:
            picture = sample_picture(model, processor, [records[j] for j in range(first, len(records))], data.tasks)
        return metrics, picture

    return evaluate


def sample_picture(model, processor, heldout: list, tasks: dict):
    """Held-out images with the model's captions, over what it generates from their captions (greedy)."""
    from ...eval.reports import samples_grid
    from ...generation.inference import caption_image_ids, generate_image_ids

    shown = heldout[:PICTURE_PROMPTS]
    captions = [record.caption for record in shown]
    ids = [record.image_ids for record in shown]
    rows = []
    if uses(tasks, "captioning"):
        labels = caption_image_ids(model, processor, torch.stack(ids) if _same_shape(ids) else ids)
        rows.append(("held out: model's caption", processor.image_ids_to_images(ids), labels))
    else:
        rows.append(("held out", processor.image_ids_to_images(ids), captions))
    if uses(tasks, "text_to_image"):
        generated = generate_image_ids(model, processor, captions)
        rows.append(("generated from the caption", processor.image_ids_to_images(list(generated)), captions))
    return samples_grid(rows, tile=96)


def _same_shape(tensors: list) -> bool:
    return all(t.shape == tensors[0].shape for t in tensors)
