"""Simulators for latent-trajectory models: Van der Pol and GP latents, Poisson spike readouts.

Every function takes ``seed`` (int, None or a numpy Generator) and draws only from its own
``np.random.default_rng(seed)``, so the global numpy/torch random state is never touched.
Arrays are (trials, bins, dims) like the rest of ``latentgp.neuro``.
"""
from __future__ import annotations

import copy

import numpy as np
from scipy.linalg import toeplitz
from scipy.special import gammaln, kve, logsumexp

from .data import _as_float_array, check_int, check_positive

__all__ = ["van_der_pol", "poisson_spikes", "simulate_vdp_spikes", "gp_latents", "r_squared_affine"]

# Defaults chosen together: mu = 1.5 has period ~7.1 ODE time units, so dt = 0.04 per bin puts
# ~2.8 cycles into a 500-bin trial (paper-like: a few cycles per trial); with 10 ms bins a trial
# is 5 s long.
VDP_MU = 1.5
VDP_DT = 0.04
BIN_WIDTH = 0.01
# Std of the log-rate each neuron gets from the latents: rates swing ~e^(+-2*0.6) ~ 3x around the
# mean, strong enough to infer the latents from 50 neurons, mild enough to keep rates < ~150 Hz.
MODULATION = 0.6
_IC_SPREAD = 0.1  # relative radial noise of the initial states around the radius-2 circle
_MAX_STEP = 0.01  # RK4 step (ODE time units)


# ---------------------------------------------------------------------------------------------
# latents


def _vdp_step(x, v, mu, h):
    """One classical RK4 step of x' = v, v' = mu (1 - x^2) v - x, for all trials at once."""
    def f(x, v):
        return v, mu * (1 - x * x) * v - x
    k1x, k1v = f(x, v)
    k2x, k2v = f(x + 0.5 * h * k1x, v + 0.5 * h * k1v)
    k3x, k3v = f(x + 0.5 * h * k2x, v + 0.5 * h * k2v)
    k4x, k4v = f(x + h * k3x, v + h * k3v)
    return x + h / 6 * (k1x + 2 * k2x + 2 * k3x + k4x), v + h / 6 * (k1v + 2 * k2v + 2 * k3v + k4v)


def van_der_pol(n_trials=10, n_bins=500, dt=VDP_DT, mu=VDP_MU, seed=None) -> np.ndarray:
    """Van der Pol oscillator latents, (n_trials, n_bins, 2): position and velocity.

    x'' = mu (1 - x^2) x' - x, sampled every ``dt`` ODE time units.  Each trial starts from a
    random point near the radius-2 circle (random angle, ~10% radial noise) and runs a burn-in of a
    few periods first, so it begins on/near the limit cycle at a random phase.  Both dimensions
    are then standardised to zero mean and unit std over all trials and bins.  Defaults give ~2.8
    cycles per 500-bin trial.  Integration: fixed-step RK4 with step <= 0.01 (error ~1e-8, far below
    anything a spike train can resolve), vectorised over trials.
    """
    n_trials = check_int(n_trials, "n_trials", 1)
    n_bins = check_int(n_bins, "n_bins", 2)
    dt = check_positive(dt, "dt")
    mu = check_positive(mu, "mu")
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 2 * np.pi, n_trials)
    radius = 2.0 * (1 + _IC_SPREAD * rng.standard_normal(n_trials))
    x, v = radius * np.cos(angle), radius * np.sin(angle)
    substeps = max(1, int(np.ceil(dt / _MAX_STEP)))
    h = dt / substeps
    # relaxation onto the cycle takes a period or two; the period is ~2 pi (small mu) to ~1.6 mu
    burn = 3.0 * max(2 * np.pi, 1.7 * mu)
    burn_steps = int(np.ceil(burn / h))
    for _ in range(burn_steps):
        x, v = _vdp_step(x, v, mu, h)
    out = np.empty((n_trials, n_bins, 2))
    for b in range(n_bins):
        out[:, b, 0], out[:, b, 1] = x, v
        for _ in range(substeps):
            x, v = _vdp_step(x, v, mu, h)
    if not np.isfinite(out).all():  # pragma: no cover - only for absurd mu / dt
        raise ValueError(f"`mu` = {mu:g}: the Van der Pol integration diverged; use a smaller `dt`.")
    return (out - out.mean(axis=(0, 1))) / out.std(axis=(0, 1))


def _matern_correlation(r: np.ndarray, nu: float) -> np.ndarray:
    """Unit-variance Matérn correlation at scaled distances r >= 0 (nu = inf: squared exponential)."""
    if np.isinf(nu):
        return np.exp(-0.5 * r**2)
    z = np.sqrt(2 * nu) * np.maximum(r, 1e-300)
    # 2^(1-nu)/Gamma(nu) z^nu K_nu(z) in log space; kve = K_nu e^z avoids underflow at large z
    out = np.exp((1 - nu) * np.log(2) - gammaln(nu) + nu * np.log(z) + np.log(kve(nu, z)) - z)
    return np.where(r == 0, 1.0, out)


