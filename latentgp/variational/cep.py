"""Conditional expectation propagation (CEP) for functional CP / Tucker decompositions (FunBaT).

Entry n of a K-mode tensor, at coordinates (i_1n, ..., i_Kn), is y_n = f_n + ε_n, ε_n ~ N(0, 1/τ), with

    f_n = Σ_{r_1..r_K} W[r_1, ..., r_K] u_1(i_1n)[r_1] ··· u_K(i_Kn)[r_K]          (Tucker)
    f_n = Σ_r u_1(i_1n)[r] ··· u_K(i_Kn)[r]                                      (CP: W superdiagonal, = 1)

The core W is indexed in mode order, so with vec = row-major flattening f_n = vec(W)ᵀ (u_1 ⊗ ··· ⊗ u_K):
every contraction here is an einsum over named mode indices, never a hand-ordered Kronecker product
(the official code orders it inconsistently between two places).

Holding every other factor, W and τ at their current posterior, f_n is linear in u_k(i_kn):
f_n = a_knᵀ u_k(i_kn). The conditional moment-matched message to u_k at that coordinate is then the
Gaussian with precision E[τ] E[a aᵀ] and shift E[τ] y_n E[a]; messages of all entries that share a
coordinate value are **summed in natural parameters** (one (R, R) site per unique coordinate, never
per-entry state), and one Kalman/RTS sweep over the mode's sorted unique coordinates turns the sites
into the new posterior (:func:`latentgp.variational.cvi.site_posterior`).
"""
from __future__ import annotations

import string

import torch

_LETTERS = string.ascii_letters


def _row(k):
    return _LETTERS[2 * k]


def _col(k):
    return _LETTERS[2 * k + 1]


def second_moments(mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """E[u uᵀ] = cov + m mᵀ, (..., R, R)."""
    return cov + mean.unsqueeze(-1) * mean.unsqueeze(-2)


def chunks(n: int, size: int):
    """Slices covering range(n) in blocks of ``size`` (bounds the per-entry temporaries' memory)."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def other_moments(kind: str, k: int, means, seconds, core_mean=None, core_second=None):
    """E[a_k] (n, R_k) and E[a_k a_kᵀ] (n, R_k, R_k) per entry, from the other modes' per-entry moments.

    ``means[j]`` (n, R_j) and ``seconds[j]`` (n, R_j, R_j) are mode j's posterior moments at each entry's
    coordinate (entry ``k`` is ignored and may be None); ``core_mean`` (R_1, ..., R_K) and ``core_second``
    (R_1, ..., R_K, R_1, ..., R_K) = E[W ⊗ W] for Tucker."""
    K = len(means)
    others = [j for j in range(K) if j != k]
    if kind == "cp":  # elementwise products over the other modes (K >= 2, so there is at least one)
        Ea, Eaa = means[others[0]], seconds[others[0]]
        for j in others[1:]:
            Ea = Ea * means[j]
            Eaa = Eaa * seconds[j]
        return Ea, Eaa
    rows = "".join(_row(j) for j in range(K))
    cols = "".join(_col(j) for j in range(K))
    Ea = torch.einsum(f"{rows},{','.join('z' + _row(j) for j in others)}->z{_row(k)}", core_mean,
                      *[means[j] for j in others])
    Eaa = torch.einsum(f"{rows}{cols},{','.join('z' + _row(j) + _col(j) for j in others)}->z{_row(k)}{_col(k)}",
                       core_second, *[seconds[j] for j in others])
    return Ea, Eaa


def entry_moments(kind: str, means, seconds, core_mean=None, core_second=None):
    """E[f_n] and E[f_n²] per entry (n,)."""
    K = len(means)
    if kind == "cp":
        m, S = means[0], seconds[0]
        for j in range(1, K):
            m, S = m * means[j], S * seconds[j]
        return m.sum(-1), S.sum((-1, -2))
    rows = "".join(_row(j) for j in range(K))
    cols = "".join(_col(j) for j in range(K))
    Ef = torch.einsum(f"{rows},{','.join('z' + _row(j) for j in range(K))}->z", core_mean, *means)
    Ef2 = torch.einsum(f"{rows}{cols},{','.join('z' + _row(j) + _col(j) for j in range(K))}->z", core_second,
                       *seconds)
    return Ef, Ef2


def core_statistics(means, seconds, y):
    """Σ_n ⊗_k E[u_k uᵀ_k] as a (R_1..R_K, R_1..R_K) tensor and Σ_n y_n ⊗_k E[u_k] (R_1..R_K): the
    natural parameters of q(W) (times E[τ]) from one chunk of entries."""
    K = len(means)
    rows = "".join(_row(j) for j in range(K))
    cols = "".join(_col(j) for j in range(K))
    precision = torch.einsum(f"{','.join('z' + _row(j) + _col(j) for j in range(K))}->{rows}{cols}", *seconds)
    shift = torch.einsum(f"z,{','.join('z' + _row(j) for j in range(K))}->{rows}", y, *means)
    return precision, shift


def aggregate(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Sum per-entry values (n, ...) into per-coordinate totals (size, ...) by ``index`` (n,)."""
    return values.new_zeros((size, *values.shape[1:])).index_add_(0, index, values)
