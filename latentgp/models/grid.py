"""Exact GP regression on a Cartesian grid (``GridGP``): Kronecker algebra, no n × n matrix.

With a product kernel k(x, x') = prod_d k_d(x_d, x'_d) the covariance of a full grid is K_1 ⊗ ... ⊗ K_D
and everything follows from the factors' eigendecompositions (:mod:`latentgp.linalg.kronecker`).
Missing cells (``mask``): the posterior solve is preconditioned conjugate gradients with the full-grid
Kronecker inverse as preconditioner; the log marginal likelihood (for hyperparameter learning) is
exact through a Schur complement on the missing set, which costs O(|missing| · n · sum n_d) and is
refused above ``max_missing_exact`` missing cells (fit with ``steps=0`` then: fixed hyperparameters).
"""
from __future__ import annotations

import gpytorch
import numpy as np
import pandas as pd
import torch

from ..data import DEFAULT_DTYPE, _as_float_array, as_inputs, check_int, check_positive
from ..fit import optimize, seeded
from ..io import register_model, saved_dtype
from ..linalg.kronecker import KroneckerEig, contract_rows, grid_log_marginal, pcg
from ..objectives_weighted import check_data_weight, tempered_gaussian_correction
from .base import Model, prediction_frame


def check_grid(grid, dtype=DEFAULT_DTYPE):
    """List of strictly increasing, finite 1-D coordinate tensors (one per dimension)."""
    if isinstance(grid, (np.ndarray, torch.Tensor)) and np.ndim(grid) == 1:
        grid = [grid]
    if not isinstance(grid, (list, tuple)) or len(grid) == 0:
        raise TypeError("`grid` must be a non-empty list of 1-D coordinate arrays, one per dimension.")
    out = []
    for d, g in enumerate(grid):
        arr = _as_float_array(g, f"grid[{d}]")
        if arr.ndim != 1 or arr.shape[0] < 2:
            raise ValueError(f"`grid[{d}]` must be a 1-D array with at least 2 coordinates; got shape {arr.shape}.")
        if not (np.diff(arr) > 0).all():
            raise ValueError(f"`grid[{d}]` must be strictly increasing (sorted, no duplicates).")
        out.append(torch.as_tensor(arr, dtype=dtype))
    return out


def split_product_kernel(kernel, ndim: int):
    """(ProductKernel holding one 1-D kernel per dimension, evaluation form) or a clear TypeError.

    Accepted: a list/tuple of ``ndim`` gpytorch kernels (factor d acts on coordinate d), a
    ProductKernel whose factors have ``active_dims`` = (d,) covering each dimension once, or (1-D) a
    single kernel.
    """
    Kernel = gpytorch.kernels.Kernel
    if isinstance(kernel, Kernel) and not isinstance(kernel, gpytorch.kernels.ProductKernel):
        if ndim != 1:
            raise TypeError(f"`kernel` must be a product over the {ndim} grid dimensions: pass a list of {ndim} "
                            "1-D kernels or a ProductKernel of kernels with active_dims=(d,).")
        kernel = [kernel]
    if isinstance(kernel, (list, tuple)):
        if len(kernel) != ndim or not all(isinstance(k, Kernel) for k in kernel):
            raise TypeError(f"`kernel` as a list needs exactly {ndim} gpytorch kernels (one per grid dimension).")
        if any(k.active_dims is not None for k in kernel):
            raise TypeError("`kernel`: the kernels of a list act on their own coordinate; drop active_dims.")
        return gpytorch.kernels.ProductKernel(*kernel), "list"
    if isinstance(kernel, gpytorch.kernels.ProductKernel):
        dims = []
        for k in kernel.kernels:
            ad = None if k.active_dims is None else [int(a) for a in k.active_dims]
            if ad is None or len(ad) != 1:
                raise TypeError("`kernel`: every factor of the ProductKernel needs active_dims=(d,) for one grid "
                                "dimension d, so that the kernel is a product over dimensions.")
            dims += ad
        if sorted(dims) != list(range(ndim)):
            raise TypeError(f"`kernel`: the ProductKernel factors' active_dims {dims} must cover each of the {ndim} "
                            "grid dimensions exactly once.")
        return kernel, "product"
    raise TypeError(f"`kernel` must be a list of 1-D gpytorch kernels or a ProductKernel; got {type(kernel).__name__}.")


