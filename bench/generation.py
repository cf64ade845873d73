"""Image-generation throughput: our span processor vs unconstrained ``generate`` vs ``prefix_allowed_tokens_fn``.

    python bench/generation.py [--layouts grid sequence ...] [--repeats 3] [--json results.json] [--markdown out.md]

Text-to-image with classifier-free guidance (our batched and unbatched paths vs transformers' own CFG, at several
batch sizes and model sizes) is benchmarked by ``bench/generation_cfg.py`` (results in
``bench/results/generation_cfg.md``).

One random ~23M-parameter Llama (hidden 384, 6 layers, ~16.5k-token vocabulary: 8k text tokens + the image tokens of
every layout), a batch of 4 prompts, greedy decoding of 256 new tokens (257 for level-major spans, so that each
span closes; ``min_new_tokens = max_new_tokens``, so every
mode generates the same number of tokens and the unconstrained one never stops at EOS), timed end to end with plain
``model.generate`` for every layout. Modes, on the same model and batch:

- ``unconstrained``: plain ``model.generate`` -- the floor;
- ``prefix_fn`` (peer): transformers' ``prefix_allowed_tokens_fn``, the way Emu3's documentation constrains image
  generation: a Python function called for every row at every step that finds the row's last ``<boi>``, works out
  the position in the span (and, for variable grids, the size the span stated) and returns the list of allowed ids;
- ``ours``: :class:`~mllm.generation.logits.ImageSpanLogitsProcessor` (batched tensor state machine, no Python per row).

Layouts (:class:`~tokenizer_bridge.ImageVocab`), each one span of about 256 tokens after a prompt ending in ``<boi>``
unless said otherwise:

- ``grid``: 15 x 16 ids, rows closed by ``<eol>``;
- ``variable``: a variable-size grid (up to 16 x 16) generating 15 x 16: the prompt ends ``<boi> <h_15> <w_16>``;
- ``sequence``: 255 positions, no ``<eol>``;
- ``levels``: 15 x 8 positions x 2 residual levels, position-major, one id range per level;
- ``level_major``: 8 x 15 positions, one full grid pass per level;
- ``factorized``: 15 x 8 ids of a 4096 codebook, each split into two sub-tokens of 64 values;
- ``unicode``: 15 x 16 ids of a unified codebook whose 4096 image ids are existing text tokens (nothing added);
- ``interleaved``: a variable-size grid up to 8 x 8 and a batch whose rows are in different states: one opens an 8 x 8
  span, one is in text, one ends inside a 5 x 7 span, one after a whole span and more text. Text and images
  alternate: the model is pushed toward ``<boi>`` (a fixed bias on its logit, the same in every mode, set so that it
  wins about 15% of text steps), opens spans of sizes it chooses itself, and goes back to text after each ``<eoi>``.

Timing: each repeat runs the three modes one after another (the order rotates between repeats), after a short
warm-up; the best of ``--repeats`` runs per mode counts (the runs least disturbed by other jobs on the machine), in
this process's CPU seconds (steadier than wall time on a shared machine; wall seconds are reported too).
``overhead_percent`` is the extra time over unconstrained generation. ``ours`` and ``prefix_fn`` must generate the same
tokens (greedy under the same grammar) and every span ``ours`` completes must parse; both are checked and recorded.
``constraint_us_per_step`` is the constraint alone: a fresh processor called on every prefix of the generated
sequences with random scores, as ``generate`` calls it (best of ``--replays``; ``prefix_fn`` once).

Rows (``--json``): ``mode``, ``layout``, ``tokens_per_second`` (batch x new tokens / best CPU seconds),
``overhead_percent``, ``wall_tokens_per_second``, ``wall_overhead_percent``, ``median_overhead_percent``,
``cpu_seconds`` / ``wall_seconds`` (every run), ``new_tokens``, ``batch_size``, ``constraint_us_per_step``, and for
``ours`` ``same_tokens_as_prefix_fn``, ``images_completed`` and ``spans_opened_by_model``. ``--markdown`` writes the
table with the machine's conditions (load average before and after, threads, versions).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList
from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor
from transformers.utils import logging as hf_logging

from mllm.generation.logits import ImageSpanLogitsProcessor, find_image_spans
from tokenizer_bridge import ImageVocab
from tokenizer_bridge.vocab import CLASS_EOI, CLASS_EOL, CLASS_HEIGHT, CLASS_IMAGE, CLASS_WIDTH

TEXT_TOKENS, BOI, EOI, EOL, OFFSET = 8000, 8000, 8001, 8002, 8003
VOCAB_SIZE = OFFSET + 8192 + 64  # image tokens of the largest layout + size tokens, rounded up
LLAMA = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
             num_key_value_heads=6, max_position_embeddings=1024, vocab_size=VOCAB_SIZE, pad_token_id=0,
             bos_token_id=1, eos_token_id=2)
PAD = 0
MODES = ("unconstrained", "prefix_fn", "ours")
NEW_TOKENS = 256
SPECIALS = dict(offset=OFFSET, boi_token_id=BOI, eoi_token_id=EOI)
SIZES = dict(size_token_offset=OFFSET + 8192)
UNICODE_IDS = list(range(16, 16 + 4096))  # existing text tokens reused as the image ids
# name -> ImageVocab keyword arguments, and the (h, w) a variable grid's prompt asks for
LAYOUTS = {
    "grid": dict(codebook_size=8192, layout="grid", grid_size=(15, 16), eol_token_id=EOL),
    "variable": dict(codebook_size=8192, layout="grid", grid_size=(16, 16), eol_token_id=EOL, variable_size=True,
                     **SIZES),
    "sequence": dict(codebook_size=8192, layout="sequence", num_tokens=255),
    "levels": dict(codebook_size=4096, layout="grid", grid_size=(15, 8), eol_token_id=EOL, num_levels=2,
                   separate_level_ranges=True),
    "level_major": dict(codebook_size=4096, layout="grid", grid_size=(8, 15), eol_token_id=EOL, num_levels=2,
                        level_order="level", separate_level_ranges=True),
    "factorized": dict(codebook_size=4096, layout="grid", grid_size=(15, 8), eol_token_id=EOL, factors=[64, 64]),
    "unicode": dict(codebook_size=4096, layout="grid", grid_size=(15, 16), eol_token_id=EOL, token_ids=UNICODE_IDS,
                    offset=None),
    "interleaved": dict(codebook_size=8192, layout="grid", grid_size=(8, 8), eol_token_id=EOL, variable_size=True,
                        **SIZES),
}
VARIABLE_SIZE = (15, 16)
BOI_WIN_RATE = 0.15  # interleaved: share of text steps at which the biased <boi> logit is the largest
TARGET_PERCENT = 5.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=None,
                   help="tokens generated per row (default: the rest of the span, 256 or 257; interleaved: 256)")
    p.add_argument("--repeats", type=int, default=3, help="end-to-end runs per mode and layout (the best counts)")
    p.add_argument("--replays", type=int, default=3, help="replays of our constraint alone per layout (best counts)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result rows here")
    p.add_argument("--markdown", help="write the Markdown report here")
    return p.parse_args(argv)


def make_vocab(name: str) -> ImageVocab:
    return ImageVocab(**{**SPECIALS, **LAYOUTS[name]})


# ---------------------------------------------------------------------------------------------- peer
def span_only_ids(vocab: ImageVocab) -> set[int]:
    """Tokens that may only appear inside a span: ``<eoi>``, ``<eol>``, size tokens and (new) image tokens."""
    ids = {vocab.eoi_token_id, *vocab.size_token_ids}
    if vocab.eol_token_id is not None:
        ids.add(vocab.eol_token_id)
    if not vocab.is_unified:
        ids |= set(vocab.image_token_ids().tolist())
    return ids


def class_allowed_lists(vocab: ImageVocab) -> dict[int, list[int]]:
    """Allowed token ids of each span token class, as Python lists (what a prefix function returns)."""
    allowed = {CLASS_EOI: [vocab.eoi_token_id], CLASS_EOL: [vocab.eol_token_id]}
    masks = vocab.class_token_mask(VOCAB_SIZE)
    for c in range(vocab.num_image_classes):
        allowed[CLASS_IMAGE + c] = masks[c].nonzero().flatten().tolist()
    if vocab.variable_size:
        sizes = vocab.size_token_ids
        allowed[CLASS_HEIGHT], allowed[CLASS_WIDTH] = sizes[: vocab.grid_size[0]], sizes[vocab.grid_size[0]:]
    return allowed


def make_prefix_fn(vocab: ImageVocab):
    """An Emu3-style ``prefix_allowed_tokens_fn(batch_id, input_ids) -> allowed ids`` for ``vocab``'s grammar: in
    text every token but the span-only ones (``<boi>`` included, so rows may interleave), inside a span those of the
    token class the grammar expects."""
    allowed = class_allowed_lists(vocab)
    excluded = span_only_ids(vocab)
    text = [i for i in range(VOCAB_SIZE) if i not in excluded]

    @functools.lru_cache(maxsize=None)
    def class_table(h: int, w: int) -> list:
        return vocab.span_token_classes(torch.arange(vocab.span_length_of(h, w) - 1), h, w).tolist()

    def prefix_allowed_tokens_fn(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        boi = (input_ids == BOI).nonzero()
        if len(boi) == 0:
            return text
        start = int(boi[-1]) + 1
        if bool((input_ids[start:] == EOI).any()):  # the last span is closed
            return text
        offset = len(input_ids) - start
        h, w = vocab.grid_size if vocab.layout == "grid" else (1, vocab.num_tokens)
        if vocab.variable_size and offset >= 2:
            h = int(input_ids[start]) - vocab.size_token_offset + 1
            w = int(input_ids[start + 1]) - vocab.size_token_offset - vocab.grid_size[0] + 1
        table = class_table(h, w)
        return allowed[table[min(offset, len(table) - 1)]]

    return prefix_allowed_tokens_fn


# ---------------------------------------------------------------------------------------------- inputs
def random_span(vocab: ImageVocab, h: int, w: int, generator: torch.Generator) -> list[int]:
    shape = (w,) if vocab.layout == "sequence" else (h, w)
    levels = (vocab.num_levels,) if vocab.num_levels > 1 else ()
    return vocab.build_span(torch.randint(0, vocab.codebook_size, (*shape, *levels), generator=generator)).tolist()


def prompts(name: str, vocab: ImageVocab, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Token ids of each prompt (unpadded)."""
    text = lambda n: torch.randint(3, TEXT_TOKENS, (n,), generator=generator).tolist()  # noqa: E731
    if name != "interleaved":
        head = [BOI] + (vocab.size_tokens(*VARIABLE_SIZE) if vocab.variable_size else [])
        return [[1] + text(12) + head for _ in range(batch_size)]
    kinds = [
        lambda: [1] + text(12) + [BOI] + vocab.size_tokens(8, 8),  # opens a span
        lambda: [1] + text(12),  # in text
        lambda: [1] + text(6) + random_span(vocab, 5, 7, generator)[:30],  # inside a span
        lambda: [1] + text(4) + random_span(vocab, 3, 4, generator) + text(4),  # after a span and more text
    ]
    return [kinds[i % len(kinds)]() for i in range(batch_size)]


