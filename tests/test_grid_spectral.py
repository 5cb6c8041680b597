"""1-D Gaussian / Student-t spectral mixtures: values against independent kernels, analytic
derivatives against autograd and finite differences, spectral densities by numerical Fourier inversion."""
import math

import numpy as np
import pytest
import torch

import latentgp as lgp
from latentgp.kernels import Matern, SpectralMixture
from latentgp.kernels.grid_spectral import GaussianSpectralMixture, StudentTSpectralMixture
from latentgp.models.grid import GridGP

DT = torch.float64


def _set(k, means, scales, log_weights):
    k.means = torch.tensor(means, dtype=DT)
    k.scales = torch.tensor(scales, dtype=DT)
    with torch.no_grad():
        k.log_weights.copy_(torch.tensor(log_weights, dtype=DT))
    return k


KERNELS = {
    "gaussian": lambda: _set(GaussianSpectralMixture(3).to(DT), [0.5, 2.0, 3.1], [0.3, 0.7, 1.1], [0.1, -0.5, 0.3]),
    "student_t3": lambda: _set(StudentTSpectralMixture(3, order=3).to(DT), [0.5, 2.0, 3.1], [0.3, 0.7, 1.1],
                               [0.1, -0.5, 0.3]),
    "student_t2": lambda: _set(StudentTSpectralMixture(2, order=2).to(DT), [0.8, 2.5], [0.4, 0.9], [0.0, -0.2]),
}


def test_gaussian_matches_spectral_mixture_kernel():
    ours = KERNELS["gaussian"]()
    ref = SpectralMixture(3).to(DT)
    ref.means = ours.means.detach()[:, None]
    ref.scales = ours.scales.detach()[:, None]
    with torch.no_grad():
        ref.log_weights.copy_(ours.log_weights)
    x = torch.linspace(-1, 2, 9, dtype=DT)[:, None]
    np.testing.assert_allclose(ours(x).to_dense().detach(), ref(x).to_dense().detach(), atol=1e-13)


@pytest.mark.parametrize("order", [2, 3])
def test_student_t_envelope_is_matern(order):
    ours = _set(StudentTSpectralMixture(1, order=order).to(DT), [1e-12], [0.2], [0.0])
    ref = Matern(nu=order + 0.5).to(DT)
    ref.lengthscale = torch.tensor(1 / (2 * math.pi * 0.2), dtype=DT)
    x = torch.linspace(-1, 2, 9, dtype=DT)[:, None]
    np.testing.assert_allclose(ours(x).to_dense().detach(), ref(x).to_dense().detach(), atol=1e-12)


@pytest.mark.parametrize("name", list(KERNELS))
def test_cross_derivatives_match_autograd(name):
    k = KERNELS[name]()
    x = torch.tensor([0.1, 0.37, -0.2, 1.3], dtype=DT, requires_grad=True)
    xp = torch.tensor([0.3, 0.05, -0.45, 0.2], dtype=DT, requires_grad=True)  # x != x' (|tau| kink at 0)
    val = k.derivative(x - xp, 0)
    d_xp = torch.autograd.grad(val.sum(), xp, create_graph=True)[0]
    d_xpxp = torch.autograd.grad(d_xp.sum(), xp, create_graph=True)[0]
    d_x_xpxp = torch.autograd.grad(d_xpxp.sum(), x, create_graph=True)[0]
    d_xx_xpxp = torch.autograd.grad(d_x_xpxp.sum(), x)[0]
    for (a, b), want in {(0, 1): d_xp, (0, 2): d_xpxp, (1, 2): d_x_xpxp, (2, 2): d_xx_xpxp}.items():
        got = torch.diagonal(k.cross_derivative(x, xp, a, b))
        want = want.detach()
        np.testing.assert_allclose(got.detach(), want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))


@pytest.mark.parametrize("name", list(KERNELS))
def test_derivatives_at_zero_lag_match_finite_differences(name):
    k = KERNELS[name]()
    h = 1e-6  # Matérn-5/2's 4th derivative has a |tau| kink: the central difference errs by O(h)
    t = torch.tensor([-h, 0.0, h], dtype=DT)
    with torch.no_grad():
        for j in range(1, 5):
            lower = k.derivative(t, j - 1)
            fd = (lower[2] - lower[0]) / (2 * h)
            exact = k.derivative(t, j)[1]
            scale = float(k.derivative(t, j - (j % 2))[1].abs()) if j % 2 else abs(float(exact))
            assert abs(float(fd - exact)) <= 1e-5 * max(scale, 1.0)


@pytest.mark.parametrize("name", list(KERNELS))
def test_spectral_density_inverts_to_the_kernel(name):
    k = KERNELS[name]()
    s = torch.linspace(-400, 400, 800001, dtype=DT)  # Student-t tails decay like s^-(2p+2)
    with torch.no_grad():
        dens = k.spectral_density(2 * math.pi * s)
        taus = torch.tensor([0.0, 0.2, 0.55, 1.1], dtype=DT)
        inv = torch.trapezoid(dens[None, :] * torch.cos(2 * math.pi * s[None, :] * taus[:, None]), s, dim=1)
        want = k.derivative(taus, 0)
    np.testing.assert_allclose(inv, want, atol=2e-6)
    assert float(want[0]) == pytest.approx(float(k.weights.detach().sum()), rel=1e-12)


def test_bad_input():
    with pytest.raises(ValueError, match="order"):
        StudentTSpectralMixture(2, order=1)
    with pytest.raises(ValueError, match="num_mixtures"):
        GaussianSpectralMixture(0)
    k = GaussianSpectralMixture(2).to(DT)
    with pytest.raises(ValueError, match="order"):
        k.derivative(torch.zeros(3, dtype=DT), 5)
    with pytest.raises(ValueError, match="1-D kernel"):
        k(torch.zeros(3, 2, dtype=DT)).to_dense()


def test_product_over_dimensions_in_gridgp_with_save(tmp_path, rng):
    grid = [np.linspace(0, 1, 6), np.linspace(0, 2, 5)]
    kernels = [KERNELS["gaussian"](), KERNELS["student_t3"]()]
    values = rng.normal(size=(6, 5))
    model = GridGP(kernels, grid, noise=0.1).fit(values, steps=0)
    mesh = np.stack(np.meshgrid(*grid, indexing="ij"), -1).reshape(-1, 2)
    X = torch.tensor(mesh)
    with torch.no_grad():
        K = kernels[0](X[:, :1]).to_dense() * kernels[1](X[:, 1:]).to_dense() + 0.1 * torch.eye(30, dtype=DT)
        c = model.prior.mean_module.constant
        lml = torch.distributions.MultivariateNormal(c.expand(30), K).log_prob(torch.tensor(values.reshape(-1)))
    assert model.log_marginal_likelihood() == pytest.approx(float(lml), abs=1e-8)
    model.save(tmp_path / "m.pt")
    assert lgp.load(tmp_path / "m.pt").log_marginal_likelihood() == pytest.approx(float(lml), abs=1e-8)
