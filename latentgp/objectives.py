"""Objectives as plain functions (callable and testable without a model)."""
from __future__ import annotations

import math

import torch

from .linalg.cholesky import safe_cholesky


class _GaussianLogMarginal(torch.autograd.Function):
    """log N(r; 0, K) with the closed-form gradient dK = ½(ααᵀ − K⁻¹), dr = −α (α = K⁻¹r).

    One Cholesky forward and one triangular inverse backward: cheaper than autograd through the
    Cholesky (measured 0.6–0.7× gpytorch's exact-GP step against ~1.0× with autograd). First
    derivatives only; L and α are returned as constants for reuse in prediction.
    """

    @staticmethod
    def forward(ctx, K, residual, warn):
        L, jitter = safe_cholesky(K, warn=warn)
        z = torch.linalg.solve_triangular(L, residual.unsqueeze(-1), upper=False)
        alpha = torch.linalg.solve_triangular(L.mT, z, upper=True).squeeze(-1)
        n = residual.shape[-1]
        value = (
            -0.5 * (z * z).sum((-1, -2))
            - L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            - 0.5 * n * math.log(2 * math.pi)
        )
        jitter = torch.tensor(jitter, dtype=K.dtype)
        ctx.save_for_backward(L, alpha)
        ctx.mark_non_differentiable(L, alpha, jitter)
        return value, L, alpha, jitter

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_value, _grad_L, _grad_alpha, _grad_jitter):
        L, alpha = ctx.saved_tensors
        eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
        L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
        K_inv = L_inv.mT @ L_inv
        g = grad_value[..., None, None]
        grad_K = 0.5 * g * (alpha.unsqueeze(-1) * alpha.unsqueeze(-2) - K_inv)
        grad_r = -grad_value.unsqueeze(-1) * alpha
        return grad_K, grad_r, None


def gaussian_log_marginal(K: torch.Tensor, residual: torch.Tensor, *, warn: bool = True):
    """log N(residual; 0, K) with the full constant, via :func:`safe_cholesky`.

    ``K`` already includes the noise. Returns ``(value, L, alpha, jitter)`` with ``alpha = K^{-1} r``
    so callers can reuse the factorisation for prediction (``L`` and ``alpha`` carry no gradient).
    """
    value, L, alpha, jitter = _GaussianLogMarginal.apply(K, residual, warn)
    return value, L, alpha, float(jitter)
