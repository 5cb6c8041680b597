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
# # Many short curves: Magma and MagmaClust
#
# Longitudinal data — growth curves, repeated measures, sensors — come as many *tasks* (children,
# patients, devices), each observed a few times at its own inputs. Fitting one GP per child throws
# away what the other children say; `latentgp.Magma` learns a shared **mean process** from all of
# them (its posterior is exact, on the union of every child's ages), and `latentgp.MagmaClust` learns
# **K cluster mean processes** and each child's cluster probabilities (Leroy et al.). A new child is
# then forecast from its first few visits.
#
# Data are in long format with the column names of the R package MagmaClustR (`ID`, `Input`,
# `Output`); any names work through `fit(df, id=..., x=..., y=...)`.
#
# The data below are *simulated* growth-like curves (no real cohort ships with latentgp yet):
# weight against age for three growth patterns, each child with its own smooth deviation and
# irregular visit ages.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from latentgp.models.exact import GPRegressor
from latentgp.models.magma import Magma
from latentgp.models.magmaclust import select_n_clusters

SMOKE = os.environ.get("LATENTGP_SMOKE") == "1"
plt.rcParams.update({"figure.figsize": (11, 4.5), "figure.dpi": 110})

# %% [markdown]
# ## Simulated growth curves
# Three patterns (slow, average, fast growth: logistic-like curves of weight in kg against age in
# years); each child adds a smooth random deviation (a squared-exponential GP) and measurement noise,
# and is weighed at 6–12 random ages.

# %%
rng = np.random.default_rng(1)
patterns = {0: (14.0, 0.35), 1: (22.0, 0.45), 2: (32.0, 0.55)}  # adult-ish plateau, growth rate


def child_curve(ages, pattern, rng):
    top, rate = patterns[pattern]
    base = 3.5 + (top - 3.5) * (1 - np.exp(-rate * ages))
    d = ages[:, None] - ages[None, :]
    dev = rng.multivariate_normal(np.zeros(len(ages)), 1.5 * np.exp(-0.5 * (d / 2.5) ** 2) + 1e-9 * np.eye(len(ages)))
    return base + dev + rng.normal(0, 0.3, len(ages))


n_children = 24 if SMOKE else 60
rows = []
truth = {}
for i in range(n_children):
    g = i % 3
    ages = np.sort(rng.choice(np.round(np.arange(0, 10.01, 0.25), 2), rng.integers(6, 13), replace=False))
    rows.append(pd.DataFrame({"ID": f"child{i:02d}", "Age": ages, "Weight": child_curve(ages, g, rng)}))
    truth[f"child{i:02d}"] = g
df = pd.concat(rows, ignore_index=True)
df.head()

# %%
fig, ax = plt.subplots()
for cid, d in df.groupby("ID"):
    ax.plot(d["Age"], d["Weight"], "-o", ms=2, lw=0.8, color=f"C{truth[cid]}", alpha=0.6)
ax.set_xlabel("Age (years)")
ax.set_ylabel("Weight (kg)")
ax.set_title("Training children (colour: true growth pattern, unknown to the models)")
plt.show()

# %% [markdown]
# ## How many clusters?
# `select_n_clusters` fits one MagmaClust per candidate K and keeps the best variational BIC (ELBO
# minus half the number of hyperparameters times log(number of observations)).

# %%
candidates = [2, 3] if SMOKE else [1, 2, 3, 4, 5]
steps = 4 if SMOKE else 20
clust, table = select_n_clusters(df, candidates, id="ID", x="Age", y="Weight", steps=steps, progress=False, seed=0)
table.round(2)

# %%
cl = clust.clusters()
cl["true pattern"] = [truth[c] for c in cl.index]
pd.crosstab(cl["true pattern"], cl["cluster"])

# %% [markdown]
# ## Forecasting a new child from its first visits
# A new child (fast-growth pattern) is weighed four times before age 3; we forecast up to age 10 with
# MagmaClust (a mixture over clusters weighted by the child's posterior cluster probabilities), Magma
# (one shared mean process) and a plain GP fitted to the four points alone.

# %%
ages = np.round(np.arange(0, 10.01, 0.25), 2)
full = pd.DataFrame({"ID": "new", "Age": ages, "Weight": child_curve(ages, 2, rng)})
observed = full[full["Age"].isin([0.5, 1.0, 2.0, 2.75])]
grid = pd.DataFrame({"Age": np.linspace(0, 10, 101)})

magma = Magma().fit(df, id="ID", x="Age", y="Weight", steps=steps, progress=False)
p_clust = clust.predict(observed, grid)
p_magma = magma.predict(observed, grid)
gp = GPRegressor().fit(observed[["Age"]], observed["Weight"], steps=5 if SMOKE else 50, progress=False)
p_gp = gp.predict(grid)
p_clust.attrs["clusters"].round(3)

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
clust.plot_prediction(p_clust, observed, ax=axes[0], color="C2")
magma.plot_prediction(p_magma, observed, ax=axes[1], color="C0")
axes[2].plot(p_gp["Age"], p_gp["mean"], color="C3")
axes[2].fill_between(p_gp["Age"], p_gp["lower"], p_gp["upper"], color="C3", alpha=0.2)
axes[2].plot(observed["Age"], observed["Weight"], "ko", ms=4)
for ax, title in zip(axes, ["MagmaClust", "Magma", "GP on the 4 points"], strict=True):
    ax.plot(full["Age"], full["Weight"], "k:", lw=1, label="truth (unseen)")
    ax.set_title(title)
axes[0].legend()
plt.show()

# %%
future = full[full["Age"] > 3]
for name, model in [("MagmaClust", clust), ("Magma", magma)]:
    p = model.predict(observed, future[["Age"]], include_noise=True)
    mse = np.mean((p["mean"] - future["Weight"].to_numpy()) ** 2)
    print(f"{name:>10}: forecast MSE after age 3 = {mse:.2f}")
p = gp.predict(future[["Age"]], include_noise=True)
print(f"{'GP':>10}: forecast MSE after age 3 = {np.mean((p['mean'] - future['Weight'].to_numpy()) ** 2):.2f}")

# %% [markdown]
# ## The learned mean processes
# `mean_process(x)` gives each cluster's posterior mean process (mean and band); `history` records
# the negative ELBO per observation and the hyperparameters at every EM iteration.

# %%
mp = clust.mean_process(grid)
fig, ax = plt.subplots()
for k, d in mp.groupby("cluster"):
    ax.plot(d["Age"], d["mean"], color=f"C{k + 4}", label=f"cluster {k}")
    ax.fill_between(d["Age"], d["lower"], d["upper"], color=f"C{k + 4}", alpha=0.2)
ax.set_xlabel("Age (years)")
ax.set_ylabel("Weight (kg)")
ax.legend()
plt.show()
clust.history.tail(3)
