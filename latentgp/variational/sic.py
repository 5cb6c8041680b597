"""DKLGP variational family and its ELBO (Cao, Kang, Jimenez, Sang, Schäfer, Katzfuss 2023).

Prior approximation ("first KL"): p̂(f) = N(μ, (Û Ûᵀ)⁻¹), Û the KL-optimal sparse inverse-Cholesky
factor of K on the SIC pattern (:mod:`latentgp.linalg.sic`). Posterior family ("second KL"):
q(f) = N(ν, (V Vᵀ)⁻¹) with V upper triangular on the *same* pattern. The ELBO is
E_q log p(y | f) − KL(q ‖ p̂), and with Σ_q = V⁻ᵀV⁻¹ the KL splits over columns i:

    KL(q ‖ p̂) = Σ_i [ log V_ii − log Û_ii + ½ ‖V⁻¹ Û e_i‖² + ½ (Û e_iᵀ (ν − μ))² − ½ ],

while the expected log-likelihood needs only q's marginals N(ν_i, ‖V⁻¹ e_i‖²). Each column term
involves V⁻¹ applied to a vector supported on i's conditioning set; an upper-triangular solve started
there only visits i's ancestors (points it conditions on, recursively), so a minibatch of columns needs
a sparse solve on the ancestor closure of the minibatch only. Summing the column terms over a block of
a fixed partition and multiplying by the number of blocks is an unbiased ELBO estimate.
:func:`elbo_terms` computes these terms exactly (|A| × 2B solve: evaluation, L-BFGS, tests);
:func:`sampled_elbo_terms` estimates them unbiasedly from draws of q on A (|A| × n_samples: training steps).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..linalg.kronecker import pcg
from ..linalg.sic import (
    SparseInverseCholesky,
    ancestor_closure,
    pattern_mask,
    transposed_solve,
    triangular_structure,
    upper_solve,
)

_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(40)  # ∫ g(x) N(x; 0, 1) dx ≈ Σ w g(x) / √(2π)
_GH_W = _GH_W / _GH_W.sum()


# ------------------------------------------------------------------------------- likelihoods
class SICLikelihood(torch.nn.Module):
    """Observation model p(y | f): ``log_prob`` plus E_{N(f; m, v)} log p(y | f) by Gauss–Hermite."""

    name = "likelihood"

    def log_prob(self, y, f):
        raise NotImplementedError

    def expected_log_prob(self, y, mean, var):
        x = torch.as_tensor(_GH_X, dtype=mean.dtype)
        w = torch.as_tensor(_GH_W, dtype=mean.dtype)
        f = mean.unsqueeze(-1) + var.clamp_min(0).sqrt().unsqueeze(-1) * x
        return (self.log_prob(y.unsqueeze(-1), f) * w).sum(-1)

    def check(self, y: np.ndarray) -> None:
        """Raise ValueError naming ``y`` if values are outside the support."""

    def record(self) -> dict:
        return {}


class GaussianLikelihood(SICLikelihood):
    """y ~ N(f, noise); expectation in closed form. ``noise=None``: learned (softplus)."""

    name = "gaussian"

    def __init__(self, noise: float | None = None):
        super().__init__()
        if noise is None:
            self.raw_noise = torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))
        else:
            self.register_buffer("fixed_noise", torch.tensor(float(noise), dtype=torch.float64))

    @property
    def noise(self):
        return self.fixed_noise if hasattr(self, "fixed_noise") else F.softplus(self.raw_noise) + 1e-8

    def log_prob(self, y, f):
        return -0.5 * ((y - f) ** 2 / self.noise + torch.log(2 * math.pi * self.noise))

    def expected_log_prob(self, y, mean, var):
        return -0.5 * (((y - mean) ** 2 + var) / self.noise + torch.log(2 * math.pi * self.noise))

    def quadrature_log_prob(self, y, mean, var):
        """The Gauss–Hermite value (tests compare it with the closed form)."""
        return SICLikelihood.expected_log_prob(self, y, mean, var)

    def record(self):
        return {"noise": float(self.noise.detach())}


class BernoulliLikelihood(SICLikelihood):
    """y ∈ {0, 1}, P(y = 1 | f) = sigmoid(f)."""

    name = "bernoulli"

    def log_prob(self, y, f):
        return y * f - F.softplus(f)

    def check(self, y):
        if not np.isin(y, (0, 1)).all():
            raise ValueError("`y` must contain only 0 and 1 for a Bernoulli likelihood.")


class PoissonLikelihood(SICLikelihood):
    """y ~ Poisson(exp(f))."""

    name = "poisson"

    def log_prob(self, y, f):
        return y * f - torch.exp(f) - torch.lgamma(y + 1)

    def check(self, y):
        if (y < 0).any() or (np.floor(y) != y).any():
            raise ValueError("`y` must be non-negative integers for a Poisson likelihood.")


class StudentTLikelihood(SICLikelihood):
    """y ~ StudentT(df, loc=f, scale); scale learned, ``df`` fixed (default 4)."""

    name = "student_t"

    def __init__(self, df: float = 4.0):
        super().__init__()
        self.df = float(df)
        self.raw_scale = torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))

    @property
    def scale(self):
        return F.softplus(self.raw_scale) + 1e-8

    def log_prob(self, y, f):
        return torch.distributions.StudentT(self.df, f, self.scale).log_prob(y)

    def record(self):
        return {"scale": float(self.scale.detach())}


LIKELIHOODS = {"gaussian": GaussianLikelihood, "bernoulli": BernoulliLikelihood, "poisson": PoissonLikelihood,
               "student_t": StudentTLikelihood}


def get_likelihood(likelihood, noise) -> SICLikelihood:
    if isinstance(likelihood, SICLikelihood):
        if noise is not None:
            raise ValueError("`noise` cannot be combined with a likelihood instance; set it on the instance.")
        return likelihood
    name = "gaussian" if likelihood is None else likelihood
    if name not in LIKELIHOODS:
        raise ValueError(f"`likelihood` must be one of {sorted(LIKELIHOODS)} or a SICLikelihood; got {likelihood!r}.")
    if noise is not None and name != "gaussian":
        raise ValueError("`noise` applies only to the Gaussian likelihood.")
    return GaussianLikelihood(noise) if name == "gaussian" else LIKELIHOODS[name]()


# --------------------------------------------------------------------------- variational family
class SICVariational(torch.nn.Module):
    """q(f) = N(ν, (V Vᵀ)⁻¹): ``nu`` (n, 1) and ``raw`` (n, M) with slot 0 = log V_ii.

    A minibatch step reads only the rows of its ancestor closure (as leaf tensors, see
    :func:`sampled_elbo_terms`), so its gradient and its :class:`RowAdam` update touch only those rows."""

    def __init__(self, pattern: np.ndarray, values: torch.Tensor, mean: torch.Tensor):
        super().__init__()
        self.register_buffer("pattern", torch.as_tensor(pattern, dtype=torch.long))
        self.register_buffer("mask", pattern_mask(self.pattern))
        raw = values.detach().clone()
        raw[:, 0] = torch.log(values[:, 0].detach())
        self.raw = torch.nn.Parameter(raw)
        self.nu = torch.nn.Parameter(mean.detach().clone().reshape(-1, 1))

    def values(self, rows: torch.Tensor, sparse: bool = False) -> torch.Tensor:
        return self.transform(F.embedding(rows, self.raw, sparse=sparse), rows)

    def transform(self, raw_rows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """V's column values from the unconstrained ``raw_rows`` = raw[rows] (slot 0 = log V_ii)."""
        return torch.cat([torch.exp(raw_rows[:, :1]), raw_rows[:, 1:]], dim=1) * self.mask.index_select(0, rows)

    def mean(self, rows: torch.Tensor, sparse: bool = False) -> torch.Tensor:
        return F.embedding(rows, self.nu, sparse=sparse)[..., 0]


