"""SpectralMixture values and spectral densities vs numerical Fourier transforms (float64)."""
import math

import gpytorch
import numpy as np
import pytest
import torch
from scipy import integrate, special

from latentgp.kernels import HidaMatern, Matern, SpectralMixture, spectral_density

DT = torch.float64
RTOL_FT = 1e-6


def sm_kernel(q, d, batch=(), seed=0):
    batch = torch.Size(batch)
    g = torch.Generator().manual_seed(seed)
    k = SpectralMixture(num_mixtures=q, ard_num_dims=d, batch_shape=batch).to(DT)
    with torch.no_grad():
        k.log_weights.copy_(torch.randn(*batch, q, generator=g, dtype=DT))
    k.means = torch.rand(*batch, q, d, generator=g, dtype=DT) * 2
    k.scales = 0.2 + torch.rand(*batch, q, d, generator=g, dtype=DT)
    return k


def sm_direct(k, x1, x2):
    """k(tau) = sum_q w_q prod_d exp(-2 pi^2 tau_d^2 s_qd^2) cos(2 pi tau_d mu_qd), in numpy."""
    w, mu, s = (t.detach().numpy() for t in (k.weights, k.means, k.scales))
    tau = x1.numpy()[:, None, :] - x2.numpy()[None, :, :]
    out = np.zeros(tau.shape[:2])
    for q in range(len(w)):
        env = np.exp(-2 * np.pi**2 * tau**2 * s[q] ** 2)
        out += w[q] * np.prod(env * np.cos(2 * np.pi * tau * mu[q]), -1)
    return torch.from_numpy(out)


def gpytorch_sm(k):
    ref = gpytorch.kernels.SpectralMixtureKernel(num_mixtures=k.num_mixtures, ard_num_dims=k.num_dims).to(DT)
    ref.mixture_weights = k.weights.detach()
    ref.mixture_means = k.means.detach().unsqueeze(-2)  # gpytorch: (Q, 1, d)
    ref.mixture_scales = k.scales.detach().unsqueeze(-2)
    return ref


# ------------------------------------------------------------------ SpectralMixture values


def test_matches_gpytorch_in_1d():
    k = sm_kernel(3, 1)
    x1, x2 = torch.rand(9, 1, dtype=DT) * 5, torch.rand(6, 1, dtype=DT) * 5
    with torch.no_grad():
        ours = k(x1, x2).to_dense()
        assert (ours - gpytorch_sm(k)(x1, x2).to_dense()).abs().max() < 1e-12
        assert (ours - sm_direct(k, x1, x2)).abs().max() < 1e-12
        assert (k(x1, diag=True) - k.weights.sum()).abs().max() < 1e-12


def test_multi_dim():
    # gpytorch multiplies per-dimension *mixtures* (issue #1198), so it only agrees with the
    # per-component product for a single unit-weight component; check that and a direct formula
    k = sm_kernel(1, 3)
    with torch.no_grad():
        k.log_weights.zero_()
    x1, x2 = torch.rand(7, 3, dtype=DT), torch.rand(4, 3, dtype=DT)
    with torch.no_grad():
        assert (k(x1, x2).to_dense() - gpytorch_sm(k)(x1, x2).to_dense()).abs().max() < 1e-12
    k = sm_kernel(4, 3, seed=1)
    with torch.no_grad():
        assert (k(x1, x2).to_dense() - sm_direct(k, x1, x2)).abs().max() < 1e-12
        assert torch.allclose(k(x1, x1 + 0.1, diag=True), k(x1, x1 + 0.1).to_dense().diagonal())


def test_batch_shape():
    k = sm_kernel(2, 2, batch=torch.Size([3]))
    assert k.log_weights.shape == (3, 2) and k.means.shape == k.scales.shape == (3, 2, 2)
    x = torch.rand(3, 5, 2, dtype=DT)
    with torch.no_grad():
        K = k(x).to_dense()
        assert K.shape == (3, 5, 5)
        assert k(x, diag=True).shape == (3, 5)
        one = SpectralMixture(num_mixtures=2, ard_num_dims=2).to(DT)
        one.log_weights.copy_(k.log_weights[1])
        one.means, one.scales = k.means[1], k.scales[1]
        assert (K[1] - one(x[1]).to_dense()).abs().max() < 1e-14
        assert k.spectral_density(torch.randn(4, 2, dtype=DT)).shape == (3, 4)


