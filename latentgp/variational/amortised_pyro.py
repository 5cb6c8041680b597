"""Pyro distributions over latent GP paths for the GP-VAE, with the exact KL registered for the pair.

``GPPathPrior(prior, batch)`` is L independent GP paths per sequence on the prior's time grid and
``AmortisedGPPosterior(prior, mean, precision)`` is q = prior × encoder sites / Z
(:mod:`latentgp.variational.amortised`); both have batch shape (sequences,) and event shape (T, L), so
they sit in a ``pyro.plate`` over sequences. ``kl_divergence(q, p)`` is the closed-form KL that the
posterior computation already returns (:class:`pyro.infer.TraceMeanField_ELBO` uses it), taken from the
same call that drew q's reparameterised sample: no second smoother pass, no Monte-Carlo KL.

``log_prob`` is exact as well (Pyro evaluates it on every latent site even when the KL is analytic):
log p(z) by a noiseless Kalman filter (compiled, :func:`latentgp.linalg.kalman_sites.path_log_prob`; or the
dense Cholesky of K on the dense path), and
log q(z) = log p(z) + Σ log N(ỹ_t; z_t, 1/λ_t) - log Z, since q = p Π t / Z.
"""
from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints
from torch.distributions.kl import register_kl

from ..linalg.kalman import kalman_filter
from .amortised import MarkovPrior, posterior_and_samples
from .amortised_dense import DensePrior
from .cvi import sample_prior_states


def _shape(prior) -> tuple[int, int]:
    """(T, L) of a dense or state-space prior."""
    if isinstance(prior, DensePrior):
        return prior.K.shape[1], prior.K.shape[0]
    return prior.n_steps, prior.A.shape[0]


class _PathDistribution(TorchDistribution):
    """Batch (sequences,), event (T, L). ``expand`` to the own batch shape returns self (``pyro.plate`` expands
    every site), so the registered KL and the cached posterior are used as such."""

    arg_constraints = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def expand(self, batch_shape, _instance=None):
        if torch.Size(batch_shape) == self.batch_shape:
            return self
        return super().expand(batch_shape, _instance)


def _compiled_sites():
    """:mod:`latentgp.linalg.kalman_sites`, or None where numba cannot be imported (then the scans run)."""
    try:
        from ..linalg import kalman_sites
    except ImportError:  # pragma: no cover - numba is a dependency
        return None
    return kalman_sites


def _same_prior(a, b) -> bool:
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, MarkovPrior) and a.n_steps != b.n_steps:  # a regular grid's (A, Q) do not show its length
        return False
    pairs = ((a.K, b.K),) if isinstance(a, DensePrior) else ((a.A, b.A), (a.Q, b.Q), (a.P0, b.P0), (a.H, b.H))
    return all(x.shape == y.shape and torch.equal(x, y) for x, y in pairs)


class GPPathPrior(_PathDistribution):
    """z_n ~ Π_l GP(0, k_l) on the grid, independently for ``batch`` sequences: batch (batch,), event (T, L)."""

    def __init__(self, prior: DensePrior | MarkovPrior, batch: int, validate_args=None):
        self.prior = prior
        super().__init__(torch.Size([batch]), torch.Size(_shape(prior)), validate_args=validate_args)

    def rsample(self, sample_shape=()):
        shape = torch.Size(sample_shape) + self.batch_shape
        if isinstance(self.prior, DensePrior):  # f = M ε with the exact factor K = M Mᵀ
            M = self.prior.M
            eps = torch.randn(*shape, M.shape[0], M.shape[-1], dtype=M.dtype)
            return torch.einsum("ltk,...lk->...tl", M, eps)
        A, Q, P0, H = self.prior.joint
        return sample_prior_states(A, Q, P0, tuple(shape)) @ H.T

    def log_prob(self, z):
        zl = z.transpose(-1, -2)  # (..., L, T)
        if isinstance(self.prior, DensePrior):
            chol = torch.linalg.cholesky(self.prior.K)
            w = torch.linalg.solve_triangular(chol, zl.unsqueeze(-1), upper=False).squeeze(-1)
            T = zl.shape[-1]
            half_logdet = chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            return (-0.5 * (w * w).sum(-1) - half_logdet - 0.5 * T * math.log(2 * math.pi)).sum(-1)
        p = self.prior  # the path is the noiseless observation H x_t of the state-space model
        compiled = _compiled_sites() if z.device.type == "cpu" else None
        if compiled is not None:  # compiled filter, hand-written gradient (the scans' call overhead dominates)
            try:
                flat = z.reshape(-1, *z.shape[-2:])
                return compiled.path_log_prob(p.A, p.Q, p.P0, p.H[0].detach(), flat).reshape(z.shape[:-2])
            except compiled.NotPositiveDefinite:
                pass
        R = zl.new_zeros(zl.shape[-1], 1, 1)
        return kalman_filter(p.A, p.Q, p.H, R, zl.unsqueeze(-1), p.P0).log_likelihood.sum(-1)


class AmortisedGPPosterior(_PathDistribution):
    """q(z_n) ∝ p(z_n) Π_t N(ỹ_nt; z_n(t), 1/λ_nt), sites ``mean``, ``precision`` (B, T, L): batch (B,), event (T, L).

    The posterior (mean, KL, log Z) is computed with the first draw (or on first use) and cached."""

    def __init__(self, prior: DensePrior | MarkovPrior, mean: torch.Tensor, precision: torch.Tensor,
                 validate_args=None):
        if mean.dim() != 3 or precision.shape != mean.shape or tuple(mean.shape[1:]) != _shape(prior):
            raise ValueError(f"`mean` and `precision` must both be (B, T, L) = (B, {_shape(prior)[0]}, "
                             f"{_shape(prior)[1]}); got {tuple(mean.shape)} and {tuple(precision.shape)}.")
        self.prior, self.site_mean, self.site_precision = prior, mean, precision
        self._post = None
        super().__init__(mean.shape[:1], mean.shape[1:], validate_args=validate_args)

    @property
    def posterior(self):
        if self._post is None:
            self._post = posterior_and_samples(self.prior, self.site_mean, self.site_precision, 0)[0]
        return self._post

    @property
    def mean(self):
        return self.posterior.mean

    def rsample(self, sample_shape=()):
        shape = torch.Size(sample_shape)
        post, z = posterior_and_samples(self.prior, self.site_mean, self.site_precision, max(shape.numel(), 1))
        if self._post is None:
            self._post = post
        return z.reshape(shape + z.shape[1:])

    def log_prob(self, z):
        lam, resid = self.site_precision, self.site_mean - z
        log_sites = -0.5 * (lam * resid * resid - lam.log() + math.log(2 * math.pi)).sum((-1, -2))
        return GPPathPrior(self.prior, self.batch_shape[0]).log_prob(z) + log_sites - self.posterior.log_z


@register_kl(AmortisedGPPosterior, GPPathPrior)
def _kl_amortised_gp(q, p):
    """Exact KL(q ‖ p) per sequence, if q was built on p's prior (else Pyro falls back to sampling)."""
    if q.batch_shape != p.batch_shape or not _same_prior(q.prior, p.prior):
        raise NotImplementedError("KL(q ‖ p) is closed form only for a posterior built on the same prior.")
    return q.posterior.kl
