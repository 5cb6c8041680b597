"""State-space GP regression in 1-D time (``StateSpaceGP``): the exact GP of :class:`GPRegressor`,
solved in linear time by Kalman filtering / RTS smoothing on the kernel's state-space form.

Same prior (kernel + mean + Gaussian noise), same hyperparameter sites, same fit / NUTS / SVI /
ArviZ / save-load machinery as :class:`GPRegressor`; only the linear algebra differs, so both give
the same log marginal likelihood and predictions (tested to 1e-8).
"""
from __future__ import annotations

import pyro
import torch
from torch.func import functional_call

from ..io import register_model
from ..kernels.state_space import state_space_form
from ..linalg.kalman import kalman_filter, kalman_smoother
from .exact import ExactGPPrior, GPRegressor

# to_inference_data draws latent functions with a dense Cholesky (Matheron's rule); beyond this size
# that is too slow, and we say so instead of silently running an O(n^3) computation.
MAX_DENSE_DRAWS = 5000


class StateSpacePrior(ExactGPPrior):
    """The exact-GP prior, evaluated as a linear-Gaussian state-space model on sorted times."""

    def forward(self, t):
        """Mean and state-space matrices (A, Q, H, R, P0) at sorted times ``t`` (what the Kalman solvers need)."""
        form = state_space_form(self.kernel)
        dt = torch.diff(t, prepend=t[:1])
        A, Q = form.discretise(dt)
        H = form.H.reshape(1, -1)
        R = self.noise.reshape(1, 1, 1).expand(t.shape[0], 1, 1)
        mean = self.mean_module(t.unsqueeze(-1))
        return mean, A, Q, H, R, form.P_inf


@register_model
class StateSpaceGP(GPRegressor):
    """Gaussian-process regression on 1-D time in O(n): Kalman filter + RTS smoother.

    Kernels: anything with a state-space form -- Matérn at nu = 1/2 ... 7/2 (latentgp or gpytorch),
    :class:`~latentgp.kernels.HidaMatern` of any order, and sums, products and scalings of these.
    Other kernels (RBF, periodic, Matérn off the half-integers) raise a TypeError naming an alternative.
    Times need not be sorted or distinct; missing values are simply rows you leave out.

    Parameters are those of :class:`GPRegressor` (default kernel ``ScaleKernel(Matern(nu=1.5))``).
    """

    default_nu = 1.5
    supports_data_weight = False

    def __init__(self, kernel=None, noise: float | None = None, mean: str = "zero", priors=None, **kwargs):
        super().__init__(kernel=kernel, mean=mean, noise=noise, priors=priors, **kwargs)
        # Same parameters as the dense prior (so saved models and sites agree), Kalman forward.
        state = self.prior.state_dict()
        self.prior = StateSpacePrior(self.prior.kernel, mean, noise).to(self.dtype)
        self.prior.load_state_dict(state)
        self._pristine = {k: v.detach().clone() for k, v in self.prior.state_dict().items()}

    def _check_kernel(self, kernel):
        state_space_form(kernel)  # raises TypeError naming a kernel with a state-space form

    def fit(self, X, y=None, **kwargs):
        """Fit to times ``X`` (1-D) and observations ``y``; same options as :meth:`GPRegressor.fit`."""
        from ..data import as_inputs, split_frame

        Xc, yc, x = split_frame(X, y, kwargs.get("x"))
        if as_inputs(Xc, "X", columns=x).values.shape[1] != 1:
            raise ValueError("`X` must hold a single time column for StateSpaceGP (use GPRegressor for d > 1).")
        return super().fit(X, y, **kwargs)

    # -- linear algebra: everything below replaces a dense Cholesky by a Kalman pass -------------
    def _sorted(self, X):
        t = X[:, 0]
        order = torch.argsort(t, stable=True)
        return t[order], order

    def _lml(self, X, y, *, warn=True, raw=None, kappa=1.0):
        t, order = self._sorted(X)
        mean, A, Q, H, R, P0 = self.prior(t) if raw is None else functional_call(self.prior, raw, (t,))
        resid = (y[order] - mean).unsqueeze(-1)
        value = kalman_filter(A, Q, H, R, resid, P0).log_likelihood
        self._last = (None, None, 0.0, None)
        return value

    def _posterior_moments(self, Xs, include_noise, cache=None, raw=None):
        X, y = self._train[0].values, self._train[1]
        t_all = torch.cat([X[:, 0], Xs[:, 0]])
        t, order = self._sorted(t_all.unsqueeze(-1))
        observed = (order < X.shape[0])
        mean_all, A, Q, H, R, P0 = self.prior(t) if raw is None else functional_call(self.prior, raw, (t,))
        y_all = torch.cat([y, torch.zeros(Xs.shape[0], dtype=y.dtype)])[order]
        resid = torch.where(observed, y_all - mean_all, torch.zeros_like(y_all)).unsqueeze(-1)
        sm = kalman_smoother(A, Q, H, R, resid, P0, mask=observed)
        f_mean = mean_all + (sm.means @ H.T).squeeze(-1)
        f_var = (H @ sm.covs @ H.T).reshape(-1)
        # Undo the sort and keep the test rows.
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        test = inverse[X.shape[0]:]
        mean, var = f_mean[test], f_var[test].clamp_min(0.0)
        if include_noise:
            var = var + R[0, 0, 0]
        return mean, var

    def _observe(self, X, y, raw):
        pyro.factor("y", self._lml(X, y, raw=raw))

    def to_inference_data(self, num_samples: int = 500, seed: int | None = None):
        """As :meth:`GPRegressor.to_inference_data` (latent draws use a dense factorisation, so n <= 5000)."""
        self._require_fitted("to_inference_data()")
        n = self._train[1].shape[0]
        if n > MAX_DENSE_DRAWS:
            raise ValueError(
                f"to_inference_data draws latent functions densely and supports n <= {MAX_DENSE_DRAWS} "
                f"training points (this model has {n}); use predict() for posterior means and variances."
            )
        with torch.no_grad():
            dense = ExactGPPrior(self.prior.kernel, self.config["mean"], self.config["noise"]).to(self.dtype)
            dense.load_state_dict(self.prior.state_dict())
        prior, self.prior = self.prior, dense
        try:
            return super().to_inference_data(num_samples=num_samples, seed=seed)
        finally:
            self.prior = prior
