"""Kronecker-structured Gaussian algebra on Cartesian grids.

Conventions: a grid of shape (n_1, ..., n_D) is flattened in C order (last dimension fastest), which
is the order of ``K_1 ⊗ ... ⊗ K_D``. ``A = K + s I`` with ``K = ⊗ K_d`` is diagonalised by the
per-factor eigendecompositions ``K_d = Q_d diag(l_d) Q_d^T``: ``A = Q diag(l + s) Q^T`` with
``Q = ⊗ Q_d`` (applied through linear_operator's KroneckerProductLinearOperator) and
``l = ⊗ l_d``. Nothing of size n × n is ever formed.

:class:`GridLogMarginal` gives log N(r_O; 0, A_OO) for all cells or an observed subset O, with a
closed-form backward that never differentiates through ``eigh`` (eigenvalue clusters of smooth
kernels make the eigh backward 1/(l_i - l_j) blow up).
"""
from __future__ import annotations

import math

import torch
from linear_operator.operators import DenseLinearOperator, KroneckerProductLinearOperator


def kron_vectors(vectors) -> torch.Tensor:
    """Flattened outer product v_1 ⊗ ... ⊗ v_D (C order)."""
    out = vectors[0]
    for v in vectors[1:]:
        out = (out[:, None] * v[None, :]).reshape(-1)
    return out


def mode_product(T: torch.Tensor, M: torch.Tensor, mode: int) -> torch.Tensor:
    """T ×_mode M: contract axis ``mode`` of T (length n) with the columns of M (k, n)."""
    return torch.movedim(torch.tensordot(M, T, dims=([1], [mode])), 0, mode)


def contract_rows(T: torch.Tensor, mats, chunk: int = 4096) -> torch.Tensor:
    """out[p] = sum_i T[i_1..i_D] prod_d C_d[p, i_d] for C_d (m, n_d): evaluates m Kronecker-row
    inner products without forming the rows (first mode by one matmul, the rest by batched sums)."""
    m = mats[0].shape[0]
    outs = []
    for start in range(0, m, chunk):
        cs = [C[start:start + chunk] for C in mats]
        X = cs[0] @ T.reshape(T.shape[0], -1)  # (p, n_2 ... n_D)
        for d, C in enumerate(cs[1:], start=1):
            X = torch.einsum("pir,pi->pr", X.reshape(X.shape[0], T.shape[d], -1), C)
        outs.append(X.reshape(-1))
    return torch.cat(outs)


class KroneckerEig:
    """Eigendecomposition of ``⊗ K_d + noise I`` from the factors' eigendecompositions."""

    def __init__(self, factors, noise):
        self.shape = tuple(K.shape[-1] for K in factors)
        self.lams, self.Qs = [], []
        for K in factors:
            lam, Q = torch.linalg.eigh(K)
            # Factors are PSD; round-off makes the smallest eigenvalues slightly negative.
            self.lams.append(lam.clamp_min(0.0))
            self.Qs.append(Q)
        self.noise = noise
        self.lam = kron_vectors(self.lams)
        self.inv_diag = 1.0 / (self.lam + noise)
        self.Q = KroneckerProductLinearOperator(*[DenseLinearOperator(Q) for Q in self.Qs])

    def logdet(self) -> torch.Tensor:
        return torch.log(self.lam + self.noise).sum()

    def solve(self, R: torch.Tensor) -> torch.Tensor:
        """(⊗K_d + noise I)^{-1} R for R of shape (n,) or (n, k)."""
        vec = R.dim() == 1
        R = R.unsqueeze(-1) if vec else R
        out = self.Q @ (self.inv_diag.unsqueeze(-1) * (self.Q.mT @ R))
        return out.squeeze(-1) if vec else out

    def matmul_K(self, R: torch.Tensor) -> torch.Tensor:
        """(⊗K_d) R through the eigenbasis."""
        vec = R.dim() == 1
        R = R.unsqueeze(-1) if vec else R
        out = self.Q @ (self.lam.unsqueeze(-1) * (self.Q.mT @ R))
        return out.squeeze(-1) if vec else out

    def trace_weights(self, d: int) -> torch.Tensor:
        """w_d[k] = sum over cells with i_d = k of prod_{e≠d} l_e[i_e] / (l_i + noise): the gradient of
        log det(A) with respect to K_d is Q_d diag(w_d) Q_d^T."""
        T = self.inv_diag.reshape(self.shape)
        for e, lam in enumerate(self.lams):
            if e != d:
                T = mode_product(T, lam[None, :], e)
        return T.reshape(-1)


def bilinear_grads(cols: torch.Tensor, factors, shape):
    """G_d = d/dK_d of sum_c v_c^T (⊗K_e) v_c for the columns v_c of ``cols`` (n, c), all d."""
    D = len(shape)
    T = cols.T.reshape(-1, *shape)  # batch axis 0, modes 1..D
    grads = []
    for d in range(D):
        S = T
        for e in range(D):
            if e != d:
                S = mode_product(S, factors[e], e + 1)
        axes = [0] + [e + 1 for e in range(D) if e != d]
        grads.append(torch.tensordot(T, S, dims=(axes, axes)))
    return grads


