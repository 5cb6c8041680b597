"""Pure linear-algebra functions: log-Bessel, stable Cholesky, Kalman filtering/smoothing."""
from .bessel import log_bessel_kv
from .cholesky import safe_cholesky
from .connection_laplacian import ConnectionLaplacian, connection_laplacian
from .kalman import FilterResult, SmootherResult, kalman_filter, kalman_smoother
from .scan import associative_scan
from .sic import SparseInverseCholesky, maximin_ordering, sic_pattern

__all__ = ["log_bessel_kv", "safe_cholesky", "kalman_filter", "kalman_smoother", "FilterResult", "SmootherResult",
           "associative_scan", "connection_laplacian", "ConnectionLaplacian",
           "maximin_ordering", "sic_pattern", "SparseInverseCholesky"]
