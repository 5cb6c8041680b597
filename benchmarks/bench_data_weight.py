"""Data-emphasized objective (Harvey et al.) on a real data set: SVGP on the El Niño (year, month) table.

With M = 200 inducing points for 585 training entries the ELBO over-smooths: it trades the data fit for
a small KL / trace penalty and picks long lengthscales and a large noise (held-out RMSE about twice the
exact GP's), for a mean-field q and for a full-covariance q. Refitting with the data term up-weighted
(``fit(data_weight=κ)``) moves the hyperparameters back towards the data. Per split (a random 20% of
entries held out): the exact GP (``GPRegressor``, same kernel family) as the reference, then SVGP with
q full / mean-field at κ = 1 (the ELBO) and κ > 1. Held-out RMSE and NLL (predictive with noise).
Run: make bench (or this file with --quick).
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

COLS = ["year", "month"]


def _score(model, test, name, kappa, seconds, seed):
    p = model.predict(test[COLS], include_noise=True)
    mu, sd, y = p["mean"].to_numpy(), np.sqrt(p["var"].to_numpy()), test["sst"].to_numpy()
    kernel = model.kernel.base_kernel if isinstance(model.kernel, gpytorch.kernels.ScaleKernel) else model.kernel
    ls = kernel.lengthscale.detach().numpy().ravel()
    noise = model.likelihood.noise if hasattr(model, "likelihood") else model.prior.noise
    return {"seed": seed, "model": name, "kappa": kappa, "rmse": round(float(np.sqrt(np.mean((mu - y) ** 2))), 4),
            "nll": round(float(-np.mean(norm.logpdf(y, mu, sd))), 4), "ls_year": round(float(ls[0]), 2),
            "ls_month": round(float(ls[1]), 2), "noise": round(float(noise.detach().reshape(-1)[0]), 4),
            "seconds": round(seconds, 1)}


def split(seed: int, kappas, steps: int, num_inducing: int = 200):
    df = load_elnino()
    held = np.random.default_rng(seed).random(len(df)) < 0.2
    train, test = df[~held], df[held]
    rows = []
    start = time.perf_counter()
    kernel = gpytorch.kernels.ScaleKernel(lgp.kernels.Matern(nu=1.5, ard_num_dims=2))
    exact = lgp.GPRegressor(kernel=kernel).fit(train[COLS], train["sst"], steps=200, progress=False)
    rows.append(_score(exact, test, "exact GP", 1.0, time.perf_counter() - start, seed))
    for variational in ("full", "meanfield"):
        for kappa in kappas:
            start = time.perf_counter()
            model = lgp.SVGP(num_inducing=num_inducing, variational=variational).fit(
                train[COLS], train["sst"], steps=steps, lr=0.02, data_weight=kappa, progress=False, seed=seed)
            rows.append(_score(model, test, f"SVGP {variational}", kappa, time.perf_counter() - start, seed))
    return rows


def main(quick: bool = False):
    torch.set_num_threads(1)
    info = machine()
    seeds = [0] if quick else [0, 1, 2]
    kappas = [1.0, 10.0] if quick else [1.0, 3.0, 10.0, 30.0]
    rows = [r for s in seeds for r in split(s, kappas, 300 if quick else 1500)]
    print(f"## Data-emphasized objective, SVGP on El Niño ({describe(info)})\n")
    print(markdown_table(rows))
    append_rows("data_weight_elnino", rows, info)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
