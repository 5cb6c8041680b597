"""Dense posterior for short sequences: q = GP prior × diagonal Gaussian sites, exact, in a few batched calls.

Same model as :func:`latentgp.variational.amortised.markov_posterior` (per sequence b and latent l, prior
z ~ N(0, K), sites N(ỹ_t; z_t, 1/λ_t)), computed with T x T matrices instead of a Kalman scan. The Kalman
scans cost ~log2(T) levels of many small eager calls, which dominates a training step for T up to a few
hundred; here a step is one Cholesky of the well-conditioned

    B = I + S K S,   S = diag(√λ)     (eigenvalues >= 1, no K⁻¹ and no jitter; Rasmussen & Williams, alg. 3.2)

and a handful of batched matrix products. With α = S B⁻¹ S ỹ = (K + Λ⁻¹)⁻¹ ỹ:

    m = K α,   KL(q ‖ p) = ½ [tr B⁻¹ + mᵀα - T + log|B|],   log Z = -½ ỹᵀα - ½ (log|B| - Σ log λ) - T/2 log 2π

(tr K⁻¹Σ = tr B⁻¹ and log|K| - log|Σ| = log|B| since Σ = (K⁻¹ + Λ)⁻¹). Draws by Matheron's rule
z = f + K S B⁻¹ S (ỹ - f - e), f ~ N(0, K), e ~ N(0, Λ⁻¹); f = M ε with the exact factor K = M Mᵀ read
off the state-space form (f_t = Σ_{j<=t} H A(t_t - t_j) G_j ε_j, G_j G_jᵀ = process noise of step j), so no
factorisation of the possibly ill-conditioned K is needed. Costs O(T³) per (sequence, latent): use the Kalman
path (:mod:`latentgp.variational.amortised`) for long sequences.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..kernels import state_space_form
from .cvi import noise_factors


class DensePrior(NamedTuple):
    """Prior covariance K (L, T, T) of L independent latents on a grid and a factor M (L, T, T·s), K = M Mᵀ."""

    K: torch.Tensor
    M: torch.Tensor


def dense_prior(kernel, times: torch.Tensor) -> DensePrior:
    """K and its state-space factor M for ``kernel`` (batch_shape (L,), a state-space form) on ``times`` (T,).

    On a regular grid K and M are Toeplitz in (i - j) and only the T lags go through the kernel's
    transition; an irregular grid evaluates all T² lags at once (elementwise, no loop)."""
    form = state_space_form(kernel)
    T, s = len(times), form.state_dim
    dt = torch.cat((times.new_zeros(1), times[1:] - times[:-1]))
    lower = times[:, None] >= times[None, :]
    regular = T < 3 or bool(((dt[2:] - dt[1]).abs() <= 1e-12 * dt[1].abs()).all())
    if regular:
        gap = torch.arange(T)[:, None] - torch.arange(T)[None, :]
        lags = torch.arange(T, dtype=times.dtype) * dt[min(1, T - 1)]
    else:
        lags = (times[:, None] - times[None, :]).clamp_min(0).reshape(-1)
    A = form.transition(lags)  # (L, n_lags, s, s)
    L = A.shape[0]
    H = form.H.reshape(L, 1, s)
    hA = (H.unsqueeze(-1) * A).sum(-2)  # H A(lag), (L, n_lags, s)
    PH = (form.P_inf @ H.reshape(L, s, 1)).reshape(L, 1, s)
    k = (hA * PH).sum(-1)  # k(lag) = H A(lag) P∞ Hᵀ
    Q = form.process_noise(dt)  # (L, T, s, s)
    G = noise_factors(Q.transpose(0, 1), form.P_inf.expand(L, s, s)).transpose(0, 1)  # chol(P∞), chol(Q_t)
    if regular:  # every step but the first has the same G: M[i, j] = (H A G)(i - j), column 0 uses chol(P∞)
        K = k[:, gap.abs()]
        hAG = (hA.unsqueeze(-1) * G[:, 1:2]).sum(-2)  # (L, T, s)
        first = (hA.unsqueeze(-1) * G[:, :1]).sum(-2)
        M = torch.cat((first.unsqueeze(2), hAG[:, gap[:, 1:].clamp_min(0)]), 2)  # (L, T, T, s)
    else:
        k = k.reshape(L, T, T)
        K = torch.where(lower, k, k.transpose(-1, -2))
        M = (hA.reshape(L, T, T, s, 1) * G.unsqueeze(1)).sum(-2)  # H A(t_i - t_j) G_j
    M = torch.where(lower[..., None], M, torch.zeros_like(M)).reshape(L, T, T * s)
    return DensePrior(K, M)


class _SiteSolve(torch.autograd.Function):
    """α = S B⁻¹ S r for n right-hand sides r, tr B⁻¹ and log|B|, with B = I + S K S, S = diag(root).

    One Cholesky factorisation; the backward is closed form (d B⁻¹ = -B⁻¹ dB B⁻¹, d log|B| = tr B⁻¹ dB):
    ∂/∂B = -Σ_n (B⁻¹ S ḡ_n) u_nᵀ - ḡ_tr B⁻² + ḡ_ld B⁻¹ with u = B⁻¹ S r, i.e. one T³ product and a rank-n
    update, where autograd through the factorisation would add triangular solves, a second T³ product
    and T x T temporaries per right-hand side."""

    @staticmethod
    def forward(ctx, K, root, r):  # K (L, T, T), root (B, L, T), r (n, B, L, T)
        Bmat = torch.eye(K.shape[-1], dtype=K.dtype) + root.unsqueeze(-1) * K * root.unsqueeze(-2)
        C, info = torch.linalg.cholesky_ex(Bmat)
        if bool((info > 0).any()):
            raise FloatingPointError("The encoder produced non-finite or invalid sites (training diverged); lower "
                                     "the learning rate (lr=...).")
        inv = torch.cholesky_inverse(C)
        u = (inv @ (root * r).permute(1, 2, 3, 0)).permute(3, 0, 1, 2)  # B⁻¹ S r
        ctx.save_for_backward(K, root, r, inv, u)
        return root * u, inv.diagonal(dim1=-2, dim2=-1).sum(-1), 2 * C.diagonal(dim1=-2, dim2=-1).log().sum(-1)

    @staticmethod
    def backward(ctx, g_alpha, g_trace, g_logdet):
        K, root, r, inv, u = ctx.saved_tensors
        g_alpha = torch.zeros_like(u) if g_alpha is None else g_alpha
        g_w = (inv @ (root * g_alpha).permute(1, 2, 3, 0)).permute(3, 0, 1, 2)  # B⁻¹ S ḡ_α
        gB = -(g_w.permute(1, 2, 3, 0) @ u.permute(1, 2, 0, 3))  # -Σ_n g_w,n u_nᵀ, (B, L, T, T)
        diag = torch.zeros_like(root[..., 0]) if g_logdet is None else g_logdet
        if g_trace is not None:  # -ḡ_tr B⁻² + ḡ_ld B⁻¹ = B⁻¹ (ḡ_ld I - ḡ_tr B⁻¹)
            gB = gB + inv @ (diag[..., None, None] * torch.eye(K.shape[-1], dtype=K.dtype) - g_trace[..., None, None]
                             * inv)
        else:
            gB = gB + diag[..., None, None] * inv
        g_K = (root.unsqueeze(-1) * gB * root.unsqueeze(-2)).sum(0) if ctx.needs_input_grad[0] else None
        g_root = (((gB + gB.transpose(-1, -2)) * K * root.unsqueeze(-2)).sum(-1) + (g_alpha * u + g_w * r).sum(0))
        return g_K, g_root, root * g_w


def site_solve(K, root, r):
    """(S B⁻¹ S r, tr B⁻¹, log|B|) for B = I + S K S, with the closed-form backward of :class:`_SiteSolve`."""
    return _SiteSolve.apply(K, root, r)


class DensePosterior(NamedTuple):
    mean: torch.Tensor  # (B, T, L)
    var: torch.Tensor | None  # (B, T, L) marginal variances, if asked for (an extra T³ product)
    kl: torch.Tensor  # (B,)
    log_z: torch.Tensor  # (B,)


def dense_posterior_and_samples(prior: DensePrior, mean: torch.Tensor, precision: torch.Tensor, num_samples: int,
                                generator=None, marginal_var: bool = False):
    """q = prior × sites (``mean``, ``precision``: (B, T, L)), its exact KL, and ``num_samples`` reparameterised
    Matheron draws (num_samples, B, T, L), all from one factorisation of B = I + S K S per (sequence, latent)."""
    K, M = prior.K, prior.M
    L, T = K.shape[:2]
    lam, y = precision.transpose(-1, -2), mean.transpose(-1, -2)  # (B, L, T)
    root = lam.sqrt()
    eps = torch.randn(num_samples, *y.shape[:-1], M.shape[-1], dtype=K.dtype, generator=generator)
    f = torch.einsum("ltk,sblk->sblt", M, eps)  # prior draws, (S, B, L, T)
    e = torch.randn(f.shape, dtype=K.dtype, generator=generator) / root
    resid = torch.cat((y.unsqueeze(0), y - f - e), 0)  # ỹ, then the Matheron residuals
    alpha, trace, logdet = site_solve(K, root, resid)  # (K + Λ⁻¹)⁻¹ r
    K_alpha = torch.einsum("lij,nblj->nbli", K, alpha)
    m, a0 = K_alpha[0], alpha[0]
    kl = 0.5 * (trace + (m * a0).sum(-1) - T + logdet)  # (B, L)
    log_z = -0.5 * ((y * a0).sum(-1) + logdet - lam.log().sum(-1) + T * math.log(2 * math.pi))
    var = None
    if marginal_var:  # Σ_tt = K_tt - (K S B⁻¹ S K)_tt, column t of K S B⁻¹ S K from the same solve
        cols = site_solve(K, root, K.unsqueeze(1).expand(-1, len(root), -1, -1).permute(2, 1, 0, 3))[0]  # (T,B,L,T)
        var = (K.diagonal(dim1=-2, dim2=-1) - (cols * K.permute(2, 0, 1)[:, None]).sum(-1).permute(1, 2, 0)
               ).transpose(-1, -2)
    post = DensePosterior(m.transpose(-1, -2), var, kl.sum(-1), log_z.sum(-1))
    return post, (f + K_alpha[1:]).transpose(-1, -2)
