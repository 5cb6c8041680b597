"""Simulator for the MagmaClust generative model (Leroy et al.), long format as MagmaClustR uses.

Cluster k has a mean process mu_k ~ GP(m_k, SE(v_k, l_k)) with a linear prior mean m_k(t) = a_k t + b_k
(by default one (v, l) for all clusters);
task i picks cluster z_i uniformly and observes y_i = mu_{z_i}(t_i) + f_i(t_i) + eps_i with
f_i ~ GP(0, SE(v, l)) and eps ~ N(0, s2).

Defaults follow the authors' simulation script for the MagmaClust paper (``simu_scheme`` in the
MAGMAclust repository's ``Simulation_study.R``): grid of 201 inputs on [0, 10]; a in [-2, 2],
b in [20, 30]; cluster and task variances in [1, e^3] (their log-variance in [0, 3]); lengthscales
in [1, e]; s2 in [0, 0.1]; one set of hyperparameters for all clusters' mean processes and one for all
tasks (their setting "Hoo", ``common_hp_k = common_hp_i = T``, the one of their prediction study:
``loop_training_for_pred`` and ``res_pred_Hoo_M50.csv``); and ``common_inputs=True``:
ONE draw of ``n_points`` grid inputs shared by every task, training and new (their
``common_times = T``, the setting of the reported table). An earlier version of this module drew
b in [0, 10], task variances in [1, e] and separate inputs per task; ``intercepts=``,
``task_variance=`` and ``common_inputs=False`` still give those variants; before 2026-11-26 each
cluster drew its own (v_k, l_k) (``common_cluster_hp=False`` gives those data sets again, seed for
seed). Draws only from ``np.random.default_rng(seed)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .data import check_int

__all__ = ["MagmaSimulation", "simulate_magma", "split_observed"]


@dataclass
class MagmaSimulation:
    train: pd.DataFrame  # ID, Input, Output
    new: pd.DataFrame  # new tasks from the same clusters, full curves (split with split_observed)
    clusters: pd.Series  # true cluster per ID (training and new tasks)
    means: pd.DataFrame  # Input, cluster, mean: the cluster mean processes on the grid
    cluster_hp: np.ndarray | None = None  # (n_clusters, 2): variance, lengthscale of each cluster's mean curve
    task_hp: np.ndarray | None = None  # (training + new tasks, 3): variance, lengthscale, noise variance per task


def _se(t, variance, lengthscale):
    d = t[:, None] - t[None, :]
    return variance * np.exp(-0.5 * (d / lengthscale) ** 2)


def _draw(rng, K, size):
    """Samples N(0, K) via the eigendecomposition: an SE matrix on a fine grid is singular to machine
    precision, so Cholesky would need jitter; clipping tiny negative eigenvalues is exact enough."""
    w, V = np.linalg.eigh(K)
    return rng.standard_normal((size, len(w))) @ (V * np.sqrt(np.clip(w, 0, None))).T


def simulate_magma(n_tasks: int = 50, n_points: int = 30, n_clusters: int = 3, *, n_new: int = 0,
                   grid=None, intercepts=None, common_hp: bool = True, common_inputs: bool = True,
                   task_variance=(1.0, np.e**3), common_cluster_hp: bool = True, seed=None) -> MagmaSimulation:
    """Simulate ``n_tasks`` training and ``n_new`` new tasks with ``n_points`` observations each.

    ``grid``: candidate inputs (default 201 points on [0, 10]); ``intercepts``: the b_k of the cluster
    prior means (default uniform on [20, 30]; pass e.g. [-15, 0, 15] for well-separated clusters);
    ``common_hp``: one set of task hyperparameters for all tasks, else one per task;
    ``common_inputs``: all tasks observe the same ``n_points`` inputs, else each task draws its own;
    ``task_variance``: (low, high) of the uniform draw of the task deviations' variance;
    ``common_cluster_hp``: one (variance, lengthscale) for all clusters' mean processes, else one each.
    """
    n_tasks, n_points = check_int(n_tasks, "n_tasks", 1), check_int(n_points, "n_points", 1)
    n_clusters, n_new = check_int(n_clusters, "n_clusters", 1), check_int(n_new, "n_new")
    for name, flag in (("common_hp", common_hp), ("common_inputs", common_inputs),
                       ("common_cluster_hp", common_cluster_hp)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"`{name}` must be True or False; got {flag!r}.")
    rng = np.random.default_rng(seed)
    grid = np.linspace(0, 10, 201) if grid is None else np.sort(np.asarray(grid, dtype=float))
    if n_points > len(grid):
        raise ValueError(f"`n_points`={n_points} exceeds the {len(grid)} grid points.")
    if intercepts is None:
        intercepts = rng.uniform(20, 30, n_clusters)
    intercepts = np.asarray(intercepts, dtype=float)
    if intercepts.shape != (n_clusters,):
        raise ValueError(f"`intercepts` must have n_clusters={n_clusters} values; got {intercepts.shape}.")
    slopes = rng.uniform(-2, 2, n_clusters)
    shared_hp = (rng.uniform(1, np.e**3), rng.uniform(1, np.e)) if common_cluster_hp else None
    means, cluster_hp = [], []
    for k in range(n_clusters):  # per-cluster variant: (v_k, l_k, draw) per cluster, the earlier order
        v, ell = shared_hp if common_cluster_hp else (rng.uniform(1, np.e**3), rng.uniform(1, np.e))
        cluster_hp.append((v, ell))
        means.append(slopes[k] * grid + intercepts[k] + _draw(rng, _se(grid, v, ell), 1)[0])
    means = np.stack(means)
    total = n_tasks + n_new
    z = rng.integers(0, n_clusters, total)
    low, high = (float(v) for v in task_variance)
    if not 0 < low <= high:
        raise ValueError(f"`task_variance` must be (low, high) with 0 < low <= high; got {task_variance!r}.")
    hp = rng.uniform([low, 1, 0], [high, np.e, 0.1], size=(1 if common_hp else total, 3))
    # drawn whether used or not: the random stream of every variant stays that of earlier versions
    shared = np.sort(rng.choice(len(grid), n_points, replace=False))
    rows, ids = [], []
    for i in range(total):  # a handful of tasks, each one small eigendecomposition
        v, ell, s2 = hp[0 if common_hp else i]
        idx = shared if common_inputs else np.sort(rng.choice(len(grid), n_points, replace=False))
        t = grid[idx]
        f = _draw(rng, _se(t, v, ell), 1)[0]
        y = means[z[i], idx] + f + rng.normal(0, np.sqrt(s2), n_points)
        rows.append(pd.DataFrame({"ID": f"ID{i}", "Input": t, "Output": y}))
        ids.append(f"ID{i}")
    frame = pd.concat(rows, ignore_index=True)
    is_new = frame["ID"].isin(ids[n_tasks:])
    mean_frame = pd.DataFrame({"Input": np.tile(grid, n_clusters),
                               "cluster": np.repeat(np.arange(n_clusters), len(grid)), "mean": means.reshape(-1)})
    return MagmaSimulation(frame[~is_new].reset_index(drop=True), frame[is_new].reset_index(drop=True),
                           pd.Series(z, index=pd.Index(ids, name="ID"), name="cluster"), mean_frame,
                           np.array(cluster_hp), np.broadcast_to(hp, (total, 3)).copy())


def split_observed(new: pd.DataFrame, n_observed: int = 20, *, id: str = "ID", x: str = "Input"):
    """Split each new task into its first ``n_observed`` points (observed) and the rest (to predict)."""
    n_observed = check_int(n_observed, "n_observed", 1)
    ranked = new.sort_values([id, x]).groupby(id).cumcount()
    observed = ranked < n_observed
    observed = observed.reindex(new.index).to_numpy()
    return new[observed].reset_index(drop=True), new[~observed].reset_index(drop=True)
