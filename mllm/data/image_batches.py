"""Training batches of ``pixel_values`` drawn from a user's image source (:func:`mllm.data.sources.read_images`).

The batch of step ``s`` is a pure function of ``(seed, s)``: which images (a seeded permutation per epoch, see
:func:`~mllm.training.stage.step_indices`), how each is cropped and flipped (a generator seeded by ``(seed, s, j)``),
and, for ViT encoders trained at several aspect ratios, which size bucket the step uses. A resumed run therefore sees
exactly the batches an uninterrupted one would, whatever the number of DataLoader workers. Images are decoded one by
one when their batch is built; memory does not depend on the size of the dataset.

Augmentation (per sample): a random resized crop (area fraction in ``crop_scale`` of the image, aspect ratio of the
output size jittered by ``aspect_jitter``), resized to the step's size, then a horizontal flip with probability 1/2.

An unreadable image (missing, truncated, not an image, a decompression bomb) is replaced by the next readable one of
the dataset (a deterministic probe) and counted: ``num_skipped`` in the batch, and a warning naming the file.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from tokenizer_bridge.image_processing_visual_tokenizer import to_pixel_values

from ..training.stage import shard_indices, step_indices
from .photos import center_resize
from .sources import open_image

logger = logging.getLogger(__name__)
MAX_PROBES = 64  # consecutive unreadable images tolerated before the source is declared unusable


class ImageBatches:
    """``batch(step, rank, world) -> {"pixel_values": (B_rank, 3, H, W), "num_skipped": ()}`` from an image source.

    Args:
        dataset: rows with an ``image`` column (path or ``{"bytes", "path"}``), e.g. from ``read_images``.
        image_size: output side (square), used when ``buckets`` is not given.
        batch_size: global batch size (split across ranks).
        seed: the run's seed; with the step it fixes every choice.
        crop_scale: ``(min, max)`` fraction of the image area a crop covers.
        buckets: optional ``[(H, W), ...]`` output sizes (aspect-ratio buckets for encoders that take any size);
            each step uses one, chosen by ``(seed, step)``.
        labels: optional label columns of ``dataset`` (read with ``read_images(..., label_columns=...)``): each
            batch then has ``labels`` ``(B_rank, K)``, the index of each record's value among the column's distinct
            values over the training records (sorted: ``label_values``), -1 where a record has none.
    """

    def __init__(self, dataset, image_size: int, batch_size: int, seed: int = 0,
                 crop_scale: Sequence[float] = (0.35, 1.0), aspect_jitter: float = 0.0,
                 buckets: Optional[Sequence[Sequence[int]]] = None, holdout: int = 0,
                 labels: Optional[Sequence[str]] = None):
        if len(dataset) <= holdout:
            raise ValueError(f"the image source holds {len(dataset)} images, not more than the {holdout} held out for "
                             "evaluation (data.eval_size)")
        low, high = (float(v) for v in crop_scale)
        if not 0 < low <= high <= 1:
            raise ValueError(f"data.crop_scale must satisfy 0 < min <= max <= 1, got {list(crop_scale)}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.image_size, self.holdout = image_size, int(holdout)  # the last `holdout` records are never trained on
        self.crop_scale, self.aspect_jitter = (low, high), float(aspect_jitter)
        self.buckets = [tuple(int(s) for s in b) for b in buckets] if buckets else [(image_size, image_size)]
        if any(len(b) != 2 or min(b) < 1 for b in self.buckets):
            raise ValueError(f"data.aspect_buckets must be [H, W] pairs, got {buckets}")
        self.label_values, self.label_index = self._label_table(list(labels or []))

    def _label_table(self, names: list) -> tuple[list, Optional[torch.Tensor]]:
        """Per label column: its sorted distinct values over the training records, and ``(N, K)`` indices."""
        if not names:
            return [], None
        values, columns = [], []
        for name in names:
            if name not in self.dataset.column_names:
                raise ValueError(f"the image source has no label column {name!r} (columns: "
                                 f"{self.dataset.column_names})")
            column = ["" if v is None else str(v).strip() for v in self.dataset[name]]
            distinct = sorted({v for v in column[:len(self)] if v})
            if len(distinct) < 2:
                raise ValueError(f"label column {name!r} has {len(distinct)} distinct value(s) over the training "
                                 "records; a label needs at least 2 classes")
            lookup = {v: i for i, v in enumerate(distinct)}
            values.append(distinct)
            columns.append([lookup.get(v, -1) for v in column])  # a held-out-only value counts as unlabelled
        return values, torch.tensor(columns, dtype=torch.long).T.contiguous()

    @property
    def label_classes(self) -> list:
        """Class count of each label column (``[]`` without labels)."""
        return [len(v) for v in self.label_values]

    def __len__(self) -> int:
        """Training records (the held-out ones excluded)."""
        return len(self.dataset) - self.holdout

    def heldout_pixel_values(self) -> torch.Tensor:
        """The held-out records, centre-cropped to ``image_size`` (unreadable ones skipped): ``(n, 3, S, S)``."""
        images = []
        for index in range(len(self), len(self.dataset)):
            image, _, _ = open_image(self.dataset[index]["image"])
            if image is not None:
                images.append(center_resize(image, self.image_size))
        if not images:
            raise ValueError("none of the held-out images (data.eval_size) could be read")
        return to_pixel_values(images)

    def size_for_step(self, step: int) -> tuple[int, int]:
        """The (H, W) of every image of ``step`` (one bucket per step, so a batch stacks)."""
        if len(self.buckets) == 1:
            return self.buckets[0]
        g = np.random.default_rng([self.seed, step, 7])
        return self.buckets[int(g.integers(len(self.buckets)))]

    def batch(self, step: int, rank: int = 0, world: int = 1) -> dict:
        indices = step_indices(step, self.batch_size, len(self), self.seed)
        positions = torch.arange(len(indices))
        mine, where = shard_indices(indices, rank, world), shard_indices(positions, rank, world)
        height, width = self.size_for_step(step)
        images, skipped, read = [], 0, []
        for index, position in zip(mine.tolist(), where.tolist()):
            image, record, misses = self._readable(index)
            skipped += misses
            read.append(record)
            rng = np.random.default_rng([self.seed, step, position])
            images.append(self.augment(image, height, width, rng))
        out = {"pixel_values": to_pixel_values(images), "num_skipped": torch.tensor(skipped)}
        if self.label_index is not None:  # the record actually read (a skipped image's label is its substitute's)
            out["labels"] = self.label_index[torch.tensor(read, dtype=torch.long)]
        return out

    def _readable(self, index: int) -> tuple[Image.Image, int, int]:
        """The image at ``index`` or, if it cannot be read, the next readable one; the record it came from; and how
        many were skipped."""
        for probe in range(MAX_PROBES):
            record = (index + probe) % len(self)
            image, reason, detail = open_image(self.dataset[record]["image"])
            if image is not None:
                return image, record, probe
            logger.warning("skipping an image (%s): %s", reason, detail)
        raise ValueError(f"{MAX_PROBES} consecutive images of the source could not be read (from record {index}); "
                         "check data.path")

    def augment(self, image: Image.Image, height: int, width: int, rng: np.random.Generator) -> Image.Image:
        """Random resized crop to ``height x width`` and a random horizontal flip."""
        w, h = image.size
        area = w * h * rng.uniform(*self.crop_scale)
        ratio = (width / height) * math.exp(rng.uniform(-self.aspect_jitter, self.aspect_jitter))
        crop_w = min(w, max(1.0, math.sqrt(area * ratio)))
        crop_h = min(h, max(1.0, math.sqrt(area / ratio)))
        left, top = rng.uniform(0, w - crop_w), rng.uniform(0, h - crop_h)
        box = (left, top, left + crop_w, top + crop_h)
        out = image.resize((width, height), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out
