"""Vector- and scalar-field GPs on a point cloud (RVGP: Peach et al., "Implicit Gaussian process
representation of vector fields over arbitrary latent manifolds").

Algorithm (one pass, then a cheap hyperparameter fit):

1. Geometry from *all* points: kNN graph, local-PCA tangent frames T_i, Procrustes alignments,
   connection Laplacian and its m smallest eigenpairs (:func:`latentgp.linalg.connection_laplacian`).
2. Observed ambient vectors v_i are projected to tangent coordinates y_i = T_i^T v_i (d each);
   stacked, y = A w + e with A the observed rows of the eigenvectors Phi (N_o x m),
   w ~ N(0, diag S) (S: the spectral filter of :class:`ConnectionLaplacianKernel`), e ~ N(0, noise I).
3. Everything is Woodbury algebra in the m-dimensional eigenbasis: with B = A S^{1/2} and
   M = I + B^T B / noise (eigenvalues >= 1, so its Cholesky is always stable),
   log p(y) = -1/2 [y^T y / noise - |L^{-1} B^T y / noise|^2 + N_o log noise + 2 sum log diag L + N_o log 2 pi],
   posterior w | y = N(S^{1/2} L^{-T} c, R R^T), c = L^{-1} B^T y / noise, R = S^{1/2} L^{-T}.
   A^T A and A^T y do not depend on the hyperparameters and are computed once, so one training
   step costs O(m^3), independent of n. No n x n matrix is ever formed.
4. Predictions: tangent mean Phi w, mapped back to ambient vectors T_i (Phi w)_i; ``var`` is the
   posterior variance summed over the d tangent directions (trace of the d x d block), and
   ``v{k}_lower``/``v{k}_upper`` come from the ambient marginal variance of component k.

:class:`ScalarFieldGP` is the same model for scalar values with the graph Laplacian (d = 1 block,
constant mean fixed at the mean of the observed values).
"""
from __future__ import annotations

import math

import gpytorch
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from gpytorch.constraints import Positive
from scipy.stats import norm
from torch.func import functional_call

from ..data import DEFAULT_DTYPE, _as_float_array, _to_numpy, check_int, check_level, check_positive
from ..fit import optimize, seeded
from ..io import register_model
from ..kernels.connection_laplacian import ConnectionLaplacianKernel
from ..linalg.connection_laplacian import connection_laplacian
from .base import Model, NotFittedError, prediction_frame
from .hyper import build_sites, raw_overrides

_METHODS = ("lbfgs", "adam")


def lowrank_gaussian_lml(gram, Aty, yty, n_obs: int, spectrum, noise):
    """log N(y; 0, A diag(S) A^T + noise I) from A^T A (m, m), A^T y (m,), y^T y, by Woodbury.

    Returns (value, L, c): L the Cholesky factor of M = I + S^{1/2} A^T A S^{1/2} / noise and
    c = L^{-1} S^{1/2} A^T y / noise, which :func:`lowrank_posterior` turns into the posterior."""
    sq = spectrum.sqrt()
    M = torch.eye(len(sq), dtype=gram.dtype) + sq[:, None] * gram * sq[None, :] / noise
    L = torch.linalg.cholesky(M)
    c = torch.linalg.solve_triangular(L, (sq * Aty / noise)[:, None], upper=False)[:, 0]
    quad = yty / noise - c @ c
    logdet = n_obs * torch.log(noise) + 2 * torch.log(L.diagonal()).sum()
    return -0.5 * (quad + logdet + n_obs * math.log(2 * math.pi)), L, c


def lowrank_posterior(spectrum, L, c):
    """Posterior of the eigen-coefficients w: mean (m,) and a root R (m, m) with Cov = R R^T."""
    sq = spectrum.sqrt()
    # Cov = S^{1/2} M^{-1} S^{1/2} = S^{1/2} L^{-T} L^{-1} S^{1/2}: R = S^{1/2} L^{-T}, R^T = L^{-1} S^{1/2}
    Rt = torch.linalg.solve_triangular(L, torch.diag(sq), upper=False)
    mean = sq * torch.linalg.solve_triangular(L.T, c[:, None], upper=True)[:, 0]
    return mean, Rt.T


