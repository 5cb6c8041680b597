"""Hida-Matérn kernel: k(tau) = Matern_{order+1/2}(tau / l) cos(omega tau), for 1-D (time) inputs.

A Matérn envelope times a cosine is a damped, stochastically phase-drifting oscillation; sums of them are
a state-space alternative to spectral-mixture kernels.  Its state is the Matérn state (x) a 2-D rotation.
"""
from __future__ import annotations

import math

import gpytorch
import torch
from gpytorch.constraints import Interval, Positive
from gpytorch.priors import Prior
from torch import Tensor

from .matern import _matern_half_integer, matern_spectral_density
from .state_space import StateSpaceForm, _kron, _kron_vec, matern_state_space

__all__ = ["HidaMatern"]


class HidaMatern(gpytorch.kernels.Kernel):
    """Matérn(order + 1/2) x cos(omega tau) on 1-D inputs, unit variance (wrap in ScaleKernel for scale).

    :param order: Matérn order p >= 0 (smoothness nu = p + 1/2); the state dimension is 2 (p + 1).
    :param omega: initial angular frequency (>= 0), default 1.0.
    Learnable: ``lengthscale`` (gpytorch's) and ``omega`` (positive constraint, batch_shape aware).
    """

    has_lengthscale = True
    is_stationary = True

    def __init__(
        self,
        order: int = 1,
        batch_shape: torch.Size | None = None,
        omega: float | Tensor | None = None,
        omega_prior: Prior | None = None,
        omega_constraint: Interval | None = None,
        **kwargs,
    ):
        if isinstance(order, bool) or not isinstance(order, int) or order < 0:
            raise ValueError(f"HidaMatern: `order` must be an int >= 0 (nu = order + 1/2); "
                             f"got order={order!r}.")
        if kwargs.get("ard_num_dims") not in (None, 1):
            raise ValueError("HidaMatern is a 1-D (time) kernel; ard_num_dims must be None or 1, got "
                             f"{kwargs['ard_num_dims']}.")
        super().__init__(batch_shape=batch_shape, **kwargs)
        self.order = order
        self.register_parameter("raw_omega", torch.nn.Parameter(torch.zeros(*self.batch_shape, 1, 1)))
        self.register_constraint("raw_omega", Positive() if omega_constraint is None else omega_constraint)
        if omega_prior is not None:
            self.register_prior("omega_prior", omega_prior, self._omega_param, self._omega_closure)
        self.omega = 1.0 if omega is None else omega

    @property
    def nu(self) -> float:
        return self.order + 0.5

    @property
    def omega(self) -> Tensor:
        return self.raw_omega_constraint.transform(self.raw_omega)

    @omega.setter
    def omega(self, value: float | Tensor) -> None:
        self._set_omega(value)

    # named methods rather than lambdas so that kernels with priors stay picklable
    def _omega_param(self, m: HidaMatern) -> Tensor:
        return m.omega

    def _omega_closure(self, m: HidaMatern, v: Tensor) -> None:
        m._set_omega(v)

    def _set_omega(self, value: float | Tensor) -> None:
        # as_tensor straight to the parameter's dtype: going through float32 would round a Python float
        value = torch.as_tensor(value, dtype=self.raw_omega.dtype, device=self.raw_omega.device)
        self.initialize(raw_omega=self.raw_omega_constraint.inverse_transform(value))

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params):
        if x1.shape[-1] != 1 or x2.shape[-1] != 1:
            raise ValueError(f"HidaMatern takes 1-D inputs (shape (..., n, 1)); got last dimension "
                             f"{x1.shape[-1]} / {x2.shape[-1]}. Use active_dims to pick the time column.")
        if last_dim_is_batch:
            raise NotImplementedError("HidaMatern does not support last_dim_is_batch (its input is 1-D).")
        ls, om = self.lengthscale, self.omega  # (*batch, 1, 1)
        if diag:
            tau = (x1 - x2)[..., 0].abs()  # (..., n)
            ls, om = ls[..., 0], om[..., 0]
        else:
            tau = (x1 - x2.transpose(-1, -2)).abs()  # (..., n, m)
        z = math.sqrt(2 * self.nu) * tau / ls
        return _matern_half_integer(z, self.order) * torch.cos(om * tau)

    def state_space(self) -> StateSpaceForm:
        """A = A_M(dt) (x) R(omega dt), P_inf = P_M (x) I_2, H = H_M (x) [1, 0]; dimension 2 (order + 1).

        H A P H^T = k_M(dt) [1, 0] R(omega dt) [1, 0]^T = k_M(dt) cos(omega dt), and Q = Q_M (x) I_2.
        """
        base = matern_state_space(self.nu, self.lengthscale)
        om = self.omega  # (*batch, 1, 1)
        eye2 = torch.eye(2, dtype=om.dtype, device=om.device)
        e0 = eye2[0]
        gen = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=om.dtype, device=om.device)
        i_m = torch.eye(base.state_dim, dtype=om.dtype, device=om.device)
        F = _kron(base.F, eye2) + _kron(i_m, om * gen)  # commuting parts, so expm factorises

        def transition_fn(dt: Tensor) -> Tensor:
            theta = om.unsqueeze(-3) * dt[..., None, None]  # (*batch, T, 1, 1)
            c, s = torch.cos(theta), torch.sin(theta)
            rot = torch.cat([torch.cat([c, -s], -1), torch.cat([s, c], -1)], -2)
            return _kron(base.transition_fn(dt), rot)

        return StateSpaceForm(_kron(base.P_inf, eye2), _kron_vec(base.H, e0), transition_fn, F)

    def spectral_density(self, omega: Tensor) -> Tensor:
        """S(w) = [S_M(w - omega0) + S_M(w + omega0)] / 2; ``omega`` (m, 1) or (m,), returns (*batch, m)."""
        w = omega.unsqueeze(-1) if omega.dim() == 1 else omega
        if w.shape[-1] != 1:
            raise ValueError(f"HidaMatern is 1-D; spectral_density needs omega of shape (m,) or (m, 1), "
                             f"got {tuple(omega.shape)}.")
        w0 = self.omega[..., 0, :]  # (*batch, 1): broadcast against the m frequencies
        ls = self.lengthscale
        plus = matern_spectral_density((w[..., 0] - w0).unsqueeze(-1), self.nu, ls)
        minus = matern_spectral_density((w[..., 0] + w0).unsqueeze(-1), self.nu, ls)
        return 0.5 * (plus + minus)
