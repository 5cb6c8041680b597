"""Data-emphasized objectives: the data term of an ELBO / marginal likelihood scaled by κ.

Harvey et al., "Learning hyperparameters via a data-emphasized variational objective": learn
hyperparameters by maximising  κ · E_q[log p(y | f)] − KL(q || p(f))  with κ ≥ 1, which counters the
over-smoothing (too long lengthscales, too large noise) the plain evidence can prefer. κ = 1 is the
usual objective.

For a Gaussian likelihood the maximum over q is in closed form, because
N(y; f, s)^κ = N(y; f, s / κ) · (2π s)^{(1 − κ) n / 2} · κ^{−n / 2}:

    max_q [κ E_q log N(y; f, s I) − KL(q || N(m, K))]
        = log N(y; m, K + (s / κ) I) + (1 − κ)(n / 2) log(2π s) − (n / 2) log κ,

so exact and grid GPs get the data-emphasized objective by evaluating their usual log marginal
likelihood at noise s / κ and adding :func:`tempered_gaussian_correction`. For SVI models
:func:`scale_observations` multiplies every observed site's log-likelihood by κ.
"""
from __future__ import annotations

import math

import torch

from .data import check_positive
from .objectives import gaussian_log_marginal


def check_data_weight(kappa) -> float:
    """κ must be a positive finite number (κ = 1: the ordinary objective)."""
    return check_positive(kappa, "data_weight")


def tempered_gaussian_correction(noise, n: int, kappa: float):
    """(1 − κ)(n/2) log(2π s) − (n/2) log κ: add to log N(y; m, K + (s/κ) I) (see module docstring)."""
    kappa = check_data_weight(kappa)
    noise = torch.as_tensor(noise)
    return (1.0 - kappa) * 0.5 * n * torch.log(2 * math.pi * noise) - 0.5 * n * math.log(kappa)


def weighted_elbo(expected_log_likelihood, kl, kappa: float):
    """κ · E_q[log p(y | f)] − KL(q || p): the general form, for models with a non-Gaussian likelihood."""
    return check_data_weight(kappa) * expected_log_likelihood - kl


def data_emphasized_log_marginal(K: torch.Tensor, residual: torch.Tensor, noise, kappa: float = 1.0, *,
                                 warn: bool = True):
    """Exact-GP data-emphasized objective: K (n, n) without noise, residual y − m, Gaussian noise s.

    Returns ``(value, L, alpha, jitter)`` like :func:`latentgp.objectives.gaussian_log_marginal`
    (factorisation of K + (s/κ) I, reusable for prediction at the tempered noise). κ = 1 gives the
    log marginal likelihood.
    """
    kappa = check_data_weight(kappa)
    n = residual.shape[-1]
    Kn = K.diagonal_scatter(K.diagonal(dim1=-2, dim2=-1) + noise / kappa, dim1=-2, dim2=-1)
    value, L, alpha, jitter = gaussian_log_marginal(Kn, residual, warn=warn)
    return value + tempered_gaussian_correction(noise, n, kappa), L, alpha, jitter


def scale_observations(model, kappa: float):
    """Wrap a Pyro model so every *observed* site's log-likelihood is multiplied by κ (latent sites and
    the guide are untouched): SVI on the wrapped model maximises the data-emphasized ELBO."""
    from pyro.poutine.messenger import Messenger

    kappa = check_data_weight(kappa)

    class _ScaleObserved(Messenger):
        def _process_message(self, msg):
            if msg["type"] == "sample" and msg.get("is_observed", False):
                msg["scale"] = kappa * msg["scale"]

    def wrapped(*args, **kwargs):
        with _ScaleObserved():
            return model(*args, **kwargs)

    return wrapped
