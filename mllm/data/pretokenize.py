"""Pre-tokenization: captions, interleaved documents or conversations -> a ``datasets`` dataset of ``image_ids``,
encoded once and reused by the ``llm`` stage.

    vtok pretokenize --source records.jsonl --visual-tokenizer runs/tok/final --out data/pretok [--num-processes 4]
    torchrun --nproc_per_node 4 -m mllm.pretokenize --source ... (or accelerate launch -m mllm.pretokenize ...)

**Record kinds** (:mod:`mllm.data.pretokenize_kinds`, detected from the first record's fields, recorded in the
manifest as ``kind``): *captions* ``{"image": "rel/path.png", "caption": "..."}`` from a JSONL or CSV list (paths
relative to the file's folder or ``image_root``), an image folder (``imagefolder``, captions from its
``metadata.jsonl``), webdataset ``.tar`` shards or a ``save_to_disk`` folder (:func:`mllm.data.sources.read_images`);
*documents* ``{"content": [{"type": "text", "text": ...}, {"type": "image", "image": "a.png"}, ...]}`` and
*conversations* in the HF chat format (``{"messages": [{"role", "content"}, ...]}``, image parts or LLaVA's
``"images"`` list with ``<image>`` placeholders) from a JSONL file or a ``save_to_disk`` folder. Everything runs
offline.

Output folder::

    out/pretokenize.json       manifest: visual-tokenizer fingerprint, kind, settings, state, bad-record summary
    out/shards/shard-00000/    complete shards while the run is going (removed once merged unless keep_shards)
    out/dataset/               the result (save_to_disk), one row per kept record:

    captions        index int64, image_ids (h, w[, L]) int32, [compressed_ids,] caption string, width, height int32
    documents,      index int64, record string (JSON: the text structure with <image> placeholders),
    conversations   image_ids list of (h, w[, L]) int32 arrays (one per placeholder, in reading order),
                    width, height list of int32

A caption dataset is exactly what earlier versions wrote (its ``info.description`` holds no ``kind``; one that does
not name a kind holds captions). The ``record`` JSON is ``{"content": [items], "prefix": k}`` for a document (an item
is a text or ``"<image>"``; the first ``k`` items are context) and ``{"messages": [{"role", "content"}, ...]}`` with
string contents for a conversation (see :mod:`mllm.data.pretokenize_kinds`). Slot tokenizers store ``(N[, L])``.

**Resume.** Records are encoded in shards of ``shard_size``; a shard is written to ``shard-XXXXX.tmp`` and renamed
when complete, so a folder ``shard-XXXXX`` is always whole. A re-run skips complete shards, drops ``.tmp`` leftovers
and encodes the rest; the merged dataset is identical to an uninterrupted run's. A re-run must use the same
tokenizer (fingerprint), source, kind and settings, or it is refused (``overwrite=True`` deletes the folder's
pre-tokenization and starts over).

**Many processes** (:mod:`mllm.data.pretokenize_ranks`). Run under a launcher (``torchrun``, ``accelerate launch``)
or with ``num_processes=N`` (which spawns the ranks), every rank reads the source, rank 0 checks the folder and lists
the shards still missing, and rank ``r`` encodes every ``world``-th of them on its own device (``cuda:LOCAL_RANK``
with a GPU), in batches; once every rank is done, rank 0 merges. A shard is encoded with the same batches whichever
rank takes it, so the result equals a single-process run's, and a killed run resumes with any number of processes.
``num_proc`` (``datasets`` worker processes inside each rank) encodes on the CPU.

**Visual tokenizers.** Any saved visual tokenizer (:func:`~tokenizer_bridge.interface.load_visual_tokenizer`): a grid
``VisualTokenizer`` or wrapped pretrained VQ stores ``image_ids`` of shape ``(h, w[, L])`` per image, a
``SlotTokenizer`` ``(N[, L])`` with ``N`` its full token budget, or ``budget`` (a setting, recorded like the others).

**Fingerprint.** ``VisualTokenizer.fingerprint()`` (a hash of config and weights) is recorded in the manifest and in
the dataset's ``info.description``; :func:`load_pretokenized` refuses a dataset whose fingerprint is not the one the
caller expects (a bundle's ``ImageVocab.tokenizer_fingerprint``), so ids from another codebook are never reused.

**Bad records** are counted per reason and skipped: ``missing_image`` / ``unreadable_image`` (any image of the record),
``empty_caption``, ``malformed_record`` (no image field, not a JSON object, a document or conversation of the wrong
structure or kind) and ``image_count_mismatch`` (placeholders without their own image vs the ``images`` list); the
counts and the first few examples go to the manifest and are printed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import datasets
import torch

from tokenizer_bridge.interface import load_visual_tokenizer

from .pretokenize_encode import (
    FingerprintMismatchError,
    encode_captions,
    encode_chunk_size,
    encode_options,
    encode_records,
    features,
)
from .pretokenize_kinds import KINDS, read_records, source_kind
from .pretokenize_ranks import Ranks, join_ranks, launched, spawn
from .sources import read_images

MANIFEST_NAME = "pretokenize.json"
DATASET_DIR = "dataset"
SHARDS_DIR = "shards"
FORMAT_VERSION = 1
BAD_REASONS = ("missing_image", "unreadable_image", "empty_caption", "malformed_record", "image_count_mismatch")
MAX_EXAMPLES = 20  # bad records listed by name in the manifest
LEGACY_IDENTITY = {"kind": "captions"}  # identity keys a manifest of an earlier version lacks, and their value then
__all__ = ["FingerprintMismatchError", "PretokenizeSettings", "PretokenizeReport", "pretokenize", "load_pretokenized",
           "read_manifest", "dataset_fingerprint", "dataset_kind", "encode_options", "BAD_REASONS", "KINDS"]


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
    kind: ``captions``, ``documents`` or ``conversations``; default: detected from the source's first record.
        ``image_column``, ``caption_column``, ``require_caption`` and ``compressed`` apply to captions only.
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
    kind: Optional[str] = None


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
def read_source(source: str, settings: PretokenizeSettings, kind: str = "captions") -> datasets.Dataset:
    """The source as a dataset: for captions, columns ``image`` (a path, or ``{"bytes", "path"}``) and ``caption``
    (:func:`mllm.data.sources.read_images`: image folders, JSONL/CSV lists, tar shards, ``save_to_disk`` folders); for
    documents and conversations, one row per record (:func:`mllm.data.pretokenize_kinds.read_records`)."""
    if kind != "captions":
        return read_records(source, settings.split)
    dataset = read_images(source, settings.image_column, settings.caption_column, settings.split, settings.image_root)
    if not settings.caption_column:
        dataset = dataset.add_column("caption", [""] * len(dataset))
    return dataset


def _source_kind(source: str, settings: PretokenizeSettings) -> str:
    kind = settings.kind or source_kind(source, settings.split)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind != "captions" and settings.compressed:
        raise ValueError(f"compressed ids feed the decompression task of captioned images; a {kind} source has none")
    return kind


def _image_root(source: str, settings: PretokenizeSettings) -> Optional[str]:
    """The folder relative image paths of documents and conversations start from."""
    if settings.image_root:
        return settings.image_root
    return os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else None


# ------------------------------------------------------------------------------------------------ shards
def _encode_shard(source: datasets.Dataset, shard: int, run: dict, batch_size: int) -> tuple[datasets.Dataset, dict]:
    """Encode records of one shard -> (good rows, summary of this shard)."""
    start = shard * run["shard_size"]
    part = source.select(range(start, min(start + run["shard_size"], len(source))))
    encode = encode_captions if run["kind"] == "captions" else encode_records
    out = part.map(
        encode, batched=True, batch_size=batch_size, with_indices=True, remove_columns=part.column_names,
        num_proc=min(run["num_proc"], len(part)) if run["num_proc"] > 1 and len(part) > 1 else None,
        keep_in_memory=True,
        features=features(run["kind"], tuple(run["id_shape"]), run["compressed"], with_errors=True),
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
    rows.save_to_disk(tmp, **({} if len(rows) else {"num_shards": 1}))  # a shard of bad records only: one empty file
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
            if not _only_leftovers(out_dir):
                raise ValueError(f"refusing to pre-tokenize into {out_dir}: the folder is not empty and holds no "
                                 f"{MANIFEST_NAME}; pick a new or empty folder")
            _remove_leftovers(out_dir)  # a run killed before its first manifest write: nothing of value is there
        return None
    manifest = read_manifest(out_dir)
    if manifest["tokenizer_fingerprint"] != identity["tokenizer_fingerprint"]:
        old, new = manifest["tokenizer_fingerprint"][:16], identity["tokenizer_fingerprint"][:16]
        raise FingerprintMismatchError(
            f"{out_dir} holds ids made by a visual tokenizer with fingerprint {old}..., but this run's tokenizer has "
            f"fingerprint {new}...; ids of two codebooks are never mixed: use a new --out folder, or --overwrite to "
            "delete this pre-tokenization and start over"
        )
    recorded = {**LEGACY_IDENTITY, **manifest}
    changed = sorted(k for k in identity if recorded.get(k) != identity[k])
    if changed:
        diffs = ", ".join(f"{k}: {recorded.get(k)!r} -> {identity[k]!r}" for k in changed)
        raise ValueError(f"{out_dir} was pre-tokenized with other settings ({diffs}); resume with the same ones, use a "
                         "new --out folder, or --overwrite to start over")
    return manifest


def _only_leftovers(out_dir: str) -> bool:
    """Whether ``out_dir`` holds nothing but what a run leaves when killed before its first manifest write: an empty
    ``shards/`` folder and a half-written ``pretokenize.json.tmp``."""
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if name == MANIFEST_NAME + ".tmp" and os.path.isfile(path):
            continue
        if name == SHARDS_DIR and os.path.isdir(path) and not os.listdir(path):
            continue
        return False
    return True


def _remove_leftovers(out_dir: str) -> None:
    shutil.rmtree(os.path.join(out_dir, SHARDS_DIR), ignore_errors=True)
    if os.path.isfile(os.path.join(out_dir, MANIFEST_NAME + ".tmp")):
        os.remove(os.path.join(out_dir, MANIFEST_NAME + ".tmp"))


def _remove_run(out_dir: str) -> None:
    """Delete what pre-tokenization wrote into ``out_dir`` (and nothing else)."""
    for name in (SHARDS_DIR, DATASET_DIR, DATASET_DIR + ".tmp"):
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    os.remove(os.path.join(out_dir, MANIFEST_NAME))


def _identity(source: str, settings: PretokenizeSettings, kind: str, fingerprint: str, num_records: int,
              id_shape) -> dict:
    values = asdict(settings)
    values.update(source=os.path.abspath(source), tokenizer_fingerprint=fingerprint, num_records=num_records,
                  id_shape=list(id_shape), format=FORMAT_VERSION, kind=kind)
    values["visual_tokenizer"] = os.path.abspath(settings.visual_tokenizer)
    return values


# ------------------------------------------------------------------------------------------------ entry points
def pretokenize(source: str, out_dir: str, settings: PretokenizeSettings, batch_size: int = 64, num_proc: int = 1,
                overwrite: bool = False, keep_shards: bool = False, num_processes: int = 1,
                device: Optional[str] = None, encode_batch_size: Optional[int] = None) -> PretokenizeReport:
    """Encode ``source`` into ``out_dir`` (see the module docstring); resumes an interrupted run in the same folder.

    ``batch_size`` records (documents, conversations: images) are encoded at a time, by ``num_proc`` ``datasets``
    workers (on the CPU); ``num_processes > 1`` spawns that many ranks (a run under a launcher is one rank already);
    ``device`` defaults to ``cuda:LOCAL_RANK`` when there is a GPU (and ``num_proc == 1``), else the CPU.
    ``encode_batch_size`` images go through the encoder per call (default: the whole batch on a GPU, one on the CPU,
    where batching is slower per image; see :func:`~mllm.data.pretokenize_encode.encode_chunk_size`).
    """
    if num_processes > 1 and not launched():
        options = dict(batch_size=batch_size, num_proc=num_proc, overwrite=overwrite, keep_shards=keep_shards,
                       device=device, encode_batch_size=encode_batch_size)
        spawn(pretokenize, (source, out_dir, settings), options, num_processes)
        return _report(out_dir, read_manifest(out_dir))
    ranks = join_ranks()
    try:
        device = device or (ranks.device if num_proc <= 1 else "cpu")
        chunk = encode_chunk_size(device, batch_size, encode_batch_size)
        return _run(source, out_dir, settings, ranks, batch_size, num_proc, overwrite, keep_shards, device, chunk)
    finally:
        ranks.close()


def _run(source: str, out_dir: str, settings: PretokenizeSettings, ranks: Ranks, batch_size: int, num_proc: int,
         overwrite: bool, keep_shards: bool, device: str, encode_chunk: int) -> PretokenizeReport:
    """One rank's part of :func:`pretokenize` (the whole run when ``ranks.world == 1``)."""
    settings, id_shape, fingerprint = _probe(settings)
    kind = _source_kind(source, settings)
    data = ranks.rank_zero_first(lambda: read_source(source, settings, kind))
    if not len(data):
        raise ValueError(f"the pretokenize source {source} holds no records")
    identity = _identity(source, settings, kind, fingerprint, len(data), id_shape)
    num_shards = max(1, math.ceil(len(data) / settings.shard_size))
    manifest, todo = ranks.on_rank_zero(lambda: _start(out_dir, identity, overwrite, num_shards))
    if todo is None:
        return _report(out_dir, manifest)
    run = {**identity, "fingerprint": fingerprint, "num_proc": num_proc, "num_shards": num_shards,
           "device": device, "batch_size": batch_size, "encode_chunk": encode_chunk, "root": _image_root(source, settings)}
    for shard in todo[ranks.rank :: ranks.world]:
        _save_shard(out_dir, shard, *_encode_shard(data, shard, run, batch_size))
    ranks.barrier()
    return ranks.on_rank_zero(lambda: _merge(out_dir, manifest, keep_shards))


