"""Data pipeline throughput and memory: pre-tokenization (ours vs a one-off per-image script) and the tokenizer
stage's streamed input pipeline, each configuration in a fresh process.

    python bench/data.py [--quick] [--num-images 1000,10000] [--pretokenize-images 256] [--image-size 256]
                         [--batch-sizes 64,1] [--num-proc 2] [--workers 0,2] [--json rows.json] [--out data.md]

Inputs, made once and cached under ``--work-dir``: synthetic 256 px JPEG photographs (smooth colour fields, shapes,
grain), one folder per image count (hard links into one pool, so the 1k set is the first 1k of the 10k) with a JSONL
list of ``{"image", "caption"}`` beside it; and a small conv + VQ ``VisualTokenizer`` built from a config (random
weights: speed does not depend on training) saved with ``save_pretrained``.

Modes (``mode`` of the rows):

- ``pretokenize_ours``: :func:`mllm.data.pretokenize.pretokenize` of the JSONL list (batched ``datasets.map`` with
  ``num_proc`` workers, one Arrow dataset out) at each of ``--batch-sizes``, timed end to end: tokenizer load,
  workers, shards, merge. Pre-tokenization rows run ``--repeats`` rounds (naive, then ours at each batch size, back to
  back); the fastest round of each counts and ``runs_images_per_second`` keeps them all.
- ``pretokenize_naive`` (the peer): how Emu3, Liquid, Lumina-mGPT and LlamaGen pre-tokenize, with a one-off script:
  one loop in one process over the same list that opens each image with PIL, preprocesses it (the same
  ``VisualTokenizerImageProcessor``), encodes a batch of one with the same tokenizer and ``np.save``s one ``.npy`` of
  ids per image (LlamaGen's ``extract_codes``). Its rows break its time into load / preprocess / encode / write.
  Both write the same ids: ``same_ids_as_naive`` is the share of images whose ids are identical.
- ``encode``: the tokenizer's ``encode`` alone on preprocessed images at batch 1, 8, 64 and the pre-tokenization
  batch sizes, with 1 and 2 threads: the cost both pre-tokenizers share, and what batching buys on this machine. The
  report's *encode-alone bound* is the ratio ours would reach if encoding were all it did and its workers scaled
  perfectly (``num_proc`` x encode images/s at its batch size and threads per worker, over batch 1 at the naive
  script's threads).
- ``stream``: the tokenizer stage's input pipeline, :func:`mllm.data.sources.read_images` (the image folder) +
  :class:`mllm.data.image_batches.ImageBatches` (decode, random resized crop, flip, stack) +
  :func:`mllm.training.stage.step_batches` with ``workers`` DataLoader workers, one epoch of steps, at each image
  count: images/s and peak memory, which must not grow with the image count.

Memory: ``peak_rss_mb`` is ``getrusage`` ``ru_maxrss`` of the measuring process plus that of its largest finished
child (a pool or DataLoader worker). It is not the footprint of the whole tree: forked workers' RSS also counts the
pages they share with the parent, and with several workers only the largest is added. ``peak_pss_mb`` is: the peak of
the summed PSS of the process and all its descendants, sampled once a second (shared pages counted once; a sample
reads ``/proc`` for ~10 ms per process, so sampling faster would slow the measured work, the multi-process rows most).
Seconds are wall seconds; ``cpu_seconds`` adds the children's CPU time.

Rows (``--json``): ``mode``, ``num_images``, ``images_per_second``, ``peak_rss_mb``, ``seconds``, ``cpu_seconds``,
``batch_size``, ``workers`` (``num_proc`` / DataLoader workers), ``threads`` (per process), ``peak_pss_mb``,
``peak_rss_main_mb`` / ``peak_rss_worker_mb`` / ``base_rss_mb`` (after the imports), ``load`` (1-minute load average
at the end), ``error``, and per mode the extras named above.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

RESULT_TAG = "RESULT "
FULL = dict(num_images=(1000, 10000), pretokenize_images=256, image_size=256, downsample=16, base_channels=32,
            batch_sizes=(64, 1), num_proc=2, stream_batch_size=64, workers=(0, 2), encode_images=64,
            encode_batch_sizes=(1, 8, 64), repeats=2)
QUICK = dict(num_images=(16, 32), pretokenize_images=16, image_size=64, downsample=8, base_channels=8,
             batch_sizes=(8,), num_proc=2, stream_batch_size=8, workers=(0, 1), encode_images=8,
             encode_batch_sizes=(1, 8), repeats=1)
LATENT_DIM, CODEBOOK_SIZE = 32, 1024


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--num-images", type=_ints, help="image counts of the stream rows (default 1000,10000)")
    p.add_argument("--pretokenize-images", type=int, help="images pre-tokenized by each pre-tokenizer (default 256)")
    p.add_argument("--image-size", type=int, help="side of the images on disk and of the encoded images (256)")
    p.add_argument("--downsample", type=int, help="the visual tokenizer's downsampling (16: 16x16 ids at 256 px)")
    p.add_argument("--base-channels", type=int, help="the visual tokenizer's conv width (32)")
    p.add_argument("--batch-sizes", type=_ints, help="pretokenize batch sizes to measure (default 64,1)")
    p.add_argument("--num-proc", type=int, help="pretokenize workers (2)")
    p.add_argument("--stream-batch-size", type=int, help="tokenizer-stage batch size (64)")
    p.add_argument("--encode-images", type=int, help="images of the encode-alone rows (64)")
    p.add_argument("--encode-batch-sizes", type=_ints,
                   help="batch sizes of the encode-alone rows besides --batch-sizes (default 1,8,64)")
    p.add_argument("--repeats", type=int, help="rounds of the pre-tokenization rows (the fastest counts; default 2)")
    p.add_argument("--workers", type=_ints, help="DataLoader workers of the stream rows (default 0,2)")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "tokenizer-bridge-bench-data"),
                   help="cache of images and tokenizer, and scratch outputs")
    p.add_argument("--json", help="write the result rows here")
    p.add_argument("--out", help="write the Markdown report here")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    p.add_argument("--in-process", action="store_true",
                   help="run configurations in this process (no isolation: memory is not per configuration; tests)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child mode: one JSON configuration
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ---------------------------------------------------------------------------------------------------- inputs
def synthetic_photo(index: int, size: int):
    """A deterministic photograph-like picture: a smooth colour field, a few flat shapes and grain."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([7, index])
    field = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        x, y = rng.integers(0, size, 2)
        w, h = rng.integers(size // 16, size // 2, 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((int(x), int(y), int(x + w), int(y + h)), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    grain = rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + grain, 0, 255).astype(np.uint8))


def image_set(work: str, count: int, size: int) -> tuple[str, str]:
    """(folder of ``count`` JPEGs, JSONL list of them with captions), made on first use."""
    name = f"images-{size}px-{count}"
    folder, listing = os.path.join(work, name), os.path.join(work, name + ".jsonl")
    if os.path.exists(listing):
        return folder, listing
    pool = os.path.join(work, f"pool-{size}px")
    os.makedirs(pool, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    with open(listing + ".tmp", "w") as f:
        for i in range(count):
            file = f"{i:06d}.jpg"
            if not os.path.exists(os.path.join(pool, file)):
                synthetic_photo(i, size).save(os.path.join(pool, file + ".tmp"), format="JPEG", quality=90)
                os.replace(os.path.join(pool, file + ".tmp"), os.path.join(pool, file))
            _link(os.path.join(pool, file), os.path.join(folder, file))
            f.write(json.dumps({"image": f"{name}/{file}", "caption": f"synthetic photograph {i}"}) + "\n")
    os.replace(listing + ".tmp", listing)  # the listing exists only once the folder is complete
    return folder, listing


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def tokenizer_config(args) -> dict:
    return dict(base_channels=args.base_channels, downsample=args.downsample, latent_dim=LATENT_DIM,
                image_size=args.image_size,
                quantizer={"type": "vq", "codebook_size": CODEBOOK_SIZE, "kmeans_init": False})


def saved_tokenizer(work: str, args) -> str:
    """Folder of the benchmark's visual tokenizer (seeded random weights), saved on first use."""
    config = tokenizer_config(args)
    path = os.path.join(work, "tokenizer-c{base_channels}-d{downsample}-s{image_size}".format(**config))
    if not os.path.exists(os.path.join(path, "config.json")):
        import torch

        from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig

        torch.manual_seed(0)
        VisualTokenizer(VisualTokenizerConfig(**config)).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------- memory
def _ppid(pid: str) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, ValueError, IndexError):
        return 0


def tree_pss_mb(root: int) -> float:
    """Summed PSS of ``root`` and all its descendants (Linux ``/proc``; 0 elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            children.setdefault(_ppid(entry), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return sum(_pss_kb(pid) for pid in tree) / 1024.0


class PeakMemory:
    """Samples the process tree's PSS in a thread while the measured work runs; ``rss`` reads ``getrusage``."""

    def __init__(self, interval: float = 1.0):
        self.interval, self.peak_pss_mb, self._stop = interval, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak_pss_mb = max(self.peak_pss_mb, tree_pss_mb(os.getpid()))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def rss() -> dict:
        main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
        worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
        return dict(peak_rss_mb=main + worker, peak_rss_main_mb=main, peak_rss_worker_mb=worker)


def cpu_seconds() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def timed(config: dict, work) -> dict:
    """Run ``work()`` (-> extra row fields, including ``num_images`` done) under the clocks and memory sampler."""
    start_cpu, base_rss = cpu_seconds(), PeakMemory.rss()["peak_rss_main_mb"]
    with PeakMemory() as memory:
        start = time.perf_counter()
        extra = work()
        seconds = time.perf_counter() - start
    cpu = cpu_seconds() - start_cpu
    row = {key: config[key] for key in ("mode", "num_images", "batch_size", "workers", "threads")}
    row.update(seconds=extra.pop("seconds", seconds), cpu_seconds=cpu, **PeakMemory.rss(), base_rss_mb=base_rss,
               peak_pss_mb=memory.peak_pss_mb, error=None)
    row["images_per_second"] = extra.pop("done") / row["seconds"]
    row["images_per_cpu_second"] = row["num_images"] / cpu
    row.update(extra, load=load_average())
    return row


# ---------------------------------------------------------------------------------------------------- measured work
def pretokenize_ours(config: dict) -> dict:
    import datasets

    from mllm.data.pretokenize import PretokenizeSettings, pretokenize

    datasets.disable_progress_bars()
    settings = PretokenizeSettings(visual_tokenizer=config["tokenizer"], image_size=config["image_size"])

    def work() -> dict:
        report = pretokenize(config["listing"], config["output"], settings, batch_size=config["batch_size"],
                             num_proc=config["workers"])
        return dict(done=report.kept, skipped=sum(report.skipped.values()), **output_size(config["output"]))
    return timed(config, work)


def pretokenize_naive(config: dict) -> dict:
    """A one-off script's loop: open, preprocess, encode one image, write one ``.npy`` per image."""
    import numpy as np
    import torch
    from PIL import Image

    from tokenizer_bridge.image_processing_visual_tokenizer import VisualTokenizerImageProcessor
    from tokenizer_bridge.interface import load_visual_tokenizer

    torch.set_num_threads(config["threads"])  # torch's default on this machine, stated

    def work() -> dict:
        model = load_visual_tokenizer(config["tokenizer"]).eval()
        processor = VisualTokenizerImageProcessor(size=config["image_size"], resize_mode="crop",
                                                  size_divisor=model.config.downsample)
        root, parts = os.path.dirname(config["listing"]), dict.fromkeys(("load", "preprocess", "encode", "write"), 0.0)
        os.makedirs(config["output"], exist_ok=True)
        with open(config["listing"]) as f:
            records = [json.loads(line) for line in f]
        for i, record in enumerate(records):
            t0 = time.perf_counter()
            image = Image.open(os.path.join(root, record["image"])).convert("RGB")
            t1 = time.perf_counter()
            pixels = torch.as_tensor(processor.preprocess(image)["pixel_values"])  # (1, 3, H, W)
            t2 = time.perf_counter()
            ids = model.encode(pixels)[0].numpy().astype(np.int32)  # (h, w)
            t3 = time.perf_counter()
            np.save(os.path.join(config["output"], f"{i:08d}.npy"), ids)
            parts["write"] += time.perf_counter() - t3
            for name, dt in (("load", t1 - t0), ("preprocess", t2 - t1), ("encode", t3 - t2)):
                parts[name] += dt
        return dict(done=len(records), **{f"{k}_seconds": v for k, v in parts.items()}, **output_size(config["output"]))
    return timed(config, work)


def output_size(path: str) -> dict:
    files, size = 0, 0
    for folder, _, names in os.walk(path):
        files += len(names)
        size += sum(os.path.getsize(os.path.join(folder, n)) for n in names)
    return dict(output_files=files, output_mb=size / 2**20)


def encode_only(config: dict) -> list[dict]:
    """``encode`` alone on preprocessed images at each of ``batch_sizes`` (ascending, so that the process's peak RSS
    after a batch size is that batch size's peak), ``threads`` threads, best of 2 passes -> one row per batch size."""
    import torch
    from PIL import Image

    from tokenizer_bridge.image_processing_visual_tokenizer import VisualTokenizerImageProcessor
    from tokenizer_bridge.interface import load_visual_tokenizer

    torch.set_num_threads(config["threads"])
    model = load_visual_tokenizer(config["tokenizer"]).eval()
    processor = VisualTokenizerImageProcessor(size=config["image_size"], size_divisor=model.config.downsample)
    root = os.path.dirname(config["listing"])
    with open(config["listing"]) as f:
        paths = [os.path.join(root, json.loads(line)["image"]) for line in f][: config["num_images"]]
    images = [Image.open(p).convert("RGB") for p in paths]
    pixels = torch.as_tensor(processor.preprocess(images)["pixel_values"])  # (N, 3, H, W)
    rows = []
    for batch_size in sorted(config["batch_sizes"]):
        chunks = list(torch.split(pixels, batch_size))
        model.encode(chunks[0])  # warm-up

        def work(chunks=chunks) -> dict:
            best = float("inf")
            for _ in range(2):
                start = time.perf_counter()
                for chunk in chunks:
                    model.encode(chunk)
                best = min(best, time.perf_counter() - start)
            return dict(done=len(pixels), seconds=best)
        row = timed(dict(config, batch_size=batch_size), work)
        row["images_per_cpu_second"] = None  # the CPU time covers both passes; not comparable
        rows.append(row)
    return rows


def stream(config: dict) -> dict:
    """One epoch of tokenizer-stage batches from the image folder through ``step_batches``."""
    import torch

    from mllm.data.image_batches import ImageBatches
    from mllm.data.sources import read_images
    from mllm.training.stage import step_batches

    torch.set_num_threads(config["threads"])  # the loop's process; DataLoader workers run one thread each

    def work() -> dict:
        start = time.perf_counter()
        batches = ImageBatches(read_images(config["folder"]), config["image_size"], config["batch_size"], seed=0)
        setup, setup_rss = time.perf_counter() - start, PeakMemory.rss()["peak_rss_main_mb"]
        done, skipped = 0, 0
        steps = config["num_images"] // config["batch_size"]
        for batch in step_batches(batches.batch, 0, steps, num_workers=config["workers"]):
            done += batch["pixel_values"].shape[0]
            skipped += int(batch["num_skipped"])
        return dict(done=done, skipped=skipped, setup_seconds=setup, setup_rss_mb=setup_rss, steps=steps,
                    seconds=time.perf_counter() - start - setup)
    return timed(config, work)


MEASURE = {"pretokenize_ours": pretokenize_ours, "pretokenize_naive": pretokenize_naive, "encode": encode_only,
           "stream": stream}


def measure(config: dict) -> list[dict]:
    """The rows of one configuration (one, or one per batch size for ``encode``)."""
    try:
        rows = MEASURE[config["mode"]](config)
    except Exception as exc:  # noqa: BLE001 - a failure becomes a row
        rows = failed_rows(config, f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
    return rows if isinstance(rows, list) else [rows]


def failed_rows(config: dict, error: str) -> list[dict]:
    out = []
    for batch_size in config.get("batch_sizes") or [config["batch_size"]]:
        row = {key: config[key] for key in ("mode", "num_images", "workers", "threads")}
        out.append(dict(row, batch_size=batch_size, images_per_second=None, peak_rss_mb=None, seconds=None,
                        error=error))
    return out


# ---------------------------------------------------------------------------------------------------- parent side
def configurations(args, tokenizer: str) -> list[dict]:
    """Every configuration, in run order (each pre-tokenizer next to the other, so both see the same machine)."""
    _, listing = image_set(args.work_dir, args.pretokenize_images, args.image_size)
    base = dict(tokenizer=tokenizer, image_size=args.image_size, listing=listing)
    scratch = os.path.join(args.work_dir, "runs")
    configs = [dict(base, mode="encode", num_images=min(args.encode_images, args.pretokenize_images), batch_size=0,
                    batch_sizes=sorted({*args.encode_batch_sizes, *args.batch_sizes}), workers=0, threads=t)
               for t in (1, 2)]
    naive = dict(base, mode="pretokenize_naive", num_images=args.pretokenize_images, batch_size=1, workers=0,
                 threads=os.cpu_count(), output=os.path.join(scratch, "naive"))
    per_worker = max(1, (os.cpu_count() or 1) // max(1, args.num_proc))  # the threads pretokenize gives a worker
    ours = [dict(base, mode="pretokenize_ours", num_images=args.pretokenize_images, batch_size=b, workers=args.num_proc,
                 threads=per_worker, output=os.path.join(scratch, f"ours-b{b}")) for b in args.batch_sizes]
    configs += [naive, *ours] * args.repeats  # rounds: each pre-tokenizer once per round, back to back
    for n in args.num_images:
        folder, _ = image_set(args.work_dir, n, args.image_size)
        for w in args.workers:
            configs.append(dict(base, mode="stream", num_images=n, batch_size=min(args.stream_batch_size, n),
                                workers=w, threads=os.cpu_count() if w == 0 else 1, folder=folder))
    return configs


def child_env(work: str) -> dict:
    return dict(os.environ, HF_DATASETS_CACHE=os.path.join(work, "hf-datasets"), HF_DATASETS_OFFLINE="1",
                HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def run_isolated(config: dict, args) -> list[dict]:
    """Measure one configuration in a fresh process (its own session: on a timeout or an interrupt the whole group,
    pool and DataLoader workers included, is killed)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", json.dumps(config)]
    proc = subprocess.Popen(cmd, env=child_env(args.work_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return failed_rows(config, f"timeout after {args.timeout:.0f} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    rows = [json.loads(line[len(RESULT_TAG):]) for line in stdout.splitlines() if line.startswith(RESULT_TAG)]
    if rows:
        return rows
    tail = (stderr or "").strip().splitlines()
    return failed_rows(config, f"exit code {proc.returncode}: {tail[-1][:200] if tail else 'no output'}")


def warm_sources(configs: list[dict], args) -> None:
    """Build the ``datasets`` cache of each image folder once, so no stream row pays for the first scan."""
    folders = sorted({c["folder"] for c in configs if c["mode"] == "stream"})
    if args.in_process:
        from mllm.data.sources import read_images

        for folder in folders:
            read_images(folder)
        return
    code = f"from mllm.data.sources import read_images\nfor f in {folders!r}:\n    read_images(f)"
    subprocess.run([sys.executable, "-c", code], env=child_env(args.work_dir), check=True, capture_output=True,
                   timeout=args.timeout)


def same_ids(ours_dir: str, naive_dir: str) -> Optional[float]:
    """Share of images whose ids in our dataset equal the naive script's ``.npy`` (None if either is missing)."""
    import numpy as np

    from mllm.data.pretokenize import load_pretokenized

    try:
        dataset = load_pretokenized(ours_dir, None).with_format("numpy")
    except (FileNotFoundError, ValueError):
        return None
    equal = [np.array_equal(row["image_ids"], np.load(os.path.join(naive_dir, f"{int(row['index']):08d}.npy")))
             for row in dataset]
    return sum(equal) / max(1, len(equal))


def run(args) -> list[dict]:
    os.makedirs(args.work_dir, exist_ok=True)
    configs = configurations(args, saved_tokenizer(args.work_dir, args))
    scratch = os.path.join(args.work_dir, "runs")
    shutil.rmtree(scratch, ignore_errors=True)
    warm_sources(configs, args)
    naive_output = next((c["output"] for c in configs if c["mode"] == "pretokenize_naive"), None)
    rows = []
    for config in configs:
        if "output" in config:
            shutil.rmtree(config["output"], ignore_errors=True)
        measured = measure(config) if args.in_process else run_isolated(config, args)
        if config["mode"] == "pretokenize_ours" and measured[0]["error"] is None:
            measured[0]["same_ids_as_naive"] = same_ids(config["output"], naive_output)  # naive ran this round
        for row in measured:
            print(f"  {row['mode']:<18} n={row['num_images']:<6} batch={row['batch_size']:<3} "
                  f"workers={row['workers']} threads={row['threads']} {_fmt(row['images_per_second'], '.1f')} img/s "
                  f"{_fmt(row['peak_rss_mb'], '.0f')} MB {row['error'] or ''}", file=sys.stderr, flush=True)
        rows += measured
    shutil.rmtree(scratch, ignore_errors=True)
    return best_of_rounds(rows)


def row_key(row: dict) -> tuple:
    return tuple(row[k] for k in ("mode", "num_images", "batch_size", "workers", "threads"))


def best_of_rounds(rows: list[dict]) -> list[dict]:
    """One row per configuration: the fastest of its rounds, with every round's images/s in ``runs_images_per_second``
    (the run least disturbed by other jobs on the machine counts, as in the other benches)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(row_key(row), []).append(row)
    out = []
    for runs in groups.values():
        best = max(runs, key=lambda r: r["images_per_second"] or -1.0)
        out.append(dict(best, runs_images_per_second=[r["images_per_second"] for r in runs]) if len(runs) > 1 else best)
    return out


# ---------------------------------------------------------------------------------------------------- report
def _fmt(value, spec: str, missing: str = "-") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else missing


def _ratio(a, b) -> Optional[float]:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def pretokenize_lines(rows: list[dict]) -> list[str]:
    naive = next((r for r in rows if r["mode"] == "pretokenize_naive"), {})
    lines = [("| pre-tokenizer | images | batch | workers | images/s | ours / naive | images per CPU s | "
              "peak RSS MB (main + worker) | peak PSS MB | output files | output MB | same ids as naive | load |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if not r["mode"].startswith("pretokenize"):
            continue
        ours = r["mode"] == "pretokenize_ours"
        ratio = _fmt(_ratio(r["images_per_second"], naive.get("images_per_second")), ".2f") + "x" if ours else "1x"
        lines.append(
            f"| {r['mode'].split('_')[1]} | {r['num_images']} | {r['batch_size']} | {r['workers']} | "
            f"{_fmt(r['images_per_second'], '.1f', r['error'] or '-')} | {ratio} | "
            f"{_fmt(r.get('images_per_cpu_second'), '.1f')} | {_fmt(r['peak_rss_mb'], '.0f')} "
            f"({_fmt(r.get('peak_rss_main_mb'), '.0f')} + {_fmt(r.get('peak_rss_worker_mb'), '.0f')}) | "
            f"{_fmt(r.get('peak_pss_mb'), '.0f')} | {_fmt(r.get('output_files'), 'd')} | "
            f"{_fmt(r.get('output_mb'), '.2f')} | {_fmt(r.get('same_ids_as_naive'), '.0%') if ours else ''} | "
            f"{_fmt(r.get('load'), '.1f')} |")
    if naive.get("seconds"):
        parts = ", ".join(f"{k} {naive[k + '_seconds'] / naive['seconds']:.0%}"
                          for k in ("load", "preprocess", "encode", "write"))
        lines += ["", f"Naive script's time: {parts} (of {naive['seconds']:.1f} s)."]
    return lines


def encode_lines(rows: list[dict]) -> list[str]:
    lines = ["| encode alone | images | batch | threads | images/s | vs batch 1 at the same threads |",
             "|---|---:|---:|---:|---:|---:|"]
    single = {r["threads"]: r["images_per_second"] for r in rows if r["mode"] == "encode" and r["batch_size"] == 1}
    for r in (r for r in rows if r["mode"] == "encode"):
        lines.append(f"| encode | {r['num_images']} | {r['batch_size']} | {r['threads']} | "
                     f"{_fmt(r['images_per_second'], '.1f', r['error'] or '-')} | "
                     f"{_fmt(_ratio(r['images_per_second'], single.get(r['threads'])), '.2f')}x |")
    return lines


def stream_lines(rows: list[dict]) -> list[str]:
    streams = [r for r in rows if r["mode"] == "stream"]
    lines = [("| stream | images | batch | workers | images/s | setup s | peak RSS MB (main + worker) | peak PSS MB "
              "| load |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in streams:
        rss = (f"{_fmt(r['peak_rss_mb'], '.0f')} ({_fmt(r.get('peak_rss_main_mb'), '.0f')} + "
               f"{_fmt(r.get('peak_rss_worker_mb'), '.0f')})")
        lines.append(f"| stream | {r['num_images']} | {r['batch_size']} | {r['workers']} | "
                     f"{_fmt(r['images_per_second'], '.1f', r['error'] or '-')} | "
                     f"{_fmt(r.get('setup_seconds'), '.2f')} | {rss} | {_fmt(r.get('peak_pss_mb'), '.0f')} | "
                     f"{_fmt(r.get('load'), '.1f')} |")
    counts = sorted({r["num_images"] for r in streams})
    if len(counts) > 1:
        lines.append("")
        for w in sorted({r["workers"] for r in streams}):
            small, big = (next((r for r in streams if r["workers"] == w and r["num_images"] == n), {})
                          for n in (counts[0], counts[-1]))
            lines.append(growth_line(w, small, big))
        setup = {n: [r["setup_seconds"] for r in streams if r["num_images"] == n and r.get("setup_seconds")]
                 for n in counts}
        lines.append("- `read_images` + `ImageBatches` setup: " + ", ".join(
            f"{min(v):.2f} s at {n} images ({1000 * min(v) / n:.2f} ms per image)" for n, v in setup.items() if v))
    return lines


def growth_line(workers: int, small: dict, big: dict) -> str:
    """How peak memory and speed change from the smallest to the largest image count at one worker count."""
    def ratio(key: str) -> str:
        return _fmt(_ratio(big.get(key), small.get(key)), ".2f") + "x"

    setup = f"{_fmt(small.get('setup_rss_mb'), '.0f')} -> {_fmt(big.get('setup_rss_mb'), '.0f')} MB"
    streaming = f"{_fmt(streaming_mb(small), '.0f')} -> {_fmt(streaming_mb(big), '.0f')} MB"
    return (f"- workers={workers}: peak RSS {big.get('num_images')}/{small.get('num_images')} images = "
            f"{ratio('peak_rss_mb')} (main process after setup {setup}, the epoch of batches on top of it "
            f"{streaming}), peak PSS {ratio('peak_pss_mb')}, images/s {ratio('images_per_second')}")


def streaming_mb(row: dict) -> Optional[float]:
    """What the epoch of batches added to the main process's peak RSS after the source was read."""
    if row.get("peak_rss_main_mb") is None or row.get("setup_rss_mb") is None:
        return None
    return row["peak_rss_main_mb"] - row["setup_rss_mb"]


def ratio_lines(rows: list[dict]) -> list[str]:
    naive = next((r for r in rows if r["mode"] == "pretokenize_naive"), {})
    lines = []
    for r in (r for r in rows if r["mode"] == "pretokenize_ours"):
        ratio = _ratio(r["images_per_second"], naive.get("images_per_second"))
        cpu = _ratio(r.get("images_per_cpu_second"), naive.get("images_per_cpu_second"))
        verdict = "met" if ratio and ratio >= 3 else "NOT met"
        lines.append(f"- pretokenize batch {r['batch_size']}, {r['workers']} workers: ours / naive = "
                     f"{_fmt(ratio, '.2f')}x images/s ({_fmt(cpu, '.2f')}x per CPU second); target >= 3x {verdict}; "
                     f"encode-alone bound {_fmt(encode_bound(rows, r, naive), '.2f')}x")
    return lines


def encode_bound(rows: list[dict], ours: dict, naive: dict) -> Optional[float]:
    """The ratio ours could reach if encoding were all it did and its workers scaled perfectly: ``workers`` x encode
    images/s at the images per encoder call ours makes (``encode_chunk_size`` on the CPU) and its threads per worker,
    over encode images/s at batch 1 and the naive threads."""
    from mllm.data.pretokenize_encode import encode_chunk_size

    rate = {(r["batch_size"], r["threads"]): r["images_per_second"] for r in rows if r["mode"] == "encode"}
    chunk = encode_chunk_size("cpu", ours["batch_size"])
    mine, theirs = rate.get((chunk, ours["threads"])), rate.get((1, naive.get("threads")))
    return _ratio(ours["workers"] * mine, theirs) if mine else None


def conditions(args, before: Optional[float]) -> str:
    import datasets
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    return (f"checkout {commit}; {os.cpu_count()} CPUs ({platform.machine()}), Python {platform.python_version()}, "
            f"torch {torch.__version__}, datasets {datasets.__version__}; 1-minute load average {_fmt(before, '.1f')} "
            f"before the run, {_fmt(load_average(), '.1f')} after. Visual tokenizer: conv + VQ, "
            f"{json.dumps(tokenizer_config(args))}; images {args.image_size} px JPEG.")


def report(rows: list[dict], args, before: Optional[float]) -> list[str]:
    lines = ["## Pre-tokenization", "", *pretokenize_lines(rows), "", *ratio_lines(rows), "",
             "## Encode alone (what both pre-tokenizers spend most of their time in)", "", *encode_lines(rows), "",
             "## Tokenizer-stage input pipeline", "", *stream_lines(rows)]
    print("\n".join(lines))
    return [f"Conditions: {conditions(args, before)}", "", *lines]


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.one:
        for row in measure(json.loads(args.one)):
            print(RESULT_TAG + json.dumps(row), flush=True)
        return []
    before = load_average()
    rows = run(args)
    lines = report(rows, args, before)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.out:
        command = "python bench/data.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.out, "w") as f:
            f.write("# Data pipeline: pre-tokenization and the tokenizer stage's input pipeline\n\n")
            f.write(f"Written by `{command.strip()}`, each configuration in a fresh process (see the docstring of "
                    "`bench/data.py` for what each mode does and how memory is counted).\n\n")
            f.write("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
