"""GP-HM reproduction table: GPPDESolver with Student-t / Gaussian spectral mixtures vs the RBF baseline.

Cases (Poisson, Δu = f, Dirichlet data from the exact solution):
  * 1-D u = sin(100 x) on [0, 1], 400 collocation points (the paper's headline case);
  * 1-D u = sin(x) + 0.1 sin(50 x), 400 points (multi-scale);
  * 2-D u = sin(6 pi x) sin(6 pi y) on [0, 1]^2, 30 × 30 grid.
Each solver: up to 100 L-BFGS steps of the objective (early stop on relative change 1e-10), Q = 20
(1-D) / 10 (2-D) components per dimension; the RBF baseline is the same solver with one
zero-frequency Gaussian component (learnable scale and variance). Error: relative L2 on 2001 (1-D) /
101 × 101 (2-D) evaluation points. "dominant" = angular frequency of the heaviest learned component.

Run:  .venv/bin/python benchmarks/bench_pde.py [--quick]
"""
from __future__ import annotations

import math
import time

import numpy as np
from common import append_rows, describe, machine, markdown_table, run_cli

from latentgp.models.pde import GPPDESolver

W2 = 6 * math.pi
CASES = {
    "sin(100x)": (lambda x: np.sin(100 * x), lambda x: -1e4 * np.sin(100 * x), 1),
    "sin(x)+0.1sin(50x)": (lambda x: np.sin(x) + 0.1 * np.sin(50 * x),
                           lambda x: -np.sin(x) - 250 * np.sin(50 * x), 1),
    "2-D sin(6πx)sin(6πy)": (lambda x, y: np.sin(W2 * x) * np.sin(W2 * y),
                             lambda x, y: -2 * W2**2 * np.sin(W2 * x) * np.sin(W2 * y), 2),
}


def evaluate(case, kernel, quick):
    u, f, ndim = CASES[case]
    n = (100 if quick else 400) if ndim == 1 else (196 if quick else 900)
    q = 1 if kernel == "rbf" else (20 if ndim == 1 else 10)
    steps = 30 if quick else 100
    t0 = time.perf_counter()
    solver = GPPDESolver(domain=[(0, 1)] * ndim, n_collocation=n, num_mixtures=q, kernel=kernel)
    solver.fit(source=f, boundary=u, steps=steps, progress=False)
    elapsed = time.perf_counter() - t0
    if ndim == 1:
        x = np.linspace(0, 1, 2001)
        exact = u(x)
    else:
        g = np.linspace(0, 1, 101)
        X1, X2 = np.meshgrid(g, g, indexing="ij")
        x = np.stack([X1.ravel(), X2.ravel()], -1)
        exact = u(x[:, 0], x[:, 1])
    pred = solver.predict(x)["mean"].to_numpy()
    comps = solver.components()
    alive = int((comps["weight"] > 1e-2 * comps["weight"].max()).sum())
    return {"case": case, "kernel": kernel, "n_collocation": n, "Q": q, "steps_run": len(solver.history),
            "rel_l2": f"{np.linalg.norm(pred - exact) / np.linalg.norm(exact):.2e}",
            "dominant_angular": round(float(comps.sort_values("weight")["angular"].iloc[-1]), 3),
            "components_>1%": alive, "fit_s": round(elapsed, 1)}


def main(quick: bool = False):
    info = machine()
    rows = [evaluate(case, kernel, quick) for case in CASES for kernel in ("student_t", "gaussian", "rbf")
            if not (CASES[case][2] == 2 and kernel == "gaussian")]
    print(f"\n### GP-HM reproduction ({describe(info)})\n")
    print(markdown_table(rows))
    append_rows("bench_pde", rows, info)


if __name__ == "__main__":
    run_cli(main)
