"""The ``tokenizer`` stage: trains a :class:`~tokenizer_bridge.VisualTokenizer` (or, with ``model.model_type:
slot_tokenizer``, a slot tokenizer) and saves it with ``save_pretrained``.

Training images: renders of the shapes data mixed with random crops of the bundled photographs (``data.dataset:
shapes``, rendered once into one tensor), or the user's images streamed from an image source (``data.dataset:
images``, :mod:`mllm.data.image_batches`; memory independent of the dataset's size).

Losses beyond the tokenizer's own: the perceptual loss over the backbone at ``perceptual.backbone`` (weighted by
``model.perceptual_weight`` inside the tokenizer's loss) and, with ``adversarial.enabled``, a discriminator trained
against the tokenizer (:class:`~mllm.training.stage.Adversary`; the generator's loss is the tokenizer's plus the
weighted adversarial term of :class:`~tokenizer_bridge.nn.adversarial.AdversarialLoss`).

``data.labels`` trains a label head on the quantized codes (:mod:`tokenizer_bridge.nn.labels`, ``model.label_weight``):
shapes attributes of the renders, or label columns of the user's source (``folder``: an image folder's class folders);
``model.label_classes`` is filled in from them.

``init_from: DIR`` starts from a saved tokenizer (:func:`tokenizer_from`); with ``train.freeze: [encoder, quantizer]``
(:func:`~mllm.training.freeze.freeze_modules`) only the decoder trains and every image keeps its ids, as in the demo's
``recipes/demo_decoder.yaml``.
"""

from __future__ import annotations

import inspect
import logging
import re

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoModel

from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig
from tokenizer_bridge.image_processing_visual_tokenizer import (
    to_pil_images,
    to_pixel_values,
)
from tokenizer_bridge.metrics import psnr
from tokenizer_bridge.modeling_visual_tokenizer import SAVED_ONLY_CONFIG_KEYS
from tokenizer_bridge.nn.adversarial import AdversarialLoss
from tokenizer_bridge.nn.labels import IGNORE
from tokenizer_bridge.nn.discriminator import (
    DISCRIMINATORS,
    build_discriminator,
    check_discriminator_section,
)
from tokenizer_bridge.nn.losses import PerceptualLoss
from tokenizer_bridge.nn.vit import ViTDecoder, tiles_to_footprints

from ...data import photos, shapes
from ...data.image_batches import ImageBatches
from ...data.sources import read_images
from ...eval.reports import samples_grid
from ..recipe import Recipe
from ..stage import Adversary, Stage, shard_indices, step_indices

logger = logging.getLogger(__name__)

METRICS = ("psnr", "perplexity", "codebook_usage", "num_slots")
LABEL_METRIC = "label_accuracy_"  # + the label set's index (tokenizer_bridge.nn.labels)


# the values of each shapes attribute a tokenizer can be trained to carry (data.labels), in label-index order
SHAPE_LABELS = {"colour": tuple(shapes.COLOURS), "shape": shapes.SHAPES, "position": shapes.POSITIONS,
                "background": tuple(shapes.BACKGROUNDS)}


def shape_label_classes(names) -> list:
    """Class counts of the shapes attributes ``names`` (``data.labels``), with a clear error for unknown names."""
    unknown = [name for name in names if name not in SHAPE_LABELS]
    if unknown:
        raise ValueError(f"data.labels {unknown} are not shapes attributes; choose from {sorted(SHAPE_LABELS)}")
    return [len(SHAPE_LABELS[name]) for name in names]


