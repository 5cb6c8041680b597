"""Batched linear-Gaussian state-space inference in O(T) work with no Python loop over time.

Model (t = 0 .. T-1)::

    x_0 ~ N(m0, P0)
    x_t = A_t x_{t-1} + q_t,   q_t ~ N(0, Q_t)          t >= 1
    y_t = H_t x_t + r_t,       r_t ~ N(0, R_t)          only where mask[t] is True

Filtering and smoothing use the associative-scan formulation of Särkkä & García-Fernández (2021),
"Temporal parallelization of Bayesian smoothers" (IEEE TAC 66(1)): every step becomes an element of
an associative operator and the filtered/smoothed moments are its inclusive prefixes/suffixes,
computed by :func:`latentgp.linalg.scan.state_scan` in ceil(log2 T) batched levels.

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

A time axis of size 1 in ``A``, ``Q``, ``H``, ``R`` broadcasts over all T steps (time-invariant model)
and a missing batch axis over the batch; neither is expanded on input, and their gradients are summed
over what they were broadcast to. ``Q``, ``R``, ``P0`` are symmetrised on entry, so gradients with
respect to them are symmetric. Everything is differentiable by autograd (first order: the filter's
backward pass is itself not differentiable).

How it is fast
--------------
The cost of a scan is (number of levels) x (calls per level) x (per-call overhead of eager torch, a few
microseconds) plus the arithmetic, which is memory-bound. So:

* Layout: every quantity is a stack of small matrices stored "structure of arrays",
  ``(rows, cols, T, batch)``: an s x s product over all steps is s fused multiply-adds on long
  vectors (instead of T tiny BLAS calls), and the 1 x 1 / 2 x 2 inverses are closed forms (s or p >= 3
  fall back to batched LAPACK). Each scan element is one packed tensor, sliced once per level.
* Scan (:func:`~latentgp.linalg.scan.state_scan`): prefixes of the filtering operator are filtered
  moments [m | P], so the fill-in half of each odd/even level applies an element to a state instead of
  combining two elements; the last <= 128 elements are finished by Hillis-Steele (fewer calls where
  calls are all that cost).
* Gradient: the filter is a :class:`torch.autograd.Function` whose backward is the adjoint of the
  Kalman filter in closed form -- one reverse affine scan for (alpha_t, Nt_t), the backward recursion
  of the disturbance smoother (de Jong 1989; Koopman & Shephard 1992; Durbin & Koopman 2012, sec. 4.5,
  7.3) -- then a fixed number of batched products for the gradients of every input. Autograd records
  none of the scan's small operations, and both passes run in inference mode (cheaper calls).
* Without gradients, short chains: ``kalman_smoother(..., engine="auto")`` runs the textbook sequential
  recursion compiled with numba (:mod:`latentgp.linalg.kalman_compiled`) -- O(T s^3) machine code
  instead of a few hundred eager calls per pass (FunBaT's CEP sweeps).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch

from .cholesky import safe_cholesky
from .scan import _pad_axis, state_scan

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


_TIME = 2  # time axis of the internal (rows, cols, T, batch) layout
_SCAN_BASE = 128  # scans finish the last <= 128 elements by Hillis-Steele (see scan.state_scan)


# --------------------------------------------------------------------------------------------------
# small matrices in (rows, cols, T, batch) layout; lanes (the last two axes) broadcast
# --------------------------------------------------------------------------------------------------
def _mT(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(i, k, *lanes) @ (k, j, *lanes) -> (i, j, *lanes) as k fused multiply-adds over the lanes."""
    if a.shape[1] == 1:
        return a * b
    cols = a.unsqueeze(1).unbind(2)  # k tensors (i, 1, *lanes)
    rows = b.unbind(0)  # k tensors (j, *lanes), broadcast as (1, j, *lanes)
    out = cols[0] * rows[0]
    for c, r in zip(cols[1:], rows[1:], strict=True):
        out = out.addcmul_(c, r)  # in place on a fresh temporary: safe under autograd
    return out


def _sym(x: torch.Tensor) -> torch.Tensor:
    return (x + _mT(x)).mul_(0.5)


_EYES: dict = {}


def _eye(n: int, ref: torch.Tensor) -> torch.Tensor:
    """(n, n, 1, 1) identity, cached per size/dtype/device (the scan asks for it at every level)."""
    key = (n, ref.dtype, ref.device)
    eye = _EYES.get(key)
    if eye is None:
        with torch.inference_mode(False):  # a cached constant must not be an inference tensor
            eye = _EYES[key] = torch.eye(n, dtype=ref.dtype, device=ref.device).reshape(n, n, 1, 1)
    return eye


