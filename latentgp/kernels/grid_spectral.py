"""1-D spectral-mixture kernels with analytic derivatives, the factors of GP-HM's product kernel.

Spectral density (ordinary frequency s, cycles per unit), symmetrised:
    S(s) = sum_q w_q [p_q(s - mu_q) + p_q(s + mu_q)] / 2,   w_q = exp(log_weights_q),
with p_q a Gaussian N(0, sigma_q^2) (:class:`GaussianSpectralMixture`) or a Student-t of 2p+1 degrees
of freedom and scale sigma_q (:class:`StudentTSpectralMixture`, ``order=p``). Its inverse Fourier
transform is
    k(tau) = sum_q w_q h_q(tau) cos(2 pi mu_q tau),
with h_q the Gaussian exp(-tau^2 / (2 l_q^2)) or the Matérn(p + 1/2) envelope of lengthscale
l_q = 1 / (2 pi sigma_q) (the Student-t <-> Matérn pair). Derivatives in the inputs are closed form:
    d^a/dx^a d^b/dx'^b k(x - x') = (-1)^b k^{(a+b)}(x - x'),
with k^{(j)} from Leibniz's rule over envelope (Hermite polynomials, resp. e^{-z} times a polynomial
in z = a|tau|) and cosine. Orders up to 4 are supported (the PDE solver needs k, k_{x'}, k_{x'x'}
and k_{xxx'x'}); the Matérn envelope needs order p >= 2 for a finite 4th derivative.

A product over dimensions is a list of these 1-D kernels (GridGP, GPPDESolver).
"""
from __future__ import annotations

import math

import gpytorch
import torch
from gpytorch.constraints import GreaterThan, Positive
from torch import Tensor

from ..io import register_kernel

__all__ = ["GaussianSpectralMixture", "StudentTSpectralMixture"]

MAX_DERIVATIVE = 4



def _constrained(raw: str) -> property:
    """The constrained value of parameter ``raw`` (read and write, broadcast to its shape)."""

    def get(self) -> Tensor:
        return getattr(self, f"{raw}_constraint").transform(getattr(self, raw))

    def put(self, value):
        param = getattr(self, raw)
        value = torch.as_tensor(value, dtype=param.dtype).expand_as(param)
        self.initialize(**{raw: getattr(self, f"{raw}_constraint").inverse_transform(value)})

    return property(get, put)

class _SpectralMixture1D(gpytorch.kernels.Kernel):
    """Shared parameters, cosine part and derivative bookkeeping; subclasses give the envelope."""

    is_stationary = True

    def __init__(self, num_mixtures: int = 1, min_scale: float = 1e-6, **kwargs):
        if isinstance(num_mixtures, bool) or not isinstance(num_mixtures, int) or num_mixtures < 1:
            raise ValueError(f"`num_mixtures` must be an int >= 1; got {num_mixtures!r}.")
        super().__init__(**kwargs)
        self.num_mixtures = num_mixtures
        self.min_scale = float(min_scale)
        self.register_parameter("log_weights", torch.nn.Parameter(torch.zeros(num_mixtures)))
        self.register_parameter("raw_means", torch.nn.Parameter(torch.zeros(num_mixtures)))
        self.register_parameter("raw_scales", torch.nn.Parameter(torch.zeros(num_mixtures)))
        self.register_constraint("raw_means", Positive())
        # A floor on the spectral width keeps the envelope finite (a pure cosine is rank 2 and makes the
        # covariance of many observations exactly singular); min_scale is in cycles per input unit.
        self.register_constraint("raw_scales", GreaterThan(float(min_scale)))
        self.initialize_frequencies(max_frequency=float(num_mixtures))

    # -------------------------------------------------------------- parameters
    means = _constrained("raw_means")  # spectral means (cycles per input unit)
    scales = _constrained("raw_scales")  # spectral widths, above min_scale

    @property
    def weights(self) -> Tensor:
        return self.log_weights.exp()

    @torch.no_grad()
    def initialize_frequencies(self, max_frequency: float, total_variance: float = 1.0):
        """Means evenly spaced on (0, max_frequency], scales half the spacing, equal weights: a dense
        bank of candidate frequencies for the sparsity prior to choose from (GP-HM's start)."""
        Q = self.num_mixtures
        spacing = max_frequency / Q
        self.means = torch.linspace(spacing, max_frequency, Q, dtype=self.raw_means.dtype)
        self.scales = 0.5 * spacing
        self.log_weights.fill_(math.log(total_variance / Q))

    # -------------------------------------------------------------- kernel values
    def envelope_derivatives(self, tau: Tensor, order: int) -> list[Tensor]:
        """[h^{(0)}, ..., h^{(order)}](tau) for every component: tensors of shape (Q, *tau.shape)."""
        raise NotImplementedError

    def derivative(self, tau: Tensor, order: int = 0) -> Tensor:
        """k^{(order)}(tau), the order-th derivative of the stationary profile, elementwise in tau."""
        if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order <= MAX_DERIVATIVE:
            raise ValueError(f"`order` must be an int in 0..{MAX_DERIVATIVE}; got {order!r}.")
        tau = tau.unsqueeze(0)
        shape = (-1,) + (1,) * (tau.dim() - 1)
        omega = (2 * math.pi * self.means).reshape(shape)
        h = self.envelope_derivatives(tau, order)
        phase = omega * tau
        total = 0.0
        for i in range(order + 1):  # Leibniz: (h c)^{(n)} = sum_i C(n, i) h^{(i)} c^{(n - i)}
            j = order - i
            cos_j = omega**j * torch.cos(phase + j * math.pi / 2)
            total = total + math.comb(order, i) * h[i] * cos_j
        return (self.weights.reshape(shape) * total).sum(0)

    def cross_derivative(self, x1: Tensor, x2: Tensor, d1: int = 0, d2: int = 0) -> Tensor:
        """d^{d1}/dx^{d1} d^{d2}/dx'^{d2} k(x, x') for 1-D inputs x1 (n,), x2 (m,): (n, m)."""
        tau = x1.reshape(-1, 1) - x2.reshape(1, -1)
        return (-1) ** d2 * self.derivative(tau, d1 + d2)

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params):
        if last_dim_is_batch or x1.shape[-1] != 1 or x2.shape[-1] != 1:
            raise ValueError(f"{type(self).__name__} is a 1-D kernel: inputs must have one column "
                             "(use a list of kernels, one per dimension, for a product).")
        tau = x1[..., :, 0] - x2[..., :, 0] if diag else x1[..., :, None, 0] - x2[..., None, :, 0]
        return self.derivative(tau, 0)

    # -------------------------------------------------------------- spectrum
    def component_density(self, s: Tensor) -> Tensor:
        """p_q(s) for every component, shape (Q, *s.shape)."""
        raise NotImplementedError

    def spectral_density(self, omega: Tensor) -> Tensor:
        """S at angular frequencies ``omega`` (latentgp's convention, as SpectralMixture): S(omega / 2 pi)."""
        w = omega.reshape(-1) if omega.dim() == 2 else omega
        s = (w / (2 * math.pi)).unsqueeze(0)
        mu = self.means[:, None]
        per_q = 0.5 * (self.component_density(s - mu) + self.component_density(s + mu))
        return (self.weights[:, None] * per_q).sum(0)