def new_tokens(name: str, vocab: ImageVocab) -> int:
    """Tokens to generate: the rest of the span the prompt opened (256, or 257 for level-major, whose spans have an
    even number of tokens after ``<boi>``); ``NEW_TOKENS`` for the interleaved batch."""
    if name == "interleaved":
        return NEW_TOKENS
    if vocab.variable_size:
        return vocab.span_length_of(*VARIABLE_SIZE) - 3  # the prompt ends <boi> <h_15> <w_16>
    return vocab.span_length - 1


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    input_ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    return input_ids, attention_mask


def boi_bias(model, generator: torch.Generator) -> float:
    """The bias on the ``<boi>`` logit at which it wins about ``BOI_WIN_RATE`` of the steps on random text."""
    text = torch.randint(3, TEXT_TOKENS, (4, 64), generator=generator)
    with torch.no_grad():
        logits = model(input_ids=text).logits.float()  # (4, 64, V)
    gap = logits[..., :TEXT_TOKENS].amax(dim=-1) - logits[..., BOI]
    return float(torch.quantile(gap.flatten(), BOI_WIN_RATE))


# ---------------------------------------------------------------------------------------------- timing
def mode_kwargs(mode: str, vocab: ImageVocab) -> dict:
    """``generate`` keyword arguments that turn on ``mode``'s constraint."""
    if mode == "prefix_fn":
        return {"prefix_allowed_tokens_fn": make_prefix_fn(vocab)}
    if mode == "ours":
        return {"logits_processor": LogitsProcessorList([ImageSpanLogitsProcessor(vocab, VOCAB_SIZE)])}
    return {}


