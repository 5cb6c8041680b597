"""Matérn kernel of any smoothness nu > 0, with its spectral density.

k(r) = 2^{1-nu} / Gamma(nu) z^nu K_nu(z),   z = sqrt(2 nu) r,   r = |(x1 - x2) / lengthscale|.

* Half-integer nu = p + 1/2: exact closed form exp(-z) p!/(2p)! sum_i (p+i)!/(i!(p-i)!) (2z)^{p-i}
  (no Bessel call), evaluated in log space so large p / large z cannot overflow.
* Otherwise: log k = (1-nu) log 2 - lgamma(nu) + nu log z + log K_nu(z) via ``log_bessel_kv``.
* r = 0 gives exactly 1.  sqrt / log have infinite or NaN derivatives at 0, so zero
  distances are masked with ``where`` guards *before* those functions; the masked entries
  are the constant 1, whose gradient (0) is the correct one: k does not depend on the
  lengthscale at r = 0, and for nu > 1/2 k is smooth and even in x1 - x2, so dk/dx = 0
  (for nu <= 1/2 k is not differentiable at 0 and 0 is the symmetric subgradient).
  Second derivatives at exactly r = 0 are not reproduced (they come out 0).
"""
from __future__ import annotations

import math
import numbers
from fractions import Fraction

import gpytorch
import torch

from ..linalg.bessel import log_bessel_kv

# Above this many (n1 * n2 * d) elements, squared distances use the expanded form
# |a|^2 + |b|^2 - 2 a.b (memory n1*n2) instead of explicit differences (memory n1*n2*d).
_DIFF_MAX_ELEMENTS = 2**24


def _check_nu(nu) -> float:
    if isinstance(nu, torch.Tensor) and nu.numel() == 1:
        nu = nu.item()
    if isinstance(nu, bool) or not isinstance(nu, numbers.Real):
        raise TypeError(f"nu must be a real number > 0, got {nu!r} of type {type(nu).__name__}")
    nu = float(nu)
    if not (math.isfinite(nu) and nu > 0):
        raise ValueError(f"nu must be finite and > 0, got {nu} (for nu = inf use gpytorch RBFKernel)")
    return nu


def _half_integer_order(nu: float) -> int | None:
    """p if nu == p + 1/2 exactly (p >= 0), else None."""
    return int(nu - 0.5) if (2.0 * nu).is_integer() and not nu.is_integer() else None


def _poly_coefficients(p: int) -> list[float]:
    """c_j of z^j in p!/(2p)! sum_i (p+i)!/(i!(p-i)!) (2z)^{p-i}; exact rationals, then rounded."""
    f = math.factorial
    return [float(Fraction(f(p) * f(2 * p - j) * 2**j, f(2 * p) * f(p - j) * f(j))) for j in range(p + 1)]


def _horner(coefs: list[float], u: torch.Tensor) -> torch.Tensor:
    out = torch.full_like(u, coefs[-1])
    for c in reversed(coefs[:-1]):
        out = out * u + c
    return out


def _matern_half_integer(z: torch.Tensor, p: int) -> torch.Tensor:
    """exp(-z) poly_p(z), z >= 0.  poly is a positive polynomial with poly(0) = 1; for z >= 1 it
    is evaluated as z^p q(1/z) with reversed coefficients so z^p never overflows."""
    if p == 0:
        return torch.exp(-z)
    c = _poly_coefficients(p)
    big = z >= 1.0
    z_small = torch.where(big, torch.zeros_like(z), z)  # guards keep the unused branch finite
    z_big = torch.where(big, z, torch.ones_like(z))
    log_poly = torch.where(
        big,
        p * torch.log(z_big) + torch.log(_horner(c[::-1], 1.0 / z_big)),
        torch.log(_horner(c, z_small)),
    )
    return torch.exp(log_poly - z)


def _matern_from_r(r: torch.Tensor, nu: float) -> torch.Tensor:
    """k(r) for r >= 0 with exact 1 and zero gradient at r = 0."""
    pos = r > 0
    # r = 0 -> dummy 1 (masked below); clamp huge r at sqrt(dtype max) (k is exactly 0 there
    # anyway) so that z = inf cannot produce inf - inf = NaN.
    r_max = math.sqrt(torch.finfo(r.dtype).max)
    z = math.sqrt(2.0 * nu) * torch.where(pos, r, torch.ones_like(r)).clamp_max(r_max)
    p = _half_integer_order(nu)
    if p is not None:
        k = _matern_half_integer(z, p)
    else:
        log_k = (1.0 - nu) * math.log(2.0) - math.lgamma(nu) + nu * torch.log(z) + log_bessel_kv(nu, z)
        k = torch.exp(log_k)
    return torch.where(pos, k, torch.ones_like(k))


