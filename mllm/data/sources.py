"""A user's images, from wherever they are: one reader for the tokenizer stage, pre-tokenization and evaluation.

    read_images("photos/")                      an image folder, recursive (PNG, JPEG, WebP, ...; ``imagefolder``)
    read_images("captions.jsonl")               a JSONL / CSV list with an image column (paths relative to the file)
    read_images("data/shard-*.tar")             webdataset-style tar shards given by a glob (``webdataset``)
    read_images("saved/")                       a folder written by ``Dataset.save_to_disk`` (or a DatasetDict)

Everything is read with Hugging Face ``datasets`` (Arrow, memory-mapped; nothing is decoded up front), and the result
always has an ``image`` column holding a path or ``{"bytes", "path"}``, never a decoded picture: images are decoded
one at a time by :func:`open_image`, which names what is wrong with a bad one (missing file, unreadable or truncated
image, decompression bomb) instead of raising, so a caller can skip and count it. A ``caption`` column is kept when
asked for (``caption_column``; ``txt`` or ``json["caption"]`` in tar shards), and so are ``label_columns`` (image-level
labels such as a class, for a tokenizer's label head): a column of the list, of ``metadata.jsonl`` or of the saved
dataset; in tar shards a member of that extension (``.cls``) or a field of the ``.json`` member; in an image folder
also ``folder``, the folder an image sits in (the class folders of an ImageNet-style layout).
"""

from __future__ import annotations

import csv
import glob
import json
import os
from typing import Any, Optional, Sequence

import datasets
from datasets import Features, Value
from PIL import Image

from tokenizer_bridge.image_processing_visual_tokenizer import (
    ImageLoadError,
    load_image,
)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm")


def read_images(path: str, image_column: str = "image", caption_column: Optional[str] = None,
                split: str = "train", image_root: Optional[str] = None,
                label_columns: Sequence[str] = ()) -> datasets.Dataset:
    """The images at ``path`` as a dataset with columns ``image`` (path or ``{"bytes", "path"}``) and, when
    ``caption_column`` is given, ``caption`` (``""`` where a record has none), and each of ``label_columns`` under
    its own name (``""`` / None where a record has none)."""
    label_columns = list(label_columns)
    clash = [name for name in label_columns if name in ("image", "caption")]
    if clash:
        raise ValueError(f"label columns cannot be named {clash}: those names are the image and caption columns")
    if any(ch in path for ch in "*?[") or path.endswith(".tar"):
        return _tar_shards(path, caption_column, label_columns)
    if os.path.isfile(path):
        return _table(path, image_column, caption_column, image_root, label_columns)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image source {path!r} is not a folder, a JSONL/CSV file or a glob of .tar shards")
    dataset = saved_dataset(path, split)
    if dataset is None:
        dataset = _image_folder(path, split, caption_column, with_folder="folder" in label_columns)
    return standard_columns(dataset, image_column, caption_column, label_columns)


def saved_dataset(path: str, split: str = "train") -> Optional[datasets.Dataset]:
    """The dataset ``Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``, its ``split``) wrote at ``path``, or
    None when the folder is not one."""
    if os.path.exists(os.path.join(path, "dataset_dict.json")):
        return datasets.load_from_disk(path)[split]
    if os.path.exists(os.path.join(path, "state.json")):
        return datasets.load_from_disk(path)
    return None


SPLIT_FOLDERS = ("train", "test", "validation", "valid", "val", "dev", "eval")


def _image_folder(path: str, split: str, caption_column: Optional[str], with_folder: bool = False) -> datasets.Dataset:
    """An image folder in the ``imagefolder`` convention (recursive; ``train/``, ``test/`` ... sub-folders are
    splits; captions in ``metadata.jsonl`` rows keyed by ``file_name``), listed with one walk of the folder.

    ``load_dataset("imagefolder", data_dir=...)`` walks the whole folder once per split-name pattern it tries
    (about 65): about 1 ms per image on every start, 10 s at 10k images (bench/results/data.md)."""
    root = path
    if any(os.path.isdir(os.path.join(path, name)) for name in SPLIT_FOLDERS):
        root = os.path.join(path, split)
        if not os.path.isdir(root):
            raise ValueError(f"the image folder {path} is split into sub-folders, but has no {split!r} one")
    files = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        files += [os.path.join(folder, n) for n in names if n.rpartition(".")[2].lower() in IMAGE_EXTENSIONS]
    files.sort(key=lambda f: os.path.relpath(f, root))
    columns = {"image": files}
    metadata = os.path.join(root, "metadata.jsonl")
    if os.path.isfile(metadata):
        with open(metadata, encoding="utf-8") as f:
            rows = {os.path.normpath(row.get("file_name", "")): row for row in map(_json_row, f) if row}
        keys = sorted({k for row in rows.values() for k in row} - {"file_name"})
        for key in keys:
            columns[key] = [_text(rows.get(os.path.relpath(f, root), {}).get(key)) for f in files]
    if with_folder and "folder" not in columns:  # the class folders of an ImageNet-style layout
        columns["folder"] = [os.path.dirname(os.path.relpath(f, root)) for f in files]
    dataset = datasets.Dataset.from_dict(columns, features=Features({k: Value("string") for k in columns}))
    return dataset.cast_column("image", datasets.Image(decode=False))