def run_mode(mode: str, model, vocab: ImageVocab, input_ids, attention_mask,
             n: int) -> tuple[torch.Tensor, float, float]:
    """(``n`` generated tokens per row, CPU seconds, wall seconds) of one greedy generation."""
    kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=PAD)
    cpu, wall = time.process_time(), time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs, **mode_kwargs(mode, vocab))
    return out[:, input_ids.shape[1]:], time.process_time() - cpu, time.perf_counter() - wall


def replay_seconds(mode: str, vocab: ImageVocab, sequences: torch.Tensor, prompt_length: int, repeats: int) -> float:
    """Best CPU seconds the mode's constraint alone takes over one generation: a fresh processor is called on every
    prefix of ``sequences`` with random scores, as ``generate`` calls it."""
    if mode == "unconstrained":
        return 0.0
    scores = torch.randn(sequences.shape[0], VOCAB_SIZE)
    runs = []
    for _ in range(1 if mode == "prefix_fn" else repeats):
        if mode == "prefix_fn":
            processor = PrefixConstrainedLogitsProcessor(make_prefix_fn(vocab), num_beams=1)
        else:
            processor = ImageSpanLogitsProcessor(vocab, VOCAB_SIZE)
        start = time.process_time()
        for end in range(prompt_length, sequences.shape[1]):
            processor(sequences[:, :end], scores)
        runs.append(time.process_time() - start)
    return min(runs)


