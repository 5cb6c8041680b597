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
# # Large-n GPs with sparse inverse-Cholesky variational inference (SICGP / DKLGP)
#
# `latentgp.SICGP` orders the inputs coarse-to-fine (maximin), lets each point condition on its nearby
# *earlier* points, and fits a Gaussian posterior whose precision has a sparse inverse-Cholesky factor
# on that pattern (Cao et al. 2023). One knob, `rho` (the neighbourhood radius in units of each point's
# maximin spacing), trades accuracy for speed. Minibatch training keeps the cost of a step nearly
# independent of n.
#
# Set `LATENTGP_SMOKE=1` for a shrunken run (this is how the test suite executes it).

# %%
import os
import time

import gpytorch
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from latentgp.models.sic import SICGP  # also `lgp.SICGP` once exported

SMOKE = os.environ.get("LATENTGP_SMOKE") == "1"
rng = np.random.default_rng(0)

# %% [markdown]
# ## Regression on a wiggly surface
# A 2-D function with a short lengthscale, observed with noise at n random points.

# %%
n = 2_000 if SMOKE else 50_000
truth = lambda X: np.sin(12 * X[:, 0]) * np.cos(9 * X[:, 1]) + 0.5 * np.sin(20 * X[:, 0] * X[:, 1])  # noqa: E731
X = rng.uniform(size=(n, 2))
y = truth(X) + 0.1 * rng.normal(size=n)
X_test = rng.uniform(size=(1000, 2))
f_test = truth(X_test)


def kernel():
    k = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=1.5)).double()
    k.base_kernel.lengthscale = torch.tensor(0.1, dtype=torch.float64)
    return k


# %% [markdown]
# ## The ρ knob
# Larger ρ means more neighbours per point (capped by `max_neighbors`), a better prior approximation
# and a slower step. We fit the same data with a few values and record held-out RMSE, the mean
# predictive log density of held-out observations and the time per step.

# %%
steps = 60 if SMOKE else 3000
batch = 128 if SMOKE else 256
rows, models = [], {}
for rho, m in [(1.5, 8), (2.5, 16)] if SMOKE else [(1.2, 5), (1.5, 8), (2.5, 20), (4.0, 40)]:
    model = SICGP(kernel=kernel(), rho=rho, max_neighbors=m)
    t0 = time.perf_counter()
    model.fit(X, y, steps=steps, batch_size=batch, lr=0.03, seed=0)
    elapsed = time.perf_counter() - t0
    pred = model.predict(X_test, include_noise=True)
    y_test = f_test + 0.1 * rng.normal(size=len(f_test))
    nlpd = -np.mean(-0.5 * np.log(2 * np.pi * pred["var"]) - 0.5 * (y_test - pred["mean"]) ** 2 / pred["var"])
    rows.append({"rho": rho, "max_neighbors": m, "avg neighbours": float(model.q.mask.sum(1).float().mean() - 1),
                 "RMSE": float(np.sqrt(np.mean((pred["mean"] - f_test) ** 2))), "NLPD": float(nlpd),
                 "ms / step": 1000 * elapsed / steps})
    models[rho] = model
pd.DataFrame(rows).round(3)

# %% [markdown]
# The learned hyperparameters and the loss are in `history`:

# %%
best = models[max(models)]
fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
axes[0].plot(best.history["step"], best.history["loss"].rolling(20, min_periods=1).mean())
axes[0].set(title="-ELBO / n (rolling mean)", xlabel="step")
grid = np.stack(np.meshgrid(np.linspace(0, 1, 60), np.linspace(0, 1, 60)), -1).reshape(-1, 2)
surface = best.predict(grid)
for ax, values, title in [(axes[1], truth(grid), "truth"), (axes[2], surface["mean"], f"SICGP mean, ρ={max(models)}")]:
    im = ax.imshow(np.asarray(values).reshape(60, 60), origin="lower", extent=(0, 1, 0, 1), cmap="RdBu_r")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Classification (Bernoulli likelihood)
# The same machinery with a non-Gaussian likelihood: the expected log-likelihood is computed by
# Gauss–Hermite quadrature per point. Labels come from the sign of a latent surface.

# %%
n_c = 1_000 if SMOKE else 20_000
Xc = rng.uniform(size=(n_c, 2))
latent = 3 * np.sin(8 * Xc[:, 0]) * np.cos(6 * Xc[:, 1])
yc = (rng.uniform(size=n_c) < 1 / (1 + np.exp(-latent))).astype(float)
clf = SICGP(kernel=kernel(), rho=2.0, likelihood="bernoulli", max_neighbors=15)
clf.fit(Xc, yc, steps=60 if SMOKE else 2000, batch_size=batch, lr=0.03, seed=0)
Xc_test = rng.uniform(size=(1000, 2))
pc = clf.predict(Xc_test)
p_true = 1 / (1 + np.exp(-3 * np.sin(8 * Xc_test[:, 0]) * np.cos(6 * Xc_test[:, 1])))
# P(y=1) = E[sigmoid(f)] under the latent posterior, by the probit approximation
p_hat = 1 / (1 + np.exp(-pc["mean"] / np.sqrt(1 + np.pi * pc["var"] / 8)))
print("accuracy vs Bayes labels:", float(np.mean((p_hat > 0.5) == (p_true > 0.5))))

fig, ax = plt.subplots(figsize=(5, 4))
sc = ax.scatter(Xc_test[:, 0], Xc_test[:, 1], c=p_hat, cmap="coolwarm", s=8)
fig.colorbar(sc, ax=ax, label="P(y = 1)")
ax.set_title("SICGP classification")
plt.show()
