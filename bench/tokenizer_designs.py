"""Tokenizer designs at the same CPU budget: reconstruction, codebook use, tokens per image and speed.

    python bench/tokenizer_designs.py [--cpu-seconds 120] [--designs conv+vq,...] [--backbone PATH]
                                      [--json out.json] [--markdown out.md]

Every design turns a 32 px image into 16 tokens of 10 bits (160 bits per image) and is trained on the tokenizer
stage's mixture (``mllm.training.stages.tokenizer.tokenizer_training_pixels``: shapes renders + crops of the training photos, 32 px) until
it has used the same **process CPU time** (``time.process_time()``, counted over the training steps only, so other
processes loading the machine do not change a design's budget; ``--threads 1`` by default):

- ``conv+vq``: conv encoder (downsample 8 -> 4x4 ids), VQ with 1024 codes, conv decoder;
- ``vit+fsq``: ViT encoder and decoder (patch 8, 2-D RoPE), FSQ levels [8, 5, 5, 5] (1000 codes);
- ``conv+vq+diffusion``: the conv+vq encoder and quantizer with a diffusion decoder (rectified-flow U-Net conditioned
  on the code map, trained with its flow-matching loss, 8 Euler steps to decode);
- ``slot+rvq+diffusion``: the slot tokenizer (conv backbone, Q-Former + slot attention) with 8 slots x 2 residual
  levels of 1024 codes and its diffusion decoder (8 Euler steps); the first quarter of its budget trains without
  quantization (its quantizer warm-up, see ``SlotTokenizerConfig.quantizer_warmup_steps``);
- ``vfm+vq``: a vision foundation model as encoder (a DINOv2-architecture backbone, multi-layer fusion of its last two
  layers, last two of four blocks trainable), VQ with 1024 codes, conv decoder. No pretrained weights are available
  offline, so by default the backbone is a tiny random DINOv2 config; ``--backbone PATH`` loads a saved HF vision
  model instead (its images are bilinearly resized so that its patch grid is the 4x4 token grid).

Evaluation (no training data): PSNR on 256 random 32 px crops of the held-out photographs (the ``psnr`` column), on
the held-out photographs center-resized to 32 px, and on renders of the held-out shapes combinations; diffusion
decoders sample with seed 0 (and are also scored with one Euler step, their regression estimate). Utilisation: the
fraction of each level's codebook used by the ids of all held-out images (mean over levels). Speed: encode and decode
of one batch of held-out crops, best of three, images per wall-clock second and per CPU second.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mllm.data import photos, shapes
from mllm.training.recipe import DataRecipe, Recipe
from mllm.training.stages.tokenizer import tokenizer_training_pixels
from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig
from tokenizer_bridge.configuration_slot_tokenizer import SlotTokenizerConfig
from tokenizer_bridge.image_processing_visual_tokenizer import to_pixel_values
from tokenizer_bridge.metrics import psnr
from tokenizer_bridge.modeling_slot_tokenizer import SlotTokenizer
from tokenizer_bridge.quantizers import usage_metrics

IMAGE_SIZE = 32
GRID = dict(image_size=IMAGE_SIZE, base_channels=32, latent_dim=16, downsample=8, num_res_blocks=1)
VQ = dict(quantizer="vq", codebook_size=1024, codebook_update="ema", ema_decay=0.95, dead_code_threshold=0.02)
# U-Net width 16 down to the 4x4 code grid: a training step costs about what the conv decoder's does (0.36 vs 0.27 CPU
# s per batch of 32 with the encoder); width 32 with [1, 2, 2] costs 0.73 s and trains a third as many steps.
UNET = dict(steps=8, base_channels=16, channel_mult=[1, 2, 4, 4])
TINY_DINOV2 = dict(model_type="dinov2", hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                   intermediate_size=128, image_size=IMAGE_SIZE, patch_size=8)

# name -> kind ("grid": VisualTokenizerConfig, "slot": SlotTokenizerConfig), its keyword arguments, notes.
DESIGNS: dict[str, dict] = {
    "conv+vq": dict(kind="grid", config=dict(**GRID, **VQ, encoder="conv", decoder="conv"),
                    notes="conv enc/dec (base 32), VQ 1024 codes, EMA 0.95 + dead-code restart, L1+L2 loss"),
    "vit+fsq": dict(kind="grid", config=dict(**GRID, encoder="vit", decoder="vit", quantizer="fsq",
                                             quantizer_options={"levels": [8, 5, 5, 5]},
                                             encoder_options={"width": 64, "depth": 2, "num_heads": 2},
                                             decoder_options={"width": 64, "depth": 2, "num_heads": 2}),
                    notes="ViT enc/dec (patch 8, width 64, depth 2, 2-D RoPE), FSQ [8,5,5,5], L1+L2 loss"),
    "conv+vq+diffusion": dict(kind="grid", config=dict(**GRID, **VQ, encoder="conv", decoder="diffusion",
                                                       decoder_options=dict(UNET)),
                              notes="conv+vq encoder/quantizer, rectified-flow U-Net decoder (width 16, [1,2,4,4]) "
                                    "on the code map, flow-matching loss, 8 Euler steps"),
    "slot+rvq+diffusion": dict(kind="slot", config=dict(
        image_size=IMAGE_SIZE, base_channels=32, downsample=4, backbone_dim=64, latent_dim=32, num_slots=8,
        slot_iters=3, qformer_layers=1, num_heads=4, codebook_size=1024, residual_levels=2,
        codebook_update="ema", ema_decay=0.95, dead_code_threshold=0.02, decoder="diffusion", decoder_channels=16,
        decoder_channel_mult=[1, 2, 4, 4], diffusion_steps=8, cond_dropout=0.0),
        notes="conv backbone (downsample 4) + Q-Former + slot attention, 8 slots x 2 residual levels x 1024 codes, "
              "diffusion U-Net (width 16, [1,2,4,4], cross-attention to slots), 8 Euler steps; quantizer warm-up = "
              "first 25% of the budget"),
    "vfm+vq": dict(kind="grid", config=dict(**GRID, **VQ, encoder="foundation", decoder="conv",
                                            encoder_options={"config": TINY_DINOV2, "layers": [-2, -1],
                                                             "fusion": "concat", "trainable_layers": 2}),
                   notes="DINOv2-architecture encoder (width 64, 4 blocks, patch 8; layers -2,-1 fused; last 2 "
                         "blocks trainable), RANDOM weights (none offline; --backbone PATH for real ones), VQ 1024, "
                         "conv decoder"),
}
SLOT_WARMUP_FRACTION = 0.25


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-seconds", type=float, default=120.0, help="training CPU-time budget of every design")
    p.add_argument("--max-steps", type=int, default=0, help="also stop after this many steps (0: no limit)")
    p.add_argument("--designs", default=",".join(DESIGNS), help="comma-separated names from DESIGNS")
    p.add_argument("--backbone", help="directory of a saved HF vision model for vfm+vq (default: tiny random DINOv2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20, help="linear learning-rate warm-up steps")
    p.add_argument("--num-train", type=int, default=4096)
    p.add_argument("--heldout-crops", type=int, default=256)
    p.add_argument("--heldout-shapes-per-spec", type=int, default=4)
    p.add_argument("--max-heldout-shapes", type=int, default=0, help="keep only the first N shape renders (0: all)")
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--speed-batch", type=int, default=64, help="images per encode/decode timing call")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result rows here")
    p.add_argument("--markdown", help="write the Markdown report here")
    p.add_argument("--from-json", help="rebuild the reports from the rows of an earlier run (same arguments) "
                                       "instead of training")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- data
def datasets(args) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training pixels ``(N, 3, 32, 32)`` and the held-out sets (name -> pixels)."""
    recipe = Recipe(stage="tokenizer", output_dir=tempfile.gettempdir(),
                    data=DataRecipe(image_size=IMAGE_SIZE, num_train=args.num_train, seed=args.seed))
    train = tokenizer_training_pixels(recipe)
    _, heldout_names = photos.photo_splits()
    split = shapes.make_splits(seed=0)
    heldout_shapes = shapes.ShapesDataset(split.heldout, size=IMAGE_SIZE, seed=1,
                                          samples_per_spec=args.heldout_shapes_per_spec)
    heldout = {
        "photo_crops": to_pixel_values(photos.random_crops(heldout_names, IMAGE_SIZE, args.heldout_crops,
                                                            seed=1, scale=(0.1, 0.6))),
        "photos": to_pixel_values([photos.center_resize(n, IMAGE_SIZE) for n in heldout_names]),
        "shapes": to_pixel_values([heldout_shapes[i]["image"] for i in range(
            min(len(heldout_shapes), args.max_heldout_shapes or len(heldout_shapes)))]),
    }
    return train, heldout


