"""The encoding work of ``vtok pretokenize``: source rows -> output rows, in batches, on one process's device.

A batch of caption records gives one ``image_ids`` array each; a batch of documents or conversations is parsed
(:mod:`mllm.data.pretokenize_kinds`), all the images of its good records are encoded together in chunks of
``batch_size`` images, in reading order, and each record gets the list of its arrays back. A record with any bad image
is skipped whole (``error`` names the reason, ``detail`` which image). Every process (a ``datasets`` worker or a rank)
loads the visual tokenizer from its path once and keeps it; the model is never pickled.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from datasets import Array2D, Array3D, Array4D, Features, List, Value

from tokenizer_bridge.image_processing_visual_tokenizer import (
    VisualTokenizerImageProcessor,
)
from tokenizer_bridge.interface import is_slot_tokenizer, load_visual_tokenizer

from .pretokenize_kinds import BadRecord, parse_row
from .sources import open_image
from .tasks import compress_pixels


class FingerprintMismatchError(ValueError):
    """Image ids made by one visual tokenizer were about to be used (or extended) with another."""


_WORKER_CACHE: dict = {}


def worker_models(settings: dict):
    """(visual tokenizer on ``settings["device"]``, image processor) of this process, loaded once per process."""
    key = (settings["visual_tokenizer"], settings["image_size"], settings["resize_mode"], settings["device"])
    if key not in _WORKER_CACHE:
        if settings["num_proc"] > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings["num_proc"]))
        model = load_visual_tokenizer(settings["visual_tokenizer"]).eval().to(settings["device"])
        if model.fingerprint() != settings["fingerprint"]:
            raise FingerprintMismatchError(f"the visual tokenizer at {settings['visual_tokenizer']} changed during "
                                           "pre-tokenization (its fingerprint differs from the run's)")
        processor = VisualTokenizerImageProcessor(size=settings["image_size"], resize_mode=settings["resize_mode"],
                                                  size_divisor=model.config.downsample)
        _WORKER_CACHE.clear()
        _WORKER_CACHE[key] = (model, processor)
    return _WORKER_CACHE[key]


def encode_options(model, budget: Optional[int]) -> dict:
    """``encode`` keyword arguments: the token budget of a slot tokenizer (checked); nothing for grid tokenizers."""
    if not is_slot_tokenizer(model):
        if budget is not None:
            raise ValueError(f"budget={budget} applies to slot tokenizers; {type(model).__name__} gives a fixed number "
                             "of ids per image")
        return {}
    if budget is not None and int(budget) not in model.budgets:
        raise ValueError(f"budget={budget} is not one of the slot tokenizer's trained budgets "
                         f"{list(model.budgets)}")
    return {"num_slots": int(budget) if budget is not None else model.config.full_budget}


def features(kind: str, id_shape: tuple, compressed: bool, with_errors: bool) -> Features:
    """The Arrow schema of a kind's rows (see :mod:`mllm.data.pretokenize`)."""
    arrays = {1: lambda: List(Value("int32"), length=id_shape[0]), 2: lambda: Array2D(id_shape, "int32"),
              3: lambda: Array3D(id_shape, "int32"), 4: lambda: Array4D(id_shape, "int32")}
    if len(id_shape) not in arrays:
        raise ValueError(f"image ids of shape {id_shape} are not supported")
    if kind == "captions":
        spec = {"index": Value("int64"), "image_ids": arrays[len(id_shape)]()}
        if compressed:
            spec["compressed_ids"] = arrays[len(id_shape)]()
        spec.update(caption=Value("string"), width=Value("int32"), height=Value("int32"))
    else:
        spec = {"index": Value("int64"), "record": Value("string"), "image_ids": List(arrays[len(id_shape)]()),
                "width": List(Value("int32")), "height": List(Value("int32"))}
    if with_errors:
        spec.update(error=Value("string"), detail=Value("string"))
    return Features(spec)


def load_pixels(image: Any, processor) -> tuple[Optional[tuple], str, str]:
    """``((pixel_values (3, H, W), width, height) or None, bad-record reason, detail)`` of one image."""
    picture, reason, detail = open_image(image)
    if picture is None:
        return None, reason, detail
    try:
        pixels = torch.as_tensor(processor.preprocess(picture)["pixel_values"][0])  # (3, H, W)
    except Exception as error:  # noqa: BLE001 - one odd image must not end the run
        return None, "unreadable_image", f"{type(error).__name__}: {error}"[:200]
    return (pixels, picture.width, picture.height), "", ""


