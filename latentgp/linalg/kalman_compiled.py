"""Sequential Kalman filter + RTS smoother compiled with numba: the fast path for posteriors that need
no gradient.

The parallel scan of :mod:`latentgp.linalg.kalman` is what autograd differentiates, but for short
sequences of small states its cost is the per-call overhead of eager torch (ceil(log2 T) levels of a
few dozen calls each): a 6-dimensional state over 200 steps costs ~8 ms per smoothing pass whatever
the data. Algorithms that only *read* a posterior inside an outer loop (conditional EP sweeps in
FunBaT, predictions) call the smoother many times, so there the textbook recursion (covariance-form
filter with the Joseph update, then Rauch-Tung-Striebel) compiled to machine code is ~100x cheaper,
and O(T s^3) in total.

Same model, inputs and outputs as :func:`latentgp.linalg.kalman.kalman_smoother` (canonical shapes
(nb_x, T_x, r, c) with nb_x in {1, nb} and T_x in {1, T}); no gradient. This module imports numba:
:mod:`latentgp.linalg.kalman` imports it only when asked for this engine (and falls back to the scan
if numba is missing). The compiled code is cached next to this file (numba's ``cache=True``, which
needs the functions at module level): only the first process after an install compiles (~6 s).
"""

from __future__ import annotations

import math

import numba
import numpy as np

# Small dense kernels written as loops: numba's np.linalg/@ allocate and copy on every call, which
# for 6 x 6 matrices costs more than the arithmetic.
jit = numba.njit(cache=True, nogil=True)


@jit
def mm(a, b, out, trans_b):  # pragma: no cover - compiled; out = a @ b (or a @ b^T)
    n, k = a.shape
    m = out.shape[1]
    for i in range(n):
        for j in range(m):
            acc = 0.0
            for q in range(k):
                acc += a[i, q] * (b[j, q] if trans_b else b[q, j])
            out[i, j] = acc

@jit
def cholesky(S, L):  # pragma: no cover - compiled; lower factor in L, False if not positive definite
    n = S.shape[0]
    for j in range(n):
        d = S[j, j]
        for q in range(j):
            d -= L[j, q] * L[j, q]
        if not d > 0.0:
            return False
        L[j, j] = math.sqrt(d)
        for i in range(j + 1, n):
            acc = S[i, j]
            for q in range(j):
                acc -= L[i, q] * L[j, q]
            L[i, j] = acc / L[j, j]
        for i in range(j):
            L[i, j] = 0.0
    return True

@jit
def cho_solve(L, B):  # pragma: no cover - compiled; B <- S^{-1} B in place, S = L L^T
    n, m = B.shape
    for c in range(m):
        for i in range(n):
            acc = B[i, c]
            for q in range(i):
                acc -= L[i, q] * B[q, c]
            B[i, c] = acc / L[i, i]
        for i in range(n - 1, -1, -1):
            acc = B[i, c]
            for q in range(i + 1, n):
                acc -= L[q, i] * B[q, c]
            B[i, c] = acc / L[i, i]

