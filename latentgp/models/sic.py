"""``SICGP``: latent GP by the DKLGP sparse inverse-Cholesky variational approximation.

Algorithm (Cao et al. 2023): order the inputs by maximin in the kernel's scaled space, build the
nearest-earlier-neighbour pattern with radius ρ ℓ_i, approximate the prior by its KL-optimal sparse
inverse-Cholesky factor Û, fit q(f) = N(ν, (VVᵀ)⁻¹) with V on the same pattern by maximising the
ELBO (minibatches of spatially compact blocks; see :mod:`latentgp.variational.sic`) jointly with the
hyperparameters, and predict at new inputs by ordering them after the training inputs.

The ordering and pattern are computed once per ``fit`` with the kernel lengthscales at that moment
(the initial ones on a first fit); refitting re-orders with the learned lengthscales.
"""
from __future__ import annotations

import math

import gpytorch
import numpy as np
import pandas as pd
import torch
from scipy.spatial import cKDTree

from ..data import (
    DEFAULT_DTYPE,
    Inputs,
    as_new_inputs,
    check_int,
    check_point_estimate_kernel,
    check_positive,
    regression_data,
)
from ..fit import optimize, seeded, train
from ..io import register_model, saved_dtype
from ..linalg.sic import (
    _check_rho_m,
    check_points,
    maximin_ordering,
    pattern_mask,
    sic_columns,
    sic_pattern,
    triangular_structure,
)
from ..variational.sic import (
    GaussianLikelihood,
    RowAdam,
    SICVariational,
    block_system,
    elbo_terms,
    gaussian_optimal_mean,
    get_likelihood,
    local_posterior_columns,
    marginals,
    sampled_elbo_terms,
    solve_batch_columns,
)
from .base import Model, prediction_frame


