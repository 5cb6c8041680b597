"""GP-VAE: the O(T) Kalman posterior vs dense Gaussian conditioning, ELBO terms vs Monte Carlo, the model."""
import math

import numpy as np
import pytest
import torch

from latentgp.kernels import Matern
from latentgp.models.gpvae import GPVAE, gpvae_elbo
from latentgp.simulate import gp_latents, r_squared_affine
from latentgp.variational.amortised import (
    diagonal_sites,
    markov_posterior,
    markov_prior,
    sample_markov_posterior,
)

L, B, T = 2, 3, 12


@pytest.fixture
def setup():
    gen = torch.Generator().manual_seed(0)
    kernel = Matern(nu=1.5, batch_shape=torch.Size([L])).double()
    with torch.no_grad():
        kernel.lengthscale = torch.tensor([2.0, 5.0], dtype=torch.float64).reshape(L, 1, 1)
    times = torch.sort(torch.rand(T, generator=gen, dtype=torch.float64) * 20).values  # irregular grid
    mean = torch.randn(B, T, L, generator=gen, dtype=torch.float64)
    prec = torch.rand(B, T, L, generator=gen, dtype=torch.float64) * 2 + 0.1
    return kernel, times, mean, prec


def dense_posterior(kernel, times, mean, prec):
    """Independent reference: Σ = (K⁻¹ + Λ)⁻¹, m = Σ Λ ỹ and the Gaussian KL, all from the dense kernel matrix."""
    K = kernel(times[:, None]).to_dense()  # (L, T, T)
    lam, yt = prec.transpose(1, 2), mean.transpose(1, 2)  # (B, L, T)
    Kinv = torch.linalg.inv(K)
    Sig = torch.linalg.inv(Kinv + torch.diag_embed(lam))
    m = (Sig @ (lam * yt).unsqueeze(-1)).squeeze(-1)
    quad = (m.unsqueeze(-2) @ Kinv @ m.unsqueeze(-1)).squeeze(-1).squeeze(-1)
    kl = 0.5 * ((Kinv * Sig).sum((-1, -2)) + quad - len(times) + torch.logdet(K) - torch.logdet(Sig))
    return m.transpose(1, 2), Sig, kl.sum(-1), K


def test_markov_posterior_matches_dense(setup):
    kernel, times, mean, prec = setup
    post = markov_posterior(markov_prior(kernel, times), diagonal_sites(mean, prec))
    m, Sig, kl, _ = dense_posterior(kernel, times, mean, prec)
    assert torch.allclose(post.mean, m, atol=1e-10, rtol=0)
    assert torch.allclose(post.var, Sig.diagonal(dim1=-2, dim2=-1).transpose(1, 2), atol=1e-10, rtol=0)
    assert torch.allclose(post.kl, kl, atol=1e-9, rtol=0)
    assert (kl > 0.5).all()  # a non-trivial KL, not 0 = 0


def test_matheron_draws_and_kl_vs_monte_carlo(setup):
    """Joint draws from q have the dense posterior's moments, and KL = E_q[log q - log p] by MC (3 s.e.)."""
    kernel, times, mean, prec = setup
    prior = markov_prior(kernel, times)
    sites = diagonal_sites(mean, prec)
    S = 4000
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        z = sample_markov_posterior(prior, sites, S, gen)  # (S, B, T, L)
    m, Sig, kl, K = dense_posterior(kernel, times, mean, prec)
    zt = z.transpose(-1, -2)  # (S, B, L, T)
    q = torch.distributions.MultivariateNormal(m.transpose(1, 2), covariance_matrix=Sig)
    p = torch.distributions.MultivariateNormal(torch.zeros(L, T, dtype=torch.float64), covariance_matrix=K)
    diff = (q.log_prob(zt) - p.log_prob(zt)).sum(-1)  # (S, B)
    se = diff.std(0) / math.sqrt(S)
    assert ((diff.mean(0) - kl).abs() < 3 * se).all()
    # the draws' covariance (incl. time correlations) is the dense posterior's
    emp = torch.einsum("sblt,sblu->bltu", zt - zt.mean(0), zt - zt.mean(0)) / (S - 1)
    assert (emp - Sig).abs().max() < 0.08


def test_expected_loglik_term_vs_closed_form(setup):
    """For a linear decoder and Gaussian likelihood E_q[log p(y|z)] has a closed form; the ELBO's MC term
    (single-sample estimates) averages to it within 3 s.e., and KL is the exact one."""
    kernel, times, mean, prec = setup
    gen = torch.Generator().manual_seed(2)
    D = 4
    W = torch.randn(L, D, generator=gen, dtype=torch.float64)
    b = torch.randn(D, generator=gen, dtype=torch.float64)
    noise = 0.3
    y = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    prior = markov_prior(kernel, times)

    def log_density(y, eta):
        return -0.5 * ((y - eta) ** 2 / noise + math.log(2 * math.pi * noise))

    S = 3000
    with torch.no_grad():
        z = sample_markov_posterior(prior, diagonal_sites(mean, prec), S, gen)
        per_draw = log_density(y, z @ W + b).sum((-1, -2))  # (S, B)
        terms = gpvae_elbo(prior, (mean, prec), y, lambda z: z @ W + b, log_density, num_samples=S, generator=None)
    post = markov_posterior(prior, diagonal_sites(mean, prec))
    mu, var = post.mean @ W + b, post.var @ W ** 2  # latents independent under q
    exact = (-0.5 * (((y - mu) ** 2 + var) / noise + math.log(2 * math.pi * noise))).sum((-1, -2))
    se = per_draw.std(0) / math.sqrt(S)
    assert ((per_draw.mean(0) - exact).abs() < 3 * se).all()
    assert ((terms["loglik"].detach() - exact).abs() < 3 * se).all()
    assert torch.allclose(terms["kl"].detach(), post.kl.detach())


