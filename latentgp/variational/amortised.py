"""Amortised Gaussian posteriors over GP latent trajectories (GP-VAE, MM-GPVAE).

An encoder outputs, for every sequence b, latent l and time t, a Gaussian *site*
t(z) ∝ N(ỹ_blt; z_l(t), 1/λ_blt). The posterior is prior × sites, normalised:

    q(z) = p(z) Π t(z) / Z,    KL(q ‖ p) = E_q[Σ log t(z)] - log Z,

so every term of the ELBO = E_q[log p(y | z)] - KL is available without a Monte-Carlo KL. Two exact
representations of the GP prior are provided:

* time domain, state space (:func:`markov_posterior`): one Kalman smoothing pass per latent, O(T),
  through :func:`latentgp.variational.cvi.site_posterior`. log Z is the Kalman log-likelihood of the
  pseudo-observations. Draws from q by Matheron's rule (:func:`sample_markov_posterior`). In training
  (:func:`posterior_and_samples`) the pass, the KL and the draws run compiled with a hand-written reverse
  pass (:mod:`latentgp.linalg.kalman_sites`); the differentiable scans are the fallback and the twin.
* Fourier domain (:func:`fourier_posterior`, MM-GPVAE): z_l(t) = Σ_m Φ_m(t) a_lm with a real Fourier
  basis of period P and independent a_lm ~ N(0, d_lm), d from the kernel's spectral density. q(a) is
  computed in whitened coordinates u = a / √d, where the posterior precision I + √d Φᵀ Λ Φ √d has
  eigenvalues ≥ 1 (the raw precision 1/d + ΦᵀΛΦ is hopelessly ill-conditioned at high frequencies).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..kernels import spectral_density, state_space_form
from ..kernels.state_space import bare_matern_discretised
from ..linalg.kalman import kalman_smoother
from .cvi import (
    Sites,
    latent_marginals,
    sample_prior_states,
    site_expected_log,
    site_posterior,
    stack_latents,
)


# --------------------------------------------------------------------------------------------------
# time domain: independent state-space priors per latent, smoothed as a batch axis
# --------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class MarkovPrior:
    """State-space prior of L independent latents on a time grid, laid out for a (batch, L) smoother."""

    A: torch.Tensor  # (L, T, s, s), or (L, 1, s, s) on a regular grid (time-invariant)
    Q: torch.Tensor  # like A
    P0: torch.Tensor  # (L, s, s)
    H: torch.Tensor  # (1, s), the same for every latent
    n_steps: int  # T

    @functools.cached_property
    def joint(self) -> tuple:
        """(A, Q (T, L·s, L·s), P0, H) of the stacked joint state, for the scans' prior path draws; built on
        first use (the compiled path never needs it)."""
        L, _, s, _ = self.A.shape
        full = (L, self.n_steps, s, s)
        return stack_latents(self.A.expand(full), self.Q.expand(full), self.P0, self.H.expand(L, -1))


def time_steps(times: torch.Tensor) -> torch.Tensor:
    """dt_t = t_t - t_{t-1} with dt_0 = 0 (the first state is drawn from the stationary covariance)."""
    return torch.cat((times.new_zeros(1), times[1:] - times[:-1]))


def regular_step(times: torch.Tensor) -> torch.Tensor | None:
    """The common step of an evenly spaced grid ``times`` (T,) as a 1-element tensor, or None. Steps may differ
    by the rounding of the time values themselves (16 ulps of max |t|: ``arange(T) * 0.02`` is regular in float32
    too); a larger difference makes the grid irregular (one (A, Q) per step, same results, a little slower)."""
    dt = times[1:] - times[:-1]
    if not len(dt):
        return None
    tol = 16 * torch.finfo(times.dtype).eps * float(times.abs().max())
    return dt[:1] if bool(((dt - dt[0]).abs() <= tol).all()) else None


def markov_prior(kernel, times: torch.Tensor) -> MarkovPrior:
    """State-space form of ``kernel`` (batch_shape (L,)) on the sorted grid ``times`` (T,).

    Each latent is smoothed as its own batch entry (state dim s, closed-form 2x2 algebra for
    Matérn-3/2) rather than as one joint state of dim L·s; this needs H to be common to all latents,
    as it is for Matérn / Hida-Matérn forms. On a regular grid A and Q are one time-invariant pair."""
    step = regular_step(times)
    dt = time_steps(times) if step is None else step
    fast = bare_matern_discretised(kernel, dt)  # the default GP-VAE kernel: one autograd node
    if fast is not None:
        return MarkovPrior(*fast[:3], fast[3][None], len(times))
    form = state_space_form(kernel)
    s = form.state_dim
    H = form.H.reshape(-1, s)
    if not torch.equal(H, H[:1].expand_as(H)):
        raise ValueError("`kernel`: every latent's state-space form must share its observation row H.")
    return MarkovPrior(*form.discretise(dt), form.P_inf, H[:1], len(times))


def diagonal_sites(mean: torch.Tensor, precision: torch.Tensor) -> Sites:
    """Sites from encoder outputs ``mean``, ``precision`` (B, T, L), as (B, L, T, 1[, 1]) 1x1 blocks."""
    lam = precision.transpose(-1, -2).unsqueeze(-1)
    return Sites(lam.unsqueeze(-1), lam * mean.transpose(-1, -2).unsqueeze(-1))


class MarkovPosterior(NamedTuple):
    mean: torch.Tensor  # (B, T, L)
    var: torch.Tensor  # (B, T, L) marginal variances
    kl: torch.Tensor  # (B,) KL(q ‖ p) per sequence
    log_z: torch.Tensor  # (B,)


def markov_posterior(prior: MarkovPrior, sites: Sites) -> MarkovPosterior:
    """q = prior × sites by one Kalman smoothing pass; KL(q ‖ p) = E_q[Σ log t] - log Z exactly."""
    (y_site, R_site, mask), sm, m_f, V_f = site_posterior(prior.A, prior.Q, prior.P0, prior.H, sites, engine="auto")
    expected_log_sites = site_expected_log(sites, y_site, R_site, mask, m_f, V_f)  # (B, L)
    kl = (expected_log_sites - sm.log_likelihood).sum(-1)
    return MarkovPosterior(m_f.squeeze(-1).transpose(-1, -2), V_f[..., 0, 0].transpose(-1, -2), kl,
                           sm.log_likelihood.sum(-1))


def sample_markov_posterior(prior: MarkovPrior, sites: Sites, num_samples: int, generator=None) -> torch.Tensor:
    """Reparameterised draws from q, (num_samples, B, T, L), by Matheron's rule:

    z_q = z_prior + E_smoother[ỹ - z_prior - e],  z_prior ~ p,  e ~ N(0, 1/λ),

    differentiable in the sites and the kernel (the smoother is linear in its data)."""
    return markov_posterior_and_samples(prior, sites, num_samples, generator)[1]


def matheron_normals(prior: MarkovPrior, batch: int, num_samples: int, generator=None):
    """The standard normals of ``num_samples`` Matheron draws for ``batch`` sequences: ``eps`` (T, S, B, L·s, 1)
    for the joint prior state paths and ``noise`` (S, B, L, T, 1) for the site noise.

    Drawn in float32 and cast: torch's float64 normal sampler is ~6x slower on CPU, and at long T these draws
    were a noticeable part of a training step; they are Monte-Carlo noise, for which 24-bit normals suffice."""
    L, T, s = prior.A.shape[0], prior.n_steps, prior.A.shape[-1]
    eps = torch.randn(T, num_samples, batch, L * s, 1, generator=generator, dtype=torch.float32)
    noise = torch.randn(num_samples, batch, L, T, 1, generator=generator, dtype=torch.float32)
    return eps.to(prior.A.dtype), noise.to(prior.A.dtype)


def compiled_posterior_and_samples(prior: MarkovPrior, mean: torch.Tensor, precision: torch.Tensor, normals):
    """:func:`markov_posterior_and_samples` for sites ``mean``, ``precision`` (B, T, L) and the standard normals
    ``normals`` = (eps, noise) of :func:`matheron_normals`, through the compiled smoother with its hand-written
    reverse pass (:mod:`latentgp.linalg.kalman_sites`): the same numbers, without the scans' per-call overhead
    forwards and backwards. None if it does not apply (tensors not on the CPU, a site precision that is not positive
    and finite, numba missing, or a covariance that is not numerically positive definite); the caller then uses
    the scans."""
    try:
        from ..linalg.kalman_sites import NotPositiveDefinite, site_posterior_and_samples
    except ImportError:  # pragma: no cover - numba is a dependency
        return None
    if mean.device.type != "cpu":
        return None
    if not bool(((precision > 0) & torch.isfinite(precision) & torch.isfinite(mean)).all()):
        return None
    try:
        m, var, kl, log_z, draws = site_posterior_and_samples(prior.A, prior.Q, prior.P0, prior.H[0].detach(),
                                                              mean, precision, *normals)
    except NotPositiveDefinite:
        return None
    return MarkovPosterior(m, var, kl, log_z), draws


def markov_posterior_and_samples(prior: MarkovPrior, sites: Sites, num_samples: int, generator=None,
                                 normals=None):
    """:func:`markov_posterior` and ``num_samples`` Matheron draws from one Kalman smoother call.

    The smoother's gain does not depend on its data, so the pseudo-observations ỹ and the Matheron
    residuals ỹ - z_prior - e are smoothed as one batch (1 + num_samples, B, L): the scans cost per call,
    not per batch entry, at these sizes. ``normals``: the (eps, noise) of :func:`matheron_normals` (drawn from
    ``generator`` if None). Returns (MarkovPosterior, draws (num_samples, B, T, L))."""
    y_site, R_site, mask = sites.pseudo_observations()  # (B, L, T, 1), (B, L, T, 1, 1), (B, L, T)
    B, L, T = mask.shape
    eps, noise = matheron_normals(prior, B, num_samples, generator) if normals is None else normals
    A, Q, P0, H = prior.joint
    f_prior = sample_prior_states(A, Q, P0, (num_samples, B), noise=eps.squeeze(-1).movedim(0, -2)) @ H.T
    f_prior = f_prior.transpose(-1, -2).unsqueeze(-1)  # (S, B, L, T, 1)
    e = R_site.squeeze(-1).sqrt() * noise
    resid = torch.where(mask.unsqueeze(-1), y_site - f_prior - e, torch.zeros_like(f_prior))
    data = torch.cat((torch.where(mask.unsqueeze(-1), y_site, torch.zeros_like(y_site)).unsqueeze(0), resid), 0)
    sm = kalman_smoother(prior.A, prior.Q, prior.H, R_site, data, prior.P0, mask=mask)
    m_f, V_f = latent_marginals(sm.means[0], sm.covs[0], prior.H)  # (B, L, T, 1), (B, L, T, 1, 1)
    log_z = sm.log_likelihood[0]  # (B, L)
    kl = (site_expected_log(sites, y_site, R_site, mask, m_f, V_f) - log_z).sum(-1)
    post = MarkovPosterior(m_f.squeeze(-1).transpose(-1, -2), V_f[..., 0, 0].transpose(-1, -2), kl, log_z.sum(-1))
    draws = (f_prior + sm.means[1:] @ prior.H.T).squeeze(-1).transpose(-1, -2)
    return post, draws


DENSE_BUDGET = 2 ** 24  # entries of one (sequences, latents, T, T) temporary of the dense path (128 MiB in float64)


def gp_prior(kernel, times: torch.Tensor, dense_max: int = 0, batch: int = 1):
    """The prior for :func:`posterior_and_samples`: dense (K, M) for T <= ``dense_max`` (O(T³), the test twin),
    state space otherwise (O(T): the compiled Kalman pass, or the scans). The dense path also needs ``batch`` x
    latents x T² <= ``DENSE_BUDGET`` (its T x T temporaries)."""
    from .amortised_dense import dense_prior

    T, L = len(times), int(kernel.batch_shape.numel())
    if T <= dense_max and batch * L * T * T <= DENSE_BUDGET:
        return dense_prior(kernel, times)
    return markov_prior(kernel, times)


def posterior_and_samples(prior, mean: torch.Tensor, precision: torch.Tensor, num_samples: int, generator=None,
                          compiled: bool = True):
    """(posterior with mean, kl, log_z; draws (num_samples, B, T, L)) for sites ``mean``, ``precision`` (B, T, L),
    by the dense or the Kalman computation according to the type of ``prior`` (:func:`gp_prior`). Both are
    exact; the dense posterior's ``var`` is None (it would cost an extra T³ product per sequence). The Kalman
    computation runs compiled (:func:`compiled_posterior_and_samples`) unless ``compiled=False`` or it does not
    apply; the scans then give the same numbers from the same standard normals."""
    from .amortised_dense import DensePrior, dense_posterior_and_samples

    if isinstance(prior, DensePrior):
        return dense_posterior_and_samples(prior, mean, precision, num_samples, generator)
    normals = matheron_normals(prior, mean.shape[0], num_samples, generator)
    if compiled:
        out = compiled_posterior_and_samples(prior, mean, precision, normals)
        if out is not None:
            return out
    return markov_posterior_and_samples(prior, diagonal_sites(mean, precision), num_samples, normals=normals)


# --------------------------------------------------------------------------------------------------
# Fourier domain (MM-GPVAE)
# --------------------------------------------------------------------------------------------------
def fourier_frequencies(n_frequencies: int, period: float, dtype=torch.float64) -> torch.Tensor:
    """Angular frequencies ω_k = 2πk / P, k = 0 .. K-1."""
    return 2 * math.pi * torch.arange(n_frequencies, dtype=dtype) / period


def fourier_basis(times: torch.Tensor, n_frequencies: int, period: float) -> torch.Tensor:
    """Real Fourier basis (T, 2K-1): columns 1, cos(ω_1 t), sin(ω_1 t), ..., cos(ω_{K-1} t), sin(ω_{K-1} t)."""
    w = fourier_frequencies(n_frequencies, period, times.dtype)[1:]
    arg = times[:, None] * w
    pairs = torch.stack((torch.cos(arg), torch.sin(arg)), -1).reshape(len(times), -1)
    return torch.cat((torch.ones_like(times)[:, None], pairs), 1)


def fourier_prior_variances(kernel, n_frequencies: int, period: float) -> torch.Tensor:
    """Prior variances d (L, 2K-1) of the basis coefficients, matching :func:`fourier_basis`.

    A stationary GP restricted to a circle of circumference P (the periodic summation of its kernel,
    k_P(τ) = Σ_n k(τ + nP) = P⁻¹ Σ_k S(ω_k) e^{iω_k τ}) has independent real coefficients with
    Var(a_0) = S(0)/P and Var(a_k^cos) = Var(a_k^sin) = 2 S(ω_k)/P; keeping K frequencies truncates it.
    Pad P beyond the observed window so that wrap-around correlations are negligible."""
    dtype = next((p.dtype for p in kernel.parameters()), torch.float64)
    S = spectral_density(kernel, fourier_frequencies(n_frequencies, period, dtype))  # (*batch, K)
    S = S if S.dim() > 1 else S.unsqueeze(0)
    const = S[..., :1] / period
    rest = (2 * S[..., 1:] / period).repeat_interleave(2, -1)
    return torch.cat((const, rest), -1)


class FourierPosterior(NamedTuple):
    mean: torch.Tensor  # (B, L, M) whitened coefficient means
    chol: torch.Tensor  # (B, L, M, M) Cholesky factor of the whitened posterior precision
    kl: torch.Tensor  # (B,)
    scale: torch.Tensor  # (L, M) = √d


def fourier_posterior(prior_var: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor,
                      ) -> FourierPosterior:
    """q(a) = p(a) Π_t N(ỹ_t; z(t), 1/λ_t) for a ~ N(0, diag(d)), z = Φ a; sites ``mean``/``precision`` (B, T, L).

    In whitened coordinates u = a/√d: precision P = I + Wᵀ Λ W, W = Φ diag(√d); mean P⁻¹ Wᵀ Λ ỹ;
    KL(q ‖ N(0, I)) = ½ [tr P⁻¹ + |μ|² - M + log det P] (equal to the KL in a, which it is)."""
    scale = prior_var.sqrt()  # (L, M)
    W = basis.unsqueeze(0) * scale.unsqueeze(-2)  # (L, T, M)
    lam = precision.transpose(-1, -2)  # (B, L, T)
    P = torch.eye(W.shape[-1], dtype=W.dtype) + W.transpose(-1, -2) @ (lam.unsqueeze(-1) * W)
    if not bool(torch.isfinite(P).all()):  # P >= I whenever the sites are finite
        raise FloatingPointError("The encoder produced non-finite sites (training diverged); lower the learning "
                                 "rate (lr=...), set max_grad_norm, or use restarts.")
    chol = torch.linalg.cholesky(P)
    rhs = (W.transpose(-1, -2) @ (lam * mean.transpose(-1, -2)).unsqueeze(-1))  # (B, L, M, 1)
    mu = torch.cholesky_solve(rhs, chol).squeeze(-1)
    trace = torch.cholesky_inverse(chol).diagonal(dim1=-2, dim2=-1).sum(-1)
    logdet = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    kl = 0.5 * (trace + (mu * mu).sum(-1) - W.shape[-1] + logdet)
    return FourierPosterior(mu, chol, kl.sum(-1), scale)


def fourier_marginals(post: FourierPosterior, basis: torch.Tensor):
    """Posterior mean and marginal variance of z(t) on ``basis`` (T, M): each (B, T, L)."""
    W = basis.unsqueeze(0) * post.scale.unsqueeze(-2)  # (L, T, M)
    mean = (W @ post.mean.unsqueeze(-1)).squeeze(-1)  # (B, L, T)
    half = torch.linalg.solve_triangular(post.chol, W.transpose(-1, -2).expand(*post.chol.shape[:-2], -1, -1),
                                         upper=False)  # P = C Cᵀ: Var = |C⁻¹ wᵀ|²
    return mean.transpose(-1, -2), (half * half).sum(-2).transpose(-1, -2)


def sample_fourier_posterior(post: FourierPosterior, basis: torch.Tensor, num_samples: int, generator=None):
    """Reparameterised draws of z (num_samples, B, T, L): u = μ + C⁻ᵀ ε with P = C Cᵀ."""
    eps = torch.randn(num_samples, *post.mean.shape, 1, dtype=post.mean.dtype, generator=generator)
    u = post.mean + torch.linalg.solve_triangular(post.chol.transpose(-1, -2), eps, upper=True).squeeze(-1)
    z = (u * post.scale) @ basis.T  # (S, B, L, T)
    return z.transpose(-1, -2)
