"""Packing: packed rows give each sample exactly its own logits; plans are complete, deterministic and tight."""

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mllm.data.packing import (
    IGNORE_INDEX,
    PackingCollator,
    PaddingCollator,
    flash_attn_kwargs,
    pack_ffd,
    pack_greedy,
    split_columns,
)

VOCAB = 40


def tiny_llama(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def samples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": ids, "image_loss_mask": [k % 3 == 0 for k in range(n)]})
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_per_sample_logits(attn):
    model = tiny_llama(attn)
    features = samples([5, 9, 3, 7, 1, 6])
    collator = PackingCollator(max_tokens=16)
    batch = collator(features)
    assert "attention_mask" not in batch and batch["use_cache"] is False
    rows = collator.plan([len(f["input_ids"]) for f in features])
    assert batch["input_ids"].shape[0] == len(rows) > 1 and batch["input_ids"].shape[1] <= 16
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "image_loss_mask")}
    with torch.no_grad():
        packed = model(**inputs).logits
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                ids = torch.tensor(features[i]["input_ids"])[None]
                alone = model(ids).logits[0]
                torch.testing.assert_close(packed[r, start : start + len(alone)], alone, atol=1e-5, rtol=1e-5)
                start += len(alone)


def test_packed_loss_equals_the_token_mean_over_samples():
    model = tiny_llama("sdpa")
    features = samples([5, 9, 3, 7, 6], seed=1)
    with torch.no_grad():
        packed = model(**{k: v for k, v in PackingCollator(max_tokens=16)(features).items() if k != "image_loss_mask"})
        sums = [model(torch.tensor(f["input_ids"])[None], labels=torch.tensor(f["labels"])[None]).loss
                * (len(f["input_ids"]) - 1) for f in features]
    n_targets = sum(len(f["input_ids"]) - 1 for f in features)
    torch.testing.assert_close(packed.loss, sum(sums) / n_targets, atol=1e-5, rtol=1e-5)


def test_positions_restart_and_labels_are_cut_at_boundaries():
    features = samples([3, 2, 4])
    batch = PackingCollator(max_tokens=10, strategy="greedy", pad_to_multiple_of=5)(features)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0]]  # last slot: padding, its own segment
    ids = [t for f in features for t in f["input_ids"]]
    labels = batch["labels"][0].tolist()
    assert [labels[k] for k in (0, 3, 5, 9)] == [IGNORE_INDEX] * 4
    assert [labels[k] for k in (1, 2, 4, 6, 7, 8)] == [ids[k] for k in (1, 2, 4, 6, 7, 8)]
    assert batch["input_ids"][0, :9].tolist() == ids and batch["input_ids"][0, 9] == 0
    mask = [m for f in features for m in f["image_loss_mask"]] + [False]
    assert batch["image_loss_mask"].dtype == torch.bool and batch["image_loss_mask"][0].tolist() == mask


def test_flash_attn_kwargs_mark_every_segment():
    batch = PackingCollator(max_tokens=10, strategy="greedy", return_flash_attn_kwargs=True)(samples([3, 2, 4, 8]))
    kwargs = flash_attn_kwargs(batch["position_ids"])
    assert batch["input_ids"].shape == (2, 9)  # rows are as wide as the fullest one: 3+2+4, then 8 + 1 padding
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 17, 18] == kwargs["cu_seq_lens_k"].tolist()
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["max_length_q"] == 8


def test_ffd_packs_tighter_than_greedy():
    lengths = [6, 6, 4, 4]
    assert pack_greedy(lengths, 10) == [[0], [1, 2], [3]]
    assert pack_ffd(lengths, 10) == [[0, 2], [1, 3]]
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(300)]
    assert len(pack_ffd(lengths, 64, buffer_size=300)) < len(pack_greedy(lengths, 64))


