"""GP-HM: solving linear PDEs with a spectral-mixture GP on a collocation grid (``GPPDESolver``).

The solution u is a GP whose kernel is a product over dimensions of 1-D spectral mixtures
(:mod:`latentgp.kernels.grid_spectral`). Collocation points form a Cartesian grid over the domain;
the grid's boundary points observe u = g, its interior points observe L u = f, where L is a linear
differential operator sum_t c_t prod_d d^{a_td}/dx_d^{a_td}. Covariances between such observations
are products of the 1-D kernels' analytic derivatives (k, k_{x'}, k_{x'x'}, k_{xxx'x'}).

Objective (maximised over all kernel hyperparameters, weights included):
    log p(g, f | theta) + log p(w),   log p(w) = -sparsity * sum_{d,q} log(w_dq + floor)
The first term is the GP marginal likelihood of the collocation observations (u integrated out
exactly — the operator is linear, so no point estimate of u at the grid is needed); the second is
the paper's Jeffreys prior p(w) ∝ 1/w on the mixture weights, which prunes frequencies. Two traps
of the paper's formulation are handled explicitly:
  * the Jeffreys prior is applied to w itself, not to the optimised log w: with the Jacobian of the
    log transform the log-density is flat in log w and the sparsity disappears;
  * the improper prior makes the MAP objective unbounded (log w -> -inf), so a floor
    (``weight_floor`` × initial total weight) keeps it bounded; pruned weights settle near the floor.
Observations are exact up to a relative nugget (``nugget``, per observation type); the covariance is
equilibrated (unit diagonal) before the Cholesky factorisation, since the rows for L u are
~omega^4 larger than those for u at high frequencies.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import gpytorch
import numpy as np
import torch

from ..data import DEFAULT_DTYPE, as_inputs, check_int, check_positive
from ..fit import optimize, seeded
from ..io import register_model, saved_dtype
from ..kernels.grid_spectral import MAX_DERIVATIVE, GaussianSpectralMixture, StudentTSpectralMixture
from ..objectives import gaussian_log_marginal
from .base import Model, prediction_frame


def resolve_operator(operator, ndim: int, diffusion: float = 1.0, velocity=None):
    """The operator as a list of (coefficient, per-dimension derivative orders).

    ``"poisson"``: sum_d d^2/dx_d^2 (so ``source`` f means Δu = f); ``"advection_diffusion"``
    (steady): velocity · grad u - diffusion Δu; or a dict {orders tuple: coefficient}.
    """
    if operator == "poisson":
        return [(1.0, tuple(2 * (e == d) for e in range(ndim))) for d in range(ndim)]
    if operator == "advection_diffusion":
        v = np.ones(ndim) if velocity is None else np.atleast_1d(np.asarray(velocity, dtype=float))
        if v.shape != (ndim,):
            raise ValueError(f"`velocity` needs {ndim} components (one per dimension); got {v.shape}.")
        diffusion = check_positive(diffusion, "diffusion")
        terms = [(float(v[d]), tuple(int(e == d) for e in range(ndim))) for d in range(ndim) if v[d] != 0]
        return terms + [(-diffusion, tuple(2 * (e == d) for e in range(ndim))) for d in range(ndim)]
    if isinstance(operator, dict):
        terms = []
        for orders, coef in operator.items():
            orders = (orders,) if isinstance(orders, int) else tuple(orders)
            if len(orders) != ndim or not all(isinstance(o, (int, np.integer)) and o >= 0 for o in orders):
                raise ValueError(f"`operator`: key {orders!r} must be {ndim} non-negative integer derivative orders.")
            if max(orders) > MAX_DERIVATIVE // 2:
                raise ValueError(f"`operator` has derivative order {max(orders)} in one dimension; at most "
                                 f"{MAX_DERIVATIVE // 2} is supported (the kernel's derivatives go to order "
                                 f"{MAX_DERIVATIVE} = 2 x the operator's order).")
            terms.append((float(coef), tuple(int(o) for o in orders)))
        if not terms or all(sum(o) == 0 for _, o in terms):
            raise ValueError("`operator` must contain at least one derivative (order >= 1): it is a differential "
                             "operator of order 1 or 2.")
        return terms
    raise ValueError(f"`operator` must be 'poisson', 'advection_diffusion' or a dict of derivative orders; "
                     f"got {operator!r}.")


def _check_domain(domain):
    try:
        dom = [(float(a), float(b)) for a, b in domain]
    except (TypeError, ValueError):
        raise TypeError("`domain` must be a list of (low, high) pairs, one per dimension.") from None
    if not dom or any(not (np.isfinite(a) and np.isfinite(b) and b > a) for a, b in dom):
        raise ValueError(f"`domain` must be non-empty with finite low < high per dimension; got {domain!r}.")
    return dom


class _Kernels(gpytorch.Module):
    """One 1-D kernel per dimension; the product's cross-covariances between operator observations."""

    def __init__(self, kernels):
        super().__init__()
        self.factors = torch.nn.ModuleList(kernels)

    def cov(self, P, Q, left, right, grid=None):
        """Cov(L_left u(P), L_right u(Q)) = sum_{s,t} c_s c_t prod_d d^{a_sd}_x d^{b_td}_x' k_d(P_d, Q_d).

        With ``grid`` = (uniform 1-D grids, P's grid indices, Q's grid indices) the 1-D factors are
        evaluated only at the 2 n_d - 1 distinct lags of each grid (stationarity) and gathered: the
        derivative profiles then cost O(Q n_d) instead of O(Q |P| |Q|). Without it, at the distinct
        coordinates of each axis.
        """
        cache = {}

        def factor(d, a, b):
            if (d, a, b) not in cache:
                kern = self.factors[d]
                if grid is None:  # distinct coordinates only (a mesh of m points has ~m^(1/D) per axis)
                    pu, pinv = torch.unique(P[:, d], return_inverse=True)
                    qu, qinv = torch.unique(Q[:, d], return_inverse=True)
                    cache[d, a, b] = kern.cross_derivative(pu, qu, a, b)[pinv[:, None], qinv[None, :]]
                else:
                    g, pi, qi = grid[0][d], grid[1][:, d], grid[2][:, d]
                    n = g.shape[0]
                    lags = (g[1] - g[0]) * torch.arange(-(n - 1), n, dtype=g.dtype)
                    profile = (-1) ** b * kern.derivative(lags, a + b)
                    cache[d, a, b] = profile[pi[:, None] - qi[None, :] + n - 1]
            return cache[d, a, b]

        total = 0.0
        for cs, a in left:
            for ct, b in right:
                term = cs * ct
                for d in range(P.shape[1]):
                    term = term * factor(d, a[d], b[d])
                total = total + term
        return total


