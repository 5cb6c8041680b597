"""latentgp.GPFA vs Elephant's GPFA on the same simulated spike trains: R^2, timescales, LML, fit time.

Data: 3 squared-exponential GP latents with tau = 50, 100, 200 ms (``gp_latents``), 20 trials x 100
bins of 20 ms, 50 Poisson neurons with a log-linear readout (``poisson_spikes``: 15-40 Hz, log-rate
std 0.6). Both models get sqrt-transformed counts of the same spikes: Elephant gets neo SpikeTrains
with each bin's spikes placed uniformly inside the bin (away from its edges), bin_size = 20 ms, and
the bench asserts that Elephant's own binning reproduces our counts exactly.

* ours: ``GPFA(3, bin_width=0.02).fit(counts, steps=500)`` (default tol=1e-6: stops when the
  per-trial LML changes by < 1e-6 relative for 5 iterations). Init: factor analysis, timescales from
  the autocorrelation of the projections.
* Elephant: ``elephant.gpfa.GPFA(bin_size=20 ms, x_dim=3)`` with its defaults (em_max_iters=500,
  em_tol=1e-8, tau_init=100 ms, min_var_frac=0.01).

Reported per seed: R^2 of the best affine map from posterior means to the true latents
(``r_squared_affine``), learned timescales (sorted, ms), log marginal likelihood per trial of each
fit at its final parameters, EM iterations, fit wall time. "LML check": our E-step evaluated at
Elephant's final parameters vs Elephant's ``exact_inference_with_ll`` there (same model, so they must
agree to round-off) -- an independent check of our E-step and of the comparison itself.

Threads: 1 by default for both (torch and BLAS via threadpoolctl): the matrices are a few hundred
wide, where extra threads on a shared box only add contention.

Run:  .venv/bin/python benchmarks/bench_gpfa.py [--quick] [--threads T]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import time
import warnings

import numpy as np
import torch
from common import append_rows, describe, machine, markdown_table

from latentgp.models.gpfa import GPFA, e_step
from latentgp.simulate import gp_latents, poisson_spikes, r_squared_affine

BW = 0.02
TAUS = np.array([0.05, 0.1, 0.2])
N_TRIALS, N_BINS, N_NEURONS = 20, 100, 50


def make_data(seed: int):
    x = gp_latents(TAUS, n_trials=N_TRIALS, n_bins=N_BINS, bin_width=BW, seed=seed)
    counts = poisson_spikes(x, n_neurons=N_NEURONS, bin_width=BW, seed=seed + 100)["counts"]
    return x, counts


def spike_trains(counts, seed: int):
    """counts (trials, bins, neurons) -> list over trials of lists over neurons of neo.SpikeTrain."""
    import neo
    import quantities as pq

    rng = np.random.default_rng(seed)
    n_trials, n_bins, n_neurons = counts.shape
    out = []
    for tr in range(n_trials):
        trains = []
        for n in range(n_neurons):
            bins = np.repeat(np.arange(n_bins), counts[tr, :, n])
            times = np.sort((bins + rng.uniform(0.05, 0.95, bins.size)) * BW)
            trains.append(neo.SpikeTrain(times * pq.s, t_start=0 * pq.s, t_stop=n_bins * BW * pq.s))
        out.append(trains)
    return out


def run_ours(x, counts, steps):
    t0 = time.perf_counter()
    model = GPFA(3, bin_width=BW).fit(counts, steps=steps, progress=False)
    secs = time.perf_counter() - t0
    return {"r2": r_squared_affine(model.latents(), x), "taus_ms": np.sort(model.timescales_) * 1e3,
            "lml": model.log_marginal_likelihood() / len(counts), "iters": len(model.history), "secs": secs}


def run_elephant(x, counts, trains, max_iters):
    import quantities as pq
    from elephant.gpfa import GPFA as ElephantGPFA
    from elephant.gpfa import gpfa_core, gpfa_util

    seqs = gpfa_util.get_seqs(trains, BW * 1e3 * pq.ms)
    same = all(np.array_equal(s["y"], np.sqrt(c.T)) for s, c in zip(seqs, counts, strict=True))
    if not same:
        raise AssertionError("Elephant's binning of the spike trains differs from our counts")
    model = ElephantGPFA(bin_size=BW * 1e3 * pq.ms, x_dim=3, em_max_iters=max_iters)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(trains)
    secs = time.perf_counter() - t0
    par = model.params_estimated
    with contextlib.redirect_stdout(io.StringIO()):
        latent_seqs, ll = gpfa_core.exact_inference_with_ll(seqs, par, get_ll=True)
    est = np.stack([s["latent_variable"].T for s in latent_seqs])
    # our E-step at Elephant's parameters (gamma = (bin / tau)^2, tau in bins = 1 / sqrt(gamma))
    Y = torch.as_tensor(np.sqrt(counts), dtype=torch.float64)
    t = lambda a: torch.as_tensor(np.array(a, dtype=float))  # noqa: E731
    ours_at = e_step(Y, t(par["C"]), t(par["d"]), t(np.diag(par["R"])), 1 / torch.sqrt(t(par["gamma"])))
    lat_diff = float(np.abs(ours_at.mean.transpose(1, 2).numpy() - est).max())
    return {"r2": r_squared_affine(est, x), "taus_ms": np.sort(BW * 1e3 / np.sqrt(par["gamma"])),
            "lml": ll / len(counts), "iters": len(model.fit_info["iteration_time"]), "secs": secs,
            "lml_check": abs(float(ours_at.lml) - ll), "latent_check": lat_diff}


def fmt_taus(taus) -> str:
    return ", ".join(f"{v:.1f}" for v in taus)


def main(quick: bool = False, threads: int | None = 1) -> str:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        threadpool_limits = None
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    limit = contextlib.nullcontext()
    if threads is not None and threadpool_limits is not None:
        limit = threadpool_limits(threads)
    try:
        import elephant  # noqa: F401
        have_elephant = True
    except ImportError:
        have_elephant = False
    seeds = [0] if quick else [0, 1, 2]
    max_iters = 100 if quick else 500
    info = machine()
    rows = []
    try:
        with limit:
            for seed in seeds:
                x, counts = make_data(seed)
                ours = run_ours(x, counts, max_iters)
                rows.append({"seed": seed, "model": "latentgp GPFA", **ours, "lml_check": "",
                             "latent_check": ""})
                if have_elephant:
                    theirs = run_elephant(x, counts, spike_trains(counts, seed + 200), max_iters)
                    rows.append({"seed": seed, "model": "Elephant GPFA", **theirs})
    finally:
        torch.set_num_threads(old)
    table_rows = [{
        "seed": r["seed"], "model": r["model"], "R²": f"{r['r2']:.4f}",
        "timescales ms (true 50, 100, 200)": fmt_taus(r["taus_ms"]),
        "LML / trial": f"{r['lml']:.3f}", "EM iters": r["iters"], "fit s": f"{r['secs']:.2f}",
        "ms / iter": f"{1e3 * r['secs'] / r['iters']:.0f}",
        "LML check": f"{r['lml_check']:.1e}" if r["lml_check"] != "" else "",
        "latent check": f"{r['latent_check']:.1e}" if r["latent_check"] != "" else "",
    } for r in rows]
    table = markdown_table(table_rows)
    print(f"GPFA, {N_TRIALS} trials x {N_BINS} bins x {N_NEURONS} Poisson neurons, bin {BW * 1e3:g} ms, "
          f"EM cap {max_iters}, threads={threads}; {describe(info)}")
    if not have_elephant:
        print("(Elephant is not installed: `pip install elephant` to add it as a peer.)")
    print(table)
    print("LML check / latent check: |our E-step - Elephant's| log marginal likelihood (total) and max "
          "latent mean difference, both evaluated at Elephant's fitted parameters.")
    csv_rows = [{**{k: v for k, v in r.items() if k != "taus_ms"}, "taus_ms": fmt_taus(r["taus_ms"])}
                for r in rows]
    path = append_rows("gpfa" + ("_quick" if quick else ""), csv_rows, info)
    print(f"(appended to {path})")
    return table


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (0: leave the defaults)")
    args = ap.parse_args()
    main(quick=args.quick, threads=args.threads or None)
