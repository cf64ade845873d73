"""The tokenizer stage on a user's image source: trains from a folder and from tar shards, counts unreadable images in
its log, and resumes exactly with DataLoader workers."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mllm.training.loop import run
from mllm.training.recipe import load_recipe
from mllm.training.stages.tokenizer import tokenizer_stage
from tokenizer_bridge import VisualTokenizer

TINY = ["model.base_channels=8", "model.latent_dim=8", "model.codebook_size=16", "train.batch_size=4",
        "train.log_every=1", "train.warmup_steps=0", "data.image_size=16", "data.dataset=images"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_images")
    rng = np.random.default_rng(1)
    for i in range(20):
        size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def recipe(out, path, *extra):
    return load_recipe("recipes/tokenizer_conv_vq.yaml", [f"output_dir={out}", f"data.path={path}", *TINY, *extra])


def test_trains_from_an_image_folder_and_logs_skipped_images(tmp_path, folder):
    final, history = run(recipe(tmp_path, folder, "train.steps=12"))
    assert VisualTokenizer.from_pretrained(final).codebook_size == 16
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert sum(r["skipped_images"] for r in log) >= 1  # the broken file (21 images, 4 per step: met in 12 steps)
    assert all(np.isfinite(r["loss"]) for r in log)


def test_trains_from_tar_shards(tmp_path, folder):
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for path in sorted(folder.glob("*.png"))[:8]:
            payload = path.read_bytes()
            info = tarfile.TarInfo(path.name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    _, history = run(recipe(tmp_path / "out", tmp_path / "shard-*.tar", "train.steps=3"))
    assert [h["step"] for h in history] == [1, 2, 3] and all(h["skipped_images"] == 0 for h in history)


def test_resume_with_workers_continues_exactly(tmp_path, folder, run_until_first_checkpoint):
    full, _ = run(recipe(tmp_path / "full", folder, "train.steps=6", "train.save_every=0", "train.num_workers=2"))
    run_until_first_checkpoint(
        lambda: run(recipe(tmp_path / "cut", folder, "train.steps=6", "train.save_every=3", "train.num_workers=2")))
    _, history = run(recipe(tmp_path / "cut", folder, "train.steps=6", "train.save_every=3", "train.num_workers=2"))
    assert [h["step"] for h in history] == [4, 5, 6]
    a = VisualTokenizer.from_pretrained(full).state_dict()
    b = VisualTokenizer.from_pretrained(tmp_path / "cut" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_images_recipe_needs_a_path(tmp_path):
    with pytest.raises(ValueError, match="data.dataset: images needs data.path"):
        load_recipe("recipes/tokenizer_conv_vq.yaml", [f"output_dir={tmp_path}", "data.dataset=images"])


def test_the_tokenizer_images_recipe_runs_with_tiny_overrides(tmp_path, folder):
    with pytest.raises(ValueError, match="needs data.path"):
        load_recipe("recipes/tokenizer_images.yaml", [f"output_dir={tmp_path}"])
    small = load_recipe("recipes/tokenizer_images.yaml", [
        f"output_dir={tmp_path}", f"data.path={folder}", "data.image_size=32", "model.base_channels=8",
        "model.quantizer.codebook_size=32", "train.steps=2", "train.batch_size=2", "train.num_workers=0",
        "train.warmup_steps=0"])
    final, history = run(small)
    model = VisualTokenizer.from_pretrained(final)
    assert model.codebook_size == 32 and model.config.downsample == 16 and len(history) == 2
    assert model.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 2, 2)


def test_a_vit_tokenizer_trains_on_aspect_ratio_buckets(tmp_path, folder):
    vit = ["model.encoder=vit", "model.decoder=vit", "model.encoder_options={width: 16, depth: 1, num_heads: 2}",
           "model.decoder_options={width: 16, depth: 1, num_heads: 2}", "data.aspect_buckets=[[16, 32], [32, 16]]"]
    stage = tokenizer_stage(recipe(tmp_path / "probe", folder, *vit))
    sizes = {tuple(stage.batch_for_step(step, 0, 1)["pixel_values"].shape[-2:]) for step in range(8)}
    assert sizes == {(16, 32), (32, 16)}
    _, history = run(recipe(tmp_path, folder, "train.steps=4", *vit))
    assert len(history) == 4 and all(np.isfinite(h["loss"]) for h in history)
