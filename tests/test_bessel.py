"""log_bessel_kv: accuracy against scipy / mpmath, gradients, input validation."""
import math

import mpmath
import numpy as np
import pytest
import scipy.special
import torch

from latentgp.linalg.bessel import log_bessel_kv

NUS = [0.1, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 3.7, 7.5, 10.0, 37.3, 50.5, 99.5, 100.0]
XS = np.logspace(-8, 4, 121)


def _mp_log_kv(nu, x):
    with mpmath.workdps(40):
        return float(mpmath.log(mpmath.besselk(nu, mpmath.mpf(float(x)))))


def test_matches_scipy_kve_and_mpmath_on_grid():
    nu_g, x_g = np.meshgrid(NUS, XS, indexing="ij")
    got = log_bessel_kv(torch.tensor(nu_g), torch.tensor(x_g)).numpy()
    with np.errstate(all="ignore"):
        kve = scipy.special.kve(nu_g, x_g)
    ok = np.isfinite(kve) & (kve > 0)
    # Absolute error of log K == relative error of K.
    err_scipy = np.abs(got[ok] - (np.log(kve[ok]) - x_g[ok]))
    assert err_scipy.max() <= 1e-10
    # Where kve overflows (large nu, small x) scipy has no answer: use 40-digit mpmath.
    assert (~ok).sum() > 50  # the overflow region really is exercised
    ref = np.array([_mp_log_kv(n, x) for n, x in zip(nu_g[~ok], x_g[~ok], strict=True)])
    assert np.abs(got[~ok] - ref).max() <= 1e-10
    assert got[NUS.index(100.0), 0] > 2000  # K_100(1e-8) ~ 1e985


def test_independent_mpmath_spot_checks():
    # The scipy comparison above is partly self-referential; check a sparse grid with mpmath.
    for nu in [0.1, 0.8, 2.5, 37.3, 100.0]:
        xs = np.logspace(-8, 4, 13)
        got = log_bessel_kv(nu, torch.tensor(xs)).numpy()
        ref = np.array([_mp_log_kv(nu, x) for x in xs])
        assert np.abs(got - ref).max() <= 1e-10, nu


def test_beyond_scipy_range():
    # kve returns NaN above ~1e9 (Hankel series used) and overflows for tiny x at small nu.
    for nu, x in [(0.3, 1e9), (2.5, 3e10), (0.8, 1e-320), (1.9, 1e-310)]:
        got = log_bessel_kv(nu, torch.tensor([x], dtype=torch.float64)).item()
        assert abs(got - _mp_log_kv(nu, x)) <= 1e-15 * abs(got) + 1e-12
    assert log_bessel_kv(1.0, torch.tensor([math.inf], dtype=torch.float64)).item() == -math.inf


def test_half_integer_closed_form():
    x = torch.logspace(-3, 2, 50, dtype=torch.float64)
    # K_{1/2}(x) = sqrt(pi / 2x) e^{-x};  K_{3/2}(x) = K_{1/2}(x) (1 + 1/x)
    k_half = 0.5 * torch.log(math.pi / (2 * x)) - x
    assert torch.allclose(log_bessel_kv(0.5, x), k_half, rtol=0, atol=1e-13)
    assert torch.allclose(log_bessel_kv(1.5, x), k_half + torch.log1p(1 / x), rtol=0, atol=1e-13)


def test_gradient_matches_mpmath():
    worst = 0.0
    for nu in [0.1, 0.5, 0.8, 1.0, 1.5, 37.3, 100.0]:
        for x in [1e-8, 1e-3, 0.7, 5.0, 300.0, 1e4]:
            xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
            (g,) = torch.autograd.grad(log_bessel_kv(nu, xt), xt)
            with mpmath.workdps(40):
                ref = float(mpmath.diff(lambda t, nu=nu: mpmath.log(mpmath.besselk(nu, t)), mpmath.mpf(x)))
            worst = max(worst, abs(g.item() - ref) / abs(ref))
    assert worst <= 1e-11


@pytest.mark.parametrize("nu", [0.3, 1.0, 2.5, 37.3, 100.0])
def test_gradcheck(nu):
    # gradcheck perturbs by 1e-6 absolute, so x itself can only go down to ~1e-3 ...
    x = torch.tensor([1e-3, 0.2, 1.0, 7.0, 150.0, 1e3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: log_bessel_kv(nu, x), (x,))
    # ... and via x = exp(t) for the full range 1e-8 .. 1e4 (plus second derivatives).
    t = torch.linspace(math.log(1e-8), math.log(1e4), 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: log_bessel_kv(nu, t.exp()), (t,))
    assert torch.autograd.gradgradcheck(lambda t: log_bessel_kv(nu, t.exp()), (t,))


def test_broadcasting_shapes_and_grad_reduction():
    nu = torch.tensor([[0.5], [2.7], [40.0]], dtype=torch.float64)  # (3, 1)
    x = torch.tensor([0.1, 1.0, 10.0, 100.0], dtype=torch.float64, requires_grad=True)  # (4,)
    out = log_bessel_kv(nu, x)
    assert out.shape == (3, 4)
    ref = np.log(scipy.special.kv(nu.numpy(), x.detach().numpy()))
    assert np.abs(out.detach().numpy() - ref).max() < 1e-12
    out.sum().backward()
    # d/dx log K_nu = -K_{nu-1}/K_nu - nu/x, summed over the three orders.
    xn, nn = x.detach().numpy(), nu.numpy()
    expect = (-scipy.special.kv(np.abs(nn - 1), xn) / scipy.special.kv(nn, xn) - nn / xn).sum(0)
    assert np.allclose(x.grad.numpy(), expect, rtol=1e-12)
    x32 = torch.rand(2, 3, 5) + 0.1
    assert log_bessel_kv(1.3, x32).dtype == torch.float32


def test_bad_inputs():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    for bad_x in ([1.0, 0.0], [1.0, -2.0], [math.nan, 1.0]):
        with pytest.raises(ValueError, match="x"):
            log_bessel_kv(1.0, torch.tensor(bad_x, dtype=torch.float64))
    for bad_nu in (0.0, -1.0, math.nan, torch.tensor([1.0, 0.0])):
        with pytest.raises(ValueError, match="nu"):
            log_bessel_kv(bad_nu, x)
    with pytest.raises(ValueError, match="nu"):
        log_bessel_kv(torch.tensor(1.5, dtype=torch.float64, requires_grad=True), x)
