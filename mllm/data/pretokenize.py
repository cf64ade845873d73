"""Pre-tokenization: an image(+caption) dataset -> a ``datasets`` dataset of ``image_ids``, encoded once and reused.

    vtok pretokenize --source captions.jsonl --visual-tokenizer runs/tok/final --out data/pretok [--num-proc 4]

Sources: a JSONL (``{"image": "rel/path.png", "caption": "..."}``) or CSV file whose image paths are relative to
the file's folder (or ``image_root``); a folder saved with ``Dataset.save_to_disk``; or an image folder loaded with
``load_dataset("imagefolder", data_dir=...)`` (captions from its ``metadata.jsonl``). Everything runs offline.

Output folder::

    out/pretokenize.json       manifest: visual-tokenizer fingerprint, settings, state, bad-record summary
    out/shards/shard-00000/    complete shards while the run is going (removed once merged unless keep_shards)
    out/dataset/               the result (save_to_disk): index, image_ids, caption, width, height [, compressed_ids]

**Resume.** Records are encoded in shards of ``shard_size``; a shard is written to ``shard-XXXXX.tmp`` and renamed
when complete, so a folder ``shard-XXXXX`` is always whole. A re-run skips complete shards, drops ``.tmp`` leftovers
and encodes the rest; the merged dataset is identical to an uninterrupted run's. A re-run must use the same
tokenizer (fingerprint), source and settings, or it is refused (``overwrite=True`` deletes the folder's
pre-tokenization and starts over).

**Visual tokenizers.** Any saved visual tokenizer (:func:`~tokenizer_bridge.interface.load_visual_tokenizer`): a grid
``VisualTokenizer`` or wrapped pretrained VQ stores ``image_ids`` of shape ``(h, w[, L])`` per image, a
``SlotTokenizer`` ``(N[, L])`` with ``N`` its full token budget, or ``budget`` (a setting, recorded like the others).

**Fingerprint.** ``VisualTokenizer.fingerprint()`` (a hash of config and weights) is recorded in the manifest and in
the dataset's ``info.description``; :func:`load_pretokenized` refuses a dataset whose fingerprint is not the one the
caller expects (a bundle's ``ImageVocab.tokenizer_fingerprint``), so ids from another codebook are never reused.

**Bad records** (missing or unreadable image, empty caption, a record without an image field) are counted per
reason and skipped; the counts and the first few examples go to the manifest and are printed.

Workers (``num_proc``) each load the visual tokenizer from its path; the model is never pickled.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

import datasets
import torch
from datasets import Array2D, Array3D, Array4D, Features, List, Value

from tokenizer_bridge.image_processing_visual_tokenizer import (
    VisualTokenizerImageProcessor,
)
from tokenizer_bridge.interface import is_slot_tokenizer, load_visual_tokenizer

from .sources import open_image, read_images
from .tasks import compress_pixels

MANIFEST_NAME = "pretokenize.json"
DATASET_DIR = "dataset"
SHARDS_DIR = "shards"
FORMAT_VERSION = 1
BAD_REASONS = ("missing_image", "unreadable_image", "empty_caption", "malformed_record")
MAX_EXAMPLES = 20  # bad records listed by name in the manifest


class FingerprintMismatchError(ValueError):
    """Image ids made by one visual tokenizer were about to be used (or extended) with another."""


@dataclass
class PretokenizeSettings:
    """What defines the ids (recorded in the manifest; a resumed run must match them).

    visual_tokenizer: path of the visual tokenizer (``save_pretrained`` folder).
    image_size: side the images are fitted to before encoding (default: the tokenizer config's ``image_size``).
    resize_mode: ``crop``, ``stretch`` or ``pad`` (see ``VisualTokenizerImageProcessor``).
    shard_size: records per shard (the unit of resumption).
    image_column / caption_column: source columns; ``caption_column=None`` for images without captions.
    require_caption: skip records whose caption is empty (counted as ``empty_caption``).
    compressed: also store ``compressed_ids``, the ids of :func:`~mllm.data.tasks.compress_pixels` (decompression).
    image_root: folder that relative image paths start from (default: the JSONL/CSV file's folder).
    split: split of a saved ``DatasetDict``.
    budget: slot tokenizers only: the token budget (slots per image, one of its ``budgets``) to encode with;
        default: its full budget.
    """

    visual_tokenizer: str
    image_size: Optional[int] = None
    resize_mode: str = "crop"
    shard_size: int = 5000
    image_column: str = "image"
    caption_column: Optional[str] = "caption"
    require_caption: bool = True
    compressed: bool = False
    image_root: Optional[str] = None
    split: str = "train"
    budget: Optional[int] = None


@dataclass
class PretokenizeReport:
    """Outcome of a run: where the dataset is and what was kept or skipped (also in the manifest)."""

    path: str
    fingerprint: str
    total: int = 0
    kept: int = 0
    skipped: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"pre-tokenized {self.kept} of {self.total} records into {self.path} "
                 f"(visual tokenizer {self.fingerprint[:12]})"]
        for reason, count in self.skipped.items():
            lines.append(f"  skipped {count} x {reason}")
        for ex in self.examples[:5]:
            lines.append(f"    e.g. record {ex['index']}: {ex['reason']} ({ex['detail']})")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ sources
def read_source(source: str, settings: PretokenizeSettings) -> datasets.Dataset:
    """The source as a dataset with columns ``image`` (a path, or ``{"bytes", "path"}``) and ``caption``
    (:func:`mllm.data.sources.read_images`: image folders, JSONL/CSV lists, tar shards, ``save_to_disk`` folders)."""
    dataset = read_images(source, settings.image_column, settings.caption_column, settings.split, settings.image_root)
    if not settings.caption_column:
        dataset = dataset.add_column("caption", [""] * len(dataset))
    return dataset


# ------------------------------------------------------------------------------------------------ workers
_WORKER_CACHE: dict = {}


def _worker_models(settings: dict):
    """(visual tokenizer, image processor) of this process, loaded from the path once per process."""
    key = (settings["visual_tokenizer"], settings["image_size"], settings["resize_mode"])
    if key not in _WORKER_CACHE:
        if settings["num_proc"] > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings["num_proc"]))
        model = load_visual_tokenizer(settings["visual_tokenizer"]).eval()
        if model.fingerprint() != settings["fingerprint"]:
            raise FingerprintMismatchError(f"the visual tokenizer at {settings['visual_tokenizer']} changed during "
                                           "pre-tokenization (its fingerprint differs from the run's)")
        processor = VisualTokenizerImageProcessor(size=settings["image_size"], resize_mode=settings["resize_mode"],
                                                  size_divisor=model.config.downsample)
        _WORKER_CACHE.clear()
        _WORKER_CACHE[key] = (model, processor)
    return _WORKER_CACHE[key]


def _load(image: Any, caption: str, require_caption: bool, processor) -> tuple[Optional[Any], str, str]:
    """(pixel_values (3, H, W) + original size, or None; bad-record reason; detail) of one record."""
    if require_caption and not (caption or "").strip() and image is not None:
        return None, "empty_caption", str(image.get("path") if isinstance(image, dict) else image)
    picture, reason, detail = open_image(image)
    if picture is None:
        return None, reason, detail
    try:
        pixels = torch.as_tensor(processor.preprocess(picture)["pixel_values"][0])  # (3, H, W)
    except Exception as error:  # noqa: BLE001 - one odd image must not end the run
        return None, "unreadable_image", f"{type(error).__name__}: {error}"[:200]
    return (pixels, picture.width, picture.height), "", ""


@torch.no_grad()
def _encode_batch(batch: dict, indices: list[int], settings: dict, offset: int) -> dict:
    """A batch of source records -> one output row each (``error`` set and ids None for bad records)."""
    model, processor = _worker_models(settings)
    require = settings["require_caption"]
    loaded = [_load(im, cap, require, processor) for im, cap in zip(batch["image"], batch["caption"])]
    good = [k for k, (item, _, _) in enumerate(loaded) if item is not None]
    columns = {name: [None] * len(loaded) for name in ("image_ids", "width", "height")}
    if settings["compressed"]:
        columns["compressed_ids"] = [None] * len(loaded)
    if good:
        pixels = torch.stack([loaded[k][0][0] for k in good]).to(model.device, model.dtype)  # (n, 3, H, W)
        options = encode_options(model, settings.get("budget"))
        ids = {"image_ids": model.encode(pixels, **options).cpu().int().numpy()}
        if settings["compressed"]:
            ids["compressed_ids"] = model.encode(compress_pixels(pixels), **options).cpu().int().numpy()
        for row, k in enumerate(good):
            for name, values in ids.items():
                columns[name][k] = values[row]
            columns["width"][k], columns["height"][k] = loaded[k][0][1], loaded[k][0][2]
    return {"index": [offset + i for i in indices], **columns, "caption": list(batch["caption"]),
            "error": [reason for _, reason, _ in loaded], "detail": [detail for _, _, detail in loaded]}


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


# ------------------------------------------------------------------------------------------------ shards
def _features(id_shape: tuple, compressed: bool, with_errors: bool) -> Features:
    arrays = {1: lambda: List(Value("int32"), length=id_shape[0]), 2: lambda: Array2D(id_shape, "int32"),
              3: lambda: Array3D(id_shape, "int32"), 4: lambda: Array4D(id_shape, "int32")}
    if len(id_shape) not in arrays:
        raise ValueError(f"image ids of shape {id_shape} are not supported")
    spec = {"index": Value("int64"), "image_ids": arrays[len(id_shape)]()}
    if compressed:
        spec["compressed_ids"] = arrays[len(id_shape)]()
    spec.update(caption=Value("string"), width=Value("int32"), height=Value("int32"))
    if with_errors:
        spec.update(error=Value("string"), detail=Value("string"))
    return Features(spec)


def _encode_shard(source: datasets.Dataset, shard: int, run: dict, batch_size: int) -> tuple[datasets.Dataset, dict]:
    """Encode records of one shard -> (good rows, summary of this shard)."""
    start = shard * run["shard_size"]
    part = source.select(range(start, min(start + run["shard_size"], len(source))))
    out = part.map(
        _encode_batch, batched=True, batch_size=batch_size, with_indices=True, remove_columns=part.column_names,
        num_proc=min(run["num_proc"], len(part)) if run["num_proc"] > 1 and len(part) > 1 else None,
        keep_in_memory=True,
        features=_features(tuple(run["id_shape"]), run["compressed"], with_errors=True),
        fn_kwargs={"settings": run, "offset": start}, desc=f"pretokenize shard {shard + 1}/{run['num_shards']}",
    )
    errors, details, indices = list(out["error"]), list(out["detail"]), list(out["index"])
    bad = [k for k, e in enumerate(errors) if e]
    examples = [{"index": indices[k], "reason": errors[k], "detail": details[k]} for k in bad[:MAX_EXAMPLES]]
    summary = {"total": len(part), "kept": len(part) - len(bad), "skipped": dict(Counter(errors[k] for k in bad)),
               "examples": examples}
    good = out.select([k for k, e in enumerate(errors) if not e]).remove_columns(["error", "detail"])
    return good, summary


def _shard_dir(out_dir: str, shard: int) -> str:
    return os.path.join(out_dir, SHARDS_DIR, f"shard-{shard:05d}")


def _save_shard(out_dir: str, shard: int, rows: datasets.Dataset, summary: dict) -> None:
    final = _shard_dir(out_dir, shard)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rows.save_to_disk(tmp)
    _write_json(os.path.join(tmp, "summary.json"), summary)
    os.replace(tmp, final)  # a shard folder without .tmp is complete


# ------------------------------------------------------------------------------------------------ manifest
def _write_json(path: str, data: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=2)
    os.replace(path + ".tmp", path)


def read_manifest(path: str) -> dict:
    """The ``pretokenize.json`` of an output folder."""
    manifest = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {path}: not a pre-tokenized folder (vtok pretokenize)")
    with open(manifest) as f:
        return json.load(f)


def _prepare_output(out_dir: str, identity: dict, overwrite: bool) -> Optional[dict]:
    """Check a folder for (re)use; returns its manifest when it already holds this very run, else None."""
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    if os.path.isfile(manifest_path) and overwrite:
        _remove_run(out_dir)
    if not os.path.isfile(manifest_path):
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            raise ValueError(f"refusing to pre-tokenize into {out_dir}: the folder is not empty and holds no "
                             f"{MANIFEST_NAME}; pick a new or empty folder")
        return None
    manifest = read_manifest(out_dir)
    if manifest["tokenizer_fingerprint"] != identity["tokenizer_fingerprint"]:
        old, new = manifest["tokenizer_fingerprint"][:16], identity["tokenizer_fingerprint"][:16]
        raise FingerprintMismatchError(
            f"{out_dir} holds ids made by a visual tokenizer with fingerprint {old}..., but this run's tokenizer has "
            f"fingerprint {new}...; ids of two codebooks are never mixed: use a new --out folder, or --overwrite to "
            "delete this pre-tokenization and start over"
        )
    changed = sorted(k for k in identity if manifest.get(k) != identity[k])
    if changed:
        diffs = ", ".join(f"{k}: {manifest.get(k)!r} -> {identity[k]!r}" for k in changed)
        raise ValueError(f"{out_dir} was pre-tokenized with other settings ({diffs}); resume with the same ones, use a "
                         "new --out folder, or --overwrite to start over")
    return manifest


def _remove_run(out_dir: str) -> None:
    """Delete what pre-tokenization wrote into ``out_dir`` (and nothing else)."""
    for name in (SHARDS_DIR, DATASET_DIR, DATASET_DIR + ".tmp"):
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    os.remove(os.path.join(out_dir, MANIFEST_NAME))


def _identity(source: str, settings: PretokenizeSettings, fingerprint: str, num_records: int, id_shape) -> dict:
    values = asdict(settings)
    values.update(source=os.path.abspath(source), tokenizer_fingerprint=fingerprint, num_records=num_records,
                  id_shape=list(id_shape), format=FORMAT_VERSION)
    values["visual_tokenizer"] = os.path.abspath(settings.visual_tokenizer)
    return values


# ------------------------------------------------------------------------------------------------ entry points
def pretokenize(source: str, out_dir: str, settings: PretokenizeSettings, batch_size: int = 64, num_proc: int = 1,
                overwrite: bool = False, keep_shards: bool = False) -> PretokenizeReport:
    """Encode ``source`` into ``out_dir`` (see the module docstring); resumes an interrupted run in the same folder."""
    model = load_visual_tokenizer(settings.visual_tokenizer).eval()
    image_size = settings.image_size or getattr(model.config, "image_size", None)
    if not image_size:
        raise ValueError(f"{settings.visual_tokenizer} records no image_size: pass the image size to encode at")
    settings = replace(settings, image_size=image_size)
    probe = torch.zeros(1, 3, settings.image_size, settings.image_size, device=model.device, dtype=model.dtype)
    id_shape = tuple(model.encode(probe, **encode_options(model, settings.budget)).shape[1:])
    fingerprint = model.fingerprint()
    del model  # workers load their own copy from the path
    data = read_source(source, settings)
    if not len(data):
        raise ValueError(f"the pretokenize source {source} holds no records")
    identity = _identity(source, settings, fingerprint, len(data), id_shape)
    manifest = _prepare_output(out_dir, identity, overwrite)
    if manifest and manifest.get("state") == "complete":
        print(f"{out_dir} is already complete", file=sys.stderr)
        return _report(out_dir, manifest)
    num_shards = max(1, math.ceil(len(data) / settings.shard_size))
    manifest = {**identity, "state": "running", "num_shards": num_shards}
    os.makedirs(os.path.join(out_dir, SHARDS_DIR), exist_ok=True)
    _write_json(os.path.join(out_dir, MANIFEST_NAME), manifest)
    run = {**identity, "fingerprint": fingerprint, "num_proc": num_proc, "num_shards": num_shards}
    for shard in range(num_shards):
        shutil.rmtree(_shard_dir(out_dir, shard) + ".tmp", ignore_errors=True)
        if not os.path.isdir(_shard_dir(out_dir, shard)):
            _save_shard(out_dir, shard, *_encode_shard(data, shard, run, batch_size))
    return _merge(out_dir, manifest, keep_shards)


def _merge(out_dir: str, manifest: dict, keep_shards: bool) -> PretokenizeReport:
    """Concatenate the shards into ``out/dataset`` with the fingerprint in its description; mark the run complete."""
    shards = [_shard_dir(out_dir, k) for k in range(manifest["num_shards"])]
    summaries = [json.load(open(os.path.join(s, "summary.json"))) for s in shards]
    merged = datasets.concatenate_datasets([datasets.load_from_disk(s) for s in shards])
    summary = {"total": sum(s["total"] for s in summaries), "kept": sum(s["kept"] for s in summaries),
               "skipped": dict(sum((Counter(s["skipped"]) for s in summaries), Counter())),
               "examples": [e for s in summaries for e in s["examples"]][:MAX_EXAMPLES]}
    merged.info.description = json.dumps({"tokenizer_fingerprint": manifest["tokenizer_fingerprint"],
                                          "made_by": "vtok pretokenize", **summary})
    final = os.path.join(out_dir, DATASET_DIR)
    shutil.rmtree(final + ".tmp", ignore_errors=True)
    merged.save_to_disk(final + ".tmp")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(final + ".tmp", final)
    manifest = {**manifest, "state": "complete", "summary": summary}
    _write_json(os.path.join(out_dir, MANIFEST_NAME), manifest)
    if not keep_shards:
        shutil.rmtree(os.path.join(out_dir, SHARDS_DIR), ignore_errors=True)
    return _report(out_dir, manifest)


def _report(out_dir: str, manifest: dict) -> PretokenizeReport:
    summary = manifest["summary"]
    return PretokenizeReport(os.path.join(out_dir, DATASET_DIR), manifest["tokenizer_fingerprint"], summary["total"],
                             summary["kept"], summary["skipped"], summary["examples"])


def load_pretokenized(path: str, expected_fingerprint: Optional[str]) -> datasets.Dataset:
    """The dataset of a pre-tokenized folder (or of its ``dataset/``), refused unless its ids were made by the visual
    tokenizer with ``expected_fingerprint`` (e.g. a bundle's ``ImageVocab.tokenizer_fingerprint``; ``None`` skips
    the check)."""
    if os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        manifest = read_manifest(path)
        if manifest.get("state") != "complete":
            raise ValueError(f"the pre-tokenization in {path} is incomplete: re-run vtok pretokenize with the same "
                             "arguments to finish it")
        path = os.path.join(path, DATASET_DIR)
    dataset = datasets.load_from_disk(path)
    fingerprint = dataset_fingerprint(dataset)
    if fingerprint is None:
        raise ValueError(f"{path} records no visual-tokenizer fingerprint: it was not made by vtok pretokenize")
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise FingerprintMismatchError(
            f"the pre-tokenized dataset {path} holds ids of a visual tokenizer with fingerprint {fingerprint[:16]}..., "
            f"but {expected_fingerprint[:16]}... was expected (the bundle's ImageVocab.tokenizer_fingerprint): its "
            "ids index a different codebook. Pre-tokenize the data again with the bundle's visual tokenizer."
        )
    return dataset


def dataset_fingerprint(dataset: datasets.Dataset) -> Optional[str]:
    """The visual-tokenizer fingerprint recorded in a pre-tokenized dataset's description (None if absent)."""
    try:
        return json.loads(dataset.info.description or "{}").get("tokenizer_fingerprint")
    except json.JSONDecodeError:
        return None
