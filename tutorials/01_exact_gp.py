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
# # Exact GP regression: Mauna Loa CO₂
#
# This tutorial fits `latentgp.GPRegressor` to monthly atmospheric CO₂ at Mauna Loa (1958–2001,
# shipped in `data/`), composes a kernel from gpytorch and latentgp pieces, forecasts ten years ahead,
# then treats the hyperparameters as unknown with NUTS and inspects the result with ArviZ.
#
# Set `LATENTGP_SMOKE=1` to run a shrunken version (this is how the test suite executes it).

# %%
import os

import arviz as az
import gpytorch
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

import latentgp as lgp
from latentgp.datasets import load_co2
from latentgp.plot import plot_posterior

SMOKE = os.environ.get("LATENTGP_SMOKE") == "1"
plt.rcParams.update({"figure.figsize": (11, 4.5), "figure.dpi": 110})

# %% [markdown]
# ## The data
# One row per month: decimal `year` and the monthly mean `co2` in ppmv. We measure time in years
# since 1958.

# %%
co2 = load_co2()
co2["t"] = co2["year"] - 1958.0
train = co2.iloc[::4] if SMOKE else co2
print(len(train), "months")
co2.head()

# %% [markdown]
# ## A composed kernel
# Rasmussen & Williams' classic decomposition: a smooth rising **trend** (RBF with a long lengthscale),
# a **seasonal** cycle (periodic with period 1 year, allowed to drift through a product with an RBF),
# and **medium-term irregularities** (rational quadratic). Each part gets its own output scale.
# gpytorch's setters route Python floats through float32, so we pass float64 tensors.

# %%
gk = gpytorch.kernels
f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731

trend = gk.ScaleKernel(gk.RBFKernel())
seasonal = gk.ScaleKernel(gk.PeriodicKernel() * gk.RBFKernel())
irregular = gk.ScaleKernel(gk.RQKernel())
kernel = (trend + seasonal + irregular).double()

trend.outputscale, trend.base_kernel.lengthscale = f64(2500.0), f64(50.0)
seasonal.outputscale = f64(5.0)
seasonal.base_kernel.kernels[0].period_length = f64(1.0)
seasonal.base_kernel.kernels[1].lengthscale = f64(90.0)
irregular.outputscale, irregular.base_kernel.lengthscale = f64(0.5), f64(1.0)

# %% [markdown]
# ## Fit: type-II maximum likelihood
# `fit` takes the DataFrame and the name of the target column; the other column we pass in `x` is the
# input. L-BFGS maximises the log marginal likelihood; `history` records every step.

# %%
model = lgp.GPRegressor(kernel=kernel)
model.fit(train[["t", "co2"]], "co2", steps=5 if SMOKE else 40, progress=False)
print(f"log marginal likelihood: {model.log_marginal_likelihood():.2f}, noise variance: {model.prior.noise.item():.3f}")
ax = model.history.plot(x="step", y="loss", legend=False)
ax.set_ylabel("negative log marginal likelihood per point")

# %% [markdown]
# ## Forecast
# `predict` returns a DataFrame with the input column plus `mean`, `var`, `lower` and `upper`
# (a 95% interval by default; `include_noise=True` for new observations rather than the latent curve).

# %%
grid = pd.DataFrame({"t": np.linspace(0, co2["t"].max() + 10, 300 if SMOKE else 1200)})
forecast = model.predict(grid, include_noise=True)
forecast["year"] = forecast["t"] + 1958
ax = plot_posterior(forecast.drop(columns="t"), x="year", data=(co2["year"], co2["co2"]),
                    data_kwargs={"s": 2, "color": "k"})
ax.set_ylabel("CO$_2$ (ppmv)")

# %%
# Zoom on the seasonal cycle at the end of the record and in the forecast.
ax = plot_posterior(forecast.drop(columns="t").query("year > 1995"), x="year",
                    data=(co2.query("year > 1995")["year"], co2.query("year > 1995")["co2"]))
ax.set_ylabel("CO$_2$ (ppmv)")

# %% [markdown]
# ## Bayesian hyperparameters with NUTS
# With `method="nuts"`, `fit` runs a few L-BFGS steps to initialise, then samples the hyperparameters
# with Pyro's NUTS. Priors default to LogNormal(log c, 1) around the initial values `c` of positive
# hyperparameters (pass `priors={site: distribution}` to choose your own). NUTS over the 11
# hyperparameters of the full kernel is slow (trend lengthscale and scale form a long ridge), so here
# we ask a focused question: how well determined is the *seasonal cycle* of the 1990s? We remove a
# straight-line trend and sample a periodic kernel's hyperparameters.

# %%
recent = co2.query("year >= 1990").copy()
recent["seasonal"] = recent["co2"] - np.polyval(np.polyfit(recent["t"], recent["co2"], 2), recent["t"])
if SMOKE:
    recent = recent.iloc[::3]
seasonal_kernel = gk.ScaleKernel(gk.PeriodicKernel()).double()
seasonal_kernel.base_kernel.period_length = f64(1.0)
bayes = lgp.GPRegressor(kernel=seasonal_kernel)
bayes.fit(recent[["t", "seasonal"]], "seasonal", method="nuts", steps=20,
          num_samples=10 if SMOKE else 200, warmup=10 if SMOKE else 200, max_tree_depth=4 if SMOKE else 6,
          seed=0, progress=False)
print("posterior median period (years):", bayes.samples_["kernel.base_kernel.period_length"].median().item())

# %% [markdown]
# `to_inference_data` returns ArviZ InferenceData: posterior draws of the hyperparameters and of the
# latent curve `f` at the data, posterior-predictive replicates `y`, and the pointwise log-likelihood
# that `az.loo` needs.

# %%
idata = bayes.to_inference_data(seed=0)
az.summary(idata, var_names=["~f"], kind="stats")

# %%
az.plot_trace(idata, var_names=["noise", "kernel.base_kernel.period_length"], figsize=(11, 4))
plt.tight_layout()

# %%
az.plot_ppc(idata, num_pp_samples=5 if SMOKE else 50, figsize=(11, 4))

# %%
az.loo(idata)

# %% [markdown]
# ## Save and load
# `save` stores the configuration, the hyperparameters (and NUTS draws) and the training data;
# `latentgp.load` restores a model that predicts identically without refitting.

# %%
import tempfile  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    model.save(f"{tmp}/co2.pt")
    again = lgp.load(f"{tmp}/co2.pt")
same = (again.predict(grid)["mean"].to_numpy() == model.predict(grid)["mean"].to_numpy()).all()
print("identical predictions after load:", same)
