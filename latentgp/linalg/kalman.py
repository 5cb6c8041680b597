"""Batched linear-Gaussian state-space inference in O(T) work with no Python loop over time.

Model (t = 0 .. T-1)::

    x_0 ~ N(m0, P0)
    x_t = A_t x_{t-1} + q_t,   q_t ~ N(0, Q_t)          t >= 1
    y_t = H_t x_t + r_t,       r_t ~ N(0, R_t)          only where mask[t] is True

Filtering and smoothing use the associative-scan formulation of Särkkä & García-Fernández (2021),
"Temporal parallelization of Bayesian smoothers" (IEEE TAC 66(1)): every step becomes an element of
an associative operator and the filtered/smoothed moments are its inclusive prefixes/suffixes,
computed by :func:`latentgp.linalg.scan.associative_scan` in ceil(log2 T) batched levels.

Shapes (``...`` = leading batch dims, broadcast against each other; ``s`` = state dim, ``p`` = obs dim):

===========  ==========================================================================
``A``, ``Q``  ``(..., T, s, s)``; index 0 along time is ignored (x_0 comes from m0, P0)
``H``         ``(..., T, p, s)``; or a plain 2-D ``(p, s)`` shared by every step and batch
``R``         ``(..., T, p, p)``
``y``         ``(..., T, p)``; entries at missing steps are ignored (may be NaN)
``mask``      ``(..., T)`` bool, True = observed; ``None`` = all observed
``m0``        ``(..., s)``; ``None`` = zeros
``P0``        ``(..., s, s)``
===========  ==========================================================================

A time axis of size 1 in ``A``, ``Q``, ``H``, ``R`` broadcasts over all T steps (time-invariant model).
``Q``, ``R``, ``P0`` are symmetrised on entry, so gradients with respect to them are symmetric.
Everything is plain torch and differentiable by autograd.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .cholesky import safe_cholesky
from .scan import associative_scan

__all__ = ["FilterResult", "SmootherResult", "kalman_filter", "kalman_smoother"]


class FilterResult(NamedTuple):
    means: torch.Tensor  # (..., T, s)     E[x_t | y_{0..t}]
    covs: torch.Tensor  # (..., T, s, s)   Cov[x_t | y_{0..t}]
    log_likelihood: torch.Tensor  # (...)  log p(y_observed)


class SmootherResult(NamedTuple):
    means: torch.Tensor  # (..., T, s)     E[x_t | y]
    covs: torch.Tensor  # (..., T, s, s)   Cov[x_t | y]
    log_likelihood: torch.Tensor  # (...)  log p(y_observed)
    cross_covs: torch.Tensor  # (..., T-1, s, s)  Cov[x_{t+1}, x_t | y], t = 0 .. T-2


# --------------------------------------------------------------------------------------------------
# small helpers; internally time is axis 0 and vectors are (..., n, 1) columns so everything is matmul
# --------------------------------------------------------------------------------------------------
def _mT(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


def _sym(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x + _mT(x))


def _time_first(x: torch.Tensor, batch: torch.Size, T: int, event_ndim: int) -> torch.Tensor:
    """Broadcast ``x`` of shape (..., T or 1, *event) to (T, *batch, *event)."""
    event = x.shape[x.dim() - event_ndim :]
    x = x.expand(batch + (T,) + event)
    return x.movedim(len(batch), 0)


def _eye_like(x: torch.Tensor) -> torch.Tensor:
    return torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)


# --------------------------------------------------------------------------------------------------
# associative operators
# --------------------------------------------------------------------------------------------------
def _filter_combine(ei, ej):
    """Särkkä & García-Fernández (2021) filtering operator: combine elements i (earlier), j (later).

    All five formulas share M = I + C_i J_j; since C and J are symmetric, (I + J_j C_i)^{-1} = M^{-T},
    so A_i^T (I + J_j C_i)^{-1} = (M^{-1} A_i)^T and ONE batched solve with M serves every term.
    """
    Ai, bi, Ci, etai, Ji = ei
    Aj, bj, Cj, etaj, Jj = ej
    s = Ai.shape[-1]
    M = _eye_like(Ai) + Ci @ Jj
    X = torch.linalg.solve(M, torch.cat((Ai, bi + Ci @ etaj, Ci), dim=-1))
    XA, Xb, XC = X[..., :s], X[..., s : s + 1], X[..., s + 1 :]
    A = Aj @ XA
    b = Aj @ Xb + bj
    C = _sym(Aj @ XC @ _mT(Aj)) + Cj  # M^{-1} C_i is symmetric in exact arithmetic
    eta = _mT(XA) @ (etaj - Jj @ bi) + etai
    J = _sym(_mT(XA) @ Jj @ Ai) + Ji
    return A, b, C, eta, J


def _smoother_combine(ei, ej):
    """Särkkä & García-Fernández (2021) smoothing operator; i is the earlier step, j the later one."""
    Ei, gi, Li = ei
    Ej, gj, Lj = ej
    return Ei @ Ej, Ei @ gj + gi, _sym(Ei @ Lj @ _mT(Ei)) + Li


# --------------------------------------------------------------------------------------------------
# the shared forward pass
# --------------------------------------------------------------------------------------------------
def _prepare(A, Q, H, R, y, P0, m0, mask):
    if y.dim() < 2:
        raise ValueError(f"y must be (..., T, p); got shape {tuple(y.shape)}.")
    T, p = y.shape[-2:]
    s = A.shape[-1]
    if A.shape[-2:] != (s, s) or Q.shape[-2:] != (s, s) or P0.shape[-2:] != (s, s):
        raise ValueError(f"A, Q, P0 must end in (s, s) = ({s}, {s}); got {A.shape}, {Q.shape}, {P0.shape}.")
    if H.dim() == 2:
        H = H.unsqueeze(-3)  # (p, s) -> (1, p, s): one H for every step
    if H.shape[-2:] != (p, s) or R.shape[-2:] != (p, p):
        raise ValueError(f"H must end in (p, s) = ({p}, {s}) and R in (p, p); got {H.shape}, {R.shape}.")
    for name, x in (("A", A), ("Q", Q), ("H", H), ("R", R)):
        if x.dim() < 3 or x.shape[-3] not in (1, T):
            raise ValueError(f"{name} needs a time axis of size T={T} (or 1) at dim -3; got {tuple(x.shape)}")
    if m0 is None:
        m0 = y.new_zeros(s)
    if mask is None:
        mask = torch.ones(y.shape[:-1], dtype=torch.bool, device=y.device)
    if mask.shape[-1:] != (T,):
        raise ValueError(f"mask must be (..., T) with T={T}; got {tuple(mask.shape)}.")
    batch = torch.broadcast_shapes(
        A.shape[:-3],
        Q.shape[:-3],
        H.shape[:-3],
        R.shape[:-3],
        y.shape[:-2],
        mask.shape[:-1],
        m0.shape[:-1],
        P0.shape[:-2],
    )
    A = _time_first(A, batch, T, 2)
    Q = _time_first(_sym(Q), batch, T, 2)
    H = _time_first(H, batch, T, 2)
    R = _time_first(_sym(R), batch, T, 2)
    y = _time_first(y, batch, T, 1).unsqueeze(-1)
    mask = _time_first(mask, batch, T, 0)
    m0 = m0.expand(batch + (s,)).unsqueeze(-1)
    P0 = _sym(P0).expand(batch + (s, s))

    # Missing steps: substitute harmless finite values (NaN y or a garbage R at a missing step must not
    # leak into values or gradients through the discarded branch), and zero the information below.
    obs = mask[..., None, None]
    y = torch.where(obs, y, torch.zeros((), dtype=y.dtype, device=y.device))
    R = torch.where(obs, R, _eye_like(R))
    return A, Q, H, R, y, mask, m0, P0


def _filter(A, Q, H, R, y, mask, m0, P0):
    """Parallel filter in time-first layout. Returns filtered (m, P), predictive (m^-, P^-), loglik."""
    T = A.shape[0]
    # Step 0 fits the generic element if we write x_0 = F_0 x_{-1} + u_0 + q_0 with F_0 = 0,
    # u_0 = m0 and Cov(q_0) = P0; later steps have F_t = A_t, u_t = 0, Cov(q_t) = Q_t.
    F = torch.cat((torch.zeros_like(A[:1]), A[1:]), dim=0)
    Qe = torch.cat((P0.unsqueeze(0), Q[1:]), dim=0)
    u = torch.cat((m0.unsqueeze(0), torch.zeros_like(m0).expand((T - 1,) + m0.shape)), dim=0)

    # Filtering elements of Särkkä & García-Fernández (2021), all steps in one batch.
    S = H @ Qe @ _mT(H) + R
    LS, _ = safe_cholesky(_sym(S), what="Kalman element innovation covariance")
    W = torch.cholesky_solve(H, LS) * mask[..., None, None]  # S^{-1} H; zero at missing steps
    K = Qe @ _mT(W)  # Q H^T S^{-1}
    IKH = _eye_like(Qe) - K @ H
    resid = y - H @ u
    WF = W @ F  # S^{-1} H F
    elems = (
        IKH @ F,  # A
        u + K @ resid,  # b
        _sym(IKH @ Qe @ _mT(IKH) + K @ R @ _mT(K)),  # C, Joseph form keeps it PSD
        _mT(WF) @ resid,  # eta
        _sym(_mT(WF) @ H @ F),  # J
    )
    _, mf, Pf, _, _ = associative_scan(_filter_combine, elems)

    # One-step predictions m^-_t, P^-_t (from the filtered t-1; F_0 = 0 makes t = 0 give m0, P0).
    mf_prev = torch.cat((torch.zeros_like(mf[:1]), mf[:-1]), dim=0)
    Pf_prev = torch.cat((torch.zeros_like(Pf[:1]), Pf[:-1]), dim=0)
    mp = F @ mf_prev + u
    Pp = _sym(F @ Pf_prev @ _mT(F) + Qe)

    # log p(y) = sum_t log N(y_t; H m^-_t, H P^-_t H^T + R_t) over observed t, in one batched op.
    Sp = _sym(H @ Pp @ _mT(H) + R)
    LSp, _ = safe_cholesky(Sp, what="Kalman predictive observation covariance")
    v = y - H @ mp
    z = torch.linalg.solve_triangular(LSp, v, upper=False)
    p = y.shape[-2]
    ll_t = -0.5 * z.square().sum((-2, -1)) - LSp.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    ll_t = ll_t - 0.5 * p * math.log(2 * math.pi)
    ll = torch.where(mask, ll_t, torch.zeros_like(ll_t)).sum(0)
    return mf, Pf, mp, Pp, ll


def kalman_filter(A, Q, H, R, y, P0, m0=None, mask=None) -> FilterResult:
    """Filtered moments p(x_t | y_{0..t}) and log p(y_observed) by a parallel scan.

    See the module docstring for the model and shape conventions. Returns a :class:`FilterResult`
    with ``means`` (..., T, s), ``covs`` (..., T, s, s) and ``log_likelihood`` (...), the exact log
    marginal likelihood of the observed y's including the ``-p/2 log(2 pi)`` constants.
    """
    A, Q, H, R, y, mask, m0, P0 = _prepare(A, Q, H, R, y, P0, m0, mask)
    mf, Pf, _, _, ll = _filter(A, Q, H, R, y, mask, m0, P0)
    return FilterResult(mf.squeeze(-1).movedim(0, -2), Pf.movedim(0, -3), ll)


def kalman_smoother(A, Q, H, R, y, P0, m0=None, mask=None) -> SmootherResult:
    """Smoothed moments p(x_t | y), lag-one cross-covariances and log p(y_observed), by parallel scans.

    Returns a :class:`SmootherResult` with ``means`` (..., T, s), ``covs`` (..., T, s, s),
    ``log_likelihood`` (...) and ``cross_covs`` (..., T-1, s, s) with
    ``cross_covs[..., t, :, :] = Cov(x_{t+1}, x_t | y)``.
    """
    A, Q, H, R, y, mask, m0, P0 = _prepare(A, Q, H, R, y, P0, m0, mask)
    mf, Pf, mp, Pp, ll = _filter(A, Q, H, R, y, mask, m0, P0)

    # Smoothing elements: for t < T-1 the RTS gain E_t = Pf_t A_{t+1}^T (P^-_{t+1})^{-1},
    # g_t = mf_t - E_t m^-_{t+1}, L_t = Pf_t - E_t P^-_{t+1} E_t^T; the last step is (0, mf, Pf).
    LPp, _ = safe_cholesky(Pp[1:], what="Kalman predictive state covariance")
    E = _mT(torch.cholesky_solve(A[1:] @ Pf[:-1], LPp))  # P^-^{-1} symmetric: E^T = P^-^{-1} A Pf
    g = mf[:-1] - E @ mp[1:]
    L = _sym(Pf[:-1] - E @ Pp[1:] @ _mT(E))
    elems = (
        torch.cat((E, torch.zeros_like(Pf[-1:])), dim=0),
        torch.cat((g, mf[-1:]), dim=0),
        torch.cat((L, Pf[-1:]), dim=0),
    )
    _, ms, Ps = associative_scan(_smoother_combine, elems, reverse=True)
    cross = Ps[1:] @ _mT(E)  # Cov(x_{t+1}, x_t | y) = P^s_{t+1} E_t^T
    return SmootherResult(ms.squeeze(-1).movedim(0, -2), Ps.movedim(0, -3), ll, cross.movedim(0, -3))
