"""Stage builders: turn a recipe into the model, the per-step batches, the loss and the saver of one training stage.

- ``tokenizer``: trains a :class:`~tokenizer_bridge.VisualTokenizer` on renders of the shapes data mixed with random
  crops of the bundled photographs.
- ``llm``: bridges a causal LM (built from a config, or pretrained from a path) to a trained visual tokenizer, encodes
  the training images once into ``image_ids``, and trains on the task mixture (captioning + text-to-image); saves
  the whole bundle.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel

from tokenizer_bridge import VisualTokenizerConfig
from tokenizer_bridge.image_processing_visual_tokenizer import to_pixel_values

from ...data import photos, shapes
from ..recipe import Recipe
from ..stage import Stage, shard_indices, step_indices


def tokenizer_training_pixels(recipe: Recipe) -> torch.Tensor:
    """The tokenizer stage's training set: shapes renders + photo crops, ``(num_train, 3, S, S)``."""
    data = recipe.data
    n_photos = int(round(data.num_train * data.photo_fraction))
    split = shapes.make_splits(seed=data.seed)
    n_shapes = data.num_train - n_photos
    dataset = shapes.ShapesDataset(split.train, size=data.image_size, seed=data.seed,
                                   samples_per_spec=max(1, -(-n_shapes // len(split.train))))
    images = [dataset[i]["image"] for i in range(n_shapes)]
    if n_photos:
        train_names, _ = photos.photo_splits()
        images += photos.random_crops(train_names, data.image_size, n_photos, seed=data.seed, scale=(0.1, 0.6))
    return to_pixel_values(images)


def build_tokenizer_model(model_section: dict, image_size: int):
    """A visual tokenizer from a recipe's model section; ``model_type: slot_tokenizer`` picks the slot tokenizer."""
    section = dict(model_section)
    model_type = section.pop("model_type", VisualTokenizerConfig.model_type)
    return AutoModel.from_config(AutoConfig.for_model(model_type, image_size=image_size, **section))


def tokenizer_stage(recipe: Recipe) -> Stage:
    model = build_tokenizer_model(recipe.model, recipe.data.image_size)
    pixels = tokenizer_training_pixels(recipe)
    batch_size, seed = recipe.train.batch_size, recipe.train.seed

    def batch_for_step(step: int, rank: int, world: int) -> dict:
        idx = shard_indices(step_indices(step, batch_size, len(pixels), seed), rank, world)
        return {"pixel_values": pixels[idx]}

    def loss_fn(model, batch):
        out = model(batch["pixel_values"])
        # some metrics are absent by design (psnr with a diffusion decoder, perplexity during a quantizer warm-up)
        keys = ("psnr", "perplexity", "codebook_usage", "num_slots")
        return out.loss, {k: out.metrics[k] for k in keys if k in out.metrics}

    return Stage(model, batch_for_step, loss_fn, lambda m, path: m.save_pretrained(path))


