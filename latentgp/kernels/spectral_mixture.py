"""Spectral mixture kernel with log-weights (Wilson & Adams, 2013), product-over-dimensions form.

k(tau) = sum_q exp(log_weight_q) prod_d exp(-2 pi^2 tau_d^2 scale_qd^2) cos(2 pi tau_d mean_qd)

``means`` and ``scales`` are in cycles per input unit (ordinary frequency).  Unlike gpytorch's
SpectralMixtureKernel (which multiplies per-dimension *mixtures*, gpytorch issue #1198), the product over
dimensions is taken inside each component; the two agree in 1-D.
"""
from __future__ import annotations

import math

import gpytorch
import torch
from gpytorch.constraints import Interval, Positive
from torch import Tensor

__all__ = ["SpectralMixture"]


class SpectralMixture(gpytorch.kernels.Kernel):
    """Spectral mixture of ``num_mixtures`` components on ``ard_num_dims`` (default 1) input dimensions.

    Parameters: ``log_weights`` (*batch, Q) unconstrained; ``means`` and ``scales`` (*batch, Q, d),
    positive through gpytorch constraints.  Do not wrap in a ScaleKernel: the weights carry the scale.
    """

    is_stationary = True

    def __init__(
        self,
        num_mixtures: int = 1,
        ard_num_dims: int | None = None,
        batch_shape: torch.Size | None = None,
        means_constraint: Interval | None = None,
        scales_constraint: Interval | None = None,
        **kwargs,
    ):
        if isinstance(num_mixtures, bool) or not isinstance(num_mixtures, int) or num_mixtures < 1:
            raise ValueError(f"SpectralMixture: num_mixtures must be an int >= 1; got {num_mixtures!r}.")
        super().__init__(ard_num_dims=ard_num_dims, batch_shape=batch_shape, **kwargs)
        self.num_mixtures = num_mixtures
        d = 1 if ard_num_dims is None else ard_num_dims
        self.num_dims = d
        shape = (*self.batch_shape, num_mixtures)
        self.register_parameter("log_weights", torch.nn.Parameter(torch.zeros(shape)))
        self.register_parameter("raw_means", torch.nn.Parameter(torch.zeros(*shape, d)))
        self.register_parameter("raw_scales", torch.nn.Parameter(torch.zeros(*shape, d)))
        self.register_constraint("raw_means", Positive() if means_constraint is None else means_constraint)
        self.register_constraint("raw_scales", Positive() if scales_constraint is None else scales_constraint)
        # distinct default frequencies so that components are not symmetric copies of one another
        freqs = torch.arange(1, num_mixtures + 1, dtype=self.raw_means.dtype) / 4.0
        self.means = freqs[:, None].expand(-1, d)
        self.scales = 0.5

    @property
    def means(self) -> Tensor:
        return self.raw_means_constraint.transform(self.raw_means)

    @means.setter
    def means(self, value: float | Tensor) -> None:
        value = torch.as_tensor(value, dtype=self.raw_means.dtype, device=self.raw_means.device)
        self.initialize(raw_means=self.raw_means_constraint.inverse_transform(value))

    @property
    def scales(self) -> Tensor:
        return self.raw_scales_constraint.transform(self.raw_scales)

    @scales.setter
    def scales(self, value: float | Tensor) -> None:
        value = torch.as_tensor(value, dtype=self.raw_scales.dtype, device=self.raw_scales.device)
        self.initialize(raw_scales=self.raw_scales_constraint.inverse_transform(value))

    @property
    def weights(self) -> Tensor:
        return self.log_weights.exp()

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params):
        if last_dim_is_batch:
            raise NotImplementedError("SpectralMixture does not support last_dim_is_batch.")
        if x1.shape[-1] != self.num_dims or x2.shape[-1] != self.num_dims:
            raise ValueError(f"SpectralMixture was built for {self.num_dims}-D inputs (ard_num_dims); got "
                             f"{x1.shape[-1]}-D / {x2.shape[-1]}-D.")
        if diag:
            tau = (x1 - x2).unsqueeze(-3)  # (..., 1, n, d)
            mu, sc = self.means[..., :, None, :], self.scales[..., :, None, :]
            lw = self.log_weights[..., None]
        else:
            tau = (x1.unsqueeze(-2) - x2.unsqueeze(-3)).unsqueeze(-4)  # (..., 1, n, m, d)
            mu = self.means[..., :, None, None, :]
            sc = self.scales[..., :, None, None, :]
            lw = self.log_weights[..., None, None]
        # log-weight and Gaussian envelope combined in one exp: no overflow for large log-weights
        log_env = lw - 2 * math.pi**2 * (tau * sc).pow(2).sum(-1)
        cos = torch.cos(2 * math.pi * tau * mu).prod(-1)
        return (log_env.exp() * cos).sum(-2 if diag else -3)

    def spectral_density(self, omega: Tensor) -> Tensor:
        """S(w) = sum_q w_q prod_d [N(w_d/2pi; mu_qd, s_qd^2) + N(w_d/2pi; -mu_qd, s_qd^2)] / 2.

        Angular frequency; ``omega`` (m, d) or (m,) for d = 1; returns (*batch, m).
        """
        w = omega.unsqueeze(-1) if omega.dim() == 1 else omega
        f = (w / (2 * math.pi)).unsqueeze(-3)  # (1, m, d) against (*batch, Q, 1, d)
        mu, sc = self.means.unsqueeze(-2), self.scales.unsqueeze(-2)
        norm = -0.5 * math.log(2 * math.pi) - torch.log(sc)
        gauss_plus = torch.exp(norm - 0.5 * ((f - mu) / sc) ** 2)
        gauss_minus = torch.exp(norm - 0.5 * ((f + mu) / sc) ** 2)
        per_q = (0.5 * (gauss_plus + gauss_minus)).prod(-1)  # (*batch, Q, m)
        return (self.weights.unsqueeze(-1) * per_q).sum(-2)

    @torch.no_grad()
    def initialize_from_data(self, x: Tensor, y: Tensor, num_freqs: int = 512,
                             max_points: int = 2000) -> None:
        """Data-driven start: means at the periodogram peaks, scales 1/range, weights var(y)/Q.

        Per input dimension, the periodogram |sum_n (y_n - mean y) exp(-2 pi i f x_nd)|^2 is evaluated on a
        grid up to the Nyquist frequency 0.5 / (median spacing) (works for irregular inputs too).  Means are
        the Q highest local peaks, padded with evenly spaced frequencies if there are fewer peaks.  Scales
        1/range give an envelope about as long as the data, so components start smooth rather than local.
        """
        x = x.unsqueeze(-1) if x.dim() == 1 else x
        if self.active_dims is not None:
            x = x[..., self.active_dims]
        x = x.reshape(-1, x.shape[-1]).to(self.raw_means)
        y = y.reshape(-1).to(self.raw_means)
        if x.shape[-1] != self.num_dims or x.shape[0] != y.shape[0]:
            raise ValueError(f"initialize_from_data needs x (n, {self.num_dims}) and y (n,); got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}.")
        stride = max(1, x.shape[0] // max_points)  # periodogram cost is n x num_freqs
        xs, yc = x[::stride], (y - y.mean())[::stride]
        Q = self.num_mixtures
        means = torch.empty(Q, self.num_dims, dtype=x.dtype)
        scales = torch.empty(Q, self.num_dims, dtype=x.dtype)
        for d in range(self.num_dims):
            xd = x[:, d].sort().values
            span = float(xd[-1] - xd[0]) or 1.0
            gaps = xd.diff()
            gaps = gaps[gaps > 0]
            nyquist = 0.5 / float(gaps.median()) if gaps.numel() else 1.0
            freqs = torch.linspace(0, nyquist, num_freqs + 1, dtype=x.dtype)[1:]
            phase = 2 * math.pi * freqs[:, None] * xs[None, :, d]
            power = (torch.cos(phase) @ yc) ** 2 + (torch.sin(phase) @ yc) ** 2
            is_peak = torch.ones_like(power, dtype=torch.bool)
            is_peak[1:] &= power[1:] > power[:-1]
            is_peak[:-1] &= power[:-1] >= power[1:]
            peaks = freqs[is_peak][power[is_peak].argsort(descending=True)][:Q]
            if peaks.numel() < Q:
                fill = torch.linspace(0, nyquist, Q - peaks.numel() + 2, dtype=x.dtype)[1:-1]
                peaks = torch.cat([peaks, fill])
            means[:, d] = peaks
            scales[:, d] = 1.0 / span
        var = float(y.var()) if y.numel() > 1 else 1.0
        self.means = means.expand_as(self.raw_means)
        self.scales = scales.expand_as(self.raw_scales)
        self.log_weights.fill_(math.log(max(var, 1e-12) / Q))
