"""Kernels shared by every model: gpytorch ``Kernel`` subclasses.

* :class:`Matern` -- Matérn of any smoothness ``nu > 0`` (log-Bessel, exact closed form at half-integers).
* :class:`HidaMatern` -- Matérn(order + 1/2) x cos(omega tau), with a state-space form.
* :class:`SpectralMixture` -- spectral mixture with log-weights.

:func:`spectral_density` and :func:`state_space_form` work on these and on gpytorch's own
kernels and their sums / scalings.
"""
from .connection_laplacian import ConnectionLaplacianKernel
from .grid_spectral import GaussianSpectralMixture, StudentTSpectralMixture
from .hida_matern import HidaMatern
from .matern import Matern
from .spectral import spectral_density
from .spectral_mixture import SpectralMixture
from .state_space import StateSpaceForm, matern_state_space, state_space_form

__all__ = ["Matern", "HidaMatern", "SpectralMixture", "spectral_density", "state_space_form", "StateSpaceForm",
           "matern_state_space", "ConnectionLaplacianKernel",
           "GaussianSpectralMixture", "StudentTSpectralMixture"]