def test_random_kernel_matrix_is_psd():
    k = sm_kernel(5, 2, seed=3)
    x = torch.rand(60, 2, dtype=DT) * 3
    with torch.no_grad():
        K = k(x).to_dense()
    assert torch.allclose(K, K.T)
    assert torch.linalg.eigvalsh(K).min() > -1e-10 * K.diagonal().max()


def test_gradients_and_validation():
    k = sm_kernel(2, 1)
    k(torch.rand(5, 1, dtype=DT)).to_dense().sum().backward()
    for name, p in k.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with pytest.raises(ValueError, match="1-D"):
        SpectralMixture(num_mixtures=2)(torch.rand(4, 3)).to_dense()
    with pytest.raises(ValueError, match="num_mixtures"):
        SpectralMixture(num_mixtures=0)


def test_initialize_from_data_finds_the_frequency():
    t = torch.linspace(0, 20, 400, dtype=DT)
    y = 2.0 * torch.sin(2 * math.pi * 0.8 * t) + 0.5 * torch.sin(2 * math.pi * 3.0 * t)
    k = SpectralMixture(num_mixtures=2).to(DT)
    k.initialize_from_data(t, y)
    found = sorted(k.means.squeeze(-1).tolist())
    assert found[0] == pytest.approx(0.8, abs=0.03) and found[1] == pytest.approx(3.0, abs=0.03)
    assert k.scales.squeeze().tolist() == pytest.approx([1 / 20, 1 / 20])
    assert k.weights.sum().item() == pytest.approx(y.var().item())
    # irregular 2-D inputs: finite, positive, below the Nyquist frequency of the median spacing
    x = torch.rand(300, 2, dtype=DT) * 10
    k2 = SpectralMixture(num_mixtures=3, ard_num_dims=2, batch_shape=torch.Size([2])).to(DT)
    k2.initialize_from_data(x, torch.sin(x[:, 0]) * torch.cos(2 * x[:, 1]))
    assert k2.means.shape == (2, 3, 2) and (k2.means > 0).all() and torch.isfinite(k2.means).all()


# ------------------------------------------------------------------ numerical Fourier transforms


def ft_1d(k_fn, w, upper):
    """S(w) = 2 int_0^upper k(tau) cos(w tau) dtau for an even kernel negligible beyond ``upper``."""
    val, _ = integrate.quad(k_fn, 0.0, upper, weight="cos", wvar=w, limit=500, epsabs=1e-14, epsrel=1e-12)
    return 2 * val


def ft_2d_separably_even(k_fn, w1, w2, upper):
    """S(w) = 4 int int k(t1, t2) cos(w1 t1) cos(w2 t2), valid when k is even in each coordinate."""

    def inner(t1):
        return ft_1d(lambda t2: k_fn(t1, t2), w2, upper) / 2

    return 4 * integrate.quad(inner, 0.0, upper, weight="cos", wvar=w1, limit=200, epsabs=1e-13,
                              epsrel=1e-10)[0]


def isotropic_2d(g, rho, upper):
    """2-D transform of a radial function: 2 pi int_0^inf g(r) J0(rho r) r dr."""
    val, _ = integrate.quad(lambda r: g(r) * special.j0(rho * r) * r, 0.0, upper, limit=1000,
                            epsabs=1e-14, epsrel=1e-12)
    return 2 * math.pi * val


