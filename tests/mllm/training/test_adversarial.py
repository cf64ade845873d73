"""Adversarial tokenizer training in the one loop: adversarial.start respected (and logged), the discriminator learns
on a toy case, resume is bit-exact for tokenizer and discriminator, the discriminator stays out of the tokenizer's
folders, the perceptual loss is in the generator's loss, the 256 px recipes run tiny; under DDP both models are
prepared, under DeepSpeed ZeRO-2 the discriminator is replicated outside the engine (ZeRO-3 is refused)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import pytest
import torch
from accelerate.utils import DistributedType, set_seed
from PIL import Image
from safetensors.torch import load_file
from transformers import Dinov2Config, Dinov2Model

from mllm.training.loop import Trainer, build_stage, run
from mllm.training.recipe import load_recipe
from tokenizer_bridge import VisualTokenizer

DISC = "adversarial.discriminator={type: patchgan, base_channels: 8, num_layers: 2}"
TINY = ["model.base_channels=8", "model.latent_dim=4", "data.num_train=16", "train.batch_size=4", "train.log_every=1",
        "train.warmup_steps=0", "adversarial.enabled=true", DISC]
FSQ = "model.quantizer={type: fsq, levels: [4, 4]}"


def recipe(out, *extra):
    return load_recipe("recipes/tokenizer_conv_vq.yaml", [f"output_dir={out}", *TINY, *extra])


def log(out) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A random-weight DINOv2 saved to disk: the perceptual backbone of the tests (no pretrained weights offline)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("backbone")
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                             patch_size=8, image_size=32)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40 + 4 * i, 48, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def test_no_adversarial_term_or_update_before_start_and_the_log_says_so(tmp_path):
    _, plain = run(recipe(tmp_path / "plain", FSQ, "train.steps=4", "adversarial.enabled=false"))
    _, gan = run(recipe(tmp_path / "gan", FSQ, "train.steps=4", "adversarial.start=2"))
    assert [h["loss"] for h in gan[:2]] == [h["loss"] for h in plain[:2]]  # the same steps until start
    lines = log(tmp_path / "gan")
    assert [line["adversary_active"] for line in lines] == [0, 0, 1, 1]
    assert [line["adversarial_weight"] for line in lines[:2]] == [0.0, 0.0]
    assert all("disc_loss" not in line and "generator_adv_loss" not in line for line in lines[:2])
    assert all(line["adversarial_weight"] > 0 and "disc_loss" in line for line in lines[2:])
    assert gan[2]["loss"] != pytest.approx(plain[2]["loss"], rel=1e-6)


def test_the_discriminator_learns_to_tell_reconstructions_from_images(tmp_path):
    # the tokenizer barely moves (lr 1e-5), so the discriminator faces a fixed task it should learn quickly
    _, history = run(recipe(tmp_path / "toy", FSQ, "train.steps=24", "train.lr=0.00001", "adversarial.lr=0.002",
                            "adversarial.discriminator={type: patchgan, base_channels: 8, num_layers: 2, norm: none}"))
    losses = [h["disc_loss"] for h in history]
    assert losses[0] == pytest.approx(1.0, abs=0.1)  # hinge at logits ~0
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4])
    assert history[-1]["logits_real"] > history[-1]["logits_fake"]


def trained(r, crash_after_checkpoint: bool = False, monkeypatch=None):
    """(tokenizer state, discriminator state) after training ``r`` as mllm.training.loop.run does."""
    set_seed(r.train.seed)
    trainer = Trainer(r, build_stage(r))
    if crash_after_checkpoint:
        original = Trainer.save_checkpoint

        def save_then_crash(self):
            original(self)
            raise KeyboardInterrupt

        monkeypatch.setattr(trainer, "save_checkpoint", save_then_crash.__get__(trainer))
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
        return None
    trainer.train()
    unwrap = trainer.accelerator.unwrap_model
    return ({k: v.clone() for k, v in unwrap(trainer.model).state_dict().items()},
            {k: v.clone() for k, v in unwrap(trainer.adversary).state_dict().items()})


def test_resume_is_exact_for_tokenizer_and_discriminator_and_the_discriminator_stays_out(tmp_path, monkeypatch):
    extra = ["train.steps=4", "train.save_every=2", "train.ema_decay=0.9", "adversarial.start=1",
             "adversarial.lecam_weight=0.1", "adversarial.r1_weight=0.5"]  # VQ (k-means init), batch norm, LeCAM, R1
    full_model, full_disc = trained(recipe(tmp_path / "full", *extra))
    trained(recipe(tmp_path / "cut", *extra), crash_after_checkpoint=True, monkeypatch=monkeypatch)
    assert not (tmp_path / "cut" / "final").exists()
    cut_model, cut_disc = trained(recipe(tmp_path / "cut", *extra))
    assert set(full_disc) == set(cut_disc) and {"anchor_real", "anchor_fake"} <= set(full_disc)
    assert all(torch.equal(full_disc[k], cut_disc[k]) for k in full_disc)
    assert all(torch.equal(full_model[k], cut_model[k]) for k in full_model)
    assert full_disc["anchor_real"].item() != 0.0  # LeCAM's anchors moved and were restored
    lines = log(tmp_path / "cut")
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    # the discriminator lives in the checkpoint state only: never in a tokenizer folder
    checkpoint = tmp_path / "cut" / "checkpoint-2"
    assert json.loads((checkpoint / "adversary.json").read_text())["base_channels"] == 8
    assert any(k.startswith("discriminator.") for k in load_file(checkpoint / "state" / "model_1.safetensors"))
    for folder in ("final", "final-raw"):
        saved = load_file(tmp_path / "cut" / folder / "model.safetensors")
        assert not any("discriminator" in k or "anchor" in k for k in saved)
        assert set(saved) == set(VisualTokenizer.from_pretrained(tmp_path / "cut" / folder).state_dict())
    assert not any("discriminator" in k for k in load_file(checkpoint / "model" / "model.safetensors"))


def test_a_resume_rebuilds_the_checkpoints_discriminator(tmp_path, monkeypatch, capfd):
    extra = ["train.steps=3", "train.save_every=2", FSQ]
    trained(recipe(tmp_path / "run", *extra), crash_after_checkpoint=True, monkeypatch=monkeypatch)
    wider = "adversarial.discriminator={type: patchgan, base_channels: 16, num_layers: 2}"
    r = recipe(tmp_path / "run", *extra, wider)
    set_seed(0)
    trainer = Trainer(r, build_stage(r))  # built as the checkpoint says, so its state loads
    trainer.train()
    assert trainer.accelerator.unwrap_model(trainer.adversary).discriminator.layers[0].out_channels == 8
    assert "resuming with the checkpoint's" in capfd.readouterr().err


def test_the_perceptual_loss_is_in_the_generators_loss_with_its_weight(tmp_path, backbone):
    r = recipe(tmp_path / "p", FSQ, "model.perceptual_weight=0.5", f"perceptual.backbone={backbone}")
    stage = build_stage(r)
    batch = stage.batch_for_step(0, 0, 1)
    out = stage.model(batch["pixel_values"])
    assert out.perceptual_loss is not None and out.perceptual_loss.item() > 0
    torch.testing.assert_close(out.nll_loss, out.reconstruction_loss + 0.5 * out.perceptual_loss)
    torch.testing.assert_close(out.loss, out.nll_loss + out.quantizer_loss)
    loss, metrics, inputs = stage.adversary.generator_loss(stage.model, stage.adversary.model, batch, 0)
    assert metrics["adversarial_weight"] > 0 and torch.equal(inputs["real"], batch["pixel_values"])
    with pytest.raises(ValueError, match="needs perceptual.backbone"):
        recipe(tmp_path / "q", "model.perceptual_weight=0.5")


def test_adversarial_settings_are_validated_when_the_recipe_loads(tmp_path):
    with pytest.raises(ValueError, match=r"adversarial.discriminator: unknown key\(s\) \['depth'\]"):
        recipe(tmp_path, "adversarial.discriminator={type: patchgan, depth: 3}")
    with pytest.raises(ValueError, match="adversarial.loss must be one of"):
        recipe(tmp_path, "adversarial.loss=wgan")
    with pytest.raises(ValueError, match="adversarial.generator_loss must be null or one of"):
        recipe(tmp_path, "adversarial.generator_loss=wgan")
    with pytest.raises(ValueError, match=r"train.betas must be two numbers in \[0, 1\)"):
        recipe(tmp_path, "train.betas=[0.5]")
    paired = recipe(tmp_path, "adversarial.generator_loss=non_saturating_image", "train.betas=[0.5, 0.9]")
    stage = build_stage(paired)
    assert stage.adversary.model.generator_loss_fn.__name__ == "non_saturating_image_generator_loss"
    assert Trainer(paired, stage).optimizer.param_groups[0]["betas"] == (0.5, 0.9)
    with pytest.raises(ValueError, match="tokenizer stage only"):
        load_recipe("recipes/demo_llm.yaml", ["visual_tokenizer=x", "adversarial.enabled=true"])
    with pytest.raises(ValueError, match="pixel decoder"):
        build_stage(recipe(tmp_path, "model.decoder=diffusion", "model.decoder_options={channel_mult: [1, 2]}"))


def test_zero3_and_the_adaptive_weight_under_deepspeed_are_refused_with_the_alternatives_named(tmp_path):
    r = recipe(tmp_path, FSQ)
    plugin = SimpleNamespace(zero_stage=3)
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin))
    fake = SimpleNamespace(accelerator=accelerator, recipe=r)
    with pytest.raises(ValueError, match="use ZeRO-1/2 .* or DDP"):
        Trainer._build_adversary(fake, build_stage(r).adversary)
    plugin.zero_stage = 2  # ZeRO-2 takes an adversary, but not the adaptive weight (autograd.grad trips its hooks)
    with pytest.raises(ValueError, match="adaptive_weight=false"):
        Trainer._build_adversary(fake, build_stage(r).adversary)


def test_the_replicated_adversarys_optimizer_state_round_trips_through_safetensors(tmp_path):
    from mllm.training.replicated import ReplicatedModel

    def replica(seed):
        torch.manual_seed(seed)
        module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
        optimizer = torch.optim.AdamW(module.parameters(), lr=0.01, betas=(0.5, 0.9), weight_decay=0.1)
        return ReplicatedModel(module, optimizer, torch.device("cpu"))

    x = torch.randn(8, 3)
    a = replica(0)
    for sync in (False, True, False, True):  # two steps of two micro-batches
        a.update(a.module(x).pow(2).mean(), accumulation=2, sync=sync, grad_clip=1.0)
    a.save(tmp_path / "adversary")
    b = replica(1)
    b.load(tmp_path / "adversary")
    assert b.optimizer.param_groups[0]["betas"] == (0.5, 0.9)
    for state_a, state_b in zip(a.optimizer.state.values(), b.optimizer.state.values()):
        assert set(state_a) == set(state_b) and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    for replicated in (a, b):  # the same next step from the saved state
        replicated.update(replicated.module(x).pow(2).mean(), accumulation=1, sync=True, grad_clip=1.0)
    assert all(torch.equal(p, q) for p, q in zip(a.module.state_dict().values(), b.module.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="lacks model.safetensors or optimizer.safetensors"):
        b.load(tmp_path / "missing")


def tiny_recipe(name, out, folder, *extra):
    return load_recipe(f"recipes/{name}.yaml", [
        f"output_dir={out}", f"data.path={folder}", "data.image_size=32", "train.steps=2", "train.batch_size=2",
        "train.num_workers=0", "train.save_every=0", "train.warmup_steps=0", "train.log_every=1", *extra])


GAN_TINY = ["model.base_channels=8", "model.num_res_blocks=1", DISC]
RECIPES = {
    "tokenizer_ibq_256": [*GAN_TINY, "model.latent_dim=8", "model.quantizer={type: ibq, codebook_size: 64}", "BACKBONE"],
    "tokenizer_lfq_256": [*GAN_TINY, "model.latent_dim=6", "model.quantizer={type: lfq, bits: 6}",
                          "model.perceptual_weight=0",
                          "adversarial.discriminator={type: stylegan, base_channels: 4, channel_mult: [1, 2]}"],
    "tokenizer_vit_fsq_256": ["model.encoder_options={width: 16, depth: 1, num_heads: 2}", "model.latent_dim=8",
                              "model.decoder_options={width: 16, depth: 1, num_heads: 2}", "BACKBONE"],
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_256_px_recipes_run_two_steps_with_tiny_overrides(tmp_path, folder, backbone, name):
    extra = [f"perceptual.backbone={backbone}" if x == "BACKBONE" else x for x in RECIPES[name]]
    full = load_recipe(f"recipes/{name}.yaml", [f"data.path={folder}", f"perceptual.backbone={backbone}"])
    assert full.data.image_size == 256 and full.model["downsample"] == 16  # 16x16 ids at the papers' scale
    assert full.adversarial.enabled == (name != "tokenizer_vit_fsq_256")
    path, history = run(tiny_recipe(name, tmp_path / name, folder, *extra))
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    assert ("disc_loss" in history[-1]) == full.adversarial.enabled
    model = VisualTokenizer.from_pretrained(path)
    assert model.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 2, 2)


# ---------------------------------------------------------------------------------------------------- DDP
DDP = [*TINY, "train.steps=4", "train.save_every=2", "adversarial.start=1", "adversarial.lecam_weight=0.1",
       "adversarial.r1_weight=0.5", "train.batch_size=8"]


def launch_worker(out, mode: str, config: str = "ddp_cpu", extra: tuple = (), env: Optional[dict] = None,
                  launcher: tuple = ()) -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--config_file", f"recipes/accelerate/{config}.yaml", "--mixed_precision", "no",
           "--main_process_port", "0", *launcher, __file__, "--worker", str(out), mode, *DDP, *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def launch_ddp(out, mode: str) -> None:
    launch_worker(out, mode)


@pytest.mark.slow
def test_ddp_two_processes_train_both_models_and_resume_exactly(tmp_path):
    launch_ddp(tmp_path / "full", "full")
    launch_ddp(tmp_path / "cut", "crash")
    assert (tmp_path / "cut" / "checkpoint-2" / "COMPLETE").exists() and not (tmp_path / "cut" / "final").exists()
    launch_ddp(tmp_path / "cut", "full")
    reports = {name: [json.loads((tmp_path / name / f"rank{r}.json").read_text()) for r in range(2)]
               for name in ("full", "cut")}
    for ranks in reports.values():
        assert [r["world"] for r in ranks] == [2, 2]
        # DDP keeps the replicas' weights and LeCAM anchors identical; batch-norm running statistics stay per process
        # (never used: the discriminator always runs in training mode) and rank 0's are the ones checkpointed
        assert ranks[0]["model"] == ranks[1]["model"] and ranks[0]["adversary_weights"] == ranks[1]["adversary_weights"]
    assert reports["full"][0] == reports["cut"][0]  # tokenizer and discriminator bit-identical after the resume
    assert [line["adversary_active"] for line in log(tmp_path / "cut")] == [0, 1, 1, 1]


# the for-loop AdamW: with the fused one on both sides the runs drifted apart (an EMA codebook amplifies any rounding
# difference between per-tensor and DeepSpeed's flattened parameters)
ZERO2 = ("train.gradient_accumulation_steps=2", "train.grad_clip=1.0", "adversarial.adaptive_weight=false",
         "train.fused_optimizer=false")
ONE = ("--num_processes", "1")


@pytest.mark.slow
def test_deepspeed_zero2_trains_the_discriminator_replicated_matches_the_plain_run_and_resumes_exactly(tmp_path):
    from mllm.training.replicated import OPTIMIZER, WEIGHTS

    deepspeed = {"DS_ACCELERATOR": "cpu", "ACCELERATE_USE_CPU": "false",
                 "TORCH_EXTENSIONS_DIR": str(Path(__file__).resolve().parents[3] / "build" / "torch_extensions")}
    launch_worker(tmp_path / "plain", "full", "cpu_single", ZERO2)
    launch_worker(tmp_path / "full", "full", "deepspeed_zero2", ZERO2, deepspeed, ONE)
    launch_worker(tmp_path / "cut", "crash", "deepspeed_zero2", ZERO2, deepspeed, ONE)
    checkpoint = tmp_path / "cut" / "checkpoint-2"
    assert (checkpoint / "adversary" / WEIGHTS).exists() and (checkpoint / "adversary" / OPTIMIZER).exists()
    assert not (tmp_path / "cut" / "final").exists()
    launch_worker(tmp_path / "cut", "full", "deepspeed_zero2", ZERO2, deepspeed, ONE)
    full, cut = (json.loads((tmp_path / name / "rank0.json").read_text()) for name in ("full", "cut"))
    assert full == cut  # tokenizer and discriminator bit-identical after the resume
    plain, zero2 = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("plain", "full"))
    assert set(plain) == set(zero2) and not any("discriminator" in k for k in zero2)
    for key in plain:
        torch.testing.assert_close(zero2[key], plain[key], atol=1e-4, rtol=1e-4, msg=key)
    lines = {name: log(tmp_path / name) for name in ("plain", "full")}
    assert [line["adversary_active"] for line in lines["full"]] == [0, 1, 1, 1]
    for key in ("loss", "disc_loss", "adversarial_weight", "logits_fake"):
        zero2_values, plain_values = ([line.get(key, 0.0) for line in lines[name]] for name in ("full", "plain"))
        assert zero2_values == pytest.approx(plain_values, rel=1e-3, abs=1e-5), key
    # a learned codebook, k-means-initialised in the first forward: DeepSpeed's fp32 master copy must take the write
    # (before the fix the engine's first step put the random codebook back: 2.4 max difference from the plain run)
    learned = (*ZERO2, "model.codebook_update=learned")
    launch_worker(tmp_path / "plain-learned", "full", "cpu_single", learned)
    launch_worker(tmp_path / "zero2-learned", "full", "deepspeed_zero2", learned, deepspeed, ONE)
    plain, zero2 = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("plain-learned",
                                                                                            "zero2-learned"))
    for key in ("quantizer.codebook", "quantizer.usage"):
        torch.testing.assert_close(zero2[key], plain[key], atol=1e-3, rtol=1e-3, msg=key)


def state_hash(module, weights_only: bool = False) -> str:
    import hashlib

    digest = hashlib.sha256()
    state = module.state_dict()
    if weights_only:
        state = {k: v for k, v in state.items() if not k.rpartition(".")[2].startswith(("running_", "num_batches"))}
    for name, value in sorted(state.items()):
        digest.update(name.encode() + value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def worker(out: str, mode: str, overrides: list[str]) -> None:
    """Train under the launcher (``crash``: stop after the first checkpoint) and record hashes of both models."""
    from pathlib import Path

    r = load_recipe("recipes/tokenizer_conv_vq.yaml", [f"output_dir={out}", *overrides])
    set_seed(r.train.seed)
    trainer = Trainer(r, build_stage(r))
    if mode == "crash":
        save = trainer.save_checkpoint

        def save_then_stop():
            save()
            raise SystemExit(0)

        trainer.save_checkpoint = save_then_stop
    trainer.train()
    acc = trainer.accelerator
    report = {"world": acc.num_processes, "model": state_hash(acc.unwrap_model(trainer.model)),
              "adversary": state_hash(acc.unwrap_model(trainer.adversary)),
              "adversary_weights": state_hash(acc.unwrap_model(trainer.adversary), weights_only=True)}
    Path(out, f"rank{acc.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3], sys.argv[4:])