def _scaled_sq_dist(x1: torch.Tensor, x2: torch.Tensor, diag: bool) -> torch.Tensor:
    """Squared distances of already lengthscale-scaled inputs (..., n, d), (..., m, d)."""
    # Centre on x1's mean so the expanded form does not subtract large nearly-equal numbers.
    mean = x1.mean(dim=-2, keepdim=True).detach()
    x1, x2 = x1 - mean, x2 - mean
    if diag:
        return (x1 - x2).pow(2).sum(-1)
    n, m, d = x1.shape[-2], x2.shape[-2], x1.shape[-1]
    if n * m * d <= _DIFF_MAX_ELEMENTS:
        return (x1.unsqueeze(-2) - x2.unsqueeze(-3)).pow(2).sum(-1)
    sq = x1.pow(2).sum(-1, keepdim=True) + x2.pow(2).sum(-1).unsqueeze(-2) - 2.0 * x1 @ x2.transpose(-1, -2)
    return sq.clamp_min(0.0)  # rounding can make it slightly negative


def _safe_sqrt(sq: torch.Tensor) -> torch.Tensor:
    """sqrt with gradient 0 (not inf / NaN) at 0."""
    pos = sq > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def matern_spectral_density(omega: torch.Tensor, nu: float, lengthscale: torch.Tensor) -> torch.Tensor:
    """S(omega) = int k(tau) exp(-i omega.tau) dtau over R^d (angular frequency).

    S(omega) = prod(l) S0(l * omega),
    S0(w) = 2^d pi^{d/2} Gamma(nu + d/2) (2 nu)^nu / Gamma(nu) (2 nu + |w|^2)^{-(nu + d/2)}.

    :param omega: (m, d), or (m,) meaning d = 1; extra leading dims broadcast with the batch.
    :param nu: smoothness > 0.
    :param lengthscale: gpytorch shape (*batch, 1, d) or (*batch, 1, 1) (shared over dims).
    :return: (*batch, m).
    """
    nu = _check_nu(nu)
    if omega.dim() == 1:
        omega = omega.unsqueeze(-1)
    d = omega.shape[-1]
    ls = lengthscale.to(omega.dtype).expand(*lengthscale.shape[:-1], d)
    w2 = (omega * ls).pow(2).sum(-1)  # (*batch, m)
    log_const = (d * math.log(2.0) + 0.5 * d * math.log(math.pi) + math.lgamma(nu + 0.5 * d)
                 + nu * math.log(2.0 * nu) - math.lgamma(nu))
    log_s = log_const + torch.log(ls).sum(-1) - (nu + 0.5 * d) * torch.log(2.0 * nu + w2)
    return torch.exp(log_s)


class Matern(gpytorch.kernels.Kernel):
    """Matérn kernel with unit variance and any smoothness nu > 0 (wrap in ScaleKernel for
    an output scale).  Same lengthscale / ARD / batch conventions as gpytorch's MaternKernel.

    :param nu: smoothness > 0 (stored as float ``self.nu``); half-integers use closed forms.
    :param ard_num_dims: one lengthscale per input dimension if set.
    :param batch_shape: batch of independent lengthscales (default ``torch.Size([])``).
    """

    has_lengthscale = True

    def __init__(self, nu: float = 0.8, ard_num_dims: int | None = None,
                 batch_shape: torch.Size | None = None, **kwargs):
        nu = _check_nu(nu)
        batch_shape = torch.Size([]) if batch_shape is None else torch.Size(batch_shape)
        super().__init__(ard_num_dims=ard_num_dims, batch_shape=batch_shape, **kwargs)
        self.nu = nu

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, diag: bool = False,
                last_dim_is_batch: bool = False, **params) -> torch.Tensor:
        x1_ = x1.div(self.lengthscale)
        x2_ = x2.div(self.lengthscale)
        if last_dim_is_batch:  # each input dimension becomes its own 1-d batch
            x1_ = x1_.transpose(-1, -2).unsqueeze(-1)
            x2_ = x2_.transpose(-1, -2).unsqueeze(-1)
        r = _safe_sqrt(_scaled_sq_dist(x1_, x2_, diag))
        return _matern_from_r(r, self.nu)

    def spectral_density(self, omega: torch.Tensor) -> torch.Tensor:
        """See :func:`matern_spectral_density`; returns (*batch_shape, m)."""
        return matern_spectral_density(omega, self.nu, self.lengthscale)
