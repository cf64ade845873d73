"""Training records of the ``llm`` stage: images encoded once into ``image_ids`` with their captions, from the
shapes data or from a folder written by ``vtok pretokenize`` (memory-mapped Arrow), checked against the visual
tokenizer's fingerprint. A pre-tokenized folder of captions gives :class:`~mllm.data.tasks.Record` s (every task);
one of documents or conversations gives :class:`~mllm.data.tasks.Document` s or
:class:`~mllm.data.tasks.Conversation` s, which feed their own task only (``interleaved``, ``instruction``)."""

from __future__ import annotations

import json
import sys
from typing import Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from tokenizer_bridge import VisualTokenizer
from tokenizer_bridge.image_processing_visual_tokenizer import to_pixel_values
from tokenizer_bridge.interface import image_ids_shape

from ..training.recipe import Recipe
from . import shapes
from .pretokenize import dataset_kind, load_pretokenized
from .tasks import (
    PLACEHOLDER,
    TASK_OF_KIND,
    Conversation,
    Document,
    Record,
    compress_pixels,
)


@torch.no_grad()
def encode_images(visual_tokenizer: VisualTokenizer, images, batch_size: int = 256,
                  compressed: bool = False) -> torch.LongTensor:
    """PIL images -> image ids ``(n, h, w)``, batched, with a progress bar; ``compressed`` encodes the images'
    :func:`~mllm.data.tasks.compress_pixels` form instead (the decompression task's prompt)."""
    ids = []
    for start in tqdm(range(0, len(images), batch_size), desc="encode images", mininterval=2):
        pixels = to_pixel_values(images[start : start + batch_size])
        ids.append(visual_tokenizer.encode(compress_pixels(pixels) if compressed else pixels))
    return torch.cat(ids)



class Records:
    """The training records as columns: captions, image ids ``(n, h, w)`` and optional compressed ids."""

    kind = "captions"

    def __init__(self, captions: list[str], image_ids: torch.Tensor, compressed_ids: Optional[torch.Tensor] = None):
        self.captions, self.image_ids, self.compressed_ids = captions, image_ids, compressed_ids

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> Record:
        compressed = self.compressed_ids[i] if self.compressed_ids is not None else None
        return Record(self.captions[i], self.image_ids[i], compressed)

    @property
    def texts(self) -> list[str]:
        """Every text of the records (the words a word-level vocabulary needs): the captions."""
        return self.captions



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

    kind = "captions"

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

    @property
    def texts(self) -> list[str]:
        """Every text of the records (the words a word-level vocabulary needs): the captions."""
        return self.captions


class ArrowDocuments:
    """The documents or conversations of a pre-tokenized dataset, read one at a time from the memory-mapped Arrow
    files like :class:`ArrowRecords`: record ``i`` is a :class:`~mllm.data.tasks.Document` or
    :class:`~mllm.data.tasks.Conversation` whose images are int64 tensors of ``id_shape`` (``(h, w[, L])`` or
    ``(N[, L])``), in the order of the ``<image>`` placeholders of its stored ``record`` JSON (see
    :mod:`mllm.data.pretokenize`)."""

    def __init__(self, dataset, kind: str, id_shape: tuple):
        if kind not in TASK_OF_KIND:
            raise ValueError(f"ArrowDocuments reads documents or conversations, not {kind!r}")
        missing = sorted({"record", "image_ids"} - set(dataset.column_names))
        if missing:
            raise ValueError(f"the pre-tokenized dataset has no column(s) {missing} (it has {dataset.column_names})")
        self.dataset = dataset.select_columns(["record", "image_ids"]).with_format("numpy")
        self.kind, self.id_shape = kind, tuple(id_shape)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Union[Document, Conversation]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} is out of range for {len(self)} records")
        row = self.dataset[int(i) % len(self)]
        record = json.loads(str(row["record"]))
        ids = np.asarray(row["image_ids"], dtype=np.int64)  # (n, *id_shape); an empty list comes as objects
        ids = torch.from_numpy(ids.reshape(-1, *self.id_shape))
        images = iter(ids)
        if self.kind == "documents":
            items = tuple(next(images) if item == PLACEHOLDER else item for item in record["content"])
            return Document(items, record["prefix"])
        return Conversation(tuple(record["messages"]), tuple(images))

    @property
    def texts(self) -> list[str]:
        """Every text of the records, placeholders removed (the words a word-level vocabulary needs)."""
        texts = []
        for raw in self.dataset.with_format(None)["record"]:
            record = json.loads(raw)
            parts = record["content"] if self.kind == "documents" else [m["content"] for m in record["messages"]]
            texts += [p.replace(PLACEHOLDER, " ").strip() for p in parts if p != PLACEHOLDER]
        return [t for t in texts if t]



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



