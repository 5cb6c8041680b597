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

O(T s³) per chain in both directions, no Python loop. Arrays are laid out chain-last, (..., C) with C =
sequences x latents, so every elementary operation is a loop over all chains at once (vectorised by the
compiler; the s x s loops are tiny, and unrolled for s = 2). The prior path draws of Matheron's rule,
x_t = A_t x_{t-1} + chol(Q_t) ε_t, their noise factors, the KL and the layout changes get the same treatment:
one compiled call forwards and one backwards (:func:`site_posterior_and_samples`); :func:`path_log_prob` is the
filter alone with r = 0 (log p(z) of a noiseless path, Pyro's latent-site density). Only scalar sites with
0 < r < ∞ and a constant observation row h; :mod:`latentgp.variational.amortised` falls back to the scans
otherwise, and when a covariance is not numerically positive definite (the scans' jitter policy handles it).
The first call after an install compiles for ~25 s; the machine code is cached next to this file.
"""
from __future__ import annotations

import math

import numba
import numpy as np
import torch
from torch.autograd.function import once_differentiable

from .kalman_compiled import cho_solve, cholesky

# error_model="numpy": division by zero gives inf/nan instead of raising, so numba need not check every
# division in the per-chain loops and can vectorise them (the PD checks reject such inputs before)
jit = numba.njit(cache=True, nogil=True, error_model="numpy")

LOG2PI = math.log(2.0 * math.pi)


class NotPositiveDefinite(np.linalg.LinAlgError):
    """A covariance of the compiled recursion is not positive definite (callers fall back to the scans)."""


# ------------------------------------------------------------------------------- small chain-last kernels
@jit
def _mm(X, Y, out, xt, yt, alpha=1.0, beta=0.0):  # pragma: no cover - compiled
    """out[:, :, c] = beta out[:, :, c] + alpha X' Y' for every chain c (' = transposed if the flag is set).
    Direct indexing only: slices inside these loops would create (reference-counted) views."""
    s, C = out.shape[0], out.shape[2]
    if s == 2:  # unrolled: the common Matérn-3/2 state, ~2x faster than the loops below
        for c in range(C):
            a00, a11 = X[0, 0, c], X[1, 1, c]
            a01, a10 = (X[1, 0, c], X[0, 1, c]) if xt else (X[0, 1, c], X[1, 0, c])
            b00, b11 = Y[0, 0, c], Y[1, 1, c]
            b01, b10 = (Y[1, 0, c], Y[0, 1, c]) if yt else (Y[0, 1, c], Y[1, 0, c])
            p00 = alpha * (a00 * b00 + a01 * b10)
            p01 = alpha * (a00 * b01 + a01 * b11)
            p10 = alpha * (a10 * b00 + a11 * b10)
            p11 = alpha * (a10 * b01 + a11 * b11)
            if beta != 0.0:
                p00 += beta * out[0, 0, c]
                p01 += beta * out[0, 1, c]
                p10 += beta * out[1, 0, c]
                p11 += beta * out[1, 1, c]
            out[0, 0, c], out[0, 1, c], out[1, 0, c], out[1, 1, c] = p00, p01, p10, p11
        return
    for i in range(s):
        for j in range(s):
            for c in range(C):
                out[i, j, c] = beta * out[i, j, c] if beta != 0.0 else 0.0
    for i in range(s):
        for j in range(s):
            for q in range(s):
                if xt and yt:
                    for c in range(C):
                        out[i, j, c] += alpha * X[q, i, c] * Y[j, q, c]
                elif xt:
                    for c in range(C):
                        out[i, j, c] += alpha * X[q, i, c] * Y[q, j, c]
                elif yt:
                    for c in range(C):
                        out[i, j, c] += alpha * X[i, q, c] * Y[j, q, c]
                else:
                    for c in range(C):
                        out[i, j, c] += alpha * X[i, q, c] * Y[q, j, c]


@jit
def _acc(out, X, alpha):  # pragma: no cover - compiled; out += alpha X for (rows, cols, C) arrays
    # explicit loops: numba's in-place array expressions allocate a temporary (~100 ns each)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            for c in range(out.shape[2]):
                out[i, j, c] += alpha * X[i, j, c]


@jit
def _inverse(P, W, Lc):  # pragma: no cover - compiled; W[:, :, c] = P[:, :, c]^{-1}; False if not PD
    s, C = P.shape[0], P.shape[2]
    if s == 1:
        for c in range(C):
            if not P[0, 0, c] > 0.0:
                return False
            W[0, 0, c] = 1.0 / P[0, 0, c]
        return True
    if s == 2:  # closed form; positive definite iff P00 > 0 and det > 0 (relative to P00 P11)
        for c in range(C):
            a, b, d = P[0, 0, c], 0.5 * (P[0, 1, c] + P[1, 0, c]), P[1, 1, c]
            det = a * d - b * b
            if not (a > 0.0 and det > 1e-14 * a * d):
                return False
            W[0, 0, c] = d / det
            W[1, 1, c] = a / det
            W[0, 1, c] = W[1, 0, c] = -b / det
        return True
    Pc, Wc = np.empty((s, s)), np.empty((s, s))
    for c in range(C):  # Cholesky, then W = P^{-1} by two triangular solves
        for i in range(s):
            for j in range(s):
                Pc[i, j] = P[i, j, c]
                Wc[i, j] = 1.0 if i == j else 0.0
        if not cholesky(Pc, Lc):
            return False
        cho_solve(Lc, Wc)
        for i in range(s):
            for j in range(s):
                W[i, j, c] = Wc[i, j]
    return True


@jit
def _gain(P, h, r, cv, S):  # pragma: no cover - compiled; cv = P h and S = h·P h + r per chain
    s, C = P.shape[0], P.shape[2]
    for c in range(C):
        S[c] = r[c]
    for i in range(s):
        for c in range(C):
            cv[i, c] = 0.0
        for j in range(s):
            for c in range(C):
                cv[i, c] += P[i, j, c] * h[j]
        for c in range(C):
            S[c] += h[i] * cv[i, c]


# ----------------------------------------------------------------------------------------------- forward
@jit
def _forward(A, Q, P0, h, D, r, mp, Pp, mf, Pf, W, J, ms, Ps, ll, hmean, hvar, smooth=True):  # pragma: no cover
    """Filter + RTS for C chains. A, Q: (T_A, s, s, C), T_A in {1, T} (index 0 of a length-T axis unused);
    P0 (s, s, C); h (s,); D (n, T, C) data (log Z is that of D[0]); r (T, C). Writes the filter's predicted /
    filtered moments, the inverse predictive covariances W and gains J, the smoothed moments, log Z (C,), and
    the smoothed h·x means (n, T, C) and variances (T, C). Returns 1 if a predictive covariance is not positive
    definite."""
    n, T, C = D.shape
    s = h.shape[0]
    TA = A.shape[0]
    cv = np.empty((s, C))
    S = np.empty(C)
    e = np.empty(C)
    AP = np.empty((s, s, C))
    M = np.empty((s, s, C))
    Dl = np.empty((s, s, C))
    Lc = np.empty((s, s))
    ll[:] = 0.0
    for t in range(T):
        if t == 0:
            mp[:, 0] = 0.0
            Pp[0] = P0
        else:
            At = A[min(t, TA - 1)]
            for k in range(n):
                for i in range(s):
                    o = mp[k, t, i]
                    o[:] = 0.0
                    for j in range(s):
                        a = At[i, j]
                        x = mf[k, t - 1, j]
                        for c in range(C):
                            o[c] += a[c] * x[c]
            _mm(At, Pf[t - 1], AP, False, False)
            _mm(AP, At, Pp[t], False, True)
            _acc(Pp[t], Q[min(t, Q.shape[0] - 1)], 1.0)
        P = Pp[t]
        _gain(P, h, r[t], cv, S)
        for k in range(n):
            d = D[k, t]
            for c in range(C):
                e[c] = d[c]
            for i in range(s):
                hi = h[i]
                x = mp[k, t, i]
                for c in range(C):
                    e[c] -= hi * x[c]
            for i in range(s):
                o = mf[k, t, i]
                x = mp[k, t, i]
                ci = cv[i]
                for c in range(C):
                    o[c] = x[c] + ci[c] * e[c] / S[c]
            if k == 0:
                for c in range(C):
                    ll[c] -= 0.5 * (LOG2PI + math.log(S[c]) + e[c] * e[c] / S[c])
        for i in range(s):
            for j in range(s):
                o = Pf[t, i, j]
                x = P[i, j]
                ci, cj = cv[i], cv[j]
                for c in range(C):
                    o[c] = x[c] - ci[c] * cj[c] / S[c]
    if not smooth:  # the filter's log-likelihood is all the caller needs
        return 0
    # Rauch-Tung-Striebel
    ms[:, T - 1] = mf[:, T - 1]
    Ps[T - 1] = Pf[T - 1]
    for t in range(T - 2, -1, -1):
        if not _inverse(Pp[t + 1], W[t + 1], Lc):
            return 1
        _mm(Pf[t], A[min(t + 1, TA - 1)], AP, False, True)
        _mm(AP, W[t + 1], J[t], False, False)
        Jt = J[t]
        for k in range(n):
            for i in range(s):
                o = ms[k, t, i]
                o[:] = mf[k, t, i]
                for j in range(s):
                    a = Jt[i, j]
                    x, y = ms[k, t + 1, j], mp[k, t + 1, j]
                    for c in range(C):
                        o[c] += a[c] * (x[c] - y[c])
        for i in range(s):
            for j in range(s):
                o, x, y = Dl[i, j], Ps[t + 1, i, j], Pp[t + 1, i, j]
                for c in range(C):
                    o[c] = x[c] - y[c]
        _mm(Jt, Dl, M, False, False)
        _mm(M, Jt, Ps[t], False, True)
        _acc(Ps[t], Pf[t], 1.0)
    # latent (h·x) means of every data column and marginal variances
    for t in range(T):
        for c in range(C):
            v = 0.0
            for i in range(s):
                for j in range(s):
                    v += h[i] * Ps[t, i, j, c] * h[j]
            hvar[t, c] = v
            for k in range(n):
                acc = 0.0
                for i in range(s):
                    acc += h[i] * ms[k, t, i, c]
                hmean[k, t, c] = acc
    return 0


# ---------------------------------------------------------------------------------------------- backward
@jit
def _backward(A, Q, P0, h, D, r, mp, Pp, mf, Pf, W, J, ms, Ps, g_mean, g_var, g_ll,
              gA, gQ, gP0, gD, gr, smooth=True):  # pragma: no cover - compiled
    """Vector-Jacobian product of :func:`_forward`'s outputs (h·m^s for every data column (n, T, C),
    h P^s hᵀ (T, C), log Z (C,)) with cotangents g_mean, g_var, g_ll. Accumulates into gA, gQ (shapes of A,
    Q), gP0 and writes gD, gr. Adjoints are written for the operations exactly as :func:`_forward` performs
    them (no symmetry assumed), in reverse order; a bar (x̄) is the adjoint of x. ``smooth=False``: the reverse
    of the filter alone (for a forward run without the smoother; only g_ll is read)."""
    n, T, C = D.shape
    s = h.shape[0]
    TA = A.shape[0]
    bms = np.empty((n, T, s, C))
    bPs = np.empty((T, s, s, C))
    bmf = np.zeros((n, T, s, C))
    bPf = np.zeros((T, s, s, C))
    bmp = np.zeros((n, T, s, C))
    bPp = np.zeros((T, s, s, C))
    cv = np.empty((s, C))
    bc = np.empty((s, C))
    S = np.empty(C)
    bS = np.empty(C)
    e = np.empty((n, C))
    be = np.empty((n, C))
    AP = np.empty((s, s, C))
    bJ = np.empty((s, s, C))
    X = np.empty((s, s, C))
    Y = np.empty((s, s, C))
    Dl = np.empty((s, s, C))
    if smooth:  # else only log Z has a cotangent (g_mean, g_var unused)
        for t in range(T):
            for i in range(s):
                for c in range(C):
                    for k in range(n):
                        bms[k, t, i, c] = h[i] * g_mean[k, t, c]
                    for j in range(s):
                        bPs[t, i, j, c] = h[i] * h[j] * g_var[t, c]
        # ---- RTS in reverse (the forward ran t = T-2 .. 0)
        for t in range(T - 1):
            An = A[min(t + 1, TA - 1)]
            Wt, Jt = W[t + 1], J[t]
            # m^s_t = m_t + J (m^s_{t+1} - m⁻_{t+1})
            bJ[:] = 0.0
            for k in range(n):
                _acc(bmf[k, t:t + 1], bms[k, t:t + 1], 1.0)
                for i in range(s):
                    g = bms[k, t, i]
                    for j in range(s):
                        o, x, y = bJ[i, j], ms[k, t + 1, j], mp[k, t + 1, j]
                        for c in range(C):
                            o[c] += g[c] * (x[c] - y[c])
                for j in range(s):
                    o1, o2 = bms[k, t + 1, j], bmp[k, t + 1, j]
                    for i in range(s):
                        a, g = Jt[i, j], bms[k, t, i]
                        for c in range(C):
                            v = a[c] * g[c]
                            o1[c] += v
                            o2[c] -= v
            # P^s_t = P_t + M Jᵀ, M = J Δ, Δ = P^s_{t+1} - P⁻_{t+1}:
            # M̄ = P̄^s_t J, J̄ += P̄^s_tᵀ M + M̄ Δᵀ, Δ̄ = Jᵀ M̄
            _acc(bPf[t], bPs[t], 1.0)
            for i in range(s):
                for j in range(s):
                    o, x, y = Dl[i, j], Ps[t + 1, i, j], Pp[t + 1, i, j]
                    for c in range(C):
                        o[c] = x[c] - y[c]
            _mm(bPs[t], Jt, X, False, False)  # M̄
            _mm(Jt, Dl, Y, False, False)  # M
            _mm(bPs[t], Y, bJ, True, False, 1.0, 1.0)
            _mm(X, Dl, bJ, False, True, 1.0, 1.0)
            _mm(Jt, X, AP, True, False)  # Δ̄
            _acc(bPs[t + 1], AP, 1.0)
            _acc(bPp[t + 1], AP, -1.0)
            # J = K W with K = P_t A_{t+1}ᵀ: K̄ = J̄ Wᵀ, W̄ = Kᵀ J̄; P̄_t += K̄ A, Ā += K̄ᵀ P_t; P̄⁻ -= Wᵀ W̄ Wᵀ
            _mm(bJ, Wt, X, False, True)  # K̄
            _mm(X, An, bPf[t], False, False, 1.0, 1.0)
            _mm(X, Pf[t], gA[min(t + 1, TA - 1)], True, False, 1.0, 1.0)
            _mm(Pf[t], An, X, False, True)  # K
            _mm(X, bJ, Y, True, False)  # W̄
            _mm(Wt, Y, X, True, False)
            _mm(X, Wt, bPp[t + 1], False, True, -1.0, 1.0)
        _acc(bmf[:, T - 1], bms[:, T - 1], 1.0)  # m^s_{T-1} = m_{T-1}, P^s_{T-1} = P_{T-1}
        _acc(bPf[T - 1], bPs[T - 1], 1.0)
    # ---- filter in reverse
    for t in range(T - 1, -1, -1):
        P = Pp[t]
        _gain(P, h, r[t], cv, S)
        for k in range(n):
            e[k] = D[k, t]
            for i in range(s):
                hi = h[i]
                x = mp[k, t, i]
                for c in range(C):
                    e[k, c] -= hi * x[c]
        # P = P⁻ - c cᵀ / S
        _acc(bPp[t], bPf[t], 1.0)
        bS[:] = 0.0
        bc[:] = 0.0
        for i in range(s):
            for j in range(s):
                g, gt, cj, ci = bPf[t, i, j], bPf[t, j, i], cv[j], cv[i]
                o = bc[i]
                for c in range(C):
                    o[c] -= (g[c] + gt[c]) * cj[c] / S[c]
                    bS[c] += g[c] * ci[c] * cj[c] / (S[c] * S[c])
        # m = m⁻ + c e / S
        for k in range(n):
            _acc(bmp[k, t:t + 1], bmf[k, t:t + 1], 1.0)
            be[k] = 0.0
            for i in range(s):
                g, ci, o = bmf[k, t, i], cv[i], bc[i]
                ek, bek = e[k], be[k]
                for c in range(C):
                    o[c] += g[c] * ek[c] / S[c]
                    bek[c] += ci[c] * g[c] / S[c]
            for c in range(C):
                bS[c] -= be[k, c] * e[k, c] / S[c]
        # log Z term of D[0]
        for c in range(C):
            bS[c] += g_ll[c] * (-0.5 / S[c] + 0.5 * e[0, c] * e[0, c] / (S[c] * S[c]))
            be[0, c] -= g_ll[c] * e[0, c] / S[c]
        # e = D - h·m⁻
        for k in range(n):
            gD[k, t] = be[k]
            for i in range(s):
                hi = h[i]
                o, g = bmp[k, t, i], be[k]
                for c in range(C):
                    o[c] -= hi * g[c]
        # S = h·c + r, c = P⁻ h
        gr[t] = bS
        for i in range(s):
            hi = h[i]
            o = bc[i]
            for c in range(C):
                o[c] += bS[c] * hi
            for j in range(s):
                hj = h[j]
                o2 = bPp[t, i, j]
                for c in range(C):
                    o2[c] += o[c] * hj
        if t == 0:
            _acc(gP0, bPp[0], 1.0)
            continue
        At = A[min(t, TA - 1)]
        gAt = gA[min(t, TA - 1)]
        # m⁻ = A m_{t-1}
        for k in range(n):
            for i in range(s):
                g = bmp[k, t, i]
                for j in range(s):
                    o, x, a, o2 = gAt[i, j], mf[k, t - 1, j], At[i, j], bmf[k, t - 1, j]
                    for c in range(C):
                        o[c] += g[c] * x[c]
                        o2[c] += a[c] * g[c]
        # P⁻ = (A P_{t-1}) Aᵀ + Q: K̄ = P̄⁻ A for K = A P_{t-1}; Ā += P̄⁻ᵀ K + K̄ P_{t-1}ᵀ; P̄_{t-1} += Aᵀ K̄
        _acc(gQ[min(t, gQ.shape[0] - 1)], bPp[t], 1.0)
        _mm(At, Pf[t - 1], X, False, False)  # K
        _mm(bPp[t], X, gAt, True, False, 1.0, 1.0)
        _mm(bPp[t], At, Y, False, False)  # K̄
        _mm(Y, Pf[t - 1], gAt, False, True, 1.0, 1.0)
        _mm(At, Y, bPf[t - 1], True, False, 1.0, 1.0)
    return 0


# ------------------------------------------------------------------------------------------- prior draws
@jit
def _draw(A, G0, G, eps, h, x, f):  # pragma: no cover - compiled
    """x_0 = G0 ε_0, x_t = A_t x_{t-1} + G_t ε_t; f = h·x. A, G (T_A, s, s, C), G0 (s, s, C), eps (T, s, C)."""
    T, s, C = eps.shape
    TA = A.shape[0]
    for t in range(T):
        Gt = G0 if t == 0 else G[min(t, G.shape[0] - 1)]
        At = A[min(t, TA - 1)]
        f[t] = 0.0
        for i in range(s):
            o = x[t, i]
            o[:] = 0.0
            for j in range(s):
                g, ep = Gt[i, j], eps[t, j]
                for c in range(C):
                    o[c] += g[c] * ep[c]
                if t > 0:
                    a, xp = At[i, j], x[t - 1, j]
                    for c in range(C):
                        o[c] += a[c] * xp[c]
            hi = h[i]
            ft = f[t]
            for c in range(C):
                ft[c] += hi * o[c]


@jit
def _draw_backward(A, G0, G, eps, h, x, g_f, gA, gG0, gG):  # pragma: no cover - compiled
    T, s, C = eps.shape
    TA = A.shape[0]
    bx = np.empty((s, C))
    nxt = np.zeros((s, C))  # Aᵀ x̄ carried from step t + 1
    for t in range(T - 1, -1, -1):
        for i in range(s):
            for c in range(C):
                bx[i, c] = h[i] * g_f[t, c] + nxt[i, c]
        gGt = gG0 if t == 0 else gG[min(t, gG.shape[0] - 1)]
        for i in range(s):
            for j in range(s):
                o, g, ep = gGt[i, j], bx[i], eps[t, j]
                for c in range(C):
                    o[c] += g[c] * ep[c]
        if t > 0:
            At = A[min(t, TA - 1)]
            gAt = gA[min(t, TA - 1)]
            nxt[:] = 0.0
            for i in range(s):
                g = bx[i]
                for j in range(s):
                    o, xp, a, o2 = gAt[i, j], x[t - 1, j], At[i, j], nxt[j]
                    for c in range(C):
                        o[c] += g[c] * xp[c]
                        o2[c] += a[c] * g[c]


# ------------------------------------------------------------------- per-latent <-> per-chain prior arrays
@jit
def _expand(M, out):  # pragma: no cover - compiled; (L, T_, s, s) -> (T_, s, s, C), out[.., c] = M[c % L]
    L = M.shape[0]
    for t in range(out.shape[0]):
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                for c in range(out.shape[3]):
                    out[t, i, j, c] = M[c % L, t, i, j]


@jit
def _reduce(g, out):  # pragma: no cover - compiled; adjoint of _expand: out (L, T_, s, s) += Σ over copies
    L = out.shape[0]
    for t in range(g.shape[0]):
        for i in range(g.shape[1]):
            for j in range(g.shape[2]):
                for c in range(g.shape[3]):
                    out[c % L, t, i, j] += g[t, i, j, c]


# ------------------------------------------------------------------ noise factors (Cholesky) and adjoint
@jit
def _factors(Q, P0, G, G0):  # pragma: no cover - compiled
    """G0 = chol P0 and G = chol(Q + 1e-12 max|diag Q| I) per latent and step, max over all latents: the factors
    and jitter of :func:`latentgp.variational.cvi.noise_factors` on the joint state. Q, G (L, T_, s, s); P0, G0
    (L, 1, s, s)."""
    s = Q.shape[2]
    Qj = np.empty((s, s))
    for l in range(Q.shape[0]):
        if not cholesky(P0[l, 0], G0[l, 0]):
            return False
    for t in range(Q.shape[1]):
        scale = 0.0  # over every latent: the scans factor the joint (block-diagonal) state
        for l in range(Q.shape[0]):
            for i in range(s):
                scale = max(scale, abs(Q[l, t, i, i]))
        for l in range(Q.shape[0]):
            for i in range(s):
                for j in range(s):
                    Qj[i, j] = Q[l, t, i, j] + (1e-12 * scale + 1e-300 if i == j else 0.0)
            if not cholesky(Qj, G[l, t]):
                return False
    return True


@jit
def _cholesky_adjoint(G, gG, gS, scratch):  # pragma: no cover - compiled
    """gS += the gradient with respect to S (symmetric) of ⟨gG, chol S⟩ at G = chol S:
    ½ (X + Xᵀ), X = G⁻ᵀ Φ(Gᵀ gG) G⁻¹, Φ = lower triangle with the diagonal halved. ``scratch``: (3, s, s)
    work space (one step per call on irregular grids: no allocation in the loop)."""
    s = G.shape[0]
    inv, phi, X = scratch[0], scratch[1], scratch[2]
    inv[:] = 0.0  # G⁻¹ (lower triangular)
    phi[:] = 0.0
    for k in range(s):
        for i in range(k, s):
            acc = 1.0 if i == k else 0.0
            for q in range(k, i):
                acc -= G[i, q] * inv[q, k]
            inv[i, k] = acc / G[i, i]
    for i in range(s):
        for j in range(i + 1):
            acc = 0.0
            for q in range(s):
                acc += G[q, i] * gG[q, j]
            phi[i, j] = 0.5 * acc if i == j else acc
    for i in range(s):
        for j in range(s):
            acc = 0.0
            for p in range(s):
                for q in range(s):
                    acc += inv[p, i] * phi[p, q] * inv[q, j]
            X[i, j] = acc
    for i in range(s):
        for j in range(s):
            gS[i, j] += 0.5 * (X[i, j] + X[j, i])


# ---------------------------------------------------------------------------- drivers: layout, KL, Matheron
@jit
def _posterior_forward(prior, G0, G, chains, h, mean, prec, eps, noise, y, r, eps_d, x, f, D,
                       mp, Pp, mf, Pf, W, J, ms, Ps, ll, hm, hv,
                       out_mean, out_var, out_kl, out_ll, out_draws):  # pragma: no cover - compiled
    """Sites (B, T, L) -> chains; prior draws; smoother; KL, log Z and draws back in (.., B, T, L) layout.
    ``prior`` = per-latent (A, Q, P0) as (L, T_, s, s) arrays; their noise factors are written to G0, G and
    everything is copied into ``chains`` (A, Q, P0 for the B·L smoother chains, A, G0, G for the S·B·L draw
    chains). eps (T, S, C, s), noise (S, C, T): the standard normals. Returns 1 if a covariance is not PD."""
    B, T, L = mean.shape
    S, s, C = noise.shape[0], h.shape[0], B * L
    if not _factors(prior[1], prior[2], G, G0):
        return 1
    full = (prior[0], prior[1], prior[2], G0, G)
    for k in range(6):
        _expand(full[(0, 1, 2, 0, 3, 4)[k]], chains[k])
    A, Q, P0, Ad, G0, G = chains[0], chains[1], chains[2][0], chains[3], chains[4][0], chains[5]
    for b in range(B):
        for t in range(T):
            for l in range(L):
                y[t, b * L + l] = mean[b, t, l]
                r[t, b * L + l] = 1.0 / prec[b, t, l]
    for t in range(T):
        for a in range(S):
            for c in range(C):
                for j in range(s):
                    eps_d[t, j, a * C + c] = eps[t, a, c, j]
    _draw(Ad, G0, G, eps_d, h, x, f)
    for t in range(T):
        for c in range(C):
            D[0, t, c] = y[t, c]
            root = math.sqrt(r[t, c])
            for a in range(S):
                D[1 + a, t, c] = y[t, c] - f[t, a * C + c] - root * noise[a, c, t]
    if _forward(A, Q, P0, h, D, r, mp, Pp, mf, Pf, W, J, ms, Ps, ll, hm, hv):
        return 1
    for b in range(B):
        out_kl[b] = 0.0
        out_ll[b] = 0.0
        for l in range(L):
            c = b * L + l
            out_ll[b] += ll[c]
            out_kl[b] -= ll[c]
            for t in range(T):
                resid = y[t, c] - hm[0, t, c]
                out_kl[b] -= 0.5 * ((resid * resid + hv[t, c]) / r[t, c] + math.log(r[t, c]) + LOG2PI)
                out_mean[b, t, l] = hm[0, t, c]
                out_var[b, t, l] = hv[t, c]
                for a in range(S):
                    out_draws[a, b, t, l] = f[t, a * C + c] + hm[1 + a, t, c]
    return 0


@jit
def _posterior_backward(F0, F, chains, h, noise, y, r, eps_d, x, D, mp, Pp, mf, Pf, W, J, ms, Ps, hm, hv,
                        g_mean, g_var, g_kl, g_ll, g_draws, g_prior, g_y, g_prec):  # pragma: no cover - compiled
    """Reverse of :func:`_posterior_forward` for cotangents in (.., B, T, L) layout; writes g_y, g_prec (B, T, L)
    and accumulates the adjoints of the per-latent (A, Q, P0) into ``g_prior``; F0, F: the noise factors."""
    A, Q, P0, Ad, G0, G = chains[0], chains[1], chains[2][0], chains[3], chains[4][0], chains[5]
    gA, gQ, gP0 = np.zeros(A.shape), np.zeros(Q.shape), np.zeros(chains[2].shape)
    gAd, gG0, gG = np.zeros(Ad.shape), np.zeros(chains[4].shape), np.zeros(G.shape)
    B, T, L = g_mean.shape
    S, C, n = noise.shape[0], B * L, D.shape[0]
    g_means = np.empty((n, T, C))
    g_v = np.empty((T, C))
    g_l = np.empty(C)
    # KL = Σ_t -½ [((ỹ - m)² + v)/r + log r + log 2π] - log Z, through m, v and log Z ...
    for b in range(B):
        for l in range(L):
            c = b * L + l
            g_l[c] = g_ll[b] - g_kl[b]
            for t in range(T):
                g_means[0, t, c] = g_mean[b, t, l] + g_kl[b] * (y[t, c] - hm[0, t, c]) / r[t, c]
                g_v[t, c] = g_var[b, t, l] - 0.5 * g_kl[b] / r[t, c]
                for a in range(S):
                    g_means[1 + a, t, c] = g_draws[a, b, t, l]
    gD, gr = np.empty((n, T, C)), np.empty((T, C))
    _backward(A, Q, P0, h, D, r, mp, Pp, mf, Pf, W, J, ms, Ps, g_means, g_v, g_l, gA, gQ, gP0[0], gD, gr)
    # ... and directly; D = [ỹ, ỹ - f - √r z]; r = 1 / λ
    g_f = np.empty((T, S * C))
    for b in range(B):
        for l in range(L):
            c = b * L + l
            for t in range(T):
                resid, rt = y[t, c] - hm[0, t, c], r[t, c]
                gy = -g_kl[b] * resid / rt
                grt = gr[t, c] + g_kl[b] * (0.5 * (resid * resid + hv[t, c]) / (rt * rt) - 0.5 / rt)
                for k in range(n):
                    gy += gD[k, t, c]
                for a in range(S):
                    grt -= 0.5 * gD[1 + a, t, c] * noise[a, c, t] / math.sqrt(rt)
                    g_f[t, a * C + c] = g_draws[a, b, t, l] - gD[1 + a, t, c]
                g_y[b, t, l] = gy
                g_prec[b, t, l] = -grt * rt * rt
    _draw_backward(Ad, G0, G, eps_d, h, x, g_f, gAd, gG0[0], gG)
    g_F0, g_F = np.zeros(F0.shape), np.zeros(F.shape)
    g_full = (g_prior[0], g_prior[1], g_prior[2], g_F0, g_F)
    for k in range(6):
        _reduce((gA, gQ, gP0, gAd, gG0, gG)[k], g_full[(0, 1, 2, 0, 3, 4)[k]])
    scratch = np.empty((3,) + F.shape[2:])
    for l in range(F.shape[0]):  # through the noise factors F0 = chol P0, F = chol Q
        _cholesky_adjoint(F0[l, 0], g_F0[l, 0], g_prior[2][l, 0], scratch)
        for t in range(F.shape[1]):
            _cholesky_adjoint(F[l, t], g_F[l, t], g_prior[1][l, t], scratch)


# ---------------------------------------------------------------------------------------- torch wrappers
def _np(x: torch.Tensor) -> np.ndarray:
    """A float64 numpy view (a copy only if the dtype differs); layouts are fixed up in numpy, whose calls
    cost ~1 µs where torch's cost ~5-10 µs."""
    return x.detach().cpu().numpy().astype(np.float64, copy=False)


class _SitePosterior(torch.autograd.Function):
    """See :func:`site_posterior_and_samples`. Chains c = b·L + l are laid out last; draw a of chain c is
    chain a·C + c of the prior-draw kernel."""

    @staticmethod
    def forward(ctx, A, Q, P0, h, mean, precision, eps, noise):
        B, T, L = mean.shape
        S, C, s = noise.shape[0], B * L, h.shape[0]
        n = S + 1
        prior = tuple(np.ascontiguousarray(_np(x)).reshape(L, -1, s, s) for x in (A, Q, P0))
        G0, G = np.empty(prior[2].shape), np.empty(prior[1].shape)
        chains = tuple(np.empty(shape[1:] + (copies * L,)) for shape, copies in zip(
            (prior[0].shape, prior[1].shape, prior[2].shape, prior[0].shape, G0.shape, G.shape),
            (B, B, B, S * B, S * B, S * B), strict=True))
        inputs = [np.ascontiguousarray(_np(x)) for x in (mean, precision)]
        inputs += [np.ascontiguousarray(_np(eps)).reshape(T, S, C, s),
                   np.ascontiguousarray(_np(noise)).reshape(S, C, T)]
        work = [np.empty((T, C)), np.empty((T, C)), np.empty((T, s, S * C)), np.empty((T, s, S * C)),
                np.empty((T, S * C)), np.empty((n, T, C))]  # y, r, eps_d, x, f, D
        state = [np.empty((n, T, s, C)), np.empty((T, s, s, C)), np.empty((n, T, s, C)), np.empty((T, s, s, C)),
                 np.empty((T, s, s, C)), np.empty((T, s, s, C)), np.empty((n, T, s, C)), np.empty((T, s, s, C))]
        ll, hm, hvar = np.empty(C), np.empty((n, T, C)), np.empty((T, C))
        outs = [np.empty((B, T, L)), np.empty((B, T, L)), np.empty(B), np.empty(B), np.empty((S, B, T, L))]
        hv = _np(h)
        if _posterior_forward(prior, G0, G, chains, hv, *inputs, *work, *state, ll, hm, hvar, *outs):
            raise NotPositiveDefinite("a predictive or noise covariance is not positive definite")
        ctx.saved = (G0, G, chains, hv, inputs[3], work, state, hm, hvar)
        ctx.dims = (B, T, L, S, mean.dtype, [x.shape for x in (A, Q, P0)])
        return tuple(torch.from_numpy(o).to(mean.dtype) for o in outs)

    @staticmethod
    @once_differentiable  # the hand-written reverse pass is not itself differentiable: refuse, do not drop terms
    def backward(ctx, g_mean, g_var, g_kl, g_log_z, g_draws):
        G0, G, chains, hv, noise, (y, r, eps_d, x, _, D), state, hm, hvar = ctx.saved
        B, T, L, S, dtype, shapes = ctx.dims
        s = hv.shape[0]

        def arr(g, shape):  # a contiguous float64 cotangent (zeros if the output was unused)
            return np.zeros(shape) if g is None else np.ascontiguousarray(_np(g))
        g_prior = tuple(np.zeros((L, math.prod(sh[1:-2]), s, s)) for sh in shapes)  # (L, T_, s, s) each
        g_y, g_prec = np.empty((B, T, L)), np.empty((B, T, L))
        _posterior_backward(G0, G, chains, hv, noise, y, r, eps_d, x, D, *state, hm, hvar,
                            arr(g_mean, (B, T, L)), arr(g_var, (B, T, L)), arr(g_kl, (B,)), arr(g_log_z, (B,)),
                            arr(g_draws, (S, B, T, L)), g_prior, g_y, g_prec)
        grads = [torch.from_numpy(g.reshape(sh)).to(dtype) for g, sh in zip(g_prior, shapes, strict=True)]
        return (*grads, None, torch.from_numpy(g_y).to(dtype), torch.from_numpy(g_prec).to(dtype), None, None)


def site_posterior_and_samples(A, Q, P0, h, mean, precision, eps, noise):
    """Posterior q = prior x sites for every (sequence b, latent l) chain, its KL to the prior and Matheron draws.

    Prior per latent l: A, Q (L, T|1, s, s) (index 0 of a length-T time axis is not used), P0 (L, s, s),
    observation row h (s,) (no gradient); sites ``mean``, ``precision`` (B, T, L); standard normals ``eps``
    (T, S, B, L·s, ...) for the prior path draws x_t = A_t x_{t-1} + chol(Q_t) ε_t (x_0 = chol(P0) ε_0; Q gets
    the 1e-12 relative jitter of :func:`~latentgp.variational.cvi.process_noise_factors`) and ``noise``
    (S, B, L, T, ...) for the site noise. Returns posterior means and marginal variances (B, T, L), KL(q ‖ p)
    and log Z summed over latents (B,), and the draws (S, B, T, L) f_prior + E_smoother[ỹ - f_prior - e],
    all differentiable in A, Q, P0, mean and precision by the compiled reverse pass. Raises
    :class:`NotPositiveDefinite` (a LinAlgError) if a predictive or noise covariance is not positive definite."""
    if h.requires_grad:
        raise ValueError("`h`: the observation row must not require a gradient.")
    return _SitePosterior.apply(A, Q, P0, h, mean, precision, eps, noise)


class _PathLogProb(torch.autograd.Function):
    """See :func:`path_log_prob`: the filter of :func:`_forward` (no smoother) with r = 0 on the data column z."""

    @staticmethod
    def forward(ctx, A, Q, P0, h, z):
        B, T, L = z.shape
        C, s = B * L, h.shape[0]
        prior = [np.ascontiguousarray(_np(x)).reshape(L, -1, s, s) for x in (A, Q, P0)]
        chains = [np.empty(p.shape[1:] + (C,)) for p in prior]
        for p, c in zip(prior, chains, strict=True):
            _expand(p, c)
        D = np.ascontiguousarray(_np(z).transpose(1, 0, 2)).reshape(1, T, C)
        r = np.zeros((T, C))
        state = [np.empty((1, T, s, C)), np.empty((T, s, s, C)), np.empty((1, T, s, C)), np.empty((T, s, s, C)),
                 np.empty((T, s, s, C)), np.empty((T, s, s, C)), np.empty((1, T, s, C)), np.empty((T, s, s, C))]
        ll = np.empty(C)
        hv = _np(h)
        if _forward(chains[0], chains[1], chains[2][0], hv, D, r, *state, ll, np.empty((1, T, C)), np.empty((T, C)),
                    False):
            raise NotPositiveDefinite("a predictive covariance is not positive definite")
        ctx.saved = (chains, hv, D, r, state)
        ctx.dims = (B, T, L, z.dtype, [x.shape for x in (A, Q, P0)])
        return torch.from_numpy(ll.reshape(B, L).sum(1)).to(z.dtype)

    @staticmethod
    @once_differentiable  # the hand-written reverse pass is not itself differentiable: refuse, do not drop terms
    def backward(ctx, g):
        chains, hv, D, r, state = ctx.saved
        B, T, L, dtype, shapes = ctx.dims
        C, s = B * L, hv.shape[0]
        grads = [np.zeros(c.shape) for c in chains]
        gD, gr = np.empty(D.shape), np.empty(r.shape)
        _backward(chains[0], chains[1], chains[2][0], hv, D, r, *state, np.zeros((1, T, C)), np.zeros((T, C)),
                  np.repeat(_np(g), L), grads[0], grads[1], grads[2][0], gD, gr, False)
        out = []
        for gc, sh in zip(grads, shapes, strict=True):
            gp = np.zeros((L, gc.shape[0], s, s))
            _reduce(gc, gp)
            out.append(torch.from_numpy(gp.reshape(sh)).to(dtype))
        g_z = torch.from_numpy(np.ascontiguousarray(gD[0].reshape(T, B, L).transpose(1, 0, 2))).to(dtype)
        return (*out, None, g_z)


def path_log_prob(A, Q, P0, h, z):
    """log p(z) (B,) of noiseless latent paths z (B, T, L), z_l(t) = h·x_t, under the per-latent state-space prior
    A, Q (L, T|1, s, s), P0 (L, s, s) (the Kalman filter's log-likelihood with zero observation noise), compiled,
    differentiable in A, Q, P0 and z. Raises :class:`NotPositiveDefinite` like :func:`site_posterior_and_samples`."""
    if h.requires_grad:
        raise ValueError("`h`: the observation row must not require a gradient.")
    return _PathLogProb.apply(A, Q, P0, h, z)
