"""Matern kernel: agreement with gpytorch / sklearn, zero-distance gradients, spectral density."""
import math

import gpytorch
import mpmath
import numpy as np
import pytest
import torch
from scipy.integrate import quad
from sklearn.gaussian_process.kernels import Matern as SkMatern

import latentgp.kernels.matern as matern_mod
from latentgp.kernels.matern import Matern, matern_spectral_density

D64 = torch.float64


def _t(x):
    return torch.as_tensor(x, dtype=D64)


def _kernel(nu, lengthscale, **kw):
    k = Matern(nu=nu, **kw).double()
    k.lengthscale = _t(lengthscale)  # a python float would round-trip through float32
    return k


def _dense(k, x1, x2=None, **kw):
    out = k(x1, x2, **kw) if x2 is not None else k(x1, **kw)
    return out.to_dense() if hasattr(out, "to_dense") else out


@pytest.mark.parametrize("nu", [0.5, 1.5, 2.5])
def test_equals_gpytorch_matern(nu):
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(2, 9, 3, generator=g, dtype=D64), torch.randn(2, 6, 3, generator=g, dtype=D64)
    ls = _t([[[0.7, 1.3, 2.1]], [[0.4, 0.9, 3.0]]])  # batch 2, ARD 3
    ours = _kernel(nu, ls, ard_num_dims=3, batch_shape=torch.Size([2]))
    ref = gpytorch.kernels.MaternKernel(nu=nu, ard_num_dims=3, batch_shape=torch.Size([2])).double()
    ref.lengthscale = ls
    assert (_dense(ours, x1, x2) - _dense(ref, x1, x2)).abs().max() < 1e-12
    # k(X, X): gpytorch's expanded |a|^2+|b|^2-2ab distance leaves ~1e-8 on its nu = 1/2
    # diagonal (sqrt of rounding); ours is exactly 1 there, so compare off-diagonal only.
    off = ~torch.eye(9, dtype=torch.bool)
    assert (_dense(ours, x1) - _dense(ref, x1))[:, off].abs().max() < 1e-12
    assert torch.equal(torch.diagonal(_dense(ours, x1), dim1=-2, dim2=-1), torch.ones(2, 9, dtype=D64))
    assert (ours(x1, diag=True) - ref(x1, diag=True)).abs().max() < 1e-12
    assert ours(x1, x2).shape == (2, 9, 6)
    # Shared lengthscale, no grad: gpytorch takes its separate MaternCovariance path.
    ours1, ref1 = _kernel(nu, 0.8), gpytorch.kernels.MaternKernel(nu=nu).double()
    ref1.lengthscale = _t(0.8)
    with torch.no_grad():
        assert (_dense(ours1, x1[0], x2[0]) - _dense(ref1, x1[0], x2[0])).abs().max() < 1e-12


@pytest.mark.parametrize("nu", [0.5, 0.8, 1.2, 1.5, 2.5, 3.5, 3.7, 7.5])
def test_equals_sklearn_matern(nu):
    rng = np.random.default_rng(1)
    x1, x2 = rng.normal(size=(12, 2)), rng.normal(size=(7, 2))
    for ls in (0.9, [0.5, 2.0]):
        ard = None if np.isscalar(ls) else 2
        ours = _dense(_kernel(nu, ls, ard_num_dims=ard), _t(x1), _t(x2)).detach().numpy()
        ref = SkMatern(length_scale=ls, nu=nu)(x1, x2)
        assert np.abs(ours - ref).max() < 1e-12


def test_general_path_continuous_with_closed_form():
    x = torch.randn(10, 2, dtype=D64, generator=torch.Generator().manual_seed(2))
    closed = _dense(_kernel(1.5, 1.1), x)
    general = _dense(_kernel(1.5 + 1e-9, 1.1), x)
    assert (closed - general).abs().max() < 1e-8


