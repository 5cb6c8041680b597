"""GPPDESolver (GP-HM): posterior and objective against a dense oracle built by autograd from an
independent kernel, small-grid accuracy (1-D, 2-D, advection-diffusion), frequency selection, bad
input, save/load. The 400-point reproduction is slow-marked (benchmarks/bench_pde.py prints it)."""
import math

import numpy as np
import pytest
import torch

import latentgp as lgp
from latentgp.kernels import SpectralMixture
from latentgp.models.pde import GPPDESolver

DT = torch.float64


def _rel_l2(pred, exact):
    return np.linalg.norm(pred - exact) / np.linalg.norm(exact)


def _oracle_cov(ref, P, Q, dp, dq):
    """d^dp/dx^dp d^dq/dx'^dq k(x_i, x'_j) by repeated autograd of gpytorch-style SpectralMixture values."""
    X = P[:, None].expand(len(P), len(Q)).reshape(-1, 1).clone().requires_grad_(True)
    Y = Q[None, :].expand(len(P), len(Q)).reshape(-1, 1).clone().requires_grad_(True)
    val = ref(X, Y, diag=True)
    for var, count in ((X, dp), (Y, dq)):
        for _ in range(count):
            val = torch.autograd.grad(val.sum(), var, create_graph=True)[0].reshape(-1)
    return val.detach().reshape(len(P), len(Q))


def test_posterior_and_objective_match_dense_oracle():
    solver = GPPDESolver(n_collocation=12, num_mixtures=2, kernel="gaussian", nugget=1e-6)
    k = solver.kernels.factors[0]
    k.means = torch.tensor([0.4, 1.3], dtype=DT)
    k.scales = torch.tensor([0.8, 0.5], dtype=DT)
    solver.fit(source=lambda x: -np.sin(3 * x), boundary=lambda x: np.sin(3 * x) / 9, steps=0)
    ref = SpectralMixture(2).to(DT)  # an independent implementation of the same kernel
    ref.means = k.means.detach()[:, None]
    ref.scales = k.scales.detach()[:, None]
    with torch.no_grad():
        ref.log_weights.copy_(k.log_weights)
    x = solver.grid[0]
    B, C = x[[0, -1]], x[1:-1]
    G = torch.cat([torch.cat([_oracle_cov(ref, B, B, 0, 0), _oracle_cov(ref, B, C, 0, 2)], 1),
                   torch.cat([_oracle_cov(ref, C, B, 2, 0), _oracle_cov(ref, C, C, 2, 2)], 1)])
    G = G + torch.diag(1e-6 * G.diagonal())
    y = torch.cat([torch.sin(3 * B) / 9, -torch.sin(3 * C)])
    xs = torch.linspace(0, 1, 7, dtype=DT)
    cross = torch.cat([_oracle_cov(ref, B, xs, 0, 0), _oracle_cov(ref, C, xs, 2, 0)])
    mean = cross.T @ torch.linalg.solve(G, y)
    var = ref(xs[:1, None], xs[:1, None], diag=True).detach() - (cross * torch.linalg.solve(G, cross)).sum(0)
    lml = torch.distributions.MultivariateNormal(torch.zeros(12, dtype=DT), G).log_prob(y)
    pred = solver.predict(xs.numpy())
    assert list(pred.columns) == ["x", "mean", "var", "lower", "upper"]
    np.testing.assert_allclose(pred["mean"], mean.numpy(), atol=1e-8 * float(mean.abs().max()))
    np.testing.assert_allclose(pred["var"], var.numpy(), atol=1e-8 * float(var.abs().max()))
    lml_ours, log_prior = solver.objective()
    assert lml_ours == pytest.approx(float(lml), abs=1e-6)
    assert log_prior == pytest.approx(-float(torch.log(k.weights.detach() + solver._floors[0]).sum()), rel=1e-12)


def test_1d_poisson_high_frequency_learns_its_frequency():
    u = lambda x: np.sin(20 * x)  # noqa: E731
    solver = GPPDESolver(n_collocation=60, num_mixtures=6).fit(
        source=lambda x: -400 * np.sin(20 * x), boundary=u, steps=40, progress=False)
    x = np.linspace(0, 1, 301)
    assert _rel_l2(solver.predict(x)["mean"].to_numpy(), u(x)) < 1e-4
    comps = solver.components()
    top = comps.sort_values("weight").iloc[-1]
    assert top["angular"] == pytest.approx(20.0, rel=1e-3)
    # the Jeffreys prior prunes: the runner-up weighs far less
    assert comps["weight"].sort_values().iloc[-2] < 1e-2 * top["weight"]
    assert len(solver.history) > 1 and "means_0" in solver.history
    spec = solver.spectrum()
    assert spec["frequency"].iloc[spec["density"].argmax()] == pytest.approx(20 / (2 * math.pi), abs=0.05)


