import os

import pytest
import torch

from tests.hub_stand_in import fake_hub  # noqa: F401  (a fixture of every test module)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # Tiny test models are dominated by per-op overhead; a second thread only adds contention on 2-core machines.
    torch.set_num_threads(1)
    yield


@pytest.fixture
def run_until_first_checkpoint(monkeypatch):
    """``run_until_first_checkpoint(lambda: run(recipe))``: the run is interrupted (KeyboardInterrupt) right after it
    writes its first checkpoint, as a killed job would be; the loop behaves normally again afterwards."""
    from mllm.training.loop import Trainer

    def interrupted(start) -> None:
        original = Trainer.save_checkpoint

        def save_then_crash(self):
            original(self)
            raise KeyboardInterrupt("simulated interruption")

        monkeypatch.setattr(Trainer, "save_checkpoint", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            start()
        monkeypatch.setattr(Trainer, "save_checkpoint", original)

    return interrupted