# ---------------------------------------------------------------------------------------------------- models
class ResizedInput(nn.Module):
    """Wraps a foundation encoder whose patch size ``p`` differs from the token grid's downsample ``f``: images are
    bilinearly resized by ``p / f`` first, so the backbone's patch grid is the token grid."""

    def __init__(self, encoder: nn.Module, patch_size: int, downsample: int):
        super().__init__()
        self.inner, self.patch_size, self.downsample = encoder, patch_size, downsample

    @property
    def last_layer(self) -> nn.Parameter:
        return self.inner.last_layer

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h, w = pixel_values.shape[-2:]
        size = (h // self.downsample * self.patch_size, w // self.downsample * self.patch_size)
        return self.inner(F.interpolate(pixel_values, size=size, mode="bilinear", align_corners=False))


def build_model(name: str, args, seed: int) -> nn.Module:
    spec = DESIGNS[name]
    torch.manual_seed(seed)
    if spec["kind"] == "slot":
        # the warm-up is ended by `train` after SLOT_WARMUP_FRACTION of the budget
        return SlotTokenizer(SlotTokenizerConfig(**spec["config"], quantizer_warmup_steps=10**9))
    config = dict(spec["config"])
    backbone_path = args.backbone if config.get("encoder") == "foundation" else None
    if backbone_path:
        from transformers import AutoConfig

        options = dict(config["encoder_options"])
        options["config"] = AutoConfig.from_pretrained(backbone_path).to_dict()
        config["encoder_options"] = options
    model = VisualTokenizer(VisualTokenizerConfig(**config))
    if backbone_path:
        model.encoder.backbone.load_pretrained_weights(backbone_path, "bench vfm+vq")
        patch = model.encoder.backbone.patch_size
        if patch != model.config.downsample:
            model.encoder = ResizedInput(model.encoder, patch, model.config.downsample)
    return model


def tokens_per_image(model: nn.Module) -> int:
    if isinstance(model, SlotTokenizer):
        return model.config.num_slots * model.num_levels
    h, w = model.config.grid_size(IMAGE_SIZE, IMAGE_SIZE)
    return h * w * model.quantizer.num_levels


def num_levels(model: nn.Module) -> int:
    return model.quantizer.num_levels


def is_diffusion(model: nn.Module) -> bool:
    return model.config.decoder == "diffusion"


def decode(model: nn.Module, ids: torch.Tensor, steps: Optional[int] = None) -> torch.Tensor:
    """Seeded decode (seed 0) with ``steps`` sampling steps (default: the model's) for both tokenizer kinds."""
    if not is_diffusion(model):
        return model.decode(ids)
    return model.decode(ids, steps=steps, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------------- train
def train(model: nn.Module, pixels: torch.Tensor, args, seed: int) -> dict:
    """Train until ``args.cpu_seconds`` of process CPU time (or ``args.max_steps``) are spent; CPU time of the
    training steps only."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    slot = isinstance(model, SlotTokenizer)
    model.train()
    cpu, wall, step, losses = 0.0, time.perf_counter(), 0, []
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=round(args.cpu_seconds), unit="cpu-s", leave=False, file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm ships with transformers
        bar = None
    while cpu < args.cpu_seconds and not (args.max_steps and step >= args.max_steps):
        start = time.process_time()
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        if slot and cpu >= SLOT_WARMUP_FRACTION * args.cpu_seconds and model.config.quantizer_warmup_steps > step:
            model.config.quantizer_warmup_steps = int(model.training_steps)  # quantize from the next step on
        idx = torch.randint(0, len(pixels), (args.batch_size,), generator=gen)
        out = model(pixels[idx])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(float(out.loss.detach()))
        spent = time.process_time() - start
        cpu += spent
        if bar is not None:
            bar.update(min(spent, max(0.0, args.cpu_seconds - bar.n)))
            bar.set_postfix(step=step, loss=f"{losses[-1]:.4f}")
    if bar is not None:
        bar.close()
    if slot and model.config.quantizer_warmup_steps >= int(model.training_steps):
        model.config.quantizer_warmup_steps = int(model.training_steps)  # a budget too short to leave the warm-up
    tail = losses[-20:] or [float("nan")]
    return {"train_steps": step, "train_cpu_seconds": cpu, "train_wall_seconds": time.perf_counter() - wall,
            "final_train_loss": sum(tail) / len(tail)}


# ---------------------------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model: nn.Module, heldout: dict[str, torch.Tensor], args) -> dict:
    model.eval()
    levels, size = num_levels(model), model.quantizer.codebook_size
    result, all_ids = {}, []
    for name, pixels in heldout.items():
        scores, one_step = [], []
        for i in range(0, len(pixels), args.eval_batch):
            batch = pixels[i : i + args.eval_batch]
            ids = model.encode(batch)
            scores.append(psnr(decode(model, ids).clamp(-1, 1), batch))
            if is_diffusion(model):
                one_step.append(psnr(decode(model, ids, steps=1).clamp(-1, 1), batch))
            all_ids.append(ids.reshape(-1, levels))
        key = "psnr" if name == "photo_crops" else f"psnr_{name}"
        result[key] = float(torch.cat(scores).mean())
        result[f"{key}_1step"] = float(torch.cat(one_step).mean()) if one_step else None
    ids = torch.cat(all_ids)  # (positions, L)
    per_level = [usage_metrics(ids[:, level], size) for level in range(levels)]
    result.update(utilization=sum(m["codebook_usage"] for m in per_level) / levels,
                  perplexity=sum(m["perplexity"] for m in per_level) / levels,
                  heldout_images=sum(len(p) for p in heldout.values()))
    return result


@torch.no_grad()
def speed(model: nn.Module, pixels: torch.Tensor, repeats: int = 3) -> dict:
    """Images per second (wall clock and CPU time) of encode and decode on one batch, best of ``repeats``."""
    model.eval()
    ids = model.encode(pixels)  # warm-up call
    result = {}
    for name, fn in (("encode", lambda: model.encode(pixels)), ("decode", lambda: decode(model, ids))):
        best_wall = best_cpu = math.inf
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            best_wall = min(best_wall, time.perf_counter() - wall)
            best_cpu = min(best_cpu, time.process_time() - cpu)
        result[f"{name}_images_per_second"] = len(pixels) / best_wall
        result[f"{name}_images_per_cpu_second"] = len(pixels) / max(best_cpu, 1e-9)
    return result


def describe(model: nn.Module) -> dict:
    slot = isinstance(model, SlotTokenizer)
    levels = num_levels(model)
    size = model.quantizer.codebook_size
    return dict(
        encoder="slot" if slot else model.config.encoder, quantizer=model.config.quantizer["type"],
        decoder=model.config.decoder, tokens_per_image=tokens_per_image(model), codebook_size=size, levels=levels,
        bits_per_image=round(tokens_per_image(model) * math.log2(size), 1),
        decode_steps=(model.config.diffusion_steps if slot else model.config.diffusion_settings()["steps"])
        if is_diffusion(model) else None,
        parameters=sum(p.numel() for p in model.parameters()),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    names = [n for n in args.designs.split(",") if n]
    unknown = [n for n in names if n not in DESIGNS]
    if unknown:
        raise ValueError(f"unknown designs {unknown}; choose from {list(DESIGNS)}")
    train_pixels, heldout = datasets(args)
    speed_pixels = heldout["photo_crops"][: args.speed_batch]
    rows = []
    for name in names:
        notes = DESIGNS[name]["notes"]
        if name == "vfm+vq" and args.backbone:
            notes = notes.split(", RANDOM")[0] + f", weights from {args.backbone}"
        row = dict(design=name, notes=notes, cpu_budget_seconds=args.cpu_seconds, batch_size=args.batch_size,
                   lr=args.lr, threads=args.threads, seed=args.seed, load_average_start=os.getloadavg()[0])
        model = build_model(name, args, args.seed)
        row.update(describe(model))
        row.update(train(model, train_pixels, args, args.seed))
        row.update(evaluate(model, heldout, args))
        row.update(speed(model, speed_pixels))
        row["load_average_end"] = os.getloadavg()[0]
        rows.append(row)
        one = f" (1 step {row['psnr_1step']:.2f})" if row["psnr_1step"] is not None else ""
        print(f"  {name:<19} {row['train_steps']:>5} steps  photo crops {row['psnr']:.2f} dB{one}  photos "
              f"{row['psnr_photos']:.2f}  shapes {row['psnr_shapes']:.2f}  usage {row['utilization']:.3f}  "
              f"enc {row['encode_images_per_second']:.0f}/s  dec {row['decode_images_per_second']:.0f}/s  "
              f"(load {row['load_average_start']:.1f})", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------- report
def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> list[str]:
    lines = ["| design | PSNR photo crops | (1 step) | PSNR photos | PSNR shapes | utilization | perplexity | "
             "tokens / image | bits / image | train steps | train CPU s | encode img/s | decode img/s | "
             "encode img/CPU-s | decode img/CPU-s | load avg |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['design']} | {r['psnr']:.2f} | {_f(r['psnr_1step'], '.2f')} | {r['psnr_photos']:.2f} | "
            f"{r['psnr_shapes']:.2f} | {r['utilization']:.3f} | {r['perplexity']:.0f} | {r['tokens_per_image']} | "
            f"{r['bits_per_image']:.0f} | {r['train_steps']} | {r['train_cpu_seconds']:.0f} | "
            f"{r['encode_images_per_second']:.0f} | {r['decode_images_per_second']:.0f} | "
            f"{r['encode_images_per_cpu_second']:.0f} | {r['decode_images_per_cpu_second']:.0f} | "
            f"{r['load_average_start']:.1f}-{r['load_average_end']:.1f} |")
    return lines


def findings(rows: list[dict]) -> list[str]:
    """Sentences computed from the rows (so a rerun keeps them true)."""
    by = {r["design"]: r for r in rows}
    out = []
    best = max(rows, key=lambda r: r["psnr"])
    ranking = ", ".join(f"{r['design']} {r['psnr']:.2f}" for r in sorted(rows, key=lambda r: -r["psnr"]))
    out.append(f"- **Held-out photo crops**: {best['design']} reconstructs best at this budget; ranking (dB): "
               f"{ranking}.")
    if "conv+vq" in by and "conv+vq+diffusion" in by:
        a, b = by["conv+vq"], by["conv+vq+diffusion"]
        out.append(
            f"- **Diffusion vs conv decoder** (same encoder and quantizer): {b['psnr'] - a['psnr']:+.2f} dB on photo "
            f"crops with {b['decode_steps']} Euler steps ({b['psnr_1step'] - a['psnr']:+.2f} dB with one step, the "
            f"decoder's regression estimate), {b['psnr_shapes'] - a['psnr_shapes']:+.2f} dB on shapes; "
            f"{a['train_steps']} vs {b['train_steps']} training steps in the same CPU time; decoding is "
            f"{a['decode_images_per_cpu_second'] / max(b['decode_images_per_cpu_second'], 1e-9):.0f}x slower per "
            f"CPU second.")
    for name in ("slot+rvq+diffusion", "vit+fsq", "vfm+vq"):
        if name in by and "conv+vq" in by:
            r, a = by[name], by["conv+vq"]
            out.append(f"- **{name}** vs conv+vq: {r['psnr'] - a['psnr']:+.2f} dB photo crops, "
                       f"{r['psnr_shapes'] - a['psnr_shapes']:+.2f} dB shapes, utilization {r['utilization']:.2f} vs "
                       f"{a['utilization']:.2f}, {r['train_steps']} vs {a['train_steps']} steps, encode "
                       f"{r['encode_images_per_cpu_second']:.0f} vs {a['encode_images_per_cpu_second']:.0f} img/CPU-s.")
    steps = sorted(r["train_steps"] for r in rows)
    if len(rows) > 1:
        out.append(f"- **Cost per step shapes the ranking**: in the same CPU time the designs ran {steps[0]} to "
                   f"{steps[-1]} training steps ({steps[-1] / max(steps[0], 1):.0f}x). All are far from converged and "
                   "this is one seed (the seed-to-seed spread in `quantizer_quality.md` is up to ~0.3 dB on photo "
                   "crops), so the table compares what each design reaches on a small CPU budget, not its ceiling.")
    low = [r["design"] for r in rows if r["utilization"] < 0.1]
    if low:
        out.append(f"- **Low codebook use** (< 10% of a level's codes on the held-out images): {', '.join(low)}.")
    return out


def markdown(rows: list[dict], args) -> str:
    lines = ["# Tokenizer designs at the same CPU budget (32 px images, 16 tokens of 10 bits each)", "",
             f"Each design trains for {args.cpu_seconds:.0f} s of process CPU time ({args.threads} thread(s), batch "
             f"{args.batch_size}, AdamW lr {args.lr}, seed {args.seed}) on the tokenizer stage's mixture (shapes "
             "renders + crops of the training photos), then is evaluated on held-out data only: 256 random crops of "
             "the 4 held-out photographs (`psnr`), the 4 held-out photographs center-resized to 32 px, and renders of "
             "the held-out shapes combinations. Diffusion decoders sample with seed 0; '1 step' is the same decoder "
             "with one Euler step. Utilization: fraction of each level's codebook used by all held-out ids (mean over "
             "levels). Speed: one batch of "
             f"{args.speed_batch} images, best of 3, wall clock (affected by the machine's load: the load average "
             "before and after each design is in the last column; other jobs were running) and per CPU second "
             "(robust to load). Produced by `python bench/tokenizer_designs.py --json "
             "bench/results/tokenizer_designs.json --markdown bench/results/tokenizer_designs.md`.", "",
             *table(rows), "", "## Designs", ""]
    lines += [f"- `{r['design']}`: {r['notes']} ({r['parameters'] / 1e3:.0f}k parameters, "
              f"{r['trainable_parameters'] / 1e3:.0f}k trainable)." for r in rows]
    lines += ["", "No pretrained vision weights can be downloaded here: the VFM design runs on a randomly initialised "
              "DINOv2-architecture backbone, so it measures the architecture (frozen + partly trainable transformer "
              "encoder), not the benefit of foundation features; pass `--backbone PATH` with a saved DINOv2/SigLIP "
              "model to measure that.", "", "## Findings (computed from the table)", "", *findings(rows), ""]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            rows = json.load(f)
    else:
        rows = run(args)
    print("\n".join(table(rows)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows, args))
    return rows


if __name__ == "__main__":
    main()