def completed_images(vocab: ImageVocab, sequences: torch.Tensor, prompt_length: int) -> int:
    """Spans closed during generation (opened by the prompt or by the model); each must parse."""
    count = 0
    for row in sequences:
        for start, end in find_image_spans(row, vocab):
            if end > prompt_length and int(row[end - 1]) == vocab.eoi_token_id:
                vocab.parse_span(row[start:end])  # raises if malformed
                count += 1
    return count


def bench_layout(name: str, model, args) -> list[dict]:
    """The three rows (one per mode) of one layout."""
    vocab = make_vocab(name)
    generator = torch.Generator().manual_seed(args.seed)
    input_ids, attention_mask = left_pad(prompts(name, vocab, args.batch_size, generator))
    n = args.new_tokens or new_tokens(name, vocab)
    hook = None
    if name == "interleaved":
        bias = torch.zeros(VOCAB_SIZE)
        bias[BOI] = boi_bias(model, generator)
        hook = model.get_output_embeddings().register_forward_hook(lambda module, inputs, out: out + bias)
    try:
        for mode in MODES:  # warm-up
            run_mode(mode, model, vocab, input_ids, attention_mask, 8)
        cpu, wall, outputs = {m: [] for m in MODES}, {m: [] for m in MODES}, {}
        for repeat in range(args.repeats):
            order = MODES[repeat % len(MODES):] + MODES[: repeat % len(MODES)]
            for mode in order:
                outputs[mode], seconds, wall_seconds = run_mode(mode, model, vocab, input_ids, attention_mask, n)
                cpu[mode].append(seconds)
                wall[mode].append(wall_seconds)
    finally:
        if hook is not None:
            hook.remove()
    sequences = torch.cat([input_ids, outputs["ours"]], dim=1)
    same = torch.equal(outputs["ours"], outputs["prefix_fn"])
    images = completed_images(vocab, sequences, input_ids.shape[1])
    opened = int((outputs["ours"] == vocab.boi_token_id).sum())  # spans the model opened itself
    base, base_wall = min(cpu["unconstrained"]), min(wall["unconstrained"])
    median_base = statistics.median(cpu["unconstrained"])
    rows = []
    for mode in MODES:
        replay = replay_seconds(mode, vocab, sequences, input_ids.shape[1], args.replays)
        best, best_wall = min(cpu[mode]), min(wall[mode])
        row = dict(mode=mode, layout=name, tokens_per_second=args.batch_size * n / best,
                   overhead_percent=100 * (best / base - 1),
                   wall_tokens_per_second=args.batch_size * n / best_wall,
                   wall_overhead_percent=100 * (best_wall / base_wall - 1),
                   new_tokens=n, batch_size=args.batch_size, cpu_seconds=cpu[mode], wall_seconds=wall[mode],
                   median_overhead_percent=100 * (statistics.median(cpu[mode]) / median_base - 1),
                   constraint_us_per_step=1e6 * replay / n, source="end_to_end")
        if mode == "ours":
            row.update(same_tokens_as_prefix_fn=same, images_completed=images, spans_opened_by_model=opened)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- report
