"""Exact GP regression (``GPRegressor``): Gaussian likelihood, Cholesky of the full covariance.

MAP fit of the hyperparameters by L-BFGS/Adam on the log marginal likelihood, or a Bayesian fit by
Pyro (SVI with an AutoNormal guide, or NUTS) with priors from :mod:`latentgp.models.hyper`.
"""
from __future__ import annotations

import math

import gpytorch
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch.func import functional_call

from ..data import DEFAULT_DTYPE, as_new_inputs, check_int, check_positive, regression_data
from ..fit import optimize, run_svi, seeded, show_progress
from ..io import register_model, saved_dtype
from ..linalg.cholesky import safe_cholesky
from ..objectives import gaussian_log_marginal
from ..objectives_weighted import check_data_weight, data_emphasized_log_marginal
from .base import Model, prediction_frame
from .hyper import build_sites, current_values, raw_overrides, set_values

_METHODS = ("lbfgs", "adam", "svi", "nuts")


def _add_to_diagonal(K, value):
    """K + value I without materialising the identity (an n² saving per step, forward and backward)."""
    return K.diagonal_scatter(K.diagonal(dim1=-2, dim2=-1) + value, dim1=-2, dim2=-1)


class ExactGPPrior(gpytorch.Module):
    """Mean, kernel and Gaussian noise of an exact GP."""

    def __init__(self, kernel, mean: str, noise: float | None):
        super().__init__()
        self.kernel = kernel
        self.mean_module = gpytorch.means.ConstantMean() if mean == "constant" else gpytorch.means.ZeroMean()
        if noise is None:
            self.register_parameter("raw_noise", torch.nn.Parameter(torch.zeros(())))
            self.register_constraint("raw_noise", gpytorch.constraints.Positive())
        else:
            self.register_buffer("fixed_noise", torch.tensor(float(noise), dtype=torch.float64))

    @property
    def noise(self) -> torch.Tensor:
        if hasattr(self, "fixed_noise"):
            return self.fixed_noise
        return self.raw_noise_constraint.transform(self.raw_noise)

    def forward(self, X, Xs=None):
        """(mean(X), K(X, X), noise), or with test inputs (mean(Xs), K(X, Xs), diag K(Xs, Xs), noise)."""
        if Xs is None:
            return self.mean_module(X), self.kernel(X).to_dense(), self.noise
        return self.mean_module(Xs), self.kernel(X, Xs).to_dense(), self.kernel(Xs, diag=True), self.noise


