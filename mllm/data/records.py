"""Training records of the ``llm`` stage: images encoded once into ``image_ids`` with their captions, from the
shapes data or from a folder written by ``vtok pretokenize`` (memory-mapped Arrow), checked against the visual
tokenizer's fingerprint."""

from __future__ import annotations

import sys
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from tokenizer_bridge import VisualTokenizer
from tokenizer_bridge.image_processing_visual_tokenizer import to_pixel_values
from tokenizer_bridge.interface import image_ids_shape

from ..training.recipe import Recipe
from . import shapes
from .pretokenize import load_pretokenized
from .tasks import Record, compress_pixels


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

    def __init__(self, captions: list[str], image_ids: torch.Tensor, compressed_ids: Optional[torch.Tensor] = None):
        self.captions, self.image_ids, self.compressed_ids = captions, image_ids, compressed_ids

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> Record:
        compressed = self.compressed_ids[i] if self.compressed_ids is not None else None
        return Record(self.captions[i], self.image_ids[i], compressed)



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



def pretokenized_records(recipe: Recipe, visual_tokenizer: VisualTokenizer) -> ArrowRecords:
    """The first ``data.num_train`` records of a ``vtok pretokenize`` dataset, refused unless its ids were made by
    ``visual_tokenizer`` and fit ``data.image_size``; read lazily from the memory-mapped dataset (see
    :class:`ArrowRecords`)."""
    data = recipe.data
    dataset = load_pretokenized(data.path, visual_tokenizer.fingerprint())
    if not len(dataset):
        raise ValueError(f"the pre-tokenized dataset {data.path} has no records")
    grid = image_ids_shape(visual_tokenizer, data.image_size)  # (h, w[, L]) or, for slot tokenizers, (N[, L])
    found = tuple(torch.as_tensor(dataset[0]["image_ids"]).shape)
    if found != grid:
        raise ValueError(f"the pre-tokenized ids in {data.path} are {found} grids but data.image_size="
                         f"{data.image_size} gives {grid}: set data.image_size to the size vtok pretokenize used")
    if uses(data.tasks, "decompression") and "compressed_ids" not in dataset.column_names:
        raise ValueError(f"the mixture has decompression but {data.path} has no compressed_ids: pre-tokenize it with "
                         "--compressed")
    n = min(data.num_train, len(dataset)) if data.num_train > 0 else len(dataset)
    print(f"training on {n} of {len(dataset)} pre-tokenized records from {data.path}", file=sys.stderr)
    subset = dataset.select(range(n)) if n < len(dataset) else dataset
    return ArrowRecords(subset, compressed="compressed_ids" in dataset.column_names)



RECORD_SOURCES = {"shapes": shapes_records, "pretokenized": pretokenized_records}
