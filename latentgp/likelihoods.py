"""Observation models for latent-GP models, written for conjugate-computation VI.

Each likelihood gives, for y and a Gaussian η ~ N(mu, var) (the linear predictor), the expected
log-density and the expected first and second derivatives in η:
``E[log p(y|η)]``, ``E[d/dη log p]``, ``E[d²/dη² log p]``. CVI's natural-gradient site update needs
exactly these (Bonnet's and Price's theorems turn them into the gradients in the mean and variance).
"""
from __future__ import annotations

import math

import numpy as np
import torch

_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(32)  # probabilists' Hermite: weight exp(-x²/2)


class Likelihood:
    name = "likelihood"

    def expected(self, y, mu, var):
        """(E log p, E ∂η log p, E ∂²η log p), each shaped like ``mu``."""
        raise NotImplementedError

    def check(self, y: np.ndarray, name: str = "counts") -> None:
        """Raise ValueError naming ``name`` if ``y`` is outside the support."""

    def log_prob(self, y, eta):
        """log p(y | η) elementwise (the expectation at zero variance)."""
        return self.expected(y, eta, torch.zeros_like(eta))[0]

    def sample(self, eta):
        """Draws y ~ p(y | η), shaped like ``eta``."""
        raise NotImplementedError


class Poisson(Likelihood):
    """y ~ Poisson(exp(η) · bin_width): closed forms via E[exp(η)] = exp(mu + var/2)."""

    name = "poisson"

    def __init__(self, bin_width: float = 1.0):
        self.bin_width = float(bin_width)

    def expected(self, y, mu, var):
        rate = self.bin_width * torch.exp(mu + 0.5 * var)
        loglik = y * (mu + math.log(self.bin_width)) - rate - torch.lgamma(y + 1)
        return loglik, y - rate, -rate

    def sample(self, eta):
        return torch.poisson(self.bin_width * torch.exp(eta))

    def check(self, y, name="counts"):
        if (y < 0).any() or (np.floor(y) != y).any():
            raise ValueError(f"`{name}` must be non-negative integers for a Poisson likelihood.")


class Bernoulli(Likelihood):
    """y ∈ {0, 1} with P(y=1) = sigmoid(η); expectations by 32-point Gauss–Hermite quadrature."""

    name = "bernoulli"

    def expected(self, y, mu, var):
        x = torch.as_tensor(_GH_X, dtype=mu.dtype)
        w = torch.as_tensor(_GH_W / _GH_W.sum(), dtype=mu.dtype)
        eta = mu.unsqueeze(-1) + var.clamp_min(0).sqrt().unsqueeze(-1) * x
        yy = y.unsqueeze(-1)
        logp = yy * eta - torch.nn.functional.softplus(eta)
        s = torch.sigmoid(eta)
        return (logp * w).sum(-1), ((yy - s) * w).sum(-1), (-(s * (1 - s)) * w).sum(-1)

    def sample(self, eta):
        return torch.bernoulli(torch.sigmoid(eta))

    def check(self, y, name="counts"):
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"`{name}` must contain only 0 and 1 for a Bernoulli likelihood.")


class Gaussian(Likelihood):
    """y ~ N(η, noise): CVI with step 1 is then exact Gaussian conditioning."""

    name = "gaussian"

    def __init__(self, noise: float = 1.0):
        self.noise = float(noise)

    def expected(self, y, mu, var):
        r = y - mu
        loglik = -0.5 * (r * r + var) / self.noise - 0.5 * math.log(2 * math.pi * self.noise)
        return loglik, r / self.noise, torch.full_like(mu, -1.0 / self.noise)

    def sample(self, eta):
        return eta + math.sqrt(self.noise) * torch.randn_like(eta)


def get_likelihood(likelihood, bin_width: float) -> Likelihood:
    if isinstance(likelihood, Likelihood):
        return likelihood
    options = {"poisson": lambda: Poisson(bin_width), "bernoulli": Bernoulli, "gaussian": Gaussian}
    if likelihood not in options:
        raise ValueError(f"`likelihood` must be one of {sorted(options)} or a Likelihood; got {likelihood!r}.")
    return options[likelihood]()
