"""Image-generation throughput: our span processor vs unconstrained ``generate`` vs ``prefix_allowed_tokens_fn``.

    python bench/generation.py [--layouts grid sequence ...] [--end-to-end grid] [--repeats 2] [--json results.json]

One random ~24M-parameter Llama (hidden 384, 6 layers, ~16.5k-token vocabulary: 8k text tokens + the image tokens of
every layout), a batch of 4 text-to-image prompts ending in ``<boi>``, greedy decoding of one image span (256 new
tokens; ``min_new_tokens = max_new_tokens``, so every mode generates the same number of tokens and the unconstrained
one never stops at EOS). Modes, on the same model and batch:

- ``unconstrained``: plain ``model.generate`` -- the floor;
- ``prefix_fn`` (peer): transformers' ``prefix_allowed_tokens_fn``, the way Emu3's documentation constrains image
  generation: a Python function called for every row at every step that finds the row's ``<boi>``, works out the
  position in the span and returns the list of allowed token ids;
- ``ours``: :class:`~mllm.generation.ImageSpanLogitsProcessor` (batched tensor state machine, no Python per row).

Layouts: whichever :class:`~tokenizer_bridge.ImageVocab` supports at run time of ``grid`` (rows + ``<eol>``),
``sequence``, ``levels`` (2 residual levels per position, own id ranges), ``level_major`` (one grid pass per level),
``factorized`` (2 sub-tokens per id) and ``variable`` (size tokens after ``<boi>``).

Two measurements, both in this process's CPU seconds with one thread (steady even when other jobs share the cores):

- end to end (``--end-to-end`` layouts, the first layout at least): the three modes interleaved, ``--repeats``
  times after a short warm-up, median per mode; ``ours`` and ``prefix_fn`` must generate the same tokens (greedy
  under the same grammar), which the script checks. On a loaded machine these totals are noisy by several percent.
- constraint alone (every layout): a fresh processor of each mode is called on every prefix of a well-formed span
  with random scores, exactly as ``generate`` calls it (median of ``--replays``; ``prefix_fn`` once: it is slow and
  its cost is not in doubt). Its cost per step over the unconstrained step time is ``replay_overhead_percent``, a
  far steadier estimate of the overhead; layouts not timed end to end report ``tokens_per_second`` estimated as
  unconstrained step time + constraint time (``source: replay_estimate``).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from typing import Optional

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList
from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor
from transformers.utils import logging as hf_logging

from mllm.generation import ImageSpanLogitsProcessor
from tokenizer_bridge import ImageVocab
from tokenizer_bridge import image_vocab as image_vocab_module

TEXT_TOKENS, BOI, EOI, EOL, OFFSET = 8000, 8000, 8001, 8002, 8003
VOCAB_SIZE = OFFSET + 8192 + 64  # image tokens of the largest layout + size tokens, rounded up
LLAMA = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
             num_key_value_heads=6, max_position_embeddings=512, vocab_size=VOCAB_SIZE, pad_token_id=0,
             bos_token_id=1, eos_token_id=2)
MODES = ("unconstrained", "prefix_fn", "ours")
SPECIALS = dict(offset=OFFSET, boi_token_id=BOI, eoi_token_id=EOI)
# name -> ImageVocab keyword arguments (about 256 tokens after <boi>), image size to generate (variable grids)
LAYOUTS = {
    "grid": dict(codebook_size=8192, layout="grid", grid_size=(15, 16), eol_token_id=EOL),
    "sequence": dict(codebook_size=8192, layout="sequence", num_tokens=255),
    "levels": dict(codebook_size=4096, layout="grid", grid_size=(15, 8), eol_token_id=EOL, num_levels=2,
                   separate_level_ranges=True),
    "level_major": dict(codebook_size=4096, layout="grid", grid_size=(8, 15), eol_token_id=EOL, num_levels=2,
                        level_order="level", separate_level_ranges=True),
    "factorized": dict(codebook_size=4096, layout="grid", grid_size=(15, 8), eol_token_id=EOL, factors=[64, 64]),
    "variable": dict(codebook_size=8192, layout="grid", grid_size=(16, 16), eol_token_id=EOL, variable_size=True,
                     size_token_offset=OFFSET + 8192),
}
VARIABLE_SIZE = (15, 16)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--end-to-end", nargs="+", default=["grid"],
                   help="layouts timed end to end; the others add their replayed constraint cost to the measured "
                        "unconstrained step time")
    p.add_argument("--repeats", type=int, default=2, help="end-to-end runs per mode and layout (interleaved)")
    p.add_argument("--replays", type=int, default=5, help="replays of the constraint alone per mode and layout")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result rows here")
    return p.parse_args(argv)


def available_vocab(name: str):
    """The layout's ImageVocab, or None when the installed ImageVocab lacks a field it needs."""
    kwargs = {**SPECIALS, **LAYOUTS[name]}
    if not set(kwargs) <= set(ImageVocab.__dataclass_fields__):
        return None
    return ImageVocab(**kwargs)