def standard_columns(dataset: datasets.Dataset, image_column: str = "image",
                     caption_column: Optional[str] = None, label_columns: Sequence[str] = ()) -> datasets.Dataset:
    """``dataset`` reduced to ``image`` (not decoded), ``caption`` and label columns, with clear errors for missing
    ones."""
    missing = [name for name in label_columns if name not in dataset.column_names]
    if missing:
        raise ValueError(f"the source has no label column(s) {missing} (columns: {dataset.column_names})")
    if image_column not in dataset.column_names:
        raise ValueError(f"the source has no image column {image_column!r} (columns: {dataset.column_names})")
    if caption_column and caption_column not in dataset.column_names:
        raise ValueError(f"the source has no caption column {caption_column!r} (columns: {dataset.column_names}); "
                         "pass caption_column=None (--no-caption) for images without captions")
    dataset = dataset.select_columns([image_column] + ([caption_column] if caption_column else [])
                                     + [name for name in label_columns if name not in (image_column, caption_column)])
    if isinstance(dataset.features[image_column], datasets.Image):
        # decode ourselves, so that an unreadable file is counted instead of raising inside datasets
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    names = {image_column: "image", **({caption_column: "caption"} if caption_column else {})}
    return dataset.rename_columns({k: v for k, v in names.items() if k != v})


def _table(path: str, image_column: str, caption_column: Optional[str], image_root: Optional[str],
           label_columns: Sequence[str] = ()) -> datasets.Dataset:
    root = image_root or os.path.dirname(os.path.abspath(path))
    if path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            rows = [_json_row(line) for line in f if line.strip()]
    elif path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"an image list must be a .jsonl or .csv file, got {path!r}")
    columns = {"image": [_join(root, row.get(image_column)) for row in rows]}
    features = {"image": Value("string")}
    if caption_column:
        columns["caption"] = [_text(row.get(caption_column)) for row in rows]
        features["caption"] = Value("string")
    missing = [name for name in label_columns if not any(name in row for row in rows)]
    if missing:
        raise ValueError(f"no record of {path} has the label column(s) {missing}")
    for name in label_columns:
        columns[name], features[name] = [_text(row.get(name)) for row in rows], Value("string")
    return datasets.Dataset.from_dict(columns, features=Features(features))


def _tar_shards(pattern: str, caption_column: Optional[str], label_columns: Sequence[str] = ()) -> datasets.Dataset:
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no .tar shards match {pattern!r}")
    dataset = datasets.load_dataset("webdataset", data_files={"train": files}, split="train")
    present = [ext for ext in IMAGE_EXTENSIONS if ext in dataset.column_names]
    if not present:
        raise ValueError(f"the shards {pattern!r} hold no image files (members: {dataset.column_names}); expected one "
                         f"of the extensions {IMAGE_EXTENSIONS}")
    for ext in present:
        if isinstance(dataset.features[ext], datasets.Image):
            dataset = dataset.cast_column(ext, datasets.Image(decode=False))

    def merge(row: dict) -> dict:
        image = next((row[ext] for ext in present if row.get(ext) is not None), None)
        out = {"image": image}
        if caption_column:
            out["caption"] = _shard_caption(row, caption_column)
        for name in label_columns:
            out[name] = _shard_field(row, name)
        return out

    drop = [c for c in dataset.column_names if c not in ("image", "caption")]
    features = {"image": datasets.Image(decode=False), **({"caption": Value("string")} if caption_column else {}),
                **{name: Value("string") for name in label_columns}}
    return dataset.map(merge, remove_columns=drop, features=Features(features), desc="reading shards")


def _shard_caption(row: dict, caption_column: str) -> str:
    """A shard sample's caption: its ``.txt`` member, or ``caption_column`` of its ``.json`` member."""
    if isinstance(row.get("txt"), str):
        return row["txt"].strip()
    return _shard_json_field(row, caption_column)


def _shard_field(row: dict, name: str) -> str:
    """A shard sample's ``name``: its member of that extension (``.cls``), or that field of its ``.json`` member."""
    value = row.get(name)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if value is not None:
        return _text(value).strip()
    return _shard_json_field(row, name)


def _shard_json_field(row: dict, name: str) -> str:
    """Field ``name`` of a shard sample's ``.json`` member (``""`` without one, or when it is not a JSON object)."""
    meta = row.get("json")
    if isinstance(meta, (bytes, str)):
        try:
            meta = json.loads(meta)
        except ValueError:
            meta = None
    return _text(meta.get(name)) if isinstance(meta, dict) else ""


def _json_row(line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return {}  # counted as a malformed record
    return row if isinstance(row, dict) else {}


def _join(root: str, path: Any) -> Optional[str]:
    if not isinstance(path, str) or not path:
        return None
    return path if os.path.isabs(path) else os.path.join(root, path)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def open_image(value: Any) -> tuple[Optional[Image.Image], str, str]:
    """Decode one ``image`` value -> ``(RGB image or None, bad-record reason, detail)``; the reason is ``""`` for a
    good image, else ``malformed_record`` (no image), ``missing_image`` or ``unreadable_image``."""
    source = (value.get("bytes") or value.get("path")) if isinstance(value, dict) else value
    if source is None:
        return None, "malformed_record", "no image"
    if isinstance(source, str) and not os.path.isfile(source):
        return None, "missing_image", source
    try:
        return load_image(source), "", ""
    except Exception as error:  # noqa: BLE001 - one bad file (decompression bomb, odd codec) must not end a run
        kind = "" if isinstance(error, ImageLoadError) else f"{type(error).__name__}: "
        return None, "unreadable_image", f"{kind}{error}"[:200]
