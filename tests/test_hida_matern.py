"""HidaMatern: value, parameters, state space and spectral density (float64)."""
import math

import gpytorch
import pytest
import torch
from scipy import integrate

from latentgp.kernels import HidaMatern

DT = torch.float64


def reference(tau, l, w, order):
    """gpytorch Matérn x cos for orders 0..2; order 3 written out by hand (gpytorch stops at nu = 2.5)."""
    tau = torch.as_tensor(tau, dtype=DT)
    if order <= 2:
        m = gpytorch.kernels.MaternKernel(nu=order + 0.5).to(DT)
        m.lengthscale = torch.tensor(l, dtype=DT)
        with torch.no_grad():
            km = m(torch.zeros(1, 1, dtype=DT), tau.reshape(-1, 1)).to_dense()[0]
    else:
        z = math.sqrt(7) * tau.abs() / l
        km = (1 + z + 2 * z**2 / 5 + z**3 / 15) * torch.exp(-z)
    return km.reshape(tau.shape) * torch.cos(w * tau)


def make(order, l, w, **kw):
    k = HidaMatern(order=order, **kw).to(DT)
    # float64 tensors set after .to(DT): Python floats pass through float32 in gpytorch setters
    k.lengthscale = torch.tensor(l, dtype=DT)
    k.omega = w
    return k


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_value_matches_matern_times_cos(order):
    k = make(order, 0.8, 3.1)
    x1 = torch.rand(7, 1, dtype=DT) * 4
    x2 = torch.rand(5, 1, dtype=DT) * 4
    with torch.no_grad():
        K = k(x1, x2).to_dense()
        ref = reference(x1 - x2.T, 0.8, 3.1, order)
        assert (K - ref).abs().max() < 1e-12
        d = k(x1, diag=True)
        assert (d - 1).abs().max() < 1e-14
        shifted = k(x1, x1 + 0.2, diag=True)
        assert (shifted - reference(torch.full((7,), -0.2, dtype=DT), 0.8, 3.1, order)).abs().max() < 1e-12


def test_batch_shape_parameters_and_setters():
    k = HidaMatern(order=2, batch_shape=torch.Size([3])).to(DT)
    assert k.omega.shape == k.lengthscale.shape == (3, 1, 1)
    assert torch.allclose(k.omega, torch.ones(3, 1, 1, dtype=DT))
    k.omega = torch.tensor([0.5, 1.0, 7.0], dtype=DT).reshape(3, 1, 1)
    k.lengthscale = torch.tensor([0.2, 1.0, 3.0], dtype=DT).reshape(3, 1, 1)
    x = torch.linspace(0, 2, 6, dtype=DT).reshape(6, 1)
    with torch.no_grad():
        K = k(x).to_dense()
    assert K.shape == (3, 6, 6)
    for b, (l, w) in enumerate([(0.2, 0.5), (1.0, 1.0), (3.0, 7.0)]):
        assert (K[b] - reference(x - x.T, l, w, 2)).abs().max() < 1e-12
    assert "raw_omega" in dict(k.named_parameters())
    assert HidaMatern(omega=2.5).omega.item() == pytest.approx(2.5)
    with pytest.raises(Exception):  # noqa: B017 - gpytorch raises on values outside the constraint
        k.omega = -1.0


def test_scale_kernel_and_gradients():
    k = gpytorch.kernels.ScaleKernel(make(1, 0.9, 2.0)).to(DT)
    k.outputscale = 2.5
    x = torch.rand(6, 1, dtype=DT)
    k(x).to_dense().sum().backward()
    base = k.base_kernel
    assert base.raw_omega.grad is not None and base.raw_omega.grad.abs() > 0
    assert base.raw_lengthscale.grad.abs() > 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_order_validation(bad):
    with pytest.raises(ValueError, match="order"):
        HidaMatern(order=bad)


def test_inputs_must_be_one_dimensional():
    with pytest.raises(ValueError, match="1-D"):
        HidaMatern()(torch.rand(4, 2)).to_dense()
    with pytest.raises(ValueError, match="ard_num_dims"):
        HidaMatern(ard_num_dims=2)
    # active_dims selects the time column of multi-column inputs
    k = HidaMatern(order=1, active_dims=[1]).to(DT)
    x = torch.rand(4, 3, dtype=DT)
    with torch.no_grad():
        assert torch.allclose(k(x).to_dense(), HidaMatern(order=1).to(DT)(x[:, 1:2]).to_dense())


def test_state_space_batched_and_gradcheck():
    k = HidaMatern(order=1, batch_shape=torch.Size([2])).to(DT)
    k.omega = torch.tensor([1.0, 5.0], dtype=DT).reshape(2, 1, 1)
    form = k.state_space()
    dt = torch.tensor([0.0, 0.3, 1.2], dtype=DT)
    assert form.transition(dt).shape == (2, 3, 4, 4)
    assert torch.allclose(form.covariance(dt)[1], reference(dt, k.lengthscale[1].item(), 5.0, 1), atol=1e-12)

    def g(ls, om):
        kk = HidaMatern(order=1).to(DT)
        del kk.raw_lengthscale, kk.raw_omega  # plain tensors in place of Parameters
        kk.raw_lengthscale = kk.raw_lengthscale_constraint.inverse_transform(ls)
        kk.raw_omega = kk.raw_omega_constraint.inverse_transform(om)
        sf = kk.state_space()
        return sf.process_noise(dt), sf.covariance(dt)

    ls = torch.tensor([[0.8]], dtype=DT, requires_grad=True)
    om = torch.tensor([[2.0]], dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(g, (ls, om))


def numerical_density(k_fn, w):
    """S(w) = 2 int_0^inf k(tau) cos(w tau) dtau for an even 1-D kernel (QAWF / QAWO via weight='cos')."""
    val, _ = integrate.quad(k_fn, 0.0, 60.0, weight="cos", wvar=w, limit=400, epsabs=1e-14, epsrel=1e-12)
    return 2 * val


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_spectral_density_vs_fourier_transform(order):
    l, w0 = 0.9, 3.0
    k = make(order, l, w0)
    ws = torch.tensor([0.0, 1.0, 2.9, 3.0, 4.5, 9.0], dtype=DT)
    with torch.no_grad():
        S = k.spectral_density(ws)
        assert S.shape == (6,)
        assert torch.allclose(S, k.spectral_density(ws[:, None]))

    def k_fn(t):  # plain-float Matérn x cos (fast for quad); the torch reference is checked above
        z = math.sqrt(2 * order + 1) * t / l
        poly = [1.0, 1 + z, 1 + z + z**2 / 3, 1 + z + 2 * z**2 / 5 + z**3 / 15][order]
        return poly * math.exp(-z) * math.cos(w0 * t)

    worst = 0.0
    for w, s in zip(ws.tolist(), S.tolist(), strict=True):
        num = numerical_density(k_fn, w)
        worst = max(worst, abs(s - num) / abs(num))
    assert worst < 1e-6, worst


def test_spectral_density_batched():
    k = HidaMatern(order=1, batch_shape=torch.Size([2])).to(DT)
    k.omega = torch.tensor([1.0, 5.0], dtype=DT).reshape(2, 1, 1)
    ws = torch.linspace(-6, 6, 5, dtype=DT)
    with torch.no_grad():
        S = k.spectral_density(ws)
        assert S.shape == (2, 5)
        one = HidaMatern(order=1, omega=5.0).to(DT)
        one.lengthscale = k.lengthscale[1]
        assert torch.allclose(S[1], one.spectral_density(ws))
