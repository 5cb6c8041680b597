"""Compiled Kalman smoother for scalar Gaussian sites, with a hand-written reverse pass (GP-VAE training).

A GP-VAE's posterior per (sequence, latent) chain is the state-space prior x_t = A_t x_{t-1} + w_t,
w_t ~ N(0, Q_t), x_0 ~ N(0, P0), times scalar sites N(ỹ_t; h·x_t, r_t). A training step needs its smoothed
means (of ỹ and of Matheron residuals: the smoother is linear in its data), marginal variances, log Z, and
their gradients with respect to the sites *and* the kernel's A, Q, P0. Autograd through the parallel scans of
:mod:`latentgp.linalg.kalman` costs ~log2 T levels of dozens of small eager calls forwards and again
backwards, which is most of a step. Here the textbook recursions run compiled per chain:

* forward: filter (predict; c = P⁻h, S = h·c + r, m += c e / S, P = P⁻ - c cᵀ / S, log Z += log N(e; 0, S)),
  then Rauch-Tung-Striebel (J_t = P_t A_{t+1}ᵀ (P⁻_{t+1})⁻¹, m^s_t = m_t + J_t (m^s_{t+1} - m⁻_{t+1}),
  P^s_t = P_t + J_t (P^s_{t+1} - P⁻_{t+1}) J_tᵀ);
* backward: the same operations in reverse order, each replaced by its vector-Jacobian product (derived
  line by line below; checked against autograd through a dense GP in the tests).

O(T s³) per chain in both directions, no Python loop. Prior path draws x_t = A_t x_{t-1} + G_t ε_t (for
Matheron's rule) get the same treatment (:func:`prior_draws`). Only scalar sites with 0 < r < ∞ and a
constant observation row h; :mod:`latentgp.variational.amortised` falls back to the scans otherwise, and
when a predictive covariance is not numerically positive definite (the scans' jitter policy handles it).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .kalman_compiled import cho_solve, cholesky, jit

LOG2PI = math.log(2.0 * math.pi)


class NotPositiveDefinite(np.linalg.LinAlgError):
    """A predictive covariance of the compiled recursion is not positive definite (callers fall back)."""


# ----------------------------------------------------------------------------------------------- forward
@jit
def _forward(A, Q, P0, h, D, r, mp, Pp, mf, Pf, W, ms, Ps, ll):  # pragma: no cover - compiled
    """Filter + RTS for every chain (b, l). A, Q: (L, T_A, s, s), T_A in {1, T}; P0 (L, s, s); h (s,);
    D (n, B, L, T) data (log Z is that of D[0]); r (B, L, T). Writes the filter's predicted / filtered
    moments, the inverse predictive covariances W (for the gains), the smoothed moments and log Z (B, L).
    Returns 1 if a predictive covariance is not positive definite."""
    n, B, L, T = D.shape
    s = h.shape[0]
    c = np.empty(s)
    AP = np.empty((s, s))
    Lc = np.empty((s, s))
    J = np.empty((s, s))
    M = np.empty((s, s))
    for b in range(B):
        for l in range(L):
            total = 0.0
            for t in range(T):
                if t == 0:
                    for i in range(s):
                        for k in range(n):
                            mp[k, b, l, 0, i] = 0.0
                        for j in range(s):
                            Pp[b, l, 0, i, j] = P0[l, i, j]
                else:
                    At = A[l, min(t, A.shape[1] - 1)]
                    Qt = Q[l, min(t, Q.shape[1] - 1)]
                    for k in range(n):
                        for i in range(s):
                            acc = 0.0
                            for j in range(s):
                                acc += At[i, j] * mf[k, b, l, t - 1, j]
                            mp[k, b, l, t, i] = acc
                    for i in range(s):
                        for j in range(s):
                            acc = 0.0
                            for q in range(s):
                                acc += At[i, q] * Pf[b, l, t - 1, q, j]
                            AP[i, j] = acc
                    for i in range(s):
                        for j in range(s):
                            acc = Qt[i, j]
                            for q in range(s):
                                acc += AP[i, q] * At[j, q]
                            Pp[b, l, t, i, j] = acc
                for i in range(s):
                    acc = 0.0
                    for j in range(s):
                        acc += Pp[b, l, t, i, j] * h[j]
                    c[i] = acc
                S = r[b, l, t]
                for i in range(s):
                    S += h[i] * c[i]
                for k in range(n):
                    e = D[k, b, l, t]
                    for i in range(s):
                        e -= h[i] * mp[k, b, l, t, i]
                    for i in range(s):
                        mf[k, b, l, t, i] = mp[k, b, l, t, i] + c[i] * e / S
                    if k == 0:
                        total -= 0.5 * (LOG2PI + math.log(S) + e * e / S)
                for i in range(s):
                    for j in range(s):
                        Pf[b, l, t, i, j] = Pp[b, l, t, i, j] - c[i] * c[j] / S
            ll[b, l] = total
            # Rauch-Tung-Striebel
            for i in range(s):
                for k in range(n):
                    ms[k, b, l, T - 1, i] = mf[k, b, l, T - 1, i]
                for j in range(s):
                    Ps[b, l, T - 1, i, j] = Pf[b, l, T - 1, i, j]
            for t in range(T - 2, -1, -1):
                An = A[l, min(t + 1, A.shape[1] - 1)]
                if not cholesky(Pp[b, l, t + 1], Lc):
                    return 1
                Wt = W[b, l, t + 1]
                for i in range(s):
                    for j in range(s):
                        Wt[i, j] = 1.0 if i == j else 0.0
                cho_solve(Lc, Wt)
                for i in range(s):  # AP = Pf_t A_{t+1}^T
                    for j in range(s):
                        acc = 0.0
                        for q in range(s):
                            acc += Pf[b, l, t, i, q] * An[j, q]
                        AP[i, j] = acc
                for i in range(s):  # J = AP W
                    for j in range(s):
                        acc = 0.0
                        for q in range(s):
                            acc += AP[i, q] * Wt[q, j]
                        J[i, j] = acc
                for k in range(n):
                    for i in range(s):
                        acc = mf[k, b, l, t, i]
                        for j in range(s):
                            acc += J[i, j] * (ms[k, b, l, t + 1, j] - mp[k, b, l, t + 1, j])
                        ms[k, b, l, t, i] = acc
                for i in range(s):  # M = J (Ps_{t+1} - Pp_{t+1})
                    for j in range(s):
                        acc = 0.0
                        for q in range(s):
                            acc += J[i, q] * (Ps[b, l, t + 1, q, j] - Pp[b, l, t + 1, q, j])
                        M[i, j] = acc
                for i in range(s):
                    for j in range(s):
                        acc = Pf[b, l, t, i, j]
                        for q in range(s):
                            acc += M[i, q] * J[j, q]
                        Ps[b, l, t, i, j] = acc
    return 0


# ---------------------------------------------------------------------------------------------- backward
@jit
def _backward(A, Q, P0, h, D, r, mp, Pp, mf, Pf, W, ms, Ps, g_mean, g_var, g_ll,
              gA, gQ, gP0, gD, gr):  # pragma: no cover - compiled
    """Vector-Jacobian product of :func:`_forward`'s outputs (h·m^s for every data column, h P^s hᵀ, log Z)
    with cotangents g_mean (n, B, L, T), g_var (B, L, T), g_ll (B, L). Accumulates into gA, gQ (shapes of
    A, Q), gP0 and writes gD, gr. Adjoints are written for the operations exactly as :func:`_forward`
    performs them (no symmetry assumed), in reverse order."""
    n, B, L, T = D.shape
    s = h.shape[0]
    bms = np.empty((n, T, s))  # adjoints of m^s, P^s, m (filtered), P, m⁻, P⁻ for one chain
    bPs = np.empty((T, s, s))
    bmf = np.zeros((n, T, s))
    bPf = np.zeros((T, s, s))
    bmp = np.zeros((n, T, s))
    bPp = np.zeros((T, s, s))
    c = np.empty(s)
    bc = np.empty(s)
    e = np.empty(n)
    be = np.empty(n)
    AP = np.empty((s, s))
    J = np.empty((s, s))
    bJ = np.empty((s, s))
    X = np.empty((s, s))
    Y = np.empty((s, s))
    for b in range(B):
        for l in range(L):
            bmf[:] = 0.0
            bPf[:] = 0.0
            bmp[:] = 0.0
            bPp[:] = 0.0
            for t in range(T):
                for i in range(s):
                    for k in range(n):
                        bms[k, t, i] = h[i] * g_mean[k, b, l, t]
                    for j in range(s):
                        bPs[t, i, j] = g_var[b, l, t] * h[i] * h[j]
            # ---- RTS in reverse (forward ran t = T-2 .. 0)
            for t in range(T - 1):
                An = A[l, min(t + 1, A.shape[1] - 1)]
                Wt = W[b, l, t + 1]
                for i in range(s):
                    for j in range(s):
                        acc = 0.0
                        for q in range(s):
                            acc += Pf[b, l, t, i, q] * An[j, q]
                        AP[i, j] = acc
                for i in range(s):
                    for j in range(s):
                        acc = 0.0
                        for q in range(s):
                            acc += AP[i, q] * Wt[q, j]
                        J[i, j] = acc
                # m^s_t = m_t + J (m^s_{t+1} - m⁻_{t+1})
                for i in range(s):
                    for j in range(s):
                        bJ[i, j] = 0.0
                for k in range(n):
                    for i in range(s):
                        bmf[k, t, i] += bms[k, t, i]
                        for j in range(s):
                            bJ[i, j] += bms[k, t, i] * (ms[k, b, l, t + 1, j] - mp[k, b, l, t + 1, j])
                    for j in range(s):
                        acc = 0.0
                        for i in range(s):
                            acc += J[i, j] * bms[k, t, i]
                        bms[k, t + 1, j] += acc
                        bmp[k, t + 1, j] -= acc
                # P^s_t = P_t + J Δ Jᵀ, Δ = P^s_{t+1} - P⁻_{t+1}: J̄ += (Ȳ + Ȳᵀ) J Δ... written for the literal
                # products M = J Δ, Y = M Jᵀ: M̄ = Ȳ J, J̄ += Ȳᵀ M + M̄ Δᵀ, Δ̄ = Jᵀ M̄
                for i in range(s):
                    for j in range(s):
                        bPf[t, i, j] += bPs[t, i, j]
                for i in range(s):  # X = M̄ = Ȳ J
                    for j in range(s):
                        acc = 0.0
                        for q in range(s):
                            acc += bPs[t, i, q] * J[q, j]
                        X[i, j] = acc
                for i in range(s):  # Y = M = J Δ
                    for j in range(s):
                        acc = 0.0
                        for q in range(s):
                            acc += J[i, q] * (Ps[b, l, t + 1, q, j] - Pp[b, l, t + 1, q, j])
                        Y[i, j] = acc
                for i in range(s):
                    for j in range(s):
                        acc = 0.0
                        for q in range(s):
                            acc += bPs[t, q, i] * Y[q, j]  # Ȳᵀ M
                            acc += X[i, q] * (Ps[b, l, t + 1, j, q] - Pp[b, l, t + 1, j, q])  # M̄ Δᵀ
                        bJ[i, j] += acc
                for i in range(s):  # Δ̄ = Jᵀ M̄
                    for j in range(s):
                        acc = 0.0
                        for q in range(s):
                            acc += J[q, i] * X[q, j]
                        bPs[t + 1, i, j] += acc
                        bPp[t + 1, i, j] -= acc
                # J = (P_t A_{t+1}ᵀ) W: P̄_t += J̄ Wᵀ A, Ā += Wᵀ... (from AP̄ = J̄ Wᵀ), W̄ = APᵀ J̄, P̄⁻ -= Wᵀ W̄ Wᵀ
                for i in range(s):  # X = AP̄ = J̄ Wᵀ
                    for j in range(s):
                        acc = 0.0
                        for q in range(s):
                            acc += bJ[i, q] * Wt[j, q]
                        X[i, j] = acc
                gAn = gA[l, min(t + 1, gA.shape[1] - 1)]
                for i in range(s):  # AP = Pf Aᵀ: P̄f += AP̄ A, Ā += AP̄ᵀ Pf
                    for j in range(s):
                        acc = 0.0
                        acc2 = 0.0
                        for q in range(s):
                            acc += X[i, q] * An[q, j]
                            acc2 += X[q, i] * Pf[b, l, t, q, j]
                        bPf[t, i, j] += acc
                        gAn[i, j] += acc2
                for i in range(s):  # Y = W̄ = APᵀ J̄
                    for j in range(s):
                        acc = 0.0
                        for q in range(s):
                            acc += AP[q, i] * bJ[q, j]
                        Y[i, j] = acc
                for i in range(s):  # X = Wᵀ W̄
                    for j in range(s):
                        acc = 0.0
                        for q in range(s):
                            acc += Wt[q, i] * Y[q, j]
                        X[i, j] = acc
                for i in range(s):  # P̄⁻ -= X Wᵀ
                    for j in range(s):
                        acc = 0.0
                        for q in range(s):
                            acc += X[i, q] * Wt[j, q]
                        bPp[t + 1, i, j] -= acc
            for i in range(s):  # m^s_{T-1} = m_{T-1}, P^s_{T-1} = P_{T-1}
                for k in range(n):
                    bmf[k, T - 1, i] += bms[k, T - 1, i]
                for j in range(s):
                    bPf[T - 1, i, j] += bPs[T - 1, i, j]
            # ---- filter in reverse
            for t in range(T - 1, -1, -1):
                for i in range(s):
                    acc = 0.0
                    for j in range(s):
                        acc += Pp[b, l, t, i, j] * h[j]
                    c[i] = acc
                S = r[b, l, t]
                for i in range(s):
                    S += h[i] * c[i]
                for k in range(n):
                    acc = D[k, b, l, t]
                    for i in range(s):
                        acc -= h[i] * mp[k, b, l, t, i]
                    e[k] = acc
                # P = P⁻ - c cᵀ / S
                bS = 0.0
                for i in range(s):
                    acc = 0.0
                    for j in range(s):
                        bPp[t, i, j] += bPf[t, i, j]
                        acc -= (bPf[t, i, j] + bPf[t, j, i]) * c[j]
                        bS += bPf[t, i, j] * c[i] * c[j]
                    bc[i] = acc / S
                bS /= S * S
                # m = m⁻ + c e / S
                for k in range(n):
                    cm = 0.0
                    for i in range(s):
                        bmp[k, t, i] += bmf[k, t, i]
                        bc[i] += bmf[k, t, i] * e[k] / S
                        cm += c[i] * bmf[k, t, i]
                    be[k] = cm / S
                    bS -= cm * e[k] / (S * S)
                # log Z term of D[0]
                gl = g_ll[b, l]
                bS += gl * (-0.5 / S + 0.5 * e[0] * e[0] / (S * S))
                be[0] -= gl * e[0] / S
                # e = D - h·m⁻
                for k in range(n):
                    gD[k, b, l, t] = be[k]
                    for i in range(s):
                        bmp[k, t, i] -= h[i] * be[k]
                # S = h·c + r, c = P⁻ h
                gr[b, l, t] = bS
                for i in range(s):
                    bc[i] += bS * h[i]
                for i in range(s):
                    for j in range(s):
                        bPp[t, i, j] += bc[i] * h[j]
                if t == 0:
                    for i in range(s):
                        for j in range(s):
                            gP0[l, i, j] += bPp[0, i, j]
                    continue
                At = A[l, min(t, A.shape[1] - 1)]
                gAt = gA[l, min(t, gA.shape[1] - 1)]
                gQt = gQ[l, min(t, gQ.shape[1] - 1)]
                # m⁻ = A m_{t-1}
                for k in range(n):
                    for i in range(s):
                        for j in range(s):
                            gAt[i, j] += bmp[k, t, i] * mf[k, b, l, t - 1, j]
                            bmf[k, t - 1, j] += At[i, j] * bmp[k, t, i]
                # P⁻ = (A P_{t-1}) Aᵀ + Q with AP = A P_{t-1}: ĀP = P̄⁻ A, Ā += P̄⁻ᵀ AP + ĀP P_{t-1}ᵀ,
                # P̄_{t-1} += Aᵀ ĀP
                for i in range(s):
                    for j in range(s):
                        acc = 0.0
                        for q in range(s):
                            acc += At[i, q] * Pf[b, l, t - 1, q, j]
                        AP[i, j] = acc
                for i in range(s):
                    for j in range(s):
                        gQt[i, j] += bPp[t, i, j]
                        acc = 0.0
                        for q in range(s):
                            acc += bPp[t, i, q] * At[q, j]
                        X[i, j] = acc  # ĀP
                for i in range(s):
                    for j in range(s):
                        acc = 0.0
                        acc2 = 0.0
                        for q in range(s):
                            acc += bPp[t, q, i] * AP[q, j] + X[i, q] * Pf[b, l, t - 1, j, q]
                            acc2 += At[q, i] * X[q, j]
                        gAt[i, j] += acc
                        bPf[t - 1, i, j] += acc2
    return 0


# ------------------------------------------------------------------------------------------- prior draws
@jit
def _draw(A, G, eps, h, x, f):  # pragma: no cover - compiled
    """x_0 = G_0 ε_0, x_t = A_t x_{t-1} + G_t ε_t; f = h·x. A (L, T_A, s, s), G (L, T, s, s), eps (m, L, T, s)."""
    m, L, T, s = eps.shape
    for a in range(m):
        for l in range(L):
            for t in range(T):
                Gt = G[l, t]
                At = A[l, min(t, A.shape[1] - 1)]
                acc_f = 0.0
                for i in range(s):
                    acc = 0.0
                    for j in range(s):
                        acc += Gt[i, j] * eps[a, l, t, j]
                        if t > 0:
                            acc += At[i, j] * x[a, l, t - 1, j]
                    x[a, l, t, i] = acc
                    acc_f += h[i] * acc
                f[a, l, t] = acc_f


@jit
def _draw_backward(A, G, eps, h, x, g_f, gA, gG):  # pragma: no cover - compiled
    m, L, T, s = eps.shape
    bx = np.empty(s)
    nxt = np.empty(s)
    for a in range(m):
        for l in range(L):
            nxt[:] = 0.0  # Aᵀ x̄ carried from step t + 1
            for t in range(T - 1, -1, -1):
                for i in range(s):
                    bx[i] = h[i] * g_f[a, l, t] + nxt[i]
                Gt = gG[l, t]
                for i in range(s):
                    for j in range(s):
                        Gt[i, j] += bx[i] * eps[a, l, t, j]
                if t > 0:
                    At = A[l, min(t, A.shape[1] - 1)]
                    gAt = gA[l, min(t, gA.shape[1] - 1)]
                    for j in range(s):
                        acc = 0.0
                        for i in range(s):
                            gAt[i, j] += bx[i] * x[a, l, t - 1, j]
                            acc += At[i, j] * bx[i]
                        nxt[j] = acc


# ---------------------------------------------------------------------------------------- torch wrappers
def _np(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float64)


class _SiteSmoother(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, Q, P0, h, D, r):
        a = [_np(x) for x in (A, Q, P0, h, D, r)]
        n, B, L, T = a[4].shape
        s = a[3].shape[0]
        mp, mf, ms = (np.empty((n, B, L, T, s)) for _ in range(3))
        Pp, Pf, W, Ps = (np.empty((B, L, T, s, s)) for _ in range(4))
        ll = np.empty((B, L))
        if _forward(*a, mp, Pp, mf, Pf, W, ms, Ps, ll):
            raise NotPositiveDefinite("a predictive covariance is not positive definite")
        ctx.arrays = a + [mp, Pp, mf, Pf, W, ms, Ps]
        ctx.shapes = (A.shape, Q.shape)
        hv = a[3]
        out = [torch.from_numpy(x).to(D.dtype) for x in (ms @ hv, (Ps @ hv) @ hv, ll)]
        return tuple(out)

    @staticmethod
    def backward(ctx, g_mean, g_var, g_ll):
        a = ctx.arrays
        A, Q, P0, h, D, r = a[:6]
        n, B, L, T = D.shape
        gm = np.zeros(D.shape) if g_mean is None else _np(g_mean)
        gv = np.zeros(r.shape) if g_var is None else _np(g_var)
        gl = np.zeros((B, L)) if g_ll is None else _np(g_ll)
        gA, gQ, gP0 = np.zeros(A.shape), np.zeros(Q.shape), np.zeros(P0.shape)
        gD, gr = np.empty(D.shape), np.empty(r.shape)
        _backward(*a, gm, gv, gl, gA, gQ, gP0, gD, gr)
        dtype = g_ll.dtype if g_ll is not None else torch.float64
        grads = [torch.from_numpy(x).to(dtype) for x in (gA, gQ, gP0)]
        return grads[0], grads[1], grads[2], None, torch.from_numpy(gD).to(dtype), torch.from_numpy(gr).to(dtype)


def site_smoother(A, Q, P0, h, data, r):
    """Smoothed latent means h·m^s (n, B, L, T) of every data column ``data`` (n, B, L, T), marginal variances
    h P^s hᵀ (B, L, T) and log Z = log p(data[0]) (B, L), for chains (b, l) with prior A, Q (L, T|1, s, s),
    P0 (L, s, s), observation row h (s,) (no gradient) and site variances ``r`` (B, L, T). Differentiable in
    A, Q, P0, data and r by the compiled reverse pass. Raises :class:`NotPositiveDefinite` (a LinAlgError)
    if a predictive covariance is not positive definite."""
    if h.requires_grad:
        raise ValueError("`h`: the observation row must not require a gradient.")
    return _SiteSmoother.apply(A, Q, P0, h, data, r)


class _PriorDraws(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, G, h, eps):
        a = [_np(x) for x in (A, G, eps, h)]
        m, L, T, s = a[2].shape
        x, f = np.empty((m, L, T, s)), np.empty((m, L, T))
        _draw(a[0], a[1], a[2], a[3], x, f)
        ctx.arrays = a + [x]
        return torch.from_numpy(f).to(eps.dtype)

    @staticmethod
    def backward(ctx, g_f):
        A, G, eps, h, x = ctx.arrays
        gA, gG = np.zeros(A.shape), np.zeros(G.shape)
        _draw_backward(A, G, eps, h, x, _np(g_f), gA, gG)
        return torch.from_numpy(gA).to(g_f.dtype), torch.from_numpy(gG).to(g_f.dtype), None, None


def prior_draws(A, G, h, eps):
    """Prior paths f_t = h·x_t, x_0 = G_0 ε_0, x_t = A_t x_{t-1} + G_t ε_t, for ``eps`` (m, L, T, s): (m, L, T).
    A (L, T|1, s, s), G (L, T, s, s) (G_0 = chol P0, G_t = chol Q_t); differentiable in A and G."""
    if h.requires_grad:
        raise ValueError("`h`: the observation row must not require a gradient.")
    return _PriorDraws.apply(A, G, h, eps)
