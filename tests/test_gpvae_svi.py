"""GP-VAE through Pyro SVI: the SVI loss is -ELBO of the Adam path exactly, the path distributions and their
registered KL against dense Gaussian references, plate subsampling scales by N / batch, and a short fit."""
import numpy as np
import pyro
import pytest
import torch
from test_gpvae import tanh_latent_data
from torch.distributions.kl import kl_divergence

from latentgp.kernels import Matern
from latentgp.models.gpvae import GPVAE
from latentgp.simulate import r_squared_affine
from latentgp.variational.amortised import markov_prior
from latentgp.variational.amortised_dense import dense_prior
from latentgp.variational.amortised_pyro import AmortisedGPPosterior, GPPathPrior


@pytest.fixture(scope="module")
def data():
    return tanh_latent_data(16, 30, 6, seed=3)


def _mf_loss(model, batch_size=None):
    return pyro.infer.TraceMeanField_ELBO(max_plate_nesting=1).differentiable_loss(
        model.pyro_model, model.pyro_guide, None, batch_size)


@pytest.mark.parametrize("dense_max", [128, 0])  # dense posterior and Kalman posterior
def test_svi_loss_is_minus_gpvae_elbo(data, dense_max):
    """One-particle TraceMeanField loss == -Σ gpvae_elbo with the same noise draw, values and gradients."""
    m = GPVAE(2, hidden=16, dense_max=dense_max).fit(data[1], steps=0, seed=0)
    params = list(m.net.parameters())
    with pyro.get_param_store().scope():
        torch.manual_seed(11)
        loss = _mf_loss(m)
        g_svi = torch.autograd.grad(loss, params)
    torch.manual_seed(11)
    ref = -m.elbo_terms(m._train)["elbo"].sum()
    g_ref = torch.autograd.grad(ref, params)
    assert abs(loss.item() - ref.item()) < 1e-8 * abs(ref.item())
    for a, b in zip(g_svi, g_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)
    assert m.elbo_terms(m._train)["kl"].sum().item() > 1.0  # the KL term is really in there


def test_subsampled_plate_scales_by_n_over_batch(data):
    m = GPVAE(2, hidden=16).fit(data[1], steps=0, seed=0)
    with pyro.get_param_store().scope():
        torch.manual_seed(5)
        loss = _mf_loss(m, batch_size=4)
    torch.manual_seed(5)
    idx = torch.randperm(16)[:4]  # the plate's subsample, drawn first from the same stream
    with torch.no_grad():
        ref = -(16 / 4) * m.elbo_terms(m._train[idx])["elbo"].sum().item()
        full = -m.elbo_terms(m._train)["elbo"].sum().item()
    assert abs(loss.item() - ref) < 1e-8 * abs(ref)
    assert abs(ref - full) > 1e-3 * abs(full)  # a real subsample, not the full batch


@pytest.mark.parametrize("form", ["markov", "dense"])
def test_path_distributions_vs_dense_gaussians(form):
    """log p, log q, KL(q ‖ p) and q's mean against dense MVN algebra: Σ = (K⁻¹ + Λ)⁻¹, m = Σ Λ ỹ."""
    torch.manual_seed(0)
    L, B, T = 2, 3, 15
    kernel = Matern(nu=1.5, batch_shape=torch.Size([L])).double()
    with torch.no_grad():
        kernel.lengthscale = torch.tensor([2.0, 6.0], dtype=torch.float64).reshape(L, 1, 1)
    times = torch.sort(torch.rand(T, dtype=torch.float64) * 20).values
    mean, prec = torch.randn(B, T, L, dtype=torch.float64), torch.rand(B, T, L, dtype=torch.float64) + 0.1
    prior = markov_prior(kernel, times) if form == "markov" else dense_prior(kernel, times)
    p, q = GPPathPrior(prior, B), AmortisedGPPosterior(prior, mean, prec)
    K = kernel(times[:, None]).to_dense().detach()
    Sig = torch.linalg.inv(torch.linalg.inv(K) + torch.diag_embed(prec.transpose(1, 2)))
    m = (Sig @ (prec * mean).transpose(1, 2).unsqueeze(-1)).squeeze(-1)  # (B, L, T)
    ref_p = torch.distributions.MultivariateNormal(torch.zeros(T, dtype=K.dtype), K)
    ref_q = torch.distributions.MultivariateNormal(m, Sig)
    z = torch.randn(4, B, T, L, dtype=torch.float64)  # rough paths: |log p| ~ 1e4, hence the relative tolerance
    with torch.no_grad():
        assert torch.allclose(p.log_prob(z), ref_p.log_prob(z.transpose(-1, -2)).sum(-1), atol=1e-8, rtol=1e-10)
        assert torch.allclose(q.log_prob(z), ref_q.log_prob(z.transpose(-1, -2)).sum(-1), atol=1e-8, rtol=1e-10)
        kl_ref = torch.distributions.kl_divergence(ref_q, torch.distributions.MultivariateNormal(
            torch.zeros(T, dtype=K.dtype), K)).sum(-1)
        assert torch.allclose(kl_divergence(q, p), kl_ref, atol=1e-8, rtol=0) and (kl_ref > 0.5).all()
        assert torch.allclose(q.mean, m.transpose(1, 2), atol=1e-9, rtol=0)
        assert p.rsample((2,)).shape == q.rsample((2,)).shape == (2, B, T, L)
        draws = p.rsample((3000,)).reshape(-1, T, L)  # 9000 paths: covariance entries have s.e. <= 0.015
        cov = torch.einsum("ntl,nsl->lts", draws, draws) / len(draws)
        assert (cov - K).abs().max() < 0.08
    other = GPPathPrior(markov_prior(kernel, times * 2) if form == "markov" else dense_prior(kernel, times * 2), B)
    with pytest.raises(NotImplementedError):  # another prior: no closed form, Pyro falls back to sampling
        kl_divergence(q, other)


