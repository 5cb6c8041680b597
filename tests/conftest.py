import os

import matplotlib
import pytest

matplotlib.use("Agg")
os.environ.setdefault("LATENTGP_SMOKE", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # Two intra-op threads contend badly on the small (2-core, shared) CI machine: one is faster.
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)
