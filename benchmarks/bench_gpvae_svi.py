"""GPVAE trained through Pyro SVI (``method="svi"``) vs the torch-Adam path: step cost and latent recovery.

Step cost: one full training step (minibatch of ``batch`` of 40 sequences, forward + backward + Adam update) of
``fit(method="adam")``'s loss and of ``pyro.infer.SVI(pyro_model, pyro_guide, Adam, TraceMeanField_ELBO).step``,
interleaved, D = 20, L = 3, default networks; T = 100 (dense posterior) and T = 1000 (Kalman smoother). SVI pays
for Pyro's tracing and for the log densities it evaluates on the latent site (unused by the analytic-KL loss):
log p(z) by a noiseless Kalman filter (dense: a Cholesky of K) and log q(z) from it.
Recovery: 2 GP latents (lengthscales 5, 10 bins) through tanh(z W) + 0.1 noise, 16 sequences x 30 bins x 6 features,
``GPVAE(2, hidden=16).fit(steps=120, lr=0.02, batch_size=4)`` both ways; latent R² after the best affine map, per
data seed and fit seed.

Run:  .venv/bin/python benchmarks/bench_gpvae_svi.py [--quick]
"""
from __future__ import annotations

import numpy as np
import pyro
import torch
from common import append_rows, describe, machine, markdown_table, median, paired_ratio, run_cli, time_interleaved

from latentgp.models.gpvae import GPVAE
from latentgp.models.vae_parts import minibatches
from latentgp.simulate import gp_latents, r_squared_affine


def _adam_step(model, batch):
    y, N, T = model._train, *model._train.shape[:2]
    opt = torch.optim.Adam(model.net.parameters(), lr=1e-4)
    batches = minibatches(N, batch)

    def step():
        opt.zero_grad()
        (-model.elbo_terms(y[next(batches)])["elbo"].sum() / (batch * T)).backward()
        opt.step()
    return step


def _svi_step(model, batch):
    elbo = pyro.infer.TraceMeanField_ELBO(max_plate_nesting=1)
    svi = pyro.infer.SVI(model.pyro_model, model.pyro_guide, pyro.optim.Adam({"lr": 1e-4}), elbo)
    return lambda: svi.step(None, batch)


def step_costs(repeats: int, cases) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for N, batch, T in cases:
        Y = rng.standard_normal((N, T, 20))
        a = GPVAE(3).fit(Y, steps=0, progress=False, seed=0)
        s = GPVAE(3).fit(Y, steps=0, progress=False, seed=0)
        with pyro.get_param_store().scope():
            t = time_interleaved({"adam": _adam_step(a, batch), "svi": _svi_step(s, batch)}, repeats=repeats)
        rows.append({"what": f"step, batch {batch} of {N} x T={T}, D=20, L=3",
                     "path": "dense" if T <= a.config["dense_max"] else "Kalman",
                     "adam ms": 1e3 * median(t["adam"]), "svi ms": 1e3 * median(t["svi"]),
                     "svi / adam": paired_ratio(t["svi"], t["adam"])})
    return rows


def recovery(data_seeds, fit_seeds) -> list[dict]:
    rows = []
    for ds in data_seeds:
        x = gp_latents([5.0, 10.0], n_trials=16, n_bins=30, bin_width=1.0, seed=ds)
        rng = np.random.default_rng(ds + 1)
        Y = np.tanh(x @ rng.standard_normal((2, 6))) + 0.1 * rng.standard_normal((16, 30, 6))
        for fs in fit_seeds:
            kw = dict(steps=120, lr=0.02, batch_size=4, seed=fs, progress=False)
            r2 = {m: r_squared_affine(GPVAE(2, hidden=16).fit(Y, method=m, **kw).latents(), x) for m in ("adam", "svi")}
            rows.append({"data seed": ds, "fit seed": fs, "R² adam": r2["adam"], "R² svi": r2["svi"],
                         "svi - adam": r2["svi"] - r2["adam"]})
    return rows


def fmt(rows):
    return [{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]


def main(quick: bool = False) -> str:
    info = machine()
    costs = step_costs(5 if quick else 15, [(40, 4, 100), (40, 10, 100), (40, 4, 1000)])
    rec = recovery([3, 7, 11], [0] if quick else [0, 1])
    out = (f"GPVAE SVI vs Adam ({describe(info)})\n\n" + markdown_table(fmt(costs)) + "\n\n"
           + markdown_table(fmt(rec)))
    print(out)
    append_rows("gpvae_svi_cost" + ("_quick" if quick else ""), costs, info)
    append_rows("gpvae_svi_recovery" + ("_quick" if quick else ""), rec, info)
    return out


if __name__ == "__main__":
    run_cli(main)
