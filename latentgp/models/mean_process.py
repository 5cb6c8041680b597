"""Mean-process maths shared by :class:`Magma` and :class:`MagmaClust` (Leroy et al.).

Generative model: cluster mean processes mu_k ~ GP(m_k, C_k) on a union grid tau (N points), task i
(n_i points t_i, padded to n in a batch) in cluster k: y_i = mu_k(t_i) + f_i(t_i) + eps,
f_i + eps ~ N(0, Psi_i). Magma is the case K = 1.

Everything is written with the data entering through the pseudo-precision
Lambda_k = sum_i tau_ik P_i' Psi_i^-1 P_i and r_k = sum_i tau_ik P_i' Psi_i^-1 (y_i - m_k(t_i)),
so the prior covariance C_k is never inverted (a squared-exponential C on a fine grid is singular to
machine precision; the authors' R code needs jitter and C^-1 there):

    q(mu_k) = N(m_k + C alpha, C - C (I + Lambda C)^-1 Lambda C),   alpha = (I + Lambda C)^-1 r
    F_k     = sum_i tau_ik log N(y_i; m_k(t_i), Psi_i)|_(data)  + 1/2 r' C alpha - 1/2 log|I + Lambda C|

F_k is the collapsed bound max_q E_q[sum_i tau_ik log N(y_i; mu(t_i), Psi_i)] - KL(q || prior); for
K = 1 (tau = 1) it is exactly the log marginal likelihood of all tasks. I + Lambda C is similar to
I + Lambda^1/2 C Lambda^1/2, so its eigenvalues are >= 1: a well-conditioned LU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..data import DEFAULT_DTYPE, _as_float_array


@dataclass
class Tasks:
    """Long-format tasks as padded tensors. ``index`` maps each point to its row of ``union``
    (padding points map to the extra row N, dropped after scattering)."""

    ids: list
    X: torch.Tensor  # (M, n, d)
    y: torch.Tensor  # (M, n), 0 at padding
    mask: torch.Tensor  # (M, n) bool
    index: torch.Tensor  # (M, n) long
    union: torch.Tensor  # (N, d)
    columns: tuple

    @property
    def n_obs(self) -> int:
        return int(self.mask.sum())


def _columns(x, name="x"):
    cols = [x] if isinstance(x, str) else list(x)
    if not cols:
        raise ValueError(f"`{name}` must name at least one input column.")
    return cols


def read_long(df, id, x, y, *, name="df", min_points=2):
    """Validate a long-format frame; returns (ids per row, inputs (n, d), outputs (n,), columns)."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"`{name}` must be a pandas DataFrame in long format; got {type(df).__name__}.")
    cols = _columns(x)
    needed = ([id] if id is not None else []) + cols + ([y] if y is not None else [])
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"`{name}` has no column(s) {missing}; available: {list(df.columns)}. "
                         "Pass id=, x=, y= to name them.")
    if len(df) == 0:
        raise ValueError(f"`{name}` is empty.")
    ids = df[id].to_numpy() if id is not None else np.zeros(len(df), dtype=int)
    if pd.isna(ids).any():
        raise ValueError(f"`{name}`: column {id!r} has missing IDs.")
    X = _as_float_array(df[cols], f"{name}[{cols}]")
    out = _as_float_array(df[y], f"{name}[{y!r}]") if y is not None else None
    keys = pd.DataFrame(X).assign(_id=ids)
    dup = keys.duplicated()
    if dup.any():
        first = df[dup.to_numpy()].iloc[0]
        example = first[id] if id is not None else ""
        raise ValueError(f"`{name}` has {int(dup.sum())} duplicate ({id}, {cols}) rows, e.g. ID {example!r} at "
                         f"{list(first[cols])}; average them first (df.groupby([id, *x]).mean()).")
    if id is not None and min_points > 1:
        counts = pd.Series(ids).value_counts()
        few = counts[counts < min_points]
        if len(few):
            raise ValueError(f"`{name}`: task(s) {list(few.index[:5])} have fewer than {min_points} observations; "
                             "each training task needs its own curve — drop them or predict them as new tasks.")
    return ids, X, out, tuple(str(c) for c in cols)


