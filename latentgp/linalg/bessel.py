"""log K_nu(x), the log of the modified Bessel function of the second kind, for torch.

Method (all in float64 numpy, vectorised over elements):

* ``scipy.special.kve`` (AMOS, K_nu(x) e^x) wherever it returns a finite positive value:
  log K = log kve - x.  This covers almost everything and is accurate to ~1e-13 in log K.
* kve overflows when K is huge (large nu, small x; e.g. K_100(1e-8) ~ 1e900).  There we
  run the upward recurrence K_{v+1} = K_{v-1} + (2v/x) K_v from the fractional order
  mu = nu - floor(nu), which is the stable direction for K (K grows with order).  It is
  carried on log-ratios  rho_v = log(K_v / K_{v-1}):
      exp(rho_{v+1}) = exp(-rho_v) + 2v/x
  so nothing overflows; the loop is over order steps only.
* kve gives NaN for x beyond ~1e9 (AMOS refuses); there K is given by the Hankel
  asymptotic series sqrt(pi/2x) e^{-x} sum_k a_k(nu) / x^k, which converges fast for
  nu^2 << x.

The x-gradient uses d/dx log K_nu = -K_{nu-1}/K_nu - nu/x  (K_{-a} = K_a), with the ratio
taken as exp(log K_{|nu-1|} - log K_nu) (on the e^x-scaled logs) so it never overflows; both
terms are negative, so there is no cancellation.  The backward pass calls this Function again, so higher x-
derivatives work too.  Derivatives with respect to nu are NOT supported.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import gammaln, kve

# kve returns NaN (AMOS "no computation") above about 1e9; switch to Hankel's series there.
_HANKEL_TERMS = 30


def _log_kve_small_x(nu: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Leading small-x term log(Gamma(nu)/2 (2/x)^nu) (+ x), nu > 0.  Only used for the starting
    orders (< 2) of the recurrence when x is so tiny (< ~1e-300) that kve overflows; the
    relative corrections are O(x^2) and O(x^{2 nu}), far below rounding there."""
    return gammaln(nu) - math.log(2.0) + nu * (math.log(2.0) - np.log(x)) + x


