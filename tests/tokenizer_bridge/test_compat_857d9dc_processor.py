"""A processor folder written by the code at 857d9dc (tests/fixtures/compat_857d9dc/processor, no weights) still loads
and encodes exactly as it did: the saved tokenizer, image processor, image_vocab.json and visual-tokenizer config."""

import json
from pathlib import Path

import pytest
import torch

from tokenizer_bridge import UnifiedProcessor, VisualTokenizer, VisualTokenizerConfig

FOLDER = Path(__file__).resolve().parents[1] / "fixtures" / "compat_857d9dc" / "processor"


def filled(model):
    """The deterministic weights the fixture was written with (see written_by.py.txt)."""
    state = {}
    for i, (name, value) in enumerate(sorted(model.state_dict().items())):
        if value.is_floating_point():
            ramp = torch.arange(value.numel(), dtype=torch.float64).reshape(value.shape)
            value = (ramp * 0.001 + i * 0.01).sin().to(value.dtype)
        state[name] = value
    model.load_state_dict(state)
    return model.eval()


def test_a_processor_saved_by_857d9dc_loads_and_encodes_the_same_batch():
    config = VisualTokenizerConfig.from_pretrained(FOLDER / "visual_tokenizer")
    vt = filled(VisualTokenizer(config))
    processor = UnifiedProcessor.from_pretrained(FOLDER, visual_tokenizer=vt)  # fingerprint checked against the vocab
    assert processor.image_vocab.tokenizer_fingerprint == vt.fingerprint()
    image_ids = vt.encode(torch.zeros(1, 3, 32, 32))
    batch = processor(text=["<image> caption:"], target=["a red circle at the top left"], image_ids=image_ids,
                      return_tensors="pt", padding=True)
    expected = json.loads((FOLDER / "expected_batch.json").read_text())
    assert sorted(batch) == sorted(expected)
    for name, values in expected.items():
        assert batch[name].tolist() == values, name
    parts = processor.decode(batch["input_ids"][0])
    assert parts[-1].strip().endswith("a red circle at the top left")


def test_the_857d9dc_processor_refuses_a_different_visual_tokenizer():
    config = VisualTokenizerConfig.from_pretrained(FOLDER / "visual_tokenizer")
    other = VisualTokenizer(config).eval()  # random weights: another tokenizer
    with pytest.raises(ValueError, match="fingerprint"):
        UnifiedProcessor.from_pretrained(FOLDER, visual_tokenizer=other)