def _pad_cols(x: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """Zero columns before/after (axis 1)."""
    return _pad_axis(x, 1, left, right)


def _inv(M: torch.Tensor) -> torch.Tensor:
    """Inverse of every (n, n) matrix in an (n, n, *lanes) stack: closed form for n <= 2."""
    n = M.shape[0]
    if n == 1:
        return M.reciprocal()
    if n == 2:  # Cayley-Hamilton: M^{-1} = (tr(M) I - M) / det(M)
        a, b, c, d = M.reshape((4,) + M.shape[2:]).unbind(0)
        det = (a * d).addcmul_(b, c, value=-1.0)
        return (_eye(2, M) * (a + d) - M) / det
    return torch.linalg.inv(M.movedim((0, 1), (-2, -1))).movedim((-2, -1), (0, 1))


def _spd_inv_logdet(S: torch.Tensor, what: str):
    """Inverse and log-determinant of every symmetric positive-definite (n, n) matrix in a stack."""
    n = S.shape[0]
    if n <= 2:
        if n == 1:
            det = S[0, 0]
            inv = S.reciprocal()
        else:
            d = S.diagonal(0, 0, 1)
            det = d.prod(-1) - S[0, 1] * S[1, 0]
            inv = (_eye(2, S) * d.sum(-1) - S) / det
        if not bool((det > 0).all()) or (n == 2 and not bool((S[0, 0] > 0).all())):
            bad = "NaN or inf entries" if not bool(torch.isfinite(S).all()) else "a non-positive determinant"
            raise torch.linalg.LinAlgError(
                f"The {what} matrix has {bad}; check the inputs and hyperparameters (noise R must be positive)."
            )
        return inv, det.log()
    L, _ = safe_cholesky(S.movedim((0, 1), (-2, -1)), what=what)
    inv = torch.cholesky_inverse(L).movedim((-2, -1), (0, 1))
    logdet = 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return inv, logdet


# --------------------------------------------------------------------------------------------------
# the filtering operator of Särkkä & García-Fernández (2021) on packed elements
# --------------------------------------------------------------------------------------------------
# An element is one tensor (s, 3s+2, T, batch) with columns [A | b | C | J | eta]: conditionally on
# x_{t0-1}, x_{t1} ~ N(A x + b, C) given the block's data, whose likelihood in x_{t0-1} is
# exp(eta^T x - x^T J x / 2). A prefix from t = 0 has A = 0, J = 0, eta = 0, so it is a *state*
# (s, s+1, T, batch) = [m | P], the filtered mean and covariance. Symmetry of C, J and P is not
# re-imposed inside the scan (rounding asymmetry stays at machine precision); outputs are symmetrised.
def _filter_combine(ei: torch.Tensor, ej: torch.Tensor) -> torch.Tensor:
    """Element i (earlier) then element j (later). With M = I + C_i J_j and X = M^{-1} [A_i | b_i + C_i eta_j | C_i]:

    A = A_j X_A,  b = A_j X_b + b_j,  C = A_j X_C A_j^T + C_j      (M^{-1} C_i is symmetric)
    J = A_i^T J_j X_A + J_i,  eta = eta_i + A_i^T (eta_j - J_j X_b)

    (the last two equal A_i^T M^{-T} J_j A_i + J_i and A_i^T M^{-T} (eta_j - J_j b_i) + eta_i, using
    M^{-T} J_j = J_j M^{-1} and M^{-T} eta_j = eta_j - J_j M^{-1} C_i eta_j).
    """
    s = ei.shape[0]
    JE_j = ej.narrow(1, 2 * s + 1, s + 1)
    P1 = _mm(ei.narrow(1, s + 1, s), JE_j)  # [C_i J_j | C_i eta_j]
    Minv = _inv(P1.narrow(1, 0, s) + _eye(s, ei))
    X = _mm(Minv, ei.narrow(1, 0, 2 * s + 1) + _pad_cols(P1.narrow(1, s, 1), s, s))  # [X_A | X_b | X_C]
    Aj = ej.narrow(1, 0, s)
    AW = _mm(torch.cat((Aj, JE_j.narrow(1, 0, s)), 0), X)  # [A_j X ; J_j X]
    AX = AW.narrow(0, 0, s)
    C = _mm(AX.narrow(1, s + 1, s), _mT(Aj)) + ej.narrow(1, s + 1, s)
    b = AX.narrow(1, s, 1) + ej.narrow(1, s, 1)
    V = _mm(_mT(ei.narrow(1, 0, s)), AW.narrow(0, s, s).narrow(1, 0, s + 1) - _pad_cols(JE_j.narrow(1, s, 1), s, 0))
    JE = ei.narrow(1, 2 * s + 1, s + 1) + V * _sign(s, ei)  # [J_i + A_i^T J_j X_A | eta_i - A_i^T (J_j X_b - eta_j)]
    return torch.cat((AX.narrow(1, 0, s), b, C, JE), 1)


_SIGNS: dict = {}


def _sign(s: int, ref: torch.Tensor) -> torch.Tensor:
    key = (s, ref.dtype, ref.device)
    sg = _SIGNS.get(key)
    if sg is None:
        with torch.inference_mode(False):
            sg = torch.ones(1, s + 1, 1, 1, dtype=ref.dtype, device=ref.device)
            sg[:, s] = -1.0
        _SIGNS[key] = sg
    return sg


def _filter_apply(state: torch.Tensor, ej: torch.Tensor) -> torch.Tensor:
    """Filtered [m | P] one block earlier, then element j: the combine above with A_i = 0, J_i = 0."""
    s = state.shape[0]
    P1 = _mm(state.narrow(1, 1, s), ej.narrow(1, 2 * s + 1, s + 1))  # [P J_j | P eta_j]
    Minv = _inv(P1.narrow(1, 0, s) + _eye(s, state))
    AX = _mm(ej.narrow(1, 0, s), _mm(Minv, state + _pad_cols(P1.narrow(1, s, 1), 0, s)))  # A_j M^{-1} [m + P eta | P]
    P = _mm(AX.narrow(1, 1, s), _mT(ej.narrow(1, 0, s))) + ej.narrow(1, s + 1, s)
    return torch.cat((AX.narrow(1, 0, 1) + ej.narrow(1, s, 1), P), 1)


def _filter_first(e0: torch.Tensor) -> torch.Tensor:
    s = e0.shape[0]
    return e0.narrow(1, s, s + 1)


# --------------------------------------------------------------------------------------------------
# the affine backward recursion  x_t = E_t x_{t+1} + g_t,  X_t = E_t X_{t+1} E_t^T + G_t
# --------------------------------------------------------------------------------------------------
# Packed element (s, s + k + s', T, batch) = [E | g | G] (k vector columns, s' = s or 0 matrix
# columns); state (s, k + s', T, batch) = [x | X]. Used by the smoother (x = smoothed mean, X =
# smoothed covariance) and by the filter's backward pass (x = alpha_t, X = Nt_t).
def _affine_ops(k: int, matrix: bool):
    def combine(ei, ej):  # e_i is step t, e_j step t+1: x_i = E_i (E_j x + g_j) + g_i
        s = ei.shape[0]
        Ei = ei.narrow(1, 0, s)
        if matrix:  # E_i [E_j | g_j | G_j E_i^T] + [0 | g_i | G_i]
            ej = torch.cat((ej.narrow(1, 0, s + k), _mm(ej.narrow(1, s + k, s), _mT(Ei))), 1)
        return _mm(Ei, ej) + _pad_cols(ei.narrow(1, s, ei.shape[1] - s), s, 0)

    def apply(state, ei):  # state at t+1, element at t
        s = ei.shape[0]
        Ei = ei.narrow(1, 0, s)
        if matrix:  # E_i [x | X E_i^T] + [g_i | G_i]
            XE = _mm(state.narrow(1, k, s), _mT(Ei))
            state = torch.cat((state.narrow(1, 0, k), XE), 1) if k else XE
        return _mm(Ei, state) + ei.narrow(1, s, ei.shape[1] - s)

    def first(e_last):
        s = e_last.shape[0]
        return e_last.narrow(1, s, e_last.shape[1] - s)

    return combine, apply, first


def _affine_scan_reverse(elems: torch.Tensor, k: int, matrix: bool) -> torch.Tensor:
    combine, apply, first = _affine_ops(k, matrix)
    return state_scan(combine, apply, first, elems, axis=_TIME, reverse=True, base=_SCAN_BASE)


# --------------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------------
class _Spec(NamedTuple):
    batch: torch.Size
    nb: int
    T: int
    s: int
    p: int


def _canonical(A, Q, H, R, y, P0, m0, mask):
    """Validate and reshape to (nb_x, T_x, *event) with nb_x in {1, nb} and T_x in {1, T} (views where
    possible: a batch or time axis of size 1 is never expanded)."""
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
    if T == 0:
        raise ValueError("y needs at least one time step.")
    if m0 is None:
        m0 = y.new_zeros(s)
    if mask is not None and mask.shape[-1:] != (T,):
        raise ValueError(f"mask must be (..., T) with T={T}; got {tuple(mask.shape)}.")
    batch = torch.broadcast_shapes(
        A.shape[:-3],
        Q.shape[:-3],
        H.shape[:-3],
        R.shape[:-3],
        y.shape[:-2],
        () if mask is None else mask.shape[:-1],
        m0.shape[:-1],
        P0.shape[:-2],
    )
    nb = math.prod(batch)

    def canon(x, event_ndim):
        lead = x.shape[: x.dim() - event_ndim]
        event = x.shape[x.dim() - event_ndim :]
        if math.prod(lead) == 1:
            return x.reshape((1,) + event)
        return x.expand(batch + event).reshape((nb,) + event)

    out = (
        canon(A, 3),
        canon(Q, 3),
        canon(H, 3),
        canon(R, 3),
        canon(y, 2),
        canon(m0, 1),
        canon(P0, 2),
        None if mask is None else canon(mask, 1),
    )
    return out, _Spec(batch, nb, T, s, p)


def _soa(x: torch.Tensor) -> torch.Tensor:
    """(nb, T, r, c) -> contiguous (r, c, T, nb)."""
    return x.permute(2, 3, 1, 0).contiguous()


def _aos(x: torch.Tensor) -> torch.Tensor:
    """(r, c, T, nb) -> (nb, T, r, c)."""
    return x.permute(3, 2, 0, 1)


def _reduce_to(g: torch.Tensor, T_x: int, nb_x: int) -> torch.Tensor:
    """Sum a (r, c, T, nb) gradient over the lane axes that the input broadcast (size-1 time/batch)."""
    if T_x == 1 and g.shape[2] != 1:
        g = g.sum(2, keepdim=True)
    if nb_x == 1 and g.shape[3] != 1:
        g = g.sum(3, keepdim=True)
    return g


# --------------------------------------------------------------------------------------------------
# the filter: forward scan + closed-form adjoint
# --------------------------------------------------------------------------------------------------
def _pad_time(x: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """Zero-pad (negative = crop) the time axis: (1, -1) shifts later, (-1, 1) earlier."""
    return _pad_axis(x, _TIME, left, right)


def _filter_forward(A, Q, H, R, y, m0, P0, obs):
    """Parallel filter in (rows, cols, T, batch) layout; obs is a float 0/1 mask (T, nb) or None.

    Every step, t = 0 included, is x_t = F_t x_{t-1} + u_t + q_t, q_t ~ N(0, Qe_t): F_t = A_t,
    u_t = 0, Qe_t = Q_t for t >= 1 and F_0 = 0, u_0 = m0, Qe_0 = P0. Returns F, Qe, the filtered
    [m | P] (s, s+1, T, nb), the predictive (m^-, P^-), the gain K, e = S^{-1} v, S^{-1} (all zero at
    missing steps but S^{-1}) and the log-likelihood (nb,).
    """
    s, p, T = A.shape[0], y.shape[0], y.shape[2]
    nb = max([x.shape[3] for x in (A, Q, H, R, y, m0, P0)] + ([] if obs is None else [obs.shape[1]]))
    F = _pad_time(A.narrow(2, 1, T - 1) if A.shape[2] == T else A.expand(s, s, T - 1, A.shape[3]), 1, 0)
    nq = max(Q.shape[3], P0.shape[3])
    Q1 = Q.narrow(2, 1, T - 1) if Q.shape[2] == T else Q
    Qe = torch.cat((P0.expand(s, s, 1, nq), Q1.expand(s, s, T - 1, nq)), 2)
    u = _pad_time(m0, 0, T - 1)

    # Filtering elements (Särkkä & García-Fernández 2021, Lemma 7) for all steps at once; with u_t = 0
    # for t >= 1 and F_0 = 0 only b_0 involves m0 (corrected below), and eta needs no correction.
    HQ = _mm(H, Qe)
    Sinv, _ = _spd_inv_logdet(_mm(HQ, _mT(H)) + R, "Kalman element innovation covariance")
    K = _mm(_mT(HQ), Sinv)  # Qe H^T S^{-1}
    HF = _mm(H, F)
    G = _mT(_mm(Sinv, HF))  # F^T H^T S^{-1}
    if obs is not None:
        K, G = K * obs, G * obs
    IKH = _eye(s, A) - _mm(K, H)
    C = _mm(_mm(IKH, Qe), _mT(IKH)) + _mm(_mm(K, R), _mT(K))  # Joseph form keeps it PSD
    b = _mm(K, y).expand(s, 1, T, nb).contiguous()
    b.narrow(2, 0, 1).add_(_mm(IKH.narrow(2, 0, 1), m0))  # b_0 = m0 + K_0 (y_0 - H_0 m0)
    shape = (s, -1, T, nb)
    elems = torch.cat(
        (
            (F - _mm(K, HF)).expand(shape),  # A = (I - K H) F
            b,
            _sym(C).expand(shape),  # C
            _sym(_mm(G, HF)).expand(shape),  # J = F^T H^T S^{-1} H F
            _mm(G, y).expand(shape),  # eta = F^T H^T S^{-1} y
        ),
        1,
    )
    MP = state_scan(_filter_combine, _filter_apply, _filter_first, elems, axis=_TIME, base=_SCAN_BASE)
    MP = torch.cat((MP.narrow(1, 0, 1), _sym(MP.narrow(1, 1, s))), 1)  # filtered [m | P]

    # One-step predictions m^-_t = F_t m_{t-1} + u_t, P^-_t = F_t P_{t-1} F_t^T + Qe_t, and innovations.
    FMP = _mm(F, _pad_time(MP, 1, -1))  # [F m_{t-1} | F P_{t-1}]
    mp = FMP.narrow(1, 0, 1) + u
    Pp = _sym(_mm(FMP.narrow(1, 1, s), _mT(F))) + Qe
    HP = _mm(H, Pp)
    Sinv, logdet = _spd_inv_logdet(_mm(HP, _mT(H)) + R, "Kalman predictive observation covariance")
    v = y - _mm(H, mp)
    e = _mm(Sinv, v)
    K = _mm(_mT(HP), Sinv)
    ll_t = (v * e).sum((0, 1)).add_(logdet).add_(p * math.log(2 * math.pi))
    if obs is not None:
        e, K, ll_t = e * obs, K * obs, ll_t * obs
    return F, MP, mp, Pp, K, e, Sinv, -0.5 * ll_t.sum(0)


def _adjoint_scan(E, f, G):
    """Reverse affine scan x_t = E_t x_{t+1} + f_t, X_t = E_t X_{t+1} E_t^T + G_t (E_{T-1} = 0)."""
    s, T, nb = E.shape[0], E.shape[2], max(E.shape[3], *(x.shape[3] for x in (f, G) if x is not None))
    parts = [x.expand(s, -1, T, nb) for x in (E, f, G) if x is not None]
    return _affine_scan_reverse(torch.cat(parts, 1), 0 if f is None else f.shape[1], G is not None)


class _KalmanFilterFn(torch.autograd.Function):
    """(A, Q, H, R, y, m0, P0, mask) in canonical (nb_x, T_x, rows, cols) shapes -> (means, covs, ll)."""

    @staticmethod
    def forward(ctx, A, Q, H, R, y, m0, P0, mask):
        # Inference mode makes each of the scan's many small calls cheaper; what leaves it is cloned
        # into ordinary tensors (inference tensors cannot be saved for backward).
        with torch.inference_mode():
            # canonical (nb_x, T_x, r, c) -> (r, c, T_x, nb_x); Q, R, P0 symmetrised on entry.
            A_, Q_, H_, R_ = _soa(A), _sym(_soa(Q)), _soa(H), _sym(_soa(R))
            P0_ = _sym(_soa(P0.unsqueeze(1)))
            m0_ = _soa(m0[:, None, :, None])
            y_ = _soa(y.unsqueeze(-1))
            obs = None
            if mask is not None:
                keep = mask.t()
                obs = keep.to(y.dtype)  # (T, nb_mask)
                y_ = torch.where(keep, y_, 0.0)  # NaN at missing steps must not leak
                R_ = torch.where(keep, R_, _eye(R_.shape[0], R_))
            out = _filter_forward(A_, Q_, H_, R_, y_, m0_, P0_, obs)
            s = A_.shape[0]
            means = out[1].select(1, 0).permute(2, 1, 0)  # (nb, T, s)
            covs = _aos(out[1].narrow(1, 1, s))
        F, MP, mp, Pp, K, e, Sinv, ll = (x.clone() for x in out)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(F, H_.clone(), MP, mp, Pp, K, e, Sinv, obs.clone() if obs is not None else torch.empty(0))
        ctx.has_mask = obs is not None
        ctx.shapes = [(x.shape[1], x.shape[0]) for x in (A, Q, H, R, y, m0.unsqueeze(1), P0.unsqueeze(1))]
        return means.clone(), covs.clone(), ll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_means, g_covs, g_ll):
        saved = ctx.saved_tensors
        with torch.inference_mode():
            grads = _filter_backward(ctx, saved, g_means, g_covs, g_ll)
        return tuple(None if g is None else g.clone() for g in grads)


def _filter_backward(ctx, saved, g_means, g_covs, g_ll):
    """Adjoint of the filter. With L_t = I - K_t H_t, w_t = H^T S^{-1} v, U_t = H^T S^{-1} H (zero where
    missing), the adjoints of the predicted mean/covariance, alpha_t and B_t, and of the filtered
    ones, lam_t and Lam_t, obey (c = dLoss/dll, gm/gP = dLoss/d(means/covs))

        alpha_t = L_t^T lam_t + c w_t,            lam_t = gm_t + A_{t+1}^T alpha_{t+1}
        B_t = L^T Lam_t L + sym(L^T lam_t w^T) + c (w w^T - U) / 2,  Lam_t = gP_t + A_{t+1}^T B_{t+1} A_{t+1}

    i.e. reverse affine recursions with E_t = (A_{t+1} L_t)^T. For the log-likelihood alone (gm = gP = 0,
    c = 1) B_t = (alpha alpha^T - Nt_t) / 2 where Nt_t = E_t Nt_{t+1} E_t^T + U_t: one scan for both.
    """
    F, H, MP, mp, Pp, K, e, Sinv, obs = saved
    obs = obs if ctx.has_mask else None
    s, T = F.shape[0], F.shape[2]
    needs = ctx.needs_input_grad
    if g_means is None and g_covs is None and g_ll is None:
        return (None,) * 8
    L = _eye(s, F) - _mm(K, H)  # = I at missing steps, where K = 0
    w = _mm(_mT(H), e)
    SinvM = Sinv if obs is None else Sinv * obs
    U = _mm(_mm(_mT(H), SinvM), H)
    Fn = _pad_time(F, -1, 1)  # A_{t+1} at t, 0 at T-1
    E = _mT(_mm(Fn, L))
    c = None if g_ll is None else g_ll.reshape(1, 1, 1, -1)

    if g_means is None and g_covs is None:  # log-likelihood only; scaled by c at the end
        aN = _adjoint_scan(E, w, U)  # [alpha | Nt]
        alpha = aN.narrow(1, 0, 1)
        B = (_mm(alpha, _mT(alpha)) - aN.narrow(1, 1, s)).mul_(0.5)
        gR = gy = gH = None
        if needs[2] or needs[3] or needs[4]:
            lN = _mm(_mT(Fn), _pad_time(aN, -1, 1))  # [lam_t | A_{t+1}^T Nt_{t+1}]
            lam = lN.narrow(1, 0, 1)
            u = e - _mm(_mT(K), lam)  # S^{-1} v - K^T lam
            gy = -u
            if needs[2] or needs[3]:  # (u u^T - S^{-1} - K^T N K) / 2 with N_t = A_{t+1}^T Nt_{t+1} A_{t+1}
                KN = _mm(_mT(K), _mm(lN.narrow(1, 1, s), Fn))
                gR = (_mm(u, _mT(u)) - SinvM - _mm(KN, K)).mul_(0.5)
            if needs[2]:
                gH = 2.0 * _mm(_mm(gR, H), Pp) + _mm(u, _mm(_mT(lam), Pp) + _mT(mp)) + _mm(KN, Pp)
    else:
        gm = None if g_means is None else g_means.permute(2, 1, 0).unsqueeze(1)  # (s, 1, T, nb)
        gP = None if g_covs is None else _sym(_soa(g_covs))
        f = c * w if c is not None else torch.zeros_like(w)
        if gm is not None:
            f = f + _mm(_mT(L), gm)
        alpha = _adjoint_scan(E, f, None)
        lam = _mm(_mT(Fn), _pad_time(alpha, -1, 1))
        if gm is not None:
            lam = lam + gm
        Gf = _sym(_mm(_mm(_mT(L), lam), _mT(w)))  # sym(L^T lam w^T)
        if gP is not None:
            Gf = Gf + _mm(_mm(_mT(L), gP), L)
        if c is not None:
            Gf = Gf + 0.5 * c * (_mm(w, _mT(w)) - U)
        B = _adjoint_scan(E, None, Gf)
        Lam = _mm(_mm(_mT(Fn), _pad_time(B, -1, 1)), Fn)
        if gP is not None:
            Lam = Lam + gP
        cc = 0.0 if c is None else c
        Klam = _mm(_mT(K), lam)
        KL = _mm(_mT(K), Lam)
        gR = gy = gH = None
        if needs[2] or needs[3]:
            gR = _mm(KL, K) - _sym(_mm(Klam, _mT(e))) + 0.5 * cc * (_mm(e, _mT(e)) - SinvM)
        if needs[4]:
            gy = Klam - cc * e
        if needs[2]:
            gH = 2.0 * _mm(_mm(gR, H), Pp) + _mm(_mm(e, _mT(lam)) - 2.0 * KL, Pp) + _mm(cc * e - Klam, _mT(mp))
        c = None  # already applied

    def out(g, k):
        if c is not None:
            g = g * c
        T_x, nb_x = ctx.shapes[k]
        return _aos(_reduce_to(g, T_x, nb_x))

    grads = [None] * 8
    if needs[0]:  # d/dF_t = alpha_t m_{t-1}^T + 2 B_t F_t P_{t-1} (zero at t = 0, where F_0 = m_{-1} = 0)
        MPp = _pad_time(MP, 1, -1)
        gA = _mm(alpha, _mT(MPp.narrow(1, 0, 1))) + 2.0 * _mm(_mm(B, F), MPp.narrow(1, 1, s))
        grads[0] = out(gA, 0)
    if needs[1]:
        grads[1] = out(_pad_time(B.narrow(2, 1, T - 1), 1, 0), 1)
    if needs[2]:
        grads[2] = out(gH, 2)
    if needs[3]:
        grads[3] = out(gR, 3)
    if needs[4]:
        grads[4] = out(gy, 4).squeeze(-1)
    if needs[5]:
        grads[5] = out(alpha.narrow(2, 0, 1), 5).squeeze(-1).squeeze(1)
    if needs[6]:
        grads[6] = out(B.narrow(2, 0, 1), 6).squeeze(1)
    return tuple(grads)


def kalman_filter(A, Q, H, R, y, P0, m0=None, mask=None) -> FilterResult:
    """Filtered moments p(x_t | y_{0..t}) and log p(y_observed) by a parallel scan.

    See the module docstring for the model and shape conventions. Returns a :class:`FilterResult`
    with ``means`` (..., T, s), ``covs`` (..., T, s, s) and ``log_likelihood`` (...), the exact log
    marginal likelihood of the observed y's including the ``-p/2 log(2 pi)`` constants.
    """
    args, spec = _canonical(A, Q, H, R, y, P0, m0, mask)
    means, covs, ll = _KalmanFilterFn.apply(*args)
    b, T, s = spec.batch, spec.T, spec.s
    return FilterResult(means.reshape(b + (T, s)), covs.reshape(b + (T, s, s)), ll.reshape(b))


def kalman_smoother(A, Q, H, R, y, P0, m0=None, mask=None, *, engine: str = "scan") -> SmootherResult:
    """Smoothed moments p(x_t | y), lag-one cross-covariances and log p(y_observed).

    Returns a :class:`SmootherResult` with ``means`` (..., T, s), ``covs`` (..., T, s, s),
    ``log_likelihood`` (...) and ``cross_covs`` (..., T-1, s, s) with
    ``cross_covs[..., t, :, :] = Cov(x_{t+1}, x_t | y)``.

    ``engine``: ``"scan"`` (default) -- the parallel scans, differentiable by autograd; ``"compiled"``
    -- the sequential filter + RTS compiled with numba (:mod:`~latentgp.linalg.kalman_compiled`): no
    gradient (raises if an input requires one), far fewer calls for short sequences of small states;
    ``"auto"`` -- compiled when no input requires a gradient and numba is installed, else the scan.
    Both give the same moments to rounding (tested to 1e-10). If the compiled path meets a singular
    predictive covariance it falls back to the scan, whose jitter policy handles it.
    """
    if engine not in ("scan", "compiled", "auto"):
        raise ValueError(f"`engine` must be 'scan', 'compiled' or 'auto'; got {engine!r}.")
    args, spec = _canonical(A, Q, H, R, y, P0, m0, mask)
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in args)
    if engine == "compiled" and grad:
        raise ValueError("engine='compiled' has no gradient; use engine='scan' (or 'auto') when inputs require grad.")
    if engine != "scan" and not grad and (engine == "compiled" or _compiled_available()):
        out = _smoother_compiled(args, spec)
        if out is not None:
            return out
    # Without gradients the RTS part runs in inference mode too (cheaper small calls); its outputs are
    # then cloned into ordinary tensors.
    with contextlib.nullcontext() if grad else torch.inference_mode():
        out = _smoother(args, spec)
    return out if grad else SmootherResult(*(x.clone() for x in out))