def _shape_items(data, n: int) -> list:
    split = shapes.make_splits(seed=data.seed)
    dataset = shapes.ShapesDataset(split.train, size=data.image_size, seed=data.seed,
                                   samples_per_spec=max(1, -(-n // len(split.train))))
    return [dataset[i] for i in range(n)]


def _shape_labels(data, items: list, n_unlabelled: int) -> torch.Tensor:
    """``(len(items) + n_unlabelled, K)`` label indices of ``data.labels`` for the renders, then -1 rows (photos)."""
    shape_label_classes(data.labels)  # unknown names: a clear error
    rows = [[SHAPE_LABELS[name].index(getattr(item["spec"], name)) for name in data.labels] for item in items]
    labels = torch.full((len(items) + n_unlabelled, len(data.labels)), IGNORE, dtype=torch.long)
    if rows:
        labels[:len(rows)] = torch.tensor(rows)
    return labels


def _photo_crops(data, n: int, size: int) -> list:
    if not n:
        return []
    train_names, _ = photos.photo_splits()
    return photos.random_crops(train_names, size, n, seed=data.seed, scale=tuple(data.photo_crop_scale))


def _photo_count(data) -> int:
    return int(round(data.num_train * data.photo_fraction))


def tokenizer_training_pixels(recipe: Recipe) -> torch.Tensor:
    """The tokenizer stage's training set: shapes renders + photo crops, ``(num_train, 3, S, S)``."""
    return tokenizer_training_set(recipe)[0]


def tokenizer_training_set(recipe: Recipe) -> tuple:
    """``(pixels (num_train, 3, S, S), labels (num_train, K) or None)``: shapes renders + photo crops, and with
    ``data.labels`` the renders' attribute indices (-1 for the photos)."""
    data = recipe.data
    n_photos = _photo_count(data)
    items = _shape_items(data, data.num_train - n_photos)
    pixels = to_pixel_values([item["image"] for item in items] + _photo_crops(data, n_photos, data.image_size))
    return pixels, (_shape_labels(data, items, n_photos) if data.labels else None)


def build_tokenizer_model(model_section: dict, image_size: int):
    """A visual tokenizer from a recipe's model section; ``model_type: slot_tokenizer`` picks the slot tokenizer."""
    section = dict(model_section)
    model_type = section.pop("model_type", VisualTokenizerConfig.model_type)
    return AutoModel.from_config(AutoConfig.for_model(model_type, image_size=image_size, **section))


def tokenizer_from(path: str, model_section: dict, image_size: int):
    """``init_from:``: the tokenizer saved at ``path`` with the recipe's ``model`` keys replacing its config's (a
    mapping such as ``decoder_options: {overlap: true}`` updates the saved mapping), built afresh and loaded with every
    saved tensor whose name and shape still match. A tile ViT decoder's output layer loads into an ``overlap: true``
    decoder through :func:`~tokenizer_bridge.nn.vit.tiles_to_footprints`. Blocks that a deeper ViT stack adds
    (``decoder_options: {depth: 4}`` over a saved depth 2) start as the identity: their attention and MLP output
    layers are zero, so the grown model first computes exactly what the saved one did. Returns the model and the
    names of the tensors that start from their initialisation instead."""
    try:
        source = AutoModel.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"init_from {path!r}: not a saved tokenizer (a save_pretrained folder or Hub id): {err}") from err
    saved_type = source.config.model_type
    section = dict(model_section)
    model_type = section.pop("model_type", saved_type)
    if model_type != saved_type:
        raise ValueError(f"init_from {path} holds a {saved_type!r} tokenizer; the recipe's model.model_type is "
                         f"{model_type!r}")
    skipped = (*SAVED_ONLY_CONFIG_KEYS, "model_type", "image_size")  # type checked above; the recipe gives the size
    values = {k: v for k, v in source.config.to_diff_dict().items() if k not in skipped}
    for key, value in section.items():  # a mapping updates the saved one (decoder_options: {overlap: true})
        values[key] = {**values[key], **value} if isinstance(value, dict) and isinstance(values.get(key), dict) else value
    model = build_tokenizer_model({**values, "model_type": model_type}, image_size)
    saved, state = source.state_dict(), model.state_dict()
    converted = _footprint_head(source, model)
    fresh = []
    for name, tensor in state.items():
        if name in converted:
            state[name] = converted[name]
        elif name in saved and saved[name].shape == tensor.shape:
            state[name] = saved[name]
        else:
            fresh.append(name)
    for block in _added_blocks(state, saved):  # pre-norm residual blocks: zero outputs make x + f(x) = x
        for layer in ("attn.proj", "mlp.2"):
            for kind in ("weight", "bias"):
                state[f"{block}.{layer}.{kind}"] = torch.zeros_like(state[f"{block}.{layer}.{kind}"])
    model.load_state_dict(state)
    return model, fresh


def _added_blocks(state: dict, saved: dict) -> list:
    """The ViT blocks (``encoder/decoder.stack.blocks.N``) of ``state`` that the saved tokenizer has no tensor of: the
    blocks a deeper stack adds (a wider one re-initialises its blocks as they are)."""
    pattern = re.compile(r"((?:en|de)coder\.stack\.blocks\.\d+)\.attn\.proj\.weight")
    blocks = [m.group(1) for name in state if (m := pattern.fullmatch(name))]
    return [block for block in blocks if not any(name.startswith(block + ".") for name in saved)]


def _footprint_head(source, model) -> dict:
    """The converted output layer when ``source`` has a tile ViT decoder and ``model`` an overlapping one."""
    old, new = getattr(source, "decoder", None), getattr(model, "decoder", None)
    if not (isinstance(old, ViTDecoder) and isinstance(new, ViTDecoder) and new.overlap and not old.overlap
            and old.patch_size == new.patch_size and old.out_channels == new.out_channels
            and old.out.in_features == new.out.in_features):
        return {}
    p, c = new.patch_size, new.out_channels
    return {"decoder.out.weight": tiles_to_footprints(old.out.weight.detach(), p, c),
            "decoder.out.bias": tiles_to_footprints(old.out.bias.detach(), p, c)}


def image_source_batches(recipe: Recipe) -> tuple:
    """The user's images of ``data.dataset: images`` as per-step training batches, the held-out images (the
    source's last ``data.eval_size`` records, never trained on, when ``train.eval_every`` is set), and the class
    counts of the label columns ``data.labels`` (``[]`` without)."""
    data = recipe.data
    source = read_images(data.path, image_column=data.image_column, label_columns=data.labels or ())
    holdout = data.eval_size if recipe.train.eval_every else 0
    batches = ImageBatches(source, data.image_size, recipe.train.batch_size, recipe.train.seed, data.crop_scale,
                           buckets=data.aspect_buckets, holdout=holdout, labels=data.labels)
    return batches.batch, batches.heldout_pixel_values, batches.label_classes


def shapes_batches(recipe: Recipe) -> tuple:
    """:func:`in_memory_batches` and the class counts of the shapes attributes ``data.labels`` (``[]`` without)."""
    classes = shape_label_classes(recipe.data.labels) if recipe.data.labels else []
    return (*in_memory_batches(recipe), classes)


def in_memory_batches(recipe: Recipe) -> tuple:
    """``batch_for_step`` over the bundled shapes + photo crops, rendered once into one tensor, and the held-out
    shapes (combinations excluded from training) and held-out photographs."""
    data, batch_size, seed = recipe.data, recipe.train.batch_size, recipe.train.seed
    if data.photo_size is not None and data.photo_size != data.image_size and data.photo_fraction > 0:
        batch_for_step = two_size_batches(recipe)
    else:
        pixels, labels = tokenizer_training_set(recipe)

        def batch_for_step(step: int, rank: int, world: int) -> dict:
            idx = shard_indices(step_indices(step, batch_size, len(pixels), seed), rank, world)
            return {"pixel_values": pixels[idx]} | ({"labels": labels[idx]} if labels is not None else {})

    def heldout() -> torch.Tensor:
        data, half = recipe.data, max(1, recipe.data.eval_size // 2)
        specs = shapes.make_splits(seed=data.seed).heldout
        renders = shapes.ShapesDataset(specs, size=data.image_size, seed=data.seed + 1)
        images = [renders[i]["image"] for i in range(min(half, len(renders)))]
        images += photos.random_crops(photos.photo_splits()[1], data.image_size, recipe.data.eval_size - len(images),
                                      seed=data.seed)
        return to_pixel_values(images)

    return batch_for_step, heldout


def two_size_batches(recipe: Recipe):
    """``batch_for_step`` for ``data.photo_size``: each step is all shapes at ``image_size`` or, with probability
    ``photo_fraction`` (drawn from ``(seed, step)``, so resumes see the same steps), all photo crops at ``photo_size``.
    A batch stacks one size; ViT tokenizers take both."""
    data, batch_size, seed = recipe.data, recipe.train.batch_size, recipe.train.seed
    n_photos = _photo_count(data)
    n_shapes = data.num_train - n_photos
    items = _shape_items(data, n_shapes)
    sources = (to_pixel_values([item["image"] for item in items]) if n_shapes else None,
               to_pixel_values(_photo_crops(data, n_photos, data.photo_size)) if n_photos else None)
    labels = (_shape_labels(data, items, 0), _shape_labels(data, [], n_photos)) if data.labels else None

    def batch_for_step(step: int, rank: int, world: int) -> dict:
        kind = int(np.random.default_rng([seed, step, 11]).random() < data.photo_fraction)
        if sources[kind] is None:  # photo_fraction 1 (no shapes), or too few images for one photo
            kind = 1 - kind
        pixels = sources[kind]
        idx = shard_indices(step_indices(step, batch_size, len(pixels), seed + kind), rank, world)
        return {"pixel_values": pixels[idx]} | ({"labels": labels[kind][idx]} if labels is not None else {})

    return batch_for_step


def heldout_evaluation(heldout):
    """``Stage.evaluate_fn``: loss and PSNR of the held-out images, and a picture of them over their
    reconstructions."""
    cache = {}

    def evaluate(model) -> tuple[dict, Image.Image]:
        if "pixel_values" not in cache:
            cache["pixel_values"] = heldout()
        pixel_values = cache["pixel_values"].to(model.device, model.dtype)
        out = model(pixel_values)
        metrics = {"loss": float(out.loss)}
        if out.reconstruction is not None:
            metrics["psnr"] = float(psnr(out.reconstruction.clamp(-1, 1).float(), pixel_values.float()).mean())
            recon = to_pil_images(out.reconstruction.clamp(-1, 1))
            picture = samples_grid([("held out", to_pil_images(pixel_values), []),
                                    ("reconstructed", recon, [])], tile=max(48, pixel_values.shape[-1]))
            return metrics, picture
        return metrics, None

    return evaluate


TRAINING_IMAGES = {"shapes": shapes_batches, "images": image_source_batches}


def tokenizer_stage(recipe: Recipe) -> Stage:
    if recipe.data.dataset not in TRAINING_IMAGES:
        raise ValueError(f"the tokenizer stage trains on data.dataset {sorted(TRAINING_IMAGES)}, got "
                         f"{recipe.data.dataset!r}")
    batch_for_step, heldout, classes = TRAINING_IMAGES[recipe.data.dataset](recipe)
    model_section = labelled_model_section(recipe, classes)
    if recipe.init_from:
        model, fresh = tokenizer_from(recipe.init_from, model_section, recipe.data.image_size)
        if fresh:
            logger.warning("init_from %s: %d tensors do not match the saved tokenizer and start from their "
                           "initialisation (blocks a deeper ViT stack adds: as the identity): %s", recipe.init_from,
                           len(fresh), ", ".join(fresh))
    else:
        model = build_tokenizer_model(model_section, recipe.data.image_size)
    if recipe.perceptual.backbone:
        section = recipe.perceptual
        model.set_perceptual_loss(PerceptualLoss.from_pretrained(section.backbone, section.layers,
                                                                 style_weight=section.style_weight))
    adversary = tokenizer_adversary(recipe, model) if recipe.adversarial.enabled else None
    evaluate = heldout_evaluation(heldout) if recipe.train.eval_every else None
    return Stage(model, batch_for_step, loss_fn, lambda m, path: m.save_pretrained(path), adversary, evaluate,
                 forward_writes=quantizer_parameters)


def labelled_model_section(recipe: Recipe, classes: list) -> dict:
    """The recipe's model section, with ``label_classes`` (the class counts of ``data.labels``) filled in."""
    section = dict(recipe.model)
    if not recipe.data.labels:
        return section
    if section.get("model_type", VisualTokenizerConfig.model_type) != VisualTokenizerConfig.model_type:
        raise ValueError(f"data.labels trains a label head of a visual_tokenizer, not of {section['model_type']!r}")
    if section.get("label_classes") not in (None, classes):
        raise ValueError(f"model.label_classes {section['label_classes']} does not match data.labels "
                         f"{recipe.data.labels} ({classes} classes); leave it out and it is filled in")
    return section | {"label_classes": classes}


def quantizer_parameters(model) -> list:
    """The trainable quantizer parameters (codebooks), which k-means init and dead-code restarts write in forward."""
    quantizer = getattr(model, "quantizer", None)
    return [p for p in quantizer.parameters() if p.requires_grad] if quantizer is not None else []


def stage_metrics(out, batch: dict) -> dict:
    # some metrics are absent by design (psnr with a diffusion decoder, perplexity during a quantizer warm-up)
    metrics = {k: v for k, v in out.metrics.items() if k in METRICS or k.startswith(LABEL_METRIC)}
    if "num_skipped" in batch:  # unreadable images replaced in this step's batch (counted in log.jsonl)
        metrics["skipped_images"] = int(batch["num_skipped"])
    return metrics


def loss_fn(model, batch: dict):
    labels = batch.get("labels")  # data.labels: only visual tokenizers have a label head
    out = model(batch["pixel_values"]) if labels is None else model(batch["pixel_values"], labels=labels)
    return out.loss, stage_metrics(out, batch)


def discriminator_section(recipe: Recipe) -> dict:
    """``adversarial.discriminator`` with every default filled in; a StyleGAN discriminator's ``image_size`` is the
    training size unless given."""
    section = dict(recipe.adversarial.discriminator)
    takes = inspect.signature(DISCRIMINATORS[section["type"]].__init__).parameters
    if "image_size" in takes and "image_size" not in section:
        section["image_size"] = recipe.data.image_size
    return check_discriminator_section(section)


def tokenizer_adversary(recipe: Recipe, model) -> Adversary:
    """The discriminator of ``adversarial:`` and the generator loss that trains the tokenizer against it."""
    if not isinstance(model, VisualTokenizer) or model.config.decoder == "diffusion":
        raise ValueError("adversarial.enabled trains a grid visual tokenizer with a pixel decoder (decoder 'conv' or "
                         f"'vit'); this recipe builds {type(model).__name__} with decoder "
                         f"{getattr(model.config, 'decoder', None)!r}")
    section = recipe.adversarial
    settings = dict(loss=section.loss, weight=section.weight, adaptive=section.adaptive_weight,
                    lecam_weight=section.lecam_weight, lecam_decay=section.lecam_decay, r1_weight=section.r1_weight,
                    generator_loss=section.generator_loss)

    def build(config: dict) -> AdversarialLoss:
        return AdversarialLoss(build_discriminator(config), **settings)

    def generator_loss(model, adversary: AdversarialLoss, batch: dict, step: int):
        out = model(batch["pixel_values"])
        metrics = stage_metrics(out, batch)
        inputs = {"real": batch["pixel_values"], "fake": out.reconstruction.detach()}
        if step < section.start:
            return out.loss, {**metrics, "adversarial_weight": 0.0}, inputs
        last_layer = getattr(model, "module", model).decoder_last_layer()  # the same parameter under DDP
        term, values = adversary.generator_loss(out.reconstruction, out.nll_loss, last_layer)
        return out.loss + term, {**metrics, **values}, inputs

    config = discriminator_section(recipe)
    return Adversary(build(config), generator_loss, config, build, start=section.start,
                     lr=section.lr if section.lr is not None else recipe.train.lr, betas=tuple(section.betas),
                     weight_decay=section.weight_decay)


