"""Exact state-space (linear SDE) forms of 1-D stationary kernels.

A stationary GP f(t) = H x(t) with x(t + dt) = A(dt) x(t) + q, q ~ N(0, Q(dt)), and x ~ N(0, P_inf).
Because the state is stationary, Q(dt) = P_inf - A(dt) P_inf A(dt)^T and, for dt >= 0,
k(dt) = H A(dt) P_inf H^T.  Kalman filters and smoothers only need ``transition`` and ``process_noise``.

Supported: half-integer Matérn (nu = p + 1/2), HidaMatern, and ScaleKernel / sums / products of these.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import gpytorch
import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as tnf

from .matern import Matern, _half_integer_order

__all__ = ["StateSpaceForm", "matern_state_space", "state_space_form"]


def _broadcast_shapes(*shapes) -> torch.Size:
    """torch.broadcast_shapes via numpy's C implementation (torch's is Python, ~20 µs a call, and forms are
    rebuilt in every training step); ValueError on incompatible shapes."""
    return torch.Size(np.broadcast_shapes(*(tuple(x) for x in shapes)))


@dataclass(frozen=True)
class StateSpaceForm:
    """Stationary linear-Gaussian state-space model of a 1-D kernel.

    ``transition_fn(dt)`` maps a tensor ``dt`` of shape (T,) or broadcastable to (*batch, T) to A(dt) of
    shape (..., T, s, s); :meth:`transition` broadcasts it to the full batch shape.  ``F`` is the SDE
    generator (A(dt) = expm(F dt)); it is kept for continuous-time algorithms and for checking.
    """

    P_inf: Tensor  # (*batch, s, s) stationary state covariance
    H: Tensor  # (*batch, s) observation row: f = H x
    transition_fn: Callable[[Tensor], Tensor]
    F: Tensor | None = None  # (*batch, s, s)

    @property
    def state_dim(self) -> int:
        return self.P_inf.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        shapes = [self.P_inf.shape[:-2], self.H.shape[:-1]]
        if self.F is not None:
            shapes.append(self.F.shape[:-2])
        return _broadcast_shapes(*shapes)

    def _as_dt(self, dt) -> Tensor:
        return torch.as_tensor(dt, dtype=self.P_inf.dtype, device=self.P_inf.device)

    def transition(self, dt) -> Tensor:
        """A(dt) = expm(F dt), shape (*batch, T, s, s); dt >= 0 for a forward (filtering) step."""
        dt = self._as_dt(dt)
        A = self.transition_fn(dt)
        s = self.state_dim
        batch = _broadcast_shapes(self.batch_shape, A.shape[:-3], dt.shape[:-1])
        return A.expand(*batch, A.shape[-3], s, s)

    def process_noise(self, dt) -> Tensor:
        """Q(dt) = P_inf - A P_inf A^T, shape (*batch, T, s, s), symmetrised against round-off."""
        return self.discretise(dt)[1]

    def discretise(self, dt) -> tuple[Tensor, Tensor]:
        """(A(dt), Q(dt)) with one evaluation of the transition (callers that need both)."""
        A = self.transition(dt)
        P = self.P_inf.unsqueeze(-3)
        Q = P - A @ P @ A.transpose(-1, -2)
        return A, 0.5 * (Q + Q.transpose(-1, -2))

    def covariance(self, dt) -> Tensor:
        """k(dt) = H A(|dt|) P_inf H^T, shape (*batch, T); for checking the form against the kernel."""
        A = self.transition(self._as_dt(dt).abs())
        h = self.H.unsqueeze(-2).unsqueeze(-2)  # (*batch, 1, 1, s)
        return (h @ A @ self.P_inf.unsqueeze(-3) @ h.transpose(-1, -2)).squeeze(-1).squeeze(-1)

    def scaled(self, scale) -> StateSpaceForm:
        """The form of ``scale * k``: only P_inf scales (hence Q); A and H are unchanged."""
        scale = torch.as_tensor(scale, dtype=self.P_inf.dtype, device=self.P_inf.device)
        return StateSpaceForm(self.P_inf * scale[..., None, None], self.H, self.transition_fn, self.F)


# ---------------------------------------------------------------------------------------------------
# Matérn nu = p + 1/2
# ---------------------------------------------------------------------------------------------------


def _matern_constants(p: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    """Lengthscale-free pieces of the Matérn(p + 1/2) form, built once per (p, dtype, device): training loops
    rebuild the form every step, and these Python-level constructions were most of its cost.

    Returns (shift, last, coeff, coeff_power, cov_const, cov_power, eye, H):
    F = shift + last * (coeff * lam^coeff_power), P_inf = cov_const * lam^cov_power (see below).
    Built outside inference mode: cached inference tensors could not be saved for a later backward pass. The
    cached tensors are shared: never modify them in place (callers get copies or new tensors)."""
    with torch.inference_mode(False):
        return _build_matern_constants(p, dtype, device)


@functools.lru_cache(maxsize=64)
def _build_matern_constants(p: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    s = p + 1
    kw = {"dtype": dtype, "device": device}
    shift = torch.diag(torch.ones(p, **kw), 1)
    last = torch.zeros(s, 1, **kw)
    last[-1, 0] = 1.0
    # last row of F: f^(p+1) = -sum_k binom(p+1, k) lam^(p+1-k) f^(k)
    coeff = torch.tensor([-float(math.comb(s, k)) for k in range(s)], **kw)
    coeff_power = torch.tensor([float(s - k) for k in range(s)], **kw)
    # P_inf[i, j] = Cov(f^(i), f^(j)) = (-1)^j k^(i+j)(0) = (-1)^(j+m) M_2m for i + j = 2m, else 0, with
    # M_2m = lam^(2m) Gamma(m+1/2) Gamma(p-m+1/2) / (Gamma(1/2) Gamma(p+1/2)) the 2m-th moment of the
    # normalised Matérn spectral density, proportional to (lam^2 + w^2)^-(p+1)
    cov_const = torch.zeros(s, s, **kw)
    for i in range(s):
        for j in range(s):
            if (i + j) % 2 == 0:
                m = (i + j) // 2
                logm = (math.lgamma(m + 0.5) + math.lgamma(p - m + 0.5)
                        - math.lgamma(0.5) - math.lgamma(p + 0.5))
                cov_const[i, j] = (-1) ** (j + m) * math.exp(logm)
    power = torch.arange(s, **kw)
    H = torch.zeros(s, **kw)
    H[0] = 1.0
    return shift, last, coeff, coeff_power, cov_const, power[:, None] + power[None, :], torch.eye(s, **kw), H


def _matern_generator(lam: Tensor, p: int) -> Tensor:
    """Companion matrix F with characteristic polynomial (s + lam)^(p+1); state (f, f', ..., f^(p))."""
    shift, last, coeff, coeff_power = _matern_constants(p, lam.dtype, lam.device)[:4]
    return shift + last * (coeff * lam ** coeff_power)  # lam (*batch, 1, 1) -> last row (*batch, 1, s)


def _matern_stationary_cov(lam: Tensor, p: int) -> Tensor:
    """P_inf of the unit-variance Matérn(p + 1/2) state (f, f', ..., f^(p)) (see :func:`_matern_constants`)."""
    cov_const, cov_power = _matern_constants(p, lam.dtype, lam.device)[4:6]
    return cov_const * lam ** cov_power


def matern_state_space(nu: float, lengthscale) -> StateSpaceForm:
    """Exact state-space form of the unit-variance Matérn(nu = p + 1/2), state (f, f', ..., f^(p)).

    ``lengthscale``: float or tensor of shape (*batch, 1, 1).  The SDE is (D + lam)^(p+1) f = white noise
    with lam = sqrt(2 nu) / l; F + lam I = N is nilpotent, so expm(F dt) = e^(-lam dt) sum_{k<=p}
    (N dt)^k / k! exactly, with no matrix exponential and no loop over time points.
    """
    p = _half_integer_order(float(nu))
    if p is None:
        raise ValueError(f"matern_state_space needs nu = p + 1/2 for an integer p >= 0; got nu={nu}.")
    ls = lengthscale if torch.is_tensor(lengthscale) else torch.tensor(float(lengthscale))
    if ls.dim() < 2:  # float -> (1, 1); (B,) -> (B, 1, 1)
        ls = ls.reshape(1, 1) if ls.numel() == 1 and ls.dim() == 0 else ls.reshape(-1, 1, 1)
    if ls.shape[-1] != 1 or ls.shape[-2] != 1:
        raise ValueError("matern_state_space needs a (*batch, 1, 1) lengthscale (1-D input); "
                         f"got {tuple(ls.shape)}.")
    lam = math.sqrt(2.0 * (p + 0.5)) / ls  # (*batch, 1, 1)
    s = p + 1
    eye, H = _matern_constants(p, lam.dtype, lam.device)[6:]
    F = _matern_generator(lam, p)
    N = F + lam * eye
    npow = [eye.expand_as(N)]
    for _ in range(p):
        npow.append(npow[-1] @ N)
    npow = torch.stack(npow, dim=-3)  # (*batch, K, s, s), K = p + 1

    def transition_fn(dt: Tensor) -> Tensor:
        # dt^k / k! by running products, not dt ** k: the pow gradient at dt = 0, k = 0 is NaN
        terms = [torch.ones_like(dt)]
        for k in range(1, s):
            terms.append(terms[-1] * dt / k)
        taylor = torch.stack(terms, dim=-1)  # (..., T, K)
        series = (taylor[..., None, None] * npow.unsqueeze(-4)).sum(-3)  # (*batch, T, s, s)
        return torch.exp(-lam.unsqueeze(-3) * dt[..., None, None]) * series

    P = _matern_stationary_cov(lam, p)
    return StateSpaceForm(P, H.clone().expand(*lam.shape[:-2], s), transition_fn, F)  # not a view of the cache


# ---------------------------------------------------------------------------------------------------
# Combinators: sums (independent blocks) and products (Kronecker)
# ---------------------------------------------------------------------------------------------------


def _block_diag(mats: list[Tensor]) -> Tensor:
    """Batched block-diagonal of square matrices (torch.block_diag has no batch support)."""
    batch = _broadcast_shapes(*(m.shape[:-2] for m in mats))
    sizes = [m.shape[-1] for m in mats]
    total, rows, start = sum(sizes), [], 0
    for m, s in zip(mats, sizes, strict=True):
        rows.append(tnf.pad(m.expand(*batch, s, s), (start, total - start - s)))
        start += s
    return torch.cat(rows, dim=-2)


def _kron(a: Tensor, b: Tensor) -> Tensor:
    """Batched Kronecker product of matrices (..., m, n) x (..., p, q) -> (..., m p, n q)."""
    out = a[..., :, None, :, None] * b[..., None, :, None, :]
    return out.reshape(*out.shape[:-4], a.shape[-2] * b.shape[-2], a.shape[-1] * b.shape[-1])


def _kron_vec(a: Tensor, b: Tensor) -> Tensor:
    out = a[..., :, None] * b[..., None, :]
    return out.reshape(*out.shape[:-2], a.shape[-1] * b.shape[-1])


def _sum_forms(forms: list[StateSpaceForm]) -> StateSpaceForm:
    """Independent components: stacked state, block-diagonal A and P, H concatenated."""
    batch = _broadcast_shapes(*(f.batch_shape for f in forms))
    H = torch.cat([f.H.expand(*batch, f.state_dim) for f in forms], dim=-1)
    P = _block_diag([f.P_inf for f in forms])
    F = None if any(f.F is None for f in forms) else _block_diag([f.F for f in forms])

    def transition_fn(dt: Tensor) -> Tensor:
        return _block_diag([f.transition_fn(dt) for f in forms])

    return StateSpaceForm(P, H, transition_fn, F)


def _product_forms(f1: StateSpaceForm, f2: StateSpaceForm) -> StateSpaceForm:
    """Product of independent processes: state x1 (x) x2, A = A1 (x) A2, P = P1 (x) P2, H = H1 (x) H2.

    Its covariance is k1 k2 and Q = P - A P A^T stays PSD (= Q1(x)Q2 + Q1(x)A2P2A2^T + A1P1A1^T(x)Q2).
    """
    F = None
    if f1.F is not None and f2.F is not None:  # Kronecker sum generates the Kronecker product flow
        i1 = torch.eye(f1.state_dim, dtype=f1.F.dtype, device=f1.F.device)
        i2 = torch.eye(f2.state_dim, dtype=f2.F.dtype, device=f2.F.device)
        F = _kron(f1.F, i2) + _kron(i1, f2.F)

    def transition_fn(dt: Tensor) -> Tensor:
        return _kron(f1.transition_fn(dt), f2.transition_fn(dt))

    return StateSpaceForm(_kron(f1.P_inf, f2.P_inf), _kron_vec(f1.H, f2.H), transition_fn, F)


# ---------------------------------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------------------------------

_SUPPORTED = ("supported: latentgp.kernels.Matern / gpytorch MaternKernel with nu = p + 1/2, HidaMatern, "
              "and ScaleKernel / sums / products of these")


def _check_one_dim(kernel, name: str) -> None:
    ls = getattr(kernel, "lengthscale", None)
    if ls is not None and ls.shape[-1] > 1:
        raise TypeError(f"{name} has an ARD lengthscale over {ls.shape[-1]} input dimensions; state-space "
                        "forms are for 1-D (time) inputs: use ard_num_dims=None or 1.")


def _unsupported(kernel) -> TypeError:
    name = type(kernel).__name__
    if isinstance(kernel, gpytorch.kernels.RBFKernel):
        hint = ("RBFKernel has no finite state-space form (its spectral density is not rational); use "
                "latentgp.kernels.Matern(nu=2.5) or HidaMatern(order=2) instead")
    elif isinstance(kernel, gpytorch.kernels.PeriodicKernel):
        hint = ("PeriodicKernel has no finite state-space form; use HidaMatern(order=...) with "
                "omega = 2*pi/period (quasi-periodic), or a sum of HidaMatern kernels at the harmonics")
    elif isinstance(kernel, gpytorch.kernels.SpectralMixtureKernel) or name == "SpectralMixture":
        hint = (f"{name} has no finite state-space form (Gaussian spectral peaks); use a sum of "
                "HidaMatern kernels, one per mixture component (omega = 2*pi*mean)")
    else:
        hint = f"{name} has no state-space form in latentgp"
    return TypeError(f"{hint}; {_SUPPORTED}.")


def state_space_form(kernel) -> StateSpaceForm:
    """Exact :class:`StateSpaceForm` of a 1-D kernel built from Matérn(p + 1/2) and HidaMatern pieces.

    Raises TypeError, naming the kernel and a state-space alternative, for anything else.
    """
    name = type(kernel).__name__
    if isinstance(kernel, gpytorch.kernels.ScaleKernel):
        return state_space_form(kernel.base_kernel).scaled(kernel.outputscale)
    if isinstance(kernel, gpytorch.kernels.AdditiveKernel):
        return _sum_forms([state_space_form(k) for k in kernel.kernels])
    if isinstance(kernel, gpytorch.kernels.ProductKernel):
        forms = [state_space_form(k) for k in kernel.kernels]
        out = forms[0]
        for f in forms[1:]:
            out = _product_forms(out, f)
        return out
    if callable(getattr(kernel, "state_space", None)):  # HidaMatern and future latentgp kernels
        _check_one_dim(kernel, name)
        return kernel.state_space()
    if isinstance(kernel, (Matern, gpytorch.kernels.MaternKernel)):
        _check_one_dim(kernel, name)
        nu = float(kernel.nu)
        if _half_integer_order(nu) is None:
            raise TypeError(f"{name}(nu={nu:g}) has no finite state-space form; use nu = p + 1/2 "
                            "(0.5, 1.5, 2.5, ...) for an exact state space.")
        return matern_state_space(nu, kernel.lengthscale)
    raise _unsupported(kernel)


# ---------------------------------------------------------------------------------------------------
# Fast path: a bare Matérn(p + 1/2) discretised on a grid, with a closed-form derivative in lambda
# ---------------------------------------------------------------------------------------------------


class _MaternDiscretised(torch.autograd.Function):
    """(A(dt), Q(dt), P_inf) of unit-variance Matérn(p + 1/2) forms with lengthscales ``ls`` (L,) at steps ``dt``
    (K,): the numbers of ``matern_state_space(nu, ls).discretise(dt)``, computed with d/dlambda alongside
    (A = e^(-lam dt) sum_k (N dt)^k / k!, N = F + lam I nilpotent, d(N^k) = d(N^(k-1)) N + N^(k-1) dN; the per-step
    part compiled, :mod:`latentgp.kernels._matern_compiled`), so a training step records one autograd node for
    the prior instead of a few dozen small ones."""

    @staticmethod
    def forward(ctx, ls, dt, p: int):
        s = p + 1
        ls_, dt_ = ls.detach().cpu().numpy().astype(np.float64), dt.detach().cpu().numpy().astype(np.float64)
        lam = math.sqrt(2.0 * p + 1.0) / ls_  # (L,)
        k = np.arange(s)
        coeff = np.array([-float(math.comb(s, j)) for j in range(s)])
        N = np.zeros((len(lam), s, s))
        N[:, np.arange(p), np.arange(1, s)] = 1.0
        N[:, -1, :] = coeff * lam[:, None] ** (s - k)
        dN = np.zeros_like(N)
        dN[:, -1, :] = coeff * (s - k) * lam[:, None] ** np.maximum(s - k - 1, 0)
        N += lam[:, None, None] * np.eye(s)
        dN += np.eye(s)
        powers, dpowers = [np.broadcast_to(np.eye(s), N.shape)], [np.zeros_like(N)]
        for _ in range(p):
            dpowers.append(dpowers[-1] @ N + powers[-1] @ dN)
            powers.append(powers[-1] @ N)
        from ._matern_compiled import discretise_steps

        constants = _matern_constants(p, torch.float64, torch.device("cpu"))
        cov_const, cov_power = constants[4].numpy(), constants[5].numpy()
        P = cov_const * lam[:, None, None] ** cov_power
        dP = cov_const * cov_power * lam[:, None, None] ** np.maximum(cov_power - 1, 0)
        A, dA, Q, dQ = (np.empty((len(lam), len(dt_), s, s)) for _ in range(4))
        discretise_steps(np.ascontiguousarray(np.stack(powers)), np.stack(dpowers), lam, dt_, P, dP, A, dA, Q, dQ)
        ctx.derivs = (dA, dQ, dP, lam, ls_)
        ctx.dtype = ls.dtype
        return tuple(torch.from_numpy(np.ascontiguousarray(x)).to(ls.dtype) for x in (A, Q, P))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gA, gQ, gP):
        dA, dQ, dP, lam, ls_ = ctx.derivs
        g_lam = np.zeros_like(lam)
        for g, d in ((gA, dA), (gQ, dQ), (gP, dP)):
            if g is not None:
                g_lam += (g.detach().cpu().numpy() * d).reshape(len(lam), -1).sum(1)
        return torch.from_numpy(g_lam * (-lam / ls_)).to(ctx.dtype), None, None  # lam = sqrt(2p + 1) / ls


def bare_matern_discretised(kernel, dt: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """(A (L, K, s, s), Q, P_inf (L, s, s), H (s,)) of ``state_space_form(kernel)`` discretised at steps ``dt``
    (K,) for a bare (unscaled, unsummed) ``Matern`` / ``MaternKernel`` with nu = p + 1/2 and batch_shape (L,) on
    the CPU, through one autograd node (:class:`_MaternDiscretised`); None for any other kernel (use the form)."""
    if (not isinstance(kernel, (Matern, gpytorch.kernels.MaternKernel)) or len(kernel.batch_shape) != 1
            or dt.requires_grad):  # the node differentiates in the lengthscale only
        return None
    p = _half_integer_order(float(kernel.nu))
    ls = kernel.lengthscale
    if p is None or ls.shape[-2:] != (1, 1) or ls.device.type != "cpu":
        return None
    A, Q, P = _MaternDiscretised.apply(ls.reshape(-1), dt, p)
    return A, Q, P, _matern_constants(p, ls.dtype, ls.device)[7].clone()  # the cached constant stays private
