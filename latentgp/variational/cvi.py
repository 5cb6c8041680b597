"""Conjugate-computation VI (Khan & Lin 2017) for latent GPs in state-space form.

The approximate posterior is the prior times Gaussian *sites* on the latent values f_t (L-vectors):
t_t(f_t) ∝ exp(h_tᵀ f_t - ½ f_tᵀ Λ_t f_t). A site is a Gaussian pseudo-observation ỹ_t = Λ_t⁻¹ h_t
with noise covariance Λ_t⁻¹, so q is computed by one Kalman smoothing pass, and

    ELBO = log Z(sites) + Σ_t E_q[log p(y_t | f_t)] - Σ_t E_q[log t_t(f_t)],

with log Z the Kalman log-likelihood of the pseudo-observations (q = p · Π t / Z). The CVI step is a
damped natural-gradient step on the sites: with η = C f + d and the likelihood's expected
derivatives g1 = E[∂η log p], g2 = E[∂²η log p] (Bonnet / Price),

    Λ_new = -Cᵀ diag(g2) C,    h_new = Cᵀ g1 + Λ_new m,
    (Λ, h) ← (1 - β)(Λ, h) + β (Λ_new, h_new).

For a Gaussian likelihood and β = 1 one step gives the exact posterior.
"""
from __future__ import annotations

import math

import torch

from ..linalg.kalman import kalman_smoother


def block_diag_batch(X: torch.Tensor) -> torch.Tensor:
    """(..., L, r, c) -> (..., L*r, L*c) block-diagonal, batched (no Python loop)."""
    L, r, c = X.shape[-3:]
    eye = torch.eye(L, dtype=X.dtype)
    return torch.einsum("...lij,lk->...likj", X, eye).reshape(*X.shape[:-3], L * r, L * c)


def joint_state_space(form, dt: torch.Tensor):
    """Stack L independent latents' state spaces (kernel batch_shape (L,)) into one joint state.

    Returns A, Q (T, L*s, L*s), P0 (L*s, L*s) and H (L, L*s) selecting each latent's value.
    """
    return stack_latents(*form.discretise(dt), form.P_inf, form.H)


def stack_latents(A, Q, P0, H):
    """:func:`joint_state_space` from the per-latent A, Q (L, T, s, s), P0 (L, s, s) and H (L, s)."""
    if A.dim() == 3:  # an unbatched kernel has no latent axis to stack
        raise ValueError("joint_state_space needs a kernel with batch_shape (n_latents,).")
    A = block_diag_batch(A.transpose(0, 1))  # (L, T, s, s) -> (T, L*s, L*s)
    Q = block_diag_batch(Q.transpose(0, 1))
    P0 = block_diag_batch(P0)
    H = block_diag_batch(H.unsqueeze(-2))  # (L, 1, s) -> (L, L*s)
    return A, Q, P0, H


