"""Cholesky factorisation with latentgp's jitter policy.

Policy (shared by every model): try the plain Cholesky first. If the matrix is not numerically
positive definite, add ``jitter * mean(diag(K)) * I`` with ``jitter`` = 1e-10, 1e-9, ... up to
``max_jitter`` (default 1e-4, relative). The jitter that worked is returned so models can record it
(``model.jitter_``) and a :class:`JitterWarning` names it. If even ``max_jitter`` fails, or the matrix
has NaN/inf entries, a :class:`numpy.linalg.LinAlgError`-compatible ``torch.linalg.LinAlgError`` is
raised with a message saying what to change -- never a silent NaN.
"""
from __future__ import annotations

import warnings

import torch


class JitterWarning(RuntimeWarning):
    """A covariance needed diagonal jitter to be factorised."""


def safe_cholesky(K: torch.Tensor, *, max_jitter: float = 1e-4, warn: bool = True, what: str = "covariance"):
    """Lower Cholesky factor of ``K`` (batched), adding relative jitter only if needed.

    Returns ``(L, jitter)`` where ``jitter`` is the absolute value added to the diagonal (0.0 if none).
    """
    L, info = torch.linalg.cholesky_ex(K)
    # NaN/inf in the (used) lower triangle propagate to L's diagonal, so checking it is enough on
    # the fast path; the full scan of K runs only after a failure, to give the right message.
    if not bool((info > 0).any()) and bool(torch.isfinite(L.diagonal(dim1=-2, dim2=-1)).all()):
        return L, 0.0
    if not torch.isfinite(K).all():
        raise torch.linalg.LinAlgError(
            f"The {what} matrix has NaN or inf entries; check the inputs and hyperparameters."
        )
    scale = K.diagonal(dim1=-2, dim2=-1).abs().mean().item() or 1.0
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    rel = 1e-10
    while rel <= max_jitter * (1 + 1e-12):
        jitter = rel * scale
        L, info = torch.linalg.cholesky_ex(K + jitter * eye)
        if not bool((info > 0).any()):
            if warn:
                warnings.warn(
                    f"The {what} matrix was not numerically positive definite; added jitter {jitter:.3g} "
                    f"({rel:.0e} x its mean diagonal) to factorise it.",
                    JitterWarning,
                    stacklevel=2,
                )
            return L, jitter
        rel *= 10.0
    raise torch.linalg.LinAlgError(
        f"The {what} matrix is not positive definite even with jitter {max_jitter:.0e} x its mean diagonal. "
        "Likely causes: a near-zero noise with duplicated inputs, or a lengthscale far larger than the data "
        "range; fix the noise to a larger value (noise=...) or rescale the inputs."
    )
