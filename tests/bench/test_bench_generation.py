"""Smoke test of bench/generation.py: a few layouts end to end at a small token count, row format and report."""

import json
import pathlib

import pytest
import torch

from tests.bench.conftest import load_bench

BENCH = pathlib.Path(__file__).parents[2] / "bench" / "generation.py"


@pytest.fixture(scope="module")
def bench():
    return load_bench("generation")


def test_every_layout_is_well_formed_under_the_peer_grammar(bench):
    """The peer's prefix function and our processor allow the same tokens after every prefix of a generation."""
    for name in bench.LAYOUTS:
        vocab = bench.make_vocab(name)
        generator = torch.Generator().manual_seed(0)
        input_ids, _ = bench.left_pad(bench.prompts(name, vocab, 4, generator))
        ours = bench.ImageSpanLogitsProcessor(vocab, bench.VOCAB_SIZE)
        peer = bench.make_prefix_fn(vocab)
        sequences = input_ids
        for _ in range(40):
            scores = ours(sequences, torch.randn(4, bench.VOCAB_SIZE, generator=generator))
            for row in range(4):
                allowed = set(torch.isfinite(scores[row]).nonzero().flatten().tolist())
                assert set(peer(row, sequences[row])) == allowed, (name, row)
            sequences = torch.cat([sequences, scores.argmax(-1, keepdim=True)], dim=1)


def test_end_to_end_rows_and_report(bench, tmp_path):
    rows = bench.main(["--layouts", "interleaved", "unicode", "--new-tokens", "24", "--repeats", "1", "--replays",
                       "1", "--json", str(tmp_path / "rows.json"), "--markdown", str(tmp_path / "report.md")])
    assert json.loads((tmp_path / "rows.json").read_text()) == json.loads(json.dumps(rows))
    assert [(r["layout"], r["mode"]) for r in rows] == [(layout, mode) for layout in ("interleaved", "unicode")
                                                        for mode in bench.MODES]
    for row in rows:
        assert row["tokens_per_second"] > 0 and row["new_tokens"] == 24 and row["batch_size"] == 4
        assert row["source"] == "end_to_end" and len(row["cpu_seconds"]) == 1
    ours = [r for r in rows if r["mode"] == "ours"]
    assert all(r["same_tokens_as_prefix_fn"] for r in ours)
    assert ours[0]["images_completed"] >= 1  # the interleaved row that starts inside a span closes it
    report = (tmp_path / "report.md").read_text()
    assert "| interleaved |" in report and "| unicode |" in report and "load average" in report
