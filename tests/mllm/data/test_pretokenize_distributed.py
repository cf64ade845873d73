"""Many processes, one pre-tokenization: two CPU ranks (gloo) encode disjoint shards and give exactly the
single-process dataset for every record kind, resume a run interrupted in another process without redoing its shards,
and stop together when rank 0 refuses the folder; torchrun and ``vtok pretokenize --num-processes`` launch the same
code, and a run killed mid-way resumes to the same dataset."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import torch.distributed as dist

from mllm.cli import main as vtok
from mllm.data import pretokenize as pt
from mllm.data.pretokenize_ranks import spawn
from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig

ROOT = Path(__file__).resolve().parents[3]


def settings(tokenizer, **kw):
    return pt.PretokenizeSettings(visual_tokenizer=tokenizer, **{"shard_size": 2, **kw})


def kind_sources(kind_data) -> dict:
    return {"captions": kind_data.captions, **{k: s.path for k, s in kind_data.sources.items()}}


def table(out: Path) -> pa.Table:
    dataset = pt.load_pretokenized(str(out), None)
    return dataset.data.table


def assert_same_run(out: Path, reference: Path):
    """Same rows, schema and description as the reference run, and the same bad-record summary."""
    assert table(out) == table(reference) and table(out).schema == table(reference).schema
    got, want = (pt.load_pretokenized(str(d), None) for d in (out, reference))
    assert got.to_dict() == want.to_dict() and got.info.description == want.info.description
    assert pt.read_manifest(str(out))["summary"] == pt.read_manifest(str(reference))["summary"]


def as_ranks(jobs: list, refused: tuple, log: str) -> None:
    """What each spawned rank runs: every job through one process group, logging which rank encodes which shard."""
    dist.init_process_group("gloo")
    rank, encode, job = dist.get_rank(), pt._encode_shard, [0]

    def logged(data, shard, run, batch_size):
        with open(log, "a") as f:
            f.write(json.dumps([job[0], rank, shard, run["num_shards"]]) + "\n")
        return encode(data, shard, run, batch_size)

    pt._encode_shard = logged
    try:
        for job[0], (source, out, options) in enumerate(jobs):
            pt.pretokenize(source, out, **options)
        try:
            pt.pretokenize(*refused)
        except pt.FingerprintMismatchError as error:
            Path(f"{log}.refused{rank}").write_text(str(error))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_for_every_kind_resume_and_refuse_together(kind_data, tmp_path, monkeypatch):
    sources, tok = kind_sources(kind_data), kind_data.tokenizer
    for kind, source in sources.items():
        pt.pretokenize(source, str(tmp_path / f"one_{kind}"), settings(tok), batch_size=3)
    original = pt._save_shard

    def save_then_crash(out_dir, shard, rows, summary):
        original(out_dir, shard, rows, summary)
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(pt, "_save_shard", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        pt.pretokenize(sources["documents"], str(tmp_path / "cut"), settings(tok), batch_size=3)
    monkeypatch.undo()
    first = tmp_path / "cut" / "shards" / "shard-00000"
    before = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}

    jobs = [(source, str(tmp_path / f"two_{kind}"), {"settings": settings(tok), "batch_size": 3})
            for kind, source in sources.items()]
    jobs.append((sources["documents"], str(tmp_path / "cut"), {"settings": settings(tok), "batch_size": 3,
                                                               "keep_shards": True}))
    torch.manual_seed(1)
    config = VisualTokenizerConfig(base_channels=8, latent_dim=8, codebook_size=16, downsample=8, image_size=32)
    VisualTokenizer(config).save_pretrained(tmp_path / "other")
    other = str(tmp_path / "other")
    refused = (sources["captions"], str(tmp_path / "one_captions"), settings(other))
    log = str(tmp_path / "shards.log")
    spawn(as_ranks, (jobs, refused, log), {}, 2)

    for kind in sources:
        assert_same_run(tmp_path / f"two_{kind}", tmp_path / f"one_{kind}")
    assert_same_run(tmp_path / "cut", tmp_path / "one_documents")
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == before  # shard 0 was not encoded again
    entries = [json.loads(line) for line in Path(log).read_text().splitlines()]
    for job in range(len(jobs)):
        done = [(rank, shard) for j, rank, shard, _ in entries if j == job]
        num_shards = next(n for j, _, _, n in entries if j == job)
        shards = sorted(shard for _, shard in done)
        assert shards == list(range(job == 3, num_shards))  # each missing shard once (the resume skips shard 0)
        assert {rank for rank, _ in done} == {0, 1}  # both ranks worked
    for rank in (0, 1):
        assert "never mixed" in Path(f"{log}.refused{rank}").read_text()


# ------------------------------------------------------------------------------------------ launchers
@pytest.mark.slow
def test_torchrun_and_num_processes_give_the_single_process_dataset(kind_data, tmp_path):
    source, tok = kind_data.sources["conversations"].path, kind_data.tokenizer
    pt.pretokenize(source, str(tmp_path / "one"), settings(tok), batch_size=3)
    args = ["--source", source, "--visual-tokenizer", tok, "--shard-size", "2", "--batch-size", "3"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                           "mllm.pretokenize", *args, "--out", str(tmp_path / "torchrun")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("pre-tokenized 5 of 10 records") == 1  # printed by rank 0 only
    assert_same_run(tmp_path / "torchrun", tmp_path / "one")
    vtok(["pretokenize", *args, "--out", str(tmp_path / "spawned"), "--num-processes", "2"])
    assert_same_run(tmp_path / "spawned", tmp_path / "one")


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_same_dataset(kind_data, tmp_path):
    source, tok = kind_data.sources["documents"].path, kind_data.tokenizer
    pt.pretokenize(source, str(tmp_path / "one"), settings(tok, shard_size=1), batch_size=3)
    command = [sys.executable, "-m", "mllm.pretokenize", "--source", source, "--visual-tokenizer", tok,
               "--shard-size", "1", "--batch-size", "3", "--out", str(tmp_path / "killed"), "--num-processes", "2"]
    run = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    shards = tmp_path / "killed" / "shards"
    deadline = time.time() + 240
    while time.time() < deadline and run.poll() is None:
        if shards.is_dir() and len([p for p in shards.iterdir() if not p.name.endswith(".tmp")]) >= 3:
            break
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)  # the spawner and both ranks, mid-run
    run.wait()
    if pt.read_manifest(str(tmp_path / "killed"))["state"] == "complete":
        pytest.skip("the run finished before it could be killed")
    pt.pretokenize(source, str(tmp_path / "killed"), settings(tok, shard_size=1), batch_size=3, num_processes=2)
    assert_same_run(tmp_path / "killed", tmp_path / "one")