def _load_caption(image: Any, caption: str, require_caption: bool, processor) -> tuple[Optional[tuple], str, str]:
    if require_caption and not (caption or "").strip() and image is not None:
        return None, "empty_caption", str(image.get("path") if isinstance(image, dict) else image)
    return load_pixels(image, processor)


@torch.no_grad()
def encode_captions(batch: dict, indices: list[int], settings: dict, offset: int) -> dict:
    """A batch of caption records -> one output row each (``error`` set and ids None for bad records)."""
    model, processor = worker_models(settings)
    require = settings["require_caption"]
    loaded = [_load_caption(im, cap, require, processor) for im, cap in zip(batch["image"], batch["caption"])]
    good = [k for k, (item, _, _) in enumerate(loaded) if item is not None]
    columns = {name: [None] * len(loaded) for name in ("image_ids", "width", "height")}
    if settings["compressed"]:
        columns["compressed_ids"] = [None] * len(loaded)
    if good:
        pixels = [loaded[k][0][0] for k in good]
        options, chunk = encode_options(model, settings.get("budget")), settings["encode_chunk"]
        ids = {"image_ids": _encode_chunks(model, pixels, chunk, options)}
        if settings["compressed"]:
            ids["compressed_ids"] = _encode_chunks(model, [compress_pixels(p[None])[0] for p in pixels], chunk, options)
        for row, k in enumerate(good):
            for name, values in ids.items():
                columns[name][k] = values[row]
            columns["width"][k], columns["height"][k] = loaded[k][0][1], loaded[k][0][2]
    return {"index": [offset + i for i in indices], **columns, "caption": list(batch["caption"]),
            "error": [reason for _, reason, _ in loaded], "detail": [detail for _, _, detail in loaded]}


def _load_record(row: dict, settings: dict, processor) -> tuple[Optional[tuple], str, str]:
    """``((stored record JSON, [(pixels, width, height), ...]) or None, reason, detail)`` of one source row."""
    try:
        parsed = parse_row(row, settings["kind"], settings["root"])
    except BadRecord as bad:
        return None, bad.reason, bad.detail[:200]
    images = []
    for k, image in enumerate(parsed.images):
        item, reason, detail = load_pixels(image, processor)
        if item is None:
            return None, reason, f"image {k}: {detail}"[:200]
        images.append(item)
    return (parsed.record, images), "", ""


@torch.no_grad()
def encode_records(batch: dict, indices: list[int], settings: dict, offset: int) -> dict:
    """A batch of documents or conversations -> one output row each: its stored record and a list of id arrays."""
    model, processor = worker_models(settings)
    rows = [{name: values[k] for name, values in batch.items()} for k in range(len(indices))]
    loaded = [_load_record(row, settings, processor) for row in rows]
    pixels = [image[0] for item, _, _ in loaded if item is not None for image in item[1]]
    ids = iter(_encode_chunks(model, pixels, settings["encode_chunk"], encode_options(model, settings.get("budget"))))
    columns = {name: [None] * len(loaded) for name in ("record", "image_ids", "width", "height")}
    for k, (item, _, _) in enumerate(loaded):
        if item is not None:
            record, images = item
            columns["record"][k], columns["image_ids"][k] = record, [next(ids) for _ in images]
            columns["width"][k], columns["height"][k] = [w for _, w, _ in images], [h for _, _, h in images]
    return {"index": [offset + i for i in indices], **columns,
            "error": [reason for _, reason, _ in loaded], "detail": [detail for _, _, detail in loaded]}


def encode_chunk_size(device: str, batch_size: int, requested: Optional[int] = None) -> int:
    """Images per ``encode`` call: ``requested``, else the whole batch on an accelerator and 1 on the CPU.

    On a CPU a convolutional encoder runs no faster per image in a batch (``bench/results/data.md``: batch 8 and 64
    give 0.83-0.88x the images/s of batch 1) while its activations grow with the batch (5.4 GB PSS at 64 images of
    256 px over two workers), so the CPU encodes one image at a time and the batch only groups the Arrow writes.
    """
    if requested is not None:
        if int(requested) < 1:
            raise ValueError(f"encode_batch_size must be >= 1, got {requested}")
        return int(requested)
    return 1 if torch.device(device).type == "cpu" else max(1, int(batch_size))


def _encode_chunks(model, pixels: list[torch.Tensor], chunk: int, options: dict) -> list:
    """Image ids of ``pixels`` (each (3, H, W)), encoded ``chunk`` images at a time, in order."""
    out = []
    for start in range(0, len(pixels), max(1, chunk)):
        batch = torch.stack(pixels[start : start + chunk]).to(model.device, model.dtype)  # (n, 3, H, W)
        out.extend(model.encode(batch, **options).cpu().int().numpy())
    return out
