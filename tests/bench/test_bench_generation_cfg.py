"""Smoke test of bench/generation_cfg.py: the CFG section at its --quick size, row format and report."""

import json
import pathlib

import pytest

from tests.bench.conftest import load_bench

BENCH = pathlib.Path(__file__).parents[2] / "bench" / "generation_cfg.py"


@pytest.fixture(scope="module")
def bench():
    return load_bench("generation_cfg")


def test_quick_rows_report_and_same_ids(bench, tmp_path):
    rows = bench.main(["--quick", "--json", str(tmp_path / "rows.json"), "--markdown", str(tmp_path / "report.md")])
    assert json.loads((tmp_path / "rows.json").read_text()) == json.loads(json.dumps(rows))
    assert [(r["batch_size"], r["mode"]) for r in rows] == [(b, m) for b in (1, 2) for m in bench.MODES]
    for row in rows:
        assert {"mode", "batch_size", "params", "tokens_per_second", "peak_mb", "ttfi_seconds"} <= set(row)
        assert row["tokens_per_second"] > 0 and row["peak_mb"] > 0 and row["params"] > 0
        assert row["new_tokens"] == 3 * 5 + 1  # a 3x4 grid: 3 rows of 4 ids + <eol>, then <eoi>
        assert 0 < row["ttfi_seconds"] <= max(row["wall_seconds"])
    for row in rows:  # ours, batched or not, static cache or not, decode the same tokens
        if row["mode"] in ("cfg_unbatched", "cfg_batched_static"):
            assert row["same_ids_as_batched"] is True
    report = (tmp_path / "report.md").read_text()
    assert "| tiny |" in report and "cfg_transformers" in report and "load average" in report
