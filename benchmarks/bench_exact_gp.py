"""latentgp.GPRegressor vs gpytorch ExactGP: time per Adam step and LML at identical hyperparameters.

Setup: float64, d = 3 inputs X ~ U[0, 1]^3, y = sum_j sin(2 pi x_j) + 0.1 noise, n = 1000 and 4000.
Both models: constant mean, ScaleKernel(RBFKernel()) (one shared lengthscale), learned Gaussian noise.

* ours: ``GPRegressor(kernel=ScaleKernel(RBFKernel())).fit(X, y, steps=0)``, then exactly the loop of
  ``fit(method="adam")``: ``optimize(lambda: -model._lml(X, y, warn=False) / n, model.prior.parameters(),
  method="adam", steps=k)``; one sample = that call / k.
* gpytorch: the standard ExactGP (GaussianLikelihood, ConstantMean, ScaleKernel(RBFKernel)),
  ExactMarginalLogLikelihood, torch Adam; one step = zero_grad, -mll(model(X), y), backward, step.
  Forced onto the exact Cholesky path: ``max_cholesky_size(10**6)``, ``fast_computations`` off.

Samples of the two alternate (order reversed every round) so background load hits both alike; the
table gives medians, the ratio of medians and the median of per-round ratios ("paired").
LML: gpytorch's hyperparameters are set from ours (float64), then n * mll (gpytorch divides by n) is
compared with ``model.log_marginal_likelihood()``, at the initial point and again after the timed steps.

Run:  .venv/bin/python benchmarks/bench_exact_gp.py [--quick] [--threads T]
"""
from __future__ import annotations

import argparse
import math
import warnings

import gpytorch
import torch
from common import append_rows, describe, machine, markdown_table, median, paired_ratio, time_interleaved

from latentgp import GPRegressor
from latentgp.fit import optimize

DTYPE = torch.float64
D = 3


def make_data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, D, generator=g, dtype=DTYPE)
    y = torch.sin(2 * math.pi * X).sum(-1) + 0.1 * torch.randn(n, generator=g, dtype=DTYPE)
    return X, y


class GPyTorchExact(gpytorch.models.ExactGP):
    def __init__(self, X, y, likelihood):
        super().__init__(X, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def exact_settings():
    """gpytorch on the Cholesky path (what latentgp computes): no CG/Lanczos anywhere."""
    return gpytorch.settings.max_cholesky_size(10**6), gpytorch.settings.fast_computations(
        covar_root_decomposition=False, log_prob=False, solves=False)


def sync_from_ours(ours: GPRegressor, gp: GPyTorchExact) -> None:
    prior = ours.prior
    noise = prior.noise.detach()
    if float(noise) <= 1e-4:
        raise ValueError(f"noise {float(noise):.3g} is below gpytorch's GreaterThan(1e-4) noise constraint")
    with torch.no_grad():
        gp.mean_module.constant = prior.mean_module.constant.detach().clone()
        gp.covar_module.outputscale = prior.kernel.outputscale.detach().clone()
        gp.covar_module.base_kernel.lengthscale = prior.kernel.base_kernel.lengthscale.detach().clone()
        gp.likelihood.noise = noise.clone()


def lml_pair(ours, gp, mll, X, y):
    """(ours, gpytorch, number of gpytorch jitter warnings) at ours' current hyperparameters."""
    sync_from_ours(ours, gp)
    a, b = exact_settings()
    with a, b, torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = float(mll(gp(X), y)) * len(y)
    return ours.log_marginal_likelihood(), theirs, len(caught)


def bench_size(n: int, repeats: int, k: int) -> dict:
    X, y = make_data(n)
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
    ours = GPRegressor(kernel=kernel).fit(X, y, steps=0)
    Xt, yt = ours._train[0].values, ours._train[1]
    assert Xt.dtype == DTYPE and torch.equal(Xt, X) and torch.equal(yt, y)

    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
    gp = GPyTorchExact(X, y, likelihood).to(DTYPE)
    gp.train()
    likelihood.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, gp)

    checks = [lml_pair(ours, gp, mll, X, y)]

    def ours_k_steps():
        optimize(lambda: -ours._lml(Xt, yt, warn=False) / n, ours.prior.parameters(), method="adam",
                 steps=k, progress=False)

    opt = torch.optim.Adam(gp.parameters(), lr=0.05)  # same lr as latentgp's Adam default

    def gpytorch_k_steps():
        a, b = exact_settings()
        with a, b:
            for _ in range(k):
                opt.zero_grad()
                loss = -mll(gp(X), y)
                loss.backward()
                opt.step()

    times = time_interleaved({"ours": ours_k_steps, "gpytorch": gpytorch_k_steps}, repeats=repeats, warmup=1)
    t_ours = [t / k for t in times["ours"]]
    t_gp = [t / k for t in times["gpytorch"]]

    ours._condition()  # refresh the cache after the timed steps, then compare again
    checks.append(lml_pair(ours, gp, mll, X, y))
    worst = max(checks, key=lambda c: abs(c[0] - c[1]))
    return {
        "n": n,
        "d": D,
        "repeats": repeats,
        "steps_per_sample": k,
        "ours_ms": round(1e3 * median(t_ours), 1),
        "gpytorch_ms": round(1e3 * median(t_gp), 1),
        "ratio": round(median(t_ours) / median(t_gp), 3),
        "paired_ratio": round(paired_ratio(t_ours, t_gp), 3),
        "ours_ms_min": round(1e3 * min(t_ours), 1),
        "gpytorch_ms_min": round(1e3 * min(t_gp), 1),
        "lml_ours": f"{worst[0]:.10f}",
        "lml_gpytorch": f"{worst[1]:.10f}",
        "abs_lml_diff": f"{max(abs(c[0] - c[1]) for c in checks):.2e}",
        "gpytorch_jitter_warnings": sum(c[2] for c in checks),
        "ours_jitter": ours.jitter_,
    }


COLUMNS = {
    "n": "n", "d": "d", "ours_ms": "ours ms/step", "gpytorch_ms": "gpytorch ms/step",
    "ratio": "ratio ours/gpytorch", "paired_ratio": "paired ratio", "lml_ours": "LML ours",
    "lml_gpytorch": "LML gpytorch", "abs_lml_diff": "abs LML diff",
}


def main(quick: bool = False, threads: int | None = None) -> str:
    if threads is not None:
        torch.set_num_threads(threads)
    plan = [(500, 5, 2), (1000, 3, 1)] if quick else [(1000, 15, 3), (4000, 7, 1)]
    info = machine()
    rows = [bench_size(n, repeats, k) for n, repeats, k in plan]
    table = markdown_table([{COLUMNS[c]: r[c] for c in COLUMNS} for r in rows])
    print(f"Exact GP, time per Adam step (median of repeats, alternating rounds) and LML; {describe(info)}")
    print(table)
    samples = ", ".join(f"n={r['n']}: {r['steps_per_sample']}x{r['repeats']}" for r in rows)
    fastest = ", ".join(f"n={r['n']}: {r['ours_ms_min']}/{r['gpytorch_ms_min']}" for r in rows)
    print(f"steps per sample x rounds: {samples}; min ms/step ours/gpytorch: {fastest}")
    path = append_rows("exact_gp" + ("_quick" if quick else ""), rows, info)
    print(f"(appended to {path})")
    return table


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    main(quick=args.quick, threads=args.threads)
