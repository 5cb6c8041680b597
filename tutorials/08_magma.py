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
# # Many short curves: Magma and MagmaClust on chick growth data
#
# Longitudinal data — growth curves, repeated measures, sensors — come as many *tasks* (children,
# patients, animals, devices), each observed a few times. Fitting one GP per individual throws away
# what the others say; `Magma` learns a shared **mean process** from all of them (its posterior is
# exact, on the union of every individual's inputs), and `MagmaClust` learns **K cluster mean
# processes** and each individual's cluster probabilities (Leroy et al.). A new individual is then
# forecast from its first few observations.
#
# The data are R's classic `ChickWeight` (Crowder & Hand 1990, shipped in `data/`, see
# `data/README.md` for source and licence): 50 chicks on 4 protein diets, weighed every second day
# from birth to day 20 and on day 21. Data are in long format; the column names of the R package
# MagmaClustR (`ID`, `Input`, `Output`) are the defaults, any others work through
# `fit(df, id=..., x=..., y=...)`.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from latentgp.datasets import load_chickweight
from latentgp.models.exact import GPRegressor
from latentgp.models.magma import Magma
from latentgp.models.magmaclust import select_n_clusters

SMOKE = os.environ.get("LATENTGP_SMOKE") == "1"
plt.rcParams.update({"figure.figsize": (11, 4.5), "figure.dpi": 110})
COLS = {"id": "Chick", "x": "Time", "y": "weight"}

df = load_chickweight()
df.head()

# %% [markdown]
# ## The data
# Five chicks died or were removed before day 21 (fewer than 12 weighings): MagmaClust takes tasks
# with different numbers of points as they are. We keep eight chicks with complete records aside as
# "new" chicks to forecast; the models never see them during training.

# %%
complete = df.groupby("Chick").size().pipe(lambda s: s[s == 12].index.to_numpy())
new_ids = np.random.default_rng(0).choice(complete, 8, replace=False)
train = df[~df["Chick"].isin(new_ids)]
new = df[df["Chick"].isin(new_ids)]
if SMOKE:  # a third of the training chicks keeps the smoke run short
    train = train[train["Chick"].isin(train["Chick"].unique()[::3])]
print(f"{train['Chick'].nunique()} training chicks ({len(train)} weighings), {len(new_ids)} new chicks")

fig, axes = plt.subplots(1, 4, figsize=(13, 3.5), sharey=True)
for diet, d in train.groupby("Diet"):
    for _, c in d.groupby("Chick"):
        axes[diet - 1].plot(c["Time"], c["weight"], "-o", ms=2, lw=0.8, color=f"C{diet - 1}", alpha=0.7)
    axes[diet - 1].set_title(f"diet {diet}")
    axes[diet - 1].set_xlabel("day")
axes[0].set_ylabel("weight (g)")
plt.show()

# %% [markdown]
# ## Clustering the growth curves
# `select_n_clusters` fits one MagmaClust per candidate K and keeps the best variational BIC (ELBO
# minus half the number of hyperparameters times log(number of observations)). The clusters are
# found from the curves alone; the diets are not given to the model.

# %%
candidates = [1, 2] if SMOKE else [1, 2, 3, 4]
steps = 4 if SMOKE else 20
clust, table = select_n_clusters(train, candidates, **COLS, steps=steps, progress=False, seed=0)
table.round(1)

# %%
cl = clust.clusters()
diet = train.groupby("Chick")["Diet"].first()
pd.crosstab(diet[cl.index].rename("diet"), cl["cluster"])

# %% [markdown]
# Each cluster's posterior mean process (`mean_process`), over the training curves coloured by
# their most probable cluster:

# %%
grid = pd.DataFrame({"Time": np.linspace(0, 21, 106)})
means = clust.mean_process(grid)
fig, ax = plt.subplots()
for cid, c in train.groupby("Chick"):
    ax.plot(c["Time"], c["weight"], lw=0.6, alpha=0.4, color=f"C{cl.loc[cid, 'cluster']}")
for k, d in means.groupby("cluster"):
    ax.plot(d["Time"], d["mean"], color=f"C{k}", lw=2.5, label=f"cluster {k} mean process")
    ax.fill_between(d["Time"], d["lower"], d["upper"], color=f"C{k}", alpha=0.25)
