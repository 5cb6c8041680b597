"""The dense short-sequence GP-VAE posterior vs the dense Gaussian reference and the O(T) Kalman path."""
import math

import numpy as np
import pytest
import torch
from test_gpvae import dense_posterior

from latentgp.kernels import Matern
from latentgp.models.gpvae import GPVAE
from latentgp.variational.amortised import (
    diagonal_sites,
    gp_prior,
    markov_posterior,
    markov_prior,
    posterior_and_samples,
)
from latentgp.variational.amortised_dense import DensePrior, dense_prior, site_solve

L, B, T = 2, 3, 12


def make_kernel(nu=1.5):
    kernel = Matern(nu=nu, batch_shape=torch.Size([L])).double()
    with torch.no_grad():
        kernel.lengthscale = torch.tensor([2.0, 5.0], dtype=torch.float64).reshape(L, 1, 1)
    return kernel


@pytest.fixture(params=["irregular", "regular"])
def setup(request):
    gen = torch.Generator().manual_seed(0)
    if request.param == "irregular":
        times = torch.sort(torch.rand(T, generator=gen, dtype=torch.float64) * 20).values
    else:
        times = torch.arange(T, dtype=torch.float64) * 1.3 + 0.4
    mean = torch.randn(B, T, L, generator=gen, dtype=torch.float64)
    prec = torch.rand(B, T, L, generator=gen, dtype=torch.float64) * 2 + 0.1
    return make_kernel(), times, mean, prec


@pytest.mark.parametrize("nu", [0.5, 1.5, 2.5])
def test_dense_prior_is_the_kernel_and_factor(setup, nu):
    _, times, _, _ = setup
    kernel = make_kernel(nu)
    prior = dense_prior(kernel, times)
    K = kernel(times[:, None]).to_dense()
    assert torch.allclose(prior.K, K, atol=1e-12, rtol=0)
    # M is a factor of K read off the state space (f = M ε is a prior path), exact up to noise_factors' jitter
    assert torch.allclose(prior.M @ prior.M.transpose(-1, -2), K, atol=1e-9, rtol=0)
    assert prior.M.shape == (L, T, T * (int(nu) + 1))


def test_dense_posterior_matches_dense_reference_and_kalman(setup):
    kernel, times, mean, prec = setup
    prior = dense_prior(kernel, times)
    from latentgp.variational.amortised_dense import dense_posterior_and_samples

    post, z = dense_posterior_and_samples(prior, mean, prec, 2, marginal_var=True)
    m, Sig, kl, _ = dense_posterior(kernel, times, mean, prec)
    kalman = markov_posterior(markov_prior(kernel, times), diagonal_sites(mean, prec))
    for ref in (m, kalman.mean):
        assert torch.allclose(post.mean, ref, atol=1e-10, rtol=0)
    assert torch.allclose(post.var, Sig.diagonal(dim1=-2, dim2=-1).transpose(1, 2), atol=1e-10, rtol=0)
    assert torch.allclose(post.kl, kl, atol=1e-9, rtol=0) and torch.allclose(post.kl, kalman.kl, atol=1e-9, rtol=0)
    assert torch.allclose(post.log_z, kalman.log_z, atol=1e-9, rtol=0)
    assert z.shape == (2, B, T, L) and (kl > 0.5).all()


