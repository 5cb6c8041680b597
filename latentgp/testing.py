"""Dense references (numpy/scipy, independent of latentgp's torch code) for tests and users."""
from __future__ import annotations

import numpy as np
from scipy.linalg import cho_factor, cho_solve, solve_triangular


def dense_gp_lml(K: np.ndarray, y: np.ndarray, noise: float, mean: float = 0.0) -> float:
    """log N(y; mean, K + noise I) by a plain scipy Cholesky."""
    n = len(y)
    c, low = cho_factor(K + noise * np.eye(n), lower=True)
    r = y - mean
    return float(-0.5 * r @ cho_solve((c, low), r) - np.log(np.diag(c)).sum() - 0.5 * n * np.log(2 * np.pi))


def dense_gp_predict(K, Ks, kss, y, noise, mean=0.0):
    """Posterior mean and latent variance at test points: K (n,n), Ks (n,m), kss (m,)."""
    n = len(y)
    c, low = cho_factor(K + noise * np.eye(n), lower=True)
    mu = mean + Ks.T @ cho_solve((c, low), y - mean)
    v = solve_triangular(c, Ks, lower=True)
    return mu, kss - (v * v).sum(0)


def simulate_gp(K: np.ndarray, noise: float = 0.0, seed: int = 0, mean: float = 0.0) -> np.ndarray:
    """One draw of N(mean, K + noise I)."""
    rng = np.random.default_rng(seed)
    n = K.shape[0]
    L = np.linalg.cholesky(K + (noise + 1e-12 * np.trace(K) / n) * np.eye(n))
    return mean + L @ rng.standard_normal(n)


def relative_error(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))
