"""The llm stage reads pre-tokenized ids lazily from the memory-mapped dataset: the records equal the in-memory
columns the stage used to build, no id tensor is ever materialised, and the stages' batches are unchanged."""

import json

import datasets
import numpy as np
import pytest
import torch

from mllm.data import pretokenize as pt
from mllm.data import shapes
from mllm.data.records import ArrowRecords, Records, pretokenized_records
from mllm.training.recipe import load_recipe
from mllm.training.stages import llm as llm_data
from mllm.training.stages.llm import build_llm_stage
from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig

NUM_RECORDS = 12


@pytest.fixture(scope="module")
def pretokenized(tmp_path_factory):
    """12 shapes images pre-tokenized in 3 shards (several Arrow files) with compressed ids: (tokenizer dir, data dir)."""
    root = tmp_path_factory.mktemp("mmap")
    torch.manual_seed(0)
    config = VisualTokenizerConfig(base_channels=8, latent_dim=8, codebook_size=16, downsample=8, image_size=32)
    VisualTokenizer(config).save_pretrained(root / "vt")
    rng = np.random.default_rng(0)
    specs = [shapes.ShapeSpec(c, s, p) for c in ("red", "blue") for s in shapes.SHAPES for p in shapes.POSITIONS]
    lines = []
    for k, spec in enumerate(specs[:NUM_RECORDS]):
        shapes.render(spec, size=32, rng=rng).save(root / f"{k}.png")
        lines.append(json.dumps({"image": f"{k}.png", "caption": spec.caption}))
    (root / "captions.jsonl").write_text("\n".join(lines))
    settings = pt.PretokenizeSettings(visual_tokenizer=str(root / "vt"), compressed=True, shard_size=5)
    pt.pretokenize(str(root / "captions.jsonl"), str(root / "out"), settings)
    return root / "vt", root / "out"


def recipe_for(tmp_path, pretokenized, *extra):
    vt, data = pretokenized
    return load_recipe("recipes/demo_llm.yaml", [
        f"output_dir={tmp_path / 'llm'}", f"visual_tokenizer={vt}", "data.dataset=pretokenized", f"data.path={data}",
        "train.batch_size=6", "model.config.hidden_size=32", "model.config.intermediate_size=64",
        "model.config.num_hidden_layers=1", "model.config.num_attention_heads=2", "model.config.num_key_value_heads=2",
        *extra])


def in_memory_records(recipe, visual_tokenizer) -> Records:
    """The records as the stage built them before: every column read into one tensor."""
    dataset = pt.load_pretokenized(recipe.data.path, visual_tokenizer.fingerprint())
    n = min(recipe.data.num_train, len(dataset)) if recipe.data.num_train > 0 else len(dataset)
    columns = dataset.select(range(n)).with_format("numpy")[:]
    compressed = torch.as_tensor(columns["compressed_ids"]) if "compressed_ids" in columns else None
    return Records(list(columns["caption"]), torch.as_tensor(columns["image_ids"]), compressed)


@pytest.mark.parametrize("num_train", [0, 7])
def test_lazy_records_equal_the_in_memory_records(tmp_path, pretokenized, num_train):
    recipe = recipe_for(tmp_path, pretokenized, f"data.num_train={num_train}")
    vt = VisualTokenizer.from_pretrained(recipe.visual_tokenizer)
    records, expected = pretokenized_records(recipe, vt), in_memory_records(recipe, vt)
    assert isinstance(records, ArrowRecords)
    assert len(records) == len(expected) == (num_train or NUM_RECORDS)
    for i in [*range(len(records)), -1]:
        got, want = records[i], expected[i]
        assert type(got.caption) is str and got.caption == want.caption
        for name in ("image_ids", "compressed_ids"):
            a, b = getattr(got, name), getattr(want, name)
            assert a.dtype == b.dtype and a.shape == b.shape == (4, 4) and torch.equal(a, b), name
    assert records.captions == expected.captions
    with pytest.raises(IndexError, match=f"record {len(records)} is out of range"):
        records[len(records)]


def test_lazy_records_hold_no_id_tensor(tmp_path, pretokenized):
    recipe = recipe_for(tmp_path, pretokenized, "data.num_train=0")
    records = pretokenized_records(recipe, VisualTokenizer.from_pretrained(recipe.visual_tokenizer))
    records[3], records.captions  # noqa: B018 (reading records and captions caches no ids)
    held = [name for name, value in vars(records).items() if isinstance(value, (torch.Tensor, np.ndarray))]
    assert held == []
    table = records.dataset.data  # the Arrow table stays memory-mapped from the shard files
    blocks = [b for row in getattr(table, "blocks", [[table]]) for b in row]
    assert blocks and all(isinstance(b, datasets.table.MemoryMappedTable) for b in blocks)
    assert records.dataset.column_names == ["caption", "image_ids", "compressed_ids"]

    with pytest.raises(ValueError, match="no column\\(s\\) \\['compressed_ids'\\]"):
        ArrowRecords(records.dataset.remove_columns("compressed_ids"), compressed=True)


@pytest.mark.parametrize("extra", [[], ["model.depth_head=true"]], ids=["llm", "depth_head"])
def test_stage_batches_are_unchanged(tmp_path, pretokenized, monkeypatch, extra):
    recipe = recipe_for(tmp_path, pretokenized, "data.num_train=10", *extra)
    lazy = build_llm_stage(recipe).batch_for_step(1, 0, 1)
    monkeypatch.setitem(llm_data.RECORD_SOURCES, "pretokenized", in_memory_records)
    eager = build_llm_stage(recipe).batch_for_step(1, 0, 1)
    assert lazy.keys() == eager.keys()
    for key in lazy:
        assert torch.equal(lazy[key], eager[key]) if torch.is_tensor(lazy[key]) else lazy[key] == eager[key], key