@pytest.mark.parametrize("path", ["dense", "kalman"])
def test_kl_gradients_match_dense_reference(setup, path):
    """KL gradients (site means, precisions, lengthscale) of both posterior paths -- the dense one through its
    closed-form SPD-inverse backward, the Kalman smoother through autograd -- equal the dense reference's."""
    kernel, times, mean, prec = setup

    def fast_kl(m, p):
        if path == "dense":
            return posterior_and_samples(dense_prior(kernel, times), m, p, 1)[0].kl.sum()
        return markov_posterior(markov_prior(kernel, times), diagonal_sites(m, p)).kl.sum()

    grads = []
    for kl_fn in (fast_kl, lambda m, p: dense_posterior(kernel, times, m, p)[2].sum()):
        mean_, prec_ = mean.clone().requires_grad_(True), prec.clone().requires_grad_(True)
        kernel.zero_grad()
        kl_fn(mean_, prec_).backward()
        grads.append([mean_.grad, prec_.grad, kernel.raw_lengthscale.grad.clone()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-8, rtol=1e-8)
        assert a.abs().max() > 1e-3


def test_site_solve_and_draws_gradcheck():
    """Finite differences of the closed-form backward, and of the reparameterised draws (fixed noise)."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(2, 5, 5, dtype=torch.float64, generator=gen)
    K = (X @ X.transpose(-1, -2) / 5).requires_grad_(True)
    root = (torch.rand(3, 2, 5, dtype=torch.float64, generator=gen) + 0.5).requires_grad_(True)
    r = torch.randn(2, 3, 2, 5, dtype=torch.float64, generator=gen).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda k, a, b: site_solve(0.5 * (k + k.transpose(-1, -2)), a, b), (K, root, r))
    alpha, trace, logdet = site_solve(K, root, r)  # and the forward against explicit inverses
    Bm = torch.eye(5, dtype=torch.float64) + root[..., :, None] * K * root[..., None, :]
    assert torch.allclose(alpha, root * (torch.linalg.inv(Bm) @ (root * r).unsqueeze(-1)).squeeze(-1), atol=1e-12)
    assert torch.allclose(trace, torch.linalg.inv(Bm).diagonal(dim1=-2, dim2=-1).sum(-1), atol=1e-12)
    assert torch.allclose(logdet, torch.logdet(Bm), atol=1e-12)

    times = torch.arange(6, dtype=torch.float64)
    mean = torch.randn(2, 6, L, dtype=torch.float64, generator=gen).requires_grad_(True)
    prec = (torch.rand(2, 6, L, dtype=torch.float64, generator=gen) + 0.3).requires_grad_(True)
    ls = torch.tensor([2.0, 5.0], dtype=torch.float64).requires_grad_(True)

    def draws(mean, prec, ls):
        K = torch.exp(-0.5 * ((times[:, None] - times[None, :]) / ls[:, None, None]) ** 2)  # any K = M Mᵀ
        M = torch.linalg.cholesky(K + 1e-9 * torch.eye(6, dtype=torch.float64))
        post, z = posterior_and_samples(DensePrior(K, M), mean, prec, 2, torch.Generator().manual_seed(0))
        return z, post.kl

    assert torch.autograd.gradcheck(draws, (mean, prec, ls))


def test_dense_draws_have_the_posterior_moments(setup):
    kernel, times, mean, prec = setup
    S = 4000
    with torch.no_grad():
        _, z = posterior_and_samples(dense_prior(kernel, times), mean, prec, S, torch.Generator().manual_seed(1))
    m, Sig, _, _ = dense_posterior(kernel, times, mean, prec)
    zt = z.transpose(-1, -2)  # (S, B, L, T)
    se = Sig.diagonal(dim1=-2, dim2=-1).sqrt() / math.sqrt(S)
    assert ((zt.mean(0) - m.transpose(1, 2)).abs() < 4 * se).all()
    emp = torch.einsum("sblt,sblu->bltu", zt - zt.mean(0), zt - zt.mean(0)) / (S - 1)
    assert (emp - Sig).abs().max() < 0.08


def test_gpvae_dispatch_same_kl():
    """The model's ELBO KL term is the same number on the dense (short) and the Kalman path."""
    rng = np.random.default_rng(0)
    Y = rng.standard_normal((3, 30, 4))
    fast = GPVAE(2, hidden=8, dense_max=128).fit(Y, steps=0, progress=False, seed=0)
    assert isinstance(gp_prior(fast.net.kernel, fast._times, fast.config["dense_max"]), DensePrior)
    slow = GPVAE(2, hidden=8, dense_max=0).fit(Y, steps=0, progress=False, seed=0)
    y = fast._train
    kl_fast = fast.elbo_terms(y)["kl"]
    kl_slow = slow.elbo_terms(y)["kl"]
    assert torch.allclose(kl_fast, kl_slow, atol=1e-9, rtol=0) and (kl_fast > 1).all()
    # memory guard: a minibatch whose T x T temporaries exceed the budget goes to the Kalman path
    from latentgp.variational.amortised import DENSE_BUDGET, MarkovPrior

    big = DENSE_BUDGET // (2 * 30 * 30) + 1
    assert isinstance(gp_prior(fast.net.kernel, fast._times, 128, batch=big), MarkovPrior)
    with pytest.raises(TypeError, match="dense_max"):
        GPVAE(2, dense_max=1.5)
