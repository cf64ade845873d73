"""VQ statistics under data parallelism: two gloo ranks on CPU keep one codebook."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tokenizer_bridge.quantizers import VectorQuantizer

STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batches(rank: int, world: int) -> list[torch.Tensor]:
    """Per-step latents ``(1, 64, 4)``: rank ``r`` of ``world`` gets its slice of one global batch of 128."""
    gen = torch.Generator().manual_seed(0)
    steps = [torch.randn(128, 4, generator=gen) * 2 for _ in range(STEPS)]
    per = 128 // world
    return [x[rank * per : (rank + 1) * per].unsqueeze(0) for x in steps]


def train(vq: VectorQuantizer, rank: int, world: int) -> dict:
    torch.manual_seed(100 + rank)  # restart picks differ per rank unless they are shared
    vq.train()
    for x in batches(rank, world):
        vq(x)
    return {k: v.detach().clone() for k, v in vq.state_dict().items()}


CONFIGS = {
    "learned": dict(codebook_update="learned", kmeans_init=True, dead_code_threshold=0.9),
    "ema": dict(codebook_update="ema", kmeans_init=True, dead_code_threshold=0.9),
    "ema-plain": dict(codebook_update="ema", kmeans_init=False, dead_code_threshold=0.0, ema_decay=0.8),
}


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        states = {}
        for name, kwargs in CONFIGS.items():
            torch.manual_seed(0)
            states[name] = train(VectorQuantizer(dim=4, codebook_size=16, **kwargs), rank, world)
        torch.save(states, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Final quantizer states of both ranks, for every configuration (one spawn for the whole module)."""
    out = str(tmp_path_factory.mktemp("vq_ddp") / "state")
    mp.spawn(worker, args=(2, free_port(), out), nprocs=2, join=True)
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("update", ["learned", "ema"])
def test_ranks_keep_one_codebook_with_kmeans_init_and_restarts(ranks, update):
    kwargs = CONFIGS[update]
    ranks = [states[update] for states in ranks]
    for key in ranks[0]:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], msg=lambda m: f"{key}: {m}")
    # without the sharing, k-means on each rank's own half and per-rank restart picks would differ
    torch.manual_seed(0)
    alone = train(VectorQuantizer(dim=4, codebook_size=16, **kwargs), rank=1, world=2)
    assert not torch.allclose(alone["codebook"], ranks[1]["codebook"])


def test_ema_statistics_over_two_ranks_equal_one_process_on_the_whole_batch(ranks):
    kwargs = CONFIGS["ema-plain"]
    ranks = [states["ema-plain"] for states in ranks]
    torch.manual_seed(0)
    whole = train(VectorQuantizer(dim=4, codebook_size=16, **kwargs), rank=0, world=1)
    for key in ("codebook", "ema_count", "ema_sum", "usage"):
        torch.testing.assert_close(ranks[0][key], whole[key], msg=lambda m: f"{key}: {m}")
