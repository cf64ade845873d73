"""One training step of the demo's stages, through the loop's own Trainer, against torch's stock paths.

    python bench/demo_steps.py [--steps 60] [--rounds 5] [--threads 2] [--json results.json]

Rows, each the median milliseconds per optimizer step over ``--rounds`` interleaved rounds of ``--steps`` steps (after
a warm-up round), on the embedded data:
- ``tokenizer``: ``recipes/demo_tokenizer.yaml`` (ViT + FSQ, 32 px, batch 32) as the loop runs it (fused AdamW; a
  window that spans the 4x4 grid attends unmasked), against the peer ``torch.optim.AdamW`` defaults (for-loop) with the
  window mask passed to ``scaled_dot_product_attention`` as before;
- ``tokenizer_depth``: the recipe's stage 1 (decoder depth 2) against the same at decoder depth 4 (the recipe before
  the demo's decoder stage learned to grow the decoder), both as the loop runs them;
- ``llm``: ``recipes/demo_llm.yaml`` (4-layer Llama, batch 32) as the loop runs it, against the peer stock AdamW, on
  an untrained tokenizer's ids (the step's cost depends only on the shapes);
- ``llm_bf16``: the same at ``train.mixed_precision=bf16`` against float32 (the peer: accelerate's default).

Ratios above 1 mean the loop's path is faster. Weights differ between variants only by the steps they took.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from mllm.demo import recipe_path
from mllm.training.loop import Trainer, build_stage
from mllm.training.recipe import load_recipe
from tokenizer_bridge.nn import vit


def masked_stack_forward(self, tokens, height, width, mask=None):
    """The previous ViTStack path: the window mask is built and passed even when it allows every pair."""
    angles = vit.grid_angles(height, width, self.head_dim, self.rope_theta, tokens.device)
    if self.attention_radius is not None:
        mask = vit.attention_mask(height, width, self.attention_radius, mask, tokens.device)
    elif mask is not None:
        mask = mask[:, None, None, :]
    return self.norm(vit.run_blocks(self, self.blocks, tokens, angles, mask))


def trainer(name: str, out: str, overrides: list[str], stock_adamw: bool) -> Trainer:
    stock = ["train.fused_optimizer=false"] if stock_adamw else []  # torch.optim.AdamW's for-loop kernel on CPU
    recipe = load_recipe(recipe_path(name), [f"output_dir={out}", "train.steps=100000", *overrides, *stock])
    t = Trainer(recipe, build_stage(recipe))
    t.train_mode(t.model)
    return t


def time_steps(t: Trainer, batches: list[dict], patch=None) -> float:
    original = vit.ViTStack.forward
    if patch is not None:
        vit.ViTStack.forward = patch
    try:
        start = time.perf_counter()
        for batch in batches:
            t.optimizer_step(batch)
        return (time.perf_counter() - start) / len(batches) * 1000
    finally:
        vit.ViTStack.forward = original


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="tokenizer,tokenizer_depth,llm,llm_bf16", help="comma-separated rows to time")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tok_out = f"{tmp}/tok"
        ours = trainer("demo_tokenizer.yaml", tok_out, [], stock_adamw=False)
        peer = trainer("demo_tokenizer.yaml", tok_out, [], stock_adamw=True)
        ours.stage.model.save_pretrained(f"{tmp}/untrained")
        llm_overrides = [f"visual_tokenizer={tmp}/untrained"]
        llm = trainer("demo_llm.yaml", f"{tmp}/llm", llm_overrides, False)
        depth4 = ["model.decoder_options={width: 96, depth: 4, num_heads: 2, attention_radius: 3}"]
        variants = {
            "tokenizer": (ours, None, peer, masked_stack_forward),
            "tokenizer_depth": (ours, None, trainer("demo_tokenizer.yaml", tok_out, depth4, False), None),
            "llm": (llm, None, trainer("demo_llm.yaml", f"{tmp}/llm_stock", llm_overrides, True), None),
            "llm_bf16": (trainer("demo_llm.yaml", f"{tmp}/llm_bf16", llm_overrides + ["train.mixed_precision=bf16"],
                                 False), None, llm, None),
        }
        for row, (a, patch_a, b, patch_b) in variants.items():
            if row not in args.rows.split(","):
                continue
            batches = [a.stage.batch_for_step(s, 0, 1) for s in range(args.steps)]
            time_steps(a, batches[:5], patch_a), time_steps(b, batches[:5], patch_b)  # warm-up
            times = {"ours": [], "peer": []}
            for _ in range(args.rounds):
                times["ours"].append(time_steps(a, batches, patch_a))
                times["peer"].append(time_steps(b, batches, patch_b))
            ms = {k: round(statistics.median(v), 2) for k, v in times.items()}
            results[row] = {"ours_ms": ms["ours"], "peer_ms": ms["peer"], "ratio": round(ms["peer"] / ms["ours"], 2)}
            print(f"{row:10s} ours {ms['ours']:7.2f} ms  peer {ms['peer']:7.2f} ms  "
                  f"peer/ours {results[row]['ratio']:.2f}x", flush=True)
    results["settings"] = vars(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
