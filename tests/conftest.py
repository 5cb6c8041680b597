import os

import matplotlib
import pytest

matplotlib.use("Agg")
os.environ.setdefault("LATENTGP_SMOKE", "1")


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)
