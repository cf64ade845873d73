"""The repairing parse reports every repair it makes (tokenizer_bridge/vocab/repair.py)."""

from __future__ import annotations

import pytest
import torch

from tokenizer_bridge.vocab.image_vocab import ImageVocab
from tokenizer_bridge.vocab.spans import MalformedImageSpanError

GRID = ImageVocab(offset=53, codebook_size=16, boi_token_id=50, eoi_token_id=51, eol_token_id=52, grid_size=(3, 4))
LEVELS = ImageVocab(offset=53, codebook_size=8, boi_token_id=50, eoi_token_id=51, eol_token_id=52, grid_size=(2, 3),
                    num_levels=2, level_order="level")


@pytest.mark.parametrize("vocab", [GRID, LEVELS], ids=["grid", "level_passes"])
def test_a_closed_span_missing_its_last_eol_is_reported_as_repaired(vocab):
    image_ids = torch.randint(0, vocab.codebook_size, (*vocab.grid_size, vocab.num_levels)).squeeze(-1)
    span = vocab.build_span(image_ids)
    without_eol = torch.cat([span[:-2], span[-1:]])  # ... last row <eoi>
    with pytest.raises(MalformedImageSpanError):
        vocab.parse_span(without_eol)
    parsed = vocab.repair_span(without_eol)
    rows = vocab.grid_size[0] * (vocab.num_levels if vocab.level_order == "level" else 1)
    assert parsed.repairs == [f"added the missing <eol> of row {rows - 1}"]
    assert parsed.report != "well formed"
    assert torch.equal(parsed.image_ids, image_ids)


def test_repairs_are_empty_only_for_well_formed_spans():
    span = GRID.build_span(torch.arange(12).reshape(3, 4))
    assert GRID.repair_span(span).repairs == []
    for cut in range(1, span.numel() - 1):  # drop any one inner token, keep <eoi>
        broken = torch.cat([span[:cut], span[cut + 1:]])
        assert GRID.repair_span(broken).repairs, f"dropping token {cut} went unreported"
