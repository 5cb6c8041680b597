"""Spectral densities of stationary kernels, angular-frequency convention.

S(omega) = int k(tau) exp(-i omega^T tau) dtau, so k(tau) = (2 pi)^-d int S(omega) exp(i omega^T tau) domega.
``omega`` has shape (m, d) or (m,) (d = 1); results have shape (*batch_shape, m).
"""
from __future__ import annotations

import math

import gpytorch
import torch
from torch import Tensor

from .matern import matern_spectral_density

__all__ = ["spectral_density"]


def _rbf_density(omega: Tensor, lengthscale: Tensor) -> Tensor:
    # k = exp(-|tau / l|^2 / 2)  ->  S = prod(l) (2 pi)^(d/2) exp(-|l * w|^2 / 2), computed in log space
    d = omega.shape[-1]
    log_s = (torch.log(lengthscale).sum(-1) + 0.5 * d * math.log(2 * math.pi)
             - 0.5 * ((omega * lengthscale) ** 2).sum(-1))
    return log_s.exp()


def spectral_density(kernel, omega: Tensor) -> Tensor:
    """Spectral density of a stationary kernel at angular frequencies ``omega`` ((m, d) or (m,)).

    Handles kernels with a ``spectral_density`` method (latentgp Matern, HidaMatern, SpectralMixture),
    gpytorch ScaleKernel (outputscale x base), AdditiveKernel (sum), RBFKernel and MaternKernel.
    Products are not handled (their density is a convolution).  Raises TypeError naming the kernel otherwise.
    """
    w = omega.unsqueeze(-1) if omega.dim() == 1 else omega
    ls = getattr(kernel, "lengthscale", None)
    if ls is not None and ls.shape[-1] not in (1, w.shape[-1]):
        raise ValueError(f"{type(kernel).__name__} has a lengthscale over {ls.shape[-1]} dimensions but "
                         f"omega has {w.shape[-1]}.")
    if callable(getattr(kernel, "spectral_density", None)):
        return kernel.spectral_density(w)
    if isinstance(kernel, gpytorch.kernels.ScaleKernel):
        return kernel.outputscale[..., None] * spectral_density(kernel.base_kernel, w)
    if isinstance(kernel, gpytorch.kernels.AdditiveKernel):
        return sum(spectral_density(k, w) for k in kernel.kernels)
    if isinstance(kernel, gpytorch.kernels.RBFKernel):
        return _rbf_density(w, ls.expand(*ls.shape[:-1], w.shape[-1]))
    if isinstance(kernel, gpytorch.kernels.MaternKernel):
        return matern_spectral_density(w, float(kernel.nu), ls.expand(*ls.shape[:-1], w.shape[-1]))
    if isinstance(kernel, gpytorch.kernels.ProductKernel):
        raise TypeError("ProductKernel: the spectral density of a product is a convolution of the factors' "
                        "densities and is not implemented; use a single kernel over all dimensions (ARD).")
    stationary = getattr(kernel, "is_stationary", False)
    why = "is not stationary" if not stationary else "has no spectral density implemented in latentgp"
    raise TypeError(f"{type(kernel).__name__} {why}; spectral_density supports RBFKernel, MaternKernel, "
                    "latentgp Matern / HidaMatern / SpectralMixture, and ScaleKernel / sums of these.")
