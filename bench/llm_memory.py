"""LLM-stage peak memory and step time: activation checkpointing off/on, gradient accumulation 1 vs 4 (same effective
batch), our training loop beside a hand-written transformers + torch loop doing the same.

    python bench/llm_memory.py [--steps 4] [--batch-size 16] [--image-size 64] [--json out.json] [--out out.md]

Model and data: a Llama (``--hidden``, ``--layers``) bridged to an untrained conv+VQ visual tokenizer (``--image-size``
px, downsample 4: 16x16 ids at 64 px, ~280-token samples), trained on the shapes captioning + text-to-image mixture
of ``recipes/demo_llm.yaml``; the batch of every step is the llm stage's own ``batch_for_step``.

Runners, each configuration in a fresh process (``--one``) so that peak memory is its own:
- ``ours``: :class:`mllm.training.loop.Trainer` (accelerate, ``train.gradient_checkpointing``,
  ``train.gradient_accumulation_steps``, the step-wide token normaliser);
- ``plain`` (peer): the loop a user writes with transformers and torch alone: ``model.gradient_checkpointing_enable()``,
  ``loss / N`` per micro-batch from the model's own loss, ``torch.optim.AdamW``, gradient clipping.

Measured per configuration: ``peak_mb``, the growth of the process's peak RSS (``VmHWM``) over its resident size after
the model, data and optimizer were built (activations, gradients and optimizer states of the training steps);
``step_seconds``, the median CPU time of a step after one warm-up step, in one thread (steady on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [(runner, checkpointing, accumulation) for runner in ("ours", "plain") for checkpointing in (False, True)
           for accumulation in (1, 4)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per optimizer step")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--json", help="write the result rows here")
    p.add_argument("--out", help="write the Markdown report here")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child mode: one JSON configuration
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.image_size, args.hidden, args.layers = 1, 4, 32, 32, 1
    return args


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure(config: dict) -> dict:
    """One configuration in this process (the child): train and time ``steps + 1`` steps."""
    import torch

    torch.set_num_threads(1)
    from accelerate.utils import set_seed

    from mllm.training.loop import Trainer, build_stage
    from mllm.training.recipe import load_recipe
    from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig

    work = tempfile.mkdtemp(prefix="bench-llm-memory-")
    torch.manual_seed(0)
    VisualTokenizer(VisualTokenizerConfig(base_channels=8, latent_dim=8, codebook_size=1024, downsample=4,
                                          image_size=config["image_size"])).save_pretrained(os.path.join(work, "vt"))
    heads = max(1, config["hidden"] // 64)
    recipe = load_recipe(os.path.join(ROOT, "recipes/demo_llm.yaml"), [
        f"output_dir={work}/run", f"visual_tokenizer={work}/vt", f"data.image_size={config['image_size']}",
        "data.num_train=256", f"train.batch_size={config['batch_size']}", f"train.steps={config['steps'] + 1}",
        "train.warmup_steps=0", "train.save_every=0", "data.prompt_dropout=0",
        f"train.gradient_accumulation_steps={config['accumulation']}",
        f"train.gradient_checkpointing={str(config['checkpointing']).lower()}",
        f"model.config.hidden_size={config['hidden']}", f"model.config.intermediate_size={2 * config['hidden']}",
        f"model.config.num_hidden_layers={config['layers']}", f"model.config.num_attention_heads={heads}",
        f"model.config.num_key_value_heads={heads}", "model.config.max_position_embeddings=1024"])
    set_seed(0)
    stage = build_stage(recipe)
    batches = [stage.batch_for_step(s, 0, 1) for s in range(config["steps"] + 1)]
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches[1:]))
    if config["runner"] == "ours":
        trainer = Trainer(recipe, stage)
        trainer.model.train()

        def step(batch):
            return float(trainer.optimizer_step(batch)[0])
    else:
        step = plain_loop(stage.model, recipe)
    base_kb = _status_kb("VmRSS")
    times, losses = [], []
    for k, batch in enumerate(batches):
        start = time.process_time()
        losses.append(step(batch))
        if k:
            times.append(time.process_time() - start)
    return {**config, "peak_mb": (_status_kb("VmHWM") - base_kb) / 1024, "step_seconds": statistics.median(times),
            "tokens_per_step": tokens / config["steps"], "losses": losses}


def plain_loop(model, recipe):
    """The peer: what a transformers + torch user writes for checkpointing and accumulation."""
    import torch

    from mllm.training.losses import MODEL_INPUTS
    from mllm.training.loop import split_batch

    cfg = recipe.train
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step(batch):
        total = 0.0
        for micro in split_batch(batch, cfg.gradient_accumulation_steps):
            loss = model(**{k: v for k, v in micro.items() if k in MODEL_INPUTS}).loss
            (loss / cfg.gradient_accumulation_steps).backward()
            total += float(loss) / cfg.gradient_accumulation_steps
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    return step


def run_child(config: dict, timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(config)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"configuration {config} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def report(rows: list[dict], args) -> str:
    by = {(r["runner"], r["checkpointing"], r["accumulation"]): r for r in rows}
    lines = ["| runner | checkpointing | accumulation | peak MB | vs no checkpointing | step s | vs no checkpointing "
             "| ours / plain (memory, time) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (runner, ckpt, acc), r in by.items():
        off = by[(runner, False, acc)]
        peer = by.get(("plain", ckpt, acc))
        versus = (f"{_ratio(r['peak_mb'], peer['peak_mb'])}, {_ratio(r['step_seconds'], peer['step_seconds'])}"
                  if runner == "ours" and peer else "")
        lines.append(f"| {runner} | {'on' if ckpt else 'off'} | {acc} | {r['peak_mb']:.0f} | "
                     f"{_ratio(r['peak_mb'], off['peak_mb'])} | {r['step_seconds']:.2f} | "
                     f"{_ratio(r['step_seconds'], off['step_seconds'])} | {versus} |")
    summary = []
    for runner in ("ours", "plain"):
        base = by[(runner, False, 1)]
        for ckpt, acc in ((True, 1), (False, 4), (True, 4)):
            r = by[(runner, ckpt, acc)]
            summary.append(f"- {runner}: checkpointing {'on' if ckpt else 'off'}, accumulation {acc}: peak memory "
                           f"{_ratio(r['peak_mb'], base['peak_mb'])}, step time {_ratio(r['step_seconds'], base['step_seconds'])}"
                           " of no checkpointing, accumulation 1")
    head = (f"Llama hidden {args.hidden}, {args.layers} layers; batch {args.batch_size} samples per optimizer step "
            f"(~{rows[0]['tokens_per_step']:.0f} tokens); {args.image_size} px images -> "
            f"{(args.image_size // 4) ** 2} ids; {args.steps} timed steps after one warm-up; one thread.")
    return "\n".join([head, "", *lines, "", *summary]) + "\n"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return []
    rows = []
    for runner, checkpointing, accumulation in CONFIGS:
        config = dict(runner=runner, checkpointing=checkpointing, accumulation=accumulation, steps=args.steps,
                      batch_size=args.batch_size, image_size=args.image_size, hidden=args.hidden, layers=args.layers)
        row = run_child(config, args.timeout)
        rows.append(row)
        print(f"  {runner:5s} checkpointing={'on ' if checkpointing else 'off'} accumulation={accumulation} "
              f"peak {row['peak_mb']:.0f} MB, {row['step_seconds']:.2f} s/step", flush=True)
    text = report(rows, args)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# LLM stage: activation checkpointing and gradient accumulation\n\nWritten by `python "
                    f"bench/llm_memory.py{' --quick' if args.quick else ''}`.\n\n" + text)
    return rows


if __name__ == "__main__":
    main()