def local_system(pattern: np.ndarray, batch: np.ndarray):
    """Ancestor closure A of ``batch`` (sorted), the pattern in A's local numbering, and a map
    ``local(idx)`` from global indices in A to local ones (binary search: nothing of size n per call)."""
    A = ancestor_closure(pattern, batch)

    def local(idx):
        return np.searchsorted(A, idx)
    return A, torch.as_tensor(local(pattern[A])), local


class BlockSystem(NamedTuple):
    """What a minibatch step on one block needs, computed once per block (see :func:`block_system`)."""

    rows: torch.Tensor           # (|A|,) global indices of the block's ancestor closure A
    local_pattern: torch.Tensor  # (|A|, M) the pattern restricted to A, in A's numbering
    batch_local: torch.Tensor    # (B,) positions of the block's points in A
    structure: tuple             # triangular_structure(local_pattern): sparse index arrays for the solves
    mean_rows: torch.Tensor      # positions in A of the rows whose mean ν the block's terms read


def block_system(pattern: np.ndarray, batch: np.ndarray) -> BlockSystem:
    A, local_pattern, local = local_system(pattern, batch)
    pos = torch.as_tensor(local(np.asarray(batch)))
    return BlockSystem(torch.as_tensor(A), local_pattern, pos, triangular_structure(local_pattern.numpy()),
                       torch.unique(local_pattern[pos]))