def _compiled_available() -> bool:
    """Whether the numba engine can be imported (numba is a dependency; this guards exotic platforms)."""
    try:
        from . import kalman_compiled  # noqa: F401
    except ImportError:  # pragma: no cover
        return False
    return True


def _smoother_compiled(args, spec) -> SmootherResult | None:
    """The numba path; None when it meets a singular matrix (the caller then uses the scan)."""
    import numpy as np

    from . import kalman_compiled

    A, Q, H, R, y, m0, P0, mask = args
    try:
        means, covs, cross, ll = kalman_compiled.smooth(A, Q, H, R, y, m0, P0, mask)
    except np.linalg.LinAlgError:
        return None
    b, T, s = spec.batch, spec.T, spec.s
    out = [torch.from_numpy(x).to(dtype=y.dtype, device=y.device) for x in (means, covs, ll, cross)]
    if not all(bool(torch.isfinite(x).all()) for x in out):
        return None
    shapes = (b + (T, s), b + (T, s, s), b, b + (T - 1, s, s))
    return SmootherResult(*(x.reshape(shape) for x, shape in zip(out, shapes, strict=True)))


def _smoother(args, spec) -> SmootherResult:
    means, covs, ll = _KalmanFilterFn.apply(*args)
    b, T, s = spec.batch, spec.T, spec.s
    mf, Pf = means.permute(2, 1, 0).unsqueeze(1), covs.permute(2, 3, 1, 0)  # (s, 1|s, T, nb)
    nb = mf.shape[3]
    if T > 1:
        A_ = args[0].permute(2, 3, 1, 0)
        Q_ = _sym(args[1].permute(2, 3, 1, 0))
        A1 = A_[:, :, 1:] if A_.shape[2] == T else A_
        Q1 = Q_[:, :, 1:] if Q_.shape[2] == T else Q_
        # RTS elements for t < T-1: E_t = Pf_t A_{t+1}^T (P^-_{t+1})^{-1}, g_t = mf_t - E_t m^-_{t+1},
        # L_t = Pf_t - E_t P^-_{t+1} E_t^T; the last step is (0, mf, Pf).
        APf = _mm(A1, Pf[:, :, :-1])  # A_{t+1} Pf_t
        Pp = _sym(_mm(APf, _mT(A1))) + Q1
        E = None
        if s <= 2:  # closed form, unless some P^- is (numerically) singular: then the jitter policy below
            diag = Pp.diagonal(0, 0, 1).prod(-1)
            det = diag
            if s == 2:
                det = diag - Pp[0, 1] * Pp[1, 0]
            if bool((det > 1e-10 * diag).all()) and bool(torch.isfinite(det).all()):
                E = _mm(_mT(APf), _inv(Pp))
        if E is None:
            LPp, _ = safe_cholesky(Pp.movedim((0, 1), (-2, -1)), what="Kalman predictive state covariance")
            E = torch.cholesky_solve(APf.movedim((0, 1), (-2, -1)), LPp).movedim((-2, -1), (1, 0))
        g = mf[:, :, :-1] - _mm(E, _mm(A1, mf[:, :, :-1]))
        Lc = _sym(Pf[:, :, :-1] - _mm(_mm(E, Pp), _mT(E)))
        last = torch.cat((torch.zeros_like(Pf[:, :, -1:]), mf[:, :, -1:], Pf[:, :, -1:]), 1)
        elems = torch.cat((torch.cat((E, g, Lc), 1), last), 2)
        sm = _affine_scan_reverse(elems, 1, True)
        ms, Ps = sm[:, :1], _sym(sm[:, 1:])
        cross = _mm(Ps[:, :, 1:], _mT(E))  # Cov(x_{t+1}, x_t | y) = P^s_{t+1} E_t^T
    else:
        ms, Ps = mf, Pf
        cross = Pf.new_zeros((s, s, 0, nb))
    return SmootherResult(
        ms[:, 0].permute(2, 1, 0).reshape(b + (T, s)),
        _aos(Ps).reshape(b + (T, s, s)),
        ll.reshape(b),
        _aos(cross).reshape(b + (T - 1, s, s)),
    )