def _spatial_order(points: np.ndarray, chunk: int) -> np.ndarray:
    """A permutation of ``points`` whose consecutive runs of ``chunk`` are spatially compact (KD-tree leaves)."""
    return cKDTree(points, leafsize=max(1, chunk // 2)).indices


def _lengthscale(kernel):
    """The ARD lengthscales that define the scaled space (None if the kernel has none)."""
    k = kernel
    while isinstance(k, gpytorch.kernels.ScaleKernel):
        k = k.base_kernel
    ls = getattr(k, "lengthscale", None)
    return None if ls is None else ls.detach().reshape(-1)


@register_model
class SICGP(Model):
    """Latent GP with a sparse inverse-Cholesky (DKLGP) variational posterior.

    Parameters
    ----------
    kernel : gpytorch Kernel, optional
        Default ``ScaleKernel(Matern(nu=1.5))`` initialised from the data.
    rho : float
        Neighbourhood radius in units of each point's maximin length scale (accuracy/speed knob).
    likelihood : {"gaussian", "bernoulli", "poisson", "student_t"} or SICLikelihood, default Gaussian.
    noise : float, optional
        Fix the Gaussian noise variance (learned when ``None``).
    max_neighbors : int or None
        Cap on the conditioning set size m (``None``: no cap).
    mean : {"constant", "zero"}
    """

    def __init__(self, kernel=None, rho: float = 2.0, likelihood=None, noise: float | None = None, *,
                 max_neighbors: int | None = 30, mean: str = "constant", dtype=DEFAULT_DTYPE):
        from ..kernels import Matern

        check_point_estimate_kernel(kernel, "SICGP")
        rho, max_neighbors = _check_rho_m(rho, max_neighbors)
        noise = check_positive(noise, "noise", allow_none=True)
        if mean not in ("constant", "zero"):
            raise ValueError(f"`mean` must be 'constant' or 'zero'; got {mean!r}.")
        self.likelihood = get_likelihood(likelihood, noise).to(dtype)
        self._default_kernel = kernel is None
        self.kernel = (gpytorch.kernels.ScaleKernel(Matern(nu=1.5)) if kernel is None else kernel).to(dtype)
        mean_module = gpytorch.means.ConstantMean() if mean == "constant" else gpytorch.means.ZeroMean()
        self.mean_module = mean_module.to(dtype)
        lik = self.likelihood  # what save/load must rebuild: a fixed noise and a Student-t df live on the instance
        self.config = {"rho": rho, "max_neighbors": max_neighbors, "mean": mean,
                       "noise": float(lik.fixed_noise) if hasattr(lik, "fixed_noise") else None,
                       "likelihood": lik.name, "df": getattr(lik, "df", None)}
        self.dtype = dtype
        self.history = None
        self._train = None
        self.q = None
        # set by fit(); the defaults are what a loaded or unfitted model uses
        self._kappa, self._n_samples, self._closed_form = 1.0, 16, False
        self._U_fixed = self._full_structure = self._raw_W = None

    # ------------------------------------------------------------------ prior pieces
    def _prior_mean(self):
        if isinstance(self.mean_module, gpytorch.means.ConstantMean):
            return self.mean_module.constant.reshape(())
        return torch.zeros((), dtype=self.dtype)

    def _blocks(self, points: torch.Tensor) -> torch.Tensor:
        """K over each row's point set: (B, M, d) -> (B, M, M)."""
        return self.kernel(points, points).to_dense()

    def _prior_columns(self, batch: np.ndarray) -> torch.Tensor:
        """Û's columns (KL-optimal) for training points ``batch``, differentiable in the hyperparameters."""
        fixed = self._U_fixed
        if fixed is not None:  # hyperparameters frozen during this optimisation: Û is a constant
            return fixed[batch]
        idx = self._pattern_t[batch]
        return sic_columns(self._blocks(self._X[idx]), self._mask[batch])

    def _all_prior_columns(self) -> torch.Tensor:
        """Û's columns for every training point (no gradient), in chunks of ~4096 columns."""
        n = len(self._order)
        with torch.no_grad():
            return torch.cat([self._prior_columns(b) for b in np.array_split(np.arange(n), max(1, n // 4096))])

    def hyperparameters(self):
        params = list(self.kernel.parameters()) + list(self.mean_module.parameters())
        return params + list(self.likelihood.parameters())

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y=None, *, x=None, steps: int = 500, batch_size: int = 256, lr: float = 0.02,
            method: str = "adam", learn_hyperparameters: bool = True, progress: bool | None = None,
            tol: float | None = None, seed: int | None = None, data_weight: float = 1.0, n_samples: int = 16,
            closed_form: bool | None = None):
        """Fit to inputs ``X`` and targets ``y`` (or ``fit(df, "column")``).

        ``method="adam"``: minibatch steps on blocks of ``batch_size`` nearby points (Adam on the touched
        variational rows only, :class:`~latentgp.variational.sic.RowAdam`; Adam for the hyperparameters),
        each an unbiased ELBO estimate from ``n_samples`` (rounded up to even: antithetic ± pairs)
        draws of q on the block's ancestor closure (cost ~ closure size × m × n_samples, not × batch_size;
        :func:`latentgp.variational.sic.sampled_elbo_terms`). ``method="lbfgs"``: full-batch L-BFGS on the
        exact ELBO (small n).
        ``closed_form`` (Gaussian likelihood, ``method="adam"``; default on for the Gaussian likelihood): update
        q in closed form between minibatch steps, before the first step, once per pass over the blocks
        (amortised O(batch_size) per step) and after the last step. The mean ν is set to its exact ELBO optimum
        given the hyperparameters (a sparse linear system, preconditioned CG:
        :func:`latentgp.variational.sic.gaussian_optimal_mean`) instead of taking gradient steps; while the
        hyperparameters are learned, each update also moves V by the change of the neighbourhood-posterior
        factor W since the last one, so q follows the hyperparameters and keeps what the minibatch steps
        learned. Without this, each row of ν and V moves only when its block is drawn (a few times per row at
        n = 1e5), q lags the hyperparameters and the fit stalls far from the truth. (With ``steps=0`` no update
        runs: ν stays at the prior mean.) For every Gaussian-likelihood fit, V starts at W
        (:func:`latentgp.variational.sic.local_posterior_columns`), other likelihoods at Û.
        ``learn_hyperparameters=False`` keeps the kernel, mean and likelihood fixed.
        ``data_weight`` κ: maximise the data-emphasized ELBO κ·E_q[log p(y | f)] − KL (κ = 1: the ELBO;
        :mod:`latentgp.objectives_weighted`). q is full-rank over the training points, so with κ > 1 a
        learned Gaussian noise has no optimum (noise -> 0): fix it with ``SICGP(noise=...)``.
        """
        inputs, target, target_name = regression_data(X, y, x, self.dtype)
        check_points(inputs.values, "X")
        self.likelihood.check(target.numpy())
        steps = check_int(steps, "steps")
        from ..objectives_weighted import check_data_weight

        kappa = check_data_weight(data_weight)
        if kappa > 1.0 and learn_hyperparameters and steps > 0 and self.likelihood.name == "gaussian" \
                and not hasattr(self.likelihood, "fixed_noise"):
            raise ValueError("`data_weight` > 1 with a learned Gaussian noise makes the objective unbounded "
                             "(noise -> 0); fix the noise (SICGP(noise=...)).")
        batch_size = check_int(batch_size, "batch_size", 1)
        n_samples = check_int(n_samples, "n_samples", 1)
        check_positive(lr, "lr")
        if method not in ("adam", "lbfgs"):
            raise ValueError(f"`method` must be 'adam' or 'lbfgs'; got {method!r}.")
        gaussian = isinstance(self.likelihood, GaussianLikelihood)
        if closed_form is None:
            closed_form = gaussian and method == "adam"
        elif not isinstance(closed_form, (bool, np.bool_)):
            raise TypeError(f"`closed_form` must be True, False or None; got {closed_form!r}.")
        elif closed_form and not gaussian:
            raise ValueError("`closed_form=True` needs the Gaussian likelihood (no closed form otherwise).")
        elif closed_form and method != "adam":
            raise ValueError("`closed_form=True` updates q between minibatch steps: use method='adam' (L-BFGS "
                             "optimises the exact ELBO, ν included).")
        closed_form = bool(closed_form)
        n, d = inputs.values.shape
        if n < 2:
            raise ValueError("`X` needs at least 2 rows to fit a GP.")
        ard = _lengthscale(self.kernel)
        if ard is not None and ard.numel() not in (1, d):
            raise ValueError(f"`X` has {d} columns but the kernel has {ard.numel()} lengthscales.")

        first = self._train is None
        self._train = (inputs, target, target_name)
        if first:
            self._init_from_data(inputs.values, target)
        self._kappa, self._n_samples = kappa, n_samples
        self._closed_form = closed_form
        with seeded(seed):
            self._build(inputs.values, target, batch_size)
            self.history = self._optimise(steps, lr, method, learn_hyperparameters, progress, tol)
        return self

    def _init_from_data(self, X, y):
        with torch.no_grad():
            lik = self.likelihood.name
            centre = {"gaussian": y.mean(), "student_t": y.median(), "poisson": torch.log(y.mean() + 0.5)}
            if isinstance(self.mean_module, gpytorch.means.ConstantMean):
                self.mean_module.constant = centre.get(lik, torch.zeros((), dtype=self.dtype))
            if isinstance(self.likelihood, GaussianLikelihood) and not hasattr(self.likelihood, "fixed_noise"):
                self.likelihood.raw_noise.copy_(torch.log(torch.expm1(0.1 * y.var())))
            if self._default_kernel:
                if lik in ("gaussian", "student_t"):
                    self.kernel.outputscale = y.var()
                self.kernel.base_kernel.lengthscale = (X.std(0).mean() / 2).clamp_min(1e-6)

    def _build(self, X, y, batch_size):
        """Ordering, pattern, minibatch blocks and q initialised (ν = prior mean; V = the neighbourhood-posterior
        factor W for a Gaussian likelihood, else Û)."""
        ard = _lengthscale(self.kernel)
        ard = None if ard is None else ard.numpy()
        Xn = X.numpy()
        order, scales = maximin_ordering(Xn, ard=ard)
        pattern = sic_pattern(Xn[order], self.config["rho"], scales, self.config["max_neighbors"], ard=ard)
        self._order, self._pattern = order, pattern
        self._pattern_t = torch.as_tensor(pattern)
        self._mask = pattern_mask(self._pattern_t)
        self._X, self._y = X[order], y[order]
        scaled = Xn[order] / (1.0 if ard is None else ard)
        # Blocks of nearby points (KD-tree leaf order) share ancestors: the solve per step stays small.
        leaf_order = _spatial_order(scaled, batch_size)
        self._blocks_idx = np.array_split(leaf_order, max(1, math.ceil(len(order) / batch_size)))
        self._systems = {}  # block -> BlockSystem (ancestor closure, local pattern), built on first visit
        self._U_fixed = None
        self._full_structure = None  # triangular_structure(pattern), built on the first mean solve
        U = self._all_prior_columns()
        with torch.no_grad():
            mu = self._prior_mean().expand(len(order)).clone()
            if isinstance(self.likelihood, GaussianLikelihood):  # start V at a local posterior, not the prior
                U = local_posterior_columns(U, self._data_precision())
        self.q = SICVariational(pattern, U, mu).to(self.dtype)
        # V's starting point, for `_set_optimal_mean(track_factor)` (an n x M copy: closed-form fits only)
        self._raw_W = self.q.raw.detach().clone() if self._closed_form else None

    def _data_precision(self):
        return self._kappa / self.likelihood.noise

    def _set_optimal_mean(self, track_factor: bool = False):
        """ν <- its ELBO optimum given the current hyperparameters (Gaussian likelihood; warm-started CG).
        ``track_factor``: also move V by the change of the neighbourhood-posterior factor W since the last
        call (V_ii scaled by W_ii^new / W_ii^old, off-diagonal entries shifted by W^new - W^old)."""
        with torch.no_grad():
            U = self._U_fixed if self._U_fixed is not None else self._all_prior_columns()
            if track_factor:
                W = local_posterior_columns(U, self._data_precision())
                raw_W = torch.cat([torch.log(W[:, :1]), W[:, 1:]], 1)
                self.q.raw.add_(raw_W - self._raw_W)
                self._raw_W = raw_W
            if self._full_structure is None:
                self._full_structure = triangular_structure(self._pattern)
            nu, _ = gaussian_optimal_mean(U, self._pattern_t, self._prior_mean(), self._y, self._data_precision(),
                                          x0=self.q.nu[:, 0], tol=max(1e-6, 100 * torch.finfo(self.dtype).eps),
                                          structure=self._full_structure)
            self.q.nu.copy_(nu[:, None])

    def _block_loss(self, batch, sparse):
        """−(ELBO estimate)/n from one block (unbiased over the fixed partition)."""
        U = self._prior_columns(batch)
        ell, kl, _ = elbo_terms(self.q, self._pattern, batch, U, self._prior_mean(), self._y[batch],
                                self.likelihood, sparse)
        n = len(self._order)
        weight = n / len(batch) if len(batch) == n else len(self._blocks_idx)
        return -weight * (self._kappa * ell - kl).sum() / n

    def _system(self, k: int):
        if k not in self._systems:
            self._systems[k] = block_system(self._pattern, self._blocks_idx[k])
        return self._systems[k]

    def _sampled_block_loss(self, k: int, local=None):
        """−(unbiased ELBO estimate)/n from block k by :func:`sampled_elbo_terms` (``local``: q's rows on the
        block's ancestor closure as leaf tensors, see there)."""
        batch = self._blocks_idx[k]
        ell, kl = sampled_elbo_terms(self.q, self._system(k), self._prior_columns(batch), self._prior_mean(),
                                     self._y[batch], self.likelihood, self._n_samples, local=local)
        weight = len(self._blocks_idx)
        return -weight * (self._kappa * ell - kl).sum() / len(self._order)

    def _record(self):
        out = {}
        ls = _lengthscale(self.kernel)
        if ls is not None:
            out["lengthscale"] = ls.tolist() if ls.numel() > 1 else float(ls)
        if isinstance(self.kernel, gpytorch.kernels.ScaleKernel):
            out["outputscale"] = float(self.kernel.outputscale.detach())
        out["mean"] = float(self._prior_mean().detach())
        out.update(self.likelihood.record())
        return out

    def _optimise(self, steps, lr, method, learn_hyper, progress, tol):
        hyper = [p for p in self.hyperparameters() if p.requires_grad] if learn_hyper else []
        if steps == 0:
            return pd.DataFrame(columns=["step", "loss"])
        if method == "lbfgs":
            everything = np.arange(len(self._order))
            return optimize(lambda: self._block_loss(everything, False), [self.q.raw, self.q.nu] + hyper,
                            method="lbfgs", steps=steps, progress=progress, tol=tol, record=self._record,
                            desc="SICGP")
        if not hyper:
            self._U_fixed = self._all_prior_columns()
        try:
            history = self._adam(steps, lr, hyper, progress, tol)
            if self._closed_form:
                self._set_optimal_mean(track_factor=bool(hyper))  # for the final hyperparameters
            return history
        finally:
            self._U_fixed = self._raw_W = None

    def _adam(self, steps, lr, hyper, progress, tol):
        return train(self._make_step(lr, hyper), steps=steps, progress=progress, tol=tol, record=self._record,
                     desc="SICGP")

    def _make_step(self, lr, hyper):
        """One minibatch step: a random block, the sampled ELBO, Adam on the q rows it touched (its ancestor
        closure: cost independent of n) and on the hyperparameters."""
        row_opt = RowAdam([self.q.raw, self.q.nu], lr=lr)
        hyper_opt = torch.optim.Adam(hyper, lr=lr) if hyper else None
        n_blocks = len(self._blocks_idx)
        closed_form = self._closed_form
        count = [0]

        def step():
            if closed_form and count[0] % n_blocks == 0:  # once per expected pass over the blocks
                self._set_optimal_mean(track_factor=bool(hyper))
            count[0] += 1
            k = int(torch.randint(n_blocks, ()))
            system = self._system(k)
            A = system.rows
            raw_A = self.q.raw.detach().index_select(0, A).requires_grad_()
            nu_A = self.q.nu.detach().index_select(0, A).requires_grad_()
            if hyper_opt is not None:
                hyper_opt.zero_grad()
            loss = self._sampled_block_loss(k, local=(raw_A, nu_A))
            loss.backward()
            with torch.no_grad():
                nu_grad = None if closed_form else nu_A.grad[system.mean_rows]
                row_opt.step([A, A[system.mean_rows]], [raw_A.grad, nu_grad])
            if hyper_opt is not None:
                hyper_opt.step()
            return loss.item()

        return step

    # ------------------------------------------------------------------ objective
    def elbo(self) -> float:
        """The full ELBO (natural log) at the current state, summed over all training points."""
        self._require_fitted("elbo()")
        with torch.no_grad():
            total = 0.0
            for batch in self._blocks_idx:
                ell, kl, _ = elbo_terms(self.q, self._pattern, batch, self._prior_columns(batch), self._prior_mean(),
                                        self._y[batch], self.likelihood)
                total += float((ell - kl).sum())
            return total

    # ------------------------------------------------------------------ prediction
    def latent_moments(self, X, chunk: int = 256):
        """Posterior mean and variance of f at new inputs ``X`` (ordered after the training inputs)."""
        self._require_fitted("predict()")
        chunk = check_int(chunk, "chunk", 1)
        inputs = self._train[0]
        new = as_new_inputs(X, inputs.columns, dtype=self.dtype)
        ard = _lengthscale(self.kernel)
        ard = None if ard is None else ard.numpy()
        Xs = new.values
        train_scaled = self._X.numpy() / (1.0 if ard is None else ard)
        scales, _ = cKDTree(train_scaled).query(Xs.numpy() / (1.0 if ard is None else ard))
        m = self.config["max_neighbors"]
        nb = torch.as_tensor(sic_pattern(Xs.numpy(), self.config["rho"], np.maximum(scales, 1e-300), m, ard=ard,
                                         reference=self._X.numpy()))
        # Chunks of nearby queries share ancestors, so each chunk's exact solve stays small.
        near = torch.as_tensor(_spatial_order(Xs.numpy() / (1.0 if ard is None else ard), chunk))
        means, variances = torch.empty(len(Xs), dtype=self.dtype), torch.empty(len(Xs), dtype=self.dtype)
        with torch.no_grad():
            mu = self._prior_mean()
            for s in range(0, len(Xs), chunk):
                rows = near[s:s + chunk]
                part_nb, part_x = nb[rows], Xs[rows]
                # A query at a training input is that point's f (its neighbourhood block would be singular).
                same = torch.as_tensor(scales[rows.numpy()] == 0)
                valid = (part_nb >= 0) & ~same[:, None]
                safe = part_nb.clamp_min(0)
                pts = torch.cat([part_x[:, None], torch.where(valid[..., None], self._X[safe], part_x[:, None])], 1)
                mask = torch.cat([torch.ones_like(valid[:, :1]), valid], 1)
                col = sic_columns(self._blocks(pts), mask)
                # Column [1/d, -b/d]: f* | f_s ~ N(μ + bᵀ(f_s − μ), d²).
                b, d2 = -col[:, 1:] / col[:, :1], col[:, 0] ** -2
                b[same, 0], d2[same] = 1.0, 0.0
                valid[same, 0] = True
                mean_s = mu + (b * (self.q.mean(safe) - mu)).sum(1)
                sol = solve_batch_columns(self.q, self._pattern, safe, b * valid)
                means[rows], variances[rows] = mean_s, (sol ** 2).sum(0) + d2
        return new, means, variances

    def predict(self, X, level: float = 0.95, include_noise: bool = False):
        """DataFrame with the input columns + mean, var, lower, upper of the latent f (Gaussian
        likelihood with ``include_noise=True``: of new observations)."""
        new, mean, var = self.latent_moments(X)
        if include_noise:
            if not isinstance(self.likelihood, GaussianLikelihood):
                raise ValueError("`include_noise=True` is available for the Gaussian likelihood only.")
            var = var + self.likelihood.noise.detach()
        return prediction_frame(new.values, self._train[0].columns, mean, var, level)

    def training_marginals(self) -> pd.DataFrame:
        """q's marginal mean and variance at the training inputs (original row order)."""
        self._require_fitted("training_marginals()")
        idx = np.concatenate(self._blocks_idx)  # spatially compact chunks (small ancestor closures)
        mean, var = marginals(self.q, self._pattern, idx)
        inv = np.argsort(self._order[idx])
        return prediction_frame(self._train[0].values, self._train[0].columns, mean[inv], var[inv], 0.95)

    # ------------------------------------------------------------------ save / load
    def _payload(self):
        inputs, y, name = self._train
        return {
            "config": {**self.config, "default_kernel": self._default_kernel},
            "kernel": self.kernel,
            "state": {"kernel": self.kernel.state_dict(), "mean": self.mean_module.state_dict(),
                      "likelihood": self.likelihood.state_dict(), "q": self.q.state_dict(),
                      "order": torch.as_tensor(self._order), "blocks": [torch.as_tensor(b) for b in self._blocks_idx]},
            "data": {"X": inputs.values, "y": y, "columns": list(inputs.columns), "target": name},
        }

    @classmethod
    def _from_payload(cls, payload, kernel):
        cfg, state, data = payload["config"], payload["state"], payload["data"]
        likelihood, noise = cfg["likelihood"], cfg["noise"]
        if likelihood == "student_t" and cfg.get("df") is not None:
            from ..variational.sic import StudentTLikelihood

            likelihood = StudentTLikelihood(cfg["df"])
        model = cls(kernel=kernel, rho=cfg["rho"], likelihood=likelihood, noise=noise,
                    max_neighbors=cfg["max_neighbors"], mean=cfg["mean"], dtype=saved_dtype(payload))
        model._default_kernel = cfg["default_kernel"]
        model.kernel.load_state_dict(state["kernel"])
        model.mean_module.load_state_dict(state["mean"])
        model.likelihood.load_state_dict(state["likelihood"])
        model._train = (Inputs(data["X"], tuple(data["columns"])), data["y"], data["target"])
        order = state["order"].numpy()
        model._order, model._pattern = order, state["q"]["pattern"].numpy()
        model._pattern_t = state["q"]["pattern"]
        model._mask = pattern_mask(model._pattern_t)
        model._X, model._y = data["X"][order], data["y"][order]
        model._blocks_idx = [b.numpy() for b in state["blocks"]]
        model._systems = {}
        model.q = SICVariational(model._pattern, torch.ones(model._pattern.shape, dtype=model.dtype),
                                 torch.zeros(len(order), dtype=model.dtype))
        model.q.load_state_dict(state["q"])
        return model