@register_model
class GPRegressor(Model):
    """Exact Gaussian-process regression.

    Parameters
    ----------
    kernel : gpytorch.kernels.Kernel, optional
        Covariance function (default ``ScaleKernel(Matern(nu=2.5))``, initialised from the data).
    mean : {"constant", "zero"}
    noise : float, optional
        Fix the Gaussian noise variance; learned when ``None``.
    priors : dict, optional
        Pyro priors by site name (``"kernel.base_kernel.lengthscale"``, ``"noise"``, ``"mean_module.constant"``)
        for ``method="svi"``/``"nuts"`` and :meth:`pyro_model`.
    dtype : torch.dtype
        float64 by default (float32 GP numerics often fail to factorise).

    Jitter policy: see :func:`latentgp.linalg.safe_cholesky`; the jitter that was needed is kept in
    ``jitter_`` (0.0 if none) and announced with a ``JitterWarning``.
    """

    supports_data_weight = True  # the data-emphasized objective (fit(data_weight=...)) on the dense Cholesky

    default_nu = 2.5  # smoothness of the default Matérn kernel

    def __init__(self, kernel=None, mean: str = "constant", noise: float | None = None, priors=None,
                 dtype=DEFAULT_DTYPE):
        from ..kernels import Matern

        if kernel is not None and not isinstance(kernel, gpytorch.kernels.Kernel):
            raise TypeError(f"`kernel` must be a gpytorch Kernel; got {type(kernel).__name__}.")
        if mean not in ("constant", "zero"):
            raise ValueError(f"`mean` must be 'constant' or 'zero'; got {mean!r}.")
        noise = check_positive(noise, "noise", allow_none=True)
        self._default_kernel = kernel is None
        kernel = gpytorch.kernels.ScaleKernel(Matern(nu=self.default_nu)) if kernel is None else kernel
        self._check_kernel(kernel)
        self.config = {"mean": mean, "noise": noise}
        self.dtype = dtype
        self.prior = ExactGPPrior(kernel, mean, noise).to(dtype)
        self.user_priors = priors
        # Parameters still at these construction values at the first fit get data-driven starting
        # values; anything the user set (or loaded) in between is left alone.
        self._pristine = {k: v.detach().clone() for k, v in self.prior.state_dict().items()}
        self.history = None
        self.jitter_ = 0.0
        self.samples_ = None  # NUTS / SVI draws of the hyperparameters
        self.method_ = None
        self._train = None
        self._sites = None
        self._guide = None
        self._pyro_state = None

    @property
    def kernel(self):
        return self.prior.kernel

    def _check_kernel(self, kernel):
        """Hook for solvers that support only some kernels (raise TypeError naming an alternative)."""

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y=None, *, x=None, steps: int = 100, method: str = "lbfgs", lr: float | None = None,
            progress: bool | None = None, tol: float = 1e-9, seed: int | None = None,
            num_samples: int = 300, warmup: int = 300, max_tree_depth: int = 6, data_weight: float = 1.0):
        """Fit to inputs ``X`` and targets ``y``.

        ``X`` may be a DataFrame and ``y`` one of its column names (inputs: ``x`` or the other columns).
        ``steps=0`` only conditions on the data. ``method``: ``"lbfgs"`` (default) or ``"adam"`` for the
        MAP/type-II maximum likelihood fit; ``"svi"`` (Pyro, AutoNormal guide); ``"nuts"`` (``steps``
        of L-BFGS to initialise, then ``num_samples`` NUTS draws after ``warmup``; ``max_tree_depth`` caps
        the leapfrog steps per draw at 2**max_tree_depth, which bounds the cost of a poorly adapted warm-up).
        ``data_weight`` κ (lbfgs/adam): maximise the data-emphasized objective (κ = 1: the marginal likelihood).
        """
        inputs, target, target_name = regression_data(X, y, x, self.dtype)
        steps = check_int(steps, "steps")
        kappa = check_data_weight(data_weight)
        if method not in _METHODS:
            raise ValueError(f"`method` must be one of {_METHODS}; got {method!r}.")
        if kappa != 1.0 and not self.supports_data_weight:
            raise ValueError(f"`data_weight` is not available for {type(self).__name__}; use GPRegressor.")
        if kappa != 1.0 and method not in ("lbfgs", "adam"):
            raise ValueError("`data_weight` applies to method='lbfgs' or 'adam' (point hyperparameters).")
        if kappa > 1.0 and steps > 0 and self.config["noise"] is None:
            # (1 - κ)(n/2) log s -> +inf as s -> 0: with a learned noise the objective has no maximum.
            raise ValueError("`data_weight` > 1 with a learned noise makes the objective unbounded (noise -> 0); "
                             "fix the noise (GPRegressor(noise=...)) to use the data-emphasized objective.")
        if inputs.values.shape[0] < 2:
            raise ValueError("`X` needs at least 2 rows to fit a GP.")
        if self._train is not None and inputs.values.shape[1] != self._train[0].values.shape[1]:
            raise ValueError("`X` has a different number of columns than the data this model was fitted on.")
        ard = getattr(self._base_kernel(), "ard_num_dims", None)
        if ard is not None and ard != inputs.values.shape[1]:
            raise ValueError(f"`X` has {inputs.values.shape[1]} columns but the kernel has ard_num_dims={ard}.")

        first = self._train is None
        self._train = (inputs, target, target_name)
        if first:
            self._init_from_data(inputs.values, target)
            self._sites = build_sites(self.prior, self.user_priors, loc_scale=float(target.std()))
        X_t, y_t = inputs.values, target
        self.method_ = method
        self.samples_ = None
        with seeded(seed):
            if method in ("lbfgs", "adam", "nuts") and steps > 0:
                self.history = optimize(lambda: -self._lml(X_t, y_t, warn=False, kappa=kappa) / len(y_t),
                                        self.prior.parameters(), method="lbfgs" if method == "nuts" else method,
                                        steps=steps, lr=lr, progress=progress, tol=tol, record=self._record,
                                        desc="GPRegressor")
            elif method == "svi":
                with pyro.get_param_store().scope(self._pyro_state) as state:
                    self._guide = pyro.infer.autoguide.AutoNormal(self.pyro_model)
                    self.history = run_svi(self.pyro_model, self._guide, X_t, y_t, steps=max(steps, 1),
                                           lr=0.02 if lr is None else lr, progress=progress,
                                           record=lambda: self._record(self._guide.median(X_t, y_t)),
                                           desc="GPRegressor SVI")
                    set_values(self.prior, self._sites, self._guide.median(X_t, y_t))
                self._pyro_state = state
            if method == "nuts":
                self._run_nuts(X_t, y_t, num_samples, warmup, max_tree_depth, progress)
        self._condition()
        return self

    def _base_kernel(self):
        k = self.kernel
        while isinstance(k, gpytorch.kernels.ScaleKernel):
            k = k.base_kernel
        return k

    def _init_from_data(self, X, y):
        state = self.prior.state_dict()

        def untouched(name):
            return name in self._pristine and torch.equal(state[name], self._pristine[name])

        with torch.no_grad():
            constant_mean = isinstance(self.prior.mean_module, gpytorch.means.ConstantMean)
            if constant_mean and untouched("mean_module.raw_constant"):
                self.prior.mean_module.constant = y.mean()
            if not hasattr(self.prior, "fixed_noise") and untouched("raw_noise"):
                self.prior.raw_noise.copy_(self.prior.raw_noise_constraint.inverse_transform(0.1 * y.var()))
            if self._default_kernel and untouched("kernel.raw_outputscale"):
                self.kernel.outputscale = y.var()
            if self._default_kernel and untouched("kernel.base_kernel.raw_lengthscale"):
                self.kernel.base_kernel.lengthscale = X.std(0).mean().clamp_min(1e-6)

    def _record(self, values=None):
        values = current_values(self.prior, self._sites) if values is None else values
        return {k: (v.item() if v.numel() == 1 else v.detach().flatten().tolist()) for k, v in values.items()}

    def _lml(self, X, y, *, warn=True, raw=None, kappa=1.0):
        """Log marginal likelihood (differentiable; κ != 1: the data-emphasized objective); caches the
        factorisation in ``self._last``."""
        mean, K, noise = self.prior(X) if raw is None else functional_call(self.prior, raw, (X,))
        if kappa != 1.0:
            value, L, alpha, jitter = data_emphasized_log_marginal(K, y - mean, noise, kappa, warn=warn)
        else:
            K = _add_to_diagonal(K, noise)
            value, L, alpha, jitter = gaussian_log_marginal(K, y - mean, warn=warn)
        self._last = (L, alpha, jitter, mean)
        return value

    def _condition(self):
        """Cache the Cholesky factor and K^{-1}(y - m) at the current hyperparameters."""
        inputs, y, _ = self._train
        with torch.no_grad():
            self._lml(inputs.values, y, warn=True)
            self._cache = self._last
            self.jitter_ = self._cache[2]

    def log_marginal_likelihood(self) -> float:
        """log p(y | X, hyperparameters), natural log, full constant, at the current hyperparameters."""
        self._require_fitted("log_marginal_likelihood()")
        inputs, y, _ = self._train
        with torch.no_grad():
            return float(self._lml(inputs.values, y, warn=False))

    # ------------------------------------------------------------------ Pyro
    def pyro_model(self, X=None, y=None):
        """Pyro model: hyperparameter priors (see ``priors``) and y ~ N(m, K + noise I)."""
        if X is None:
            self._require_fitted("pyro_model() without data")
            X, y = self._train[0].values, self._train[1]
        values = {s.name: pyro.sample(s.name, s.prior) for s in self._sites}
        self._observe(X, y, raw_overrides(self._sites, values))

    def _observe(self, X, y, raw):
        """The likelihood statement of :meth:`pyro_model` at hyperparameters ``raw``."""
        mean, K, noise = functional_call(self.prior, raw, (X,))
        K = _add_to_diagonal(K, noise)
        try:
            L, _ = safe_cholesky(K, warn=False)
        except torch.linalg.LinAlgError:
            # An unfactorisable draw has zero density: reject it instead of crashing the sampler.
            pyro.factor("y_unfactorisable", torch.tensor(-math.inf, dtype=X.dtype))
            return
        pyro.sample("y", dist.MultivariateNormal(mean, scale_tril=L), obs=y)

    def pyro_guide(self, X=None, y=None):
        """The AutoNormal guide used by ``method="svi"`` (created on first use)."""
        if self._guide is None:
            self._guide = pyro.infer.autoguide.AutoNormal(self.pyro_model)
        return self._guide(X, y)

    def _run_nuts(self, X, y, num_samples, warmup, max_tree_depth, progress):
        init = current_values(self.prior, self._sites)
        kernel = pyro.infer.NUTS(self.pyro_model, init_strategy=pyro.infer.autoguide.init_to_value(values=init),
                                 max_tree_depth=check_int(max_tree_depth, "max_tree_depth", 1))
        mcmc = pyro.infer.MCMC(kernel, num_samples=check_int(num_samples, "num_samples", 1),
                               warmup_steps=check_int(warmup, "warmup"), disable_progbar=not show_progress(progress))
        # Early warm-up leapfrog steps can overshoot to values outside a prior's support (exp underflow
        # to 0); with validation off these get zero density and are rejected instead of raising.
        with pyro.validation_enabled(False):
            mcmc.run(X, y)
        self.samples_ = {k: v.detach() for k, v in mcmc.get_samples().items()}
        # Point hyperparameters: posterior medians (used by log_marginal_likelihood and plots).
        set_values(self.prior, self._sites, {k: v.median(0).values for k, v in self.samples_.items()})

    # ------------------------------------------------------------------ prediction
    def _posterior_moments(self, Xs, include_noise, cache, raw=None):
        X = self._train[0].values
        args = (X, Xs)
        mean_s, Kxs, kss, noise = self.prior(*args) if raw is None else functional_call(self.prior, raw, args)
        L, alpha, _, _ = cache
        v = torch.linalg.solve_triangular(L, Kxs, upper=False)
        mean = mean_s + Kxs.T @ alpha
        var = (kss - (v * v).sum(0)).clamp_min(0.0)
        if include_noise:
            var = var + noise
        return mean, var

    def predict(self, X, level: float = 0.95, include_noise: bool = False, *, max_draws: int = 100):
        """Posterior predictive at new inputs: DataFrame with the input columns + mean, var, lower, upper.

        ``include_noise=True`` gives the distribution of new observations instead of the latent function.
        After ``method="nuts"`` the prediction averages over (up to ``max_draws``, thinned) posterior
        draws of the hyperparameters: mean and variance of the mixture, intervals from a normal with
        those moments.
        """
        self._require_fitted("predict()")
        inputs = self._train[0]
        new = as_new_inputs(X, inputs.columns, dtype=self.dtype)
        with torch.no_grad():
            if self.samples_ is None or self.method_ != "nuts":
                mean, var = self._posterior_moments(new.values, include_noise, cache=self._cache)
            else:
                means, vars_ = [], []
                for raw in self._draws_raw(max_draws):
                    self._lml(inputs.values, self._train[1], warn=False, raw=raw)
                    m, v = self._posterior_moments(new.values, include_noise, raw=raw, cache=self._last)
                    means.append(m)
                    vars_.append(v)
                means, vars_ = torch.stack(means), torch.stack(vars_)
                mean = means.mean(0)
                var = vars_.mean(0) + means.var(0, unbiased=False)
        return prediction_frame(new.values, inputs.columns, mean, var, level)

    def _draws_raw(self, max_draws):
        n = next(iter(self.samples_.values())).shape[0]
        idx = np.unique(np.linspace(0, n - 1, min(n, max_draws)).round().astype(int))
        for i in idx:
            yield raw_overrides(self._sites, {k: v[i] for k, v in self.samples_.items()})

    # ------------------------------------------------------------------ ArviZ
    def to_inference_data(self, num_samples: int = 500, seed: int | None = None):
        """ArviZ InferenceData with posterior (hyperparameters and latent ``f`` at the training inputs),
        posterior_predictive ``y``, pointwise log_likelihood ``y`` and observed_data ``y``.

        Hyperparameter draws come from NUTS (all draws), the SVI guide, or are the MAP values repeated;
        each draw gets one latent function sample f ~ p(f | y, hyperparameters) (Matheron's rule), so
        ``az.loo`` and ``az.plot_ppc`` work for every fit method.
        """
        from ..convert import to_inference_data

        self._require_fitted("to_inference_data()")
        X, y = self._train[0].values, self._train[1]
        with seeded(seed), torch.no_grad():
            if self.method_ == "nuts" and self.samples_ is not None:
                hyper = self.samples_
            elif self.method_ == "svi" and self._guide is not None:
                with pyro.get_param_store().scope(self._pyro_state):
                    pred = pyro.infer.Predictive(self.pyro_model, guide=self._guide, num_samples=num_samples,
                                                 return_sites=[s.name for s in self._sites])
                    hyper = {k: v for k, v in pred(X, None).items()}
            else:
                point = current_values(self.prior, self._sites)
                hyper = {k: v.expand(num_samples, *v.shape) for k, v in point.items()}
            n_draws = next(iter(hyper.values())).shape[0] if hyper else num_samples
            f_draws, noises = [], []
            for i in range(n_draws):
                raw = raw_overrides(self._sites, {k: v[i] for k, v in hyper.items()})
                mean, K, noise = functional_call(self.prior, raw, (X,))
                f_draws.append(self._sample_f(mean, K, noise, y))
                noises.append(noise)
            f = torch.stack(f_draws)
            noise = torch.stack(noises).reshape(-1, 1)
            y_rep = f + noise.sqrt() * torch.randn_like(f)
            loglik = dist.Normal(f, noise.sqrt()).log_prob(y)
        posterior = {k: v.numpy()[None] for k, v in hyper.items()}
        posterior["f"] = f.numpy()[None]
        return to_inference_data(
            posterior=posterior,
            posterior_predictive={"y": y_rep.numpy()[None]},
            log_likelihood={"y": loglik.numpy()[None]},
            observed_data={"y": y.numpy()},
            dims={"f": ["obs"], "y": ["obs"]},
        )

    @staticmethod
    def _sample_f(mean, K, noise, y):
        # Matheron's rule: f_post = f_prior + K (K + noise I)^{-1} (y - f_prior - eps). Only needs
        # Cholesky factors of K (with jitter if singular) and K + noise I, which are stable.
        Lk, _ = safe_cholesky(K, warn=False, max_jitter=1e-2)
        f_prior = mean + Lk @ torch.randn_like(y)
        eps = noise.sqrt() * torch.randn_like(y)
        Ln, _ = safe_cholesky(_add_to_diagonal(K, noise), warn=False)
        return f_prior + K @ torch.cholesky_solve((y - f_prior - eps).unsqueeze(-1), Ln).squeeze(-1)

    # ------------------------------------------------------------------ save / load
    def _payload(self):
        inputs, y, name = self._train
        return {
            "config": {**self.config, "default_kernel": self._default_kernel, "method": self.method_},
            "kernel": self.kernel,
            "state": self.prior.state_dict(),
            "data": {"X": inputs.values, "y": y, "columns": list(inputs.columns), "target": name},
            "samples": self.samples_,
        }

    @classmethod
    def _from_payload(cls, payload, kernel):
        cfg = payload["config"]
        model = cls(kernel=kernel, mean=cfg["mean"], noise=cfg["noise"], dtype=saved_dtype(payload))
        model._default_kernel = cfg["default_kernel"]
        model.prior.load_state_dict(payload["state"])
        data = payload["data"]
        from ..data import Inputs

        model._train = (Inputs(data["X"], tuple(data["columns"])), data["y"], data["target"])
        model._sites = build_sites(model.prior, None, loc_scale=float(data["y"].std()))
        model.samples_ = payload["samples"]
        model.method_ = cfg["method"]
        model._condition()
        return model
