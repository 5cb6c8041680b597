"""State-space forms reproduce their kernels exactly (float64, 1e-10)."""
import math

import gpytorch
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from latentgp.kernels import HidaMatern, Matern, SpectralMixture
from latentgp.kernels.state_space import StateSpaceForm, matern_state_space, state_space_form

DT = torch.float64
TOL = 1e-10


def matern_ref(tau, l, p):
    """Matérn(p + 1/2) written out by hand for p <= 3 (independent of the library's closed form)."""
    z = math.sqrt(2 * p + 1) * tau.abs() / l
    poly = {0: 1.0, 1: 1 + z, 2: 1 + z + z**2 / 3, 3: 1 + z + 2 * z**2 / 5 + z**3 / 15}[p]
    return poly * torch.exp(-z)


def kernel_row(kernel, dt):
    """k(dt) from the gpytorch kernel itself: covariance between t = 0 and t = dt."""
    with torch.no_grad():
        x0 = torch.zeros(1, 1, dtype=DT)
        return kernel(x0, dt.reshape(-1, 1)).to_dense()[..., 0, :]


def powers_reproduce(form: StateSpaceForm, dt: float, steps: int = 20):
    """H A(dt)^k P_inf H^T for k = 0..steps (the Kalman-filter path), shape (*batch, steps + 1)."""
    A = form.transition(torch.tensor([dt], dtype=DT))[..., 0, :, :]
    M = form.P_inf
    out = []
    for _ in range(steps + 1):
        out.append((form.H.unsqueeze(-2) @ M @ form.H.unsqueeze(-1))[..., 0, 0])
        M = A @ M
    return torch.stack(out, -1)


def check_form(form, kernel_fn, dts=(0.05, 0.37, 1.3)):
    """All structural checks shared by Matérn, Hida and composite forms; returns max error seen."""
    err = 0.0
    for dt in dts:  # regular grids: A(dt)^k
        ref = kernel_fn(dt * torch.arange(21, dtype=DT))
        err = max(err, (powers_reproduce(form, dt) - ref).abs().max().item())
    # irregular grid: product of A(dt_i) must give k(sum dt_i)
    g = torch.Generator().manual_seed(0)
    steps = torch.rand(15, generator=g, dtype=DT) * 0.8
    A = form.transition(steps)
    M = form.P_inf
    for i in range(15):
        M = A[..., i, :, :] @ M
        k_ss = (form.H.unsqueeze(-2) @ M @ form.H.unsqueeze(-1))[..., 0, 0]
        err = max(err, (k_ss - kernel_fn(steps[: i + 1].sum().reshape(1))[..., 0]).abs().max().item())
    # covariance() helper, incl. negative lags
    lags = torch.tensor([-2.0, -0.3, 0.0, 0.4, 3.0], dtype=DT)
    err = max(err, (form.covariance(lags) - kernel_fn(lags)).abs().max().item())
    assert err < TOL, err

    t1, t2 = torch.tensor([0.3, 1.1], dtype=DT), torch.tensor([0.9, 0.05], dtype=DT)
    semi = form.transition(t1) @ form.transition(t2) - form.transition(t1 + t2)
    assert semi.abs().max() < TOL

    dt = torch.tensor([0.0, 0.01, 0.5, 2.0, 10.0], dtype=DT)
    A, Q = form.transition(dt), form.process_noise(dt)
    scale = form.P_inf.diagonal(dim1=-1, dim2=-2).abs().max()
    assert torch.linalg.eigvalsh(Q).min() > -1e-10 * scale
    P = form.P_inf.unsqueeze(-3)
    assert (A @ P @ A.transpose(-1, -2) + Q - P).abs().max() < 1e-10 * scale
    assert Q[..., 0, :, :].abs().max() < 1e-12 * scale  # no noise over a zero step
    if form.F is not None:
        expm = torch.linalg.matrix_exp(form.F.unsqueeze(-3) * dt[:, None, None])
        assert ((A - expm).abs().amax((-1, -2)) <= 1e-10 * (1 + expm.abs().amax((-1, -2)))).all()
    return err