class _GridLML(torch.autograd.Function):
    """log N(r_O; 0, (⊗K_d + noise I)_OO); missing cells U handled exactly through the Schur identity
    P^T A_OO^{-1} P = A^{-1} - A^{-1} E_U B^{-1} E_U^T A^{-1}, B = (A^{-1})_UU, and
    log det A_OO = log det A + log det B. Cost O(|U| n sum n_d + |U|^3)."""

    @staticmethod
    def forward(ctx, noise, residual, missing, *factors):
        eig = KroneckerEig(factors, noise)
        alpha = eig.solve(residual)
        logdet = eig.logdet()
        n_obs = residual.shape[0]
        V = None
        if missing is not None and missing.numel():
            E = torch.zeros(residual.shape[0], missing.numel(), dtype=residual.dtype)
            E[missing, torch.arange(missing.numel())] = 1.0
            W = eig.solve(E)
            B = W[missing]
            L = torch.linalg.cholesky(0.5 * (B + B.T))
            alpha = alpha - W @ torch.cholesky_solve(alpha[missing, None], L).squeeze(-1)
            alpha[missing] = 0.0
            logdet = logdet + 2 * L.diagonal().log().sum()
            V = torch.linalg.solve_triangular(L, W.T, upper=False).T  # W B^{-1} W^T = V V^T
            n_obs -= missing.numel()
        value = -0.5 * (residual * alpha).sum() - 0.5 * logdet - 0.5 * n_obs * math.log(2 * math.pi)
        ctx.eig, ctx.factors = eig, factors
        ctx.save_for_backward(alpha, V if V is not None else torch.empty(0))
        ctx.mark_non_differentiable(alpha)
        return value, alpha

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _g_alpha):
        alpha, V = ctx.saved_tensors
        eig, factors = ctx.eig, ctx.factors
        has_V = V.numel() > 0
        # d value / dA = ½ α α^T - ½ (A^{-1} - V V^T), pushed onto each Kronecker factor.
        data = bilinear_grads(alpha[:, None], factors, eig.shape)
        corr = bilinear_grads(V, factors, eig.shape) if has_V else [0.0] * len(factors)
        grads_K = []
        for d, Q in enumerate(eig.Qs):
            trace = (Q * eig.trace_weights(d)) @ Q.T
            grads_K.append(g * 0.5 * (data[d] - trace + corr[d]))
        g_noise = 0.5 * (alpha @ alpha - eig.inv_diag.sum() + ((V * V).sum() if has_V else 0.0))
        return (g * g_noise, -g * alpha, None, *grads_K)


def grid_log_marginal(factors, noise, residual, missing=None):
    """(log N(r_O; 0, A_OO), α) with α = P^T A_OO^{-1} r_O (zeros at missing cells).

    ``factors`` the (n_d, n_d) kernel matrices, ``residual`` (n,) in C order (values at missing cells
    are ignored), ``missing`` a LongTensor of flat indices or None. Differentiable in the factors,
    the noise and the residual.
    """
    if missing is not None:
        residual = residual.index_fill(0, missing, 0.0)
    return _GridLML.apply(noise, residual, missing, *factors)


def pcg(matmul, rhs: torch.Tensor, precond, *, tol: float = 1e-12, max_iter: int = 1000):
    """Preconditioned conjugate gradients for SPD systems, all columns of ``rhs`` (n, k) at once.

    Stops when every column's residual norm is below ``tol`` times its right-hand side's norm;
    raises if ``max_iter`` is reached first (never returns an unconverged solve silently).
    """
    X = torch.zeros_like(rhs)
    R = rhs.clone()
    Z = precond(R)
    P = Z.clone()
    rz = (R * Z).sum(0)
    target = tol * rhs.norm(dim=0).clamp_min(torch.finfo(rhs.dtype).tiny)
    for it in range(max_iter):
        active = R.norm(dim=0) > target
        if not bool(active.any()):
            return X, it
        AP = matmul(P)
        # Converged (or exactly zero) columns stop moving: no 0/0 NaN from a zero right-hand side.
        pAp = (P * AP).sum(0)
        step = torch.where(active & (pAp > 0), rz / torch.where(pAp > 0, pAp, 1.0), 0.0)
        X = X + step * P
        R = R - step * AP
        Z = precond(R)
        rz_new = (R * Z).sum(0)
        beta = torch.where(active & (rz > 0), rz_new / torch.where(rz > 0, rz, 1.0), 0.0)
        P = Z + beta * P
        rz = rz_new
    if bool((R.norm(dim=0) <= target).all()):
        return X, max_iter
    raise RuntimeError(f"Conjugate gradients did not reach the relative tolerance {tol:g} in {max_iter} "
                       "iterations; the system is badly conditioned (for a GP: raise the noise, or observe more "
                       "points / cells).")
