"""Smoke test of bench/data.py: quick mode end to end, the rows' schema and sane values (no timing assertions)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from tests.bench.conftest import load_bench

BENCH = pathlib.Path(__file__).parents[2] / "bench" / "data.py"
MODES = {"pretokenize_ours", "pretokenize_naive", "stream", "encode"}
COMMON = {"mode": str, "num_images": int, "batch_size": int, "workers": int, "threads": int}
POSITIVE = ("images_per_second", "peak_rss_mb", "seconds", "cpu_seconds", "peak_rss_main_mb", "base_rss_mb")


@pytest.fixture(scope="module")
def bench():
    return load_bench("data")


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    """Rows and report of one quick in-process run (tiny images, a tiny tokenizer)."""
    tmp = tmp_path_factory.mktemp("bench_data")
    rows = bench.main(["--quick", "--in-process", "--work-dir", str(tmp / "work"), "--json", str(tmp / "rows.json"),
                       "--out", str(tmp / "report.md")])
    return rows, json.loads((tmp / "rows.json").read_text()), (tmp / "report.md").read_text(), tmp / "work"


def check_row(row: dict) -> None:
    for name, kind in COMMON.items():
        assert isinstance(row[name], kind), (name, row)
    assert row["mode"] in MODES and row["error"] is None, row
    assert row["num_images"] > 0 and row["batch_size"] > 0 and row["workers"] >= 0 and row["threads"] > 0
    for name in POSITIVE:
        assert isinstance(row[name], float) and math.isfinite(row[name]) and row[name] > 0, (name, row)
    assert row["peak_rss_mb"] >= row["peak_rss_main_mb"] >= row["base_rss_mb"]
    assert row["peak_rss_worker_mb"] >= 0 and row["peak_pss_mb"] >= 0


def test_quick_rows_have_the_schema_and_sane_values(quick):
    rows, saved, _, _ = quick
    assert saved == json.loads(json.dumps(rows))
    assert {r["mode"] for r in rows} == MODES
    for row in rows:
        check_row(row)


def test_pretokenizers_do_the_same_work(quick):
    rows, _, _, _ = quick
    naive = next(r for r in rows if r["mode"] == "pretokenize_naive")
    ours = [r for r in rows if r["mode"] == "pretokenize_ours"]
    assert ours and naive["batch_size"] == 1 and naive["workers"] == 0
    assert naive["output_files"] == naive["num_images"]  # one .npy per image
    parts = sum(naive[f"{k}_seconds"] for k in ("load", "preprocess", "encode", "write"))
    assert 0 < parts <= naive["seconds"]
    for row in ours:
        assert row["workers"] == 2 and row["skipped"] == 0 and row["num_images"] == naive["num_images"]
        # the same images, preprocessing and tokenizer; batched and single encodes may differ in the last float bits
        assert 0.9 <= row["same_ids_as_naive"] <= 1.0


def test_stream_rows_cover_every_size_and_worker_count(quick, bench):
    rows, _, _, _ = quick
    streams = [r for r in rows if r["mode"] == "stream"]
    assert {(r["num_images"], r["workers"]) for r in streams} == {(n, w) for n in bench.QUICK["num_images"]
                                                                 for w in bench.QUICK["workers"]}
    for row in streams:
        assert row["steps"] == row["num_images"] // row["batch_size"] and row["skipped"] == 0
        assert row["setup_seconds"] >= 0 and row["peak_rss_main_mb"] >= row["setup_rss_mb"] > 0
        if row["workers"]:
            assert row["peak_rss_worker_mb"] > 0  # the DataLoader workers were counted


def test_report_prints_the_ratios(quick):
    _, _, report, work = quick
    assert "ours / naive = " in report and "target >= 3x" in report
    assert "| naive |" in report and "| ours |" in report and "| stream |" in report
    assert "peak RSS 32/16 images" in report
    assert not (work / "runs").exists()  # scratch outputs are removed


def test_image_sets_are_cached_and_shared(bench, quick):
    _, _, _, work = quick
    folder, listing = bench.image_set(str(work), 16, bench.QUICK["image_size"])
    lines = pathlib.Path(listing).read_text().splitlines()
    assert len(lines) == 16 and json.loads(lines[3])["caption"] == "synthetic photograph 3"
    big, _ = bench.image_set(str(work), 32, bench.QUICK["image_size"])
    first = sorted(os.listdir(folder))[0]
    assert os.path.samefile(os.path.join(folder, first), os.path.join(big, first))  # the 16 are the 32's first 16


def test_one_configuration_in_a_fresh_process(bench, quick):
    _, _, _, work = quick
    folder, listing = bench.image_set(str(work), 16, bench.QUICK["image_size"])
    config = dict(mode="stream", num_images=16, batch_size=8, workers=1, threads=1, image_size=64, folder=folder,
                  listing=listing, tokenizer="")
    proc = subprocess.run([sys.executable, str(BENCH), "--one", json.dumps(config)], capture_output=True, text=True,
                          timeout=300, env=bench.child_env(str(work)))
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith(bench.RESULT_TAG)][-1]
    row = json.loads(line[len(bench.RESULT_TAG):])
    check_row(row)
    assert row["num_images"] == 16 and row["steps"] == 2 and row["peak_rss_worker_mb"] > 0 and row["peak_pss_mb"] > 0


def test_failures_become_rows(bench):
    [row] = bench.measure(dict(mode="stream", num_images=4, batch_size=2, workers=0, threads=1, image_size=32,
                               folder="/nonexistent/folder", listing="", tokenizer=""))
    assert row["error"] and row["images_per_second"] is None and row["peak_rss_mb"] is None


def test_the_fastest_round_counts(bench):
    rounds = [dict(mode="pretokenize_ours", num_images=8, batch_size=4, workers=2, threads=1, images_per_second=v)
              for v in (3.0, None, 5.0)]
    [row] = bench.best_of_rounds(rounds + [dict(rounds[0], mode="pretokenize_naive")])[:1]
    assert row["images_per_second"] == 5.0 and row["runs_images_per_second"] == [3.0, None, 5.0]
