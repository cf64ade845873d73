"""What 857d9dc wrote still reads the same: every ``image_vocab.json`` layout and every recipe.

Fixtures: ``tests/fixtures/compat_857d9dc/image_vocabs/<layout>/`` (``image_vocab.json`` saved by ``bridge_llm`` at
857d9dc, and ``expected.json``: the image ids of one image, the span that version built from them and its sizes) and
``tests/fixtures/compat_857d9dc/recipes/`` (the recipes of that version and their ``recipe_to_dict``), written by
``written_by.py.txt``. Recipe sections have gained options since (e.g. ``data.image_column``), so a recipe's dict is
compared value by value: everything recorded must be there unchanged, new keys may be added.
"""

import json
from pathlib import Path

import pytest
import torch

from tokenizer_bridge import ImageLayout, ImageVocab
from tokenizer_bridge.vocab.image_vocab import IMAGE_VOCAB_NAME
from mllm.training.recipe import image_vocab_recipe, load_recipe, recipe_to_dict

ROOT = Path(__file__).resolve().parents[2] / "fixtures" / "compat_857d9dc"
VOCABS = sorted((ROOT / "image_vocabs").iterdir())
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def expected(folder: Path) -> dict:
    return json.loads((folder / "expected.json").read_text())


def test_every_fixture_is_found():
    assert len(VOCABS) == 8 and len(RECIPES) == 4


@pytest.mark.parametrize("folder", VOCABS, ids=lambda p: p.name)
def test_image_vocab_loads_and_spells_the_recorded_span(folder):
    vocab = ImageVocab.from_pretrained(folder)
    want = expected(folder)
    image_ids = torch.tensor(want["image_ids"])
    assert vocab.build_span(image_ids).tolist() == want["span"]
    assert torch.equal(vocab.parse_span(torch.tensor(want["span"])), image_ids)
    assert vocab.num_image_tokens == want["num_image_tokens"]
    assert vocab.span_length == want["span_length"]
    if want["id_range"] is None:
        assert vocab.is_unified
        with pytest.raises(ValueError, match="no image id range"):
            vocab.id_range
    else:
        assert list(vocab.id_range) == want["id_range"]


@pytest.mark.parametrize("folder", VOCABS, ids=lambda p: p.name)
def test_image_vocab_round_trips_in_the_format_it_was_read_in(folder, tmp_path):
    vocab = ImageVocab.from_pretrained(folder)
    vocab.save_pretrained(tmp_path)
    again = ImageVocab.from_pretrained(tmp_path)
    assert again == vocab
    assert again.build_span(torch.tensor(expected(folder)["image_ids"])).tolist() == expected(folder)["span"]
    # the file written now has exactly the fields of the file 857d9dc wrote (so that version reads it too)
    old = json.loads((folder / IMAGE_VOCAB_NAME).read_text())
    assert json.loads((tmp_path / IMAGE_VOCAB_NAME).read_text()) == old


@pytest.mark.parametrize("folder", VOCABS, ids=lambda p: p.name)
def test_the_layout_of_a_loaded_vocab_builds_the_same_vocab(folder):
    vocab = ImageVocab.from_pretrained(folder)
    layout = vocab.image_layout
    assert isinstance(layout, ImageLayout) and not isinstance(layout, ImageVocab)
    ids = {name: getattr(vocab, name) for name in set(vocab.__dataclass_fields__) - set(layout.__dataclass_fields__)}
    assert ImageVocab.from_layout(layout, **ids) == vocab


def assert_holds(now, recorded, where="recipe"):
    """Every value ``recorded`` has is in ``now``; ``now`` may hold more keys (sections that gained options since
    857d9dc: their defaults are not what the user wrote)."""
    if isinstance(recorded, dict):
        assert isinstance(now, dict), where
        for key, value in recorded.items():
            assert key in now, f"{where}.{key} is gone"
            assert_holds(now[key], value, f"{where}.{key}")
    else:
        assert now == recorded, where


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_to_the_recorded_values(path):
    recipe = load_recipe(path)
    recorded = json.loads((path.parent / f"{path.stem}.expected.json").read_text())
    now = json.loads(json.dumps(recipe_to_dict(recipe), default=str))
    assert_holds(now, recorded)
    assert now["model"] == recorded["model"]  # the model section (with model.image_vocab) is kept as written
    if recipe.stage == "llm":
        image_vocab_recipe(recipe.model)  # the model.image_vocab section (absent in these) is read the same way
