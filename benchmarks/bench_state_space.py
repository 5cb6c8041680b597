"""StateSpaceGP (Kalman, O(n)) vs GPRegressor (Cholesky, O(n³)) on the same Matérn-3/2 GP at T = 4,000:
time per log marginal likelihood + gradient (one optimisation step's work) and equal LML.
Goal: >= 50x faster, same value to 1e-8 relative."""
from __future__ import annotations

import sys
from pathlib import Path

import gpytorch
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, describe, machine, markdown_table, median, time_interleaved  # noqa: E402

import latentgp as lgp  # noqa: E402


def main(quick: bool = False):
    torch.set_num_threads(1)
    info = machine()
    rng = np.random.default_rng(0)
    rows = []
    for n in ([1000] if quick else [1000, 4000]):
        t = np.sort(rng.uniform(0, n / 10, n))
        y = np.sin(t) + 0.1 * rng.standard_normal(n)
        models = {}
        for name, cls in (("StateSpaceGP", lgp.StateSpaceGP), ("GPRegressor", lgp.GPRegressor)):
            kernel = gpytorch.kernels.ScaleKernel(lgp.kernels.Matern(nu=1.5)).double()
            models[name] = cls(kernel=kernel, noise=0.01, mean="zero").fit(t, y, steps=0)

        def step(m):
            X, Y = m._train[0].values, m._train[1]
            m.prior.zero_grad()
            m._lml(X, Y, warn=False).backward()

        times = time_interleaved({k: (lambda m=m: step(m)) for k, m in models.items()}, repeats=3 if quick else 5)
        lml = {k: m.log_marginal_likelihood() for k, m in models.items()}
        ss, dense = median(times["StateSpaceGP"]), median(times["GPRegressor"])
        rows.append({"n": n, "state_space_ms": round(1e3 * ss, 2), "dense_ms": round(1e3 * dense, 1),
                     "speedup": round(dense / ss, 1),
                     "lml_rel_diff": f"{abs(lml['StateSpaceGP'] - lml['GPRegressor']) / abs(lml['GPRegressor']):.1e}"})
    print(f"## StateSpaceGP vs GPRegressor ({describe(info)})\n")
    print(markdown_table(rows))
    append_rows("state_space_vs_dense", rows, info)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
