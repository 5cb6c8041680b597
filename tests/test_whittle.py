"""Whittle likelihood: periodogram normalisation, aliasing, expected periodograms, recovery (float64)."""
import math

import gpytorch
import numpy as np
import pytest
import torch

from latentgp.kernels import HidaMatern, Matern, state_space_form
from latentgp.whittle import (
    aliased_spectral_density,
    expected_periodogram,
    fit_whittle,
    fourier_frequencies,
    periodogram,
    whittle_log_likelihood,
)

DT = torch.float64


def scaled(base, scale, **hypers):
    k = gpytorch.kernels.ScaleKernel(base).to(DT)
    k.outputscale = scale
    for name, value in hypers.items():
        setattr(k.base_kernel, name, value)
    return k


def simulate(kernel, n, T, dt, seed):
    """Exact draws of a 1-D GP on a grid from its state-space form: x_{t+1} = A x_t + N(0, Q)."""
    with torch.no_grad():
        ss = state_space_form(kernel)
        d = torch.tensor([dt], dtype=DT)
        A = ss.transition(d)[0].numpy()
        LQ = np.linalg.cholesky(ss.process_noise(d)[0].numpy())
        L0, H = np.linalg.cholesky(ss.P_inf.numpy()), ss.H.numpy()
    rng = np.random.default_rng(seed)
    eps = rng.standard_normal((T, n, A.shape[0])) @ LQ.T
    s = rng.standard_normal((n, A.shape[0])) @ L0.T
    out = np.empty((n, T))
    for t in range(T):
        out[:, t] = s @ H
        s = s @ A.T + eps[t]
    return torch.from_numpy(out)


def ar1_spectrum(w, ls, scale, dt):
    """Exact discrete-time density of Matern-1/2 samples: dt sum_n k(n dt) e^{-i w n dt} (AR(1))."""
    phi = math.exp(-dt / ls)
    return scale * dt * (1 - phi**2) / (1 - 2 * phi * torch.cos(w * dt) + phi**2)


def lag_sum_spectrum(kernel, w, dt, n_lags):
    """dt [k(0) + 2 sum_{n>=1} k(n dt) cos(w n dt)]: Poisson-summation reference, fast for decaying k."""
    lags = torch.arange(n_lags + 1, dtype=DT) * dt
    with torch.no_grad():
        k = kernel(lags[:, None], torch.zeros(1, 1, dtype=DT)).to_dense()[:, 0]
    k = torch.cat([k[:1], 2 * k[1:]])
    return dt * (k[:, None] * torch.cos(lags[:, None] * w[None, :])).sum(0)


# ------------------------------------------------------------------ periodogram