@register_kernel
class GaussianSpectralMixture(_SpectralMixture1D):
    """k(tau) = sum_q w_q exp(-2 pi^2 sigma_q^2 tau^2) cos(2 pi mu_q tau) (Gaussian mixture spectrum)."""

    def envelope_derivatives(self, tau, order):
        ell = (1.0 / (2 * math.pi * self.scales)).reshape((-1,) + (1,) * (tau.dim() - 1))
        z = tau / ell
        h = torch.exp(-0.5 * z * z)
        # probabilists' Hermite: He_{j+1} = z He_j - j He_{j-1}; h^{(j)} = (-1/l)^j He_j(z) h
        he = [torch.ones_like(z), z]
        for j in range(1, order):
            he.append(z * he[j] - j * he[j - 1])
        return [(-1.0 / ell) ** j * he[j] * h for j in range(order + 1)]

    def component_density(self, s):
        sig = self.scales[:, None]
        return torch.exp(-0.5 * (s / sig) ** 2) / (sig * math.sqrt(2 * math.pi))


def _matern_polynomial(p: int) -> list[float]:
    """Coefficients c_i of the half-integer Matérn envelope e^{-z} sum_i c_i z^i (z = a r), c_0 = 1."""
    c = [math.factorial(p) / math.factorial(2 * p) * math.factorial(p + i) / (math.factorial(i) * math.factorial(p - i))
         * 2 ** (p - i) for i in range(p + 1)]
    # c[i] multiplies z^{p-i}; reorder to ascending powers
    return c[::-1]


@register_kernel
class StudentTSpectralMixture(_SpectralMixture1D):
    """Student-t mixture spectrum (2·order + 1 degrees of freedom) = sum of Matérn(order + 1/2) × cosine.

    ``order`` p >= 2 (finite 4th derivative, needed by second-order PDE operators); default 3.
    """

    def __init__(self, num_mixtures: int = 1, order: int = 3, **kwargs):
        if isinstance(order, bool) or not isinstance(order, int) or order < 2:
            raise ValueError(f"`order` must be an int >= 2 (the 4th derivative must exist); got {order!r}.")
        self.order = order
        super().__init__(num_mixtures=num_mixtures, **kwargs)
        self._poly = _matern_polynomial(order)

    def envelope_derivatives(self, tau, order):
        p = self.order
        nu = p + 0.5
        ell = 1.0 / (2 * math.pi * self.scales)
        a = (math.sqrt(2 * nu) / ell).reshape((-1,) + (1,) * (tau.dim() - 1))
        r = tau.abs()
        z = a * r
        sign = torch.sign(tau)
        e = torch.exp(-z)
        # d/dz [e^{-z} P(z)] = e^{-z} (P' - P): iterate on coefficient lists, evaluate by Horner.
        coeffs = list(self._poly)
        out = []
        for j in range(order + 1):
            poly = torch.zeros_like(z)
            for c in reversed(coeffs):
                poly = poly * z + c
            out.append(sign**j * a**j * e * poly if j % 2 else a**j * e * poly)
            deriv = [i * coeffs[i] for i in range(1, len(coeffs))] + [0.0]
            coeffs = [dc - c for dc, c in zip(deriv, coeffs, strict=False)]
        return out

    def component_density(self, s):
        dof = 2 * self.order + 1
        sig = self.scales[:, None]
        log_norm = (math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
                    - torch.log(sig))
        return torch.exp(log_norm - 0.5 * (dof + 1) * torch.log1p((s / sig) ** 2 / dof))
