"""Pure linear-algebra functions: log-Bessel, stable Cholesky, Kalman filtering/smoothing."""
from .bessel import log_bessel_kv
from .cholesky import safe_cholesky

__all__ = ["log_bessel_kv", "safe_cholesky"]
