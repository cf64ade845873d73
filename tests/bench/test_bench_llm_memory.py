"""bench/llm_memory.py: one configuration of each runner measured in this process at tiny sizes, and the report."""

import pytest

from tests.bench.conftest import load_bench

bench = load_bench("llm_memory")


@pytest.mark.parametrize("runner", ["ours", "plain"])
def test_one_configuration_trains_and_is_measured(runner):
    args = bench.parse_args(["--quick"])
    row = bench.measure(dict(runner=runner, checkpointing=True, accumulation=2, steps=args.steps,
                             batch_size=args.batch_size, image_size=args.image_size, hidden=args.hidden,
                             layers=args.layers))
    assert row["peak_mb"] >= 0 and row["step_seconds"] > 0 and row["tokens_per_step"] > 64
    assert len(row["losses"]) == args.steps + 1 and all(loss > 0 for loss in row["losses"])


def test_report_gives_ratios_against_no_checkpointing_and_the_peer():
    rows = [dict(runner=r, checkpointing=c, accumulation=a, peak_mb=100.0 / (2 if c else 1) * (1.1 if r == "ours" else 1),
                 step_seconds=1.0 * (1.5 if c else 1), tokens_per_step=300.0) for r, c, a in bench.CONFIGS]
    text = bench.report(rows, bench.parse_args([]))
    assert "| ours | on | 1 | 55 | 0.50x | 1.50 | 1.50x | 1.10x, 1.00x |" in text
    assert "- plain: checkpointing on, accumulation 4: peak memory 0.50x, step time 1.50x" in text
