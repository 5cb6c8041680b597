"""cvHM on the Van der Pol benchmark (Dowling, Zhao & Park 2023): R² and fit time over seeds, the
robustness check on sparse data (R² must not fall as the fit runs longer), and GPFA on the same data.

Paper: R² 0.972 (10 trials x 500 bins, 50 Poisson neurons). Run: make bench (or this file with --quick).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, describe, machine, markdown_table  # noqa: E402

import latentgp as lgp  # noqa: E402
from latentgp.simulate import poisson_spikes, r_squared_affine, simulate_vdp_spikes, van_der_pol  # noqa: E402


def fit_vdp(seed: int, steps: int, svi_steps: int = 0):
    sim = simulate_vdp_spikes(n_trials=10, n_bins=500, n_neurons=50, seed=seed)
    start = time.perf_counter()
    model = lgp.PoissonLatentGP(2, bin_width=sim["bin_width"]).fit(sim["counts"], steps=steps, progress=False)
    seconds = time.perf_counter() - start
    row = {"seed": seed, "model": "cvHM (PoissonLatentGP)", "steps": len(model.history),
           "r2": round(r_squared_affine(model.latents(), sim["latents"]), 4), "fit_seconds": round(seconds, 2)}
    rows = [row]
    if svi_steps:  # the same model through Pyro SVI (whitened latents, mean-field guide)
        start = time.perf_counter()
        svi = lgp.PoissonLatentGP(2, bin_width=sim["bin_width"]).fit(sim["counts"], method="svi", steps=svi_steps,
                                                                     lr=0.02, tol=None, progress=False, seed=seed)
        rows.append({"seed": seed, "model": "same model, Pyro SVI", "steps": len(svi.history),
                     "r2": round(r_squared_affine(svi.latents(), sim["latents"]), 4),
                     "fit_seconds": round(time.perf_counter() - start, 2)})
        row["elbo_per_bin"] = round(model.elbo() / sim["counts"][..., 0].size, 3)
        rows[-1]["elbo_per_bin"] = round(svi.elbo() / sim["counts"][..., 0].size, 3)
    gpfa_cls = getattr(lgp, "GPFA", None)
    if gpfa_cls is not None:
        start = time.perf_counter()
        gpfa = gpfa_cls(2, bin_width=sim["bin_width"]).fit(sim["counts"], progress=False)
        rows.append({"seed": seed, "model": "GPFA", "steps": len(gpfa.history),
                     "r2": round(r_squared_affine(gpfa.latents(), sim["latents"]), 4),
                     "fit_seconds": round(time.perf_counter() - start, 2)})
    return rows


def robustness(seed: int, checkpoints):
    """Sparse data: 30 neurons at 4-12 Hz. R² after increasing numbers of steps."""
    latents = van_der_pol(n_trials=10, n_bins=500, seed=seed)
    sim = poisson_spikes(latents, n_neurons=30, rate_range=(4.0, 12.0), seed=seed + 100)
    out = []
    for steps in checkpoints:
        model = lgp.PoissonLatentGP(2, bin_width=sim["bin_width"]).fit(sim["counts"], steps=steps, tol=None,
                                                                       progress=False)
        out.append({"seed": seed, "steps": steps, "r2": round(r_squared_affine(model.latents(), latents), 4),
                    "elbo_per_bin": round(model.elbo() / (10 * 500), 4)})
    return out


def main(quick: bool = False):
    torch.set_num_threads(1)
    info = machine()
    seeds = [0] if quick else [0, 1, 2]
    rows = [r for seed in seeds for r in fit_vdp(seed, 20, svi_steps=100 if quick else 500)]
    print(f"## cvHM Van der Pol ({describe(info)})\n")
    print(markdown_table(rows))
    for name in sorted({r["model"] for r in rows}):
        sel = [r for r in rows if r["model"] == name]
        print(f"\n{name}: mean R² {np.mean([r['r2'] for r in sel]):.4f}, "
              f"mean fit time {np.mean([r['fit_seconds'] for r in sel]):.1f} s (paper cvHM: 0.972)")
    append_rows("cvhm_vdp", rows, info)
    rob = robustness(0, [10, 40] if quick else [10, 40, 150])
    print("\n## cvHM robustness on sparse data (30 neurons, 4-12 Hz): R² vs steps\n")
    print(markdown_table(rob))
    append_rows("cvhm_robustness", rob, info)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