class _FieldPrior(gpytorch.Module):
    """Spectral kernel + Gaussian noise: the hyperparameters that are learned."""

    def __init__(self, kernel, noise):
        super().__init__()
        self.kernel = kernel
        if noise is None:
            self.register_parameter("raw_noise", torch.nn.Parameter(torch.zeros((), dtype=kernel.raw_variance.dtype)))
            self.register_constraint("raw_noise", Positive())
        else:
            self.register_buffer("fixed_noise", torch.tensor(float(noise), dtype=kernel.raw_variance.dtype))

    @property
    def noise(self):
        return self.fixed_noise if hasattr(self, "fixed_noise") else self.raw_noise_constraint.transform(self.raw_noise)

    def forward(self):
        """(spectrum S (m,), noise): everything the likelihood needs (for ``functional_call``)."""
        return self.kernel.spectrum(), self.noise

    def set_noise(self, value):
        if not hasattr(self, "fixed_noise"):
            with torch.no_grad():
                self.raw_noise.copy_(self.raw_noise_constraint.inverse_transform(torch.as_tensor(value)))


def _as_observed(observed, n: int) -> np.ndarray:
    """Index array of observed points from an index array or a boolean mask of length n."""
    arr = _to_numpy(observed, "observed")
    if arr.ndim != 1:
        raise ValueError(f"`observed` must be 1-D (indices or a boolean mask); got shape {arr.shape}.")
    if arr.dtype == bool:
        if arr.shape[0] != n:
            raise ValueError(f"`observed` as a boolean mask must have length n = {n}; got {arr.shape[0]}.")
        idx = np.flatnonzero(arr)
    elif np.issubdtype(arr.dtype, np.integer):
        idx = arr.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"`observed` indices must be in [0, {n - 1}].")
        if len(np.unique(idx)) != len(idx):
            raise ValueError("`observed` has repeated indices; give each observed point once.")
    else:
        raise TypeError(f"`observed` must be integer indices or a boolean mask; got dtype {arr.dtype}.")
    if idx.size == 0:
        raise ValueError("`observed` selects no points.")
    return idx