def test_high_order_half_integer_and_far_points():
    # p = 50 closed form vs mpmath's Bessel formula; huge distances give 0, not NaN.
    nu, r = 50.5, [1e-3, 0.3, 2.0, 9.0]
    got = matern_mod._matern_from_r(_t(r), nu)
    with mpmath.workdps(40):
        ref = [float(2 ** (1 - nu) / mpmath.gamma(nu) * (mpmath.sqrt(2 * nu) * v) ** nu
                     * mpmath.besselk(nu, mpmath.sqrt(2 * nu) * v)) for v in r]
    assert np.allclose(got.numpy(), ref, rtol=1e-12, atol=0)
    far = matern_mod._matern_from_r(_t([1e5, 1e200, math.inf]), 0.8)
    assert torch.equal(far, torch.zeros(3, dtype=D64))


@pytest.mark.parametrize("nu", [0.3, 0.8, 1.5, 2.5])
def test_gradients_at_zero_distance(nu):
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(4, 2, generator=g, dtype=D64)
    x2 = torch.randn(3, 2, generator=g, dtype=D64)
    x2[0] = x1[1]  # an exactly-zero distance, with x1 and x2 perturbed independently
    k = _kernel(nu, [0.7, 1.6], ard_num_dims=2)
    # Central differences see k(+e) = k(-e) at the zero-distance entry, so gradcheck also
    # validates the 0 there (for nu <= 1/2 it is the symmetric subgradient).
    inputs = (x1.requires_grad_(), x2.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: k(a, b).to_dense(), inputs)
    # Lengthscale gradient vs central finite differences on the raw parameter.
    k.zero_grad()
    _dense(k, x1.detach(), x2.detach()).sum().backward()
    raw, grad, eps = k.raw_lengthscale, k.raw_lengthscale.grad.clone(), 1e-6
    fd = torch.zeros_like(grad)
    with torch.no_grad():
        for j in range(2):
            for s in (1, -1):
                raw[..., j] += s * eps
                fd[..., j] += s * _dense(k, x1, x2).sum() / (2 * eps)
                raw[..., j] -= s * eps
    assert torch.allclose(grad, fd, rtol=1e-7, atol=1e-9)
    # The zero-distance entry alone: value exactly 1, gradients exactly 0 (lengthscale always;
    # inputs because k is even in x1 - x2).
    a, b = x1[1:2].detach().clone().requires_grad_(), x2[0:1].detach().clone().requires_grad_()
    k.zero_grad()
    entry = _dense(k, a, b)[0, 0]
    assert entry.item() == 1.0
    entry.backward()
    assert a.grad.abs().max() == 0 and b.grad.abs().max() == 0
    assert k.raw_lengthscale.grad.abs().max() == 0
    # Full k(X, X) (zero diagonal distances) and diag mode: no NaN anywhere in gradients.
    x = x1.detach().clone().requires_grad_()
    k.zero_grad()
    (_dense(k, x).sum() + k(x, diag=True).sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(k.raw_lengthscale.grad).all()


def test_expanded_distance_path_matches(monkeypatch):
    g = torch.Generator().manual_seed(4)
    x1 = torch.randn(2, 30, 3, generator=g, dtype=D64) + 1e3  # offset: centring must cope
    x2 = torch.cat([x1[:, :5], torch.randn(2, 10, 3, generator=g, dtype=D64) + 1e3], dim=-2)
    k = _kernel(0.8, [0.5, 1.0, 2.0], ard_num_dims=3)
    direct = _dense(k, x1, x2)
    monkeypatch.setattr(matern_mod, "_DIFF_MAX_ELEMENTS", 0)
    expanded = _dense(k, x1, x2)
    assert (direct - expanded).abs().max() < 1e-10


def test_last_dim_is_batch():
    x = torch.randn(5, 3, dtype=D64, generator=torch.Generator().manual_seed(5))
    k = _kernel(1.2, 0.9)
    out = k(x, last_dim_is_batch=True).to_dense()
    assert out.shape == (3, 5, 5)
    assert torch.allclose(out[1], _dense(k, x[:, 1:2]), atol=1e-14)


@pytest.mark.parametrize("nu", [0.8, 1.5, 2.5])
def test_spectral_density_1d_fourier(nu):
    # S(w) = 2 int_0^inf k(tau) cos(w tau) dtau; k is < 1e-35 beyond z = 90.
    for ls in (0.6, 2.3):
        k = _kernel(nu, ls)
        omega = _t([0.0, 0.7, 5.0])
        dens = k.spectral_density(omega)
        assert dens.shape == (3,)
        for w, s in zip(omega.tolist(), dens.tolist(), strict=True):
            val, _ = quad(lambda t, ls=ls: matern_mod._matern_from_r(_t([t / ls]), nu).item(),
                          0, 90 * ls / math.sqrt(2 * nu), weight="cos", wvar=w, epsabs=0, epsrel=1e-10,
                          limit=500)
            assert abs(2 * val - s) / s < 1e-6


@pytest.mark.parametrize("nu", [0.8, 2.5])
def test_spectral_density_2d_integrates_to_one(nu):
    # (2 pi)^-2 int S(w) dw = k(0) = 1, with ARD lengthscales; polar coordinates, trapezoid
    # in angle (spectrally accurate for periodic integrands), adaptive quad in radius.
    ls = _t([[0.5, 1.7]])
    theta = torch.arange(64, dtype=D64) * (2 * math.pi / 64)
    direction = torch.stack([theta.cos(), theta.sin()], -1)

    def radial(rho):
        return rho * matern_spectral_density(rho * direction, nu, ls).mean().item() * 2 * math.pi

    total = quad(radial, 0, 1.0, epsabs=0, epsrel=1e-11)[0] + quad(radial, 1.0, math.inf, epsrel=1e-11)[0]
    assert abs(total / (2 * math.pi) ** 2 - 1.0) < 1e-6


def test_spectral_density_shapes_and_gpytorch_lengthscale():
    ls = _t([[[0.5, 1.0]], [[2.0, 0.3]], [[1.0, 1.0]]])  # (3, 1, 2)
    k = _kernel(1.3, ls, ard_num_dims=2, batch_shape=torch.Size([3]))
    omega = torch.randn(4, 2, dtype=D64)
    s = k.spectral_density(omega)
    assert s.shape == (3, 4)
    # prod(l) S0(l * w): batch member 2 (unit lengthscale) equals the standard form.
    d, nu = 2, 1.3
    s0 = (2**d * math.pi ** (d / 2) * math.gamma(nu + d / 2) * (2 * nu) ** nu / math.gamma(nu)
          * (2 * nu + omega.pow(2).sum(-1)) ** (-(nu + d / 2)))
    assert torch.allclose(s[2], s0, rtol=1e-13)
    # Shared (1, 1) lengthscale broadcast over d = 2 counts l twice in prod(l).
    s_iso = matern_spectral_density(omega, nu, _t([[2.0]]))
    assert torch.allclose(s_iso, matern_spectral_density(omega, nu, _t([[2.0, 2.0]])), rtol=1e-14)
    # gpytorch's MaternKernel lengthscale layout works directly (the dispatcher relies on it).
    g = gpytorch.kernels.MaternKernel(nu=1.5).double()
    assert matern_spectral_density(omega[:, 0], g.nu, g.lengthscale).shape == (4,)


def test_bad_nu():
    for bad in (0, -1, 0.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="nu"):
            Matern(nu=bad)
    for bad in ("a", None, True):
        with pytest.raises(TypeError, match="nu"):
            Matern(nu=bad)
    with pytest.raises(ValueError, match="nu"):
        matern_spectral_density(_t([1.0]), -0.5, _t([[1.0]]))
    assert Matern(nu=2).nu == 2.0 and isinstance(Matern(nu=2).nu, float)


def test_float32_and_far_apart_points():
    x = torch.rand(6, 2, generator=torch.Generator().manual_seed(6))
    for nu in (0.8, 3.5):
        out = Matern(nu)(x * 1e30).to_dense()  # z would overflow float32 without the clamp
        assert out.dtype == torch.float32
        assert torch.equal(out, torch.eye(6))