@pytest.mark.parametrize("strategy,buffer", [("greedy", 1024), ("ffd", 1024), ("ffd", 7)])
def test_plans_hold_every_sample_once_within_budget_and_are_deterministic(strategy, buffer):
    rng = random.Random(1)
    lengths = [rng.randint(1, 50) for _ in range(200)]
    collator = PackingCollator(max_tokens=50, strategy=strategy, buffer_size=buffer)
    rows = collator.plan(lengths)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 50 for row in rows)
    assert rows == collator.plan(list(lengths))
    if strategy == "ffd" and buffer == 7:  # rows never mix buffers
        assert all(len({i // 7 for i in row}) == 1 for row in rows)
    features = samples(lengths[:20], seed=2)
    first, second = collator(features), collator(features)
    assert all(torch.equal(first[k], second[k]) for k in first if torch.is_tensor(first[k]))


def test_oversize_samples_error_or_get_a_row_of_their_own():
    features = samples([4, 12, 3])
    with pytest.raises(ValueError, match="sample 1 has 12 tokens, more than max_tokens=8"):
        PackingCollator(max_tokens=8)(features)
    collator = PackingCollator(max_tokens=8, oversize="alone")
    assert collator.plan([4, 12, 3]) == [[1], [0, 2]]
    batch = collator(features)
    assert batch["input_ids"].shape == (2, 12) and batch["input_ids"][0].tolist() == features[1]["input_ids"]


def test_bad_settings_and_padded_samples_are_refused():
    with pytest.raises(ValueError, match="strategy must be one of"):
        PackingCollator(max_tokens=8, strategy="best")
    with pytest.raises(ValueError, match="already padded"):
        PackingCollator(max_tokens=8)([{"input_ids": [1, 2, 0], "attention_mask": [1, 1, 0]}])


def test_padding_collator_matches_the_processor_layout():
    features = split_columns({"input_ids": [[5, 6, 7], [8]], "labels": [[-100, 6, 7], [8]],
                              "image_loss_mask": [[False, True, False], [True]]})
    batch = PaddingCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["image_loss_mask"].tolist() == [[False, True, False], [True, False, False]]
    left = PaddingCollator(pad_token_id=0, padding_side="left", pad_to_multiple_of=4)(features)
    assert left["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]


def test_llm_stage_with_packing_and_weighted_loss_lowers_the_loss(tmp_path):
    from mllm.training.loop import run
    from mllm.training.recipe import load_recipe
    from mllm.training.stages.llm import build_llm_stage

    tok_path, _ = run(load_recipe("recipes/tokenizer_conv_vq.yaml", [
        f"output_dir={tmp_path / 'tok'}", "model.base_channels=8", "model.latent_dim=8", "model.codebook_size=16",
        "data.num_train=32", "train.batch_size=8", "train.steps=1"]))
    recipe = load_recipe("recipes/demo_llm.yaml", [
        f"output_dir={tmp_path / 'llm'}", f"visual_tokenizer={tok_path}", "data.num_train=64", "train.steps=40",
        "train.batch_size=16", "train.warmup_steps=0", "train.lr=0.003", "train.log_every=10", "train.save_every=0",
        "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=1",
        "data.packing=true", "data.max_tokens=128", "train.image_loss_weight=0.5", "train.z_loss_weight=0.0001"])
    stage = build_llm_stage(recipe)
    batch = stage.batch_for_step(3, 0, 1)
    again = stage.batch_for_step(3, 0, 1)
    assert all(torch.equal(batch[k], again[k]) for k in ("input_ids", "position_ids", "labels", "image_loss_mask"))
    assert "attention_mask" not in batch and batch["input_ids"].shape[1] <= 128
    assert batch["input_ids"].shape[0] < 16  # several samples per row
    _, history = run(recipe)
    first, last = sum(h["loss"] for h in history[:5]) / 5, sum(h["loss"] for h in history[-5:]) / 5
    assert last < 0.8 * first
    assert history[-1]["image_tokens"] > 0 and history[-1]["text_tokens"] > 0 and history[-1]["z_loss"] > 0


def test_training_benchmark_runs_on_a_few_samples():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[3] / "bench" / "training.py"
    spec = importlib.util.spec_from_file_location("bench_training", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = {r["mode"]: r for r in bench.run(bench.parse_args(["--samples", "24", "--max-captions", "8",
                                                               "--image-size", "32", "--rounds", "1"]))}
    assert {"padded", "packed", "packed_greedy", "hf_flattened"} <= set(rows)
    assert rows["packed"]["nonpad_fraction"] > rows["padded"]["nonpad_fraction"]
    assert rows["hf_flattened"]["nonpad_fraction"] == 1.0 and rows["packed"]["tokens_per_second"] > 0
