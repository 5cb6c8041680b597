"""Predictions for new tasks of Magma / MagmaClust, batched over the new tasks.

New task j observes y_j at t_j and is predicted at s_j; G_j = [t_j, s_j]. In cluster k
(Magma: K = 1) its latent curve is g_j = mu_k + f_j with mu_k ~ q(mu_k), the trained hyper-posterior
(mean mhat_k, covariance Chat_k), and f_j + eps ~ N(0, Psi_j). Hence, exactly:

    p(y_j | z_jk = 1) = N(y_j; mhat_k(t_j), Chat_k(t_j) + Psi_j)
    tau*_jk           ∝ pi_k p(y_j | z_jk = 1)
    g_j(s_j) | y_j, k = Gaussian conditioning of N(mhat_k(G_j), Chat_k(G_j) + K_j(G_j)) on y_j,

and the prediction is the mixture over k weighted by tau*_jk. These tau* are those of the code behind
the paper's tables (MAGMAclust ``update_tau_star_k_EM``); MagmaClustR's ``update_mixture`` uses
instead E_q[log N(y_j; mu_k, Psi_j)] = log N(y_j; mhat_k, Psi_j) - tr(Psi_j^-1 Chat_k) / 2, a lower
bound on log p(y_j | z_jk = 1). Task hyperparameters (kernel + noise) of a new task are either the
shared ones or fitted to the task's own points by maximising its evidence
log sum_k pi_k p(y_j | z_jk = 1); the paper code's ``train_new_gp_EM`` climbs the same objective by
EM (E-step tau*, M-step sum_k tau*_k log p(y_j | z_jk = 1)); here it is maximised directly.

The new tasks are padded to a common number of points: padding rows of the observed block are
identity rows (no cross terms, residual 0: they add log 1 = 0 and change no conditional), padding
targets are dropped. q(mu_k) is evaluated only at each task's own G_j (a (K, g, g) block per task),
never on the union of all new inputs, and it does not depend on the task hyperparameters, so it is
computed once before they are fitted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .mean_process import MeanPosterior

# Elements per (K, N, tasks x g) cross-covariance with the training inputs (8 bytes each in float64):
# chunks of new tasks are sized so that it and its solve stay near 128 MB each.
BUDGET = 2**24
# Tasks whose hyperparameters are fitted in one L-BFGS run. Their objectives are independent, but one run
# shares its step length and curvature memory among them: measured, a task with 5 points in a run of 20
# stopped with its noise on the floor, 0.4 nats short of its own optimum, and its forecast moved by 1.3
# (the task's outputs have sd ~4). So each task gets its own run: a task's answer never depends on the
# other tasks it is predicted with.
FIT_GROUP = 1


def chunk_size(n_clusters: int, n_union: int, g: int, n: int) -> int:
    """New tasks per batch: keeps the (K, N, tasks x g) cross-covariances and the (tasks, K, n, g)
    blocks within :data:`BUDGET` elements."""
    return max(1, BUDGET // (n_clusters * g * (n_union + n)))


def pad_rows(codes: np.ndarray, n_tasks: int, values: np.ndarray, fill: np.ndarray):
    """Group rows by task code (row order kept within a task) into (n_tasks, L, ...) arrays.

    ``fill`` (n_tasks, ...) is written at padding positions. Returns (padded, mask, slots):
    row r of ``values`` sits at padded[codes[r], slots[r]].
    """
    counts = np.bincount(codes, minlength=n_tasks)
    L = max(int(counts.max()) if len(codes) else 0, 1)
    order = np.argsort(codes, kind="stable")
    slot_sorted = np.arange(len(codes)) - np.repeat(np.cumsum(counts) - counts, counts)
    slots = np.empty_like(codes)
    slots[order] = slot_sorted
    padded = np.repeat(fill[:, None], L, axis=1).astype(float)
    mask = np.zeros((n_tasks, L), dtype=bool)
    padded[codes, slots] = values
    mask[codes, slots] = True
    return padded, mask, slots


@dataclass
class NewTasks:
    """Padded new tasks: inputs G = [observed (n) | targets (s)], outputs and masks."""

    G: torch.Tensor  # (M, n + s, d)
    y: torch.Tensor  # (M, n), 0 at padding
    obs: torch.Tensor  # (M, n) bool

    @property
    def n(self) -> int:
        return self.y.shape[1]

    def __getitem__(self, sl):
        return NewTasks(self.G[sl], self.y[sl], self.obs[sl])


class Blocks(NamedTuple):
    """Covariance blocks of a task's [observed (n) | targets (s)] inputs: observed x observed (..., n, n),
    observed x targets (..., n, s) and the targets' variances (..., s); the last two None without targets.
    The targets x targets block is never formed: a prediction grid can be long."""

    oo: torch.Tensor
    os: torch.Tensor | None
    ss: torch.Tensor | None


def kernel_blocks(kernel, G, n: int, targets: bool = True) -> Blocks:
    """:class:`Blocks` of a gpytorch ``kernel`` on padded inputs G (..., n + s, d)."""
    Go, Gs = G[..., :n, :], G[..., n:, :]
    oo = kernel(Go).to_dense()
    if not targets:
        return Blocks(oo, None, None)
    return Blocks(oo, kernel(Go, Gs).to_dense(), kernel(Gs, diag=True))


def mean_at(post: MeanPosterior, mean_kernel, union, prior_mean, G, n: int):
    """q(mu_k) at each task's own inputs G (M, n + s, d): mean (M, K, n + s) and :class:`Blocks` (M, K, ...).

    When every task has the same targets (one prediction grid for all), their columns are solved once, not
    once per task: the solve is the cost (K x union x columns)."""
    M, g, d = G.shape
    K, N, s = prior_mean.shape[0], union.shape[0], g - n
    shared = s > 0 and M > 1 and bool((G[:, n:] == G[:1, n:]).all())
    targets = G[:1, n:] if shared else G[:, n:]  # (1 or M, s, d)
    Mt = targets.shape[0]
    C = mean_kernel(union, torch.cat((G[:, :n].reshape(M * n, d), targets.reshape(Mt * s, d)))).to_dense()
    C = C.expand(K, *C.shape[-2:])
    mean = prior_mean.reshape(K, 1) + (C.mT @ post.alpha.unsqueeze(-1)).squeeze(-1)
    W = post.solve(post.Lam @ C)
    Co, Wo = C[..., : M * n].reshape(K, N, M, n), W[..., : M * n].reshape(K, N, M, n)
    Cs, Ws = C[..., M * n :].reshape(K, N, Mt, s), W[..., M * n :].reshape(K, N, Mt, s)
    prior = kernel_blocks(mean_kernel, G.unsqueeze(-3), n)  # (M, K or 1, ...): each task's own blocks
    oo = prior.oo - torch.einsum("knmg,knmh->mkgh", Co, Wo)
    if shared:
        os = prior.os - torch.einsum("knmg,knh->mkgh", Co, Ws[:, :, 0])
        ss = prior.ss - torch.einsum("knh,knh->kh", Cs[:, :, 0], Ws[:, :, 0])
    else:
        os = prior.os - torch.einsum("knmg,knmh->mkgh", Co, Ws)
        ss = prior.ss - torch.einsum("knmg,knmg->mkg", Cs, Ws)
    mean = torch.cat((mean[:, : M * n].reshape(K, M, n), mean[:, M * n :].reshape(K, Mt, s).expand(K, M, s)), -1)
    return mean.transpose(0, 1), Blocks(0.5 * (oo + oo.mT), os, ss.expand(M, K, s))


def evidence(tasks: NewTasks, mean, V: Blocks, task_cov: Blocks, noise, log_pi):
    """Per task and cluster: log pi_k + log p(y_j | z_jk = 1) (M, K), and (when the blocks hold the targets)
    the conditional means and variances at the targets (M, K, s), else None, None.

    ``V``: q(mu_k)'s blocks (M, K, ...), ``task_cov``: the task kernel's (M, ...) (see :func:`kernel_blocks`);
    ``noise`` is a scalar or (M,)."""
    n = tasks.n
    m = tasks.obs.to(mean.dtype)
    both = (m.unsqueeze(-1) * m.unsqueeze(-2)).unsqueeze(1)  # (M, 1, n, n)
    noise = torch.as_tensor(noise, dtype=mean.dtype).reshape(-1, 1)
    diag = torch.where(tasks.obs, noise.expand(tasks.obs.shape), torch.ones_like(m)).unsqueeze(1)
    Soo = (V.oo + task_cov.oo[:, None]) * both + torch.diag_embed(diag)
    L = torch.linalg.cholesky(Soo)
    resid = ((tasks.y.unsqueeze(1) - mean[..., :n]) * m.unsqueeze(1)).unsqueeze(-1)
    z = torch.linalg.solve_triangular(L, resid, upper=False)
    logev = (-0.5 * (z * z).sum((-1, -2)) - L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
             - 0.5 * m.sum(-1, keepdim=True) * math.log(2 * math.pi))
    logpost = logev + log_pi
    if V.os is None:
        return logpost, None, None
    Sos = (V.os + task_cov.os[:, None]) * m[:, None, :, None]
    W = torch.linalg.solve_triangular(L, Sos, upper=False)  # (M, K, n, s)
    cmean = mean[..., n:] + (W.mT @ z).squeeze(-1)
    cvar = V.ss + task_cov.ss[:, None] - (W * W).sum(-2)
    return logpost, cmean, cvar.clamp_min(0.0)


def mixture(logpost, cmean, cvar):
    """Cluster probabilities (M, K) and the mixture's mean and variance at the targets (M, s)."""
    p = torch.softmax(logpost, -1)
    mean = (p.unsqueeze(-1) * cmean).sum(1)
    var = (p.unsqueeze(-1) * (cvar + cmean**2)).sum(1) - mean**2
    return p, mean, var.clamp_min(0.0)


def hyper_table(kernel, noise, M: int) -> torch.Tensor:
    """(M, 3): output scale, lengthscale (mean over input dimensions) and noise per new task; NaN where
    the kernel has no such parameter. Shared values are repeated."""
    scale = getattr(kernel, "outputscale", None)
    ls = getattr(getattr(kernel, "base_kernel", None), "lengthscale", None)
    cols = [torch.full((M,), float("nan")) if scale is None else scale.detach().reshape(-1).expand(M),
            torch.full((M,), float("nan")) if ls is None else ls.detach().reshape(-1, ls.shape[-1]).mean(-1).expand(M),
            torch.as_tensor(noise).detach().reshape(-1).expand(M)]
    return torch.stack([c.to(torch.float64) for c in cols], -1)
