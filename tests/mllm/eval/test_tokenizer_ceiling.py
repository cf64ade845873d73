"""`tokenizer_ceiling`: the judge over ten jittered renders of each held-out spec, through a visual tokenizer."""

from __future__ import annotations

import torch

from mllm.data import shapes
from mllm.eval.llm import CEILING_RENDERS, tokenizer_ceiling


class PixelsAsIds:
    """A lossless stand-in for a visual tokenizer: its 'ids' are the pixels; `blank` decodes everything to black."""

    def __init__(self, blank: bool = False):
        self.blank, self.seen = blank, 0

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.seen += len(pixels)
        return pixels.clone()

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.full_like(ids, -1.0) if self.blank else ids


def test_a_lossless_tokenizer_reaches_one_over_ten_renders_per_heldout_spec():
    lossless = PixelsAsIds()
    result = tokenizer_ceiling(lossless, seed=0, size=32)
    assert lossless.seen == CEILING_RENDERS * len(shapes.make_splits(seed=0).heldout) == 420
    assert result == {"colour": 1.0, "shape": 1.0, "position": 1.0, "all": 1.0}


def test_a_tokenizer_that_loses_everything_scores_zero_and_fewer_renders_are_asked_for():
    blank = PixelsAsIds(blank=True)
    assert tokenizer_ceiling(blank, seed=0, size=32, renders_per_spec=2)["all"] == 0.0
    assert blank.seen == 84