def solve_batch_columns(q: SICVariational, pattern: np.ndarray, cols_idx: torch.Tensor, cols_val: torch.Tensor,
                        sparse: bool = False) -> torch.Tensor:
    """V⁻¹ c_j for sparse vectors c_j = Σ_k cols_val[j, k] e_{cols_idx[j, k]} (j = 0..B-1).

    Returns the (|A|, B) solution on the ancestor closure A (zero elsewhere), differentiable in V, c."""
    idx = cols_idx.numpy()
    A, local_pattern, local = local_system(pattern, np.unique(idx))
    rows = torch.as_tensor(A)
    B = cols_idx.shape[0]
    where = torch.as_tensor(local(idx))
    rhs = torch.zeros(A.size, B, dtype=cols_val.dtype).index_put(
        (where.reshape(-1), torch.arange(B).repeat_interleave(idx.shape[1])), cols_val.reshape(-1), accumulate=True)
    return upper_solve(q.values(rows, sparse), local_pattern, rhs)


def elbo_terms(q: SICVariational, pattern: np.ndarray, batch: np.ndarray, U_batch: torch.Tensor,
               prior_mean: torch.Tensor, y_batch: torch.Tensor, likelihood: SICLikelihood, sparse: bool = False):
    """Per-column (expected log-likelihood, KL_i) for the columns ``batch`` (sum of KL_i = KL(q ‖ p̂)).

    ``U_batch`` (B, M): Û's columns for ``batch`` on ``pattern[batch]`` (slot 0 = diagonal)."""
    B = len(batch)
    P_b = torch.as_tensor(pattern[batch])
    own = P_b[:, :1]
    # Right-hand sides: e_i (marginal variances) and Û e_i (trace term), solved together.
    cols_idx = torch.cat([own.expand_as(P_b), P_b], 0)
    unit = torch.zeros_like(U_batch)
    unit[:, 0] = 1.0
    X = solve_batch_columns(q, pattern, cols_idx, torch.cat([unit, U_batch], 0), sparse)
    var = (X[:, :B] ** 2).sum(0)
    trace = (X[:, B:] ** 2).sum(0)
    nu_s = q.mean(P_b, sparse)
    quad = (U_batch * (nu_s - prior_mean)).sum(1) ** 2
    log_v = F.embedding(own[:, 0], q.raw, sparse=sparse)[:, 0]
    kl = log_v - torch.log(U_batch[:, 0]) + 0.5 * trace + 0.5 * quad - 0.5
    ell = likelihood.expected_log_prob(y_batch, nu_s[:, 0], var)
    return ell, kl, var