def span_head(vocab: ImageVocab) -> list[int]:
    """The prompt's last tokens: ``<boi>`` (+ the size tokens of a variable grid)."""
    return [BOI] + (vocab.size_tokens(*VARIABLE_SIZE) if getattr(vocab, "variable_size", False) else [])


def new_tokens(vocab: ImageVocab) -> int:
    if getattr(vocab, "variable_size", False):
        return vocab.span_length_of(*VARIABLE_SIZE) - len(span_head(vocab))
    return vocab.span_length - 1


# ---------------------------------------------------------------------------------------------- peer
def slot_allowed_lists(vocab: ImageVocab) -> dict[int, list[int]]:
    """Allowed token ids of each span slot code, as Python lists (what a prefix function returns)."""
    if not hasattr(vocab, "span_slots"):  # two-category vocabularies: image ids, <eol>, <eoi>
        image = list(range(*vocab.id_range))
        return {"image": image, "eol": [vocab.eol_token_id], "eoi": [vocab.eoi_token_id]}
    slots = image_vocab_module
    allowed = {slots.SLOT_EOI: [vocab.eoi_token_id], slots.SLOT_EOL: [vocab.eol_token_id]}
    masks = vocab.class_token_mask(VOCAB_SIZE)
    for c in range(vocab.num_slot_classes):
        allowed[slots.SLOT_IMAGE + c] = masks[c].nonzero().flatten().tolist()
    if getattr(vocab, "variable_size", False):
        sizes = vocab.size_token_ids
        allowed[slots.SLOT_HEIGHT], allowed[slots.SLOT_WIDTH] = sizes[: vocab.grid_size[0]], sizes[vocab.grid_size[0]:]
    return allowed


