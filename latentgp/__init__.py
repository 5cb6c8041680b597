"""latentgp: Gaussian-process and Bayesian latent-variable models on one kernel algebra.

Importing latentgp has no global side effects: no seeding, no change of torch's default dtype.
"""
from . import kernels, linalg
from .cosmoothing import co_smoothing
from .io import load
from .models.exact import GPRegressor
from .models.gpfa import GPFA
from .models.gpvae import GPVAE
from .models.grid import GridGP
from .models.magma import Magma
from .models.magmaclust import MagmaClust
from .models.mmgpvae import MultimodalGPVAE
from .models.multitask import HMTGP, MultitaskGP
from .models.pde import GPPDESolver
from .models.poisson_latent import PoissonLatentGP
from .models.sic import SICGP
from .models.state_space import StateSpaceGP
from .models.svgp import SVGP
from .models.tucker import FunctionalTucker
from .models.vector_field import ScalarFieldGP, VectorFieldGP

__all__ = ["kernels", "linalg", "load", "co_smoothing", "GPRegressor", "StateSpaceGP", "PoissonLatentGP", "GPFA",
           "FunctionalTucker", "VectorFieldGP", "ScalarFieldGP", "SICGP", "SVGP", "GridGP",
           "GPPDESolver", "Magma", "MagmaClust", "MultitaskGP", "HMTGP",
           "GPVAE", "MultimodalGPVAE"]
__version__ = "0.1.0"
