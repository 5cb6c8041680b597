"""``SVGP``: stochastic variational GP regression with inducing points (Hensman et al. 2013).

The prior, the whitened inducing-point posterior q(u) and the predictive marginals are gpytorch's
(``VariationalStrategy`` with a full or mean-field ``q``); this module adds the model protocol and the
objective. Objective, per minibatch B of a data set of n points:

    κ · (n / |B|) Σ_{i∈B} E_q[log N(y_i; f_i, s)] − KL(q(u) ‖ p(u)),

the ELBO at κ = 1 and the data-emphasized ELBO (Harvey et al.; :mod:`latentgp.objectives_weighted`) at
κ > 1. The data-emphasized objective is the cure for the over-smoothing of the sparse ELBO: with few
inducing points the trace term −tr(K − Q)/(2s) of E_q[log p(y | f)] penalises short lengthscales (they make
Q = K_xz K_zz⁻¹ K_zx a poor copy of K), and with a mean-field q so does the gap KL(q ‖ posterior), which
grows with the posterior correlations that informative data create. The ELBO then prefers long
lengthscales and a large noise (on El Niño with M = 200: a noise variance 150–360× the exact GP's, see
BENCHMARKS.md); κ > 1 shifts the balance back to the data.
"""
from __future__ import annotations

import gpytorch
import pandas as pd
import torch

from ..data import (
    DEFAULT_DTYPE,
    Inputs,
    as_new_inputs,
    check_int,
    check_point_estimate_kernel,
    check_positive,
    regression_data,
)
from ..fit import optimize, seeded
from ..io import register_model, saved_dtype
from ..objectives_weighted import check_data_weight, weighted_elbo
from .base import Model, prediction_frame

_VARIATIONAL = {"full": gpytorch.variational.CholeskyVariationalDistribution,
                "meanfield": gpytorch.variational.MeanFieldVariationalDistribution}


def _jitter(dtype):
    """Diagonal jitter on K(Z, Z): 1e-10 in float64 (gpytorch's 1e-6 default alone moves the ELBO by ~1e-4
    nats; see tests), gpytorch's default in float32. gpytorch's Cholesky raises it when a factorisation fails."""
    return 1e-10 if dtype == torch.float64 else None


class _Approximate(gpytorch.models.ApproximateGP):
    def __init__(self, kernel, mean_module, inducing, variational: str, learn_inducing: bool):
        distribution = _VARIATIONAL[variational](inducing.shape[0])
        strategy = gpytorch.variational.VariationalStrategy(self, inducing, distribution,
                                                             jitter_val=_jitter(inducing.dtype),
                                                             learn_inducing_locations=learn_inducing)
        super().__init__(strategy)
        self.kernel, self.mean_module = kernel, mean_module

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.kernel(x))


