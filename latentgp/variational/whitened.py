"""Whitened (non-centred) parametrisation of state-space GP latents, for Pyro SVI.

The prior path is a linear map of standard-normal noise, x = M_θ ε (x_0 = chol(P0) ε_0,
x_t = A_t x_{t-1} + chol(Q_t) ε_t), so a Gaussian guide on ε gives a Gaussian q on x with

    E_q[x] = M_θ loc,     Cov_q(x_t) = A_t Cov_q(x_{t-1}) A_tᵀ + chol(Q_t) diag(scale_t²) chol(Q_t)ᵀ,

both computed by associative scans (no loop over time). Used by ``PoissonLatentGP.fit(method="svi")``.
"""
from __future__ import annotations

import torch

from ..linalg.scan import associative_scan
from .cvi import noise_factors, sample_prior_states


def whitened_latents(A, Q, P0, H, noise):
    """Latent values f = H x(ε), (*batch, T, L), for ε = ``noise`` (*batch, T, S)."""
    return sample_prior_states(A, Q, P0, noise.shape[:-2], noise=noise) @ H.T


def whitened_moments(A, Q, P0, H, loc, scale):
    """Exact mean (*batch, T, L) and marginal covariance (*batch, T, L, L) of f under ε ~ N(loc, diag(scale²))."""
    mean = whitened_latents(A, Q, P0, H, loc)
    Lq = noise_factors(Q, P0)  # (T, S, S)
    T = A.shape[-3]
    batch = loc.shape[:-2]
    shape = (T, *batch, *A.shape[-2:])
    Lq = Lq.reshape(T, *([1] * len(batch)), *Lq.shape[-2:])
    scaled = Lq * scale.movedim(-2, 0).unsqueeze(-2)  # chol(Q_t) diag(scale_t)
    V = (scaled @ scaled.transpose(-1, -2)).expand(shape)
    A_t = A.reshape(T, *([1] * len(batch)), *A.shape[-2:]).expand(shape)
    A_t = torch.cat((torch.zeros_like(A_t[:1]), A_t[1:]), 0)

    def combine(earlier, later):  # affine maps on covariances: V -> A V Aᵀ + W
        (A1, W1), (A2, W2) = earlier, later
        return A2 @ A1, A2 @ W1 @ A2.transpose(-1, -2) + W2

    _, cov = associative_scan(combine, (A_t, V))
    return mean, H @ cov.movedim(0, -3) @ H.T