class _SpectralFieldGP(Model):
    """Shared machinery: geometry, low-rank Gaussian fit, posterior, save/load. Subclasses set
    ``_field`` and how observations map to rows of the eigenvectors."""

    _field = "vector"

    def __init__(self, n_neighbors: int = 10, num_eigenpairs: int = 100, nu: float | None = None,
                 dim: int | None = None, noise: float | None = None, lengthscale: float | None = None,
                 variance: float | None = None, weights: str = "gaussian", normalization: str | None = "density",
                 dtype=DEFAULT_DTYPE):
        n_neighbors = check_int(n_neighbors, "n_neighbors", 1)
        num_eigenpairs = check_int(num_eigenpairs, "num_eigenpairs", 1)
        dim = None if dim is None else check_int(dim, "dim", 1)
        if nu is not None:
            check_positive(nu, "nu")
        for name, value in (("noise", noise), ("lengthscale", lengthscale), ("variance", variance)):
            check_positive(value, name, allow_none=True)
        if weights not in ("gaussian", "binary"):
            raise ValueError(f"`weights` must be 'gaussian' or 'binary'; got {weights!r}.")
        if normalization not in ("density", "sym", None):
            raise ValueError(f"`normalization` must be 'density', 'sym' or None; got {normalization!r}.")
        self.config = {"n_neighbors": n_neighbors, "num_eigenpairs": num_eigenpairs, "nu": nu, "dim": dim,
                       "noise": noise, "lengthscale": lengthscale, "variance": variance, "weights": weights,
                       "normalization": normalization}
        self.dtype = dtype
        self.prior = None
        self.geometry_ = None
        self.frames_ = None
        self.history = None
        self._train = None
        self._sites = None

    # ------------------------------------------------------------------ pieces subclasses define
    def _block(self) -> int:
        """Rows of the eigenvectors per point (d for vector fields, 1 for scalar fields)."""
        return self.frames_.shape[2] if self._field == "vector" else 1

    def _targets(self, values: np.ndarray, idx: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ fitting
    @property
    def kernel(self) -> ConnectionLaplacianKernel:
        if self.prior is None:
            raise NotFittedError("Call fit(...) before accessing the kernel.")
        return self.prior.kernel

    def _check_values(self, values, n_obs: int, D: int) -> np.ndarray:
        raise NotImplementedError

    def fit(self, points, values=None, observed=None, *, steps: int = 100, method: str = "lbfgs",
            lr: float | None = None, progress: bool | None = None, tol: float = 1e-9, seed: int | None = None):
        """Learn the geometry from all ``points`` (n, D) and fit the observed values.

        ``observed``: indices or a boolean mask of the points where ``values`` were measured (default:
        all points). Without ``values`` the model holds the prior only (for :meth:`sample`).
        ``steps=0`` conditions on the data at the initial / constructor hyperparameters. Fitting again on
        the same points reuses the geometry and starts from the current hyperparameters.
        """
        pts = _as_float_array(points, "points")
        if pts.ndim != 2:
            raise ValueError(f"`points` must be 2-D (n, D); got shape {pts.shape}.")
        n, D = pts.shape
        steps = check_int(steps, "steps")
        if method not in _METHODS:
            raise ValueError(f"`method` must be one of {_METHODS}; got {method!r}.")
        if self.config["n_neighbors"] >= n:
            raise ValueError(f"`n_neighbors` ({self.config['n_neighbors']}) must be < the number of points ({n}).")
        if values is None:
            if observed is not None:
                raise TypeError("`observed` was given without `values`.")
            idx, vals = np.zeros(0, dtype=np.int64), None
        else:
            idx = np.arange(n) if observed is None else _as_observed(observed, n)
            vals = self._check_values(values, len(idx), D)

        same_cloud = self._train is not None and np.array_equal(self._train[0], pts) and self.geometry_ is not None
        geo = self.geometry_ if same_cloud else connection_laplacian(
            pts, self.config["n_neighbors"], self.config["dim"], num_eigenpairs=None,
            weights=self.config["weights"], normalization=self.config["normalization"])
        m = self.config["num_eigenpairs"]
        rows_total = geo.n * (geo.dim if self._field == "vector" else 1)
        if m >= rows_total:
            raise ValueError(f"`num_eigenpairs` ({m}) must be < {rows_total} (points x tangent dimension).")
        eigvals, eigvecs = geo.eigenpairs(m, self._field)

        # ---- state changes start here (all input checks are done)
        self.geometry_ = geo
        self.frames_ = torch.as_tensor(geo.frames, dtype=self.dtype)
        if not same_cloud or self.prior is None:
            cfg = self.config
            kernel = ConnectionLaplacianKernel(eigenpairs=(eigvals, eigvecs), num_eigenpairs=m, nu=cfg["nu"],
                                               dim=geo.dim, field=self._field, dtype=self.dtype,
                                               lengthscale=cfg["lengthscale"], variance=cfg["variance"] or 1.0)
            self.prior = _FieldPrior(kernel, cfg["noise"])
            self._sites = None
            fresh = True
        else:
            fresh = False
        self._train = (pts, idx, vals)
        self._prepare()
        if vals is not None and (fresh or not getattr(self, "_initialised", False)):
            self._initialised = True
            self._init_from_data()
        if vals is not None and steps > 0:
            n_obs = len(self._y)
            with seeded(seed):
                self.history = optimize(lambda: -self._lml() / n_obs, self.prior.parameters(), method=method,
                                        steps=steps, lr=lr, progress=progress, tol=tol, record=self._record,
                                        desc=type(self).__name__)
        self._condition()
        return self

    def _rows(self, idx) -> torch.Tensor:
        b = self._block()
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return (idx[:, None] * b + torch.arange(b)).reshape(-1)

    def _prepare(self):
        """Hyperparameter-free statistics of the data: A^T A, A^T y, y^T y."""
        _, idx, vals = self._train
        Phi = self.kernel.eigenvectors
        if vals is None:
            self._y = torch.zeros(0, dtype=self.dtype)
            A = Phi[:0]
        else:
            self._y = self._targets(vals, idx)
            A = Phi[self._rows(idx)]
        self._stats = (A.T @ A, A.T @ self._y, self._y @ self._y)

    def _init_from_data(self):
        """Variance = mean square of the targets, noise = 10% of it, then the lengthscale on a grid
        (x 2^-3 .. 2^3 around the kernel's default) maximising the marginal likelihood -- each
        evaluation is O(m^3), and it keeps L-BFGS away from the flat ends of the lengthscale axis."""
        cfg, k = self.config, self.kernel
        scale = float(self._y.pow(2).mean()) or 1.0
        with torch.no_grad():
            if cfg["variance"] is None:
                k.variance = torch.tensor(scale, dtype=self.dtype)
            if cfg["noise"] is None:
                self.prior.set_noise(0.1 * scale)
            if cfg["lengthscale"] is None:
                base = k.lengthscale.clone()
                best = None
                for f in 2.0 ** np.linspace(-3, 3, 13):
                    k.lengthscale = base * f
                    value = float(self._lml())
                    if best is None or value > best[0]:
                        best = (value, base * f)
                k.lengthscale = best[1]

    def _lml(self):
        gram, Aty, yty = self._stats
        value, _, _ = lowrank_gaussian_lml(gram, Aty, yty, len(self._y), self.kernel.spectrum(), self.prior.noise)
        return value

    def _record(self):
        k = self.kernel
        return {"lengthscale": k.lengthscale.item(), "variance": k.variance.item(), "noise": self.prior.noise.item()}

    def _condition(self):
        with torch.no_grad():
            gram, Aty, yty = self._stats
            S = self.kernel.spectrum()
            value, L, c = lowrank_gaussian_lml(gram, Aty, yty, len(self._y), S, self.prior.noise)
            self._lml_value = float(value)
            self._post = lowrank_posterior(S, L, c)

    def log_marginal_likelihood(self) -> float:
        """log p(observed tangent coordinates | hyperparameters), natural log, full constant."""
        self._require_fitted("log_marginal_likelihood()")
        return self._lml_value

    # ------------------------------------------------------------------ prediction
    def _indices(self, indices) -> np.ndarray:
        n = self._train[0].shape[0]
        if indices is None:
            return np.arange(n)
        arr = _to_numpy(indices, "indices")
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise TypeError("`indices` must be a 1-D integer array or boolean mask.")
        if arr.dtype == bool:
            if len(arr) != n:
                raise ValueError(f"`indices` as a boolean mask must have length {n}.")
            return np.flatnonzero(arr)
        if arr.size and (arr.min() < 0 or arr.max() >= n):
            raise ValueError(f"`indices` must be in [0, {n - 1}].")
        return arr.astype(np.int64)

    def _moments(self, idx):
        """Posterior mean (k, b) and root rows Q (k, b, m) at points ``idx`` (b rows per point)."""
        mean_w, R = self._post
        P = self.kernel.eigenvectors[self._rows(idx)]
        b = self._block()
        return (P @ mean_w).reshape(-1, b), (P @ R).reshape(len(idx), b, -1)

    def sample(self, size: int = 1, *, prior: bool = False, seed: int | None = None, indices=None) -> np.ndarray:
        """Random fields from the posterior (or the prior, ``prior=True``) at ``indices`` (default all):
        (size, k, D) ambient vectors for vector fields, (size, k) for scalar fields. Fields drawn in the
        m-dimensional eigenbasis, so they are smooth at the kernel's lengthscale."""
        self._require_fitted("sample()")
        size = check_int(size, "size", 1)
        idx = self._indices(indices)
        with torch.no_grad(), seeded(seed):
            mean_w, R = self._post
            S = self.kernel.spectrum()
            z = torch.randn(size, len(S), dtype=self.dtype)
            w = z * S.sqrt() if prior else mean_w + z @ R.T
            P = self.kernel.eigenvectors[self._rows(idx)]
            f = (w @ P.T).reshape(size, len(idx), self._block())
        return self._to_output(f, idx)

    def _to_output(self, f, idx):
        raise NotImplementedError

    # ------------------------------------------------------------------ Pyro / ArviZ
    def pyro_model(self, y=None):
        """Pyro model: LogNormal priors around the current hyperparameters (``kernel.lengthscale``,
        ``kernel.variance``, ``noise``) and y ~ LowRankMultivariateNormal(0, A S^{1/2}, noise) for the
        stacked observed tangent coordinates (default: the training data)."""
        self._require_fitted("pyro_model()")
        if self._sites is None:
            self._sites = build_sites(self.prior)
        y = self._y if y is None else y
        values = {s.name: pyro.sample(s.name, s.prior) for s in self._sites}
        S, noise = functional_call(self.prior, raw_overrides(self._sites, values), ())
        A = self.kernel.eigenvectors[self._rows(self._train[1])]
        pyro.sample("y", dist.LowRankMultivariateNormal(torch.zeros_like(y), A * S.sqrt(), noise.expand(len(y))),
                    obs=y)

    def to_inference_data(self, num_samples: int = 200, seed: int | None = None):
        """ArviZ InferenceData at the fitted (type-II ML) hyperparameters: posterior draws of the latent
        tangent coordinates ``f`` at the observed points, posterior-predictive ``y``, pointwise
        log-likelihood and the observed ``y`` (stacked tangent coordinates, ``obs`` dimension)."""
        from ..convert import to_inference_data

        self._require_fitted("to_inference_data()")
        check_int(num_samples, "num_samples", 1)
        with torch.no_grad(), seeded(seed):
            mean_w, R = self._post
            A = self.kernel.eigenvectors[self._rows(self._train[1])]
            w = mean_w + torch.randn(num_samples, len(mean_w), dtype=self.dtype) @ R.T
            f = w @ A.T
            sd = self.prior.noise.sqrt()
            y_rep = f + sd * torch.randn_like(f)
            loglik = dist.Normal(f, sd).log_prob(self._y)
        k = self.kernel
        hyper = {"kernel.lengthscale": k.lengthscale.reshape(()), "kernel.variance": k.variance,
                 "noise": self.prior.noise}
        posterior = {name: v.detach().expand(num_samples).numpy()[None] for name, v in hyper.items()}
        posterior["f"] = f.numpy()[None]
        return to_inference_data(posterior=posterior, posterior_predictive={"y": y_rep.numpy()[None]},
                                 log_likelihood={"y": loglik.numpy()[None]}, observed_data={"y": self._y.numpy()},
                                 dims={"f": ["obs"], "y": ["obs"]})

    # ------------------------------------------------------------------ save / load
    def _payload(self):
        self._require_fitted("save()")
        pts, idx, vals = self._train
        return {"kernel": None, "config": dict(self.config), "dtype": str(self.dtype).replace("torch.", ""),
                "dim": int(self.kernel.dim), "frames": self.frames_,
                "data": {"points": torch.as_tensor(pts), "observed": torch.as_tensor(idx),
                         "values": None if vals is None else torch.as_tensor(vals)},
                "state": self.prior.state_dict()}

    @classmethod
    def _from_payload(cls, payload, kernel):
        model = cls(**payload["config"], dtype=getattr(torch, payload["dtype"]))
        state = payload["state"]
        k = ConnectionLaplacianKernel(eigenpairs=(state["kernel.eigenvalues"], state["kernel.eigenvectors"]),
                                      nu=model.config["nu"], dim=payload["dim"], field=cls._field, dtype=model.dtype)
        model.prior = _FieldPrior(k, model.config["noise"])
        model.prior.load_state_dict(state)
        model.frames_ = payload["frames"].to(model.dtype)
        data = payload["data"]
        model._train = (data["points"].numpy(), data["observed"].numpy(),
                        None if data["values"] is None else data["values"].numpy())
        model._prepare()
        model._condition()
        return model


@register_model
class VectorFieldGP(_SpectralFieldGP):
    """GP over tangent vector fields on a point cloud (RVGP), connection-Laplacian spectral kernel.

    Parameters
    ----------
    n_neighbors : int
        k of the kNN graph and of the local-PCA neighbourhoods.
    num_eigenpairs : int
        Rank m of the kernel (smallest connection-Laplacian eigenpairs).
    nu : float or None
        Matérn smoothness of the spectral filter; ``None`` = heat (diffusion) kernel.
    dim : int, optional
        Manifold dimension; estimated by local PCA when ``None``.
    noise, lengthscale, variance : float, optional
        Initial values (``noise`` given = fixed); otherwise initialised from the data and learned.
    weights, normalization :
        Passed to :func:`latentgp.linalg.connection_laplacian`.

    ``fit(points, vectors, observed)``; ``predict(indices=None)`` -> DataFrame ``x0..``, ``v0..`` (mean,
    ambient), ``var`` (posterior variance summed over the tangent directions), ``v{k}_lower``/``v{k}_upper``
    (ambient per-component interval), ``observed``. A disconnected kNN graph raises ``ValueError``.
    """

    _field = "vector"

    def _check_values(self, values, n_obs, D):
        arr = _as_float_array(values, "vectors")
        if arr.ndim != 2 or arr.shape[1] != D:
            raise ValueError(f"`vectors` must be (n_observed, D={D}) ambient vectors; got shape {arr.shape}.")
        if arr.shape[0] != n_obs:
            raise ValueError(f"`vectors` has {arr.shape[0]} rows but `observed` selects {n_obs} points.")
        return arr

    def fit(self, points, vectors=None, observed=None, **kwargs):
        return super().fit(points, vectors, observed, **kwargs)

    fit.__doc__ = _SpectralFieldGP.fit.__doc__

    def _targets(self, values, idx):
        T = self.frames_[torch.as_tensor(idx, dtype=torch.long)]
        return torch.einsum("nDd,nD->nd", T, torch.as_tensor(values, dtype=self.dtype)).reshape(-1)

    def _to_output(self, f, idx):
        T = self.frames_[torch.as_tensor(idx, dtype=torch.long)]
        return torch.einsum("nDd,...nd->...nD", T, f).numpy()

    def tangent_fraction(self) -> float:
        """Share of the observed vectors' squared norm that lies in the estimated tangent planes (1 = tangent)."""
        self._require_fitted("tangent_fraction()")
        vals = self._train[2]
        return float(self._y.pow(2).sum() / max(float((vals**2).sum()), 1e-300)) if vals is not None else 1.0

    def predict(self, indices=None, level: float = 0.95, include_noise: bool = False) -> pd.DataFrame:
        """Posterior mean vector field (ambient coordinates) and its uncertainty at points ``indices``."""
        self._require_fitted("predict()")
        level = check_level(level)
        idx = self._indices(indices)
        pts = self._train[0]
        with torch.no_grad():
            mean, Q = self._moments(idx)
            T = self.frames_[torch.as_tensor(idx, dtype=torch.long)]  # (k, D, d)
            amb_mean = torch.einsum("kDd,kd->kD", T, mean)
            amb_var = torch.einsum("kDd,kdm->kDm", T, Q).pow(2).sum(-1)  # diag of T Sigma T^T
            var = Q.pow(2).sum((-1, -2))  # trace of the d x d tangent block
            if include_noise:
                noise = self.prior.noise
                var = var + Q.shape[1] * noise
                amb_var = amb_var + noise * T.pow(2).sum(-1)
        D = pts.shape[1]
        frame = pd.DataFrame(pts[idx], columns=[f"x{j}" for j in range(D)], index=idx)
        half = norm.ppf(0.5 + level / 2) * amb_var.clamp_min(0).sqrt().numpy()
        for j in range(D):
            frame[f"v{j}"] = amb_mean[:, j].numpy()
        frame["var"] = var.numpy()
        for j in range(D):
            frame[f"v{j}_lower"] = frame[f"v{j}"] - half[:, j]
            frame[f"v{j}_upper"] = frame[f"v{j}"] + half[:, j]
        frame["observed"] = np.isin(idx, self._train[1])
        return frame


@register_model
class ScalarFieldGP(_SpectralFieldGP):
    """GP over scalar functions on a point cloud, graph-Laplacian spectral kernel (same parameters as
    :class:`VectorFieldGP`). The constant mean is fixed at the mean of the observed values.

    ``fit(points, values, observed)``; ``predict(indices=None)`` -> DataFrame ``x0..`` + mean, var, lower, upper.
    """

    _field = "scalar"

    def _check_values(self, values, n_obs, D):
        arr = _as_float_array(values, "values")
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1:
            raise ValueError(f"`values` must be 1-D (n_observed,); got shape {arr.shape}.")
        if arr.shape[0] != n_obs:
            raise ValueError(f"`values` has {arr.shape[0]} entries but `observed` selects {n_obs} points.")
        return arr

    @property
    def mean_(self) -> float:
        vals = self._train[2] if self._train is not None else None
        return float(vals.mean()) if vals is not None else 0.0

    def _targets(self, values, idx):
        return torch.as_tensor(values - values.mean(), dtype=self.dtype)

    def _to_output(self, f, idx):
        return f[..., 0].numpy() + self.mean_

    def predict(self, indices=None, level: float = 0.95, include_noise: bool = False) -> pd.DataFrame:
        """Posterior mean and variance of the scalar field at points ``indices`` (default all)."""
        self._require_fitted("predict()")
        idx = self._indices(indices)
        pts = self._train[0]
        with torch.no_grad():
            mean, Q = self._moments(idx)
            var = Q.pow(2).sum((-1, -2)) + (self.prior.noise if include_noise else 0.0)
        inputs = torch.as_tensor(pts[idx])
        frame = prediction_frame(inputs, [f"x{j}" for j in range(pts.shape[1])], mean[:, 0] + self.mean_, var, level)
        frame.index = idx
        frame["observed"] = np.isin(idx, self._train[1])
        return frame