def max_rel(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def test_spectral_mixture_density_1d():
    k = sm_kernel(3, 1)
    w, mu, s = (t.detach().numpy()[..., 0] if t.dim() > 1 else t.detach().numpy()
                for t in (k.weights, k.means, k.scales))

    def k_fn(t):
        return float(np.sum(w * np.exp(-2 * np.pi**2 * t**2 * s**2) * np.cos(2 * np.pi * t * mu)))

    ws = torch.tensor([0.0, 0.7, 3.0, 6.5, 11.0], dtype=DT)
    with torch.no_grad():
        S = spectral_density(k, ws)
    num = [ft_1d(k_fn, x, 2.0 / s.min()) for x in ws.tolist()]
    assert max_rel(S, num) < RTOL_FT


def test_spectral_mixture_density_2d():
    k = sm_kernel(2, 2, seed=5)
    ws = torch.tensor([[0.0, 0.0], [2.0, -1.0], [-4.0, 3.0]], dtype=DT)
    with torch.no_grad():
        S = k.spectral_density(ws)
    comps = list(zip(k.weights.tolist(), k.means.tolist(), k.scales.tolist(), strict=True))

    def k_fn(t1, t2):  # plain floats: the nested quadrature calls this ~1e5 times
        total = 0.0
        for wq, (m1, m2), (s1, s2) in comps:
            env = math.exp(-2 * math.pi**2 * ((t1 * s1) ** 2 + (t2 * s2) ** 2))
            total += wq * env * math.cos(2 * math.pi * t1 * m1) * math.cos(2 * math.pi * t2 * m2)
        return total

    upper = 2.0 / k.scales.min().item()
    num = [ft_2d_separably_even(k_fn, a, b, upper) for a, b in ws.tolist()]
    assert max_rel(S, num) < RTOL_FT


def rbf(ls):
    k = gpytorch.kernels.RBFKernel(ard_num_dims=len(ls)).to(DT)
    k.lengthscale = torch.tensor(ls, dtype=DT)
    return k


def matern(nu, ls, cls=gpytorch.kernels.MaternKernel):
    k = cls(nu=nu).to(DT)
    k.lengthscale = torch.tensor(ls, dtype=DT)
    return k


@pytest.mark.parametrize("nu", [0.5, 1.5, 2.5])
def test_rbf_and_matern_density_1d(nu):
    l = 0.7
    ws = [0.0, 0.5, 2.0, 7.0]
    kr, km = rbf([l]), matern(nu, l)
    with torch.no_grad():
        S_r = spectral_density(kr, torch.tensor(ws, dtype=DT))
        S_m = spectral_density(km, torch.tensor(ws, dtype=DT)[:, None])
        S_lm = spectral_density(matern(nu, l, Matern), torch.tensor(ws, dtype=DT))  # via its own method
    z = math.sqrt(2 * nu)
    poly = {0.5: lambda r: 1.0, 1.5: lambda r: 1 + z * r, 2.5: lambda r: 1 + z * r + (z * r) ** 2 / 3}[nu]
    num_r = [ft_1d(lambda t: math.exp(-0.5 * (t / l) ** 2), w, 12 * l) for w in ws]
    num_m = [ft_1d(lambda t: poly(t / l) * math.exp(-z * t / l), w, 60 * l) for w in ws]
    assert max_rel(S_r, num_r) < RTOL_FT
    assert max_rel(S_m, num_m) < RTOL_FT
    assert torch.allclose(S_lm, S_m, rtol=1e-12)


def test_rbf_density_2d_ard():
    ls = [0.6, 1.5]
    ws = [[0.0, 0.0], [1.0, 0.5], [-3.0, 2.0]]
    with torch.no_grad():
        S = spectral_density(rbf(ls), torch.tensor(ws, dtype=DT))
        S_iso = spectral_density(rbf([0.8]), torch.tensor(ws, dtype=DT))  # one lengthscale, 2-D omega

    def k_fn(t1, t2, a=ls[0], b=ls[1]):
        return math.exp(-0.5 * ((t1 / a) ** 2 + (t2 / b) ** 2))

    num = [ft_2d_separably_even(k_fn, a, b, 12 * max(ls)) for a, b in ws]
    assert max_rel(S, num) < RTOL_FT
    num_iso = [isotropic_2d(lambda r: math.exp(-0.5 * (r / 0.8) ** 2), math.hypot(a, b), 12.0) for a, b in ws]
    assert max_rel(S_iso, num_iso) < RTOL_FT


def test_matern_density_2d_ard():
    # isotropic in scaled coordinates: S(w) = prod(l) G(|l * w|), G the 2-D Hankel transform
    ls = torch.tensor([0.5, 1.2], dtype=DT)
    ws = torch.tensor([[0.0, 0.0], [1.0, -2.0], [4.0, 0.5]], dtype=DT)
    k = gpytorch.kernels.MaternKernel(nu=1.5, ard_num_dims=2).to(DT)
    k.lengthscale = ls
    with torch.no_grad():
        S = spectral_density(k, ws)
    z = math.sqrt(3)
    def g(r):
        return (1 + z * r) * math.exp(-z * r)

    num = [ls.prod().item() * isotropic_2d(g, (ls * w).norm().item(), 60) for w in ws]
    assert max_rel(S, num) < RTOL_FT


def test_dispatch_scale_sum_and_hida():
    base = matern(2.5, 0.9)
    hida = HidaMatern(order=1).to(DT)
    hida.omega = 2.0
    k = gpytorch.kernels.ScaleKernel(base).to(DT) + hida + rbf([0.4])
    k.kernels[0].outputscale = torch.tensor(1.7, dtype=DT)
    ws = torch.linspace(-5, 5, 7, dtype=DT)
    with torch.no_grad():
        S = spectral_density(k, ws)
        parts = 1.7 * spectral_density(base, ws) + hida.spectral_density(ws)
        parts = parts + spectral_density(rbf([0.4]), ws)
    assert torch.allclose(S, parts, rtol=1e-13)

    lh = hida.lengthscale.item()
    with torch.no_grad():  # the plain formula below is the kernel itself
        t = torch.tensor([[0.3], [2.0]], dtype=DT)
        row = k(torch.zeros(1, 1, dtype=DT), t).to_dense()[0]

    def k_fn(t):
        z5, z3 = math.sqrt(5) * t / 0.9, math.sqrt(3) * t / lh
        return (1.7 * (1 + z5 + z5**2 / 3) * math.exp(-z5) + (1 + z3) * math.exp(-z3) * math.cos(2 * t)
                + math.exp(-0.5 * (t / 0.4) ** 2))

    assert max_rel(row, [k_fn(0.3), k_fn(2.0)]) < 1e-12

    num = [ft_1d(k_fn, w, 40.0) for w in ws.tolist()]
    assert max_rel(S, num) < RTOL_FT


def test_dispatch_batched_scale():
    k = gpytorch.kernels.ScaleKernel(rbf([0.5]), batch_shape=torch.Size([2])).to(DT)
    k.outputscale = torch.tensor([1.0, 3.0], dtype=DT)
    with torch.no_grad():
        S = spectral_density(k, torch.linspace(0, 3, 4, dtype=DT))
    assert S.shape == (2, 4) and torch.allclose(S[1], 3 * S[0])


@pytest.mark.parametrize(
    "kernel, words",
    [
        (gpytorch.kernels.LinearKernel(), ["LinearKernel", "not stationary"]),
        (gpytorch.kernels.PolynomialKernel(power=2), ["PolynomialKernel"]),
        (gpytorch.kernels.PeriodicKernel(), ["PeriodicKernel"]),
        (gpytorch.kernels.RBFKernel() * gpytorch.kernels.RBFKernel(), ["ProductKernel", "convolution"]),
        (gpytorch.kernels.ScaleKernel(gpytorch.kernels.LinearKernel()), ["LinearKernel"]),
    ],
)
def test_unsupported_kernels_raise_type_error(kernel, words):
    with pytest.raises(TypeError) as info:
        spectral_density(kernel, torch.linspace(0, 1, 3))
    for w in words:
        assert w in str(info.value)