def _probe(settings: PretokenizeSettings) -> tuple[PretokenizeSettings, tuple, str]:
    """(settings with the image size filled in, the shape of one image's ids, the visual-tokenizer fingerprint)."""
    model = load_visual_tokenizer(settings.visual_tokenizer).eval()
    image_size = settings.image_size or getattr(model.config, "image_size", None)
    if not image_size:
        raise ValueError(f"{settings.visual_tokenizer} records no image_size: pass the image size to encode at")
    settings = replace(settings, image_size=image_size)
    probe = torch.zeros(1, 3, settings.image_size, settings.image_size, device=model.device, dtype=model.dtype)
    id_shape = tuple(model.encode(probe, **encode_options(model, settings.budget)).shape[1:])
    return settings, id_shape, model.fingerprint()  # the encoding processes load their own copy from the path


def _start(out_dir: str, identity: dict, overwrite: bool, num_shards: int) -> tuple[dict, Optional[list[int]]]:
    """Rank 0: check the folder and mark the run as running -> (manifest, shards still to encode; None if complete)."""
    manifest = _prepare_output(out_dir, identity, overwrite)
    if manifest and manifest.get("state") == "complete":
        print(f"{out_dir} is already complete", file=sys.stderr)
        return manifest, None
    manifest = {**identity, "state": "running", "num_shards": num_shards}
    os.makedirs(os.path.join(out_dir, SHARDS_DIR), exist_ok=True)
    _write_json(os.path.join(out_dir, MANIFEST_NAME), manifest)
    for shard in range(num_shards):
        shutil.rmtree(_shard_dir(out_dir, shard) + ".tmp", ignore_errors=True)
    return manifest, [k for k in range(num_shards) if not os.path.isdir(_shard_dir(out_dir, k))]