def sampled_elbo_terms(q: SICVariational, system: BlockSystem, U_batch: torch.Tensor, prior_mean: torch.Tensor,
                       y_batch: torch.Tensor, likelihood: SICLikelihood, n_samples: int = 16,
                       eps: torch.Tensor | None = None, sparse: bool = False, local=None):
    """Unbiased per-column estimates of (expected log-likelihood, KL_i) whose cost is |A| · M · n_samples.

    The exact terms need V⁻¹ e_i and V⁻¹ Û e_i for every column of the batch: |A| × 2B work. Instead draw
    g = V⁻ᵀ ε ~ N(0, Σ_q) on the closure A (one sparse forward substitution for all columns; ε ~ N(0, I),
    antithetic pairs ±ε so that terms linear in ε cancel exactly). Since (Vᵀ g)_i = ε_i, given its
    neighbours' values g_i ~ N(m_i, v_i) with m_i = -Σ_{j∈c(i)} V_ji g_j / V_ii and v_i = V_ii⁻²; averaging
    that conditional analytically (Rao–Blackwell) gives, unbiasedly,
        Var_q f_i = ‖V⁻¹e_i‖² ≈ v_i + mean_s m_i²,
        ‖V⁻¹ Û e_i‖² = E (gᵀ Û e_i)² ≈ mean_s (Û_ii m_i + Σ_{j∈c(i)} Û_ji g_j)² + Û_ii² v_i,
        E_q log p(y_i | f_i) ≈ mean_s E_{N(f; ν_i + m_i, v_i)} log p(y_i | f)   (closed form / Gauss–Hermite).
    ``eps`` (|A|, S) overrides the draws: with ε = √|A| [I, -I] the averages equal the exact expectations
    (tests use this to check the estimator against :func:`elbo_terms` to rounding error).
    ``local=(raw_A, nu_A)``: use these tensors as q's rows on A (q.raw[A], q.nu[A]) instead of reading q, so
    that gradients land in |A|-sized leaves (:class:`RowAdam` then updates only those rows)."""
    A, LP, pos, structure = system.rows, system.local_pattern, system.batch_local, system.structure
    vals = q.values(A, sparse) if local is None else q.transform(local[0], A)
    if eps is None:
        # The solve is linear, so V⁻ᵀ[ε, -ε] = [g, -g]: solving for half the draws halves the |A|-sized work
        # (forward and backward); only the B-sized terms below see all S columns.
        # Standard normals drawn in single precision (5x faster than double in torch; a 1e-7 relative rounding
        # of a draw is immaterial to a Monte Carlo average, and the antithetic pairs stay exact).
        eps_half = torch.randn(len(A), max(1, (n_samples + 1) // 2), dtype=torch.float32).to(vals.dtype)
        half = transposed_solve(vals, LP, eps_half, structure)
        g = torch.cat([half, -half], 1)
    else:
        g = transposed_solve(vals, LP, eps, structure)  # (|A|, S) centred draws of f_A under q
    Vb, Pb = vals[pos], LP[pos]                     # (B, M): the batch's columns of V, local rows
    g_nb = g[Pb[:, 1:]]                             # (B, M-1, S) the neighbours' draws (padding × 0)
    v_ii = Vb[:, 0]
    m = -(Vb[:, 1:, None] * g_nb).sum(1) / v_ii[:, None]
    v = v_ii ** -2
    a = (U_batch[:, 1:, None] * g_nb).sum(1)
    trace = ((U_batch[:, :1] * m + a) ** 2).mean(1) + U_batch[:, 0] ** 2 * v
    nu_s = q.mean(A[Pb], sparse) if local is None else local[1][Pb, 0]
    quad = (U_batch * (nu_s - prior_mean)).sum(1) ** 2
    kl = torch.log(v_ii) - torch.log(U_batch[:, 0]) + 0.5 * trace + 0.5 * quad - 0.5
    ell = likelihood.expected_log_prob(y_batch[:, None], nu_s[:, :1] + m, v[:, None]).mean(1)
    return ell, kl


def local_posterior_columns(U_values: torch.Tensor, precision) -> torch.Tensor:
    """Columns of a sparse inverse-Cholesky factor of the Gaussian-likelihood posterior, on Û's pattern.

    Column i of Û is K_s⁻¹e₁/√(K_s⁻¹)₁₁ for i's conditioning set s. Replacing K_s by the posterior covariance
    of f_s given the observations at s, (K_s⁻¹ + precision·I)⁻¹, gives the column Q e₁/√Q₁₁ with
    Q = K_s⁻¹ + precision·I; since Q e₁ = Û_ii Û e_i + precision e₁, that is
    (Û_ii Û e_i + precision e₁) / √(Û_ii² + precision) -- O(n·M), no new factorisation. It ignores the data
    outside each neighbourhood, so it is a starting point for q's V (and a preconditioner for the mean's
    linear system, :func:`gaussian_optimal_mean`), not the ELBO optimum."""
    d = U_values[:, :1]
    out = d * U_values
    out[:, 0] += precision
    return out / torch.sqrt(d ** 2 + precision)


def gaussian_optimal_mean(U_values: torch.Tensor, pattern: torch.Tensor, prior_mean, y: torch.Tensor,
                          precision, x0: torch.Tensor | None = None, tol: float = 1e-8, max_iter: int = 2000,
                          precondition=None, structure=None):
    """The mean ν maximising the ELBO for a Gaussian likelihood, given V and the hyperparameters.

    ν enters the ELBO only through -precision/2 Σ_i (y_i - ν_i)² - ½ (ν - μ)ᵀ Û Ûᵀ (ν - μ) (``precision`` =
    κ / noise), so ν* solves the sparse SPD system (Û Ûᵀ + precision·I)(ν - μ) = precision·(y - μ) -- it does
    not depend on V. Solved by conjugate gradients, each iteration two O(n·M) products with Û and two sparse
    triangular solves with the preconditioner W Wᵀ ≈ Û Ûᵀ + precision·I (W from
    :func:`local_posterior_columns`; at n = 1e5, ℓ = 0.02 this took 16-180 iterations to a 1e-6 residual, where
    a Jacobi preconditioner had not reached it after 2,000).
    ``precondition``: override, a callable r -> M⁻¹ r; ``structure``: :func:`triangular_structure` of
    ``pattern`` if already computed. ``x0``: a starting guess for ν (warm start). ``tol``: residual relative to
    the right-hand side. Returns (ν, number of iterations); raises if ``max_iter`` iterations do not reach ``tol``
    (:func:`latentgp.linalg.kronecker.pcg`)."""
    with torch.no_grad():
        P = torch.as_tensor(pattern, dtype=torch.long)
        prior_precision = SparseInverseCholesky(U_values, P)

        def apply(x):  # (Û Ûᵀ + precision I) x, x (n, k)
            return prior_precision.inverse_covariance_matmul(x) + precision * x

        if precondition is None:  # (W Wᵀ)⁻¹ with W = local_posterior_columns: two sparse triangular solves
            W = local_posterior_columns(U_values, precision)
            structure = triangular_structure(P.numpy()) if structure is None else structure

            def precondition(r):
                return transposed_solve(W, P, upper_solve(W, P, r, structure), structure)
        b = precision * (y - prior_mean)
        if not bool(b.any()):  # y = μ everywhere: ν = μ exactly (a relative tolerance of a zero b is zero)
            return torch.zeros_like(y) + prior_mean, 0
        x = torch.zeros_like(y) if x0 is None else x0 - prior_mean
        r = b - apply(x[:, None])[:, 0]
        target = tol * b.norm()
        if not bool(r.norm() > target):  # the warm start is already there
            return x + prior_mean, 0
        # CG on the correction from the warm start; pcg's tolerance is relative to its right-hand side r
        dx, it = pcg(apply, r[:, None], precondition, tol=float(target / r.norm()), max_iter=max_iter)
        return x + dx[:, 0] + prior_mean, it


class RowAdam:
    """Adam on selected rows of (n, ·) parameters: each step reads and writes only the given rows' values and
    moments, so its cost is the number of rows touched, not n (a dense Adam over the n × M variational
    parameters is O(n) per step even though a minibatch's gradient lives on its ancestor closure only).

    Same update as ``torch.optim.SparseAdam`` (moments of untouched rows unchanged; bias correction with the
    global step count), without building, coalescing and masking sparse gradient tensors."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps = list(params), lr, betas, eps
        # both moments of a row side by side: one gather and one scatter per parameter and step
        self.state = [torch.zeros((2,) + p.shape, dtype=p.dtype) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self, rows, grads):
        """``rows[j]`` (unique indices) and ``grads[j]`` (len(rows[j]), ·) for parameter j (None: skip)."""
        self.t += 1
        b1, b2 = self.betas
        step = self.lr * math.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        for p, state, r, g in zip(self.params, self.state, rows, grads, strict=True):
            if g is None:
                continue
            s = state.index_select(1, r)
            m, v = s[0], s[1]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            state.index_copy_(1, r, s)
            p.index_copy_(0, r, p.index_select(0, r).addcdiv_(m, v.sqrt().add_(self.eps), value=-step))


def marginals(q: SICVariational, pattern: np.ndarray, idx: np.ndarray, chunk: int = 512):
    """q's marginal means and variances at training points ``idx`` (no gradient)."""
    means, variances = [], []
    with torch.no_grad():
        for s in range(0, len(idx), chunk):
            part = torch.as_tensor(idx[s:s + chunk])
            X = solve_batch_columns(q, pattern, part[:, None], torch.ones(len(part), 1, dtype=q.raw.dtype))
            means.append(q.mean(part))
            variances.append((X ** 2).sum(0))
    return torch.cat(means), torch.cat(variances)