def _kernel_matrices(kernel_or_lengthscales, times: np.ndarray, nu) -> list[np.ndarray]:
    import torch

    items = kernel_or_lengthscales
    if isinstance(items, torch.nn.Module) or np.isscalar(items):
        items = [items]
    if isinstance(items, np.ndarray):
        items = list(items.ravel())
    if not isinstance(items, (list, tuple)) or len(items) == 0:
        raise TypeError("`kernel_or_lengthscales` must be a positive lengthscale, a sequence of them, or a "
                        f"(list of) torch/gpytorch kernel(s); got {type(kernel_or_lengthscales).__name__}.")
    mats = []
    for item in items:
        if isinstance(item, torch.nn.Module):
            # evaluate a float64 copy so the user's kernel keeps its dtype
            k = copy.deepcopy(item).double()
            t = torch.as_tensor(times, dtype=torch.float64)[:, None]
            with torch.no_grad():
                K = k(t, t)
                K = (K.to_dense() if hasattr(K, "to_dense") else K).cpu().numpy()
            mats.extend(K.reshape(-1, len(times), len(times)))  # batched kernels give several latents
        else:
            ell = check_positive(item, "kernel_or_lengthscales")
            mats.append(toeplitz(_matern_correlation((times - times[0]) / ell, nu)))
    return mats


