"""Several processes, one pre-tokenization: the ranks of a ``torch.distributed`` group share out the shards.

    torchrun --nproc_per_node 4 -m mllm.pretokenize --source ... --out ...     (a launcher sets the env vars)
    accelerate launch --multi_gpu --num_processes 4 -m mllm.pretokenize --source ... --out ...
    vtok pretokenize --num-processes 4 --source ... --out ...                  (spawns the ranks itself: :func:`spawn`)

A launched process reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` and joins a
``gloo`` group: the ranks exchange only small Python objects (the work list, an error, the report) and barriers, which
``gloo`` carries on any machine; the ids are computed on each rank's own device (``cuda:LOCAL_RANK`` when there is a
GPU) and travel through the shard folders, never the group, so ranks on several machines need ``--out`` on a shared
disk. :func:`spawn` starts fresh interpreters (``spawn``), which import the caller's main module: a script that calls
``pretokenize(..., num_processes=N)`` keeps its work under ``if __name__ == "__main__":``.

:meth:`Ranks.on_rank_zero` runs a step on rank 0 alone and hands its result to every rank, or raises its error on every
rank, so a refused run (another tokenizer's folder, other settings) stops all ranks with the same message instead of
leaving them waiting at a barrier.
"""

from __future__ import annotations

import os
import pickle
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

# a rank that is done waits at a barrier for the slowest one's last shards; the group must not time out meanwhile
BARRIER_TIMEOUT = timedelta(hours=24)


@dataclass
class Ranks:
    """This process's place among the ranks (``world == 1``: a plain single-process run, no group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started_group: bool = False  # this module initialised the process group, so it also ends it

    @property
    def device(self) -> str:
        """``cuda:LOCAL_RANK`` (ranks beyond the GPU count share them in turn), or ``cpu`` without a GPU."""
        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{self.local_rank % torch.cuda.device_count()}"

    def on_rank_zero(self, step: Callable[[], Any]) -> Any:
        """``step()`` run on rank 0 only; its result (or its exception) reaches every rank."""
        if self.world == 1:
            return step()
        message = [None]
        if self.rank == 0:
            try:
                message = [("ok", step())]
            except Exception as error:  # noqa: BLE001 - every rank re-raises it below
                message = [("error", error if _picklable(error) else RuntimeError(f"{type(error).__name__}: {error}"))]
        dist.broadcast_object_list(message, src=0)
        status, value = message[0]
        if status == "error":
            raise value
        return value

    def rank_zero_first(self, step: Callable[[], Any]) -> Any:
        """``step()`` on rank 0, then on the others (so that they reuse what rank 0 cached, e.g. a read source)."""
        if self.rank == 0:
            value = step()
        self.barrier()
        return value if self.rank == 0 else step()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.started_group and dist.is_initialized():
            dist.destroy_process_group()


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate, :func:`spawn`) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join_ranks() -> Ranks:
    """This process's :class:`Ranks`, joining (or reusing) the ``gloo`` group when it was launched as a rank."""
    if not launched():
        return Ranks()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    started = False
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=BARRIER_TIMEOUT)
        started = True
    return Ranks(rank, world, int(os.environ.get("LOCAL_RANK", rank)), started)


def spawn(function: Callable, args: tuple, kwargs: dict, num_processes: int) -> None:
    """Run ``function(*args, **kwargs)`` in ``num_processes`` fresh processes on this machine, launched as ranks
    ``0 .. num_processes - 1`` (the env vars torchrun sets); raises if any rank fails (the others are stopped)."""
    import torch.multiprocessing as mp

    port = _free_port()
    mp.start_processes(_rank_main, args=(num_processes, port, function, args, kwargs), nprocs=num_processes,
                       join=True, start_method="spawn")


def _rank_main(local_rank: int, world: int, port: int, function: Callable, args: tuple, kwargs: dict) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if "OMP_NUM_THREADS" not in os.environ:  # the ranks share this machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    function(*args, **kwargs)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value)
        return True
    except Exception:  # noqa: BLE001 - any failure means: send a plain description instead
        return False
