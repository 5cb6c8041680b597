"""Data-emphasized objective (Harvey et al.) on a real data set: SICGP on the El Niño (year, month) table.

Protocol per split (a random 20% of entries held out): (1) fit SICGP with the ordinary ELBO (κ = 1),
noise learned; (2) refit with the noise fixed at that estimate, κ = 1 (control: the same objective) and
κ ∈ {3, 10} (data-emphasized; κ > 1 needs a fixed noise, see ``SICGP.fit``). Held-out RMSE and NLL
(predictive with noise). Run: make bench (or this file with --quick).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import gpytorch
import numpy as np
import torch
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, describe, machine, markdown_table  # noqa: E402

import latentgp as lgp  # noqa: E402
from latentgp.datasets import load_elnino  # noqa: E402


def _model(noise=None):
    kernel = gpytorch.kernels.ScaleKernel(lgp.kernels.Matern(nu=1.5, ard_num_dims=2))
    return lgp.SICGP(kernel=kernel, rho=3.0, max_neighbors=15, noise=noise)


def split(seed: int, kappas, steps: int):
    df = load_elnino()
    test = np.random.default_rng(seed).random(len(df)) < 0.2
    cols = ["year", "month"]
    Xtr, ytr = df.loc[~test, cols].to_numpy(float), df.loc[~test, "sst"].to_numpy()
    Xte, yte = df.loc[test, cols].to_numpy(float), df.loc[test, "sst"].to_numpy()

    def row(model, kappa, noise, seconds):
        p = model.predict(Xte, include_noise=True)
        mu, sd = p["mean"].to_numpy(), np.sqrt(p["var"].to_numpy())
        ls = model.kernel.base_kernel.lengthscale.detach().numpy().ravel()
        rmse = float(np.sqrt(np.mean((mu - yte) ** 2)))
        return {"seed": seed, "kappa": kappa, "noise": noise, "rmse": round(rmse, 4),
                "nll": round(float(-np.mean(norm.logpdf(yte, mu, sd))), 4), "ls_year": round(float(ls[0]), 3),
                "ls_month": round(float(ls[1]), 3), "seconds": round(seconds, 1)}

    start = time.perf_counter()
    base = _model().fit(Xtr, ytr, method="lbfgs", steps=steps, progress=False)
    noise = float(base.likelihood.noise.detach())
    rows = [row(base, 1.0, "learned", time.perf_counter() - start)]
    for kappa in kappas:
        start = time.perf_counter()
        m = _model(noise).fit(Xtr, ytr, method="lbfgs", steps=steps, progress=False, data_weight=kappa)
        rows.append(row(m, kappa, f"fixed {noise:.4f}", time.perf_counter() - start))
    return rows


def main(quick: bool = False):
    torch.set_num_threads(1)
    info = machine()
    seeds = [0] if quick else [0, 1, 2]
    rows = [r for s in seeds for r in split(s, [1.0, 3.0] if quick else [1.0, 3.0, 10.0], 15 if quick else 40)]
    print(f"## Data-emphasized objective, SICGP on El Niño ({describe(info)})\n")
    print(markdown_table(rows))
    append_rows("data_weight_elnino", rows, info)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