def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def conditions(args, model, before: list[float], after: list[float]) -> dict:
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), params_m=round(params, 1),
                batch_size=args.batch_size, new_tokens=args.new_tokens or "256 (257 for level_major)",
                threads=args.threads, repeats=args.repeats,
                load_average_before=before, load_average_after=after, cpus=os.cpu_count(),
                machine=platform.machine(), torch=torch.__version__, transformers=transformers.__version__,
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"))


def markdown(rows: list[dict], info: dict) -> str:
    by_layout = {}
    for row in rows:
        by_layout.setdefault(row["layout"], {})[row["mode"]] = row
    lines = [
        "# Image-generation throughput: span constraint overhead",
        "",
        f"Written by `bench/generation.py` on {info['date']}: random Llama {info['params_m']}M parameters, batch "
        f"{info['batch_size']}, {info['new_tokens']} new tokens per row, greedy `model.generate`, "
        f"{info['threads']} thread(s) (OMP_WAIT_POLICY {info['omp_wait_policy']}), {info['cpus']} CPUs "
        f"({info['machine']}), torch {info['torch']}, "
        f"transformers {info['transformers']}. Best of {info['repeats']} end-to-end runs per mode (modes interleaved), "
        "in CPU seconds of the process; overhead = extra time over unconstrained generation. The machine was shared: "
        f"load average (1, 5, 15 min) {info['load_average_before']} before the run, {info['load_average_after']} "
        "after.",
        "",
        f"| layout | unconstrained tok/s | prefix_fn tok/s | ours tok/s | prefix_fn overhead | ours overhead | "
        f"ours overhead (wall) | ours ≤ {TARGET_PERCENT:g}% | constraint alone, ours / prefix_fn (µs/step) | "
        "same tokens as prefix_fn | spans completed (opened by the model) |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|---:|:---:|---:|",
    ]
    for layout, modes in by_layout.items():
        base, peer, ours = modes["unconstrained"], modes["prefix_fn"], modes["ours"]
        ok = "yes" if ours["overhead_percent"] <= TARGET_PERCENT else "no"
        lines.append(
            f"| {layout} | {base['tokens_per_second']:.0f} | {peer['tokens_per_second']:.0f} | "
            f"{ours['tokens_per_second']:.0f} | {peer['overhead_percent']:+.1f}% | {ours['overhead_percent']:+.1f}% | "
            f"{ours['wall_overhead_percent']:+.1f}% | {ok} | {ours['constraint_us_per_step']:.0f} / "
            f"{peer['constraint_us_per_step']:.0f} | {'yes' if ours['same_tokens_as_prefix_fn'] else 'NO'} | "
            f"{ours['images_completed']} ({ours['spans_opened_by_model']}) |")
    lines += [
        "",
        "Layouts: see the docstring of `bench/generation.py` (`interleaved`: rows in different states, the model "
        "opening spans of sizes it chooses between runs of text). \"Constraint alone\" replays each processor on the "
        "generated sequences without the model: the cost per step that the end-to-end overhead is made of, a steadier "
        "figure than the difference of two end-to-end timings on a shared machine.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    before = load_average()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"random Llama {params:.1f}M parameters, batch {args.batch_size}, {args.new_tokens or 256} new tokens, "
          f"{args.threads} thread(s); best of {args.repeats} interleaved runs, CPU seconds; load average {before}")
    print(f"{'layout':12s} " + " ".join(f"{m + ' tok/s':>19s}" for m in MODES)
          + f" {'prefix_fn cost':>14s} {'ours cost':>9s} {'ours wall':>9s} {'ours us/step':>12s} same spans")
    rows = []
    for name in args.layouts:
        layout_rows = bench_layout(name, model, args)
        rows += layout_rows
        print_layout(layout_rows)
    info = conditions(args, model, before, load_average())
    print(f"load average after: {info['load_average_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows, info))
    return rows


def print_layout(rows: list[dict]) -> None:
    first, peer, ours = rows
    speeds = " ".join(f"{r['tokens_per_second']:19.0f}" for r in rows)
    print(f"{first['layout']:12s} {speeds} {peer['overhead_percent']:+13.1f}% {ours['overhead_percent']:+8.1f}% "
          f"{ours['wall_overhead_percent']:+8.1f}% {ours['constraint_us_per_step']:12.0f} "
          f"{str(ours['same_tokens_as_prefix_fn']):5s} {ours['images_completed']:5d}", flush=True)


if __name__ == "__main__":
    main()
