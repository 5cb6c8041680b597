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
# # GP-VAEs: sequences, then spikes + behaviour with MM-GPVAE
#
# A GP-VAE is a variational autoencoder whose latent trajectories z(t) have a Gaussian-process prior
# over time. `latentgp.GPVAE` amortises inference with an encoder that outputs Gaussian *sites* per
# time step; the posterior is prior × sites, computed exactly by one O(T) Kalman smoothing pass (compiled,
# with a hand-written gradient) -- so the KL term of the ELBO is exact and only the decoder's expected
# log-likelihood is sampled.
#
# `latentgp.MultimodalGPVAE` (MM-GPVAE, Gondur et al. 2024) shares latents between spike counts
# (Poisson, log-linear readout as in GPFA) and behaviour (here: images through a neural decoder),
# represents them in the Fourier domain, and can infer the latents from one modality alone.
#
# Set `LATENTGP_SMOKE=1` to run a shrunken version (this is how the test suite executes it).

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

from latentgp.cosmoothing import co_smoothing
from latentgp.models.gpfa import GPFA
from latentgp.models.gpvae import GPVAE
from latentgp.models.mmgpvae import MultimodalGPVAE
from latentgp.simulate import gp_latents, r_squared_affine
from latentgp.simulate_blob import simulate_blob_spikes

SMOKE = os.environ.get("LATENTGP_SMOKE") == "1"
plt.rcParams.update({"figure.figsize": (11, 4), "figure.dpi": 110})

# %% [markdown]
# ## 1. A GP-VAE on many short sequences
# Two latent GPs (timescales 5 and 10 steps) pass through a random linear map and a tanh into 10
# noisy features. The decoder must learn the nonlinearity; the GP prior supplies the smoothness.

# %%
n_seq, T = (16, 30) if SMOKE else (100, 80)
x = gp_latents([5.0, 10.0], n_trials=n_seq, n_bins=T, bin_width=1.0, seed=0)
rng = np.random.default_rng(1)
Y = np.tanh(x @ rng.standard_normal((2, 10))) + 0.1 * rng.standard_normal((n_seq, T, 10))

model = GPVAE(latent_dim=2, likelihood="gaussian")
model.fit(Y, steps=80 if SMOKE else 1500, lr=0.02, batch_size=8 if SMOKE else 20, seed=0)
print("latent R² after affine alignment:", round(r_squared_affine(model.latents(), x), 3))
print("learned lengthscales:", model.net.kernel.lengthscale.detach().flatten().numpy().round(2))

# %% [markdown]
# Latent trajectories with 95% bands for one sequence (the latents are identified up to an affine map,
# so the truth is drawn in the model's coordinates), and the training curve (`model.history`).

# %%
fig, axes = plt.subplots(1, 2)
model.plot_latents(sequence=0, ax=axes[0])
est = model.latents().reshape(-1, 2)
design = np.column_stack([x.reshape(-1, 2), np.ones(len(est))])
aligned = (design @ np.linalg.lstsq(design, est, rcond=None)[0]).reshape(n_seq, T, 2)
axes[0].plot(model.times_, aligned[0], "k--", lw=1, label="truth")
axes[0].set_title("posterior latents, sequence 0 (dashed: truth)")
axes[1].plot(model.history.step, model.history.loss)
axes[1].set(xlabel="step", ylabel="-ELBO per time step", title="training")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. MM-GPVAE: spikes and a moving blob share three latents
# Three GP latents (timescales 50, 100, 200 ms) drive 50 Poisson neurons and a rendered image per
# 20 ms bin: a blob whose position follows latents 0 and 1 and whose width follows latent 2.
# We hold out some trials to test prediction from spikes alone.

# %%
n_train, n_test = (12, 4) if SMOKE else (40, 10)
size = 12 if SMOKE else 28
data = simulate_blob_spikes(n_train + n_test, n_bins=30 if SMOKE else 50, n_neurons=50, timescales=(0.05, 0.1, 0.2),
                            bin_width=0.02, size=size, seed=0)
counts, images, latents = data["counts"], data["images"], data["latents"]
tr, te = slice(0, n_train), slice(n_train, None)

mm = MultimodalGPVAE(shared_dim=3, private_dims=(0, 0), n_frequencies=30, bin_width=0.02)
mm.fit(counts[tr], images[tr], steps=120 if SMOKE else 3000, lr=0.01, batch_size=6 if SMOKE else 10, seed=0)
gpfa = GPFA(3, bin_width=0.02).fit(counts[tr], steps=30 if SMOKE else 300)

print("latent R², training trials:  MM-GPVAE", round(r_squared_affine(mm.latents(), latents[tr]), 3),
      "| GPFA", round(r_squared_affine(gpfa.latents(), latents[tr]), 3))
print("latent R², held-out, spikes only: MM-GPVAE",
      round(r_squared_affine(mm.latents(spikes=counts[te]), latents[te]), 3),
      "| GPFA", round(r_squared_affine(gpfa.transform(counts[te]), latents[te]), 3))
pred = mm.predict_behaviour(counts[te], seed=0)
print("held-out images predicted from spikes alone, pixel R²:",
      round(1 - ((pred - images[te]) ** 2).sum() / ((images[te] - images[te].mean()) ** 2).sum(), 3))

# %% [markdown]
# Held-out-neuron co-smoothing: on the held-out trials each model sees only the even-numbered neurons,
# infers the latents from them, and predicts the odd-numbered neurons' rates, scored by their Poisson
# log-likelihood relative to each neuron's mean rate (bits per spike; higher is better).

# %%
held_in = np.arange(0, 50, 2)
for name, m, options in (("MM-GPVAE", mm, {"steps": 20 if SMOKE else 100}), ("GPFA", gpfa, {})):
    score = co_smoothing(m, counts[te], held_in, **options)
    print(f"co-smoothing {name}: {score['bits_per_spike']:.3f} bits/spike, {score['nats_per_bin']:.4f} nats/bin")

# %% [markdown]
# Cross-modal prediction: true frames of a held-out trial (top) and frames decoded from latents
# inferred from that trial's spikes alone (bottom).

# %%
mm.plot_cross_modal(counts[te], images[te], sequence=0, frames=(0, 7, 14, 21, 28))
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Notes
# * `MultimodalGPVAE.fit` first trains the spike pathway alone for `spike_warmup` steps (default a fifth of
#   `steps`): the image term is far larger than the spike term and, from a random start, can settle the
#   latents in a warped optimum that the log-linear spike readout cannot undo. `restarts=3` adds robustness
#   (the benchmark uses it: latent R² above GPFA on 5 of 5 seeds, BENCHMARKS.md).
# * `GPVAE.fit` / `MultimodalGPVAE.fit` train with Adam on minibatches of sequences through the
#   library's one training loop; `history` has the loss and the lengthscales per step.
# * Save with `model.save(path)`, load with `latentgp.load(path)` (weights only). Models trained with
#   your own `nn.Module` networks load with `GPVAE.load(path, encoder=..., decoder=...)`.
# * The ELBO's closed-form terms are tested against Monte-Carlo estimates, and the Fourier-domain KL
#   against a dense time-domain KL (`tests/test_gpvae.py`, `tests/test_mmgpvae.py`).
