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
# # State-space GPs: the same GP in linear time
#
# A GP on 1-D time whose kernel has a state-space form (Matérn ν = ½ … 7/2, Hida-Matérn, and their
# sums and products) can be solved by Kalman filtering and smoothing in O(n) instead of the O(n³)
# Cholesky. `latentgp.StateSpaceGP` is `GPRegressor` with that solver: same prior, same
# hyperparameters, same log marginal likelihood and predictions (tested to 1e-8), and the same
# fit / NUTS / ArviZ / save-load interface.

# %%
import os
import time

import gpytorch
import matplotlib.pyplot as plt
import numpy as np
import torch

import latentgp as lgp
from latentgp.plot import plot_posterior

SMOKE = os.environ.get("LATENTGP_SMOKE") == "1"
plt.rcParams.update({"figure.figsize": (11, 4.5), "figure.dpi": 110})
rng = np.random.default_rng(0)

# %% [markdown]
# ## A quasi-periodic signal with gaps
# Irregular sampling times, a gap in the middle: a Matérn-3/2 trend plus a Hida-Matérn oscillation.

# %%
n = 300 if SMOKE else 2000
t = np.sort(rng.uniform(0, 100, n))
t = t[(t < 40) | (t > 55)]
y = np.sin(2 * np.pi * t / 7) * (1 + 0.3 * np.sin(t / 20)) + 0.05 * t + 0.3 * rng.standard_normal(t.size)

kernel = (gpytorch.kernels.ScaleKernel(lgp.kernels.Matern(nu=1.5))
          + gpytorch.kernels.ScaleKernel(lgp.kernels.HidaMatern(order=1))).double()
kernel.kernels[0].base_kernel.lengthscale = torch.tensor(30.0, dtype=torch.float64)
kernel.kernels[1].base_kernel.omega = torch.tensor(2 * np.pi / 6.5, dtype=torch.float64)
kernel.kernels[1].base_kernel.lengthscale = torch.tensor(20.0, dtype=torch.float64)
model = lgp.StateSpaceGP(kernel=kernel, mean="constant").fit(t, y, steps=5 if SMOKE else 60, progress=False)
print(f"log marginal likelihood {model.log_marginal_likelihood():.2f}; "
      f"learned period {2 * np.pi / kernel.kernels[1].base_kernel.omega.item():.2f} (truth 7)")
pred = model.predict(np.linspace(-5, 110, 800))
plot_posterior(pred, data=(t, y), data_kwargs={"s": 3})

# %% [markdown]
# ## Same numbers as the dense GP
# `GPRegressor` with the same kernel and hyperparameters gives the same log marginal likelihood and
# predictions (up to floating-point round-off).

# %%
import copy  # noqa: E402

dense = lgp.GPRegressor(kernel=copy.deepcopy(model.kernel), mean="constant")
dense.prior.load_state_dict(model.prior.state_dict())  # identical hyperparameters
dense.fit(t, y, steps=0)
print("LML  state space:", model.log_marginal_likelihood(), " dense:", dense.log_marginal_likelihood())
p_dense = dense.predict(np.linspace(-5, 110, 800))
print("max |mean difference|:", np.abs(p_dense["mean"] - pred["mean"]).max())

# %% [markdown]
# ## Dense vs Kalman timing
# Time for one log marginal likelihood and its gradient, as in one optimisation step.

# %%
sizes = [250, 500, 1000, 2000] if SMOKE else [250, 500, 1000, 2000, 4000, 16000, 64000]
dense_max = 1000 if SMOKE else 4000
rows = []
for size in sizes:
    tt = np.sort(rng.uniform(0, size / 10, size))
    yy = np.sin(tt) + 0.1 * rng.standard_normal(size)
    for name, cls in (("Kalman (StateSpaceGP)", lgp.StateSpaceGP), ("Cholesky (GPRegressor)", lgp.GPRegressor)):
        if cls is lgp.GPRegressor and size > dense_max:
            continue
        m = cls(kernel=gpytorch.kernels.ScaleKernel(lgp.kernels.Matern(nu=1.5)).double(), noise=0.01).fit(tt, yy, steps=0)
        X, Y = m._train[0].values, m._train[1]
        times = []
        for _ in range(3):
            start = time.perf_counter()
            m._lml(X, Y, warn=False).backward()
            times.append(time.perf_counter() - start)
        rows.append((name, size, min(times)))
fig, ax = plt.subplots()
for name in ("Kalman (StateSpaceGP)", "Cholesky (GPRegressor)"):
    xs = [r[1] for r in rows if r[0] == name]
    ys = [r[2] for r in rows if r[0] == name]
    ax.loglog(xs, ys, "o-", label=name)
ax.set_xlabel("number of time points n")
ax.set_ylabel("seconds per LML + gradient")
ax.legend()