class GridPrior(gpytorch.Module):
    """Product kernel (one factor per dimension), constant or zero mean, Gaussian noise."""

    def __init__(self, kernel, form, ndim, mean, noise):
        super().__init__()
        self.kernel, self.form, self.ndim = kernel, form, ndim
        self.mean_module = gpytorch.means.ConstantMean() if mean == "constant" else gpytorch.means.ZeroMean()
        if noise is None:
            self.register_parameter("raw_noise", torch.nn.Parameter(torch.zeros(())))
            self.register_constraint("raw_noise", gpytorch.constraints.GreaterThan(1e-8))
        else:
            self.register_buffer("fixed_noise", torch.tensor(float(noise), dtype=torch.float64))

    @property
    def noise(self):
        return self.fixed_noise if hasattr(self, "fixed_noise") else self.raw_noise_constraint.transform(self.raw_noise)

    def _factor_of(self, d):
        if self.form == "list":
            return self.kernel.kernels[d], 0
        for k in self.kernel.kernels:
            if int(k.active_dims[0]) == d:
                return k, d

    def _embed(self, x, col):
        """Inputs for a factor: 1-D column, or D columns with the factor's active dim filled."""
        if self.form == "list":
            return x[:, None]
        X = torch.zeros(x.shape[0], self.ndim, dtype=x.dtype)
        X[:, col] = x
        return X

    def cross(self, d, a, b=None, diag=False):
        k, col = self._factor_of(d)
        A = self._embed(a, col)
        if diag:
            return k(A, diag=True)
        return k(A, A if b is None else self._embed(b, col)).to_dense()

    def mean_value(self, n, dtype):
        return self.mean_module(torch.zeros(n, 1, dtype=dtype))


