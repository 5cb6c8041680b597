"""End-to-end analyses behind ``make demo`` / ``python -m latentgp demo``."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd


def co2_kernel():
    """Rasmussen & Williams' Mauna Loa kernel: trend + seasonal (periodic x decay) + irregularities."""
    import gpytorch
    import torch

    gk = gpytorch.kernels
    trend = gk.ScaleKernel(gk.RBFKernel())
    seasonal = gk.ScaleKernel(gk.PeriodicKernel() * gk.RBFKernel())
    medium = gk.ScaleKernel(gk.RQKernel())
    kernel = (trend + seasonal + medium).double()
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731 -- gpytorch setters go via float32 otherwise
    trend.outputscale, trend.base_kernel.lengthscale = t(2500.0), t(50.0)
    seasonal.outputscale = t(5.0)
    seasonal.base_kernel.kernels[0].period_length = t(1.0)
    seasonal.base_kernel.kernels[0].lengthscale = t(1.0)
    seasonal.base_kernel.kernels[1].lengthscale = t(90.0)
    medium.outputscale, medium.base_kernel.lengthscale, medium.base_kernel.alpha = t(0.5), t(1.0), t(1.0)
    return kernel


def co2_demo(out: str | Path = "demo_output", smoke: bool = False, progress: bool | None = None) -> Path:
    """Fit the exact GP to monthly Mauna Loa CO2, forecast 10 years, write a figure and a CSV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .datasets import load_co2
    from .models.exact import GPRegressor
    from .plot import plot_posterior

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    df = load_co2()
    df = df.assign(t=df["year"] - 1958.0)
    train = df.iloc[::4] if smoke else df
    start = time.perf_counter()
    model = GPRegressor(kernel=co2_kernel()).fit(train[["t", "co2"]], "co2", steps=10 if smoke else 40,
                                                 progress=progress, tol=1e-8)
    fit_seconds = time.perf_counter() - start
    grid = pd.DataFrame({"t": np.linspace(0, df["t"].max() + 10, 400 if smoke else 1200)})
    pred = model.predict(grid, include_noise=True)
    pred.insert(0, "year", pred["t"] + 1958.0)
    pred.to_csv(out / "co2_forecast.csv", index=False)
    ax = plot_posterior(pred.drop(columns="t"), x="year", data=(df["year"], df["co2"]),
                        data_kwargs={"s": 2, "color": "k"})
    ax.set_ylabel("CO$_2$ (ppmv)")
    ax.set_title(f"Mauna Loa CO$_2$: exact GP, log marginal likelihood {model.log_marginal_likelihood():.1f}")
    ax.figure.tight_layout()
    ax.figure.savefig(out / "co2_forecast.png", dpi=120)
    plt.close(ax.figure)
    summary = pd.DataFrame([{"n_train": len(train), "fit_seconds": fit_seconds,
                             "log_marginal_likelihood": model.log_marginal_likelihood(),
                             "noise": model.prior.noise.item(), "jitter": model.jitter_}])
    summary.to_csv(out / "co2_summary.csv", index=False)
    return out


def spike_demo(out: str | Path = "demo_output", smoke: bool = False, seed: int = 0,
               progress: bool | None = None) -> Path:
    """The neuroscience pipeline end to end: spike times -> counts -> cvHM latents -> CSV + figures.

    Spikes come from the Van der Pol benchmark simulation (10 trials x 500 bins of 10 ms, 50 Poisson
    neurons), written out as a tidy spike-time table first so the pipeline starts where a user's data
    would. Writes spikes.csv, latents.csv, rates.csv, latents.png, raster.png and summary.csv.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .models.poisson_latent import PoissonLatentGP
    from .neuro import bin_spikes, plot_latents, plot_raster, rates_frame
    from .simulate import r_squared_affine, simulate_vdp_spikes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_trials, n_bins = (3, 200) if smoke else (10, 500)
    sim = simulate_vdp_spikes(n_trials=n_trials, n_bins=n_bins, n_neurons=50, seed=seed)
    bw = sim["bin_width"]
    spikes = _counts_to_spike_times(sim["counts"], bw, seed)
    spikes.to_csv(out / "spikes.csv", index=False)

    binned = bin_spikes(spikes, bin_width=bw, t_start=0.0, t_stop=n_bins * bw, n_neurons=50)
    start = time.perf_counter()
    model = PoissonLatentGP(n_latents=2, bin_width=bw).fit(binned.counts, steps=10 if smoke else 20,
                                                          progress=progress)
    fit_seconds = time.perf_counter() - start
    r2 = r_squared_affine(model.latents(), sim["latents"])

    model.to_frame().to_csv(out / "latents.csv", index=False)
    rates_frame(model.rates(), bin_centers=binned.bin_centers, trial_ids=binned.trial_ids,
                neuron_ids=binned.neuron_ids).to_csv(out / "rates.csv", index=False)
    fig, axes = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    plot_latents((model.latents(), model.latent_variance()), trial=0, ax=axes[0], truth=sim["latents"],
                 bin_centers=binned.bin_centers)
    axes[0].set_title(f"cvHM posterior latents, trial 0 (R² vs truth after affine map: {r2:.3f})")
    plot_raster(binned, rates=model.rates(), trial=0, ax=axes[1])
    fig.tight_layout()
    fig.savefig(out / "latents.png", dpi=120)
    plt.close(fig)
    pd.DataFrame([{"n_trials": n_trials, "n_bins": n_bins, "n_neurons": 50, "n_spikes": len(spikes),
                   "fit_seconds": fit_seconds, "r2_affine": r2, "elbo": model.elbo()}]).to_csv(
        out / "summary.csv", index=False)
    return out


def _counts_to_spike_times(counts: np.ndarray, bin_width: float, seed: int) -> pd.DataFrame:
    """Spread each bin's spikes uniformly inside the bin: a spike-time table like a recording's."""
    rng = np.random.default_rng(seed)
    trial, b, neuron = np.nonzero(counts)
    reps = counts[trial, b, neuron]
    trial, b, neuron = (np.repeat(a, reps) for a in (trial, b, neuron))
    times = (b + rng.uniform(0.05, 0.95, size=b.size)) * bin_width
    return pd.DataFrame({"trial": trial, "neuron": neuron, "time": times}).sort_values(["trial", "time"])
