"""MM-GPVAE: Fourier-domain prior and KL vs the time domain, each ELBO term vs Monte Carlo, the model."""
import math

import gpytorch
import numpy as np
import pytest
import torch

from latentgp.models.mmgpvae import MultimodalGPVAE
from latentgp.simulate import r_squared_affine
from latentgp.simulate_blob import render_blob, simulate_blob_spikes
from latentgp.variational.amortised import (
    fourier_basis,
    fourier_marginals,
    fourier_posterior,
    fourier_prior_variances,
    sample_fourier_posterior,
)

P, N_GRID = 4.0, 41  # period and an odd fine grid t_j = j P / n covering the whole circle


def rbf(lengthscales):
    k = gpytorch.kernels.RBFKernel(batch_shape=torch.Size([len(lengthscales)])).double()
    with torch.no_grad():
        k.lengthscale = torch.tensor(lengthscales, dtype=torch.float64).reshape(-1, 1, 1)
    return k


def periodic_cov(kernel, t, period, images=4):
    """k_P(t, t') = Σ_m k(t - t' + m P) from the RBF formula (no spectral density involved; written out
    because gpytorch's expanded-square distances lose ~1e-8 at offsets of several periods)."""
    ls = kernel.lengthscale.detach().reshape(-1, 1, 1)
    tau = t[:, None] - t[None, :]
    return sum(torch.exp(-0.5 * ((tau + m * period) / ls) ** 2) for m in range(-images, images + 1))


def circulant_variances(C, n):
    """Exact coefficient variances of the circulant covariance C on the full grid, in fourier_basis order."""
    e = torch.fft.fft(C[..., 0, :]).real  # eigenvalues (L, n)
    K = (n + 1) // 2
    return torch.cat((e[..., :1] / n, (2 * e[..., 1:K] / n).repeat_interleave(2, -1)), -1)


def dense_time_kl(C, mean, prec, observed):
    """KL(q ‖ p) for q = p × sites in the time domain, dense: E_q[Σ log t] - log Z on the observed steps."""
    Co = C[..., observed][..., observed, :]  # (L, n_o, n_o)
    y, lam = mean[:, observed].transpose(1, 2), prec[:, observed].transpose(1, 2)  # (B, L, n_o)
    G = torch.linalg.inv(Co + torch.diag_embed(1 / lam))
    m = (Co @ G @ y.unsqueeze(-1)).squeeze(-1)
    v = (Co - Co @ G @ Co).diagonal(dim1=-2, dim2=-1)
    e_log_t = -0.5 * (lam * ((y - m) ** 2 + v) - lam.log() + math.log(2 * math.pi)).sum(-1)
    log_z = torch.distributions.MultivariateNormal(torch.zeros_like(y), Co + torch.diag_embed(1 / lam)).log_prob(y)
    return (e_log_t - log_z).sum(-1)


@pytest.fixture
def sites():
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(3, N_GRID, 2, generator=gen, dtype=torch.float64)
    prec = torch.rand(3, N_GRID, 2, generator=gen, dtype=torch.float64) * 3 + 0.2
    return mean, prec


