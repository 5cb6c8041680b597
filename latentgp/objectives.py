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
    alpha = torch.cholesky_solve(residual.unsqueeze(-1), L).squeeze(-1)
    n = residual.shape[-1]
    value = (
        -0.5 * (residual * alpha).sum(-1)
        - L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        - 0.5 * n * math.log(2 * math.pi)
    )
    return value, L, alpha, jitter
