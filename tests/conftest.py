import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # Tiny test models are dominated by per-op overhead; a second thread only adds contention on 2-core machines.
    torch.set_num_threads(1)
    yield