def _jittered_cholesky(K: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor, adding the smallest diagonal jitter (relative to the scale) that works.

    Smooth kernels on fine grids (RBF with lengthscale >> bin width) are numerically singular.
    torch's LAPACK is used because it is much faster than numpy's in some builds (seconds vs
    ~0.2 s at n = 2000).
    """
    import torch

    Kt = torch.as_tensor(K, dtype=torch.float64)
    scale = max(float(Kt.diagonal().mean()), 1e-300)
    eye = torch.eye(len(K), dtype=torch.float64)
    for rel in (0.0, 1e-10, 1e-8, 1e-6, 1e-4):
        L, info = torch.linalg.cholesky_ex(Kt + rel * scale * eye)
        if int(info) == 0:
            return L.numpy()
    raise ValueError("`kernel_or_lengthscales`: the covariance matrix is not positive definite even with "
                     "1e-4 relative jitter.")


def gp_latents(kernel_or_lengthscales, n_trials=10, n_bins=200, bin_width=BIN_WIDTH, seed=None, *,
               nu=np.inf) -> np.ndarray:
    """Independent zero-mean GP latents sampled exactly, (n_trials, n_bins, n_latents).

    ``kernel_or_lengthscales``: one lengthscale per latent in the time unit of ``bin_width``
    (unit-variance Matérn of smoothness ``nu``; the default inf is the squared exponential used by
    GPFA), or a (list of) torch/gpytorch kernel(s) evaluated on the bin times.  Each latent is
    L z with L the Cholesky factor of its n_bins x n_bins covariance (tiny jitter only if needed),
    independently per trial; n_bins up to a few thousand is fine.
    """
    n_trials = check_int(n_trials, "n_trials", 1)
    n_bins = check_int(n_bins, "n_bins", 1)
    bw = check_positive(bin_width, "bin_width")
    nu = float(nu) if np.isinf(nu) and nu > 0 else check_positive(nu, "nu")  # inf = squared exponential
    rng = np.random.default_rng(seed)
    times = bw * np.arange(n_bins)
    factors = [_jittered_cholesky(K) for K in _kernel_matrices(kernel_or_lengthscales, times, nu)]
    z = rng.standard_normal((len(factors), n_trials, n_bins))
    return np.stack([zk @ L.T for zk, L in zip(z, factors, strict=True)], axis=-1)


# ---------------------------------------------------------------------------------------------
# spikes


def _check_rate_range(rate_range) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in rate_range)
    except (TypeError, ValueError):
        raise TypeError(f"`rate_range` must be a (low, high) pair of rates in Hz; got {rate_range!r}.") \
            from None
    if not (np.isfinite([lo, hi]).all() and 0 < lo <= hi):
        raise ValueError(f"`rate_range` must satisfy 0 < low <= high (Hz); got {rate_range!r}.")
    return lo, hi


def poisson_spikes(latents, n_neurons=50, rate_range=(15.0, 40.0), bin_width=BIN_WIDTH, seed=None, *,
                   modulation=MODULATION) -> dict:
    """Poisson spike counts from a log-linear readout of ``latents`` (trials, bins, k).

    rate = exp(x C + d) in Hz and counts ~ Poisson(rate * bin_width) per bin.  Each column of C is
    a random direction scaled so the log-rate x C_n has std ``modulation`` over all trials and
    bins; d_n is then set so neuron n's mean rate over the simulated data equals a target drawn
    uniformly from ``rate_range``.  Returns dict(counts int64 (trials, bins, neurons),
    C (k, neurons), d (neurons,), rates Hz (trials, bins, neurons), mean_rates (neurons,) targets,
    bin_width).  A 2-D (bins, k) ``latents`` is one trial.
    """
    x = _as_float_array(latents, "latents")
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"`latents` must be 3-D (trials, bins, k) or 2-D (bins, k); got shape {x.shape}.")
    n_neurons = check_int(n_neurons, "n_neurons", 1)
    lo, hi = _check_rate_range(rate_range)
    bw = check_positive(bin_width, "bin_width")
    modulation = float(modulation)
    if not (np.isfinite(modulation) and modulation >= 0):
        raise ValueError(f"`modulation` must be a finite number >= 0; got {modulation!r}.")
    rng = np.random.default_rng(seed)
    k = x.shape[-1]
    flat = x.reshape(-1, k)
    directions = rng.standard_normal((k, n_neurons))
    spread = (flat - flat.mean(0)) @ directions
    sd = spread.std(axis=0)
    C = directions * np.divide(modulation, sd, out=np.zeros_like(sd), where=sd > 0)  # constant latents: C = 0
    mean_rates = rng.uniform(lo, hi, size=n_neurons)
    eta = flat @ C
    d = np.log(mean_rates) - (logsumexp(eta, axis=0) - np.log(len(eta)))  # log of mean exp(x C)
    rates = np.exp(eta + d).reshape(x.shape[0], x.shape[1], n_neurons)
    counts = rng.poisson(rates * bw).astype(np.int64)
    return {"counts": counts, "C": C, "d": d, "rates": rates, "mean_rates": mean_rates, "bin_width": bw}


def simulate_vdp_spikes(n_trials=10, n_bins=500, n_neurons=50, rate_range=(15.0, 40.0), seed=None, *,
                        bin_width=BIN_WIDTH, dt=VDP_DT, mu=VDP_MU, modulation=MODULATION) -> dict:
    """Van der Pol latents read out by Poisson neurons (the cvHM-paper-style benchmark).

    Returns dict(latents (trials, bins, 2), counts int64 (trials, bins, neurons), rates Hz,
    C, d, bin_width, times (bins,) bin centres in seconds).
    """
    rng = np.random.default_rng(seed)  # one stream for both stages: same seed, same data
    latents = van_der_pol(n_trials, n_bins, dt=dt, mu=mu, seed=rng)
    out = poisson_spikes(latents, n_neurons, rate_range, bin_width, seed=rng, modulation=modulation)
    return {"latents": latents, "counts": out["counts"], "rates": out["rates"], "C": out["C"], "d": out["d"],
            "bin_width": out["bin_width"], "times": (np.arange(n_bins) + 0.5) * out["bin_width"]}


# ---------------------------------------------------------------------------------------------
# evaluation


def r_squared_affine(estimate, truth) -> float:
    """R^2 of ``truth`` explained by the best affine map of ``estimate``.

    ``estimate`` (..., k) and ``truth`` (..., m) share their leading axes (e.g. trials, bins),
    which are flattened into samples; one least-squares fit truth ~ estimate W + b is made over all
    of them.  R^2 = 1 - SSE / SST with both sums taken over all samples and all m truth dims
    (SST about each dim's mean), so dims with more variance weigh more.  Latent models identify
    trajectories only up to such a map, so this is the usual accuracy score.
    """
    est = _as_float_array(estimate, "estimate")
    true = _as_float_array(truth, "truth")
    est = est[:, None] if est.ndim == 1 else est
    true = true[:, None] if true.ndim == 1 else true
    if est.shape[:-1] != true.shape[:-1]:
        raise ValueError(f"`estimate` {est.shape} and `truth` {true.shape} must agree on all but the last "
                         "axis.")
    est = est.reshape(-1, est.shape[-1])
    true = true.reshape(-1, true.shape[-1])
    if len(est) <= est.shape[1] + 1:
        raise ValueError(f"`estimate`: {len(est)} samples are too few for an affine fit of {est.shape[1]} "
                         "dims.")
    sst = float(((true - true.mean(0)) ** 2).sum())
    if sst == 0:
        raise ValueError("`truth` is constant, so R^2 is undefined.")
    design = np.column_stack([est, np.ones(len(est))])
    coef = np.linalg.lstsq(design, true, rcond=None)[0]
    return 1.0 - float(((true - design @ coef) ** 2).sum()) / sst
