"""train.report_to: the loop logs through accelerate's trackers beside log.jsonl; the tensorboard event file holds the
same per-step values, and a bad tracker name is refused before training."""

from __future__ import annotations

import json

import pytest

from mllm.training.loop import run
from mllm.training.recipe import load_recipe

TINY = ["model.base_channels=8", "model.latent_dim=8", "model.codebook_size=16", "data.num_train=32",
        "train.batch_size=8", "train.log_every=1", "train.warmup_steps=0", "train.steps=3"]


def test_tensorboard_events_hold_the_logged_losses(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(load_recipe("recipes/tokenizer_conv_vq.yaml", [f"output_dir={tmp_path}", *TINY, "train.report_to=tensorboard"]))
    logged = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    files = list((tmp_path / "tracking").rglob("events.out.tfevents.*"))
    assert files, "no tensorboard event file under output_dir/tracking"
    events = EventAccumulator(str(files[0].parent))
    events.Reload()
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == [1, 2, 3]
    assert [e.value for e in losses] == pytest.approx([r["loss"] for r in logged], rel=1e-6)
    assert "psnr" in events.Tags()["scalars"]


def test_an_unknown_tracker_is_refused(tmp_path):
    with pytest.raises(ValueError, match="report_to must be one of"):
        run(load_recipe("recipes/tokenizer_conv_vq.yaml", [f"output_dir={tmp_path}", *TINY, "train.report_to=mlflw"]))


def test_eval_every_logs_heldout_metrics_and_writes_pictures(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from PIL import Image

    recipe = load_recipe("recipes/tokenizer_conv_vq.yaml", [f"output_dir={tmp_path}", *TINY, "train.eval_every=2",
                                                           "data.eval_size=4", "train.report_to=tensorboard"])
    _, history = run(recipe)
    logged = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in logged] == [1, 2, 3]  # one line per step, eval metrics inside it
    assert [("eval_loss" in r, "eval_psnr" in r) for r in logged] == [(False, False), (True, True), (True, True)]
    for step in (2, 3):  # every eval_every steps and at the end
        picture = Image.open(tmp_path / "samples" / f"step-{step}.png")
        assert picture.width > 4 * 32 and picture.height > 2 * 32  # 4 held-out images over their reconstructions
    files = list((tmp_path / "tracking").rglob("events.out.tfevents.*"))
    events = EventAccumulator(str(files[0].parent))
    events.Reload()
    assert [e.step for e in events.Scalars("eval_psnr")] == [2, 3] and events.Tags()["images"]


def test_images_source_holds_out_its_last_records(tmp_path):
    import numpy as np
    from PIL import Image

    from mllm.data.image_batches import ImageBatches
    from mllm.data.sources import read_images

    for i in range(10):
        Image.fromarray(np.full((20, 20, 3), i * 20, np.uint8)).save(tmp_path / f"{i}.png")
    source = read_images(str(tmp_path))
    batches = ImageBatches(source, 8, 4, holdout=3)
    assert len(batches) == 7
    seen = {round(float(v), 3) for step in range(20) for v in batches.batch(step)["pixel_values"].mean((1, 2, 3))}
    held = {round(float(v), 3) for v in batches.heldout_pixel_values().mean((1, 2, 3))}
    assert len(held) == 3 and not seen & held  # the held-out images never appear in a training batch


TINY_LLM = ["model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=1",
            "model.config.num_attention_heads=2", "model.config.num_key_value_heads=2"]


def tiny_llm_recipe(tmp_path, *extra):
    import torch

    from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig

    torch.manual_seed(0)
    config = VisualTokenizerConfig(base_channels=8, latent_dim=8, codebook_size=16, downsample=8, image_size=32)
    VisualTokenizer(config).save_pretrained(tmp_path / "vt")
    return load_recipe("recipes/demo_llm.yaml", [
        f"output_dir={tmp_path / 'llm'}", f"visual_tokenizer={tmp_path / 'vt'}", "data.num_train=16",
        "train.batch_size=4", "train.steps=3", "train.warmup_steps=0", "train.lr=0.01", "train.log_every=1",
        "train.save_every=0", *TINY_LLM, *extra])


def test_llm_eval_every_logs_a_heldout_loss_and_samples_for_fixed_prompts(tmp_path, monkeypatch):
    from PIL import Image

    from mllm.training.loop import build_stage
    from mllm.training.stages import llm

    recipe = tiny_llm_recipe(tmp_path, "train.eval_every=2", "data.eval_size=4",
                             "data.tasks={captioning: 1.0, text_to_image: 1.0}")
    stage = build_stage(recipe)
    drawn = []
    original = llm.step_indices
    monkeypatch.setattr(llm, "step_indices", lambda step, b, n, seed: drawn.append(n) or original(step, b, n, seed))
    stage.batch_for_step(0, 0, 1)
    assert drawn == [12]  # batches draw from the first 12 of the 16 records; the last 4 are held out
    first, again = stage.evaluate_fn(stage.model.eval()), stage.evaluate_fn(stage.model)
    assert first[0]["loss"] == again[0]["loss"] > 0  # the same held-out examples every time
    assert first[1].height > 2 * 96  # held-out images with captions over images generated from them

    run(recipe)
    logged = [json.loads(line) for line in open(tmp_path / "llm" / "log.jsonl")]
    assert [("eval_loss" in r) for r in logged] == [False, True, True]
    assert all(r["eval_loss"] > 0 for r in logged[1:])
    for step in (2, 3):
        assert Image.open(tmp_path / "llm" / "samples" / f"step-{step}.png").width > 4 * 96


def test_llm_eval_refuses_a_heldout_split_that_leaves_nothing_to_train(tmp_path):
    from mllm.training.loop import build_stage

    with pytest.raises(ValueError, match="data.eval_size=16 held-out records leave none of the 16 records"):
        build_stage(tiny_llm_recipe(tmp_path, "train.eval_every=2", "data.eval_size=16"))
