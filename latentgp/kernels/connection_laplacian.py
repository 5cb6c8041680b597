"""Spectral kernel on a point cloud: K = Phi diag(S(lambda)) Phi^T (RVGP).

Phi (N, m) and lambda (m,) are the smallest eigenpairs of the connection Laplacian (vector fields,
N = n d stacked tangent coordinates) or of the graph Laplacian (scalar fields, N = n). Inputs are
*row indices* into Phi, given as a float tensor (..., k, 1) holding integers: row i d + a is
tangent coordinate a of point i (:func:`tangent_indices` builds them).

Spectral filter, with kappa = ``lengthscale`` and d = manifold dimension:

* ``nu=None`` (heat / diffusion):  s_k = exp(-kappa^2 lambda_k / 2)
* ``nu > 0`` (Matérn):              s_k = (2 nu / kappa^2 + lambda_k)^-(nu + d/2)

normalised so that the mean prior variance over the N rows is ``variance``:
S_k = variance * N s_k / sum_k s_k (Phi has orthonormal columns, so trace K = sum_k S_k).
Without this, kappa and the amplitude would be strongly entangled.

The covariance is returned as a low-rank ``linear_operator`` (``LowRankRootLinearOperator`` for
K(X, X), ``MatmulLinearOperator`` for K(X, Z)); nothing n x n is formed unless asked for.
"""
from __future__ import annotations

import math

import gpytorch
import numpy as np
import torch
from gpytorch.constraints import Positive
from linear_operator.operators import LowRankRootLinearOperator, MatmulLinearOperator

__all__ = ["ConnectionLaplacianKernel", "tangent_indices"]


def tangent_indices(points_idx, dim: int, dtype=torch.float64) -> torch.Tensor:
    """Kernel inputs (k d, 1) for all tangent coordinates of the points ``points_idx``."""
    idx = torch.as_tensor(np.asarray(points_idx), dtype=torch.long)
    rows = (idx[:, None] * dim + torch.arange(dim)).reshape(-1, 1)
    return rows.to(dtype)


class ConnectionLaplacianKernel(gpytorch.kernels.Kernel):
    """Low-rank spectral kernel on the tangent bundle (or the vertices) of a point cloud.

    Parameters
    ----------
    points : (n, D) array or :class:`~latentgp.linalg.connection_laplacian.ConnectionLaplacian`, optional
        The point cloud (its connection Laplacian is computed with ``n_neighbors``/``dim``), or an
        already computed geometry. Omit when passing ``eigenpairs``.
    num_eigenpairs : int
        Number m of eigenpairs kept (the rank of K).
    nu : float or None
        Matérn smoothness; ``None`` is the heat (diffusion) kernel.
    lengthscale, variance : float, optional
        Initial values (both learnable, positive). Default lengthscale: s_m / s_1 = 1e-3 for the heat filter.
    eigenpairs : (eigenvalues (m,), eigenvectors (N, m)), optional
        Use these instead of computing them from ``points``; ``dim`` is then required.
    field : {"vector", "scalar"}
        Connection Laplacian (tangent vector fields) or graph Laplacian (scalar fields).
    """

    has_lengthscale = True

    def __init__(self, points=None, num_eigenpairs: int = 50, nu: float | None = None, lengthscale=None,
                 variance: float = 1.0, *, eigenpairs=None, field: str = "vector", n_neighbors: int = 10,
                 dim: int | None = None, dtype=torch.float64, **kwargs):
        super().__init__(**kwargs)
        if field not in ("vector", "scalar"):
            raise ValueError(f"`field` must be 'vector' or 'scalar'; got {field!r}.")
        if nu is not None and not (isinstance(nu, (int, float)) and math.isfinite(nu) and nu > 0):
            raise ValueError(f"`nu` must be a positive finite number or None (heat kernel); got {nu!r}.")
        if (points is None) == (eigenpairs is None):
            raise TypeError("Give exactly one of `points` (or a ConnectionLaplacian) and `eigenpairs`.")
        if eigenpairs is None:
            from ..linalg.connection_laplacian import ConnectionLaplacian, connection_laplacian

            geo = points if isinstance(points, ConnectionLaplacian) else connection_laplacian(
                points, n_neighbors, dim, num_eigenpairs=None)
            vals, vecs = geo.eigenpairs(num_eigenpairs, field)
            dim = geo.dim
        else:
            vals, vecs = eigenpairs
            if dim is None:
                raise TypeError("`dim` (the manifold dimension) is required with `eigenpairs`.")
        vals = torch.as_tensor(np.asarray(vals), dtype=dtype)
        vecs = torch.as_tensor(np.asarray(vecs), dtype=dtype)
        if vals.ndim != 1 or vecs.ndim != 2 or vecs.shape[1] != vals.shape[0]:
            raise ValueError(f"`eigenpairs` must be (m,) eigenvalues and (N, m) eigenvectors; got "
                             f"{tuple(vals.shape)} and {tuple(vecs.shape)}.")
        self.nu = None if nu is None else float(nu)
        self.dim = int(dim)
        self.field = field
        self.register_buffer("eigenvalues", vals.clamp_min(0.0))
        self.register_buffer("eigenvectors", vecs)
        self.register_parameter("raw_variance", torch.nn.Parameter(torch.zeros((), dtype=dtype)))
        self.register_constraint("raw_variance", Positive())
        self.to(dtype)
        self.variance = torch.as_tensor(float(variance), dtype=dtype)
        if lengthscale is None:
            spread = float(vals[-1] - vals[0]) if len(vals) > 1 else float(vals[0]) or 1.0
            lengthscale = math.sqrt(2 * math.log(1e3) / max(spread, 1e-12))
        self.lengthscale = torch.as_tensor(float(lengthscale), dtype=dtype)

    @property
    def variance(self) -> torch.Tensor:
        return self.raw_variance_constraint.transform(self.raw_variance)

    @variance.setter
    def variance(self, value):
        value = torch.as_tensor(value, dtype=self.raw_variance.dtype)
        self.initialize(raw_variance=self.raw_variance_constraint.inverse_transform(value))

    def log_filter(self) -> torch.Tensor:
        """log s_k before normalisation (m,)."""
        kappa = self.lengthscale.reshape(())
        if self.nu is None:
            return -0.5 * kappa**2 * self.eigenvalues
        return -(self.nu + self.dim / 2) * torch.log(2 * self.nu / kappa**2 + self.eigenvalues)

    def spectrum(self) -> torch.Tensor:
        """S_k (m,): prior variance of the coefficient of eigenvector k."""
        log_s = self.log_filter()
        N = self.eigenvectors.shape[0]
        return self.variance * N * torch.exp(log_s - torch.logsumexp(log_s, 0))

    def _rows(self, x):
        idx = x[..., 0].round().long()
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.eigenvectors.shape[0]):
            raise ValueError(f"kernel inputs must be row indices in [0, {self.eigenvectors.shape[0] - 1}].")
        return self.eigenvectors[idx]

    def forward(self, x1, x2, diag: bool = False, last_dim_is_batch: bool = False, **params):
        if last_dim_is_batch:
            raise NotImplementedError("ConnectionLaplacianKernel inputs are indices; last_dim_is_batch is unsupported.")
        S = self.spectrum()
        P1 = self._rows(x1)
        if diag:
            return (P1 * P1 * S).sum(-1)
        if x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2)):
            return LowRankRootLinearOperator(P1 * S.sqrt())
        return MatmulLinearOperator(P1 * S, self._rows(x2).transpose(-1, -2))
