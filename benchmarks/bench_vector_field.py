"""VectorFieldGP (RVGP) vs a plain RBF GP on ambient coordinates, on a tightly wound swiss roll.

Surface (documented, no mesh shipped): a two-turn roll r(theta) = 1 + 0.3 theta / (2 pi),
theta in [0, 4 pi], height y in [0, 1.5]; sample points uniformly by area. Adjacent sheets are only
0.3 apart in ambient space, while the same two points are ~6-8 apart along the surface.
Field: v = cos(2 pi s / 4) e_s + sin(2 pi s / 4 + y) e_y (s = arc length, e_s, e_y the unit tangents),
which varies along the surface and differs across the gap between sheets.
Observations: 50% of the points, v + N(0, 0.5^2 I_3) ambient noise (not tangent).
Error: relative L2 over all points against the noise-free field.

* ours: ``VectorFieldGP(n_neighbors=10, num_eigenpairs=M).fit(points, noisy, observed)`` (heat kernel,
  L-BFGS on the marginal likelihood), mean vector field from ``predict()``.
* peer: scikit-learn ``GaussianProcessRegressor(C * RBF + White)`` on the ambient coordinates, the
  three components as a multi-output target with one shared kernel (``normalize_y=True``), on the
  same observations; hyperparameters by sklearn's L-BFGS-B.

The peer is an O(n^3) exact GP, so the accuracy comparison runs at n = 4000 (2000 observed); n = 10,000
is run for ours only (accuracy and wall time). ``rvgp_s`` = the whole fit (geometry + eigenpairs +
hyperparameters) + predict; ``geometry_s`` = kNN, frames, Laplacian and eigsh alone, timed separately.

Run:  .venv/bin/python benchmarks/bench_vector_field.py [--quick]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from common import append_rows, describe, machine, markdown_table

from latentgp.linalg.connection_laplacian import connection_laplacian
from latentgp.models.vector_field import VectorFieldGP

GAP, TURNS, HEIGHT, NOISE, PERIOD = 0.3, 2, 1.5, 0.5, 4.0


def swiss_roll(n: int, seed: int = 0):
    """Points (n, 3), noise-free tangent field (n, 3), on the roll; uniform by area."""
    rng = np.random.default_rng(seed)
    theta_max = 2 * np.pi * TURNS
    b = GAP / (2 * np.pi)
    grid = np.linspace(0, theta_max, 20001)
    r = 1 + b * grid
    arc = np.concatenate([[0], np.cumsum(0.5 * (np.hypot(r[1:], b) + np.hypot(r[:-1], b)) * np.diff(grid))])
    s = rng.uniform(0, arc[-1], n)  # uniform in arc length x uniform height = uniform by area
    theta = np.interp(s, arc, grid)
    y = rng.uniform(0, HEIGHT, n)
    rad = 1 + b * theta
    pts = np.c_[rad * np.cos(theta), y, rad * np.sin(theta)]
    e_s = np.c_[b * np.cos(theta) - rad * np.sin(theta), np.zeros(n), b * np.sin(theta) + rad * np.cos(theta)]
    e_s /= np.linalg.norm(e_s, axis=1, keepdims=True)
    e_y = np.tile([0.0, 1.0, 0.0], (n, 1))
    field = np.cos(2 * np.pi * s / PERIOD)[:, None] * e_s + np.sin(2 * np.pi * s / PERIOD + y)[:, None] * e_y
    return pts, field


def problem(n: int, seed: int = 0):
    pts, field = swiss_roll(n, seed)
    rng = np.random.default_rng(seed + 1)
    observed = np.sort(rng.permutation(n)[: n // 2])
    noisy = field[observed] + NOISE * rng.standard_normal((len(observed), 3))
    return pts, field, observed, noisy


def rel_err(pred, truth) -> float:
    return float(np.linalg.norm(pred - truth) / np.linalg.norm(truth))


def run_ours(pts, observed, noisy, num_eigenpairs: int, steps: int):
    t0 = time.perf_counter()
    model = VectorFieldGP(n_neighbors=10, num_eigenpairs=num_eigenpairs)
    model.fit(pts, noisy, observed, steps=steps, progress=False)
    mean = model.predict()[["v0", "v1", "v2"]].to_numpy()
    return mean, time.perf_counter() - t0, model


def run_rbf(pts, observed, noisy):
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

    t0 = time.perf_counter()
    kernel = ConstantKernel(1.0) * RBF(0.5, (1e-3, 1e2)) + WhiteKernel(0.1, (1e-6, 10.0))
    gp = GaussianProcessRegressor(kernel, normalize_y=True, random_state=0).fit(pts[observed], noisy)
    mean = gp.predict(pts)
    return mean, time.perf_counter() - t0, gp


def main(quick: bool = False) -> str:
    info = machine()
    rows = []
    sizes = [(1500, True)] if quick else [(4000, True), (10000, False)]
    for n, with_peer in sizes:
        pts, field, observed, noisy = problem(n)
        m = 100 if n <= 4000 else 200
        t0 = time.perf_counter()
        connection_laplacian(pts, 10, num_eigenpairs=m)  # the geometry part of the fit, timed alone
        t_geo = time.perf_counter() - t0
        mean, t_ours, model = run_ours(pts, observed, noisy, m, steps=30)
        row = {"n": n, "observed": len(observed), "eigenpairs": m, "rvgp_err": round(rel_err(mean, field), 3),
               "rvgp_s": round(t_ours, 1), "geometry_s": round(t_geo, 1), "fit_steps": len(model.history),
               "rvgp_lengthscale": round(model.kernel.lengthscale.item(), 3),
               "rvgp_noise": round(model.prior.noise.item(), 4)}
        if with_peer:
            rmean, t_rbf, gp = run_rbf(pts, observed, noisy)
            row.update({"rbf_err": round(rel_err(rmean, field), 3), "rbf_s": round(t_rbf, 1),
                        "err_ratio_rvgp/rbf": round(rel_err(mean, field) / rel_err(rmean, field), 3),
                        "rbf_kernel": str(gp.kernel_)})
        rows.append(row)
    columns = ["n", "observed", "eigenpairs", "rvgp_err", "rbf_err", "err_ratio_rvgp/rbf", "rvgp_s", "geometry_s",
               "rbf_s"]
    table = markdown_table(rows, columns)
    print(f"Vector field on a swiss roll (gap {GAP}, noise sd {NOISE}, 50% observed); {describe(info)}")
    print(table)
    for r in rows:
        print(f"n={r['n']}: RVGP lengthscale {r['rvgp_lengthscale']}, noise {r['rvgp_noise']}; "
              f"RBF kernel {r.get('rbf_kernel', '-')}")
    path = append_rows("vector_field" + ("_quick" if quick else ""), rows, info)
    print(f"(appended to {path})")
    return table


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    main(quick=args.quick)
