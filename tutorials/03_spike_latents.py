# ---
# jupyter:
#   jupytext:
#     formats: py:percent,ipynb
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Latent trajectories from spike trains (cvHM)
#
# `latentgp.PoissonLatentGP` infers smooth low-dimensional trajectories behind the spiking of a
# neural population: latents are independent Hida-Matérn GPs (Matérn × cosine, lengthscale and
# frequency learned), spike counts are Poisson with a log-linear readout, and inference is
# conjugate-computation VI on a Kalman smoother — linear in the number of time bins.
#
# The pipeline starts from spike times, as a recording would: a table with `trial`, `neuron`, `time`.

# %%
import os

import matplotlib.pyplot as plt

import latentgp as lgp
from latentgp.demos import _counts_to_spike_times
from latentgp.neuro import bin_spikes, plot_latents, plot_raster
from latentgp.simulate import r_squared_affine, simulate_vdp_spikes

SMOKE = os.environ.get("LATENTGP_SMOKE") == "1"
plt.rcParams.update({"figure.figsize": (11, 4.5), "figure.dpi": 110})

# %% [markdown]
# ## Data: a Van der Pol oscillator driving 50 Poisson neurons
# The benchmark of the cvHM paper: a 2-D Van der Pol latent, log-linear readout, 15–40 Hz neurons.

# %%
n_trials, n_bins = (3, 200) if SMOKE else (10, 500)
sim = simulate_vdp_spikes(n_trials=n_trials, n_bins=n_bins, n_neurons=50, seed=0)
spikes = _counts_to_spike_times(sim["counts"], sim["bin_width"], seed=0)
spikes.head()

# %%
binned = bin_spikes(spikes, bin_width=sim["bin_width"], t_start=0.0, t_stop=n_bins * sim["bin_width"], n_neurons=50)
binned

# %% [markdown]
# ## Fit
# `fit` alternates a damped CVI step on the Gaussian sites with an Adam step for the loadings,
# biases and kernel hyperparameters on the variational-EM objective (q held fixed: where the sites
# are optimal its gradient is the ELBO's, without back-propagating through the smoother);
# `history` records the negative ELBO per bin and the hyperparameters. `method="svi"` fits the same
# model by Pyro SVI instead, for comparison (slower, mean-field).

# %%
model = lgp.PoissonLatentGP(n_latents=2, bin_width=binned.bin_width)
model.fit(binned.counts, steps=10 if SMOKE else 20, progress=False)
print(f"R² of the posterior mean vs the true latents (after an affine map): "
      f"{r_squared_affine(model.latents(), sim['latents']):.3f}")
model.history.plot(x="step", y="loss", legend=False, ylabel="negative ELBO per bin")

# %%
fig, axes = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
plot_latents((model.latents(), model.latent_variance()), trial=0, ax=axes[0], truth=sim["latents"],
             bin_centers=binned.bin_centers)
plot_raster(binned, rates=model.rates(), trial=0, ax=axes[1])
fig.tight_layout()

# %% [markdown]
# ## Tidy output
# Latents with intervals, one row per trial × bin × latent — ready for CSV or seaborn.

# %%
model.to_frame().head()