def make_prefix_fn(vocab: ImageVocab):
    """An Emu3-style ``prefix_allowed_tokens_fn(batch_id, input_ids) -> allowed ids`` for ``vocab``'s grammar."""
    allowed = slot_allowed_lists(vocab)
    text = list(range(TEXT_TOKENS))

    @functools.lru_cache(maxsize=None)
    def slot_table(h: int, w: int) -> list:
        if not hasattr(vocab, "span_slots"):
            codes = ["image"] * (vocab.span_length - 2) + ["eoi"]
            if vocab.layout == "grid":
                codes[w :: w + 1] = ["eol"] * len(codes[w :: w + 1])
                codes[-1] = "eoi"
            return codes
        return vocab.span_slots(torch.arange(vocab.span_length_of(h, w) - 1), h, w).tolist()

    variable = getattr(vocab, "variable_size", False)

    def prefix_allowed_tokens_fn(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        boi = (input_ids == BOI).nonzero()
        if len(boi) == 0:
            return text
        start = int(boi[-1]) + 1
        offset = len(input_ids) - start
        h, w = vocab.grid_size if vocab.layout == "grid" else (1, vocab.num_image_ids)
        if variable and offset >= 2:
            h = int(input_ids[start]) - vocab.size_token_offset + 1
            w = int(input_ids[start + 1]) - vocab.size_token_offset - vocab.grid_size[0] + 1
        table = slot_table(h, w)
        return allowed[table[min(offset, len(table) - 1)]]

    return prefix_allowed_tokens_fn


# ---------------------------------------------------------------------------------------------- timing
def mode_processors(mode: str, vocab: ImageVocab) -> dict:
    """``generate`` keyword arguments that turn on ``mode``'s constraint."""
    if mode == "prefix_fn":
        return {"prefix_allowed_tokens_fn": make_prefix_fn(vocab)}
    if mode == "ours":
        return {"logits_processor": LogitsProcessorList([ImageSpanLogitsProcessor(vocab, VOCAB_SIZE)])}
    return {}


def run_mode(mode: str, model, vocab: ImageVocab, input_ids: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
    """(``n`` generated tokens per row, CPU seconds) of one greedy generation."""
    kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    start = time.process_time()
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs,
                         **mode_processors(mode, vocab))
    return out[:, input_ids.shape[1]:], time.process_time() - start


def synthesize(vocab: ImageVocab, input_ids: torch.Tensor, n: int) -> torch.Tensor:
    """A well-formed generation ``(B, P + n)`` without the model: greedy on random scores through our processor."""
    processor = ImageSpanLogitsProcessor(vocab, VOCAB_SIZE)
    generator = torch.Generator().manual_seed(0)
    for _ in range(n):
        scores = processor(input_ids, torch.randn(input_ids.shape[0], VOCAB_SIZE, generator=generator))
        input_ids = torch.cat([input_ids, scores.argmax(dim=-1, keepdim=True)], dim=1)
    return input_ids


def constraint(mode: str, vocab: ImageVocab):
    """The logits processor ``generate`` builds for ``mode`` (None: unconstrained)."""
    kwargs = mode_processors(mode, vocab)
    if mode == "prefix_fn":
        return PrefixConstrainedLogitsProcessor(kwargs["prefix_allowed_tokens_fn"], num_beams=1)
    return kwargs["logits_processor"][0] if kwargs else None


def replay_seconds(mode: str, vocab: ImageVocab, sequences: torch.Tensor, prompt_length: int, repeats: int) -> float:
    """Median CPU seconds the mode's constraint alone takes over one generation: a fresh processor is called on every
    prefix of ``sequences`` (a well-formed generation) with random scores, as ``generate`` calls it."""
    if mode == "unconstrained":
        return 0.0
    scores = torch.randn(sequences.shape[0], VOCAB_SIZE)
    runs = []
    for _ in range(1 if mode == "prefix_fn" else repeats):
        processor = constraint(mode, vocab)
        start = time.process_time()
        for end in range(prompt_length, sequences.shape[1]):
            processor(sequences[:, :end], scores)
        runs.append(time.process_time() - start)
    return statistics.median(runs)


def end_to_end(vocab: ImageVocab, model, input_ids: torch.Tensor, repeats: int) -> dict:
    """Median CPU seconds per mode of one greedy generation, modes interleaved after a short warm-up."""
    n = new_tokens(vocab)
    for mode in MODES:
        run_mode(mode, model, vocab, input_ids, 8)
    times, outputs = {mode: [] for mode in MODES}, {}
    for _ in range(repeats):
        for mode in MODES:
            outputs[mode], cpu = run_mode(mode, model, vocab, input_ids, n)
            times[mode].append(cpu)
    if not torch.equal(outputs["ours"], outputs["prefix_fn"]):
        raise AssertionError("ours and prefix_fn generated different tokens under the same grammar")
    vocab.parse_span(torch.cat([input_ids[0, -len(span_head(vocab)):], outputs["ours"][0]]))  # well formed
    return {mode: statistics.median(t) for mode, t in times.items()}


def bench_layout(name: str, vocab: ImageVocab, model, args, step_seconds: Optional[float]) -> tuple[list, float]:
    """Rows of one layout, and the unconstrained CPU seconds per step. Timed end to end when ``step_seconds`` is
    None; else each mode is estimated as ``step_seconds`` per step plus its replayed constraint cost."""
    generator = torch.Generator().manual_seed(args.seed)
    text = torch.randint(3, TEXT_TOKENS, (args.batch_size, 12), generator=generator)
    head = torch.tensor(span_head(vocab)).expand(args.batch_size, -1)
    input_ids = torch.cat([torch.ones(args.batch_size, 1, dtype=torch.long), text, head], dim=1)
    n = new_tokens(vocab)
    measured = end_to_end(vocab, model, input_ids, args.repeats) if step_seconds is None else None
    step_seconds = measured["unconstrained"] / n if measured else step_seconds
    sequences = synthesize(vocab, input_ids, n)
    rows = []
    for mode in MODES:
        replay = replay_seconds(mode, vocab, sequences, input_ids.shape[1], args.replays)
        seconds = measured[mode] if measured else step_seconds * n + replay
        rows.append(dict(mode=mode, layout=name, new_tokens=n, source="end_to_end" if measured else "replay_estimate",
                         tokens_per_second=args.batch_size * n / seconds,
                         overhead_percent=100 * (seconds / (step_seconds * n) - 1),
                         constraint_us_per_step=1e6 * replay / n,
                         replay_overhead_percent=100 * replay / (step_seconds * n)))
    return rows, step_seconds


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"random Llama {params:.1f}M parameters, batch {args.batch_size}, {args.threads} thread(s), CPU seconds; "
          f"end to end: median of {args.repeats} interleaved runs; constraint alone: median of {args.replays} "
          "replays (cost = extra time over unconstrained)")
    print(f"{'layout':12s} {'source':16s} {'tokens':>6s} " + " ".join(f"{m + ' tok/s':>19s}" for m in MODES)
          + f" {'prefix_fn cost':>14s} {'ours cost':>9s} | constraint alone: {'prefix_fn':>9s} {'ours':>6s}"
          f" {'prefix_fn us/step':>17s} {'ours us/step':>12s}")
    rows, step_seconds = [], None
    for name in args.layouts:
        vocab = available_vocab(name)
        if vocab is None:
            print(f"{name:12s} (not supported by this ImageVocab; skipped)")
            continue
        timed = name in args.end_to_end or step_seconds is None
        layout_rows, step = bench_layout(name, vocab, model, args, None if timed else step_seconds)
        step_seconds = step if timed else step_seconds
        rows += layout_rows
        print_layout(layout_rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


def print_layout(rows: list[dict]) -> None:
    first, peer, ours = rows
    speeds = " ".join(f"{r['tokens_per_second']:19.0f}" for r in rows)
    print(f"{first['layout']:12s} {first['source']:16s} {first['new_tokens']:6d} {speeds} "
          f"{peer['overhead_percent']:+13.1f}% {ours['overhead_percent']:+8.1f}% | {'':18s}"
          f"{peer['replay_overhead_percent']:+8.1f}% {ours['replay_overhead_percent']:+5.1f}% "
          f"{peer['constraint_us_per_step']:17.0f} {ours['constraint_us_per_step']:12.0f}", flush=True)


if __name__ == "__main__":
    main()
