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
