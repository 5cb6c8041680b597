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
# # Continuous-indexed tensors with FunBaT
#
# `latentgp.FunctionalTucker` decomposes data indexed by *continuous* coordinates — latitude,
# longitude, time, year, month — into smooth latent functions per mode that interact through a CP or
# Tucker core (Fang et al. 2024). Each latent function is a Matérn GP in state-space form, so every
# mode costs one Kalman smoothing pass over its sorted unique coordinates; inference is conditional
# expectation propagation with the messages summed per unique coordinate (memory O(coordinates +
# entries)). Only observed entries are given, in long format, and predictions work at coordinates
# never seen in training.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

import latentgp as lgp
from latentgp.datasets import load_elnino

SMOKE = os.environ.get("LATENTGP_SMOKE") == "1"
plt.rcParams.update({"figure.figsize": (11, 4.5), "figure.dpi": 110})

# %% [markdown]
# ## Data: El Niño sea surface temperature, year × month
# 61 years × 12 months of the Niño 1+2 index (NOAA, public domain; shipped in `data/`). We hold out a
# random 20% of the entries and complete the table.

# %%
df = load_elnino()
rng = np.random.default_rng(0)
test = rng.random(len(df)) < 0.2
train, held_out = df[~test], df[test]
train.head()

# %% [markdown]
# ## Fit a rank-3 CP decomposition with functional factors
# `fit(df, y=..., modes=[...])`: one column per mode plus the value column. The model is
# value = b + CP(year, month) + noise with a learned offset b (`bias=True`, the default): subtracting the
# data mean instead would leave a constant that no rank-R CP represents exactly. `history` has the
# training RMSE per CEP sweep, the noise level, the offset and the learned lengthscales.

# %%
model = lgp.FunctionalTucker(rank=3, kind="cp")
model.fit(train, y="sst", modes=["year", "month"], sweeps=30 if SMOKE else 100, progress=False, seed=0)
model.history.tail(3)

# %%
pred = model.predict(held_out, include_noise=True)
rmse = np.sqrt(np.mean((pred["mean"].to_numpy() - held_out["sst"].to_numpy()) ** 2))
inside = np.mean((held_out["sst"].to_numpy() >= pred["lower"].to_numpy())
                 & (held_out["sst"].to_numpy() <= pred["upper"].to_numpy()))
print(f"held-out RMSE {rmse:.3f} °C (data sd {df['sst'].std():.2f}); 95% intervals cover {inside:.0%}")

# %% [markdown]
# ## The latent functions, with bands
# `factors(mode, grid)` evaluates a mode's latent functions on any grid — here between the integer
# years and months too. (As in any CP/Tucker decomposition, factors are identified only up to scale,
# sign and, for Tucker, rotation.)

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
for ax, mode, grid in ((axes[0], "year", np.linspace(1950, 2010, 400)), (axes[1], "month", np.linspace(1, 12, 200))):
    f = model.factors(mode, grid)
    for r, part in f.groupby("factor"):
        ax.plot(part[mode], part["mean"], label=f"factor {r}")
        ax.fill_between(part[mode], part["lower"], part["upper"], alpha=0.2)
    ax.set_xlabel(mode)
    ax.legend()
axes[0].set_title("year factors")
axes[1].set_title("month factors (seasonal cycle)")
plt.show()

# %% [markdown]
# ## Completing the table — and predicting between the grid points
# The model is a function of continuous coordinates: mid-month values and the held-out entries come
# from the same posterior.

# %%
years = np.linspace(1980, 2000, 240)
curve = model.predict(np.c_[years, 1 + (years * 12) % 12])  # month-of-year running through each year
fig, ax = plt.subplots()
ax.plot(curve["year"], curve["mean"], color="C0", label="FunBaT, continuous time")
ax.fill_between(curve["year"], curve["lower"], curve["upper"], color="C0", alpha=0.2)
obs = df[(df.year >= 1980) & (df.year < 2000)]
ax.plot(obs["year"] + (obs["month"] - 1) / 12, obs["sst"], ".", color="k", ms=3, label="data")
ax.set_xlabel("year")
ax.set_ylabel("SST (°C)")
ax.legend()
plt.show()

# %% [markdown]
# ## Against a discrete CP decomposition
# A plain CP decomposition treats year and month as unordered categories: a factor value per year and
# per month, fitted to the observed cells (here by alternating ridge least squares on the 61 × 12
# table with its holes). It cannot predict at a new coordinate and gives no uncertainty.
# (`benchmarks/bench_funbat.py` runs the same comparison with tensorly over several splits and adds an
# exact GP on the raw coordinates; see BENCHMARKS.md.)


# %%
def discrete_cp(table, observed, rank, sweeps=200, ridge=1e-3, seed=0):
    """Rank-`rank` factorisation A Bᵀ of the observed cells of a matrix by alternating ridge regression."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(table.shape[0], rank))
    B = rng.normal(size=(table.shape[1], rank))
    for _ in range(sweeps):
        for X, Y, T, M in ((A, B, table, observed), (B, A, table.T, observed.T)):
            for i in range(X.shape[0]):
                Yi = Y[M[i]]
                X[i] = np.linalg.solve(Yi.T @ Yi + ridge * np.eye(rank), Yi.T @ T[i, M[i]])
    return A @ B.T


years = np.sort(df["year"].unique())
table = np.zeros((len(years), 12))
observed = np.zeros_like(table, dtype=bool)
rows, cols = np.searchsorted(years, train["year"]), train["month"].to_numpy() - 1
center = train["sst"].mean()
table[rows, cols], observed[rows, cols] = train["sst"] - center, True
completed = center + discrete_cp(table, observed, rank=3)
cp_pred = completed[np.searchsorted(years, held_out["year"]), held_out["month"].to_numpy() - 1]
cp_rmse = np.sqrt(np.mean((cp_pred - held_out["sst"].to_numpy()) ** 2))
print(f"held-out RMSE: FunBaT {rmse:.3f} °C, discrete CP (rank 3) {cp_rmse:.3f} °C")

# %%
fig, ax = plt.subplots()
ax.plot(held_out["sst"], pred["mean"], "o", ms=4, label=f"FunBaT (RMSE {rmse:.2f})")
ax.plot(held_out["sst"], cp_pred, "x", ms=4, label=f"discrete CP (RMSE {cp_rmse:.2f})")
lims = [df["sst"].min(), df["sst"].max()]
ax.plot(lims, lims, color="k", lw=0.8)
ax.set_xlabel("held-out SST (°C)")
ax.set_ylabel("prediction (°C)")
ax.legend()
plt.show()

# %% [markdown]
# ## Save and load
# The file holds the configuration, sites, kernels and training data; the loaded model predicts
# identically.

# %%
model.save("funbat_elnino.pt")
same = lgp.load("funbat_elnino.pt")
assert np.allclose(same.predict(held_out)["mean"], model.predict(held_out)["mean"])
os.remove("funbat_elnino.pt")