ax.set_xlabel("day")
ax.set_ylabel("weight (g)")
ax.legend()
plt.show()

# %% [markdown]
# ## Forecasting a new chick from its first weighings
# A new chick is weighed on days 0, 2, 4 and 6; we forecast days 8–21 with MagmaClust (a mixture over
# clusters weighted by the chick's posterior cluster probabilities, computed from those four
# weighings), Magma (one shared mean process) and a plain GP fitted to the four points alone.

# %%
magma = Magma().fit(train, **COLS, steps=steps, progress=False)
early = new[new["Time"] <= 6]
later = new[new["Time"] > 6]
one = new_ids[0]
obs_one = early[early["Chick"] == one]
p_clust = clust.predict(obs_one, grid)
p_magma = magma.predict(obs_one, grid)
gp = GPRegressor().fit(obs_one[["Time"]], obs_one["weight"], steps=5 if SMOKE else 50, progress=False)
p_gp = gp.predict(grid)
print(f"chick {one}: posterior cluster probabilities")
pd.DataFrame.from_dict(p_clust.attrs["clusters"], orient="index").round(3)

# %%
truth = new[new["Chick"] == one]
fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
clust.plot_prediction(p_clust, obs_one, ax=axes[0], color="C2")
magma.plot_prediction(p_magma, obs_one, ax=axes[1], color="C0")
axes[2].plot(p_gp["Time"], p_gp["mean"], color="C3")
axes[2].fill_between(p_gp["Time"], p_gp["lower"], p_gp["upper"], color="C3", alpha=0.2)
axes[2].plot(obs_one["Time"], obs_one["weight"], "ko", ms=4)
for ax, title in zip(axes, ["MagmaClust", "Magma", "GP on the 4 weighings"], strict=True):
    ax.plot(truth["Time"], truth["weight"], "kx:", lw=1, label="later weighings (unseen)")
    ax.set_title(title)
    ax.set_xlabel("day")
axes[0].legend(loc="upper left")
plt.show()

# %% [markdown]
# All three forecasts agree on the first weighings; after day 6 the cluster mixture follows the
# chick's group, Magma follows the average chick, and the GP on four points has nothing to go on.
#
# ## All eight new chicks
# `predict` takes several new tasks at once: with the ID column in both frames each chick is
# predicted at its own later days. Scores: mean squared error of the forecast (g²) and coverage of
# the 95% predictive interval (`include_noise=True`: intervals for new weighings, not for the curve).

# %%
def score(pred):
    merged = later.merge(pred, on=["Chick", "Time"])
    err = (merged["mean"] - merged["weight"]) ** 2
    inside = merged["weight"].between(merged["lower"], merged["upper"])
    return err.groupby(merged["Chick"]).mean(), inside.mean()


targets = later[["Chick", "Time"]]
gp_frames = []
for cid, obs in early.groupby("Chick"):  # the baseline: one independent GP per new chick
    g = GPRegressor().fit(obs[["Time"]], obs["weight"], steps=5 if SMOKE else 50, progress=False)
    gp_frames.append(g.predict(targets[targets["Chick"] == cid][["Time"]], include_noise=True).assign(Chick=cid))
rows = []
for name, pred in [("MagmaClust", clust.predict(early, targets, include_noise=True)),
                   ("Magma", magma.predict(early, targets, include_noise=True)),
                   ("GP per chick", pd.concat(gp_frames, ignore_index=True))]:
    mse, cover = score(pred)
    rows.append({"method": name, "MSE mean": mse.mean(), "MSE median": mse.median(), "95% coverage": cover})
pd.DataFrame(rows).round(2)

# %% [markdown]
# Four weighings say little about where a chick's curve goes after day 6, so every forecast is
# uncertain; borrowing the other chicks' curves (Magma) narrows it a lot compared with a GP on the four
# points, and the cluster mixture (MagmaClust) helps further when the early weighings already point
# to a fast- or slow-growing group.
#
# `history` records the negative ELBO per observation and the hyperparameters at every EM iteration:

# %%
clust.history.tail(3)
