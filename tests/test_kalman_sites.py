"""The compiled GP-VAE posterior (numba forward + hand-written reverse pass) vs the dense GP twin and the scans."""
import pytest
import torch
from test_gpvae import dense_posterior

from latentgp.kernels import Matern
from latentgp.linalg.kalman_sites import NotPositiveDefinite, path_log_prob, site_posterior_and_samples
from latentgp.variational.amortised import (
    compiled_posterior_and_samples,
    markov_prior,
    matheron_normals,
    posterior_and_samples,
)

L, B, T = 2, 3, 11
DT = torch.float64


def dense_reference(kernel, times, mean, prec):
    """Mean, marginal variance, KL (test_gpvae's dense Gaussian reference) and log Z = log N(ỹ; 0, K + Λ⁻¹)."""
    m, Sig, kl, K = dense_posterior(kernel, times, mean, prec)
    cov = K + torch.diag_embed(1 / prec.transpose(1, 2))
    log_z = torch.distributions.MultivariateNormal(torch.zeros(len(times), dtype=DT), cov).log_prob(
        mean.transpose(1, 2))
    return m, Sig.diagonal(dim1=-2, dim2=-1).transpose(1, 2), kl, log_z.sum(-1)


def make_kernel(nu):
    kernel = Matern(nu=nu, batch_shape=torch.Size([L])).double()
    with torch.no_grad():
        kernel.lengthscale = torch.tensor([2.0, 5.0], dtype=DT).reshape(L, 1, 1)
    return kernel