def pad_tasks(ids, X, y, columns, dtype=DEFAULT_DTYPE) -> Tasks:
    """Group rows by ID (order of first appearance) into padded (M, n, .) tensors."""
    labels, codes = np.unique(ids, return_inverse=True)
    union, where = np.unique(X, axis=0, return_inverse=True)
    where = where.reshape(-1)
    M, N = len(labels), len(union)
    counts = np.bincount(codes, minlength=M)
    n = int(counts.max())
    order = np.argsort(codes, kind="stable")
    slot = np.arange(len(codes)) - np.repeat(np.cumsum(counts) - counts, counts)  # position within task
    rows, cols = codes[order], slot
    Xp = np.zeros((M, n, X.shape[1]))
    yp = np.zeros((M, n))
    mask = np.zeros((M, n), dtype=bool)
    index = np.full((M, n), N, dtype=np.int64)
    Xp[rows, cols] = X[order]
    if y is not None:
        yp[rows, cols] = y[order]
    mask[rows, cols] = True
    index[rows, cols] = where[order]
    # Padding inputs copy the task's first input so kernels see finite, harmless values.
    Xp = np.where(mask[..., None], Xp, Xp[:, :1])
    t = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    return Tasks(list(labels), t(Xp), t(yp), torch.as_tensor(mask), torch.as_tensor(index), t(union), columns)


def task_covariance(task_kernel, noise, X, mask):
    """Psi_i = K_theta_i(t_i, t_i) + sigma_i^2 I, identity at padding (no cross terms), (M, n, n)."""
    K = task_kernel(X).to_dense()
    K = K.expand(X.shape[0], X.shape[1], X.shape[1])
    noise = torch.as_tensor(noise, dtype=X.dtype).reshape(-1, 1)
    both = (mask.unsqueeze(-1) & mask.unsqueeze(-2)).to(X.dtype)
    K = K * both
    diag = torch.where(mask, noise.expand(mask.shape), torch.ones_like(noise).expand(mask.shape))
    return K + torch.diag_embed(diag)


def data_terms(Psi, tasks: Tasks, prior_mean, weights):
    """Per-cluster pseudo-observations of the tasks.

    prior_mean: (K,) constants m_k; weights: (M, K) responsibilities. Returns Lambda (K, N, N),
    r (K, N), data (K,) = sum_i tau_ik log N(y_i; m_k, Psi_i), loglik (K, M) the unweighted terms,
    and Psi^-1 (M, n, n) with zeros at padding.
    """
    L = torch.linalg.cholesky(Psi)
    m = tasks.mask.to(Psi.dtype)
    Pinv = torch.cholesky_inverse(L) * (m.unsqueeze(-1) * m.unsqueeze(-2))
    resid = (tasks.y.unsqueeze(0) - prior_mean.reshape(-1, 1, 1)) * m  # (K, M, n)
    z = torch.linalg.solve_triangular(L, resid.unsqueeze(-1), upper=False).squeeze(-1)
    logdet = 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # padding contributes log 1 = 0
    n_i = m.sum(-1)
    loglik = -0.5 * (z * z).sum(-1) - 0.5 * logdet - 0.5 * n_i * math.log(2 * math.pi)  # (K, M)
    data = (weights.T * loglik).sum(-1)
    N = tasks.union.shape[0]
    K_, (M, n) = prior_mean.shape[0], tasks.mask.shape
    # Scatter tau_ik Psi_i^-1 into Lambda_k at (index_i, index_i): O(M n^2), no one-hot products.
    ii = tasks.index
    rows = ii.unsqueeze(-1).expand(M, n, n)
    cols = ii.unsqueeze(-2).expand(M, n, n)
    vals = weights.T.reshape(K_, M, 1, 1) * Pinv  # (K, M, n, n)
    kk = torch.arange(K_).reshape(K_, 1, 1, 1).expand_as(vals)
    Lam = torch.zeros(K_, N + 1, N + 1, dtype=Psi.dtype).index_put(
        (kk, rows.expand_as(vals), cols.expand_as(vals)), vals, accumulate=True)[:, :N, :N]
    w = weights.T.reshape(K_, M, 1) * (Pinv @ resid.unsqueeze(-1)).squeeze(-1)  # (K, M, n)
    r = torch.zeros(K_, N + 1, dtype=Psi.dtype).index_put(
        (torch.arange(K_).reshape(K_, 1, 1).expand_as(w), ii.expand_as(w)), w, accumulate=True)[:, :N]
    return Lam, r, data, loglik, Pinv