# ------------------------------------------------------------------ the model
def tanh_latent_data(n_trials, n_bins, n_features, seed):
    """Two GP latents (lengthscales 5 and 10 bins) -> tanh(x W) + 0.1 noise: (latents, observations)."""
    x = gp_latents([5.0, 10.0], n_trials=n_trials, n_bins=n_bins, bin_width=1.0, seed=seed)
    rng = np.random.default_rng(seed + 1)
    W = rng.standard_normal((2, n_features))
    return x, np.tanh(x @ W) + 0.1 * rng.standard_normal((n_trials, n_bins, n_features))


@pytest.fixture(scope="module")
def data():
    return tanh_latent_data(24, 40, 8, seed=0)


@pytest.fixture(scope="module")
def fitted(data):
    return GPVAE(2, hidden=32).fit(data[1], steps=150, lr=0.02, batch_size=8, seed=0, progress=False)


def test_gpvae_fit_recovers_latents(fitted, data):
    x, Y = data
    h = fitted.history
    assert h.loss.iloc[-20:].mean() < h.loss.iloc[:5].mean() - 1.0
    assert {"step", "loss", "lengthscale_0", "lengthscale_1"} <= set(h.columns)
    assert fitted.latents().shape == (24, 40, 2)
    assert (fitted.latent_variance() > 0).all()
    assert r_squared_affine(fitted.latents(), x) > 0.85
    # new sequences are encoded with the same networks
    assert np.allclose(fitted.latents(Y[:3]), fitted.latents()[:3])
    rec = fitted.reconstruct(num_samples=8, seed=0)
    assert 1 - ((rec - Y) ** 2).sum() / ((Y - Y.mean()) ** 2).sum() > 0.8
    frame = fitted.predict(Y[:2], num_samples=8, seed=0)
    assert list(frame.columns) == ["sequence", "time", "feature", "mean", "var", "lower", "upper"]
    assert len(frame) == 2 * 40 * 8 and (frame.lower <= frame.upper).all()


def test_gpvae_save_load(fitted, tmp_path):
    import latentgp.io as lio

    fitted.save(tmp_path / "m.pt")
    loaded = lio.load(tmp_path / "m.pt")
    assert np.array_equal(loaded.latents(), fitted.latents())
    assert loaded.elbo(num_samples=4, seed=0) == fitted.elbo(num_samples=4, seed=0)
    assert loaded.history.equals(fitted.history)


def test_gpvae_custom_networks_and_load(tmp_path, data):
    class Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 4)

        def forward(self, y):
            out = self.lin(y)
            return out[..., :2], torch.nn.functional.softplus(out[..., 2:]) + 1e-3

    model = GPVAE(2, encoder=Enc(), decoder=torch.nn.Linear(2, 8)).fit(data[1][:4], steps=3, progress=False)
    model.save(tmp_path / "c.pt")
    import latentgp.io as lio

    with pytest.raises(ValueError, match="user-supplied encoder"):
        lio.load(tmp_path / "c.pt")
    loaded = GPVAE.load(tmp_path / "c.pt", encoder=Enc(), decoder=torch.nn.Linear(2, 8))
    assert np.array_equal(loaded.latents(), model.latents())


def test_gpvae_poisson_and_bernoulli_run(data):
    x = data[0][:4]
    counts = np.random.default_rng(0).poisson(np.exp(x @ np.ones((2, 5)) * 0.5))
    m = GPVAE(2, likelihood="poisson", hidden=8).fit(counts, steps=3, progress=False, seed=0)
    assert np.isfinite(m.history.loss).all() and (m.reconstruct(num_samples=2) > 0).all()
    m = GPVAE(2, likelihood="bernoulli", hidden=8).fit((counts > 0).astype(float), steps=3, progress=False)
    assert ((m.reconstruct(num_samples=2) > 0) & (m.reconstruct(num_samples=2) < 1)).all()


def test_gpvae_bad_input(data):
    Y = data[1][:4]
    model = GPVAE(2)
    bad = Y.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="`Y`.*NaN"):
        model.fit(bad, steps=1)
    with pytest.raises(ValueError, match="different lengths"):
        model.fit([Y[0], Y[1][:-3]], steps=1)
    with pytest.raises(ValueError, match="negative"):
        GPVAE(2, likelihood="poisson").fit(-np.ones((2, 5, 3)), steps=1)
    with pytest.raises(ValueError, match="times"):
        model.fit(Y, times=np.zeros(40), steps=1)
    with pytest.raises(ValueError, match="batch_shape"):
        GPVAE(3, kernel=Matern(nu=1.5, batch_shape=torch.Size([2])))
    with pytest.raises(TypeError, match="encoder"):
        GPVAE(2, encoder="mlp")
    with pytest.raises(TypeError, match="kernel"):
        GPVAE(2, kernel=torch.nn.Module())
    assert model._train is None  # nothing was stored by the failed calls
    model.fit(Y, steps=1, progress=False)
    with pytest.raises(ValueError, match="features"):
        model.latents(Y[..., :5])