@register_model
class GridGP(Model):
    """Exact GP regression for values on a Cartesian grid, with a product kernel.

    Parameters
    ----------
    kernel : list of gpytorch kernels (one per dimension) or ProductKernel with active_dims per factor
    grid : list of strictly increasing 1-D coordinate arrays (n_1, ..., n_D)
    mean : {"constant", "zero"}
    noise : float, optional — fix the noise variance (learned when None)
    max_missing_exact : int — largest number of missing cells for which fit(steps>0) learns
        hyperparameters (exact masked LML through a Schur complement, memory n · |missing|).
    """

    def __init__(self, kernel, grid, mean: str = "constant", noise: float | None = None,
                 max_missing_exact: int = 2000, dtype=DEFAULT_DTYPE):
        grid = check_grid(grid, dtype)
        product, form = split_product_kernel(kernel, len(grid))
        if mean not in ("constant", "zero"):
            raise ValueError(f"`mean` must be 'constant' or 'zero'; got {mean!r}.")
        noise = check_positive(noise, "noise", allow_none=True)
        self.grid, self.dtype = grid, dtype
        self.shape = tuple(len(g) for g in grid)
        self.config = {"mean": mean, "noise": noise, "form": form,
                       "max_missing_exact": check_int(max_missing_exact, "max_missing_exact")}
        self.prior = GridPrior(product, form, len(grid), mean, noise).to(dtype)
        self.history = None
        self._train = None

    @property
    def kernel(self):
        return self.prior.kernel

    # ------------------------------------------------------------------ data
    def _check_values(self, values, mask):
        arr = np.asarray(values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values, dtype=float)
        if arr.shape != self.shape:
            raise ValueError(f"`values` must have the grid's shape {self.shape}; got {arr.shape}.")
        if mask is None:
            observed = np.ones(self.shape, dtype=bool)
        else:
            observed = np.asarray(mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else mask)
            if observed.shape != self.shape or observed.dtype != bool:
                raise ValueError(f"`mask` must be a boolean array of shape {self.shape} (True = observed).")
            if observed.sum() < 2:
                raise ValueError("`mask` must mark at least 2 observed cells.")
        if not np.isfinite(arr[observed]).all():
            raise ValueError("`values` has NaN or infinite entries at observed cells; mask them out (mask=...).")
        arr = np.where(observed, arr, 0.0)
        missing = np.flatnonzero(~observed.reshape(-1))
        return torch.as_tensor(arr.reshape(-1), dtype=self.dtype), (torch.as_tensor(missing) if missing.size else None)

    def _factors(self):
        return [self.prior.cross(d, g) for d, g in enumerate(self.grid)]

    # ------------------------------------------------------------------ fitting
    def fit(self, values, mask=None, *, steps: int = 50, method: str = "lbfgs", lr: float | None = None,
            progress: bool | None = None, tol: float = 1e-9, seed: int | None = None, data_weight: float = 1.0):
        """Fit to ``values`` (the grid's shape) with optional boolean ``mask`` (True = observed).

        ``steps`` optimisation steps of the exact log marginal likelihood (``steps=0``: only condition).
        ``data_weight`` κ: maximise the data-emphasized objective instead (κ = 1: the marginal likelihood;
        see :mod:`latentgp.objectives_weighted`); κ > 1 needs a fixed ``noise`` (else it is unbounded).
        """
        y, missing = self._check_values(values, mask)
        steps = check_int(steps, "steps")
        kappa = check_data_weight(data_weight)
        if kappa > 1.0 and steps > 0 and not hasattr(self.prior, "fixed_noise"):
            # (1 - κ)(n/2) log s -> +inf as s -> 0: with a learned noise the objective has no maximum.
            raise ValueError("`data_weight` > 1 with a learned noise makes the objective unbounded (noise -> 0); "
                             "fix the noise (GridGP(..., noise=...)) to use the data-emphasized objective.")
        n_missing = 0 if missing is None else missing.numel()
        if steps > 0 and n_missing > self.config["max_missing_exact"]:
            raise ValueError(f"`mask` leaves {n_missing} cells missing; learning hyperparameters with more than "
                             f"max_missing_exact={self.config['max_missing_exact']} missing cells is not supported "
                             "(exact Schur complement). Use steps=0 (fixed hyperparameters) or raise "
                             "max_missing_exact.")
        first = self._train is None
        self._train = (y, missing)
        if first:
            self._init_from_data(y, missing)
        if steps > 0:
            n_obs = y.numel() - n_missing
            with seeded(seed):
                self.history = optimize(lambda: -self._lml(kappa)[0] / n_obs, self.prior.parameters(), method=method,
                                        steps=steps, lr=lr, progress=progress, tol=tol, record=self._record,
                                        desc="GridGP")
        self._condition()
        return self

    def _init_from_data(self, y, missing):
        obs = y if missing is None else y[torch.ones_like(y, dtype=torch.bool).index_fill(0, missing, False)]
        with torch.no_grad():
            if isinstance(self.prior.mean_module, gpytorch.means.ConstantMean):
                self.prior.mean_module.constant = obs.mean()
            if not hasattr(self.prior, "fixed_noise"):
                noise0 = 0.1 * obs.var().clamp_min(1e-6)  # constant data: a positive start, not NaN
                self.prior.raw_noise.copy_(self.prior.raw_noise_constraint.inverse_transform(noise0))

    def _record(self):
        return {name: (p.item() if p.numel() == 1 else p.detach().flatten().tolist())
                for name, p in self.prior.named_parameters()}

    def _lml(self, kappa: float = 1.0):
        """Log marginal likelihood (κ = 1) or the data-emphasized objective (noise s/κ + correction)."""
        y, missing = self._train
        residual = y - self.prior.mean_value(y.numel(), y.dtype)
        noise = self.prior.noise
        if kappa == 1.0:
            return grid_log_marginal(self._factors(), noise, residual, missing)
        value, alpha = grid_log_marginal(self._factors(), noise / kappa, residual, missing)
        n_obs = y.numel() - (0 if missing is None else missing.numel())
        return value + tempered_gaussian_correction(noise, n_obs, kappa), alpha

    def log_marginal_likelihood(self) -> float:
        """log p(observed values | hyperparameters), natural log, full constant."""
        self._require_fitted("log_marginal_likelihood()")
        with torch.no_grad():
            return float(self._lml()[0])

    def _condition(self):
        """Cache α = P^T A_OO^{-1} (y_O - m) and the eigendecomposition (PCG when cells are missing)."""
        y, missing = self._train
        with torch.no_grad():
            factors = self._factors()
            self._eig = KroneckerEig(factors, self.prior.noise)
            residual = y - self.prior.mean_value(y.numel(), y.dtype)
            if missing is None:
                self._alpha = self._eig.solve(residual)
            else:
                self._observed = torch.ones_like(y, dtype=torch.bool).index_fill(0, missing, False)
                self._alpha = self._masked_solve(residual[:, None])[:, 0]

    def _masked_solve(self, R):
        """A_OO^{-1} on the observed rows of R (n, k), by PCG; returns (n, k) with zeros at missing cells.

        Preconditioner: P^T A^{-1} P, the full-grid inverse restricted to the observed cells."""
        obs = self._observed[:, None].to(R.dtype)

        def matmul(X):
            return obs * (self._eig.matmul_K(X) + self.prior.noise * X)

        X, self.cg_iterations_ = pcg(matmul, obs * R, lambda X: obs * self._eig.solve(X))
        return X

    # ------------------------------------------------------------------ prediction
    def _check_points(self, points):
        cols = [f"x{d}" for d in range(len(self.grid))] if len(self.grid) > 1 else ["x"]
        if isinstance(points, pd.DataFrame):
            missing = [c for c in cols if c not in points.columns]
            new = as_inputs(points, "points", columns=cols if not missing else None, dtype=self.dtype)
        else:
            new = as_inputs(points, "points", dtype=self.dtype)
        if new.values.shape[1] != len(self.grid):
            raise ValueError(f"`points` must have {len(self.grid)} columns (one per grid dimension); "
                             f"got {new.values.shape[1]}.")
        return new

    def predict(self, points=None, level: float = 0.95, include_noise: bool = False, variance: bool = True):
        """Posterior at ``points`` ((m, D) array or DataFrame; default: the grid cells) as a DataFrame with
        the coordinates + mean, var, lower, upper. With missing cells the variance needs one PCG solve per
        point (batched): keep ``points`` modest then, or pass ``variance=False`` (var/lower/upper are NaN)."""
        self._require_fitted("predict()")
        if points is None:
            mesh = torch.meshgrid(*self.grid, indexing="ij")
            points = torch.stack([m.reshape(-1) for m in mesh], -1)
        new = self._check_points(points)
        X = new.values
        with torch.no_grad():
            C = [self.prior.cross(d, X[:, d], g) for d, g in enumerate(self.grid)]
            mean = self.prior.mean_value(X.shape[0], X.dtype) + contract_rows(self._alpha.reshape(self.shape), C)
            if not variance:
                return prediction_frame(X, new.columns, mean, torch.full_like(mean, float("nan")), level)
            prior_var = torch.stack([self.prior.cross(d, X[:, d], diag=True) for d in range(len(self.grid))]).prod(0)
            var = prior_var - self._explained_variance(C)
            var = var.clamp_min(0.0) + (self.prior.noise if include_noise else 0.0)
        return prediction_frame(X, new.columns, mean, var, level)

    def _explained_variance(self, C):
        """k_*^T A^{-1} k_* (full grid: sum_i (Q^T k_*)_i^2 / (l_i + s) by Kronecker rows) or, with
        missing cells, k_*O^T A_OO^{-1} k_*O by batched PCG (chunks of points)."""
        if self._train[1] is None:
            B = [(Cd @ Q) ** 2 for Cd, Q in zip(C, self._eig.Qs, strict=False)]
            return contract_rows(self._eig.inv_diag.reshape(self.shape), B)
        n = int(np.prod(self.shape))
        chunk = max(1, int(2e6 // n))
        out = []
        for s in range(0, C[0].shape[0], chunk):
            rows = [Cd[s:s + chunk] for Cd in C]
            Kx = rows[0]
            for Cd in rows[1:]:
                Kx = (Kx[:, :, None] * Cd[:, None, :]).reshape(Kx.shape[0], -1)
            Kx = Kx.T  # (n, p) Kronecker rows as columns
            out.append((Kx * self._masked_solve(Kx)).sum(0))
        return torch.cat(out)

    # ------------------------------------------------------------------ save / load
    def _payload(self):
        y, missing = self._train
        return {
            "config": dict(self.config),
            "kernel": self.kernel,
            "state": self.prior.state_dict(),
            "data": {"grid": list(self.grid), "values": y, "missing": missing},
        }

    @classmethod
    def _from_payload(cls, payload, kernel):
        cfg, data = payload["config"], payload["data"]
        kern = list(kernel.kernels) if cfg["form"] == "list" else kernel
        model = cls(kern, data["grid"], mean=cfg["mean"], noise=cfg["noise"],
                    max_missing_exact=cfg["max_missing_exact"], dtype=saved_dtype(payload))
        model.prior.load_state_dict(payload["state"])
        model._train = (data["values"], data["missing"])
        model._condition()
        return model
