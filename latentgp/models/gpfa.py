"""Gaussian-process factor analysis (GPFA; Yu et al. 2009, J. Neurophysiol. 102:614).

Model, per trial and bin t (all trials aligned and of equal length T):

    y_t = C x_t + d + e_t,   e_t ~ N(0, diag(R)),   y = sqrt(counts) (or the counts themselves)
    x_i(.) ~ GP(0, k_i),     k_i(t, t') = (1 - eps) exp(-(t - t')^2 / (2 tau_i^2)) + eps [t == t']

with eps = 1e-3 fixed: the GP signal variance is fixed to 1 so the scale of C is identified.

Fit by EM. Stack a trial's latents latent-major, xbar = (x_1(1..T), ..., x_p(1..T)), with block
diagonal prior Kbar = blkdiag(K_i). The likelihood contributes the precision M (x) I_T with
M = C' R^-1 C, so the exact posterior is

    Sigma = (Kbar^-1 + M (x) I_T)^-1 = L B^-1 L',   B = I + L' (M (x) I_T) L,   Kbar = L L',
    mu_n  = Sigma b_n,   b_n = vec over (latent, time) of C' R^-1 (y_t - d).

B has eigenvalues >= 1, so its Cholesky is well conditioned however smooth the K_i are. Sigma does
not depend on the counts: trials of equal length share one factorisation, and the per-trial means
are one batched product. The log marginal likelihood follows from the same factor (determinant
lemma + Woodbury), so EM needs no (qT x qT) matrix. The M-step for [C d] and R is the closed-form
factor-analysis update on the expected sufficient statistics; tau is improved by a few L-BFGS-B
steps (closed-form gradient) on the expected GP log prior -- a generalised EM step, accepted only if
it does not make that bound worse, so the marginal likelihood still never decreases.

Cost per EM iteration: O((pT)^3) for the shared posterior covariance plus O(N p T q) for the
means; memory O((pT)^2). Fine for trials of a few hundred bins; longer trials want a state-space
(Kalman) approximation instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..data import DEFAULT_DTYPE, check_int, check_positive
from ..fit import seeded, train
from ..io import register_model
from .base import Model

EPS = 1e-3  # GP "noise" fraction of Yu et al.: keeps every K_i well conditioned
_MIN_BINS = 3  # the timescale initialisation needs autocorrelations at lags >= 1


def se_kernels(tau: torch.Tensor, n_bins: int, eps: float = EPS) -> torch.Tensor:
    """(p, T, T) GPFA prior covariances for timescales ``tau`` (p,) in bins."""
    t = torch.arange(n_bins, dtype=tau.dtype)
    sq = (t[:, None] - t[None, :]) ** 2
    eye = torch.eye(n_bins, dtype=tau.dtype)
    return (1 - eps) * torch.exp(-sq / (2 * tau[:, None, None] ** 2)) + eps * eye


@dataclass
class Posterior:
    mean: torch.Tensor  # (N, p, T)
    cov: torch.Tensor  # (p T, p T), latent-major; shared by all trials
    lml: torch.Tensor  # total log marginal likelihood over trials


def e_step(Y: torch.Tensor, C, d, R, tau) -> Posterior:
    """Exact posterior of all latents of every trial of ``Y`` (N, T, q) and log p(Y)."""
    N, T, q = Y.shape
    p = C.shape[1]
    Lk = torch.linalg.cholesky(se_kernels(tau, T))  # (p, T, T)
    M = C.T @ (C / R[:, None])
    # L' (M (x) I) L in blocks: block (i, j) = M_ij L_i' L_j
    LtL = torch.einsum("ij,iat,jau->itju", M, Lk, Lk).reshape(p * T, p * T)
    B = torch.eye(p * T, dtype=Y.dtype) + LtL
    G = torch.linalg.cholesky(B)
    Lbar = torch.block_diag(*Lk)
    W = torch.linalg.solve_triangular(G, Lbar.T, upper=False)  # G^-1 L'
    cov = W.T @ W
    resid = Y - d
    b = ((resid / R) @ C).transpose(1, 2).reshape(N, p * T)  # latent-major
    mean = b @ cov  # cov is symmetric
    logdet = T * torch.log(R).sum() + 2 * torch.log(torch.diagonal(G)).sum()
    quad = (resid**2 / R).sum() - (b * mean).sum()
    lml = -0.5 * (N * (q * T * math.log(2 * math.pi) + logdet) + quad)
    return Posterior(mean.reshape(N, p, T), cov, lml)


def _time_blocks(cov: torch.Tensor, p: int, T: int) -> torch.Tensor:
    """(T, p, p) cross-latent posterior covariances at equal times."""
    return torch.diagonal(cov.reshape(p, T, p, T), dim1=1, dim2=3).permute(2, 0, 1)


def m_step_loadings(Y, post: Posterior, min_noise: float):
    """Closed-form maximiser of the expected complete-data log likelihood over C, d, R.

    The optimum of [C d] does not depend on R (R is diagonal: one regression per neuron), and then
    R is the mean squared residual, floored at ``min_noise``; so this is an exact M-step and EM
    stays monotone."""
    N, T, q = Y.shape
    p = post.mean.shape[1]
    X = post.mean.transpose(1, 2).reshape(N * T, p)
    Yf = Y.reshape(N * T, q)
    Xa = torch.cat([X, torch.ones(N * T, 1, dtype=Y.dtype)], 1)  # augmented [x; 1] for d
    A = Xa.T @ Xa
    A[:p, :p] += N * _time_blocks(post.cov, p, T).sum(0)
    YX = Yf.T @ Xa
    Cd = torch.linalg.solve(A, YX.T).T  # A symmetric
    R = ((Yf**2).sum(0) - (Cd * YX).sum(1)) / (N * T)
    return Cd[:, :p].contiguous(), Cd[:, p].contiguous(), R.clamp_min(min_noise)


def gp_prior_objective(log_tau: torch.Tensor, S: torch.Tensor, N: int):
    """Negative expected log GP prior (up to constants) per trial and bin, and its gradient in log tau.

    ``S`` (p, T, T) = sum over trials of E[x_i x_i'] = mu_i mu_i' + N Sigma_ii. Per latent,
    f_i = (N log|K_i| + tr(K_i^-1 S_i)) / 2 and df_i/dlog tau_i = tr((N P - P S P) dK_i) / 2 with
    P = K_i^-1 and dK_i = (1 - eps) exp(-D^2 / 2 tau^2) D^2 / tau^2 (closed form: no autograd)."""
    T = S.shape[-1]
    tau = torch.exp(log_tau)
    t = torch.arange(T, dtype=S.dtype)
    sq = (t[:, None] - t[None, :]) ** 2 / tau[:, None, None] ** 2
    E = (1 - EPS) * torch.exp(-sq / 2)
    L = torch.linalg.cholesky(E + EPS * torch.eye(T, dtype=S.dtype))
    P = torch.cholesky_inverse(L)
    PS = P @ S
    logdet = 2 * torch.log(torch.diagonal(L, dim1=1, dim2=2)).sum(-1)
    f = 0.5 * (N * logdet + torch.diagonal(PS, dim1=1, dim2=2).sum(-1))
    grad = 0.5 * ((N * P - PS @ P) * (E * sq)).sum((1, 2))
    return f.sum() / (N * T), grad / (N * T)


def m_step_timescales(log_tau: torch.Tensor, post: Posterior, iters: int = 4) -> torch.Tensor:
    """A few L-BFGS-B steps on log tau (generalised EM: the result never lowers the expected prior).

    log tau is boxed to [log 0.1, log 100 T] bins: beyond either end K_i is numerically I or rank
    one + eps I and the data cannot move tau back."""
    from scipy.optimize import minimize

    N, p, T = post.mean.shape
    blocks = torch.diagonal(post.cov.reshape(p, T, p, T), dim1=0, dim2=2).permute(2, 0, 1)  # (p, T, T)
    S = torch.einsum("nit,niu->itu", post.mean, post.mean) + N * blocks

    def fun(z):
        f, g = gp_prior_objective(torch.as_tensor(z, dtype=S.dtype), S, N)
        return float(f), g.numpy()

    start = log_tau.detach().numpy()
    bounds = [(math.log(0.1), math.log(100.0 * T))] * p
    res = minimize(fun, np.clip(start, *bounds[0]), jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": iters})
    if np.isfinite(res.fun) and res.fun <= fun(start)[0]:
        return torch.as_tensor(res.x, dtype=log_tau.dtype)
    return log_tau


def factor_analysis(Y: torch.Tensor, p: int, min_noise: float, iters: int = 100):
    """Static factor analysis of the pooled bins: (C, d, R), started from probabilistic PCA."""
    Yf = Y.reshape(-1, Y.shape[-1])
    d = Yf.mean(0)
    S = torch.cov(Yf.T, correction=0)
    evals, evecs = torch.linalg.eigh(S)
    evals, evecs = evals.flip(0), evecs.flip(1)
    sigma2 = evals[p:].mean().clamp_min(min_noise)
    C = evecs[:, :p] * (evals[:p] - sigma2).clamp_min(1e-6 * evals[0]).sqrt()
    R = (torch.diagonal(S) - (C**2).sum(1)).clamp_min(min_noise)
    eye = torch.eye(p, dtype=Y.dtype)
    for _ in range(iters):  # EM for FA on the covariance: cheap (q x q), refines PPCA's isotropic R
        beta = torch.linalg.solve(C.T @ (C / R[:, None]) + eye, (C / R[:, None]).T)  # E[x|y] = beta (y - d)
        Exx = eye - beta @ C + beta @ S @ beta.T
        C = (S @ beta.T) @ torch.linalg.inv(Exx)
        R = (torch.diagonal(S) - ((C @ beta) * S).sum(1)).clamp_min(min_noise)
    return C, d, R


def autocorrelation_timescales(Z: torch.Tensor, n_grid: int = 200) -> torch.Tensor:
    """Timescale (bins) of each series in ``Z`` (N, T, p): least-squares fit of A exp(-k^2 / 2 tau^2)
    to the sample autocorrelation at lags k >= 1 (lag 0 holds the noise, so it is skipped)."""
    Z = (Z - Z.mean((0, 1))).double()
    N, T, p = Z.shape
    lags = torch.arange(1, max(2, min(T // 2, 100)) + 1)
    lags = lags[lags < T]
    var = (Z**2).mean((0, 1)).clamp_min(1e-300)
    acf = torch.stack([(Z[:, k:] * Z[:, :-k]).mean((0, 1)) for k in lags.tolist()]) / var  # (K, p)
    grid = torch.logspace(math.log10(0.3), math.log10(max(T, 2.0)), n_grid, dtype=torch.float64)
    shapes = torch.exp(-lags[:, None].double() ** 2 / (2 * grid[None] ** 2))  # (K, G)
    amp = (shapes.T @ acf) / (shapes**2).sum(0)[:, None]  # (G, p), best A per grid point
    amp = amp.clamp(0.0, 1.0)
    sse = ((acf[:, None, :] - shapes[:, :, None] * amp[None]) ** 2).sum(0)  # (G, p)
    return grid[sse.argmin(0)]


@register_model
class GPFA(Model):
    """Gaussian-process factor analysis of binned spike counts (Yu et al. 2009).

    Parameters
    ----------
    n_latents : int
        Latent dimensions p (1 <= p < number of neurons).
    bin_width : float
        Width of one bin in your time unit; timescales are reported in that unit.
    timescales : sequence of float, optional
        Initial timescales (time unit of ``bin_width``), one per latent; default: from the
        autocorrelation of the factor-analysis projections of the data.
    min_noise : float
        Absolute floor on each neuron's private variance R (transformed-count units); prevents the
        zero-variance (Heywood) solutions of factor analysis.
    sqrt_transform : bool
        Model sqrt(counts) (Yu et al.'s variance-stabilising choice) instead of the raw counts.
    dtype : torch.dtype
        float64 by default.
    """

    def __init__(self, n_latents: int, bin_width: float = 1.0, timescales=None, min_noise: float = 1e-3,
                 sqrt_transform: bool = True, dtype=DEFAULT_DTYPE):
        n_latents = check_int(n_latents, "n_latents", 1)
        bin_width = check_positive(bin_width, "bin_width")
        min_noise = check_positive(min_noise, "min_noise")
        if timescales is not None:
            try:
                if isinstance(timescales, str):
                    raise TypeError
                arr = np.atleast_1d(np.asarray(timescales, dtype=float))
            except (TypeError, ValueError):
                raise TypeError(f"`timescales` must be a sequence of numbers; got {timescales!r}.") from None
            if arr.ndim != 1 or len(arr) != n_latents:
                raise ValueError(f"`timescales` must hold one value per latent ({n_latents}); "
                                 f"got {timescales!r}.")
            if not (np.isfinite(arr).all() and (arr > 0).all()):
                raise ValueError(f"`timescales` must be positive finite numbers; got {timescales!r}.")
            timescales = arr.tolist()
        if not isinstance(sqrt_transform, (bool, np.bool_)):
            raise TypeError(f"`sqrt_transform` must be True or False; got {sqrt_transform!r}.")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"`dtype` must be a torch floating-point dtype; got {dtype!r}.")
        self.config = {"n_latents": n_latents, "bin_width": bin_width, "timescales": timescales,
                       "min_noise": min_noise, "sqrt_transform": bool(sqrt_transform)}
        self.dtype = dtype
        self.history = None
        self._train = None  # (counts int64 (N, T, q), transformed float tensor)
        self._params = None  # dict C, d, R, log_tau (tau in bins)
        self._post = None

    # ------------------------------------------------------------------ fitting
    def _transform(self, counts: np.ndarray) -> torch.Tensor:
        y = torch.as_tensor(counts, dtype=self.dtype)
        return torch.sqrt(y) if self.config["sqrt_transform"] else y

    def _check(self, counts, name="counts", *, fitting: bool = True) -> np.ndarray:
        """Counts as an array; ``fitting=False`` (inference on new trials with a fitted model) allows trials
        without spikes and fewer neurons than latents: the posterior is proper under the GP prior."""
        from ..neuro import check_counts

        arr = check_counts(counts, name)
        p = self.config["n_latents"]
        if arr.shape[1] < _MIN_BINS:
            raise ValueError(f"`{name}` has {arr.shape[1]} bin(s) per trial; GPFA needs at least "
                             f"{_MIN_BINS}.")
        if not fitting:
            return arr
        if not arr.any():
            raise ValueError(f"`{name}` has no spikes at all; there is nothing to factorise.")
        if p >= arr.shape[2]:
            raise ValueError(f"`n_latents` = {p} must be smaller than the number of neurons in `{name}` "
                             f"({arr.shape[2]}).")
        return arr

    def fit(self, counts, steps: int = 100, progress: bool | None = None, tol: float | None = 1e-6,
            seed: int | None = None, *, learn_timescales: bool = True):
        """EM on ``counts`` (trials, bins, neurons); ``steps`` EM iterations (0: initialise only).

        ``learn_timescales=False`` keeps the timescales at their initial values. ``history`` has one
        row per iteration: loss = -log marginal likelihood per trial after it, and tau_i (time unit).
        Each call starts afresh from the factor-analysis initialisation.
        """
        arr = self._check(counts)
        steps = check_int(steps, "steps")
        if tol is not None:
            tol = float(check_positive(tol, "tol"))
        p = self.config["n_latents"]
        Y = self._transform(arr)
        with seeded(seed):  # EM is deterministic; seeded only for the shared protocol
            C, d, R = factor_analysis(Y, p, self.config["min_noise"])
            if self.config["timescales"] is not None:
                tau = torch.tensor(self.config["timescales"], dtype=self.dtype) / self.config["bin_width"]
            else:
                # FA posterior means (M + I)^-1 C' R^-1 (y - d): defined even if C is rank deficient
                M = C.T @ (C / R[:, None])
                Z = ((Y - d) / R) @ C @ torch.linalg.inv(M + torch.eye(p, dtype=self.dtype))
                tau = autocorrelation_timescales(Z).to(self.dtype)
            post = e_step(Y, C, d, R, tau)
            self._train, self._post = (arr, Y), post
            self._params = {"C": C, "d": d, "R": R, "log_tau": torch.log(tau)}

            def step():
                par = self._params
                C, d, R = m_step_loadings(Y, self._post, self.config["min_noise"])
                log_tau = par["log_tau"]
                if learn_timescales:
                    log_tau = m_step_timescales(log_tau, self._post)
                self._params = {"C": C, "d": d, "R": R, "log_tau": log_tau}
                self._post = e_step(Y, C, d, R, torch.exp(log_tau))
                return -float(self._post.lml) / Y.shape[0]

            record = lambda: {f"tau_{i}": float(v) for i, v in enumerate(self.timescales_)}  # noqa: E731
            self.history = train(step, steps=steps, progress=progress, tol=tol, record=record, desc="GPFA")
        return self

    # ------------------------------------------------------------------ accessors
    @property
    def timescales_(self) -> np.ndarray:
        """Learned GP timescales tau_i, in the time unit of ``bin_width``."""
        self._require_fitted("timescales_")
        return torch.exp(self._params["log_tau"]).numpy() * self.config["bin_width"]

    @property
    def loadings_(self) -> np.ndarray:
        """C, (neurons, latents)."""
        self._require_fitted("loadings_")
        return self._params["C"].numpy().copy()

    @property
    def offsets_(self) -> np.ndarray:
        """d, (neurons,), on the transformed scale."""
        self._require_fitted("offsets_")
        return self._params["d"].numpy().copy()

    @property
    def noise_variance_(self) -> np.ndarray:
        """Diagonal of R, (neurons,), on the transformed scale."""
        self._require_fitted("noise_variance_")
        return self._params["R"].numpy().copy()

    def _orth_map(self):
        """(U, D V') of C = U D V' with a deterministic sign (largest |entry| of each U column > 0).

        Yu et al.'s orthonormalised latents are D V' x: C x = U (D V' x), ordered by variance explained."""
        U, s, Vt = torch.linalg.svd(self._params["C"], full_matrices=False)
        idx = U.abs().argmax(0)
        sign = torch.sign(U[idx, torch.arange(U.shape[1])])
        sign[sign == 0] = 1
        return U * sign, (s[:, None] * Vt) * sign[:, None]

    def latents(self, orthonormalize: bool = False) -> np.ndarray:
        """Posterior means of the latents, (trials, bins, n_latents)."""
        self._require_fitted("latents()")
        mean = self._post.mean.transpose(1, 2)  # (N, T, p)
        if orthonormalize:
            mean = mean @ self._orth_map()[1].T
        return mean.numpy().copy()

    def latent_variance(self, orthonormalize: bool = False) -> np.ndarray:
        """Posterior marginal variances of the latents, (trials, bins, n_latents) (equal across trials)."""
        self._require_fitted("latent_variance()")
        N, p, T = self._post.mean.shape
        blocks = _time_blocks(self._post.cov, p, T)  # (T, p, p)
        if orthonormalize:
            A = self._orth_map()[1]
            blocks = A @ blocks @ A.T
        var = torch.diagonal(blocks, dim1=1, dim2=2).clamp_min(0.0)
        return var.expand(N, T, p).numpy().copy()

    def log_marginal_likelihood(self) -> float:
        """log p(counts' transform | C, d, R, tau), natural log, summed over trials."""
        self._require_fitted("log_marginal_likelihood()")
        return float(self._post.lml)

    def bin_centers(self) -> np.ndarray:
        self._require_fitted("bin_centers()")
        return (np.arange(self._train[0].shape[1]) + 0.5) * self.config["bin_width"]

    def to_frame(self, orthonormalize: bool = False, level: float = 0.95):
        """Tidy posterior latents: trial, bin, time (bin centre), latent, mean, var, lower, upper."""
        from ..neuro import latents_frame

        return latents_frame(self.latents(orthonormalize), self.latent_variance(orthonormalize),
                             bin_centers=self.bin_centers(), level=level)

    def rates(self) -> np.ndarray:
        """Plug-in firing rates (trials, bins, neurons) per time unit: max(C mu_t + d, 0)^2 / bin_width
        with sqrt_transform (max(C mu_t + d, 0) / bin_width without). Clipping before squaring keeps a
        negative predicted sqrt-rate from turning into a positive rate."""
        self._require_fitted("rates()")
        par = self._params
        pred = (self._post.mean.transpose(1, 2) @ par["C"].T + par["d"]).clamp_min(0.0)
        if self.config["sqrt_transform"]:
            pred = pred**2
        return (pred / self.config["bin_width"]).numpy()

    def transform(self, counts, orthonormalize: bool = False) -> np.ndarray:
        """Posterior latent means (trials, bins, n_latents) for new trials (any number of bins >= 3)."""
        self._require_fitted("transform()")
        arr = self._check(counts, fitting=False)  # new trials may be silent: the posterior is still proper
        if arr.shape[2] != self._train[0].shape[2]:
            raise ValueError(f"`counts` has {arr.shape[2]} neurons; the model was fitted on "
                             f"{self._train[0].shape[2]}.")
        par = self._params
        post = e_step(self._transform(arr), par["C"], par["d"], par["R"], torch.exp(par["log_tau"]))
        mean = post.mean.transpose(1, 2)
        if orthonormalize:
            mean = mean @ self._orth_map()[1].T
        return mean.numpy().copy()

    def heldout_rates(self, counts_in, held_in) -> np.ndarray:
        """Co-smoothing (:mod:`latentgp.cosmoothing`): rates (per unit time) of every neuron, from the latents'
        exact posterior given only the ``held_in`` neurons' counts ``counts_in`` (trials, bins, len(held_in)).

        GPFA models u = sqrt(count) (default) as N(C x + d, R): the expected count is E[u²] = (C μ_t + d)² +
        C Σ_t Cᵀ + R, positive, with the posterior mean μ_t and covariance Σ_t of x_t. Without the square root
        the expected count is C μ_t + d, floored at 1e-6 counts per bin."""
        from ..cosmoothing import check_neuron_split

        self._require_fitted("heldout_rates()")
        par = self._params
        idx = check_neuron_split(held_in, par["C"].shape[0])
        arr = self._check(counts_in, "counts_in", fitting=False)
        if arr.shape[2] != len(idx):
            raise ValueError(f"`counts_in` has {arr.shape[2]} neurons; `held_in` lists {len(idx)}.")
        sel = torch.as_tensor(idx)
        post = e_step(self._transform(arr), par["C"][sel], par["d"][sel], par["R"][sel], torch.exp(par["log_tau"]))
        N, p, T = post.mean.shape
        mean = post.mean.transpose(1, 2) @ par["C"].T + par["d"]  # (N, T, neurons)
        if self.config["sqrt_transform"]:
            cov_t = _time_blocks(post.cov, p, T)  # (T, p, p) per bin
            var = torch.einsum("np,tpq,nq->tn", par["C"], cov_t, par["C"])
            expected = mean**2 + var + par["R"]
        else:
            expected = mean.clamp_min(1e-6)
        return (expected / self.config["bin_width"]).numpy()

    # ------------------------------------------------------------------ save / load
    def _payload(self) -> dict:
        self._require_fitted("save()")
        return {"kernel": None, "config": dict(self.config), "dtype": str(self.dtype).replace("torch.", ""),
                "counts": torch.as_tensor(self._train[0]),
                "params": {k: v.detach().clone() for k, v in self._params.items()}}

    @classmethod
    def _from_payload(cls, payload, kernel):
        model = cls(**payload["config"], dtype=getattr(torch, payload["dtype"]))
        arr = payload["counts"].numpy()
        Y = model._transform(arr)
        model._train = (arr, Y)
        model._params = {k: v.to(model.dtype) for k, v in payload["params"].items()}
        par = model._params
        model._post = e_step(Y, par["C"], par["d"], par["R"], torch.exp(par["log_tau"]))
        return model