def test_2d_poisson_with_rbf_baseline():
    u = lambda x, y: np.sin(math.pi * x) * np.sin(math.pi * y)  # noqa: E731
    f = lambda x, y: -2 * math.pi**2 * u(x, y)  # noqa: E731
    solver = GPPDESolver(domain=[(0, 1), (0, 1)], n_collocation=144, kernel="rbf").fit(
        source=f, boundary=u, steps=0)
    g = np.random.default_rng(0).random((200, 2))
    pred = solver.predict(g)
    assert list(pred.columns[:2]) == ["x0", "x1"]
    assert _rel_l2(pred["mean"].to_numpy(), u(g[:, 0], g[:, 1])) < 1e-3
    assert (pred["var"] >= 0).all() and (pred["upper"] >= pred["lower"]).all()


def test_advection_diffusion():
    nu, b = 0.1, 1.0
    u = lambda x: np.sin(20 * x) + x  # noqa: E731
    f = lambda x: 400 * nu * np.sin(20 * x) + b * (20 * np.cos(20 * x) + 1)  # noqa: E731
    solver = GPPDESolver(operator="advection_diffusion", diffusion=nu, velocity=[b], n_collocation=80,
                         num_mixtures=6).fit(source=f, boundary=u, steps=20, progress=False)
    x = np.linspace(0, 1, 301)
    assert _rel_l2(solver.predict(x)["mean"].to_numpy(), u(x)) < 1e-4


def test_custom_operator_dict_equals_poisson():
    f, g = (lambda x: -np.sin(3 * x)), (lambda x: np.sin(3 * x) / 9)
    a = GPPDESolver(n_collocation=20, kernel="rbf").fit(source=f, boundary=g, steps=0)
    b = GPPDESolver(operator={(2,): 1.0}, n_collocation=20, kernel="rbf").fit(source=f, boundary=g, steps=0)
    x = np.linspace(0, 1, 9)
    np.testing.assert_allclose(a.predict(x)["mean"], b.predict(x)["mean"], atol=1e-12)


def test_bad_input():
    with pytest.raises(ValueError, match="derivative order 3"):
        GPPDESolver(operator={(3,): 1.0})
    with pytest.raises(ValueError, match="order 1 or 2"):
        GPPDESolver(operator={(0,): 1.0})
    with pytest.raises(ValueError, match="2 non-negative integer"):
        GPPDESolver(operator={(2,): 1.0}, domain=[(0, 1), (0, 1)])
    with pytest.raises(ValueError, match="`operator`"):
        GPPDESolver(operator="heat")
    with pytest.raises(ValueError, match="`domain`"):
        GPPDESolver(domain=[(1, 0)])
    with pytest.raises(ValueError, match="`velocity`"):
        GPPDESolver(operator="advection_diffusion", velocity=[1.0, 2.0])
    with pytest.raises(ValueError, match="`kernel`"):
        GPPDESolver(kernel="matern")
    solver = GPPDESolver(n_collocation=10, kernel="rbf")
    with pytest.raises(TypeError, match="`source`"):
        solver.fit(source=np.zeros(3), boundary=np.sin)
    with pytest.raises(ValueError, match="`boundary` must return"):
        solver.fit(source=np.sin, boundary=lambda x: np.zeros(3))
    with pytest.raises(ValueError, match="`source`"):
        solver.fit(source=lambda x: np.full_like(x, np.inf), boundary=np.sin)
    assert solver._train is None
    with pytest.raises(lgp.models.base.NotFittedError):
        solver.predict([0.5])
    solver.fit(source=np.sin, boundary=np.sin, steps=0)
    with pytest.raises(ValueError, match="1 column"):
        solver.predict(np.zeros((3, 2)))


def test_save_load_roundtrip(tmp_path):
    solver = GPPDESolver(n_collocation=30, num_mixtures=3).fit(
        source=lambda x: -25 * np.sin(5 * x), boundary=lambda x: np.sin(5 * x), steps=3, progress=False)
    solver.save(tmp_path / "pde.pt")
    loaded = lgp.load(tmp_path / "pde.pt")
    x = np.linspace(0, 1, 11)
    np.testing.assert_allclose(loaded.predict(x)["mean"], solver.predict(x)["mean"], atol=1e-12)
    assert loaded.objective() == pytest.approx(solver.objective(), rel=1e-12)
    assert len(loaded.history) == len(solver.history)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["sin100", "multiscale"])
def test_reproduction_400_collocation_points(case):
    if case == "sin100":
        u, f = (lambda x: np.sin(100 * x)), (lambda x: -1e4 * np.sin(100 * x))
    else:
        u, f = (lambda x: np.sin(x) + 0.1 * np.sin(50 * x)), (lambda x: -np.sin(x) - 250 * np.sin(50 * x))
    solver = GPPDESolver(n_collocation=400, num_mixtures=20).fit(source=f, boundary=u, steps=100, progress=False)
    x = np.linspace(0, 1, 2001)
    assert _rel_l2(solver.predict(x)["mean"].to_numpy(), u(x)) <= 1e-3
