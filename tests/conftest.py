import os

import matplotlib
import pytest

matplotlib.use("Agg")
os.environ.setdefault("LATENTGP_SMOKE", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Small batched matrices: on the shared 2-core CI machine intra-op threads (torch's and
    OpenBLAS's) only add contention -- seconds of jitter -- so tests run single-threaded."""
    import torch
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)
