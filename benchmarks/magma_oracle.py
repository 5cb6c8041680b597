"""Bayes-oracle references for the Magma / MagmaClust simulation benchmark.

The oracle knows what no method can: each cluster's TRUE mean curve and the TRUE task hyperparameters
(SE variance v, lengthscale l, noise s2) of ``latentgp.simulate_magma``. Two references follow:

* forecast MSE floor: a new task's prediction is the mixture over clusters k of
  mu_k(t) + k(t, t_o) (K_oo + s2 I)^-1 (y_o - mu_k(t_o)), weighted by p(k | y_o) -- the Bayes predictor,
  the best any method can do given the observed points (a method must also estimate the mu_k from
  ~17 tasks per cluster, so it cannot quite reach this floor);
* Bayes-classifier ARI: each training task assigned to argmax_k N(y_i; mu_k(t_i), K_ii + s2 I) (equal
  priors). Where two clusters' curves are closer than the tasks' own deviations no method can separate
  them, and this ARI says how often that happens.

The true values come from the simulation itself (``MagmaSimulation.task_hp``).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import multivariate_normal


def _se(a, b, v, ell):
    return v * np.exp(-0.5 * ((a[:, None] - b[None, :]) / ell) ** 2)


def true_parameters(sim) -> tuple[float, float, float]:
    """(v, l, s2) shared by the tasks of ``sim`` (a ``simulate_magma`` run with ``common_hp=True``)."""
    hp = sim.task_hp
    if not np.all(hp == hp[0]):
        raise ValueError("the oracle assumes one (v, l, s2) for all tasks: simulate with common_hp=True")
    return tuple(float(x) for x in hp[0])


def _cluster_curve(sim, k, t):
    curve = sim.means[sim.means["cluster"] == k].set_index("Input")["mean"]
    return curve.loc[t].to_numpy()


def oracle_forecast(sim, observed: pd.DataFrame, target: pd.DataFrame, hp) -> pd.DataFrame:
    """Prediction frame (ID, Input, mean, lower, upper; noise included) of the Bayes predictor: the
    mixture over clusters (uniform prior, as the simulator draws them) of the exact GP conditionals given
    the true curves, weighted by each cluster's evidence for the observed points. It does not know a new
    task's cluster: when two curves agree on the observed inputs and part on the forecast ones, it must
    hedge too."""
    v, ell, s2 = hp
    s2 = max(s2, 1e-10)
    K = int(sim.means["cluster"].max()) + 1
    frames = []
    for tid, obs in observed.groupby("ID"):  # 20 small solves per data set: a benchmark, not a hot path
        t_o, t_s = obs["Input"].to_numpy(), target.loc[target["ID"] == tid, "Input"].to_numpy()
        A = _se(t_o, t_o, v, ell) + s2 * np.eye(len(t_o))
        B = _se(t_s, t_o, v, ell)
        var = v + s2 - np.einsum("ij,ji->i", B, np.linalg.solve(A, B.T))  # the same for every cluster
        means, logev = [], []
        for k in range(K):
            resid = obs["Output"].to_numpy() - _cluster_curve(sim, k, t_o)
            means.append(_cluster_curve(sim, k, t_s) + B @ np.linalg.solve(A, resid))
            logev.append(multivariate_normal(np.zeros(len(t_o)), A).logpdf(resid))
        w = np.exp(np.array(logev) - max(logev))
        w /= w.sum()
        means = np.array(means)
        mean = w @ means
        total = var + w @ (means - mean) ** 2
        sd = np.sqrt(np.clip(total, 0, None))
        frames.append(pd.DataFrame({"ID": tid, "Input": t_s, "mean": mean, "lower": mean - 1.96 * sd,
                                    "upper": mean + 1.96 * sd}))
    return pd.concat(frames, ignore_index=True)


def bayes_labels(sim, hp) -> pd.Series:
    """Most probable cluster of each training task given the true curves and hyperparameters."""
    v, ell, s2 = hp
    K = int(sim.means["cluster"].max()) + 1
    labels = {}
    for tid, d in sim.train.groupby("ID"):
        t = d["Input"].to_numpy()
        cov = _se(t, t, v, ell) + max(s2, 1e-10) * np.eye(len(t))
        ll = [multivariate_normal(_cluster_curve(sim, k, t), cov).logpdf(d["Output"].to_numpy()) for k in range(K)]
        labels[tid] = int(np.argmax(ll))
    return pd.Series(labels)
