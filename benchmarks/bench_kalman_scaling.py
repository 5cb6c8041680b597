"""Scaling of the parallel-scan Kalman filter: time of log-likelihood + backward vs T.

Model: Matérn-3/2 GP as a 2-state SDE, exactly discretised on an irregular grid, observed with noise.
Reports the log-log slope of (best-of-`repeats`) wall time over T = 1e3 .. 1e5, and compares the value and
value+gradient time against pyro's ``IndependentMaternGP(nu=1.5)`` on a regular grid.

Run:  .venv/bin/python benchmarks/bench_kalman_scaling.py [--quick] [--repeats 5] [--threads 1] [--no-pyro]
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

from latentgp.linalg.kalman import kalman_filter, kalman_smoother

DT = torch.float64


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
    return [torch.tensor(v, dtype=DT, requires_grad=True) for v in (0.3, 1.2, 0.4)]


def time_value_and_grad(fn, repeats):
    """Best-of-`repeats` wall time; also best process CPU time, which a busy shared machine distorts less."""
    best, best_cpu = math.inf, math.inf
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return best, best_cpu


def main(quick: bool = False, repeats: int = 5, threads: int = 1, pyro: bool = True):
    n_threads = torch.get_num_threads()  # restored afterwards: run_all.py runs benches in one process
    torch.set_num_threads(threads)
    try:
        _run(quick, repeats, pyro)
    finally:
        torch.set_num_threads(n_threads)


def _run(quick, repeats, pyro):
    g = torch.Generator().manual_seed(0)
    if quick:
        repeats = min(repeats, 2)

    Ts = [1_000, 2_000, 5_000, 10_000, 20_000] + ([] if quick else [50_000, 100_000])
    times, cpu_times, times_smooth = [], [], []
    for T in Ts:
        dt = torch.rand(T, generator=g, dtype=DT) * 0.02 + 0.005
        y = torch.randn(T, 1, generator=g, dtype=DT)

        def step(dt=dt, y=y):
            ell, sigma, noise = params()
            loglik(dt, y, ell, sigma, noise).backward()

        def smooth(dt=dt, y=y):
            with torch.no_grad():
                A, Q, Pinf = matern32(dt, torch.tensor(0.3, dtype=DT), torch.tensor(1.2, dtype=DT))
                H, R = torch.tensor([[1.0, 0.0]], dtype=DT), torch.full((1, 1, 1), 0.16, dtype=DT)
                kalman_smoother(A, Q, H, R, y, Pinf)

        step()  # warm-up
        wall, cpu = time_value_and_grad(step, repeats)
        times.append(wall)
        cpu_times.append(cpu)
        times_smooth.append(time_value_and_grad(smooth, repeats)[0])
        print(
            f"T={T:>7d}  loglik+backward {wall:8.4f} s (cpu {cpu:8.4f} s)   "
            f"smoother (no grad) {times_smooth[-1]:8.4f} s"
        )
    slope = np.polyfit(np.log(Ts), np.log(times), 1)[0]
    slope_s = np.polyfit(np.log(Ts), np.log(times_smooth), 1)[0]
    slope_cpu = np.polyfit(np.log(Ts), np.log(cpu_times), 1)[0]
    print(
        f"log-log slope over T={Ts[0]:.0e}..{Ts[-1]:.0e}: loglik+backward {slope:.3f} "
        f"(cpu time {slope_cpu:.3f}), smoother {slope_s:.3f}"
    )
    big = [i for i, T in enumerate(Ts) if T >= 10_000]
    slope_big = np.polyfit(np.log(np.take(Ts, big)), np.log(np.take(times, big)), 1)[0]
    print(f"log-log slope over T=1e+04..{Ts[-1]:.0e}: loglik+backward {slope_big:.3f}")
    # time = a + b T: a is the fixed cost of ~log2(T) levels of small torch ops, b the O(T) work
    b, a = np.polyfit(Ts, times, 1)
    print(f"linear fit loglik+backward: {a * 1e3:.1f} ms + {b * 1e6:.2f} us x T")

    if not pyro:
        return
    from pyro.contrib.timeseries import IndependentMaternGP

    for T in (10_000,) if quick else (10_000, 100_000):
        step_dt = 0.01
        y = torch.randn(T, 1, generator=g, dtype=DT)
        dt = torch.full((T,), step_dt, dtype=DT)
        ell0, sigma0, noise0 = (p.item() for p in params())
        # .double(): pyro builds its obs_matrix buffer in float32
        gp = IndependentMaternGP(
            nu=1.5,
            dt=step_dt,
            obs_dim=1,
            length_scale_init=torch.tensor([ell0], dtype=DT),
            kernel_scale_init=torch.tensor([sigma0], dtype=DT),
            obs_noise_scale_init=torch.tensor([noise0], dtype=DT),
        ).double()

        def pyro_step(gp=gp, y=y):
            gp.zero_grad()
            lp = gp.log_prob(y).sum()
            lp.backward()
            return lp

        def ours_step(dt=dt, y=y):
            ell, sigma, noise = params()
            ll = loglik(dt, y, ell, sigma, noise)
            ll.backward()
            return ll

        lp_pyro, lp_ours = pyro_step().item(), ours_step().item()
        t_pyro = time_value_and_grad(pyro_step, repeats)[0]
        t_ours = time_value_and_grad(ours_step, repeats)[0]
        print(
            f"T={T}: pyro IndependentMaternGP log_prob {lp_pyro:.10f}, ours {lp_ours:.10f}, "
            f"rel diff {abs(lp_pyro - lp_ours) / abs(lp_ours):.2e}; value+grad time pyro {t_pyro:.3f} s, "
            f"ours {t_ours:.3f} s, ratio pyro/ours {t_pyro / t_ours:.2f}"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T up to 2e4, fewer repeats")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-pyro", action="store_true")
    args = ap.parse_args()
    main(quick=args.quick, repeats=args.repeats, threads=args.threads, pyro=not args.no_pyro)
