"""Quantizer speed and peak memory: ours vs vector-quantize-pytorch (the "peer"), one fresh process per configuration.

    python bench/quantizers.py [--quick] [--json results.json] [--markdown results.md]

Configurations (default sizes; ``--quick`` shrinks them for a smoke test):
- ``eval`` lookup, VQ: nearest-code ids (the module's forward in eval mode, under ``no_grad``) for N=16384 latents,
  K in {8192, 65536, 262144}, D in {32, 256}; ours ``VectorQuantizer`` vs peer ``VectorQuantize``.
- ``train`` step, VQ with a learned codebook and IBQ: forward + backward of the quantizer loss plus a dummy loss on
  the quantized output (``quantized.square().mean()``), same N, K, D. Peer VQ: ``learnable_codebook=True,
  ema_update=False, rotation_trick=False`` (straight-through, like ours by default). The peer has no IBQ.
- ``train`` step, LFQ with 2^18 codes and its entropy loss (weight 0.1) at N=2048 and N=16384; peer ``LFQ(dim=18,
  codebook_size=2**18, entropy_loss_weight=0.1)``.
- ``matmul``: fp32 matmul throughput of this machine ((4096x256)@(256x4096), (4096x32)@(32x4096) and a 4096^3 square
  one), so a lookup (``2 N K D`` flops) can be shown as a fraction of it.

Every configuration runs in its own process (this script with ``--one '<json>'``): peak memory is the process's peak
RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) minus its RSS after the imports, so it counts the codebook, the latents and
every temporary; the address space is capped (``RLIMIT_AS``, ~20 GB or less if the machine has less free) so a
configuration that does not fit fails with ``error="out of memory"`` instead of taking the machine down, and each has a
wall-clock timeout. Seconds are wall seconds of the operation after a small warm-up, the best of up to ``--repeats``
runs (fewer when one run is slow). Children run with ``torch.set_num_threads(--threads)`` and
``OMP_WAIT_POLICY=PASSIVE``.

Rows (``--json``): ``quantizer`` (vq / ibq / lfq / matmul), ``impl`` (ours / peer), ``mode`` (eval / train / matmul),
``K``, ``D``, ``N``, ``seconds``, ``peak_mb`` (None when the run failed), ``error`` (None or why it failed), and
``gflops`` for lookups and matmuls.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from typing import Optional

GB = 1 << 30
PEER_PACKAGE = "vector_quantize_pytorch"
RESULT_TAG = "RESULT "
OOM = "out of memory"

FULL = dict(n=16384, ks=(8192, 65536, 262144), ds=(32, 256), lfq_bits=18, lfq_ns=(2048, 16384), matmul=4096,
            matmul_seconds=1.5)
QUICK = dict(n=256, ks=(64, 512), ds=(8,), lfq_bits=8, lfq_ns=(128,), matmul=256, matmul_seconds=0.1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--json", help="write the result rows here")
    p.add_argument("--markdown", help="write the Markdown table here")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (the best counts)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per configuration of ours (and matmul)")
    p.add_argument("--peer-timeout", type=float, default=240.0, help="seconds per configuration of the peer")
    p.add_argument("--mem-cap-gb", type=float, default=20.0, help="address-space cap per configuration")
    p.add_argument("--no-peer", action="store_true", help="skip the peer's rows")
    p.add_argument("--in-process", action="store_true",
                   help="run configurations in this process (no isolation: peak memory is not meaningful; tests)")
    p.add_argument("--from-json", help="re-render the report of saved rows instead of measuring")
    p.add_argument("--only", help="comma-separated quantizers to measure (e.g. ibq); use with --merge")
    p.add_argument("--merge", help="saved rows to update: measured rows replace the rows of the same configuration")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child mode: one JSON configuration
    return p.parse_args(argv)


def peer_available() -> bool:
    return importlib.util.find_spec(PEER_PACKAGE) is not None


# ---------------------------------------------------------------------------------------------------- configurations
def configurations(args) -> list[dict]:
    sizes = QUICK if args.quick else FULL
    n, m = sizes["n"], sizes["matmul"]
    # (m x D) @ (D x m) at each latent dimension (the shape of a lookup tile), then the m x m x m square.
    configs = [dict(quantizer="matmul", impl="ours", mode="matmul", K=m, D=d, N=m, seconds=sizes["matmul_seconds"])
               for d in (*sizes["ds"], m)]
    # Ours and the peer back to back for each size, so both see the same machine load.
    cases = [("vq", "eval", k, d, n) for k in sizes["ks"] for d in sizes["ds"]]
    cases += [(q, "train", k, d, n) for q in ("vq", "ibq") for k in sizes["ks"] for d in sizes["ds"]]
    # IBQ without its entropy regulariser (the soft path alone) at the largest size.
    cases += [("ibq_plain", "train", sizes["ks"][-1], sizes["ds"][-1], n)]
    bits = sizes["lfq_bits"]
    cases += [("lfq", "train", 1 << bits, bits, lfq_n) for lfq_n in sizes["lfq_ns"]]
    for quantizer, mode, k, d, rows in cases:
        for impl in ("ours", "peer"):
            configs.append(dict(quantizer=quantizer, impl=impl, mode=mode, K=k, D=d, N=rows))
    return configs


def unavailable(config: dict, args) -> Optional[str]:
    """Why a configuration cannot run at all (None if it can)."""
    if config["impl"] != "peer":
        return None
    if config["quantizer"] in ("ibq", "ibq_plain"):
        return "not available (the peer has no IBQ)"
    if args.no_peer:
        return "peer skipped (--no-peer)"
    if not peer_available():
        return "peer not installed"
    return None


# ---------------------------------------------------------------------------------------------------- child side
def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def build(config: dict):
    """(module, latents (1, N, D)) for a configuration, in train or eval mode."""
    import torch

    q, impl, k, d, n = config["quantizer"], config["impl"], config["K"], config["D"], config["N"]
    torch.manual_seed(0)
    if impl == "ours":
        from tokenizer_bridge.quantizers import (
            IndexBackpropQuantizer,
            LookupFreeQuantizer,
            VectorQuantizer,
        )

        if q == "vq":
            module = VectorQuantizer(d, k, kmeans_init=False)
        elif q == "ibq_plain":
            module = IndexBackpropQuantizer(d, k, entropy_weight=0.0)
        elif q == "ibq":
            module = IndexBackpropQuantizer(d, k)
        else:
            module = LookupFreeQuantizer(bits=d, entropy_weight=0.1)
    else:
        import vector_quantize_pytorch as vqp

        if q == "vq" and config["mode"] == "eval":
            module = vqp.VectorQuantize(dim=d, codebook_size=k, kmeans_init=False)
        elif q == "vq":
            module = vqp.VectorQuantize(dim=d, codebook_size=k, kmeans_init=False, learnable_codebook=True,
                                        ema_update=False, rotation_trick=False)
        elif q == "lfq":
            module = vqp.LFQ(dim=d, codebook_size=k, entropy_loss_weight=0.1)
        else:
            raise ValueError(f"the peer has no {q!r}")
    module.train(config["mode"] == "train")
    return module, torch.randn(1, n, d)


def step_fn(config: dict, module, latents):
    """A zero-argument callable running the measured operation once."""
    import torch

    peer = config["impl"] == "peer"

    if config["mode"] == "eval":
        def lookup():
            with torch.no_grad():
                out = module(latents)
            return out[1] if peer else out.image_ids
        return lookup

    def train_step():
        x = latents.detach().requires_grad_(True)
        out = module(x)
        if peer:
            quantized, loss = out[0], out[-1]
        else:
            quantized, loss = out.quantized, out.loss
        total = loss.sum() + quantized.square().mean()
        total.backward()
        module.zero_grad(set_to_none=True)
    return train_step


def matmul_gflops(config: dict, min_seconds: float = 1.5, rounds: int = 5) -> tuple[float, float]:
    """(GFLOP per wall second, GFLOP per CPU second of this process), the best of ``rounds`` rounds."""
    import torch

    n, d, k = config["N"], config["D"], config["K"]
    a, b = torch.randn(n, d), torch.randn(d, k)
    c = torch.empty(n, k)
    torch.mm(a, b, out=c)  # warm-up
    flops, best, best_cpu = 2.0 * n * d * k, 0.0, 0.0
    for _ in range(rounds):
        reps, start, cpu = 0, time.perf_counter(), time.process_time()
        while True:
            torch.mm(a, b, out=c)
            reps += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds / rounds:
                break
        best = max(best, flops * reps / elapsed / 1e9)
        best_cpu = max(best_cpu, flops * reps / max(time.process_time() - cpu, 1e-9) / 1e9)
    return best, best_cpu


def load_average() -> Optional[float]:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def measure(config: dict, repeats: int = 3, slow_seconds: float = 10.0) -> dict:
    """Run one configuration in this process -> result row (raises on failure)."""
    import torch

    torch.set_num_threads(config.get("threads", 2))
    if config["impl"] == "ours":
        import tokenizer_bridge.quantizers  # noqa: F401  (imports before the baseline)
    else:
        import vector_quantize_pytorch  # noqa: F401
    base = rss_peak_mb()
    row = {key: config[key] for key in ("quantizer", "impl", "mode", "K", "D", "N")}
    if config["mode"] == "matmul":
        gflops, cpu_gflops = matmul_gflops(config, config.get("seconds", 1.5))
        flops = 2.0 * config["N"] * config["D"] * config["K"]
        return {**row, "seconds": flops / gflops / 1e9, "peak_mb": max(0.0, rss_peak_mb() - base), "error": None,
                "gflops": gflops, "cpu_seconds": flops / cpu_gflops / 1e9, "cpu_gflops": cpu_gflops,
                "load": load_average()}
    # Warm-up on a small slice (lazy initialisation, thread pools), then the timed full-size runs.
    small = dict(config, N=min(config["N"], 256))
    warm_module, warm_latents = build(small)
    step_fn(small, warm_module, warm_latents)()
    del warm_module, warm_latents
    module, latents = build(config)
    step = step_fn(config, module, latents)
    best, best_cpu = float("inf"), float("inf")
    for _ in range(max(1, repeats)):
        start, cpu = time.perf_counter(), time.process_time()
        step()
        best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - cpu)
        if best > slow_seconds:
            break
    row.update(seconds=best, peak_mb=max(0.0, rss_peak_mb() - base), error=None, cpu_seconds=best_cpu,
               load=load_average())
    if config["mode"] == "eval":
        flops = 2.0 * config["N"] * config["K"] * config["D"]
        row.update(gflops=flops / best / 1e9, cpu_gflops=flops / max(best_cpu, 1e-9) / 1e9)
    return row


def describe_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    if isinstance(exc, MemoryError) or any(s in lowered for s in ("can't allocate", "out of memory", "bad_alloc",
                                                                  "cannot allocate")):
        return OOM
    return text.splitlines()[0][:300]


def child_main(config_json: str, repeats: int) -> None:
    config = json.loads(config_json)
    cap = int(config.get("mem_cap_bytes") or 0)
    if cap:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        row = measure(config, repeats)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a row
        row = {key: config[key] for key in ("quantizer", "impl", "mode", "K", "D", "N")}
        row.update(seconds=None, peak_mb=None, error=describe_error(exc))
    print(RESULT_TAG + json.dumps(row), flush=True)


# ---------------------------------------------------------------------------------------------------- parent side
def memory_cap_bytes(requested_gb: float) -> int:
    """``requested_gb``, or less when the machine has less memory available (keep 1.5 GB for everything else)."""
    cap = int(requested_gb * GB)
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        cap = min(cap, info["MemAvailable"] - int(1.5 * GB))
    except (OSError, KeyError, ValueError):
        pass
    return max(cap, 2 * GB)


def failed_row(config: dict, error: str) -> dict:
    row = {key: config[key] for key in ("quantizer", "impl", "mode", "K", "D", "N")}
    row.update(seconds=None, peak_mb=None, error=error)
    if config["mode"] in ("eval", "matmul"):
        row["gflops"] = None
    return row


def run_isolated(config: dict, args, cap: int) -> dict:
    timeout = args.peer_timeout if config["impl"] == "peer" else args.timeout
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(args.threads))
    payload = json.dumps({**config, "threads": args.threads, "mem_cap_bytes": cap})
    cmd = [sys.executable, os.path.abspath(__file__), "--one", payload, "--repeats", str(args.repeats)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return failed_row(config, f"timeout after {timeout:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            row = json.loads(line[len(RESULT_TAG):])
            if config["mode"] in ("eval", "matmul"):
                row.setdefault("gflops", None)
            return row
    tail = (proc.stderr or "").strip().splitlines()
    lowered = (proc.stderr or "").lower()
    if proc.returncode in (-9, 137) or "bad_alloc" in lowered or "memoryerror" in lowered:
        return failed_row(config, OOM)
    return failed_row(config, f"exit code {proc.returncode}: {tail[-1][:200] if tail else 'no output'}")


def run_in_process(config: dict, args) -> dict:
    try:
        row = measure({**config, "threads": args.threads}, args.repeats)
    except Exception as exc:  # noqa: BLE001
        return failed_row(config, describe_error(exc))
    if config["mode"] in ("eval", "matmul"):
        row.setdefault("gflops", None)
    return row


def run(args) -> list[dict]:
    cap = memory_cap_bytes(args.mem_cap_gb)
    rows = []
    only = set(args.only.split(",")) if args.only else None
    for config in configurations(args):
        if only is not None and config["quantizer"] not in only:
            continue
        reason = unavailable(config, args)
        if reason:
            row = failed_row(config, reason)
        elif args.in_process:
            row = run_in_process(config, args)
        else:
            row = run_isolated(config, args, cap)
        rows.append(row)
        secs = f"{row['seconds']:.3f} s" if row["seconds"] is not None else "-"
        mem = f"{row['peak_mb']:.0f} MB" if row["peak_mb"] is not None else "-"
        print(f"  {row['quantizer']:<6} {row['impl']:<5} {row['mode']:<6} K={row['K']:<7} D={row['D']:<5} "
              f"N={row['N']:<6} {secs:>10} {mem:>9}  {row['error'] or ''}", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------- report
def peak_matmul(rows: list[dict], key: str = "gflops") -> Optional[float]:
    values = [r[key] for r in rows if r["mode"] == "matmul" and r.get(key)]
    return max(values) if values else None


def _fmt(value, spec: str, missing: str = "-") -> str:
    return format(value, spec) if value is not None else missing


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def table(rows: list[dict]) -> list[str]:
    """Markdown lines: matmul throughput, then one line per configuration with ours vs peer."""
    peak, cpu_peak = peak_matmul(rows), peak_matmul(rows, "cpu_gflops")
    lines = ["| matmul (N x D) @ (D x K) | GFLOP/s (wall) | GFLOP per CPU second | load avg |", "|---|---:|---:|---:|"]
    for r in rows:
        if r["mode"] == "matmul":
            lines.append(f"| {r['N']}x{r['D']} @ {r['D']}x{r['K']} | {_fmt(r.get('gflops'), '.1f')} | "
                         f"{_fmt(r.get('cpu_gflops'), '.1f')} | {_fmt(r.get('load'), '.1f')} |")
    lines += ["", "| quantizer | mode | K | D | N | ours s | ours CPU s | ours MB | peer s | peer CPU s | peer MB | "
                  "peer/ours s | peer/ours CPU s | peer/ours MB | ours lookup x matmul (wall; CPU) | load avg | "
                  "peer error |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    keyed = {(r["quantizer"], r["impl"], r["mode"], r["K"], r["D"], r["N"]): r for r in rows}
    for r in rows:
        if r["impl"] != "ours" or r["mode"] == "matmul":
            continue
        p = keyed.get((r["quantizer"], "peer", r["mode"], r["K"], r["D"], r["N"]), {})
        fraction = "-"
        if r.get("gflops") and peak and cpu_peak:
            fraction = f"{r['gflops'] / peak:.2f}; {r['cpu_gflops'] / cpu_peak:.2f}"
        ours_s = _fmt(r.get("seconds"), ".3f", r.get("error") or "-")
        loads = "/".join(_fmt(x.get("load"), ".1f") for x in (r, p) if x.get("load") is not None) or "-"
        lines.append(
            f"| {r['quantizer']} | {r['mode']} | {r['K']} | {r['D']} | {r['N']} | {ours_s} | "
            f"{_fmt(r.get('cpu_seconds'), '.3f')} | {_fmt(r.get('peak_mb'), '.0f')} | {_fmt(p.get('seconds'), '.3f')} | "
            f"{_fmt(p.get('cpu_seconds'), '.3f')} | {_fmt(p.get('peak_mb'), '.0f')} | "
            f"{_fmt(_ratio(p.get('seconds'), r.get('seconds')), '.1f')} | "
            f"{_fmt(_ratio(p.get('cpu_seconds'), r.get('cpu_seconds')), '.1f')} | "
            f"{_fmt(_ratio(p.get('peak_mb'), r.get('peak_mb')), '.1f')} | {fraction} | {loads} | {p.get('error') or ''} |")
    return lines


def _verdict(wall_ok: bool, cpu_ok: bool) -> bool | str:
    if wall_ok == cpu_ok:
        return wall_ok
    return "wall only" if wall_ok else "CPU only"


def targets(rows: list[dict]) -> list[tuple[str, object, str]]:
    """(target, met: True / False / "wall only" / "CPU only" / None (not checked), evidence), full sizes only."""
    keyed = {(r["quantizer"], r["impl"], r["mode"], r["K"], r["D"], r["N"]): r for r in rows}
    out = []
    n = FULL["n"]
    for d in FULL["ds"]:
        name = f"eval K=65536 D={d}: >= 5x faster, <= 1/6 peak memory of the peer"
        ours, peer = keyed.get(("vq", "ours", "eval", 65536, d, n)), keyed.get(("vq", "peer", "eval", 65536, d, n))
        if not ours or not peer or ours["error"]:
            out.append((name, None, "not measured"))
        elif peer["error"]:
            out.append((name, True, f"peer failed ({peer['error']}); ours {ours['seconds']:.2f} s, "
                                    f"{ours['peak_mb']:.0f} MB"))
        else:
            speed, cpu_speed = peer["seconds"] / ours["seconds"], peer["cpu_seconds"] / ours["cpu_seconds"]
            mem = peer["peak_mb"] / max(ours["peak_mb"], 1e-9)
            out.append((name, _verdict(speed >= 5 and mem >= 6, cpu_speed >= 5 and mem >= 6),
                        f"{speed:.1f}x faster (CPU time {cpu_speed:.1f}x), {mem:.1f}x less memory "
                        f"({ours['peak_mb']:.0f} vs {peer['peak_mb']:.0f} MB)"))
    for q in ("vq", "ibq"):
        ours, peer = keyed.get((q, "ours", "train", 262144, 256, n)), keyed.get((q, "peer", "train", 262144, 256, n))
        name = f"{q} train K=262144 D=256: <= 4 GB peak (peer cannot run)"
        if not ours:
            out.append((name, None, "not measured"))
            continue
        ok = ours["error"] is None and ours["peak_mb"] <= 4096
        peer_note = f"peer: {peer['error'] or 'ran, %.0f MB' % peer['peak_mb']}" if peer else "peer: -"
        out.append((name, ok, f"ours {_fmt(ours['seconds'], '.1f')} s, {_fmt(ours['peak_mb'], '.0f')} MB "
                              f"{ours['error'] or ''}; {peer_note}"))
    bits = FULL["lfq_bits"]
    big = keyed.get(("lfq", "ours", "train", 1 << bits, bits, 16384))
    if big:
        out.append(("lfq 2^18 train N=16384 with entropy loss: <= 4 GB", big["error"] is None and big["peak_mb"] <= 4096,
                    f"ours {_fmt(big['seconds'], '.2f')} s, {_fmt(big['peak_mb'], '.0f')} MB {big['error'] or ''}"))
    ours = keyed.get(("lfq", "ours", "train", 1 << bits, bits, 2048))
    peer = keyed.get(("lfq", "peer", "train", 1 << bits, bits, 2048))
    if ours and peer and not ours["error"]:
        name = "lfq 2^18 train N=2048: >= 10x faster than the peer"
        if peer["error"]:
            out.append((name, True, f"peer failed: {peer['error']}"))
        else:
            ratio, cpu_ratio = peer["seconds"] / ours["seconds"], peer["cpu_seconds"] / ours["cpu_seconds"]
            out.append((name, _verdict(ratio >= 10, cpu_ratio >= 10),
                        f"{ratio:.0f}x (CPU time {cpu_ratio:.0f}x; {ours['seconds']:.3f} vs {peer['seconds']:.2f} s)"))
    peak, cpu_peak = peak_matmul(rows), peak_matmul(rows, "cpu_gflops")
    for d, need in ((256, 0.5), (32, 0.25)):
        picked = [r for r in rows if peak and cpu_peak and r["mode"] == "eval" and r["impl"] == "ours"
                  and r["D"] == d and r.get("gflops") and r["N"] == n]
        if picked:
            wall = [r["gflops"] / peak for r in picked]
            cpu = [r["cpu_gflops"] / cpu_peak for r in picked]
            out.append((f"lookup D={d}: >= {need} of matmul peak ({peak:.0f} GFLOP/s; {cpu_peak:.0f} per CPU s)",
                        _verdict(min(wall) >= need, min(cpu) >= need),
                        "wall " + ", ".join(f"{f:.2f}" for f in wall) + "; CPU " + ", ".join(f"{f:.2f}" for f in cpu)
                        + " (K ascending)"))
    return out


def report(rows: list[dict], args) -> list[str]:
    lines = table(rows)
    if not args.quick:
        lines += ["", "| target | met | evidence |", "|---|---|---|"]
        for name, met, evidence in targets(rows):
            shown = {True: "yes", False: "no", None: "?"}.get(met, met) if not isinstance(met, str) else met
            lines.append(f"| {name} | {shown} | {evidence} |")
    print("\n".join(lines))
    return lines


def row_key(row: dict) -> tuple:
    return tuple(row[k] for k in ("quantizer", "impl", "mode", "K", "D", "N"))


def merge_rows(path: str, measured: list[dict]) -> list[dict]:
    """The rows saved in ``path`` with each configuration measured now replaced (new ones appended)."""
    with open(path) as f:
        saved = json.load(f)
    fresh = {row_key(r): r for r in measured}
    merged = [fresh.pop(row_key(r), r) for r in saved]
    return merged + list(fresh.values())


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        child_main(args.one, args.repeats)
        return
    if args.from_json:
        with open(args.from_json) as f:
            rows = json.load(f)
    else:
        rows = run(args)
        if args.merge:
            rows = merge_rows(args.merge, rows)
    lines = report(rows, args)
    if args.json and not args.from_json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("# Quantizer speed and peak memory (ours vs vector-quantize-pytorch)\n\n")
            f.write(f"Each configuration in a fresh process, {args.threads} threads; seconds = wall seconds, best of up "
                    f"to {args.repeats} runs; CPU s = this process's CPU time of that work (threads wait passively, so "
                    "it is the compute spent, whatever else the machine runs); peak MB = peak RSS minus RSS after "
                    "imports (codebook, latents and every temporary). `load avg` = the machine's 1-minute load "
                    "average when the configuration finished (ours/peer): above the thread count other jobs shared "
                    "the cores and wall seconds are inflated; CPU seconds much less so. The lookup fraction is the "
                    "lookup's GFLOP/s (2 N K D flops) over the best matmul's, from wall and from CPU time. Produced by "
                    "`python bench/quantizers.py`.\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
