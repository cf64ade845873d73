"""The demo end to end at toy sizes: every stage runs, metrics.json has the promised fields, samples.png is drawn."""

import json

import torch
from PIL import Image

from mllm.cli import main as vtok
from mllm.bundle.bundle import load_bundle
from mllm.demo import run_demo
from tokenizer_bridge import VisualTokenizer

TINY = {
    "tokenizer": ["model.encoder_options.width=16", "model.decoder_options.width=16", "model.latent_dim=8",
                  "model.quantizer_options.levels=[4,4]", "data.num_train=64", "train.steps=3", "train.batch_size=8",
                  "train.save_every=0"],
    "decoder": ["data.num_train=64", "train.steps=3", "train.batch_size=8", "train.save_every=0"],
    "llm": ["data.num_train=64", "train.steps=3", "train.batch_size=8", "train.save_every=0",
            "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=1"],
}


def test_demo_writes_metrics_and_samples(tmp_path):
    metrics = run_demo(str(tmp_path), overrides=TINY)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("reconstruction_psnr", "caption_accuracy", "t2i_accuracy", "caption_chance", "t2i_chance", "wall_seconds"):
        assert key in saved and isinstance(saved[key], float), key
    assert saved["caption_chance"] == saved["t2i_chance"] == 1 / 72
    assert 0 <= saved["caption_accuracy"] <= 1 and 0 <= saved["t2i_accuracy"] <= 1
    for key in ("t2i_accuracy_unguided", "t2i_tokenizer_ceiling"):
        assert 0 <= saved[key] <= 1, key
    assert saved["t2i_guidance_scale"] == 2.0
    attrs = saved["t2i_tokenizer_ceiling_attributes"]
    assert attrs["all"] == saved["t2i_tokenizer_ceiling"] and attrs["all"] <= min(attrs["colour"], attrs["shape"])
    many = saved["tokenizer_ceiling_10_renders_attributes"]
    assert many["all"] == saved["tokenizer_ceiling_10_renders"] and many["all"] <= min(many["colour"], many["shape"])
    assert round(many["all"] * 420, 6) == round(many["all"] * 420)  # a count of the 420 renders
    assert 0 < saved["reconstruction_psnr"] < 60
    # the held-out photos themselves show no grid at the tokenizer's 8 px cells; the reconstructions are measured
    for key in ("photo_seam_ratio", "photo_seam_ratio_256"):
        assert 0.8 < saved[key] < 1.25, key
    for key in ("reconstruction_seam_ratio", "reconstruction_seam_ratio_256"):
        assert isinstance(saved[key], float) and saved[key] > 0, key
    assert set(saved["chance"]) == {"colour", "shape", "position", "all"}
    assert metrics["wall_seconds"] == saved["wall_seconds"]
    assert saved["tokenizer_seconds"] > 0 and saved["decoder_seconds"] > 0 and saved["llm_seconds"] > 0
    # the second stage gave the tokenizer an overlapping decoder and left its ids alone; the bundle carries it
    stage1 = VisualTokenizer.from_pretrained(tmp_path / "tokenizer" / "final").eval()
    refit = VisualTokenizer.from_pretrained(tmp_path / "decoder" / "final").eval()
    assert refit.config.decoder_options["overlap"] is True and not stage1.config.decoder_options.get("overlap")
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(stage1.encode(pixels), refit.encode(pixels))
    assert load_bundle(saved["bundle"])[1].visual_tokenizer.config.decoder_options["overlap"] is True
    grid = Image.open(tmp_path / "samples.png")
    assert grid.width > 500 and grid.height > 300

    # the bundle the demo wrote drives the CLI's generate and caption commands
    bundle = saved["bundle"]
    vtok(["generate", "--bundle", bundle, "--prompt", "a red circle at the top left", "--out", str(tmp_path / "g.png")])
    assert Image.open(tmp_path / "g.png").size == (32, 32)
    vtok(["generate", "--bundle", bundle, "--prompt", "a blue square", "--out", str(tmp_path / "g4.png"), "--num", "3", "--sample"])
    assert (tmp_path / "g4.png").exists()


def test_demo_seed_sets_the_training_seed_of_every_stage(tmp_path, monkeypatch, capsys):
    import mllm.demo

    calls = []

    def fake_run_demo(out, llm=None, gguf_file=None, overrides=None):
        calls.append(overrides)
        return {key: 0.5 for key in ("reconstruction_psnr", "reconstruction_psnr_256", "reconstruction_seam_ratio",
                                     "caption_accuracy",
                                     "t2i_accuracy", "t2i_accuracy_unguided", "t2i_tokenizer_ceiling",
                                     "tokenizer_ceiling_10_renders", "caption_chance", "wall_seconds")}

    monkeypatch.setattr(mllm.demo, "run_demo", fake_run_demo)
    vtok(["demo", "--out", str(tmp_path), "--seed", "2"])
    vtok(["demo", "--out", str(tmp_path)])
    assert calls == [{"tokenizer": ["train.seed=2"], "decoder": ["train.seed=2"], "llm": ["train.seed=2"]},
                     {"tokenizer": [], "decoder": [], "llm": []}]
    assert '"reconstruction_psnr_256": 0.5' in capsys.readouterr().out
