"""Smoke test of bench/tokenizer_designs.py: every design for a couple of steps, the row schema, the reports."""

import json
import math
import pathlib

import pytest
import torch

from tests.bench.conftest import load_bench

BENCH = pathlib.Path(__file__).parents[2] / "bench" / "tokenizer_designs.py"
QUICK = ["--cpu-seconds", "30", "--max-steps", "2", "--batch-size", "4", "--num-train", "32", "--heldout-crops", "6",
         "--heldout-shapes-per-spec", "1", "--max-heldout-shapes", "8", "--eval-batch", "64", "--speed-batch", "2"]
NUMBERS = ("psnr", "psnr_photos", "psnr_shapes", "utilization", "perplexity", "encode_images_per_second",
           "decode_images_per_second", "encode_images_per_cpu_second", "decode_images_per_cpu_second",
           "train_cpu_seconds", "train_wall_seconds", "final_train_loss")


@pytest.fixture(scope="module")
def bench():
    return load_bench("tokenizer_designs")


def test_every_design_runs_and_reports(bench, tmp_path):
    out, md = tmp_path / "rows.json", tmp_path / "rows.md"
    rows = bench.main([*QUICK, "--json", str(out), "--markdown", str(md)])
    assert [r["design"] for r in rows] == list(bench.DESIGNS)
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    for row in rows:
        for key in NUMBERS:
            assert isinstance(row[key], float) and math.isfinite(row[key]), (row["design"], key)
        assert row["tokens_per_image"] == 16 and 159 <= row["bits_per_image"] <= 160
        assert row["train_steps"] == 2 and 0 < row["utilization"] <= 1
        assert row["trainable_parameters"] <= row["parameters"]
        diffusion = row["decoder"] == "diffusion"
        assert (row["psnr_1step"] is not None) == diffusion and (row["decode_steps"] == 8) == diffusion
    by = {r["design"]: r for r in rows}
    assert by["vfm+vq"]["trainable_parameters"] < by["vfm+vq"]["parameters"], "the backbone is partly frozen"
    assert by["slot+rvq+diffusion"]["levels"] == 2 and by["vit+fsq"]["codebook_size"] == 1000
    text = md.read_text()
    assert "| design | PSNR photo crops |" in text and "## Findings" in text
    assert all(f"| {name} |" in text for name in bench.DESIGNS)
    assert "Diffusion vs conv decoder" in text and "RANDOM weights" in text
    rebuilt = tmp_path / "rebuilt.md"
    bench.main([*QUICK, "--from-json", str(out), "--markdown", str(rebuilt)])  # no training
    assert rebuilt.read_text() == text


def test_backbone_path_loads_weights_and_resizes_to_the_patch_grid(bench, tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=16, patch_size=4)
    saved = Dinov2Model(config)
    saved.save_pretrained(tmp_path / "dino")
    args = bench.parse_args(["--backbone", str(tmp_path / "dino")])
    model = bench.build_model("vfm+vq", args, seed=0)
    assert isinstance(model.encoder, bench.ResizedInput) and model.encoder.patch_size == 4
    torch.testing.assert_close(model.encoder.inner.backbone.model.embeddings.patch_embeddings.projection.weight,
                               saved.embeddings.patch_embeddings.projection.weight)
    assert model.encode(torch.rand(2, 3, 32, 32) * 2 - 1).shape == (2, 4, 4)
    rows = bench.main([*QUICK, "--designs", "vfm+vq", "--backbone", str(tmp_path / "dino")])
    assert "weights from" in rows[0]["notes"] and rows[0]["tokens_per_image"] == 16


def test_unknown_design_is_refused(bench):
    with pytest.raises(ValueError, match="unknown designs"):
        bench.main(["--designs", "conv+vq,nope"])
