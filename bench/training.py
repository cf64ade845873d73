"""Training throughput: pad-to-longest vs packed batches, same tiny Llama, same samples, one process.

    python bench/training.py [--samples 256] [--max-tokens 512] [--rounds 2] [--json results.json]

Data (the embedded mixture): half image samples built as the llm stage builds them (shapes captions and their image
ids; captioning or text-to-image, 50/50), half text-only plain-LM samples of varying length (1 to ``--max-captions``
shapes captions in a row), shuffled together. Image ids come from an untrained visual tokenizer: throughput and
padding depend only on the sequence lengths, not on what the ids mean.

Modes, each running forward + backward over every sample, ``--rounds`` times interleaved after a warm-up batch (the
fastest pass counts: the machine may be shared):
- ``padded``: batches of ``--batch-size`` samples in stream order, padded to the longest (``attention_mask``);
- ``packed``: first-fit-decreasing over ``--buffer`` samples into rows of ``--max-tokens``, ``--rows`` rows a batch;
- ``packed_greedy``: the same rows budget filled in stream order;
- ``hf_flattened`` (peer): transformers' ``DataCollatorWithFlattening`` on the padded mode's batches (one row per
  batch, no padding at all, position ids restart per sample), with ``use_cache=False`` so sdpa keeps samples apart.

``tokens_per_second`` counts real (non-padding) tokens per second of forward + backward, timed in this process's CPU
seconds (``--threads 1``, the default, makes that the compute time, steady even when other jobs share the cores;
``wall_seconds`` is reported too); ``nonpad_fraction`` is real tokens over token slots. The packing fractions at 2048-token rows are reported too (planning only, not timed).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time

import torch
from transformers import DataCollatorWithFlattening

from mllm.data.packing import PackingCollator, PaddingCollator, split_columns
from mllm.data.records import shapes_records
from mllm.data.tasks import choose_task, make_example
from mllm.model import bridge
from mllm.training.recipe import DataRecipe, Recipe
from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig

LLAMA = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=2048, attn_implementation="sdpa")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--image-size", type=int, default=64, help="pixels; 64 -> 8x8 ids -> 74-token image spans")
    p.add_argument("--max-captions", type=int, default=36, help="longest text-only sample, in captions")
    p.add_argument("--batch-size", type=int, default=8, help="samples per padded batch")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per packed row")
    p.add_argument("--rows", type=int, default=2, help="packed rows per batch")
    p.add_argument("--buffer", type=int, default=1024, help="samples sorted together by first-fit-decreasing")
    p.add_argument("--rounds", type=int, default=2, help="timed passes per mode (interleaved); the fastest counts")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result rows here")
    return p.parse_args(argv)


def build_model_and_samples(args):
    """(tiny bridged Llama, processor, per-sample features) for the embedded mixture."""
    torch.manual_seed(args.seed)
    vt = VisualTokenizer(VisualTokenizerConfig(image_size=args.image_size, base_channels=8, latent_dim=8,
                                               codebook_size=256, downsample=8)).eval()
    recipe = Recipe(stage="llm", output_dir=tempfile.gettempdir(), visual_tokenizer="untrained",
                    model={"config": LLAMA}, data=DataRecipe(image_size=args.image_size, num_train=args.samples))
    model, processor = bridge(recipe.model, vt, args.image_size)
    records = shapes_records(recipe, vt)
    captions, image_ids = records.captions, records.image_ids
    rng = random.Random(args.seed)
    prompts, texts, ids = [], [], []
    for i in range(args.samples):
        if rng.random() < 0.5:
            ex = make_example(choose_task(recipe.data.tasks, rng), captions[i], 0.0, rng)
            prompts.append(ex.prompt), texts.append(ex.target), ids.append([image_ids[i]])
        else:
            picks = rng.choices(captions, k=rng.randint(1, args.max_captions))
            prompts.append(None), texts.append(" ".join(picks)), ids.append([])
    batch = processor(text=prompts, target=texts, image_ids=ids, padding=False, return_tensors=None)
    return model, processor, split_columns({k: batch[k] for k in ("input_ids", "labels")})


def padded_batches(features, args, pad_id):
    collate = PaddingCollator(pad_token_id=pad_id)
    return [collate(features[i : i + args.batch_size]) for i in range(0, len(features), args.batch_size)]


def packed_batches(features, args, pad_id, strategy, max_tokens=None):
    collator = PackingCollator(max_tokens=max_tokens or args.max_tokens, strategy=strategy, buffer_size=args.buffer,
                               pad_token_id=pad_id)
    rows = collator.plan([len(f["input_ids"]) for f in features])
    return [collator.collate(features, rows[i : i + args.rows]) for i in range(0, len(rows), args.rows)]


def flattened_batches(features, args):
    collate = DataCollatorWithFlattening()
    batches = [collate(features[i : i + args.batch_size]) for i in range(0, len(features), args.batch_size)]
    return [{**dict(b), "use_cache": False} for b in batches]


def time_batches(model, batches) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of forward + backward over ``batches``."""
    model.train()
    cpu, wall = time.process_time(), time.perf_counter()
    for batch in batches:
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
    return time.process_time() - cpu, time.perf_counter() - wall


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    model, processor, features = build_model_and_samples(args)
    pad_id = processor.tokenizer.pad_token_id
    tokens = sum(len(f["input_ids"]) for f in features)
    modes = {
        "padded": padded_batches(features, args, pad_id),
        "packed": packed_batches(features, args, pad_id, "ffd"),
        "packed_greedy": packed_batches(features, args, pad_id, "greedy"),
        "hf_flattened": flattened_batches(features, args),
    }
    for batches in modes.values():  # warm-up
        time_batches(model, batches[:1])
    seconds = {mode: (float("inf"), float("inf")) for mode in modes}
    for _ in range(args.rounds):  # interleaved, so a busy spell on a shared machine hits every mode alike
        for mode, batches in modes.items():
            seconds[mode] = min(seconds[mode], time_batches(model, batches))
    rows = []
    for mode, batches in modes.items():
        slots = sum(b["input_ids"].numel() for b in batches)
        rows.append(dict(mode=mode, nonpad_fraction=tokens / slots, tokens_per_second=tokens / seconds[mode][0],
                         tokens=tokens, slots=slots, batches=len(batches), seconds=seconds[mode][0], wall_seconds=seconds[mode][1],
                         max_tokens=args.max_tokens if mode.startswith("packed") else None,
                         batch_size=args.batch_size if mode in ("padded", "hf_flattened") else None,
                         rows_per_batch=args.rows if mode.startswith("packed") else None))
    for strategy in ("ffd", "greedy"):  # planning only: the 2048-token reference
        slots = sum(b["input_ids"].numel() for b in packed_batches(features, args, pad_id, strategy, 2048))
        rows.append(dict(mode=f"plan_{strategy}_2048", nonpad_fraction=tokens / slots, tokens=tokens, slots=slots,
                         max_tokens=2048))
    return rows


def report(rows: list[dict], features_note: str) -> None:
    print(features_note)
    print(f"{'mode':<18}{'nonpad':>9}{'pad':>8}{'tokens/s':>12}{'cpu s':>9}{'batches':>9}")
    for r in rows:
        tps = f"{r['tokens_per_second']:.0f}" if "tokens_per_second" in r else "-"
        secs = f"{r['seconds']:.2f}" if "seconds" in r else "-"
        print(f"{r['mode']:<18}{r['nonpad_fraction']:>9.3f}{1 - r['nonpad_fraction']:>8.3f}{tps:>12}{secs:>9}"
              f"{r.get('batches', '-'):>9}")
    by = {r["mode"]: r for r in rows}
    print(f"packed / padded tokens/s: {by['packed']['tokens_per_second'] / by['padded']['tokens_per_second']:.2f}x; "
          f"packed / hf_flattened: {by['packed']['tokens_per_second'] / by['hf_flattened']['tokens_per_second']:.2f}x")


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = run(args)
    report(rows, f"{args.samples} samples (50% image+text, 50% text-only), {rows[0]['tokens']} real tokens, "
                 f"{args.threads} thread(s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
