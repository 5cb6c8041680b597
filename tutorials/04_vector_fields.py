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
# # Vector fields on point clouds (RVGP)
#
# `latentgp.VectorFieldGP` is a Gaussian process over **tangent vector fields on a manifold that is
# known only through samples** (Peach et al., RVGP). From the point cloud alone it builds a kNN graph,
# tangent planes by local PCA, the rotations that align neighbouring tangent planes, and the
# **connection Laplacian**; its smoothest eigenvectors are the basis of the GP. The model then
# interpolates and denoises vector data along the surface, with uncertainty, never across gaps in
# ambient space.
#
# Part 1 interpolates a noisy field on a bumpy closed surface; part 2 reconstructs the velocity field of
# simulated latent dynamics on a torus, the kind of manifold neural population activity often lives on.
#
# Set `LATENTGP_SMOKE=1` for a small, fast version (the test suite runs it that way).

# %%
import os
import tempfile

import matplotlib.pyplot as plt
import numpy as np

import latentgp as lgp
from latentgp.linalg.connection_laplacian import connection_laplacian
from latentgp.models.vector_field import ScalarFieldGP, VectorFieldGP
from latentgp.plot_vector_field import plot_scalar_field, plot_vector_field

SMOKE = os.environ.get("LATENTGP_SMOKE") == "1"
plt.rcParams.update({"figure.dpi": 110})
rng = np.random.default_rng(0)