def test_fourier_prior_variances_match_the_kernel():
    """S(0)/P and 2 S(ω_k)/P are the coefficient variances of the kernel's periodic summation."""
    kernel = rbf([0.5, 0.8])
    t = torch.arange(N_GRID, dtype=torch.float64) * P / N_GRID
    exact = circulant_variances(periodic_cov(kernel, t, P), N_GRID)
    d = fourier_prior_variances(kernel, (N_GRID + 1) // 2, P)
    assert torch.allclose(d, exact, rtol=1e-9, atol=1e-12 * float(exact.max()))
    # and on a fine grid the truncated Fourier prior is the periodic GP prior
    basis = fourier_basis(t, 12, P)
    approx = basis @ torch.diag_embed(d[:, :basis.shape[1]]) @ basis.T
    assert (approx - periodic_cov(kernel, t, P)).abs().max() < 1e-9


def test_fourier_kl_equals_time_domain_kl(sites):
    """All frequencies with exact variances: the whitened Fourier KL is the dense time-domain KL (~1e-8)."""
    mean, prec = sites
    kernel = rbf([0.5, 0.8])
    t = torch.arange(N_GRID, dtype=torch.float64) * P / N_GRID
    C = periodic_cov(kernel, t, P)
    observed = torch.arange(N_GRID) < 28  # sites on the "data window", none on the padding
    prec_o = torch.where(observed[None, :, None], prec, torch.zeros_like(prec))
    basis = fourier_basis(t, (N_GRID + 1) // 2, P)
    post = fourier_posterior(circulant_variances(C, N_GRID).clamp_min(0), basis, mean, prec_o)  # round-off < 0
    ref = dense_time_kl(C, mean, prec, observed)
    assert torch.allclose(post.kl, ref, rtol=1e-8, atol=1e-8)
    assert (ref > 1.0).all()
    # truncation to the model's K frequencies with spectral-density variances: same KL (the rest is ~e^-40)
    K = 12
    post_k = fourier_posterior(fourier_prior_variances(kernel, K, P), basis[:, :2 * K - 1], mean, prec_o)
    assert torch.allclose(post_k.kl, ref, rtol=1e-7)
    # posterior marginals too
    Co = C[:, observed][:, :, observed]
    G = torch.linalg.inv(Co + torch.diag_embed(1 / prec[:, observed].transpose(1, 2)))
    m_ref = (C[:, :, observed] @ G @ mean[:, observed].transpose(1, 2).unsqueeze(-1)).squeeze(-1)
    m, v = fourier_marginals(post, basis)
    assert torch.allclose(m, m_ref.transpose(1, 2), atol=1e-8)


# ------------------------------------------------------------------ ELBO terms vs Monte Carlo
@pytest.fixture(scope="module")
def small():
    data = simulate_blob_spikes(n_trials=6, n_bins=20, n_neurons=10, size=8, seed=3)
    model = MultimodalGPVAE(2, (1, 1), n_frequencies=8, bin_width=0.02, behaviour_decoder=torch.nn.Linear(3, 64))
    model.fit(data["counts"], data["images"], steps=2, progress=False, seed=0)
    return model, data


def test_elbo_terms_vs_monte_carlo(small):
    model, _ = small
    y, b = model._train
    S = 4000
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        terms = model.elbo_terms(y, b, num_samples=1)
        post = terms["posterior"]
        # (1) spikes: closed form E_q[log Poisson] vs MC
        z = sample_fourier_posterior(post, model._basis, S, gen)  # (S, B, T, L)
        eta = z[..., model._spk_idx] @ model.net.C + model.net.d
        mc = torch.distributions.Poisson(torch.exp(eta) * model.config["bin_width"]).log_prob(y).sum((-1, -2))
        se = mc.std(0) / math.sqrt(S)
        assert ((mc.mean(0) - terms["spikes"]).abs() < 3 * se).all()
        # (2) KL: closed form vs MC of log q(u) - log p(u) in the whitened coefficients
        eps = torch.randn(S, *post.mean.shape, 1, dtype=torch.float64, generator=gen)
        u = post.mean + torch.linalg.solve_triangular(post.chol.transpose(-1, -2), eps, upper=True).squeeze(-1)
        cov = torch.cholesky_inverse(post.chol)
        log_q = torch.distributions.MultivariateNormal(post.mean, covariance_matrix=cov).log_prob(u)
        log_p = torch.distributions.Normal(0.0, 1.0).log_prob(u).sum(-1)
        diff = (log_q - log_p).sum(-1)
        se = diff.std(0) / math.sqrt(S)
        assert ((diff.mean(0) - terms["kl"]).abs() < 3 * se).all()
        # (3) behaviour: the model's MC term (one draw each) averages to the linear-Gaussian closed form
        draws = torch.stack([model.elbo_terms(y, b, num_samples=1, generator=gen)["behaviour"] for _ in range(400)])
        m, v = fourier_marginals(post, model._basis)
        lin = model.net.behaviour_decoder
        Wt = lin.weight.T  # (3, 64)
        mu = m[..., model._beh_idx] @ Wt + lin.bias
        var = v[..., model._beh_idx] @ Wt ** 2
        noise = model.net.noise_floor + torch.exp(model.net.log_noise)
        exact = (-0.5 * (((b - mu) ** 2 + var) / noise + torch.log(noise) + math.log(2 * math.pi))).sum((-1, -2))
        se = draws.std(0) / math.sqrt(len(draws))
        assert ((draws.mean(0) - exact).abs() < 3 * se).all()
        assert torch.allclose(terms["elbo"], terms["spikes"] + terms["behaviour"] - terms["kl"])


# ------------------------------------------------------------------ the model
@pytest.fixture(scope="module")
def blob():
    return simulate_blob_spikes(n_trials=24, n_bins=40, n_neurons=30, size=12, seed=0)


@pytest.fixture(scope="module")
def fitted(blob):
    model = MultimodalGPVAE(3, (0, 0), n_frequencies=16, bin_width=0.02, hidden=32)
    return model.fit(blob["counts"][:20], blob["images"][:20], steps=600, lr=0.01, batch_size=10, seed=0,
                     progress=False)


def test_mmgpvae_fit_and_cross_modal(fitted, blob):
    h = fitted.history
    assert h.loss.iloc[-20:].mean() < h.loss.iloc[:5].mean()
    x = blob["latents"]
    assert fitted.latents().shape == (20, 40, 3)
    r2_train = r_squared_affine(fitted.latents(), x[:20])
    r2_test = r_squared_affine(fitted.latents(spikes=blob["counts"][20:]), x[20:])  # spikes only, held out
    assert r2_train > 0.85 and r2_test > 0.75
    pred = fitted.predict_behaviour(blob["counts"][20:], seed=0)
    true = blob["images"][20:]
    assert pred.shape == true.shape
    assert 1 - ((pred - true) ** 2).sum() / ((true - true.mean()) ** 2).sum() > 0.3
    rates = fitted.predict_rates(behaviour=blob["images"][20:])  # the reverse direction
    assert rates.shape == blob["counts"][20:].shape and (rates > 0).all()


def test_refine_raises_the_spike_elbo_and_held_out_r2(fitted, blob):
    """Fitting q's sites to new spikes after the encoder can only raise the (closed-form) spike ELBO, and here
    it recovers the held-out latents better than the encoder alone."""
    counts, x = blob["counts"][20:], blob["latents"][20:]
    y = torch.as_tensor(counts, dtype=torch.float64)

    @torch.no_grad()
    def spike_elbo(post):
        mu, v = fitted._spike_rate_moments(*fourier_marginals(post, fitted._basis))
        return float(fitted.likelihood.expected(y, mu, v)[0].sum() - post.kl.sum())

    enc = fitted._marginals(counts, None)[0]
    ref = fitted._marginals(counts, None, refine=30)[0]
    assert spike_elbo(ref) > spike_elbo(enc) + 1.0
    r2_enc = r_squared_affine(fitted.latents(spikes=counts), x)
    r2_ref = r_squared_affine(fitted.latents(spikes=counts, refine=30), x)
    assert r2_ref > r2_enc and r2_ref > 0.85
    with pytest.raises(ValueError, match="refine"):
        fitted.latents(spikes=counts, behaviour=blob["images"][20:], refine=5)
    with pytest.raises(TypeError, match="refine"):
        fitted.latents(spikes=counts, refine=0.5)


def test_final_lr_phase_in_history(blob):
    m = MultimodalGPVAE(2, (0, 0), n_frequencies=4, bin_width=0.02, hidden=8)
    m.fit(blob["counts"][:4], blob["images"][:4], steps=10, final_lr=1e-3, progress=False, seed=0)
    assert list(m.history.step) == list(range(10))
    plain = MultimodalGPVAE(2, (0, 0), n_frequencies=4, bin_width=0.02, hidden=8)
    plain.fit(blob["counts"][:4], blob["images"][:4], steps=10, progress=False, seed=0)
    # same seed: the first 8 steps coincide, the last 2 (the final_lr phase) move the parameters less
    np.testing.assert_allclose(m.history.loss[:8], plain.history.loss[:8], rtol=1e-12)
    assert not np.allclose(m.history.loss[8:], plain.history.loss[8:], rtol=1e-9)
    with pytest.raises(ValueError, match="final_lr"):
        m.fit(blob["counts"][:4], blob["images"][:4], steps=10, final_lr=-1.0)


def test_mmgpvae_save_load(fitted, tmp_path):
    import latentgp.io as lio

    fitted.save(tmp_path / "mm.pt")
    loaded = lio.load(tmp_path / "mm.pt")
    assert np.array_equal(loaded.latents(), fitted.latents())
    assert loaded.elbo(num_samples=2, seed=0) == fitted.elbo(num_samples=2, seed=0)


def test_mmgpvae_bad_input(blob):
    model = MultimodalGPVAE(2, (1, 0), n_frequencies=4, bin_width=0.02)
    counts, images = blob["counts"][:3], blob["images"][:3]
    with pytest.raises(ValueError, match="negative"):
        model.fit(-counts, images, steps=1)
    bad = images.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="`behaviour`.*NaN"):
        model.fit(counts, bad, steps=1)
    with pytest.raises(ValueError, match="sequences, time"):
        model.fit(counts, images[:, :-1], steps=1)
    with pytest.raises(ValueError, match="private_dims"):
        MultimodalGPVAE(2, (-1, 0))
    with pytest.raises(ValueError, match="batch_shape"):
        MultimodalGPVAE(2, (1, 0), kernel=rbf([1.0, 1.0]))
    with pytest.raises(TypeError, match="kernel"):
        MultimodalGPVAE(2, (1, 0), kernel="rbf")
    assert model._train is None
    model.fit(counts, images, steps=1, progress=False)
    with pytest.raises(ValueError, match="frames have shape"):
        model.predict_behaviour(counts, behaviour=images[..., :-1])
    with pytest.raises(ValueError, match="neurons"):
        model.latents(spikes=counts[..., :5])


def test_render_blob_moves_with_latents():
    img = render_blob(np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), size=28)
    cols = img.sum(1).argmax(-1)
    assert img.shape == (2, 28, 28) and cols[1] > cols[0] + 5


