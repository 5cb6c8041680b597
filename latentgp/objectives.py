"""Objectives as plain functions (callable and testable without a model)."""
from __future__ import annotations

import math

import torch

from .linalg.cholesky import safe_cholesky


def gaussian_log_marginal(K: torch.Tensor, residual: torch.Tensor, *, warn: bool = True):
    """log N(residual; 0, K) with the full constant, via :func:`safe_cholesky`.

    ``K`` already includes the noise. Returns ``(value, L, alpha, jitter)`` with ``alpha = K^{-1} r``
    so callers can reuse the factorisation for prediction.
    """
    L, jitter = safe_cholesky(K, warn=warn)
    # Two triangular solves with a vector right-hand side: their backward is O(n²), whereas
    # cholesky_solve's backward with respect to L forms a dense n×n product (an extra 2n³ flops).
    z = torch.linalg.solve_triangular(L, residual.unsqueeze(-1), upper=False)
    alpha = torch.linalg.solve_triangular(L.mT, z, upper=True).squeeze(-1)
    n = residual.shape[-1]
    value = (
        -0.5 * (z * z).sum((-1, -2))
        - L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        - 0.5 * n * math.log(2 * math.pi)
    )
    return value, L, alpha, jitter