def _evaluate(fn, points, name):
    cols = [points[:, d].numpy() for d in range(points.shape[1])]
    try:
        out = np.asarray(fn(*cols), dtype=float)
    except Exception as exc:  # the user's callable failed: say which one and how it is called
        raise ValueError(f"`{name}` must accept {len(cols)} coordinate array(s) f(x0, ...) and return an array; "
                         f"calling it raised {type(exc).__name__}: {exc}") from exc
    out = np.broadcast_to(out, (points.shape[0],)) if out.ndim == 0 else out.reshape(-1)
    if out.shape[0] != points.shape[0] or not np.isfinite(out).all():
        raise ValueError(f"`{name}` must return {points.shape[0]} finite values (one per point); "
                         f"got shape {out.shape} with {int((~np.isfinite(out)).sum())} non-finite.")
    return torch.as_tensor(out.copy(), dtype=points.dtype)


@register_model
class GPPDESolver(Model):
    """GP-HM solver for linear PDEs L u = f in the domain, u = g on its boundary.

    Parameters
    ----------
    operator : "poisson" | "advection_diffusion" | dict {derivative orders: coefficient}
    domain : list of (low, high), one per dimension (a box)
    n_collocation : total number of grid collocation points (per dimension: round(n ** (1 / D)))
    num_mixtures : Q spectral components per dimension
    kernel : "student_t" (Matérn(order + 1/2) × cosine components), "gaussian", "rbf" (baseline: one
        zero-frequency Gaussian component, i.e. an RBF) or a list of 1-D kernels with ``cross_derivative``
    max_frequency : upper end of the initial frequency bank (default: half the grid's Nyquist frequency)
    sparsity : weight of the Jeffreys log-prior on the mixture weights (0 disables it)
    nugget : relative noise on the boundary and residual observations
    """

    def __init__(self, operator="poisson", domain=((0.0, 1.0),), n_collocation: int = 400, num_mixtures: int = 20,
                 kernel="student_t", order: int = 3, max_frequency: float | None = None, sparsity: float = 1.0,
                 nugget: float = 1e-10, weight_floor: float = 1e-6, diffusion: float = 1.0, velocity=None,
                 dtype=DEFAULT_DTYPE):
        domain = _check_domain(domain)
        ndim = len(domain)
        self.terms = resolve_operator(operator, ndim, diffusion, velocity)
        n_collocation = check_int(n_collocation, "n_collocation", 3**ndim)
        num_mixtures = check_int(num_mixtures, "num_mixtures", 1)
        sparsity = 0.0 if sparsity == 0 else check_positive(sparsity, "sparsity")
        nugget = check_positive(nugget, "nugget")
        self.config = {"operator": operator if isinstance(operator, str) else {str(k): v for k, v in operator.items()},
                       "domain": domain, "n_collocation": n_collocation, "num_mixtures": num_mixtures,
                       "kernel": kernel if isinstance(kernel, str) else "custom", "order": order,
                       "max_frequency": max_frequency, "sparsity": sparsity, "nugget": nugget,
                       "weight_floor": check_positive(weight_floor, "weight_floor"), "diffusion": diffusion,
                       "velocity": None if velocity is None else list(np.atleast_1d(velocity).astype(float))}
        self.dtype = dtype
        per_dim = max(3, round(n_collocation ** (1.0 / ndim)))
        self.grid = [torch.linspace(a, b, per_dim, dtype=dtype) for a, b in domain]
        self.kernels = _Kernels(self._build_kernels(kernel, ndim, num_mixtures, order, max_frequency)).to(dtype)
        self.history = None
        self._train = None

    def _build_kernels(self, kernel, ndim, Q, order, max_frequency):
        if isinstance(kernel, (list, tuple)):
            if len(kernel) != ndim or not all(hasattr(k, "cross_derivative") for k in kernel):
                raise TypeError(f"`kernel` as a list needs {ndim} 1-D kernels with analytic derivatives "
                                "(cross_derivative), e.g. latentgp.kernels.StudentTSpectralMixture.")
            return list(kernel)
        if kernel not in ("student_t", "gaussian", "rbf"):
            raise ValueError(f"`kernel` must be 'student_t', 'gaussian', 'rbf' or a list of 1-D kernels; "
                             f"got {kernel!r}.")
        out = []
        for _d, g in enumerate(self.grid):
            span = float(g[-1] - g[0])
            nyquist = (len(g) - 1) / (2 * span)
            if kernel == "rbf":
                k = GaussianSpectralMixture(1).to(self.dtype)  # float64 before setting values
                k.means = 1e-9 * nyquist  # a zero-frequency Gaussian component is the RBF kernel
                k.raw_means.requires_grad_(False)
                k.scales = 0.1 * nyquist
                with torch.no_grad():
                    k.log_weights.zero_()
            else:
                floor = {"min_scale": 1e-3 / span}  # envelope at most ~160 domain lengths long
                k = (StudentTSpectralMixture(Q, order=order, **floor) if kernel == "student_t"
                     else GaussianSpectralMixture(Q, **floor))
                k = k.to(self.dtype)
                k.initialize_frequencies(0.5 * nyquist if max_frequency is None else float(max_frequency))
            out.append(k)
        return out

    # ------------------------------------------------------------------ collocation data
    def _collocation(self):
        """Grid points and their grid indices, split into boundary and interior."""
        mesh = torch.meshgrid(*[torch.arange(len(g)) for g in self.grid], indexing="ij")
        index = torch.stack([m.reshape(-1) for m in mesh], -1)
        points = torch.stack([g[index[:, d]] for d, g in enumerate(self.grid)], -1)
        on_edge = torch.zeros(points.shape[0], dtype=torch.bool)
        for d, g in enumerate(self.grid):
            on_edge |= (index[:, d] == 0) | (index[:, d] == len(g) - 1)
        return points[on_edge], points[~on_edge], index[on_edge], index[~on_edge]

    def _gram(self):
        """Equilibrated joint covariance of (u at boundary, L u at interior) and its scaling."""
        B, C = self._train["boundary_points"], self._train["interior_points"]
        Bi, Ci = self._train["boundary_index"], self._train["interior_index"]
        ident = [(1.0, (0,) * B.shape[1])]
        K_bb = self.kernels.cov(B, B, ident, ident, (self.grid, Bi, Bi))
        K_bc = self.kernels.cov(B, C, ident, self.terms, (self.grid, Bi, Ci))
        K_cc = self.kernels.cov(C, C, self.terms, self.terms, (self.grid, Ci, Ci))
        G = torch.cat([torch.cat([K_bb, K_bc], 1), torch.cat([K_bc.T, K_cc], 1)], 0)
        diag = G.diagonal()
        G = G + torch.diag(self.config["nugget"] * diag)
        scale = diag.detach().clamp_min(torch.finfo(G.dtype).tiny).rsqrt()
        return scale[:, None] * G * scale[None, :], scale

    def _objective(self, warn=False):
        """(log marginal likelihood of the collocation observations, log prior of the weights)."""
        G, scale = self._gram()
        y = self._train["targets"]
        lml, L, alpha, _ = gaussian_log_marginal(G, scale * y, warn=warn)
        lml = lml + scale.log().sum()  # log N(y; 0, G) = log N(D y; 0, D G D) + log det D
        self._last = (L, alpha, scale)
        log_prior = torch.zeros((), dtype=y.dtype)
        if self.config["sparsity"] > 0 and self.config["kernel"] != "rbf":
            for k, floor in zip(self.kernels.factors, self._floors, strict=False):
                log_prior = log_prior - self.config["sparsity"] * torch.log(k.weights + floor).sum()
        return lml, log_prior

    # ------------------------------------------------------------------ fitting
    def fit(self, source: Callable, boundary: Callable, *, steps: int = 100, method: str = "lbfgs",
            lr: float | None = None, progress: bool | None = None, tol: float = 1e-10, seed: int | None = None):
        """Condition on L u = ``source`` at the interior grid points and u = ``boundary`` on the boundary.

        ``source``/``boundary`` are callables taking one coordinate array per dimension (f(x) in 1-D,
        f(x, y) in 2-D) and returning one value per point. ``steps`` optimiser steps of the objective.
        """
        if not callable(source):
            raise TypeError("`source` must be a callable f(x0, ...) returning the right-hand side.")
        if not callable(boundary):
            raise TypeError("`boundary` must be a callable g(x0, ...) returning the boundary values.")
        steps = check_int(steps, "steps")
        B, C, Bi, Ci = self._collocation()
        targets = torch.cat([_evaluate(boundary, B, "boundary"), _evaluate(source, C, "source")])
        self._train = {"boundary_points": B, "interior_points": C, "boundary_index": Bi, "interior_index": Ci,
                       "targets": targets}
        with torch.no_grad():
            self._floors = [self.config["weight_floor"] * k.weights.sum() for k in self.kernels.factors]
        if steps > 0:
            n = targets.numel()
            with seeded(seed):
                self.history = optimize(lambda: -sum(self._objective()) / n, self.kernels.parameters(),
                                        method=method, steps=steps, lr=lr, progress=progress, tol=tol,
                                        record=self._record, desc="GPPDESolver")
        with torch.no_grad():
            self._objective(warn=True)
            self._cache = self._last
        return self

    def _record(self):
        row = {}
        for d, k in enumerate(self.kernels.factors):
            row[f"log_weights_{d}"] = k.log_weights.detach().tolist()
            row[f"means_{d}"] = k.means.detach().tolist()
            row[f"scales_{d}"] = k.scales.detach().tolist()
        return row

    def objective(self) -> tuple[float, float]:
        """(log marginal likelihood, log prior of the weights) at the current hyperparameters."""
        self._require_fitted("objective()")
        with torch.no_grad():
            lml, lp = self._objective()
        return float(lml), float(lp)

    # ------------------------------------------------------------------ prediction
    def predict(self, x, level: float = 0.95):
        """Posterior of u at ``x`` ((m,) in 1-D or (m, D); DataFrame allowed): coordinates + mean, var,
        lower, upper."""
        self._require_fitted("predict()")
        ndim = len(self.grid)
        new = as_inputs(x, "x", dtype=self.dtype)
        if new.values.shape[1] != ndim:
            raise ValueError(f"`x` must have {ndim} column(s), one per dimension of the domain; "
                             f"got {new.values.shape[1]}.")
        X = new.values
        B, C = self._train["boundary_points"], self._train["interior_points"]
        ident = [(1.0, (0,) * ndim)]
        L, alpha, scale = self._cache
        with torch.no_grad():
            cross = torch.cat([self.kernels.cov(B, X, ident, ident), self.kernels.cov(C, X, self.terms, ident)], 0)
            cross = scale[:, None] * cross
            mean = cross.T @ alpha
            v = torch.linalg.solve_triangular(L, cross, upper=False)
            prior = self.kernels.cov(X[:1] * 0, X[:1] * 0, ident, ident).reshape(())  # stationary: k(0)
            var = (prior - (v * v).sum(0)).clamp_min(0.0)
        return prediction_frame(X, new.columns, mean, var, level)

    def spectrum(self, dim: int = 0, frequencies=None):
        """Learned spectral density of dimension ``dim`` (ordinary frequency) as a DataFrame."""
        import pandas as pd

        k = self.kernels.factors[dim]
        if frequencies is None:
            g = self.grid[dim]
            frequencies = torch.linspace(0, (len(g) - 1) / (2 * float(g[-1] - g[0])), 2000, dtype=self.dtype)
        s = torch.as_tensor(frequencies, dtype=self.dtype)
        with torch.no_grad():
            dens = k.spectral_density(2 * math.pi * s)
        return pd.DataFrame({"frequency": s.numpy(), "density": dens.numpy()})

    def components(self, dim: int = 0):
        """Mixture components of dimension ``dim``: frequency (cycles/unit), angular frequency, scale, weight."""
        import pandas as pd

        k = self.kernels.factors[dim]
        with torch.no_grad():
            return pd.DataFrame({"frequency": k.means.numpy(), "angular": 2 * math.pi * k.means.numpy(),
                                 "scale": k.scales.numpy(), "weight": k.weights.numpy()})

    # ------------------------------------------------------------------ save / load
    def _payload(self):
        if self.config["kernel"] == "custom":
            raise TypeError("save(): a solver with a custom kernel list cannot be saved; use kernel='student_t', "
                            "'gaussian' or 'rbf'.")
        return {"config": dict(self.config), "kernel": None, "state": self.kernels.state_dict(),
                "data": {**self._train, "floors": list(self._floors)}}

    @classmethod
    def _from_payload(cls, payload, kernel):
        cfg = dict(payload["config"])
        op = cfg.pop("operator")
        if isinstance(op, dict):
            op = {tuple(int(c) for c in k.strip("()").split(",") if c.strip()): v for k, v in op.items()}
        model = cls(operator=op, **cfg, dtype=saved_dtype(payload))
        model.kernels.load_state_dict(payload["state"])
        data = dict(payload["data"])
        model._floors = data.pop("floors")
        model._train = data
        with torch.no_grad():
            model._objective()
            model._cache = model._last
        return model