def test_svi_fit_matches_adam(data, tmp_path):
    x, Y = data
    kw = dict(steps=120, lr=0.02, batch_size=4, seed=0, progress=False)
    adam = GPVAE(2, hidden=16).fit(Y, **kw)
    svi = GPVAE(2, hidden=16).fit(Y, method="svi", **kw)
    h = svi.history
    assert h.loss.iloc[-20:].mean() < h.loss.iloc[:5].mean() - 1.0
    assert {"step", "loss", "lengthscale_0", "lengthscale_1"} <= set(h.columns)
    r2_adam, r2_svi = r_squared_affine(adam.latents(), x), r_squared_affine(svi.latents(), x)
    assert r2_svi > 0.8 and abs(r2_svi - r2_adam) < 0.05
    assert len(pyro.get_param_store()) == 0  # the fit's param store was scoped
    svi.save(tmp_path / "svi.pt")
    assert np.allclose(GPVAE.load(tmp_path / "svi.pt").latents(), svi.latents(), atol=1e-12)
    fixed = GPVAE(2, hidden=16).fit(Y, method="svi", learn_kernel=False, **{**kw, "steps": 5})
    assert fixed.history.lengthscale_0.nunique() == 1


def test_batch_larger_than_the_data_is_the_full_batch(data):
    """batch_size >= the number of sequences means full batches on both paths (Pyro's plate used to reject it)."""
    Y = data[1][:4]
    kw = dict(steps=3, lr=0.01, seed=0, progress=False)
    for method in ("adam", "svi"):
        big = GPVAE(2, hidden=8).fit(Y, batch_size=8, method=method, **kw)
        full = GPVAE(2, hidden=8).fit(Y, method=method, **kw)
        np.testing.assert_allclose(big.history.loss, full.history.loss, rtol=1e-12)


def test_unknown_method_raises_before_state_changes(data):
    m = GPVAE(2, hidden=16)
    with pytest.raises(ValueError, match="`method`"):
        m.fit(data[1], steps=1, method="nuts")
    assert m._train is None and m.history is None


def test_model_rebuilds_prior_after_kernel_change(data):
    """The guide hands its prior to the next model call only while the kernel is unchanged."""
    m = GPVAE(2, hidden=16, dense_max=128).fit(data[1], steps=0, seed=0)  # the dense prior shows K directly
    with pyro.get_param_store().scope():
        torch.manual_seed(2)
        guide = pyro.poutine.trace(m.pyro_guide).get_trace()
        with torch.no_grad():
            m.net.kernel.lengthscale = m.net.kernel.lengthscale * 2  # a .data write, invisible to _version
        model = pyro.poutine.trace(pyro.poutine.replay(m.pyro_model, trace=guide)).get_trace()
    K_guide, K_model = guide.nodes["z"]["fn"].prior.K, model.nodes["z"]["fn"].prior.K
    assert not torch.allclose(K_guide, K_model)
    assert torch.allclose(K_model, dense_prior(m.net.kernel, m._times).K)
