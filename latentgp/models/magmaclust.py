"""MagmaClust: K cluster mean processes, variational EM with cluster responsibilities (Leroy et al.).

q(Z, mu_1..K) = prod_i Mult(z_i; tau_i) prod_k q(mu_k). Per EM iteration:
  M-step  hyperparameters (and q(mu_k), in closed form inside the collapsed bound) by L-BFGS;
  E-step  tau_ik ∝ pi_k exp(E_q[log N(y_i; mu_k(t_i), Psi_i)]), then pi_k = mean_i tau_ik.
ELBO = sum_k F_k + sum_ik tau_ik log(pi_k / tau_ik); every step increases it. A new task's cluster
probabilities come from its few observations, tau*_k ∝ pi_k N(y*; mhat_k(t*), Khat_k + Psi*).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from ..data import DEFAULT_DTYPE, check_int
from ..io import register_model
from . import mean_process as mp
from .magma import Magma


def _curve_features(tasks: mp.Tasks, n_grid: int = 20) -> np.ndarray:
    """Features for the k-means start: each task's curve linearly interpolated on a common grid (1-D
    inputs), or the mean and spread of its outputs (several input columns)."""
    X, y, mask = tasks.X.numpy(), tasks.y.numpy(), tasks.mask.numpy()
    if X.shape[-1] > 1:
        return np.stack([np.array([y[i, mask[i]].mean(), y[i, mask[i]].std()]) for i in range(len(y))])
    grid = np.linspace(X[..., 0][mask].min(), X[..., 0][mask].max(), n_grid)
    rows = []
    for i in range(len(y)):  # once per fit, M small interpolations: not a hot path
        t, v = X[i, mask[i], 0], y[i, mask[i]]
        order = np.argsort(t)
        rows.append(np.interp(grid, t[order], v[order]))
    return np.stack(rows)


@register_model
class MagmaClust(Magma):
    """Cluster-specific mean processes with mixture predictions.

    Parameters
    ----------
    n_clusters : int
        Number of clusters K (choose it with :func:`select_n_clusters`).
    kernel : gpytorch Kernel, optional
        Covariance of the mean processes. Default: one ``ScaleKernel(RBFKernel())`` per cluster (batched);
        a kernel given here is shared by all clusters.
    common_cluster_hp : bool
        With the default kernel: one set of mean-process hyperparameters for all clusters (MagmaClustR's
        ``common_hp_k`` / ``shared_hp_k`` = TRUE, its default, and the authors' simulation setting "Hoo")
        instead of one per cluster (our default: it also fits data whose clusters differ in smoothness; on the
        authors' Hoo simulation the two give the same accuracy, BENCHMARKS.md).
    task_kernel, common_hp, prior_mean : as in :class:`Magma`.
    """

    def __init__(self, n_clusters: int = 3, kernel=None, task_kernel=None, common_hp: bool = True,
                 prior_mean: float | None = None, common_cluster_hp: bool = False, dtype=DEFAULT_DTYPE):
        self._n_clusters = check_int(n_clusters, "n_clusters", 1)
        if not isinstance(common_cluster_hp, bool):
            raise TypeError(f"`common_cluster_hp` must be True or False; got {common_cluster_hp!r}.")
        self._common_cluster_hp = common_cluster_hp
        super().__init__(kernel=kernel, task_kernel=task_kernel, common_hp=common_hp, prior_mean=prior_mean,
                         dtype=dtype)

    @property
    def n_clusters(self) -> int:
        return self._n_clusters

    def _read(self, df, id, x, y):
        tasks = super()._read(df, id, x, y)
        if len(tasks.ids) < self._n_clusters:
            raise ValueError(f"`df` has {len(tasks.ids)} tasks, fewer than n_clusters={self._n_clusters}.")
        return tasks

    def _init_weights(self, tasks, seed):
        """Soft k-means start (0.9 on the k-means cluster), as the authors start from k-means."""
        from sklearn.cluster import KMeans

        K = self._n_clusters
        if K == 1:
            return torch.ones(len(tasks.ids), 1, dtype=self.dtype)
        labels = KMeans(K, n_init=10, random_state=0 if seed is None else seed).fit_predict(_curve_features(tasks))
        tau = np.full((len(labels), K), 0.1 / (K - 1))
        tau[np.arange(len(labels)), labels] = 0.9
        return torch.as_tensor(tau, dtype=self.dtype)

    def _update_weights(self, tasks, post, Psi, Pinv):
        ell = mp.expected_loglik(post, tasks, self._pm(), Psi, Pinv)  # (K, M)
        logp = ell.T + torch.as_tensor(np.log(np.clip(self.pi_, 1e-300, None)), dtype=self.dtype)
        self.tau_ = torch.softmax(logp, -1)
        self.pi_ = self.tau_.mean(0).numpy()

    def clusters(self) -> pd.DataFrame:
        """DataFrame indexed by task ID: ``cluster`` (most probable) and ``prob_k`` per cluster."""
        self._require_fitted("clusters()")
        tasks, names = self._train
        tau = self.tau_.numpy()
        frame = pd.DataFrame(tau, index=pd.Index(tasks.ids, name=names["id"]),
                             columns=[f"prob_{k}" for k in range(tau.shape[1])])
        frame.insert(0, "cluster", tau.argmax(1))
        return frame

    def vbic(self) -> float:
        """Variational BIC: ELBO - (number of hyperparameters and weights) / 2 * log(number of observations)."""
        self._require_fitted("vbic()")
        return self.elbo_ - 0.5 * self.n_parameters() * math.log(self._train[0].n_obs)

    def _config(self):
        return {**super()._config(), "n_clusters": self._n_clusters, "common_cluster_hp": self._common_cluster_hp}

    @classmethod
    def _make(cls, cfg, kernel, task_kernel, dtype):
        return cls(n_clusters=cfg["n_clusters"], kernel=kernel, task_kernel=task_kernel, common_hp=cfg["common_hp"],
                   prior_mean=cfg["prior_mean"], common_cluster_hp=cfg.get("common_cluster_hp", False), dtype=dtype)


def select_n_clusters(df, candidates=(1, 2, 3, 4, 5), *, criterion: str = "vbic", id: str = "ID", x="Input",
                      y: str = "Output", **fit_kwargs):
    """Fit one :class:`MagmaClust` per number of clusters in ``candidates`` and keep the best by
    ``criterion`` ("vbic" or "elbo"). Extra keyword arguments go to ``MagmaClust`` (kernel, common_hp,
    common_cluster_hp, ...) or to ``fit`` (steps, seed, ...). Returns ``(best_model, table)``, table:
    n_clusters, elbo, vbic.
    """
    if criterion not in ("vbic", "elbo"):
        raise ValueError(f"`criterion` must be 'vbic' or 'elbo'; got {criterion!r}.")
    candidates = [check_int(k, "candidates", 1) for k in candidates]
    if not candidates:
        raise ValueError("`candidates` is empty.")
    ctor = {k: fit_kwargs.pop(k) for k in ("kernel", "task_kernel", "common_hp", "prior_mean", "common_cluster_hp")
            if k in fit_kwargs}
    rows, models = [], {}
    for K in candidates:
        model = MagmaClust(n_clusters=K, **ctor).fit(df, id=id, x=x, y=y, **fit_kwargs)
        models[K] = model
        rows.append({"n_clusters": K, "elbo": model.elbo(), "vbic": model.vbic()})
    table = pd.DataFrame(rows)
    best = int(table.loc[table[criterion].idxmax(), "n_clusters"])
    return models[best], table