class Sites:
    """Natural parameters (Λ: (..., T, L, L), h: (..., T, L)) of the Gaussian sites."""

    def __init__(self, precision: torch.Tensor, shift: torch.Tensor):
        self.precision, self.shift = precision, shift

    @classmethod
    def zeros(cls, batch, T, L, dtype):
        return cls(torch.zeros(*batch, T, L, L, dtype=dtype), torch.zeros(*batch, T, L, dtype=dtype))

    def pseudo_observations(self, jitter: float = 1e-9):
        """(ỹ, R̃) = (Λ⁻¹h, Λ⁻¹); steps with no information (Λ = 0) are masked out.

        Sites that are numerically singular get ``jitter`` x their own scale on the diagonal (only
        if the plain factorisation fails)."""
        L = self.precision.shape[-1]
        scale = self.precision.diagonal(dim1=-2, dim2=-1).abs().amax(-1)
        mask = scale > 0
        eye = torch.eye(L, dtype=self.precision.dtype)
        # Steps without information get an identity placeholder that the mask removes.
        P = torch.where(mask[..., None, None], self.precision, eye)
        chol, info = torch.linalg.cholesky_ex(P)
        if bool((info > 0).any()):
            chol = torch.linalg.cholesky(P + jitter * scale.clamp_min(1e-300)[..., None, None] * eye)
        y = torch.cholesky_solve(self.shift.unsqueeze(-1), chol).squeeze(-1)
        R = torch.cholesky_inverse(chol)
        return y, R, mask

    def square_root_observations(self, rtol: float = 1e-12):
        """(z, G) with observations z_t = G_t f_t + e_t, e_t ~ N(0, I), equivalent to the sites
        (G_tᵀ G_t = Λ_t, G_tᵀ z_t = h_t) and exact for rank-deficient Λ_t: from Λ = V D Vᵀ, G = D^½ Vᵀ
        and directions with D below ``rtol`` x the largest give zero rows (no information) instead of
        the jitter :meth:`pseudo_observations` needs. Assumes h_t lies in the range of Λ_t, as it does
        for sums of rank-one messages τ a aᵀ, τ y a."""
        evals, evecs = torch.linalg.eigh(self.precision)
        keep = evals > rtol * evals.amax(-1, keepdim=True).clamp_min(torch.finfo(evals.dtype).tiny)
        root = torch.where(keep, evals.clamp_min(0).sqrt(), torch.zeros_like(evals))
        G = root.unsqueeze(-1) * evecs.transpose(-1, -2)
        proj = (evecs.transpose(-1, -2) @ self.shift.unsqueeze(-1)).squeeze(-1)
        z = torch.where(keep, proj / torch.where(keep, root, torch.ones_like(root)), torch.zeros_like(proj))
        return z, G

    def damped(self, precision_new, shift_new, step: float) -> Sites:
        return Sites((1 - step) * self.precision + step * precision_new, (1 - step) * self.shift + step * shift_new)


def latent_marginals(means, covs, H):
    """Posterior mean (..., T, L) and covariance (..., T, L, L) of the latent values f_t = H x_t."""
    return means @ H.T, H @ covs @ H.T


def expected_loglik(likelihood, y, m_f, V_f, C, d):
    """E_q[log p(y | C f + d)] elementwise (..., T, D) plus the expected derivatives in η."""
    mu = m_f @ C + d
    var = torch.einsum("ld,...lk,kd->...d", C, V_f, C)
    return likelihood.expected(y, mu, var)


def site_targets(g1, g2, m_f, C):
    """Undamped CVI site parameters (Λ_new, h_new) from the expected derivatives."""
    precision = -torch.einsum("ld,...d,kd->...lk", C, g2, C)
    shift = torch.einsum("ld,...d->...l", C, g1) + (precision @ m_f.unsqueeze(-1)).squeeze(-1)
    return precision, shift


def site_expected_log(sites: Sites, y_site, R_site, mask, m_f, V_f):
    """Σ_t E_q[log N(ỹ_t; f_t, R̃_t)] over observed sites (..., summed over time)."""
    Lam = sites.precision
    r = (y_site - m_f).unsqueeze(-1)
    quad = (r.transpose(-1, -2) @ Lam @ r).squeeze(-1).squeeze(-1)
    trace = (Lam * V_f).sum((-1, -2))
    L = m_f.shape[-1]
    logdet_R = torch.linalg.slogdet(R_site)[1]
    per_step = -0.5 * (quad + trace + logdet_R + L * math.log(2 * math.pi))
    return torch.where(mask, per_step, torch.zeros_like(per_step)).sum(-1)


def site_posterior(A, Q, P0, H, sites: Sites, *, square_root: bool = False, engine: str = "scan"):
    """q = prior x sites by one Kalman smoothing pass: returns the pseudo-observations (ỹ, R̃, mask),
    the joint-state smoother result and the latent marginals m_f (..., T, L), V_f (..., T, L, L).

    ``square_root``: smooth the exact :meth:`Sites.square_root_observations` instead (for sites that
    may be rank-deficient); the smoother's log-likelihood is then not log Z and the first item is None.
    ``engine``: passed to :func:`~latentgp.linalg.kalman.kalman_smoother` ("auto" for no-gradient callers)."""
    if square_root:
        z, G = sites.square_root_observations()
        eye = torch.eye(z.shape[-1], dtype=z.dtype)
        sm = kalman_smoother(A, Q, G @ H, eye.expand(*G.shape), z, P0, engine=engine)
        pseudo = None
    else:
        pseudo = sites.pseudo_observations()
        sm = kalman_smoother(A, Q, H, pseudo[1], pseudo[0], P0, mask=pseudo[2], engine=engine)
    m_f, V_f = latent_marginals(sm.means, sm.covs, H)
    return pseudo, sm, m_f, V_f


