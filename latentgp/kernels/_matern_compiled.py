"""Compiled per-step part of the bare-Matérn discretisation (:class:`latentgp.kernels.state_space._MaternDiscretised`).

On an irregular grid every step has its own A(dt), Q(dt) and their lambda-derivatives; numpy's batched products of
thousands of s x s matrices cost ~0.1 ms each call, which at T = 1,000 made the prior a visible part of a GP-VAE step.
Imported only when that class runs (numba is a dependency of the compiled Kalman code)."""
from __future__ import annotations

import math

import numba


@numba.njit(cache=True, nogil=True)
def discretise_steps(powers, dpowers, lam, dt, P, dP, A, dA, Q, dQ):  # pragma: no cover - compiled
    """For latent l and step t: A = e^(-lam dt) S, S = sum_k dt^k / k! N^k (``powers`` (K, L, s, s)), dA/dlam,
    Q = P - A P Aᵀ symmetrised and dQ/dlam; P, dP (L, s, s); outputs (L, T, s, s)."""
    K, L, s = powers.shape[0], powers.shape[1], powers.shape[2]
    for l in range(L):
        for t in range(dt.shape[0]):
            h = dt[t]
            decay = math.exp(-lam[l] * h)
            for i in range(s):
                for j in range(s):
                    ser, dser, term = 0.0, 0.0, 1.0
                    for k in range(K):
                        ser += term * powers[k, l, i, j]
                        dser += term * dpowers[k, l, i, j]
                        term *= h / (k + 1)
                    A[l, t, i, j] = decay * ser
                    dA[l, t, i, j] = decay * (dser - h * ser)
            for i in range(s):
                for m in range(i + 1):
                    q, dq = P[l, i, m], dP[l, i, m]
                    for j in range(s):
                        for k in range(s):
                            a_ij, a_mk = A[l, t, i, j], A[l, t, m, k]
                            q -= a_ij * P[l, j, k] * a_mk
                            dq -= (dA[l, t, i, j] * P[l, j, k] * a_mk + a_ij * dP[l, j, k] * a_mk
                                   + a_ij * P[l, j, k] * dA[l, t, m, k])
                    Q[l, t, i, m] = Q[l, t, m, i] = q
                    dQ[l, t, i, m] = dQ[l, t, m, i] = dq