def make_data(grid: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    if grid == "irregular":
        times = torch.sort(torch.rand(T, generator=gen, dtype=DT) * 20).values
    else:
        times = torch.arange(T, dtype=DT) * 1.3 + 0.4
    mean = torch.randn(B, T, L, generator=gen, dtype=DT).requires_grad_(True)
    prec = (torch.rand(B, T, L, generator=gen, dtype=DT) * 2 + 0.1).requires_grad_(True)
    weights = [torch.randn(B, T, L, generator=gen, dtype=DT) for _ in range(2)]
    return times, mean, prec, weights


@pytest.mark.parametrize("nu", [0.5, 1.5, 2.5])
@pytest.mark.parametrize("grid", ["regular", "irregular"])
def test_posterior_kl_and_gradients_match_dense_twin(nu, grid):
    """Mean, marginal variance, KL and log Z, and their gradients in the sites and the kernel's lengthscales,
    equal the dense Gaussian computation (K⁻¹, (K⁻¹ + Λ)⁻¹, autograd) to ~1e-9."""
    times, mean, prec, (w_m, w_v) = make_data(grid)
    kernel = make_kernel(nu)
    prior = markov_prior(kernel, times)
    assert prior.A.shape[1] == (1 if grid == "regular" else T)  # regular grids use one time-invariant (A, Q)
    post, _ = compiled_posterior_and_samples(prior, mean, prec, matheron_normals(prior, B, 1))
    m, var, kl, log_z = dense_reference(kernel, times, mean, prec)
    for got, want in ((post.mean, m), (post.var, var), (post.kl, kl), (post.log_z, log_z)):
        assert torch.allclose(got, want, atol=1e-10, rtol=1e-10)
    assert (kl > 0.5).all()

    params = [mean, prec, kernel.raw_lengthscale]

    def grads(mu, v, k, z):
        return torch.autograd.grad((w_m * mu).sum() + (w_v * v).sum() + k.sum() + 0.3 * z.sum(), params)
    for g_c, g_d in zip(grads(post.mean, post.var, post.kl, post.log_z), grads(m, var, kl, log_z), strict=True):
        assert torch.allclose(g_c, g_d, atol=1e-9, rtol=1e-8)
        assert g_d.abs().max() > 1e-3  # every gradient is exercised


@pytest.mark.parametrize("nu", [1.5, 2.5])
@pytest.mark.parametrize("grid", ["regular", "irregular"])
def test_draws_and_gradients_match_the_scans(grid, nu):
    """Same generator -> the same Matheron draws as the differentiable scans, with the same gradients (also the
    noise factors' jitter, which matters for the nearly singular Q of s = 3 on short steps)."""
    times, mean, prec, (w, _) = make_data(grid, seed=1)
    kernel = make_kernel(nu)
    params = [mean, prec, kernel.raw_lengthscale]
    out = []
    for compiled in (True, False):
        prior = markov_prior(kernel, times)
        post, z = posterior_and_samples(prior, mean, prec, 3, torch.Generator().manual_seed(5), compiled=compiled)
        assert z.shape == (3, B, T, L)
        obj = (z * w).sum() + post.kl.sum() + (post.var * w[0]).sum()
        out.append((z.detach(), post.kl.detach(), torch.autograd.grad(obj, params)))
    (z1, kl1, g1), (z2, kl2, g2) = out
    assert torch.allclose(z1, z2, atol=1e-9, rtol=0)
    assert torch.allclose(kl1, kl2, atol=1e-10, rtol=0)
    for a, b in zip(g1[:2], g2[:2], strict=True):  # the sites
        assert torch.allclose(a, b, atol=1e-8, rtol=1e-8)
    # the lengthscales: the draws' gradient passes through chol(Q)⁻¹; for s = 3 at the irregular grid's shortest
    # step (0.19, cond Q ≈ 4e5) both paths differ from central differences by ~3e-7 relative (rounding in
    # Q = P∞ - A P∞ Aᵀ), elsewhere they agree to ~1e-11
    rtol = 1e-6 if (nu, grid) == (2.5, "irregular") else 1e-8
    assert torch.allclose(g1[2], g2[2], atol=0, rtol=rtol)


def test_fallback_to_the_scans_draws_the_same_numbers():
    """A site with zero precision (no information) is outside the compiled path: the scans take over with the
    same random numbers; a non-positive-definite prior raises NotPositiveDefinite from the compiled function."""
    times, mean, prec, _ = make_data("regular", seed=2)
    prior = markov_prior(make_kernel(1.5), times)
    zero = prec.detach().clone()
    zero[0, 3, 1] = 0.0
    assert compiled_posterior_and_samples(prior, mean, zero, matheron_normals(prior, B, 2)) is None
    a = posterior_and_samples(prior, mean, zero, 2, torch.Generator().manual_seed(3))
    b = posterior_and_samples(prior, mean, zero, 2, torch.Generator().manual_seed(3), compiled=False)
    assert torch.equal(a[1], b[1]) and torch.isfinite(a[1]).all()
    torch.manual_seed(4)
    c = posterior_and_samples(prior, mean, zero, 2)[1]
    torch.manual_seed(4)
    d = posterior_and_samples(prior, mean, zero, 2, compiled=False)[1]
    assert torch.equal(c, d)  # also with the global generator

    bad_P0 = -prior.P0  # negative definite: the first predictive covariance fails the check
    eps, noise = torch.randn(T, 1, B, L * 2, 1, dtype=DT), torch.randn(1, B, L, T, 1, dtype=DT)
    with pytest.raises(NotPositiveDefinite):
        site_posterior_and_samples(prior.A, prior.Q, bad_P0, prior.H[0], mean, prec, eps, noise)
    with pytest.raises(ValueError, match="`h`"):
        site_posterior_and_samples(prior.A, prior.Q, prior.P0, prior.H[0].clone().requires_grad_(True), mean, prec,
                                   eps, noise)


@pytest.mark.parametrize("grid", ["regular", "irregular"])
@pytest.mark.parametrize("nu", [0.5, 1.5, 2.5])
def test_path_log_prob_matches_dense_gaussian(grid, nu):
    """log p(z) of noiseless paths (Pyro's latent-site density) = the dense N(0, K) log density, with gradients
    in the path and the lengthscales."""
    times, mean, _, _ = make_data(grid, seed=3)
    kernel = make_kernel(nu)
    prior = markov_prior(kernel, times)
    lp = path_log_prob(prior.A, prior.Q, prior.P0, prior.H[0], mean)
    K = kernel(times[:, None]).to_dense()
    ref = torch.distributions.MultivariateNormal(torch.zeros(T, dtype=DT), K).log_prob(mean.transpose(1, 2)).sum(-1)
    assert torch.allclose(lp, ref, atol=1e-9, rtol=1e-10)
    w = torch.randn(B, dtype=DT)
    params = [mean, kernel.raw_lengthscale]
    for a, b in zip(torch.autograd.grad((lp * w).sum(), params), torch.autograd.grad((ref * w).sum(), params),
                    strict=True):
        assert torch.allclose(a, b, atol=1e-8, rtol=1e-7) and b.abs().max() > 1e-3


def test_second_derivatives_are_refused():
    """The hand-written reverse passes are first order: asking for more raises instead of dropping terms."""
    times, mean, prec, _ = make_data("regular", seed=4)
    prior = markov_prior(make_kernel(1.5), times)
    post, _ = compiled_posterior_and_samples(prior, mean, prec, matheron_normals(prior, B, 1))
    (g,) = torch.autograd.grad(post.kl.sum(), prec, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
    lp = path_log_prob(prior.A, prior.Q, prior.P0, prior.H[0], mean)
    (g,) = torch.autograd.grad(lp.sum(), mean, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_regular_step_tolerates_rounding_of_the_times():
    """Evenly spaced grids whose times carry rounding (float32, offsets) keep the time-invariant (A, Q)."""
    from latentgp.variational.amortised import regular_step

    assert regular_step(torch.arange(100, dtype=torch.float32) * 0.02) is not None
    assert regular_step(5 + torch.arange(10000, dtype=DT) * 1e-3) is not None
    times = torch.arange(50, dtype=DT)
    times[20] += 1e-6  # a real irregularity
    assert regular_step(times) is None
    assert torch.allclose(regular_step(torch.linspace(0, 3, 31, dtype=DT)), torch.tensor([0.1], dtype=DT))