def _log_kve_hankel(nu: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Hankel asymptotic series for large x; stops adding terms once they start growing."""
    mu4 = 4.0 * nu * nu
    total = np.ones_like(x)
    term = np.ones_like(x)
    live = np.ones(x.shape, dtype=bool)
    for k in range(1, _HANKEL_TERMS + 1):
        new = term * (mu4 - (2 * k - 1) ** 2) / (8.0 * k * x)
        live &= np.abs(new) < np.abs(term)  # asymptotic: stop at the smallest term
        term = np.where(live, new, term)
        total = total + np.where(live, new, 0.0)
    return 0.5 * np.log(np.pi / (2.0 * x)) + np.log(total)


def _log_kve_direct(nu: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """kve where it works; Hankel for huge x.  Returns (value, failed-to-overflow mask)."""
    with np.errstate(all="ignore"):
        k = kve(nu, x)
        ok = np.isfinite(k) & (k > 0)
        out = np.where(ok, np.log(np.where(ok, k, 1.0)), np.nan)
    huge = ~ok & (x > 1e8)
    if huge.any():
        out[huge] = _log_kve_hankel(nu[huge], x[huge])
    return out, ~ok & ~huge


def _log_kve_start(nu: np.ndarray, x: np.ndarray) -> np.ndarray:
    """log(K e^x) at the recurrence's starting orders (nu in [0, 2)): kve, else small-x term."""
    out, over = _log_kve_direct(nu, x)
    if over.any():
        out[over] = _log_kve_small_x(nu[over], x[over])
    return out


def _log_kve_recurrence(nu: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Upward recurrence in order from mu = nu - floor(nu) (see module docstring)."""
    steps = np.floor(nu)
    mu = nu - steps
    lk_lo = _log_kve_start(mu, x)  # log K_mu
    lk = _log_kve_start(mu + 1.0, x)  # log K_{mu+1}
    out = np.where(steps == 0, lk_lo, lk)
    rho = lk - lk_lo  # log(K_{mu+1} / K_mu)
    log_x = np.log(x)
    for j in range(1, int(steps.max(initial=0))):
        v = mu + j  # current top order; K_{v+1}/K_v = K_{v-1}/K_v + 2v/x
        rho = np.logaddexp(-rho, np.log(2.0 * v) - log_x)
        lk = lk + rho
        out = np.where(steps == j + 1, lk, out)
    return out


def _log_kve_numpy(nu: np.ndarray, x: np.ndarray) -> np.ndarray:
    """log(K_nu(x) e^x) for float64 arrays of equal shape, nu >= 0, 0 < x < inf."""
    out, over = _log_kve_direct(nu, x)
    if over.any():
        out[over] = _log_kve_recurrence(nu[over], x[over])
    return out


class _LogBesselKve(torch.autograd.Function):
    """log(K_nu(x) e^x).  Working with the exponentially scaled value keeps the x-gradient's
    ratio K_{nu-1}/K_nu = exp(difference of two scaled logs) accurate at large x, where the
    unscaled logs are ~ -x and their difference would lose ~ulp(x).
    nu: float64 tensor (no grad), x: finite positive tensor of the same shape."""

    @staticmethod
    def forward(ctx, nu: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        nu_np = nu.detach().cpu().numpy()
        x_np = x.detach().cpu().to(torch.float64).numpy()
        out = torch.from_numpy(_log_kve_numpy(nu_np, x_np)).to(dtype=x.dtype, device=x.device)
        ctx.save_for_backward(nu, x, out)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        nu, x, out = ctx.saved_tensors
        # d/dx log(K e^x) = 1 - K_{nu-1}/K_nu - nu/x.  Calling the Function again for the
        # ratio keeps this differentiable in x (higher derivatives work).
        ratio = torch.exp(_LogBesselKve.apply((nu - 1.0).abs(), x) - out)
        return None, grad_out * (1.0 - ratio - nu.to(x.dtype) / x)


def log_bessel_kv(nu, x: torch.Tensor) -> torch.Tensor:
    """log K_nu(x), differentiable in ``x`` (any order), elementwise with broadcasting.

    :param nu: order, a python float or a tensor broadcastable with ``x``; every value > 0.
        Gradients with respect to ``nu`` are not supported: a ``nu`` that requires grad
        raises ``ValueError``.
    :param x: floating tensor with every value > 0 (``inf`` gives ``-inf``).  Result has
        ``x``'s dtype and device and the broadcast shape of ``nu`` and ``x``.
    Accuracy: |error in log K| <~ 2e-12 for nu <= 100, 1e-8 <= x <= 1e4 (see tests).  For
    larger x it is bounded by the spacing of float64 near log K ~ -x (~1e-16 x), and above
    x ~ 1e9 (Hankel series) it needs nu^2 << x.
    """
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x, dtype=torch.float64)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if isinstance(nu, torch.Tensor):
        if nu.requires_grad:
            raise ValueError("log_bessel_kv: gradients with respect to nu are not supported; "
                             "pass nu.detach() (nu is treated as a constant)")
        nu_t = nu.detach().to(device=x.device, dtype=torch.float64)
    else:
        nu_t = torch.as_tensor(nu, dtype=torch.float64, device=x.device)
    if not bool(torch.all(nu_t > 0)) or not bool(torch.all(torch.isfinite(nu_t))):
        raise ValueError(f"nu must be finite and > 0, got {nu_t.min().item() if nu_t.numel() else nu_t}")
    xd = x.detach()
    if not bool(torch.all(xd > 0)):  # also catches NaN (comparison is False)
        raise ValueError("x must be > 0 and not NaN (K_nu(0) = inf)")
    nu_b, x_b = torch.broadcast_tensors(nu_t, x)  # expand is autograd-tracked: grads sum back
    finite = torch.isfinite(x_b)
    x_safe = torch.where(finite, x_b, torch.ones_like(x_b))  # K_nu(inf) = 0: log K = -inf
    out = _LogBesselKve.apply(nu_b.contiguous(), x_safe) - x_safe
    return torch.where(finite, out, torch.full_like(out, -math.inf))