def _merge(out_dir: str, manifest: dict, keep_shards: bool) -> PretokenizeReport:
    """Concatenate the shards into ``out/dataset`` with the fingerprint in its description; mark the run complete."""
    shards = [_shard_dir(out_dir, k) for k in range(manifest["num_shards"])]
    missing = [os.path.basename(s) for s in shards if not os.path.isdir(s)]
    if missing:
        raise RuntimeError(f"cannot merge {out_dir}: shard(s) {missing[:5]} are missing; re-run to encode them")
    summaries = [json.load(open(os.path.join(s, "summary.json"))) for s in shards]
    merged = datasets.concatenate_datasets([datasets.load_from_disk(s) for s in shards])
    summary = {"total": sum(s["total"] for s in summaries), "kept": sum(s["kept"] for s in summaries),
               "skipped": dict(sum((Counter(s["skipped"]) for s in summaries), Counter())),
               "examples": [e for s in summaries for e in s["examples"]][:MAX_EXAMPLES]}
    kind = manifest.get("kind", "captions")  # a caption dataset's description stays what earlier versions wrote
    named = {"kind": kind} if kind != "captions" else {}
    merged.info.description = json.dumps({"tokenizer_fingerprint": manifest["tokenizer_fingerprint"],
                                          "made_by": "vtok pretokenize", **named, **summary})
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


def dataset_kind(dataset: datasets.Dataset) -> str:
    """The record kind of a pre-tokenized dataset: ``captions`` (also when unnamed), ``documents`` or
    ``conversations``."""
    try:
        return json.loads(dataset.info.description or "{}").get("kind", "captions")
    except json.JSONDecodeError:
        return "captions"