def rel_err(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# %% [markdown]
# ## Part 1: a field on a bumpy sphere
# Points on the surface r(u) = 1 + 0.15 Y(u) (a smooth bump pattern), and a field made of a rotation
# about the z axis plus the surface gradient of a height function -- it has sources, sinks and
# vortices. Only the tangent part of any ambient vector is meaningful on the surface.

# %%
n = 800 if SMOKE else 3000
u = rng.standard_normal((n, 3))
u /= np.linalg.norm(u, axis=1, keepdims=True)
bump = 1 + 0.15 * np.sin(3 * u[:, 0]) * np.cos(2 * u[:, 1])
points = u * bump[:, None]

# exact outward normals of r(u) u: n ∝ u - grad_S(log r) (the sphere's tangential gradient of log r)
grad_r = 0.15 * np.c_[3 * np.cos(3 * u[:, 0]) * np.cos(2 * u[:, 1]), -2 * np.sin(3 * u[:, 0]) * np.sin(2 * u[:, 1]),
                      np.zeros(n)]
grad_s = grad_r - (grad_r * u).sum(1, keepdims=True) * u
normal = u - grad_s / bump[:, None]
normal /= np.linalg.norm(normal, axis=1, keepdims=True)


def tangent(v):
    return v - (v * normal).sum(1, keepdims=True) * normal


ambient = np.cross([0.0, 0.0, 1.0], points) + 1.5 * np.c_[np.zeros(n), np.cos(2 * u[:, 1]), -u[:, 2]]
field = tangent(ambient)

observed = rng.permutation(n)[: int(0.4 * n)]
noisy = field[observed] + 0.2 * rng.standard_normal((len(observed), 3))
print(f"{n} points, {len(observed)} noisy observations")

# %% [markdown]
# ### The geometry
# `connection_laplacian` exposes everything the model uses. The estimated tangent frames should be
# orthogonal to the true normals, and the manifold dimension is estimated from local PCA.

# %%
geo = connection_laplacian(points, n_neighbors=10, num_eigenpairs=20)
tilt = np.abs(np.einsum("nDd,nD->nd", geo.frames, normal)).max(1)
print(f"estimated dimension {geo.dim}; tangent-frame tilt vs true normals: median {np.median(tilt):.1e}, "
      f"max {tilt.max():.1e}")
print("smallest connection-Laplacian eigenvalues (relative):", np.round(geo.eigenvalues / geo.eigenvalues[0], 2))

# %% [markdown]
# ### Fit and predict
# `fit(points, vectors, observed)` learns the geometry from all points and the kernel lengthscale,
# variance and noise from the observed vectors (marginal likelihood, L-BFGS; `history` records it).
# `predict()` returns the mean field at every point in ambient coordinates, `var` (posterior variance
# summed over the tangent directions) and per-component intervals.

# %%
model = VectorFieldGP(n_neighbors=10, num_eigenpairs=60 if SMOKE else 150)
model.fit(points, noisy, observed, steps=20 if SMOKE else 60, progress=False)
pred = model.predict()
mean = pred[["v0", "v1", "v2"]].to_numpy()
unseen = ~pred["observed"].to_numpy()
print(f"relative L2 error: all points {rel_err(mean, field):.3f}, "
      f"unobserved {rel_err(mean[unseen], field[unseen]):.3f}")
print(f"noisy observations themselves: {rel_err(noisy, field[observed]):.3f}")
print(f"normal component of the prediction (max |v.n| / max |v|): "
      f"{np.abs((mean * normal).sum(1)).max() / np.linalg.norm(mean, axis=1).max():.1e}")
model.history.tail(3)

# %%
fig = plt.figure(figsize=(15, 6.5))
ax1 = fig.add_subplot(1, 2, 1, projection="3d")
plot_vector_field(pred.assign(v0=field[:, 0], v1=field[:, 1], v2=field[:, 2]), ax=ax1, color=None,
                  every=1 if SMOKE else 2, title="true field")
ax2 = fig.add_subplot(1, 2, 2, projection="3d")
plot_vector_field(pred, ax=ax2, every=1 if SMOKE else 2, title="posterior mean, coloured by posterior variance")
plt.tight_layout()

# %% [markdown]
# Uncertainty is lowest where observations are dense and grows in the gaps: the variance of points we
# observed versus those we did not.

# %%
pred.groupby("observed")["var"].describe()[["mean", "50%", "max"]]

# %% [markdown]
# ### Random smooth fields
# `sample(prior=True)` draws fields from the prior: smooth at the learned lengthscale, tangent by
# construction. `sample()` draws from the posterior.

# %%
draws = model.sample(2, prior=True, seed=1)
fig = plt.figure(figsize=(15, 6.5))
for i in range(2):
    ax = fig.add_subplot(1, 2, i + 1, projection="3d")
    plot_vector_field(pred.assign(v0=draws[i, :, 0], v1=draws[i, :, 1], v2=draws[i, :, 2]), ax=ax, color=None,
                      every=1 if SMOKE else 2, title=f"prior draw {i + 1}")
plt.tight_layout()

# %% [markdown]
# ### Scalar fields on the same cloud
# `ScalarFieldGP` is the same construction with the graph Laplacian: here a "temperature" observed at
# 40% of the points.

# %%
temperature = np.sin(2 * u[:, 0]) + u[:, 2] ** 2
scalar = ScalarFieldGP(n_neighbors=10, num_eigenpairs=50 if SMOKE else 100)
scalar.fit(points, temperature[observed] + 0.1 * rng.standard_normal(len(observed)), observed,
           steps=20 if SMOKE else 50, progress=False)
spred = scalar.predict()
print(f"scalar field relative L2 error: {rel_err(spred['mean'].to_numpy(), temperature):.3f}")
fig = plt.figure(figsize=(15, 6.5))
plot_scalar_field(spred, ax=fig.add_subplot(1, 2, 1, projection="3d"), title="posterior mean")
plot_scalar_field(spred, ax=fig.add_subplot(1, 2, 2, projection="3d"), column="var", cmap="magma",
                  title="posterior variance")
plt.tight_layout()

# %% [markdown]
# ## Part 2: latent dynamics on a torus
# A common finding in systems neuroscience is population activity confined to a low-dimensional
# manifold -- a ring for head direction, a torus for grid cells. Here two coupled phase variables
# (theta, phi) follow
#
# dtheta/dt = 1 + 0.6 sin(phi),  dphi/dt = 0.5 + 0.4 cos(theta - phi),
#
# and the "neural state" is the torus ((2 + cos phi) cos theta, (2 + cos phi) sin theta, sin phi).
# We simulate many short trials, estimate velocities by finite differences (noisy, as from binned
# firing rates), keep the velocity estimates of half of the trials, and reconstruct the velocity
# field over all visited states.

# %%
def phase_velocity(th, ph):
    return 1 + 0.6 * np.sin(ph), 0.5 + 0.4 * np.cos(th - ph)


def embed(th, ph):
    return np.stack([(2 + np.cos(ph)) * np.cos(th), (2 + np.cos(ph)) * np.sin(th), np.sin(ph)], -1)


def true_velocity(th, ph):
    dth, dph = phase_velocity(th, ph)
    d_th = np.stack([-(2 + np.cos(ph)) * np.sin(th), (2 + np.cos(ph)) * np.cos(th), 0 * th], -1)
    d_ph = np.stack([-np.sin(ph) * np.cos(th), -np.sin(ph) * np.sin(th), np.cos(ph)], -1)
    return dth[..., None] * d_th + dph[..., None] * d_ph


n_trials, n_steps, dt = (150, 8, 0.25) if SMOKE else (500, 10, 0.25)
th = rng.uniform(0, 2 * np.pi, n_trials)
ph = rng.uniform(0, 2 * np.pi, n_trials)
path = []
for _ in range(n_steps + 1):  # Euler with small substeps; this is a simulator, not a hot path
    path.append((th.copy(), ph.copy()))
    for _ in range(10):
        dth, dph = phase_velocity(th, ph)
        th, ph = th + dt / 10 * dth, ph + dt / 10 * dph
TH = np.stack([p[0] for p in path], 1)
PH = np.stack([p[1] for p in path], 1)
states = embed(TH, PH) + 0.01 * rng.standard_normal((n_trials, n_steps + 1, 3))  # (trials, time, 3)
velocity_est = (states[:, 2:] - states[:, :-2]) / (2 * dt)  # central differences, interior times
cloud = states[:, 1:-1].reshape(-1, 3)
truth = true_velocity(TH[:, 1:-1], PH[:, 1:-1]).reshape(-1, 3)
trial_of = np.repeat(np.arange(n_trials), n_steps - 1)
seen = np.flatnonzero(trial_of < n_trials // 2)
print(f"{len(cloud)} states from {n_trials} trials; velocities kept for {len(seen)} states (half of the trials)")
print(f"finite-difference velocity error: {rel_err(velocity_est.reshape(-1, 3)[seen], truth[seen]):.3f}")

# %%
dyn = VectorFieldGP(n_neighbors=10, num_eigenpairs=80 if SMOKE else 200, dim=2)
dyn.fit(cloud, velocity_est.reshape(-1, 3)[seen], seen, steps=20 if SMOKE else 60, progress=False)
vel = dyn.predict()
vmean = vel[["v0", "v1", "v2"]].to_numpy()
held_out = ~vel["observed"].to_numpy()
print(f"reconstructed velocity, relative L2 error on held-out trials: {rel_err(vmean[held_out], truth[held_out]):.3f}")

# %%
fig = plt.figure(figsize=(15, 6.5))
ax1 = fig.add_subplot(1, 2, 1, projection="3d")
for k in list(range(20)) + list(range(n_trials // 2, n_trials // 2 + 20)):
    ax1.plot(*states[k].T, lw=1, color="C0" if k < n_trials // 2 else "C1")
ax1.set_box_aspect(np.ptp(cloud, 0))
ax1.set_title("trials (blue: velocities used, orange: held out)")
ax2 = fig.add_subplot(1, 2, 2, projection="3d")
plot_vector_field(vel, ax=ax2, every=1 if SMOKE else 3, title="reconstructed velocity field, coloured by variance")
plt.tight_layout()

# %% [markdown]
# The phase velocities are the coordinates of the field on the torus; reading them back from the
# reconstruction (projecting on the coordinate tangent vectors) recovers the dynamics' law.

# %%
thc, phc = TH[:, 1:-1].ravel(), PH[:, 1:-1].ravel()
d_th = np.stack([-(2 + np.cos(phc)) * np.sin(thc), (2 + np.cos(phc)) * np.cos(thc), 0 * thc], -1)
d_ph = np.stack([-np.sin(phc) * np.cos(thc), -np.sin(phc) * np.sin(thc), np.cos(phc)], -1)
est_dth = (vmean * d_th).sum(1) / (d_th**2).sum(1)
fig, ax = plt.subplots(figsize=(11, 4.5))
ax.scatter(np.mod(phc, 2 * np.pi)[held_out], est_dth[held_out], s=4, label="reconstructed (held-out trials)")
grid = np.linspace(0, 2 * np.pi, 200)
ax.plot(grid, 1 + 0.6 * np.sin(grid), color="k", label="true dtheta/dt = 1 + 0.6 sin(phi)")
ax.set_xlabel("phi")
ax.set_ylabel("dtheta/dt")
ax.legend()

# %% [markdown]
# ## Save and load
# The file holds the configuration, hyperparameters, tangent frames, eigenpairs and data, so the
# loaded model predicts identically without recomputing the geometry.

# %%
with tempfile.TemporaryDirectory() as tmp:
    dyn.save(f"{tmp}/torus.pt")
    again = lgp.load(f"{tmp}/torus.pt")
print("identical predictions after load:", np.array_equal(again.predict()[["v0", "v1", "v2"]].to_numpy(), vmean))