@register_model
class SVGP(Model):
    """GP regression with M inducing points and a variational q(u), trained by (minibatch) ELBO.

    Parameters
    ----------
    kernel : gpytorch Kernel, optional — default ``ScaleKernel(Matern(nu=1.5, ard))`` initialised from the data
    num_inducing : int — M; inducing inputs start at a random subset of the training inputs
    variational : {"full", "meanfield"} — q(u) with a full Cholesky covariance or a diagonal one
    mean : {"constant", "zero"}
    noise : float, optional — fix the Gaussian noise variance (learned when None)
    learn_inducing : bool — optimise the inducing inputs with the hyperparameters
    """

    def __init__(self, kernel=None, num_inducing: int = 256, variational: str = "full", mean: str = "constant",
                 noise: float | None = None, *, learn_inducing: bool = True, dtype=DEFAULT_DTYPE):
        check_point_estimate_kernel(kernel, "SVGP (on the data-weighted ELBO)")
        if variational not in _VARIATIONAL:
            raise ValueError(f"`variational` must be 'full' or 'meanfield'; got {variational!r}.")
        if mean not in ("constant", "zero"):
            raise ValueError(f"`mean` must be 'constant' or 'zero'; got {mean!r}.")
        self.config = {"num_inducing": check_int(num_inducing, "num_inducing", 1), "variational": variational,
                       "mean": mean, "noise": check_positive(noise, "noise", allow_none=True),
                       "learn_inducing": bool(learn_inducing)}
        self.dtype = dtype
        self._kernel, self._default_kernel = kernel, kernel is None
        # gpytorch's default noise floor is 1e-4; ours (as in the other models) is 1e-8 of the data's units.
        self.likelihood = gpytorch.likelihoods.GaussianLikelihood(
            noise_constraint=gpytorch.constraints.GreaterThan(1e-8)).to(dtype)
        if noise is not None:
            self.likelihood.noise = torch.tensor(noise, dtype=dtype)
            self.likelihood.raw_noise.requires_grad_(False)
        self.gp = None
        self.history = None
        self._train = None

    @property
    def kernel(self):
        return self.gp.kernel if self.gp is not None else self._kernel

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y=None, *, x=None, steps: int = 1000, lr: float = 0.01, batch_size: int | None = None,
            method: str = "adam", data_weight: float = 1.0, learn_hyperparameters: bool = True,
            progress: bool | None = None, tol: float | None = None, seed: int | None = None):
        """Fit to inputs ``X`` and targets ``y`` (or ``fit(df, "column")``).

        ``batch_size=None``: full-batch steps; otherwise minibatches of that many rows (Adam).
        ``method="lbfgs"``: full-batch L-BFGS. ``data_weight`` κ ≥ 1 up-weights the expected
        log-likelihood (module docstring). With M ≥ n inducing points q can interpolate the data, so a
        learned noise would go to 0 under κ > 1: that combination raises (fix the noise or lower M).
        ``learn_hyperparameters=False`` optimises q(u) only.
        """
        inputs, target, target_name = regression_data(X, y, x, self.dtype)
        steps = check_int(steps, "steps")
        check_positive(lr, "lr")
        kappa = check_data_weight(data_weight)
        if method not in ("adam", "lbfgs"):
            raise ValueError(f"`method` must be 'adam' or 'lbfgs'; got {method!r}.")
        n, d = inputs.values.shape
        if n < 2:
            raise ValueError("`X` needs at least 2 rows to fit a GP.")
        batch_size = n if batch_size is None else min(check_int(batch_size, "batch_size", 1), n)
        if method == "lbfgs" and batch_size < n:
            raise ValueError("`method='lbfgs'` needs full batches; leave `batch_size=None`.")
        if kappa > 1 and self.config["noise"] is None and learn_hyperparameters and self.config["num_inducing"] >= n:
            raise ValueError("`data_weight` > 1 with a learned noise and `num_inducing` >= n has no optimum "
                             "(noise -> 0); fix the noise (SVGP(noise=...)) or use fewer inducing points.")
        if self._train is not None and d != self._train[0].values.shape[1]:
            raise ValueError(f"`X` has {d} input columns but this SVGP was fitted on {self._train[0].values.shape[1]} "
                             "(its inducing points and kernel have that width); create a new SVGP.")
        with seeded(seed):
            if self.gp is None:
                self._build(inputs.values, target)
            self._train = (inputs, target, target_name)
            self.history = self._optimise(inputs.values, target, steps, lr, batch_size, method, kappa,
                                          learn_hyperparameters, progress, tol)
        return self

    def _build(self, X, y):
        """The gpytorch model, initialised from the data (scales, lengthscales, inducing subset)."""
        from ..kernels import Matern

        n, d = X.shape
        kernel = self._kernel
        if kernel is None:
            kernel = gpytorch.kernels.ScaleKernel(Matern(nu=1.5, ard_num_dims=d))
        mean_module = gpytorch.means.ConstantMean() if self.config["mean"] == "constant" else gpytorch.means.ZeroMean()
        m = min(self.config["num_inducing"], n)
        inducing = X[torch.randperm(n)[:m]].clone()
        self.gp = _Approximate(kernel, mean_module, inducing, self.config["variational"],
                               self.config["learn_inducing"]).to(self.dtype)
        with torch.no_grad():
            if isinstance(mean_module, gpytorch.means.ConstantMean):
                self.gp.mean_module.constant = y.mean()
            if self._default_kernel:
                self.gp.kernel.outputscale = y.var()
                self.gp.kernel.base_kernel.lengthscale = (X.std(0) / 2).clamp_min(1e-6)
            if self.config["noise"] is None:
                self.likelihood.noise = 0.1 * y.var()

    def _terms(self, X, y):
        """(Σ_i E_q log p(y_i | f_i) over the rows given, KL(q(u) ‖ p(u)))."""
        f = self.gp(X)
        return self.likelihood.expected_log_prob(y, f).sum(), self.gp.variational_strategy.kl_divergence()

    def _optimise(self, X, y, steps, lr, batch_size, method, kappa, learn_hyper, progress, tol):
        if steps == 0:
            return pd.DataFrame(columns=["step", "loss"])
        n = len(y)
        self.gp.train()
        self.likelihood.train()
        variational = list(self.gp.variational_strategy._variational_distribution.parameters())
        params = variational + (self.hyperparameters() if learn_hyper else [])

        def loss():
            rows = torch.randperm(n)[:batch_size] if batch_size < n else slice(None)
            ell, kl = self._terms(X[rows], y[rows])
            return -weighted_elbo(ell * (n / batch_size), kl, kappa) / n

        try:
            return optimize(loss, params, method=method, steps=steps, lr=lr if method == "adam" else None,
                            progress=progress, tol=tol, record=self._record, desc="SVGP")
        finally:
            self.gp.eval()
            self.likelihood.eval()

    def hyperparameters(self):
        """Kernel, mean and noise parameters, and the inducing inputs when they are learned."""
        params = list(self.gp.kernel.parameters()) + list(self.gp.mean_module.parameters())
        params += [p for p in self.likelihood.parameters() if p.requires_grad]
        if self.config["learn_inducing"]:
            params.append(self.gp.variational_strategy.inducing_points)
        return params

    def _record(self):
        out = {"noise": float(self.likelihood.noise.detach())}
        k = self.gp.kernel
        if isinstance(k, gpytorch.kernels.ScaleKernel):
            out["outputscale"] = float(k.outputscale.detach())
            k = k.base_kernel
        ls = getattr(k, "lengthscale", None)
        if ls is not None:
            ls = ls.detach().reshape(-1)
            out["lengthscale"] = ls.tolist() if ls.numel() > 1 else float(ls)
        return out

    # ------------------------------------------------------------------ objective and prediction
    def elbo(self, data_weight: float = 1.0) -> float:
        """The full-data ELBO (natural log), or its data-emphasized version at ``data_weight``."""
        self._require_fitted("elbo()")
        inputs, y, _ = self._train
        with torch.no_grad():
            ell, kl = self._terms(inputs.values, y)
            return float(weighted_elbo(ell, kl, data_weight))

    def predict(self, X, level: float = 0.95, include_noise: bool = False) -> pd.DataFrame:
        """DataFrame with the input columns + mean, var, lower, upper of f (``include_noise``: of new y)."""
        self._require_fitted("predict()")
        new = as_new_inputs(X, self._train[0].columns, dtype=self.dtype)
        with torch.no_grad(), gpytorch.settings.skip_posterior_variances(False):
            f = self.gp(new.values)
            mean, var = f.mean, f.variance
        if include_noise:
            var = var + self.likelihood.noise.detach().reshape(())
        return prediction_frame(new.values, self._train[0].columns, mean, var, level)

    # ------------------------------------------------------------------ save / load
    def _payload(self):
        inputs, y, name = self._train
        return {"config": {**self.config, "default_kernel": self._default_kernel},
                "kernel": self.gp.kernel,
                "state": {"gp": self.gp.state_dict(), "likelihood": self.likelihood.state_dict()},
                "data": {"X": inputs.values, "y": y, "columns": list(inputs.columns), "target": name}}

    @classmethod
    def _from_payload(cls, payload, kernel):
        cfg, state, data = dict(payload["config"]), payload["state"], payload["data"]
        default = cfg.pop("default_kernel")
        model = cls(kernel=kernel, dtype=saved_dtype(payload), **cfg)
        model._default_kernel = default
        inducing = state["gp"]["variational_strategy.inducing_points"]
        model.gp = _Approximate(kernel, gpytorch.means.ConstantMean() if cfg["mean"] == "constant"
                                else gpytorch.means.ZeroMean(), inducing.clone(), cfg["variational"],
                                cfg["learn_inducing"]).to(model.dtype)
        model.gp.load_state_dict(state["gp"])
        model.likelihood.load_state_dict(state["likelihood"])
        model.gp.eval()
        model.likelihood.eval()
        model._train = (Inputs(data["X"], tuple(data["columns"])), data["y"], data["target"])
        return model