@pytest.mark.parametrize("T", [9, 10])
def test_periodogram_is_the_normalised_dft(T):
    dt = 0.3
    x = torch.randn(2, T, dtype=DT, generator=torch.Generator().manual_seed(0))
    freqs, I = periodogram(x, dt)
    assert freqs.shape == (T // 2,) and I.shape == (2, T // 2)
    t = torch.arange(T, dtype=DT) * dt
    direct = torch.stack([(x * torch.exp(-1j * w * t)).sum(-1).abs() ** 2 for w in freqs], -1) * dt / T
    assert torch.allclose(I, direct, rtol=1e-12, atol=1e-14)
    assert abs(float(freqs[-1]) * dt - math.pi) < 1e-12 if T % 2 == 0 else float(freqs[-1]) * dt < math.pi
    # Parseval with j = 0 dropped and the real Nyquist coefficient counted once
    c = torch.ones(T // 2, dtype=DT)
    if T % 2 == 0:
        c[-1] = 0.5
    xc = x - x.mean(-1, keepdim=True)
    assert torch.allclose(2 * (c * I).sum(-1), dt * (xc**2).sum(-1), rtol=1e-12)


# ------------------------------------------------------------------ aliasing


def test_aliased_density_matches_exact_ar1_spectrum():
    dt = 1.0
    w = fourier_frequencies(512, dt)
    for ls in (0.5, 10.0, 1000.0):
        k = scaled(Matern(0.5), 2.0, lengthscale=ls)
        exact = ar1_spectrum(w, ls, 2.0, dt)
        with torch.no_grad():
            rel = lambda **kw: float(((aliased_spectral_density(k, w, dt, **kw) - exact) / exact).abs().max())  # noqa
            assert rel() < 5e-5  # default K = 10 with the tail correction
            assert rel(n_alias=20) < 5e-6
            assert 5e-3 < rel(n_alias=20, tail=False) < 2e-2  # the slow w^-2 tail without correction
            assert rel(n_alias=0) > 0.5  # no aliasing: S(pi) is ~ 40% of S_dt(pi)


@pytest.mark.parametrize("make, lags", [
    (lambda: scaled(Matern(1.5), 1.5, lengthscale=3.0), 400),
    (lambda: scaled(HidaMatern(0, omega=2.5), 1.0, lengthscale=5.0), 600),
    (lambda: scaled(HidaMatern(1, omega=1.0), 1.0, lengthscale=2.0), 400),
])
def test_aliased_density_matches_lag_sum(make, lags):
    k, dt = make().to(DT), 0.5
    w = fourier_frequencies(128, dt)
    ref = lag_sum_spectrum(k, w, dt, lags)
    with torch.no_grad():
        assert float(((aliased_spectral_density(k, w, dt) - ref) / ref).abs().max()) < 1e-4


# ------------------------------------------------------------------ expected periodogram


def fejer_expectation(kernel, w, dt, T):
    """Exact finite-T E[I(w)] = dt sum_{|n|<T} (1 - |n|/T) k(n dt) e^{-i w n dt} (S_dt smoothed by Fejer)."""
    lags = torch.arange(T, dtype=DT) * dt
    with torch.no_grad():
        k = kernel(lags[:, None], torch.zeros(1, 1, dtype=DT)).to_dense()[:, 0] * (1 - lags / (T * dt))
    k = torch.cat([k[:1], 2 * k[1:]])
    return dt * (k[:, None] * torch.cos(lags[:, None] * w[None, :])).sum(0)


@pytest.mark.parametrize("nu", [0.5, 1.5])
def test_mean_periodogram_of_simulated_gp_is_the_aliased_density(nu):
    T, N, dt = 512, 2000, 1.0
    k = scaled(Matern(nu), 1.0, lengthscale=5.0)
    t = torch.arange(T, dtype=DT)[:, None] * dt
    with torch.no_grad():  # Cholesky draws: independent of the state-space code
        L = torch.linalg.cholesky(k(t).to_dense() + 1e-10 * torch.eye(T, dtype=DT))
    z = torch.randn(T, N, dtype=DT, generator=torch.Generator().manual_seed(1))
    freqs, I = periodogram((L @ z).T, dt)
    mean, se = I.mean(0), I.std(0) / math.sqrt(N)  # se ~ 2.2% of the mean
    with torch.no_grad():
        S_dt = aliased_spectral_density(k, freqs, dt)
        S = aliased_spectral_density(k, freqs, dt, n_alias=0)
    # normalisation: the simulated mean is the exact finite-T expectation at every frequency
    z_exact = (mean - fejer_expectation(k, freqs, dt, T)) / se
    assert z_exact.abs().max() < 4.5 and z_exact.mean().abs() < 0.3
    # ... which is S_dt up to Fejer leakage: ~1% for Matern-1/2 (invisible here) but, for the smoother
    # Matern-3/2, low-frequency power leaking into the w^-4 tail (+30% at Nyquist at T = 512, ~ 1/T)
    z_alias = (mean - S_dt) / se
    band = freqs < (math.pi if nu == 0.5 else 0.4 * math.pi) / dt
    assert z_alias[band].abs().max() < 4.5
    if nu == 1.5:
        assert (mean / S_dt - 1).abs().max() < 0.45  # measured 0.36 (0.30 leakage + MC)
    top = freqs > 0.8 * math.pi / dt
    assert ((mean - S) / se)[top].min() > 8  # un-aliased density is far below the data near Nyquist
    assert (mean / S)[top].mean() > 1.7  # measured 2.09 (nu = 1/2), 1.94 (nu = 3/2)


def test_leakage_vanishes_like_one_over_T():
    k, dt = scaled(Matern(1.5), 1.0, lengthscale=5.0), 1.0
    bias = []
    for T in (512, 4096):
        w = fourier_frequencies(T, dt)
        with torch.no_grad():
            ratio = fejer_expectation(k, w, dt, T) / aliased_spectral_density(k, w, dt)
        bias.append(float((ratio - 1).abs().max()))
    assert 0.2 < bias[0] < 0.4 and 6 < bias[0] / bias[1] < 10


def test_expected_periodogram_forms():
    T, dt = 64, 0.5
    g = torch.Generator().manual_seed(3)
    m = torch.randn(2, T, dtype=DT, generator=g)
    B = torch.randn(T, T, dtype=DT, generator=g)
    C = B @ B.T / T
    freqs, I = expected_periodogram(m, dt, cov_fn=lambda V: C @ V)
    t = torch.arange(T, dtype=DT) * dt
    E = torch.exp(-1j * freqs[:, None] * t[None, :])  # (J, T) DFT rows
    direct = (E @ m.to(E.dtype).T).abs().T ** 2 + torch.einsum("jt,ts,js->j", E, C.to(E.dtype), E.conj()).real
    assert torch.allclose(I, direct * dt / T, rtol=1e-10)
    # diagonal covariance: cov_fn and marginal_var agree, and the floor is flat = dt/T sum_t v_t
    v = torch.rand(2, T, dtype=DT, generator=g)
    _, I_cov = expected_periodogram(m, dt, cov_fn=lambda V: v[..., :, None] * V)
    _, I_var = expected_periodogram(m, dt, marginal_var=v)
    assert torch.allclose(I_cov, I_var, rtol=1e-10)
    floor = I_var - periodogram(m, dt)[1]
    assert torch.allclose(floor, (dt / T) * v.sum(-1, keepdim=True).expand_as(floor))
    # feeding E[I] of a point mass is feeding the series itself
    k = scaled(Matern(0.5), 1.0, lengthscale=2.0)
    a = whittle_log_likelihood(k, m, dt)
    b = whittle_log_likelihood(k, None, dt, expected_periodogram=expected_periodogram(m, dt))
    assert torch.allclose(a, b)


# ------------------------------------------------------------------ the likelihood


def test_whittle_approximates_exact_gaussian_loglik():
    T, dt = 1024, 0.5
    k = scaled(Matern(0.5), 2.0, lengthscale=5.0)
    t = torch.arange(T, dtype=DT)[:, None] * dt
    x = simulate(k, 4, T, dt, seed=0)
    with torch.no_grad():
        exact = torch.distributions.MultivariateNormal(torch.zeros(T, dtype=DT), k(t).to_dense()).log_prob(x)
        w = whittle_log_likelihood(k, x, dt, reduction="none")
        # add back the dropped j = 0 coordinate sum(x)/sqrt(T) ~ N(0, S_dt(0)/dt) to compare like with like
        S0 = aliased_spectral_density(k, torch.zeros(1, dtype=DT), dt)
        j0 = -0.5 * (torch.log(2 * math.pi * S0 / dt) + x.sum(-1) ** 2 / T / (S0 / dt))
    assert w.shape == (4,)
    # what remains is the circular wrap-around x_{T-1} -> x_0 (measured 0..14 nats on ~ -230); a wrong
    # constant would be off by J log(2 pi) ~ 940 or J log dt ~ 350, a missing Nyquist half by ~ 1e3 / T
    assert (w + j0 - exact).abs().max() < 25.0


def test_likelihood_is_maximised_near_truth():
    dt, ls, scale = 1.0, 10.0, 2.0
    x = simulate(scaled(Matern(0.5), scale, lengthscale=ls), 4, 5000, dt, seed=1)
    def ll(s, length):
        with torch.no_grad():
            return float(whittle_log_likelihood(scaled(Matern(0.5), s, lengthscale=length), x, dt))

    truth = ll(scale, ls)
    for f in (0.5, 2.0):
        assert truth > ll(scale, f * ls) + 50 and truth > ll(f * scale, ls) + 50


def test_recovery_matern12_and_aliasing_bias():
    dt, ls, scale = 1.0, 10.0, 2.0
    x = simulate(scaled(Matern(0.5), scale, lengthscale=ls), 4, 5000, dt, seed=2)
    fitted = {}
    for K in (10, 0):
        k = scaled(Matern(0.5), 1.0, lengthscale=3.0)
        hist = fit_whittle(k, x, dt, steps=60, n_alias=K, tol=1e-9)
        assert hist["loss"].iloc[-1] < hist["loss"].iloc[0]
        fitted[K] = (hist["base_kernel.lengthscale"].iloc[-1], hist["outputscale"].iloc[-1])
    assert abs(fitted[10][0] / ls - 1) < 0.1 and abs(fitted[10][1] / scale - 1) < 0.1
    # dropping aliasing under-estimates the lengthscale: measured 0.69-0.76 of the truth and 0.715-0.719
    # of the aliased fit on the same data (seeds 2, 7, 8); here 9.56 -> 6.87
    assert 0.6 < fitted[0][0] / ls < 0.8
    assert 0.68 < fitted[0][0] / fitted[10][0] < 0.76


def test_recovery_matern32_with_learned_noise():
    dt, ls, scale, noise = 1.0, 10.0, 1.0, 0.1
    x = simulate(scaled(Matern(1.5), scale, lengthscale=ls), 4, 5000, dt, seed=3)
    x = x + math.sqrt(noise) * torch.randn(x.shape, dtype=DT, generator=torch.Generator().manual_seed(4))
    k = scaled(Matern(1.5), 0.5, lengthscale=4.0)
    lik = gpytorch.likelihoods.GaussianLikelihood().to(DT)
    lik.noise = 0.5
    hist = fit_whittle(k, x, dt, steps=80, noise=lik, tol=1e-9)
    last = hist.iloc[-1]
    assert abs(last["base_kernel.lengthscale"] / ls - 1) < 0.1
    assert abs(last["outputscale"] / scale - 1) < 0.1
    assert abs(last["likelihood.noise_covar.noise"] / noise - 1) < 0.2


def test_recovery_hida_matern():
    dt, ls, om = 1.0, 20.0, 0.5
    truth = scaled(HidaMatern(1, omega=om), 1.0, lengthscale=ls)
    x = simulate(truth, 2, 5000, dt, seed=5)
    k = scaled(HidaMatern(1, omega=0.4), 1.0, lengthscale=8.0)
    hist = fit_whittle(k, x, dt, steps=80, tol=1e-9)
    last = hist.iloc[-1]
    assert abs(last["base_kernel.omega"] / om - 1) < 0.05
    assert abs(last["base_kernel.lengthscale"] / ls - 1) < 0.15


def test_batched_kernel_and_gradients_to_data():
    dt = 1.0
    b = torch.Size([2])
    k = gpytorch.kernels.ScaleKernel(Matern(1.5, batch_shape=b), batch_shape=b).to(DT)
    x = torch.randn(2, 100, dtype=DT, generator=torch.Generator().manual_seed(6)).requires_grad_()
    per = whittle_log_likelihood(k, x, dt, noise=0.1, reduction="none")
    assert per.shape == (2,)
    per.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(k.raw_outputscale.grad).all()
    # each series is scored by its own kernel: equals two separate unbatched evaluations
    for i in range(2):
        ki = scaled(Matern(1.5), k.outputscale[i].item(), lengthscale=k.base_kernel.lengthscale[i].item())
        assert torch.allclose(per[i], whittle_log_likelihood(ki, x[i].detach(), dt, noise=0.1))


def test_profiled_scale_fits_the_shape_of_a_rescaled_series():
    """With the variance profiled out, a unit-variance kernel fitted to a series of variance 9 recovers
    the lengthscale; the fixed-variance fit bends the lengthscale to match the power instead; and
    the profiled likelihood equals the full one at the optimal σ² (closed form)."""
    from latentgp.fit import optimize

    dt, ls = 1.0, 10.0
    x = 3.0 * simulate(scaled(Matern(0.5), 1.0, lengthscale=ls), 4, 5000, dt, seed=6)
    fitted = {}
    for profile in (True, False):
        k = Matern(0.5).to(DT)
        k.lengthscale = torch.tensor(3.0, dtype=DT)
        optimize(lambda k=k, p=profile: -whittle_log_likelihood(k, x, dt, profile_scale=p) / x.numel(),
                 k.parameters(), method="lbfgs", steps=60, progress=False, tol=1e-12)
        fitted[profile] = float(k.lengthscale.detach())
    assert abs(fitted[True] / ls - 1) < 0.1
    assert abs(fitted[False] / ls - 1) > 0.3
    k = Matern(0.5).to(DT)
    k.lengthscale = torch.tensor(ls, dtype=DT)
    with torch.no_grad():
        profiled = whittle_log_likelihood(k, x[:1], dt, profile_scale=True)
        best = max(float(whittle_log_likelihood(scaled(Matern(0.5), s, lengthscale=ls), x[:1], dt))
                   for s in np.linspace(6.0, 12.0, 601))
    assert float(profiled) == pytest.approx(best, abs=1e-3)
