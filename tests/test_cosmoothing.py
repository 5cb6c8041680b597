"""Co-smoothing: scores vs scipy, GPFA held-out rates vs a dense hand computation, MM-GPVAE held-out
inference vs a full-covariance Gaussian VI optimum."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import poisson

from latentgp.cosmoothing import co_smoothing, co_smoothing_score, poisson_log_likelihood
from latentgp.models.gpfa import GPFA
from latentgp.models.mmgpvae import MultimodalGPVAE
from latentgp.simulate_blob import simulate_blob_spikes
from latentgp.variational.amortised import fourier_prior_variances


@pytest.fixture(scope="module")
def sim():
    return simulate_blob_spikes(12, 20, 12, (0.1, 0.2, 0.3), 0.05, seed=3)


def test_scores_by_hand():
    rng = np.random.default_rng(0)
    y = rng.poisson(2.0, (3, 4, 2))
    r = rng.uniform(5, 50, (3, 4, 2))
    bw = 0.05
    assert math.isclose(poisson_log_likelihood(y, r, bw), poisson.logpmf(y, r * bw).sum(), rel_tol=1e-12)
    s = co_smoothing_score(y, r, bw)
    null = poisson.logpmf(y, y.mean((0, 1))).sum()
    assert math.isclose(s["ll_null"], null, rel_tol=1e-12)
    assert math.isclose(s["bits_per_spike"], (s["ll"] - null) / (y.sum() * math.log(2)), rel_tol=1e-12)
    assert math.isclose(s["nats_per_bin"], s["ll"] / y.size, rel_tol=1e-12)
    assert co_smoothing_score(y, np.broadcast_to(y.mean((0, 1)) / bw, y.shape), bw)["bits_per_spike"] == 0
    with pytest.raises(ValueError, match="positive"):
        poisson_log_likelihood(y, np.zeros_like(r))


def test_gpfa_heldout_rates_vs_dense(sim):
    counts = sim["counts"]
    g = GPFA(2, bin_width=0.05).fit(counts[:8], steps=20, progress=False)
    held_in = np.arange(0, 12, 2)
    rates = g.heldout_rates(counts[8:, :, held_in], held_in)
    # dense Gaussian conditioning written out: u = sqrt(y) = C x + d + e, x_i ~ GP with GPFA's kernel
    C, d, R = g.loadings_, g.offsets_, g.noise_variance_
    tau = g.timescales_ / 0.05
    T, p = counts.shape[1], 2
    t = np.arange(T)
    K = np.zeros((p * T, p * T))
    for i in range(p):
        K[i * T:(i + 1) * T, i * T:(i + 1) * T] = 0.999 * np.exp(-(t[:, None] - t) ** 2 / (2 * tau[i] ** 2)) \
            + 1e-3 * np.eye(T)
    A = np.kron(C[held_in], np.eye(T))  # stacked (neuron-major obs) x (latent-major state)
    noise = np.kron(np.diag(R[held_in]), np.eye(T))
    S = K - K @ A.T @ np.linalg.solve(A @ K @ A.T + noise, A @ K)
    for n in range(4):
        u = np.sqrt(counts[8 + n][:, held_in]).T.reshape(-1) - np.repeat(d[held_in], T)
        mu = (K @ A.T @ np.linalg.solve(A @ K @ A.T + noise, u)).reshape(p, T).T  # (T, p)
        var = np.array([C @ S[np.ix_(range(k, p * T, T), range(k, p * T, T))] @ C.T for k in range(T)]).diagonal(
            axis1=1, axis2=2)
        expected = (mu @ C.T + d) ** 2 + var + R
        assert np.allclose(rates[n] * 0.05, expected, rtol=1e-8, atol=1e-10)
    s = co_smoothing(g, counts[8:], held_in)
    assert np.isfinite(s["bits_per_spike"]) and s["nats_per_bin"] < 0
    # one held-in neuron (fewer than the latents), one of them silent: the posterior is still proper
    one = g.heldout_rates(np.zeros_like(counts[8:, :, :1]), [3])
    assert np.isfinite(one).all() and (one > 0).all()
    with pytest.raises(ValueError, match="held_in"):
        co_smoothing(g, counts[8:], np.arange(12))
    with pytest.raises(TypeError, match="held_in"):
        co_smoothing(g, counts[8:], [0.5, 1.5])


def test_mmgpvae_heldout_inference_is_the_gaussian_vi_optimum(sim):
    """One latent: the optimal full-covariance Gaussian q has the prior x diagonal-sites form (Opper & Archambeau
    2009), so the sites' optimum and a direct full-covariance optimisation give the same rates."""
    counts, images = sim["counts"], sim["images"][..., :6, :6]
    m = MultimodalGPVAE(1, (0, 0), n_frequencies=4, bin_width=0.05, hidden=8).fit(
        counts[:6], images[:6], steps=5, progress=False, seed=0)
    held_in = np.array([0, 2, 3, 5, 7, 8, 11])
    y_in = counts[6:8][..., held_in]
    rates = m.heldout_rates(y_in, held_in, steps=200)
    # direct: q(u) = N(μ, L Lᵀ) in whitened Fourier coordinates, ELBO by its closed form, L-BFGS to convergence
    with torch.no_grad():
        scale = fourier_prior_variances(m.net.kernel, 4, m.period_).sqrt()[0]
        C, off = m.net.C.detach()[0], m.net.d.detach()
    W = m._basis * scale  # (T, M)
    M_ = W.shape[1]
    y = torch.as_tensor(y_in, dtype=torch.float64)
    mu = torch.zeros(2, M_, dtype=torch.float64, requires_grad=True)
    raw = torch.zeros(2, M_, M_, dtype=torch.float64, requires_grad=True)

    def moments():
        Lq = torch.tril(raw, -1) + torch.diag_embed(torch.exp(raw.diagonal(dim1=-2, dim2=-1)))
        f, fv = mu @ W.T, ((W @ Lq) ** 2).sum(-1)  # (2, T)
        return Lq, f[..., None] * C + off, fv[..., None] * C ** 2

    opt = torch.optim.LBFGS([mu, raw], max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        Lq, eta, v = moments()
        rate = 0.05 * torch.exp(eta + 0.5 * v)[..., held_in]
        ll = (y * (eta[..., held_in] + math.log(0.05)) - rate).sum()
        kl = 0.5 * ((Lq ** 2).sum() + (mu ** 2).sum() - 2 * M_ - 2 * Lq.diagonal(dim1=-2, dim2=-1).log().sum())
        loss = kl - ll
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    with torch.no_grad():
        _, eta, v = moments()
        direct = torch.exp(eta + 0.5 * v).numpy()
    assert np.allclose(rates, direct, rtol=1e-4)
    assert rates.shape == (2, 20, 12)
    with pytest.raises(ValueError, match="spikes_in"):
        m.heldout_rates(counts[6:8], held_in)


def test_held_in_order_is_the_callers_and_neuron_count_is_checked(sim):
    """Counts follow the caller's ``held_in`` order (they used to be matched to the sorted indices: wrong
    loadings per column); scoring counts with fewer neurons than the model raises, naming ``counts``."""
    counts = sim["counts"]
    g = GPFA(2, bin_width=0.05).fit(counts[:8], steps=5, progress=False)
    a = g.heldout_rates(counts[8:, :, [7, 0, 3]], [7, 0, 3])
    b = g.heldout_rates(counts[8:, :, [0, 3, 7]], [0, 3, 7])
    assert np.allclose(a, b, rtol=1e-10)
    with pytest.raises(ValueError, match="counts"):
        co_smoothing(g, counts[8:, :, :6], [0, 2, 4])