@jit
def _smooth(A, Q, H, R, y, obs, m0, P0, means, covs, cross, ll):  # pragma: no cover - compiled
    """Returns 0, or 1 if a matrix that must be positive definite is not (the caller falls back)."""
    nb, T, s = means.shape
    p = y.shape[2]
    log2pi = math.log(2.0 * math.pi)
    mp = np.empty((T, s))
    Pp = np.empty((T, s, s))
    AP = np.empty((s, s))
    HP = np.empty((p, s))
    S = np.empty((p, p))
    Ls = np.empty((p, p))
    Lp = np.empty((s, s))
    v = np.empty((p, 1))
    e = np.empty((p, 1))
    IKH = np.empty((s, s))
    M1 = np.empty((s, s))
    M2 = np.empty((s, s))
    E = np.empty((s, s))
    for b in range(nb):
        ba, bq, bh = min(b, A.shape[0] - 1), min(b, Q.shape[0] - 1), min(b, H.shape[0] - 1)
        br, by, bo = min(b, R.shape[0] - 1), min(b, y.shape[0] - 1), min(b, obs.shape[0] - 1)
        bm, bp = min(b, m0.shape[0] - 1), min(b, P0.shape[0] - 1)
        total = 0.0
        for t in range(T):
            m = means[b, t]
            P = covs[b, t]
            # predict (x_0 from the prior)
            if t == 0:
                m[:] = m0[bm]
                P[:, :] = P0[bp]
            else:
                At = A[ba, min(t, A.shape[1] - 1)]
                Qt = Q[bq, min(t, Q.shape[1] - 1)]
                for i in range(s):
                    acc = 0.0
                    for q in range(s):
                        acc += At[i, q] * means[b, t - 1, q]
                    m[i] = acc
                mm(At, covs[b, t - 1], AP, False)
                mm(AP, At, P, True)
                for i in range(s):
                    for j in range(s):
                        P[i, j] += Qt[i, j]
            for i in range(s):
                for j in range(i):
                    P[i, j] = P[j, i] = 0.5 * (P[i, j] + P[j, i])
            mp[t] = m
            Pp[t] = P
            # update with y_t where observed; Joseph form (I - K H) P (I - K H)^T + K R K^T
            if obs[bo, min(t, obs.shape[1] - 1)]:
                Ht = H[bh, min(t, H.shape[1] - 1)]
                Rt = R[br, min(t, R.shape[1] - 1)]
                mm(Ht, P, HP, False)
                mm(HP, Ht, S, True)
                for i in range(p):
                    for j in range(i + 1):
                        S[i, j] = S[j, i] = 0.5 * (S[i, j] + S[j, i] + Rt[i, j] + Rt[j, i])
                if not cholesky(S, Ls):
                    return 1
                logdet = 0.0
                for i in range(p):
                    acc = y[by, t, i]
                    for q in range(s):
                        acc -= Ht[i, q] * m[q]
                    v[i, 0] = acc
                    e[i, 0] = acc
                    logdet += 2.0 * math.log(Ls[i, i])
                cho_solve(Ls, e)  # e = S^{-1} v
                cho_solve(Ls, HP)  # HP <- S^{-1} H P = K^T
                quad = 0.0
                for i in range(p):
                    quad += v[i, 0] * e[i, 0]
                total += -0.5 * (quad + logdet + p * log2pi)
                for i in range(s):  # m += K v
                    acc = 0.0
                    for q in range(p):
                        acc += HP[q, i] * v[q, 0]
                    m[i] += acc
                for i in range(s):  # IKH = I - K H
                    for j in range(s):
                        acc = 0.0
                        for q in range(p):
                            acc += HP[q, i] * Ht[q, j]
                        IKH[i, j] = (1.0 if i == j else 0.0) - acc
                mm(IKH, P, M1, False)
                mm(M1, IKH, M2, True)
                for i in range(s):  # + K R K^T
                    for j in range(i, s):
                        acc = 0.0
                        for q in range(p):
                            for r in range(p):
                                acc += HP[q, i] * 0.5 * (Rt[q, r] + Rt[r, q]) * HP[r, j]
                        P[i, j] = P[j, i] = 0.5 * (M2[i, j] + M2[j, i]) + acc
        ll[b] = total
        # Rauch-Tung-Striebel: E_t = P_t A_{t+1}^T (P^-_{t+1})^{-1}, i.e. E_t^T = (P^-_{t+1})^{-1} A_{t+1} P_t
        for t in range(T - 2, -1, -1):
            An = A[ba, min(t + 1, A.shape[1] - 1)]
            if not cholesky(Pp[t + 1], Lp):
                return 1
            mm(An, covs[b, t], AP, False)
            cho_solve(Lp, AP)  # AP <- E_t^T
            for i in range(s):
                for j in range(s):
                    E[i, j] = AP[j, i]
            for i in range(s):
                acc = 0.0
                for q in range(s):
                    acc += E[i, q] * (means[b, t + 1, q] - mp[t + 1, q])
                means[b, t, i] += acc
            for i in range(s):
                for j in range(s):
                    M1[i, j] = covs[b, t + 1, i, j] - Pp[t + 1, i, j]
            mm(E, M1, M2, False)
            mm(M2, E, M1, True)
            for i in range(s):
                for j in range(i, s):
                    covs[b, t, i, j] = covs[b, t, j, i] = covs[b, t, i, j] + 0.5 * (M1[i, j] + M1[j, i])
            mm(covs[b, t + 1], E, cross[b, t], True)  # Cov(x_{t+1}, x_t | y) = P^s_{t+1} E_t^T
    return 0



def smooth(A, Q, H, R, y, m0, P0, mask):
    """Smoothed means (nb, T, s), covariances (nb, T, s, s), cross-covariances (nb, T-1, s, s) and the
    log-likelihood (nb,) from canonical float tensors (see :func:`latentgp.linalg.kalman._canonical`);
    returns numpy arrays. Raises ``numpy.linalg.LinAlgError`` on a singular predictive covariance."""
    arr = [np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float64) for x in (A, Q, H, R, y, m0, P0)]
    A_, Q_, H_, R_, y_, m0_, P0_ = arr
    nb = max(x.shape[0] for x in arr)
    T, s = y_.shape[1], A_.shape[-1]
    if mask is None:
        obs = np.ones((1, 1), dtype=np.bool_)
    else:
        obs = np.ascontiguousarray(mask.cpu().numpy(), dtype=np.bool_)
        nb = max(nb, obs.shape[0])  # y at missing steps (maybe NaN) is never read
    means = np.empty((nb, T, s))
    covs = np.empty((nb, T, s, s))
    cross = np.empty((nb, max(T - 1, 0), s, s))
    ll = np.empty(nb)
    if _smooth(A_, Q_, H_, R_, y_, obs, m0_, P0_, means, covs, cross, ll):
        raise np.linalg.LinAlgError("a covariance that must be positive definite is not")
    return means, covs, cross, ll
