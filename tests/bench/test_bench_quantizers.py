"""Smoke test of bench/quantizers.py: tiny sizes, result schema, no vector-quantize-pytorch needed."""

import json
import pathlib
import subprocess
import sys

import pytest

from tests.bench.conftest import load_bench

BENCH = pathlib.Path(__file__).parents[2] / "bench" / "quantizers.py"
FIELDS = {"quantizer": str, "impl": str, "mode": str, "K": int, "D": int, "N": int}


@pytest.fixture(scope="module")
def bench():
    return load_bench("quantizers")


def check_row(row: dict) -> None:
    for name, kind in FIELDS.items():
        assert isinstance(row[name], kind), (name, row)
    assert row["impl"] in ("ours", "peer") and row["mode"] in ("eval", "train", "matmul")
    assert "seconds" in row and "peak_mb" in row and "error" in row
    if row["error"] is None:
        assert isinstance(row["seconds"], float) and row["seconds"] > 0
        assert isinstance(row["peak_mb"], float) and row["peak_mb"] >= 0
    else:
        assert isinstance(row["error"], str) and row["peak_mb"] is None and row["seconds"] is None
    if row["mode"] == "matmul" and row["error"] is None:
        assert isinstance(row["gflops"], float) and row["gflops"] > 0


def test_quick_benchmark_schema_without_the_peer(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "peer_available", lambda: False)  # as if vector-quantize-pytorch were absent
    out = tmp_path / "rows.json"
    md = tmp_path / "rows.md"
    bench.main(["--quick", "--in-process", "--repeats", "1", "--threads", "1", "--json", str(out),
                "--markdown", str(md)])
    rows = json.loads(out.read_text())
    for row in rows:
        check_row(row)
    ours = [r for r in rows if r["impl"] == "ours" and r["mode"] != "matmul"]
    assert ours and all(r["error"] is None for r in ours)
    assert {(r["quantizer"], r["mode"]) for r in ours} == {("vq", "eval"), ("vq", "train"), ("ibq", "train"),
                                                           ("ibq_plain", "train"), ("lfq", "train")}
    peer = [r for r in rows if r["impl"] == "peer"]
    ibq = ("ibq", "ibq_plain")
    assert peer and all(r["error"] == "peer not installed" for r in peer if r["quantizer"] not in ibq)
    assert all(r["error"].startswith("not available") for r in peer if r["quantizer"] in ibq)
    assert any(r["mode"] == "matmul" for r in rows)
    assert "| vq | eval |" in md.read_text()


def test_one_configuration_runs_in_a_fresh_process(bench):
    config = dict(quantizer="vq", impl="ours", mode="eval", K=64, D=8, N=128, threads=1,
                  mem_cap_bytes=bench.memory_cap_bytes(8.0))
    proc = subprocess.run([sys.executable, str(BENCH), "--one", json.dumps(config), "--repeats", "1"],
                          capture_output=True, text=True, timeout=120)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith(bench.RESULT_TAG)][-1]
    row = json.loads(line[len(bench.RESULT_TAG):])
    check_row(row)
    assert row["error"] is None and row["gflops"] > 0


def test_failures_become_rows(bench):
    assert bench.describe_error(MemoryError()) == bench.OOM
    assert bench.describe_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried")) == bench.OOM
    row = bench.failed_row(dict(quantizer="vq", impl="peer", mode="eval", K=8, D=2, N=4), "timeout after 1 s")
    check_row(row)