def pretokenized_records(recipe: Recipe, visual_tokenizer: VisualTokenizer) -> Union[ArrowRecords, ArrowDocuments]:
    """The first ``data.num_train`` records of a ``vtok pretokenize`` dataset, refused unless its ids were made by
    ``visual_tokenizer`` and fit ``data.image_size`` and, for documents or conversations, the mixture holds their own
    task only; read lazily from the memory-mapped dataset (see :class:`ArrowRecords`, :class:`ArrowDocuments`)."""
    data = recipe.data
    dataset = load_pretokenized(data.path, visual_tokenizer.fingerprint())
    if not len(dataset):
        raise ValueError(f"the pre-tokenized dataset {data.path} has no records")
    kind = dataset_kind(dataset)
    check_mixture(kind, data.tasks, data.path)
    grid = image_ids_shape(visual_tokenizer, data.image_size)  # (h, w[, L]) or, for slot tokenizers, (N[, L])
    if kind == "captions":
        found = tuple(torch.as_tensor(dataset[0]["image_ids"]).shape)
    else:
        found = stored_id_shape(dataset.features["image_ids"].feature)
    if found != grid:
        raise ValueError(f"the pre-tokenized ids in {data.path} are {found} grids but data.image_size="
                         f"{data.image_size} gives {grid}: set data.image_size to the size vtok pretokenize used")
    if uses(data.tasks, "decompression") and "compressed_ids" not in dataset.column_names:
        raise ValueError(f"the mixture has decompression but {data.path} has no compressed_ids: pre-tokenize it with "
                         "--compressed")
    n = min(data.num_train, len(dataset)) if data.num_train > 0 else len(dataset)
    what = "records" if kind == "captions" else kind
    print(f"training on {n} of {len(dataset)} pre-tokenized {what} from {data.path}", file=sys.stderr)
    subset = dataset.select(range(n)) if n < len(dataset) else dataset
    if kind != "captions":
        return ArrowDocuments(subset, kind, grid)
    return ArrowRecords(subset, compressed="compressed_ids" in dataset.column_names)


def check_mixture(kind: str, tasks: dict, path: str) -> None:
    """Documents train ``interleaved`` and conversations ``instruction``, nothing else; captions train every task."""
    own = TASK_OF_KIND.get(kind)
    others = sorted(name for name, weight in tasks.items() if weight > 0 and name != own)
    if own is not None and (others or not uses(tasks, own)):
        raise ValueError(f"{path} holds pre-tokenized {kind}, which feed the {own} task only, but data.tasks is "
                         f"{tasks}: set data.tasks to {{{own}: 1}} (other tasks need a dataset of captions)")


def stored_id_shape(feature) -> tuple:
    """The shape of one image's ids from the ``image_ids`` feature (an ``ArrayND`` or a fixed-length list)."""
    shape = getattr(feature, "shape", None)
    return tuple(shape) if shape is not None else (feature.length,)



RECORD_SOURCES = {"shapes": shapes_records, "pretokenized": pretokenized_records}