def test_restarts_keep_the_best_start():
    from latentgp.simulate_blob import simulate_blob_spikes

    d = simulate_blob_spikes(8, n_bins=16, n_neurons=8, bin_width=0.02, seed=0)
    one = MultimodalGPVAE(shared_dim=2, private_dims=(0, 0), n_frequencies=5, bin_width=0.02)
    one.fit(d["counts"], d["images"], steps=0, restarts=3, restart_steps=15, seed=0, progress=False)
    best = one.elbo(num_samples=16, seed=1)
    single = MultimodalGPVAE(shared_dim=2, private_dims=(0, 0), n_frequencies=5, bin_width=0.02)
    single.fit(d["counts"], d["images"], steps=15, spike_warmup=0, seed=0, progress=False)  # = the first restart
    assert best >= single.elbo(num_samples=16, seed=1) - 1.0  # never worse than the first start (MC slack)
    with pytest.raises(ValueError, match="restarts"):
        MultimodalGPVAE(2, spike_encoder=torch.nn.Identity()).fit(d["counts"], d["images"], restarts=2)


def test_spike_warmup_trains_the_spike_pathway_only(blob):
    """The warm-up's objective is the spikes-only ELBO (no behaviour term) and it leaves the behaviour networks
    at their initialisation; without it (spike_warmup=0) nothing moves at steps=0."""
    counts, images = blob["counts"][:6], blob["images"][:6]

    def fitted_with(warmup):
        m = MultimodalGPVAE(2, (0, 0), n_frequencies=6, bin_width=0.02, hidden=8)
        return m.fit(counts, images, steps=0, spike_warmup=warmup, seed=0, progress=False)

    cold, warm = fitted_with(0), fitted_with(20)
    for name, p in cold.net.named_parameters():
        same = torch.equal(p, dict(warm.net.named_parameters())[name])
        assert same == name.startswith(("behaviour", "log_noise")), name  # the behaviour networks and noise
    y, b = warm._train
    terms = warm.elbo_terms(y, None, encode=("spikes",))
    full = warm.elbo_terms(y, b, encode=("spikes",))
    assert torch.equal(terms["behaviour"], torch.zeros(len(y), dtype=y.dtype))
    torch.testing.assert_close(terms["elbo"], full["spikes"] - full["kl"], rtol=1e-12, atol=0)
    with torch.no_grad():
        gain = warm.elbo_terms(y, None, encode=("spikes",))["elbo"].sum() - \
            cold.elbo_terms(y, None, encode=("spikes",))["elbo"].sum()
    assert gain > 0  # 20 Adam steps on the spikes-only ELBO raise it
    with pytest.raises(ValueError, match="spike_warmup"):
        fitted_with(-1)