@pytest.mark.parametrize("p", [0, 1, 2, 3])
@pytest.mark.parametrize("l", [0.4, 1.7])
def test_matern_reproduces_kernel(p, l):
    form = matern_state_space(p + 0.5, torch.tensor([[l]], dtype=DT))
    assert form.state_dim == p + 1
    check_form(form, lambda tau: matern_ref(tau, l, p))


@pytest.mark.parametrize("p", [0, 1, 2, 3])
def test_matern_stationary_covariance_solves_lyapunov(p):
    # independent check of P_inf: F P + P F^T + L q L^T = 0 with white noise only on the top derivative
    form = matern_state_space(p + 0.5, torch.tensor([[0.8]], dtype=DT))
    lyap = form.F @ form.P_inf + form.P_inf @ form.F.mT
    off = lyap.clone()
    off[-1, -1] = 0.0
    assert off.abs().max() < 1e-10 * lyap.abs().max()
    assert lyap[-1, -1] < 0
    assert torch.allclose(form.P_inf, form.P_inf.mT)
    assert torch.linalg.eigvalsh(form.P_inf).min() > 0


def hida_ref(tau, l, w, order):
    return matern_ref(tau, l, order) * torch.cos(w * tau)


@pytest.mark.parametrize("order", [0, 1, 2, 3])
@pytest.mark.parametrize("l, w", [(0.5, 4.0), (2.0, 0.7)])
def test_hida_matern_reproduces_kernel(order, l, w):
    k = HidaMatern(order=order).to(DT)
    k.lengthscale, k.omega = torch.tensor(l, dtype=DT), w
    form = state_space_form(k)
    assert form.state_dim == 2 * (order + 1)
    check_form(form, lambda tau: hida_ref(tau, l, w, order))
    with torch.no_grad():
        check_form(form, lambda tau: kernel_row(k, tau))  # and the kernel's own forward


@pytest.mark.parametrize("make", [lambda nu: gpytorch.kernels.MaternKernel(nu=nu), lambda nu: Matern(nu=nu)])
@pytest.mark.parametrize("nu", [0.5, 1.5, 2.5])
def test_dispatch_matern_classes(make, nu):
    k = make(nu).to(DT)
    k.lengthscale = 0.7
    check_form(state_space_form(k), lambda tau: kernel_row(k, tau))


def test_batched_lengthscales_and_dt():
    ls = torch.tensor([0.3, 1.0, 2.5], dtype=DT).reshape(3, 1, 1)
    form = matern_state_space(2.5, ls)
    assert form.batch_shape == torch.Size([3])
    dt = torch.tensor([0.1, 0.7], dtype=DT)
    A, Q = form.transition(dt), form.process_noise(dt)
    assert A.shape == Q.shape == (3, 2, 3, 3)
    for b in range(3):
        one = matern_state_space(2.5, ls[b])
        assert torch.allclose(A[b], one.transition(dt), atol=1e-14, rtol=0)
        assert torch.allclose(Q[b], one.process_noise(dt), atol=1e-14, rtol=0)
    # per-batch time steps (*batch, T)
    dt_b = torch.rand(3, 4, dtype=DT)
    A_b = form.transition(dt_b)
    assert A_b.shape == (3, 4, 3, 3)
    assert torch.allclose(A_b[1], matern_state_space(2.5, ls[1]).transition(dt_b[1]), atol=1e-14, rtol=0)
    check_form(form, lambda tau: matern_ref(tau, ls[..., 0], 2))


