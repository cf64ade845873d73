"""kill -9 at points picked from a run's own progress, then a plain re-run: training and pre-tokenization end exactly
where uninterrupted runs end. Kill points: as soon as a checkpoint folder appears (inside or just after its save), as
soon as final/ appears (inside the final save), and as soon as a pre-tokenization shard is being written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from mllm.training.loop import run
from mllm.training.recipe import load_recipe
from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.base_channels=8", "model.latent_dim=8", "model.codebook_size=16", "data.num_train=64",
        "train.batch_size=8", "train.log_every=1", "train.warmup_steps=0", "train.steps=8", "train.save_every=2"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def kill_when(command: list[str], reached, timeout: float = 240.0) -> bool:
    """Start ``command``; SIGKILL it the moment ``reached()`` holds. False if it finished first."""
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        if reached():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.002)
    process.kill()
    return False


def train_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "mllm.train", "recipes/tokenizer_conv_vq.yaml", f"output_dir={out}", *TINY]


def weights(path) -> dict:
    return VisualTokenizer.from_pretrained(path).state_dict()


@pytest.mark.parametrize("point", ["checkpoint-4", "final"])
def test_training_killed_at_its_own_progress_resumes_exactly(tmp_path, point):
    reference, _ = run(load_recipe("recipes/tokenizer_conv_vq.yaml", [f"output_dir={tmp_path / 'ref'}", *TINY]))
    out = tmp_path / "killed"
    killed = kill_when(train_command(out), lambda: (out / point).exists())
    assert killed, f"the run finished before {point} appeared"
    assert not (out / "final" / "recipe.yaml").exists()  # the kill landed before the run was complete
    final, history = run(load_recipe("recipes/tokenizer_conv_vq.yaml", [f"output_dir={out}", *TINY]))
    a, b = weights(reference), weights(final)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert steps == list(range(1, 9))  # every step logged once, across the kill


def test_pretokenization_killed_inside_a_shard_write_resumes_to_the_same_dataset(tmp_path):
    from mllm.data import shapes
    from mllm.data.pretokenize import PretokenizeSettings, pretokenize

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    lines = []
    for k in range(40):
        spec = shapes.ShapeSpec("red", shapes.SHAPES[k % 3], shapes.POSITIONS[k % 4])
        shapes.render(spec, size=32, rng=rng).save(tmp_path / "img" / f"{k}.png")
        lines.append(json.dumps({"image": f"img/{k}.png", "caption": spec.caption}))
    source = tmp_path / "captions.jsonl"
    source.write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    VisualTokenizer(VisualTokenizerConfig(base_channels=8, latent_dim=8, codebook_size=16, image_size=32)).save_pretrained(
        tmp_path / "vt")
    settings = PretokenizeSettings(visual_tokenizer=str(tmp_path / "vt"), shard_size=4)
    pretokenize(str(source), str(tmp_path / "ref"), settings, batch_size=2)
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "mllm.pretokenize", "--source", str(source), "--visual-tokenizer",
               str(tmp_path / "vt"), "--out", str(out), "--shard-size", "4", "--batch-size", "2"]
    shards = out / "shards"
    killed = kill_when(command, lambda: shards.is_dir() and any(p.name.endswith(".tmp") and p.name > "shard-00002"
                                                                 for p in shards.iterdir()))
    assert killed, "the run finished before its fourth shard was written"
    report = pretokenize(str(source), str(out), settings, batch_size=2)
    assert report.kept == 40
    a = datasets.load_from_disk(str(tmp_path / "ref" / "dataset")).with_format("numpy")[:]
    b = datasets.load_from_disk(str(out / "dataset")).with_format("numpy")[:]
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