@dataclass
class MeanPosterior:
    """q(mu_k) on the union grid, kept in factored form for predictions at new inputs."""

    C: torch.Tensor  # (K, N, N) prior covariance on the union
    Lam: torch.Tensor  # (K, N, N)
    lu: tuple  # LU factors of I + Lambda C
    alpha: torch.Tensor  # (K, N)
    logdet: torch.Tensor  # (K,) log|I + Lambda C|

    def solve(self, B):
        """(I + Lambda C)^-1 B."""
        return torch.linalg.lu_solve(*self.lu, B)

    def mean(self, prior_mean):
        return prior_mean.reshape(-1, 1) + (self.C @ self.alpha.unsqueeze(-1)).squeeze(-1)

    def cov(self):
        V = self.C - self.C @ self.solve(self.Lam @ self.C)
        return 0.5 * (V + V.mT)


def mean_posterior(C, Lam, r) -> MeanPosterior:
    """Factorise I + Lambda C (eigenvalues >= 1) and solve for alpha."""
    eye = torch.eye(C.shape[-1], dtype=C.dtype)
    A = eye + Lam @ C
    lu = torch.linalg.lu_factor(A)
    alpha = torch.linalg.lu_solve(*lu, r.unsqueeze(-1)).squeeze(-1)
    # det(I + Lambda C) = prod of its eigenvalues (all >= 1), so the LU's pivoted diagonal gives
    # log|det| directly; a separate slogdet would factorise A a second time.
    logdet = lu[0].diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)
    return MeanPosterior(C, Lam, lu, alpha, logdet)


def collapsed_bound(data, r, post: MeanPosterior):
    """F_k (K,): see the module docstring."""
    return data + 0.5 * (r * (post.C @ post.alpha.unsqueeze(-1)).squeeze(-1)).sum(-1) - 0.5 * post.logdet


def expected_loglik(post: MeanPosterior, tasks: Tasks, prior_mean, Psi, Pinv):
    """E_q(mu_k)[log N(y_i; mu_k(t_i), Psi_i)] = log N(y_i; mhat_k, Psi_i) - 1/2 tr(Psi_i^-1 Khat_k,ii), (K, M)."""
    mhat = post.mean(prior_mean)  # (K, N)
    V = post.cov()
    N = mhat.shape[-1]
    idx = tasks.index.clamp_max(N - 1)
    mi = mhat[:, idx]  # (K, M, n)
    Vi = V[:, idx.unsqueeze(-1), idx.unsqueeze(-2)]  # (K, M, n, n)
    m = tasks.mask.to(V.dtype)
    resid = (tasks.y - mi) * m
    L = torch.linalg.cholesky(Psi)
    z = torch.linalg.solve_triangular(L, resid.unsqueeze(-1), upper=False).squeeze(-1)
    logdet = 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    n_i = m.sum(-1)
    trace = (Pinv * Vi).sum((-1, -2))
    return -0.5 * (z * z).sum(-1) - 0.5 * logdet - 0.5 * n_i * math.log(2 * math.pi) - 0.5 * trace
