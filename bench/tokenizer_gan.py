"""Tokenizer training with vs without the adversarial + perceptual losses, at equal CPU time, side by side in one run.

    python bench/tokenizer_gan.py [--cpu-seconds 150] [--markdown bench/results/tokenizer_gan.md] [--json out.json]

Both arms are the conv + VQ tokenizer of ``recipes/tokenizer_conv_vq.yaml`` (32 px, 4x4 ids of 256 codes), trained by
the one loop (``mllm.training.loop.Trainer.optimizer_step``) on random 32 px crops of the bundled training photos
(``data.photo_fraction=1``) until each has used the same **process CPU time** (training steps only):

- ``plain``: reconstruction (L1 + L2) + quantizer losses;
- ``gan``: the same + a PatchGAN (VQGAN's, width 32, 2 layers, batch norm; hinge loss, VQGAN's adaptive weight x 0.1,
  LeCAM 0.01) from step ``--start``, + a perceptual loss (weight 0.1) over a **random-weight** tiny DINOv2 (no
  pretrained weights exist offline, so this perceptual term is not LPIPS: it measures a random feature space).

Evaluation on the held-out photos (``mllm.data.photos``, at native size up to 512 px) with the reconstruction suite of
``tokenizer_bridge.evaluation``: PSNR, SSIM, and the Fréchet-style feature distance and LPIPS-like distance over
paired tiles, in the feature space of *another* random-weight DINOv2 (a different seed from the perceptual one, so the
GAN arm is not scored by the network it was trained against). A random network's FD is a weak proxy for rFID: read it
as "distance of feature statistics", not as image quality.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from accelerate.utils import set_seed
from transformers import Dinov2Config, Dinov2Model

from mllm.data.photos import load_photos
from mllm.training.loop import Trainer, build_stage
from mllm.training.recipe import load_recipe
from tokenizer_bridge.evaluation import evaluate_tokenizer
from tokenizer_bridge.metrics import HFBackboneFeatures

COMMON = ["model.base_channels=32", "model.latent_dim=32", "data.photo_fraction=1.0", "data.num_train=2048",
          "train.batch_size=16", "train.steps=100000", "train.warmup_steps=50", "train.save_every=0"]


def random_dinov2(path: str, seed: int) -> str:
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                          patch_size=4, image_size=32)
    Dinov2Model(config).save_pretrained(path)
    return path


def arms(root: str, start: int) -> dict[str, list[str]]:
    backbone = random_dinov2(os.path.join(root, "perceptual"), seed=1)
    gan = ["adversarial.enabled=true", f"adversarial.start={start}", "adversarial.weight=0.1",
           "adversarial.lecam_weight=0.01",
           "adversarial.discriminator={type: patchgan, base_channels: 32, num_layers: 2, norm: batch}",
           "model.perceptual_weight=0.1", f"perceptual.backbone={backbone}"]
    return {"plain": [], "gan": gan}


def train(out: str, overrides: list[str], cpu_seconds: float) -> tuple[torch.nn.Module, dict]:
    recipe = load_recipe("recipes/tokenizer_conv_vq.yaml", [f"output_dir={out}", *COMMON, *overrides])
    set_seed(recipe.train.seed)
    trainer = Trainer(recipe, build_stage(recipe))
    trainer.model.train()
    used, wall, last = 0.0, time.time(), {}
    while used < cpu_seconds:
        batch = trainer.stage.batch_for_step(trainer.step, 0, 1)
        start = time.process_time()
        _, last = trainer.optimizer_step(batch)
        used += time.process_time() - start
        trainer.step += 1
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model, {"steps": trainer.step, "cpu_seconds": used, "wall_seconds": time.time() - wall,
                   "last_disc_loss": last.get("disc_loss")}


def evaluate(model, extractor) -> dict:
    with torch.no_grad():
        result = evaluate_tokenizer(model, ["reconstruction"], extractor, images=load_photos("heldout"))
    r = result["reconstruction"]
    return {k: r[k] for k in ("psnr", "ssim", "frechet_distance", "lpips_like", "num_images", "num_samples")
            if k in r}


def markdown(rows: dict, args) -> str:
    lines = [
        "# Tokenizer training with vs without adversarial + perceptual losses (`bench/tokenizer_gan.py`)",
        "",
        f"Both arms: conv + VQ (256 codes, 32 px, 4x4 ids), {args.cpu_seconds:.0f} CPU s of training each "
        f"(torch threads: {torch.get_num_threads()}), on random 32 px crops of the bundled training photos; evaluated on the "
        "held-out photos at native size (<= 512 px). `gan` = + PatchGAN (hinge, adaptive weight x 0.1, LeCAM 0.01, from "
        f"step {args.start}) + perceptual loss (weight 0.1) over a **random-weight** DINOv2. FD and LPIPS-like are "
        "measured in the features of another random-weight DINOv2 (lower is better): a weak proxy, not rFID.",
        "",
        "| arm | steps | PSNR (dB) | SSIM | FD (random DINOv2) | LPIPS-like | final disc loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        disc = "" if row["last_disc_loss"] is None else f"{row['last_disc_loss']:.3f}"
        lines.append(f"| {name} | {row['steps']} | {row['psnr']:.2f} | {row['ssim']:.4f} | "
                     f"{row['frechet_distance']:.4g} | {row['lpips_like']:.4g} | {disc} |")
    p, g = rows["plain"], rows["gan"]
    lines += ["", f"Ratios gan / plain: steps {g['steps'] / p['steps']:.2f}, PSNR {g['psnr'] - p['psnr']:+.2f} dB, "
              f"SSIM {g['ssim'] / p['ssim']:.3f}x, FD {g['frechet_distance'] / p['frechet_distance']:.3f}x, "
              f"LPIPS-like {g['lpips_like'] / p['lpips_like']:.3f}x.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-seconds", type=float, default=150.0)
    parser.add_argument("--start", type=int, default=50, help="adversarial.start of the gan arm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {}
    with tempfile.TemporaryDirectory() as root:
        extractor = HFBackboneFeatures(random_dinov2(os.path.join(root, "judge"), seed=2))
        for name, overrides in arms(root, args.start).items():
            model, row = train(os.path.join(root, name), overrides, args.cpu_seconds)
            rows[name] = {**row, **evaluate(model.eval(), extractor)}
            print(name, json.dumps(rows[name]), file=sys.stderr)
    text = markdown(rows, args)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