def elbo_terms(A, Q, P0, H, sites: Sites, likelihood, y, C, d, *, return_smoother: bool = False):
    """ELBO pieces for fixed sites; differentiable in A, Q, P0 (hyperparameters), C and d.

    Returns (elbo (scalar, summed over the batch), m_f, V_f), plus the joint-state
    :class:`~latentgp.linalg.kalman.SmootherResult` if ``return_smoother``.
    """
    (y_site, R_site, mask), sm, m_f, V_f = site_posterior(A, Q, P0, H, sites)
    loglik, _, _ = expected_loglik(likelihood, y, m_f, V_f, C, d)
    elbo = sm.log_likelihood.sum() + loglik.sum() - site_expected_log(sites, y_site, R_site, mask, m_f, V_f).sum()
    return (elbo, m_f, V_f, sm) if return_smoother else (elbo, m_f, V_f)


def latent_blocks(sm, n_latents: int):
    """Per-latent diagonal blocks of a joint-state posterior (the prior is block-diagonal, so its
    expected log density needs only these): means (..., L, T, s), covs (..., L, T, s, s) and
    cross-covariances Cov(x_{t+1}, x_t) (..., L, T-1, s, s)."""
    L = n_latents

    def diag_blocks(X):  # (..., T, L*s, L*s) -> (..., L, T, s, s)
        *lead, T, S, _ = X.shape
        blocks = X.reshape(*lead, T, L, S // L, L, S // L).diagonal(dim1=-4, dim2=-2)  # (..., T, s, s, L)
        return blocks.movedim(-1, -4)

    *lead, T, S = sm.means.shape
    means = sm.means.reshape(*lead, T, L, S // L).movedim(-2, -3)
    return means, diag_blocks(sm.covs), diag_blocks(sm.cross_covs)


def expected_log_prior(form, dt: torch.Tensor, means, covs, cross):
    """E_q[log p_θ(x)] of independent state-space priors under a Gaussian Markov q, summed.

    ``form``: the kernels' :class:`~latentgp.kernels.state_space.StateSpaceForm` (batch (L,)); ``means``
    (..., L, T, s), ``covs`` (..., L, T, s, s), ``cross`` (..., L, T-1, s, s) = Cov_q(x_{t+1}, x_t) (see
    :func:`latent_blocks`). Differentiable in the hyperparameters only through A, Q, P0: with q held
    fixed this is the variational-EM objective for θ, whose gradient equals the ELBO's total gradient
    wherever the sites are at their optimum (envelope theorem), without back-propagating through the
    Kalman smoother. Uses E[(x_t - A x_{t-1})(·)ᵀ] = r rᵀ + P_t - A Cᵀ - C Aᵀ + A P_{t-1} Aᵀ with
    r = m_t - A m_{t-1} and C = Cov(x_t, x_{t-1}).
    """
    return expected_log_priors([(*form.discretise(dt), form.P_inf)], [(means, covs, cross)])


def expected_log_priors(priors, blocks, weights=None):
    """Σ_k w_k E_q[log p_θk(x_k)] over independent chains k (e.g. FunBaT's modes), each as in
    :func:`expected_log_prior`, with ``priors[k]`` = (A, Q, P0) = (``form.discretise(dt)``, ``form.P_inf``)
    and ``blocks[k]`` = (means, covs, cross); ``weights`` default 1. Chains whose blocks share their
    leading shape and state size are evaluated as one batch (their transitions concatenated along
    time): the cost of this objective and of its backward pass is the number of calls, not the arithmetic."""
    weights = [1.0] * len(priors) if weights is None else list(weights)
    shapes = {(b[0].shape[:-2], b[0].shape[-1]) for b in blocks}
    if len(shapes) > 1:  # chains of different shapes: one evaluation each
        return sum(expected_log_priors([p], [b], [w]) for p, b, w in zip(priors, blocks, weights, strict=True))

    def cat(parts, axis):  # the chains' transitions, joined along the time axis
        return parts[0] if len(parts) == 1 else torch.cat(parts, axis)

    mats = [(A[..., 1:, :, :], Q[..., 1:, :, :], covs[..., :-1, :, :], covs[..., 1:, :, :], cross)
            for (A, Q, _), (_, covs, cross) in zip(priors, blocks, strict=True)]
    A, Q, c_prev, c_next, cross = (cat(list(parts), -3) for parts in zip(*mats, strict=True))
    m_prev = cat([b[0][..., :-1, :] for b in blocks], -2)
    m_next = cat([b[0][..., 1:, :] for b in blocks], -2)
    dtype = m_prev.dtype
    w_t = cat([torch.full((b[0].shape[-2] - 1,), w, dtype=dtype) for b, w in zip(blocks, weights, strict=True)], -1)
    s = m_prev.shape[-1]
    r = m_next - (A @ m_prev.unsqueeze(-1)).squeeze(-1)
    AC = A @ cross.transpose(-1, -2)
    second = (r.unsqueeze(-1) * r.unsqueeze(-2) + c_next - AC - AC.transpose(-1, -2) + A @ c_prev @ A.transpose(-1, -2))
    P0 = torch.stack(torch.broadcast_tensors(*[p[2] for p in priors]))  # (K, L, s, s)
    # Q(dt) = P - A P Aᵀ -> 0 as dt -> 0 and loses its smallest eigenvalues to cancellation: jitter
    # relative to the chain's stationary covariance, escalated 1e-12 ... 1e-8 only as far as needed.
    # Jitter is a per-chain decision, so a batch that needs it is evaluated chain by chain instead.
    if len(priors) > 1:
        try:
            lt = trace_solve_logdet(Q, second)
        except torch.linalg.LinAlgError:
            return sum(expected_log_priors([p], [b], [w]) for p, b, w in zip(priors, blocks, weights, strict=True))
    else:
        scale = P0[0].diagonal(dim1=-2, dim2=-1).amax(-1)[..., None, None, None]
        lt = trace_solve_logdet(Q, second, jitter_scale=scale, what="State-space process noise Q")
    m0 = torch.stack([b[0][..., 0, :] for b in blocks])  # (K, ..., L, s): each chain's first state
    V0 = torch.stack([b[1][..., 0, :, :] for b in blocks])
    w0 = torch.tensor(weights, dtype=dtype)
    lead = m_prev.dim() - 3  # leading batch dims of the blocks, before (L, T, s)
    P0 = P0.reshape(P0.shape[:1] + (1,) * lead + P0.shape[1:])
    l0 = trace_solve_logdet(P0, V0 + m0.unsqueeze(-1) * m0.unsqueeze(-2), what="Stationary covariance P0")  # (K,...,L)
    n_chains = l0[0].numel()  # chains per form: leading batch x L
    const = sum(w * b[0].shape[-2] for w, b in zip(weights, blocks, strict=True)) * s * math.log(2 * math.pi) * n_chains
    w0 = w0.reshape((-1,) + (1,) * (l0.dim() - 1))
    return -0.5 * ((lt * w_t).sum() + (l0 * w0).sum() + const)


def trace_solve_logdet(M, S, jitter_scale=None, what: str = "The matrix"):
    """tr(M⁻¹ S) + log|M| for every symmetric positive-definite (s, s) M in a batch, broadcast against S.

    s <= 2 in closed form on the entries (the M-steps' Matérn-½ / -3/2 states: elementwise ops, whose
    backward is as cheap as their forward, instead of batched LAPACK calls on thousands of 2 x 2
    matrices), a Cholesky factor otherwise. If some M is not numerically positive definite and
    ``jitter_scale`` is given, ``rel * jitter_scale * I`` is added with rel = 1e-12, 1e-10, 1e-8, only as far
    as needed; otherwise (or if that fails) a LinAlgError naming ``what``."""
    s = M.shape[-1]
    eye = torch.eye(s, dtype=M.dtype, device=M.device)
    for rel in (0.0,) + ((1e-12, 1e-10, 1e-8) if jitter_scale is not None else ()):
        Mj = M if rel == 0.0 else M + rel * jitter_scale * eye
        if s == 1:
            m = Mj[..., 0, 0]
            if bool((m > 0).all()):
                return S[..., 0, 0] / m + m.log()
        elif s == 2:
            a, b, d = Mj[..., 0, 0], 0.5 * (Mj[..., 0, 1] + Mj[..., 1, 0]), Mj[..., 1, 1]
            det = a * d - b * b
            if bool(((a > 0) & (det > 0)).all()):
                return (d * S[..., 0, 0] - b * (S[..., 0, 1] + S[..., 1, 0]) + a * S[..., 1, 1]) / det + det.log()
        else:
            chol, info = torch.linalg.cholesky_ex(Mj)
            if not bool((info > 0).any()):
                quad = torch.cholesky_solve(S.expand(torch.broadcast_shapes(S.shape, Mj.shape)), chol)
                return quad.diagonal(dim1=-2, dim2=-1).sum(-1) + 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    extra = " even with jitter 1e-8" if jitter_scale is not None else ""
    raise torch.linalg.LinAlgError(f"{what} is not positive definite{extra}; check for (near-)duplicate time "
                                   "points or extreme lengthscales.")


def noise_factors(Q, P0):
    """chol(P0) at t = 0 and chol(Q_t) for t >= 1, stacked (T, S, S): the prior path is
    x_t = A_t x_{t-1} + factor_t ε_t. Q(0) is not used (it can be exactly singular over a zero step);
    later Q_t get a 1e-12 relative jitter, as a near-zero step makes them near-singular."""
    return torch.cat((torch.linalg.cholesky(P0).unsqueeze(0), process_noise_factors(Q[1:])), 0)


def process_noise_factors(Q):
    """chol(Q + 1e-12 x max diag(Q) x I) for a stack of process-noise covariances (..., S, S)."""
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype)
    jitter = 1e-12 * Q.diagonal(dim1=-2, dim2=-1).abs().amax(-1)[..., None, None] * eye + 1e-300 * eye
    return torch.linalg.cholesky(Q + jitter)


def sample_prior_states(A, Q, P0, batch, generator=None, noise=None):
    """Draws of the prior state path x_0..x_{T-1}, shape (*batch, T, S), by an associative scan of the
    affine maps x_t = A_t x_{t-1} + chol(Q_t) ε_t (no Python loop over time).

    ``noise``: the standard-normal ε, (*batch, T, S); drawn if None. The map ε -> x is linear and
    differentiable in A, Q, P0 (the whitened parametrisation of :mod:`latentgp.variational.whitened`)."""
    from ..linalg.scan import associative_scan

    T, S = A.shape[-3], A.shape[-1]
    if noise is None:
        eps = torch.randn(T, *batch, S, 1, dtype=A.dtype, generator=generator)
    else:
        eps = noise.movedim(-2, 0).unsqueeze(-1)
    b = noise_factors(Q, P0).reshape(T, *([1] * len(batch)), S, S) @ eps
    A_t = A.reshape(T, *([1] * len(batch)), S, S).expand(T, *batch, S, S)
    A_t = torch.cat((torch.zeros_like(A_t[:1]), A_t[1:]), 0)  # x_0 is drawn directly from P0

    def combine(earlier, later):
        (A1, b1), (A2, b2) = earlier, later
        return A2 @ A1, A2 @ b1 + b2

    _, x = associative_scan(combine, (A_t, b))
    return x.squeeze(-1).movedim(0, -2)


def sample_posterior_latents(A, Q, P0, H, sites: Sites, num_samples: int, generator=None):
    """Draws of f = H x from q by Matheron's rule: f_q = f_prior + E_q-smoother[ỹ - f_prior - e].

    Returns (num_samples, *sites batch, T, L). Used for the exact expected periodogram under q."""
    y_site, R_site, mask = sites.pseudo_observations()
    batch = (num_samples, *y_site.shape[:-2])
    x = sample_prior_states(A, Q, P0, batch, generator)
    f_prior = x @ H.T
    chol_R = torch.linalg.cholesky(R_site)
    e = (chol_R @ torch.randn(*batch, *y_site.shape[-2:], 1, dtype=A.dtype, generator=generator)).squeeze(-1)
    resid = torch.where(mask.unsqueeze(-1), y_site - f_prior - e, torch.zeros_like(f_prior))
    sm = kalman_smoother(A, Q, H, R_site, resid, P0, mask=mask)
    return f_prior + sm.means @ H.T
