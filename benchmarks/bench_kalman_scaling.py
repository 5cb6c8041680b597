"""Scaling of the parallel-scan Kalman filter: time of log-likelihood + gradient vs T, against pyro.

Model: Matérn-3/2 GP as a 2-state SDE (exact discretisation, closed-form A and Q per step), observed
with Gaussian noise, batch 1. For every T both sides evaluate the log marginal likelihood of the same
y on the same regular grid (pyro's ``IndependentMaternGP`` needs one) and backpropagate to their three
hyperparameters:

* ours: build (A_t, Q_t) from (lengthscale, sigma) with autograd, ``kalman_filter(...).log_likelihood``,
  ``.backward()``;
* pyro: ``IndependentMaternGP(nu=1.5).log_prob(y).sum().backward()``.

The two are timed in the same process in rounds that visit every (T, method) once, in alternating
order (so background load hits all sizes and both methods alike), and the median over rounds is
reported, together with the log-log slope of time vs T over 1e3 .. 1e5, a linear
fit ``time = fixed + per_step * T`` and the paired time ratio ours / pyro at the largest T. The values
must agree to 1e-8 (relative). Also timed: our smoother without gradients (``kalman_smoother``).

Run:  .venv/bin/python benchmarks/bench_kalman_scaling.py [--quick] [--repeats 7] [--threads 1] [--no-pyro]
(or through benchmarks/run_all.py, which calls ``main(quick=...)``).

Single-threaded by default: the kernels are many small batched ops, for which intra-op threads add
little and, on a shared machine, contention makes timings erratic.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from common import append_rows, describe, machine, markdown_table, median, paired_ratio

from latentgp.linalg.kalman import kalman_filter, kalman_smoother

DT = torch.float64
STEP = 0.01  # grid spacing
ELL, SIGMA, NOISE = 0.3, 1.2, 0.4  # lengthscale, kernel scale (std), observation noise (std)


def matern32(dt, lengthscale, sigma):
    """Exact Matérn-3/2 transition A = expm(F dt) and Q = P_inf - A P_inf A^T, per step."""
    lam = math.sqrt(3.0) / lengthscale
    row0 = torch.stack((1 + lam * dt, dt), -1)
    row1 = torch.stack((-(lam**2) * dt, 1 - lam * dt), -1)
    A = torch.exp(-lam * dt)[:, None, None] * torch.stack((row0, row1), -2)
    Pinf = torch.diag(torch.stack((sigma**2, sigma**2 * lam**2)))
    return A, Pinf - A @ Pinf @ A.mT, Pinf


def loglik(dt, y, ell, sigma, noise):
    A, Q, Pinf = matern32(dt, ell, sigma)
    H = torch.tensor([[1.0, 0.0]], dtype=DT)
    R = (noise**2).reshape(1, 1, 1)  # time axis of size 1 broadcasts
    return kalman_filter(A, Q, H, R, y, Pinf).log_likelihood


def params():
    return [torch.tensor(v, dtype=DT, requires_grad=True) for v in (ELL, SIGMA, NOISE)]


def _fits(Ts, times):
    slope = float(np.polyfit(np.log(Ts), np.log(times), 1)[0])
    per_step, fixed = np.polyfit(Ts, times, 1)
    return slope, float(fixed), float(per_step)


def main(quick: bool = False, repeats: int = 7, threads: int = 1, pyro: bool = True):
    n_threads = torch.get_num_threads()  # restored afterwards: run_all.py runs benches in one process
    torch.set_num_threads(threads)
    try:
        return _run(quick, repeats, pyro)
    finally:
        torch.set_num_threads(n_threads)


def _setup(T, g, pyro):
    """The timed callables for one T: ours (LML + grad), pyro (same), ours smoother (no grad)."""
    y = torch.randn(T, 1, generator=g, dtype=DT)
    dt = torch.full((T,), STEP, dtype=DT)

    def ours():
        ll = loglik(dt, y, *params())
        ll.backward()
        return ll.item()

    def smoother():
        with torch.no_grad():
            A, Q, Pinf = matern32(dt, torch.tensor(ELL, dtype=DT), torch.tensor(SIGMA, dtype=DT))
            H, R = torch.tensor([[1.0, 0.0]], dtype=DT), torch.full((1, 1, 1), NOISE**2, dtype=DT)
            kalman_smoother(A, Q, H, R, y, Pinf)

    fns = {"ours": ours}
    if pyro:
        from pyro.contrib.timeseries import IndependentMaternGP

        # .double(): pyro builds its obs_matrix buffer in float32
        gp = IndependentMaternGP(
            nu=1.5,
            dt=STEP,
            obs_dim=1,
            length_scale_init=torch.tensor([ELL], dtype=DT),
            kernel_scale_init=torch.tensor([SIGMA], dtype=DT),
            obs_noise_scale_init=torch.tensor([NOISE], dtype=DT),
        ).double()

        def pyro_step():
            gp.zero_grad()
            lp = gp.log_prob(y).sum()
            lp.backward()
            return lp.item()

        fns["pyro"] = pyro_step
    fns["smoother"] = smoother
    return fns


def _run(quick, repeats, pyro):
    info = machine()
    Ts = [1_000, 2_000, 5_000, 10_000, 20_000] + ([] if quick else [50_000, 100_000])
    if quick:
        repeats = min(repeats, 3)
    g = torch.Generator().manual_seed(0)
    fns = {T: _setup(T, g, pyro) for T in Ts}
    values = {T: {k: f() for k, f in fs.items() if k != "smoother"} for T, fs in fns.items()}  # + warm-up
    for fs in fns.values():
        fs["smoother"]()
    # Every round times every (T, method) once -- small T as the mean of several calls -- alternating the
    # order, so that load changes on a shared machine hit all T and both methods alike (the slope
    # compares times taken minutes apart otherwise).
    times = {(T, k): [] for T in Ts for k in fns[T]}
    jobs = [(T, k) for T in Ts for k in fns[T]]
    for r in range(repeats):
        for T, k in jobs if r % 2 == 0 else jobs[::-1]:
            n = max(1, 20_000 // T)
            t0 = time.perf_counter()
            for _ in range(n):
                fns[T][k]()
            times[T, k].append((time.perf_counter() - t0) / n)
    rows = []
    for T in Ts:
        row = {"T": T, "ours_ms": round(median(times[T, "ours"]) * 1e3, 3)}
        if pyro:
            row["pyro_ms"] = round(median(times[T, "pyro"]) * 1e3, 3)
            row["ratio_ours_over_pyro"] = round(paired_ratio(times[T, "ours"], times[T, "pyro"]), 3)
            v = values[T]
            row["loglik_rel_diff"] = f"{abs(v['ours'] - v['pyro']) / abs(v['pyro']):.1e}"
        row["smoother_nograd_ms"] = round(median(times[T, "smoother"]) * 1e3, 3)
        rows.append(row)

    print(f"\nKalman LML + gradient, Matérn-3/2 (s=2), batch 1, {repeats} rounds -- {describe(info)}\n")
    print(markdown_table(rows))
    summary = []
    for name, key in (("ours", "ours_ms"), ("pyro", "pyro_ms"), ("ours smoother (no grad)", "smoother_nograd_ms")):
        if key not in rows[0]:
            continue
        slope, fixed, per_step = _fits(Ts, [r[key] / 1e3 for r in rows])
        summary.append(
            {
                "": name,
                "log-log slope": f"{slope:.3f}",
                "fit fixed (ms)": f"{fixed * 1e3:.2f}",
                "fit per step (us)": f"{per_step * 1e6:.3f}",
            }
        )
    print(f"\nFits over T = {Ts[0]:.0e} .. {Ts[-1]:.0e} (time = fixed + per_step * T; slope of log time vs log T):\n")
    print(markdown_table(summary))
    if pyro:
        last = rows[-1]
        print(
            f"\nAt T = {last['T']}: ours {last['ours_ms']:.1f} ms, pyro {last['pyro_ms']:.1f} ms, "
            f"ours / pyro = {last['ratio_ours_over_pyro']:.2f} (median of paired rounds); "
            f"log-likelihoods agree to {last['loglik_rel_diff']} (relative)."
        )
        worst = max(float(r["loglik_rel_diff"]) for r in rows)
        if worst > 1e-8:
            print(f"WARNING: ours and pyro's log-likelihoods differ by {worst:.1e} (relative) > 1e-8")
    path = append_rows("kalman_scaling", rows, info)
    print(f"\n(rows appended to {path})")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T up to 2e4, fewer repeats")
    ap.add_argument("--repeats", type=int, default=7, help="rounds (each times every T and method once)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-pyro", action="store_true")
    args = ap.parse_args()
    main(quick=args.quick, repeats=args.repeats, threads=args.threads, pyro=not args.no_pyro)