def test_gradcheck_lengthscale():
    dt = torch.tensor([0.0, 0.2, 1.1], dtype=DT)

    def f(ls):
        form = matern_state_space(2.5, ls)
        return form.process_noise(dt), form.covariance(dt), form.P_inf

    ls = torch.tensor([[[0.7]], [[1.3]]], dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(f, (ls,))
    # w.r.t. the time steps too (learned input warps), including dt = 0
    steps = torch.tensor([0.0, 0.4], dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: matern_state_space(2.5, ls.detach()).process_noise(t), (steps,))


def test_gradients_flow_through_dispatcher():
    k = gpytorch.kernels.ScaleKernel(HidaMatern(order=1)) + gpytorch.kernels.ScaleKernel(Matern(nu=1.5))
    k = k.to(DT)
    form = state_space_form(k)
    loss = form.process_noise(torch.tensor([0.3, 0.9], dtype=DT)).sum() + form.P_inf.sum()
    loss.backward()
    for name, p in k.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def _composites():
    def matern(nu, l):
        k = gpytorch.kernels.MaternKernel(nu=nu)
        k.lengthscale = l
        return k

    def hida(order, l, w):
        k = HidaMatern(order=order)
        k.lengthscale, k.omega = torch.tensor(l, dtype=DT), w
        return k

    def scaled(k, s):
        out = gpytorch.kernels.ScaleKernel(k)
        out.outputscale = s
        return out

    return {
        "scale": scaled(matern(1.5, 0.6), 2.3),
        "sum": scaled(matern(0.5, 1.2), 0.4) + scaled(hida(1, 0.9, 4.0), 1.7) + Matern(nu=3.5),
        "product": matern(1.5, 2.0) * hida(0, 0.8, 2.5),
        "product_of_sum": scaled(matern(2.5, 1.1) * (matern(0.5, 0.7) + hida(1, 1.3, 1.0)), 0.6),
    }


@pytest.mark.parametrize("name", ["scale", "sum", "product", "product_of_sum"])
def test_composite_kernels(name):
    k = _composites()[name].to(DT)
    form = state_space_form(k)
    check_form(form, lambda tau: kernel_row(k, tau))


def test_batched_scale_over_unbatched_base():
    base = gpytorch.kernels.MaternKernel(nu=1.5)
    k = gpytorch.kernels.ScaleKernel(base, batch_shape=torch.Size([2])).to(DT)
    k.outputscale = torch.tensor([0.5, 3.0], dtype=DT)
    form = state_space_form(k)
    assert form.transition(torch.tensor([0.1, 0.2], dtype=DT)).shape == (2, 2, 2, 2)
    check_form(form, lambda tau: kernel_row(k, tau))


@pytest.mark.parametrize(
    "kernel, words",
    [
        (gpytorch.kernels.RBFKernel(), ["RBFKernel", "Matern(nu=2.5)", "HidaMatern"]),
        (gpytorch.kernels.PeriodicKernel(), ["PeriodicKernel", "HidaMatern"]),
        (Matern(nu=2.0), ["Matern(nu=2)", "nu = p + 1/2"]),
        (Matern(nu=1.5, ard_num_dims=2), ["Matern", "ard_num_dims"]),
        (SpectralMixture(num_mixtures=2), ["SpectralMixture", "HidaMatern"]),
        (gpytorch.kernels.LinearKernel(), ["LinearKernel"]),
        (gpytorch.kernels.MaternKernel(nu=0.5) * gpytorch.kernels.RBFKernel(), ["RBFKernel"]),
        (gpytorch.kernels.ScaleKernel(gpytorch.kernels.RQKernel()), ["RQKernel"]),
    ],
)
def test_unsupported_kernels_raise_informative_type_error(kernel, words):
    with pytest.raises(TypeError) as info:
        state_space_form(kernel)
    for w in words:
        assert w in str(info.value)


def test_matern_state_space_rejects_non_half_integer():
    with pytest.raises(ValueError, match="nu = p \\+ 1/2"):
        matern_state_space(2.0, 1.0)


@settings(max_examples=25, deadline=None)
@given(
    p=st.integers(0, 3),
    log_l=st.floats(-1.5, 1.5),
    dt1=st.floats(0.0, 3.0),
    dt2=st.floats(0.0, 3.0),
)
def test_property_semigroup_and_psd(p, log_l, dt1, dt2):
    form = matern_state_space(p + 0.5, torch.tensor([[math.exp(log_l)]], dtype=DT))
    d1, d2 = torch.tensor([dt1], dtype=DT), torch.tensor([dt2], dtype=DT)
    A12 = form.transition(d1) @ form.transition(d2)
    assert torch.allclose(A12, form.transition(d1 + d2), atol=1e-9 * (1 + A12.abs().max()), rtol=1e-9)
    scale = form.P_inf.diagonal().max()
    assert torch.linalg.eigvalsh(form.process_noise(d1 + d2)).min() > -1e-10 * scale
    assert abs(form.covariance(d1).item() - matern_ref(d1, math.exp(log_l), p).item()) < TOL


@pytest.mark.parametrize("make", [lambda nu: Matern(nu=nu, batch_shape=torch.Size([3])),
                                  lambda nu: gpytorch.kernels.MaternKernel(nu=nu, batch_shape=torch.Size([3]))])
@pytest.mark.parametrize("nu", [0.5, 1.5, 2.5])
def test_bare_matern_fast_path_matches_the_form(make, nu):
    """The one-node discretisation of a bare Matérn (closed-form d/dlambda in numpy) gives the form's A, Q, P_inf
    and the same lengthscale gradients as autograd through matern_state_space(...).discretise(...)."""
    from latentgp.kernels.state_space import bare_matern_discretised

    kernel = make(nu).double()
    with torch.no_grad():
        kernel.lengthscale = torch.tensor([0.7, 2.0, 9.0], dtype=torch.float64).reshape(3, 1, 1)
    dt = torch.tensor([0.0, 0.05, 0.3, 1.0, 4.0], dtype=torch.float64)
    A, Q, P, H = bare_matern_discretised(kernel, dt)
    form = state_space_form(kernel)
    A_ref, Q_ref = form.discretise(dt)
    for got, want in ((A, A_ref), (Q, Q_ref), (P, form.P_inf), (H, form.H[0])):
        assert torch.allclose(got, want, atol=1e-12, rtol=1e-12)
    gen = torch.Generator().manual_seed(0)
    w = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in (A, Q, P)]

    def grad(outs):
        return torch.autograd.grad(sum((o * g).sum() for o, g in zip(outs, w, strict=True)), kernel.raw_lengthscale)[0]
    g_fast, g_ref = grad((A, Q, P)), grad((A_ref, Q_ref, form.P_inf))
    assert torch.allclose(g_fast, g_ref, atol=1e-12, rtol=1e-10) and g_ref.abs().min() > 1e-3
    assert bare_matern_discretised(gpytorch.kernels.ScaleKernel(kernel), dt) is None  # composite: the form
    assert bare_matern_discretised(kernel, dt.clone().requires_grad_(True)) is None  # d/dt: the form


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bare_matern_fast_path_higher_order_and_float32(dtype):
    """nu = 7/2 (s = 4) and float32: same numbers as the form, gradients in the lengthscale's dtype."""
    from latentgp.kernels.state_space import bare_matern_discretised

    kernel = Matern(nu=3.5, batch_shape=torch.Size([2])).to(dtype)
    with torch.no_grad():
        kernel.lengthscale = torch.tensor([1.5, 6.0], dtype=dtype).reshape(2, 1, 1)
    dt = torch.tensor([0.0, 0.4, 2.0], dtype=dtype)
    A, Q, P, _ = bare_matern_discretised(kernel, dt)
    A_ref, Q_ref = state_space_form(kernel).discretise(dt)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert torch.allclose(A, A_ref, atol=tol, rtol=tol) and torch.allclose(Q, Q_ref, atol=tol, rtol=tol)
    g = torch.autograd.grad((A.sum() + Q.sum() + P.sum()), kernel.raw_lengthscale)[0]
    g_ref = torch.autograd.grad((A_ref.sum() + Q_ref.sum() + state_space_form(kernel).P_inf.sum()),
                                kernel.raw_lengthscale)[0]
    assert g.dtype == dtype and torch.allclose(g, g_ref, atol=tol, rtol=100 * tol)
