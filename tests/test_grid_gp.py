"""GridGP against the dense exact GP on the same cells (LML, mean, variance, gradients), bad input,
save/load, and the 65,536-cell timing target."""
import time

import gpytorch
import numpy as np
import pytest
import torch

import latentgp as lgp
from latentgp.linalg.kronecker import grid_log_marginal, pcg
from latentgp.models.grid import GridGP

DT = torch.float64


def _kernels():
    k0 = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).to(DT)  # set values in float64
    k0.outputscale = torch.tensor(1.3, dtype=DT)
    k0.base_kernel.lengthscale = torch.tensor(0.3, dtype=DT)
    k1 = gpytorch.kernels.MaternKernel(nu=2.5).to(DT)
    k1.lengthscale = torch.tensor(0.4, dtype=DT)
    return [k0, k1]


def _dense_kernel(kernels, A, B, diag=False):
    out = kernels[0](A[:, :1], B[:, :1]).to_dense() * kernels[1](A[:, 1:], B[:, 1:]).to_dense()
    return out.diagonal() if diag else out


@pytest.fixture
def problem(rng):
    grid = [np.linspace(0, 1, 7), np.sort(rng.random(5))]
    values = rng.normal(size=(7, 5))
    mask = np.ones((7, 5), bool)
    mask[2, 3] = mask[0, 0] = mask[5, 1] = mask[6, 4] = False
    values[~mask] = np.nan  # missing cells may hold anything
    return grid, values, mask


@pytest.mark.parametrize("masked", [False, True])
def test_dense_twin(problem, masked):
    grid, values, mask = problem
    mask = mask if masked else None
    vals = values if masked else np.nan_to_num(values, nan=0.3)
    model = GridGP(_kernels(), grid).fit(vals, mask, steps=4, progress=False)
    kernels = list(model.kernel.kernels)
    mesh = np.stack(np.meshgrid(*grid, indexing="ij"), -1).reshape(-1, 2)
    obs = np.ones(35, bool) if mask is None else mask.reshape(-1)
    X, y = torch.tensor(mesh[obs]), torch.tensor(vals.reshape(-1)[obs])
    with torch.no_grad():
        c = model.prior.mean_module.constant
        Kd = _dense_kernel(kernels, X, X) + model.prior.noise * torch.eye(len(y), dtype=DT)
        lml = torch.distributions.MultivariateNormal(c.expand(len(y)), Kd).log_prob(y)
        Xs = torch.tensor(np.random.default_rng(3).random((11, 2)))
        Ks = _dense_kernel(kernels, X, Xs)
        mean = c + Ks.T @ torch.linalg.solve(Kd, y - c)
        var = _dense_kernel(kernels, Xs, Xs, diag=True) - (Ks * torch.linalg.solve(Kd, Ks)).sum(0)
    pred = model.predict(Xs.numpy())
    assert list(pred.columns) == ["x0", "x1", "mean", "var", "lower", "upper"]
    assert abs(model.log_marginal_likelihood() - float(lml)) < 1e-8
    np.testing.assert_allclose(pred["mean"], mean.numpy(), atol=1e-8, rtol=0)
    np.testing.assert_allclose(pred["var"], var.numpy(), atol=1e-8, rtol=0)
    assert len(model.history) == 4 and "raw_noise" in model.history


@pytest.mark.parametrize("masked", [False, True])
def test_lml_gradients_match_dense_autograd(rng, masked):
    xs = [torch.sort(torch.rand(n, dtype=DT)).values for n in (5, 4, 3)]
    ls = [torch.tensor(0.3 + 0.1 * i, dtype=DT, requires_grad=True) for i in range(3)]
    noise = torch.tensor(0.05, dtype=DT, requires_grad=True)
    r = torch.tensor(rng.normal(size=60), requires_grad=True)
    missing = torch.tensor([1, 7, 20, 33]) if masked else None

    def factors():
        return [torch.exp(-0.5 * (x[:, None] - x[None]) ** 2 / s**2) for x, s in zip(xs, ls, strict=False)]

    value, _ = grid_log_marginal(factors(), noise, r, missing)
    grads = torch.autograd.grad(value, ls + [noise, r])
    F = factors()
    A = torch.kron(torch.kron(F[0], F[1]), F[2]) + noise * torch.eye(60, dtype=DT)
    obs = torch.ones(60, dtype=torch.bool)
    if masked:
        obs[missing] = False
    zero = torch.zeros(int(obs.sum()), dtype=DT)
    dense = torch.distributions.MultivariateNormal(zero, A[obs][:, obs]).log_prob(r[obs])
    dgrads = torch.autograd.grad(dense, ls + [noise, r])
    assert abs(float(value.detach() - dense.detach())) < 1e-9
    for a, b in zip(grads, dgrads, strict=False):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-8, rtol=1e-8)


def test_product_kernel_with_active_dims_equals_list(problem):
    grid, values, _ = problem
    values = np.nan_to_num(values)
    k0, k1 = _kernels()
    prod = gpytorch.kernels.ProductKernel(
        gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(active_dims=(0,))),
        gpytorch.kernels.MaternKernel(nu=2.5, active_dims=(1,))).to(DT)
    prod.kernels[0].outputscale = k0.outputscale
    prod.kernels[0].base_kernel.lengthscale = k0.base_kernel.lengthscale
    prod.kernels[1].lengthscale = k1.lengthscale
    a = GridGP([k0, k1], grid, noise=0.1).fit(values, steps=0)
    b = GridGP(prod, grid, noise=0.1).fit(values, steps=0)
    assert abs(a.log_marginal_likelihood() - b.log_marginal_likelihood()) < 1e-10


def test_pcg_solves_and_reports_failure():
    A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=DT)
    B = torch.tensor([[1.0, 0.0], [2.0, 1.0]], dtype=DT)
    X, _ = pcg(lambda V: A @ V, B, lambda V: V)
    np.testing.assert_allclose(X.numpy(), torch.linalg.solve(A, B).numpy(), atol=1e-12)
    bad = torch.diag(torch.logspace(0, 12, 50, dtype=DT))
    with pytest.raises(RuntimeError, match="did not reach"):
        pcg(lambda V: bad @ V, torch.ones(50, 1, dtype=DT), lambda V: V, max_iter=3)


def test_bad_input(problem):
    grid, values, mask = problem
    with pytest.raises(ValueError, match="grid\\[1\\].*strictly increasing"):
        GridGP(_kernels(), [grid[0], grid[1][::-1]])
    with pytest.raises(ValueError, match="strictly increasing"):
        GridGP(_kernels(), [grid[0], np.array([0.0, 0.5, 0.5, 1.0])])
    with pytest.raises(TypeError, match="product over the 2 grid dimensions"):
        GridGP(gpytorch.kernels.RBFKernel(), grid)
    with pytest.raises(TypeError, match="active_dims"):
        GridGP(gpytorch.kernels.ProductKernel(gpytorch.kernels.RBFKernel(), gpytorch.kernels.RBFKernel()), grid)
    with pytest.raises(TypeError, match="ProductKernel"):
        GridGP(gpytorch.kernels.AdditiveKernel(gpytorch.kernels.RBFKernel(), gpytorch.kernels.RBFKernel()), grid)
    model = GridGP(_kernels(), grid)
    with pytest.raises(ValueError, match="`values` must have the grid's shape"):
        model.fit(np.zeros((5, 7)))
    with pytest.raises(ValueError, match="NaN"):
        model.fit(values)
    with pytest.raises(ValueError, match="`mask` must be a boolean"):
        model.fit(values, mask.astype(int))
    with pytest.raises(ValueError, match="max_missing_exact"):
        GridGP(_kernels(), grid, max_missing_exact=2).fit(values, mask, steps=1)
    assert model._train is None  # nothing changed by rejected calls
    with pytest.raises(lgp.models.base.NotFittedError):
        model.predict(np.zeros((2, 2)))
    model.fit(values, mask, steps=0)
    with pytest.raises(ValueError, match="`points` must have 2 columns"):
        model.predict(np.zeros((3, 3)))


def test_save_load_roundtrip(problem, tmp_path):
    grid, values, mask = problem
    model = GridGP(_kernels(), grid).fit(values, mask, steps=3, progress=False)
    model.save(tmp_path / "grid.pt")
    loaded = lgp.load(tmp_path / "grid.pt")
    pts = np.random.default_rng(5).random((6, 2))
    np.testing.assert_allclose(loaded.predict(pts)["mean"], model.predict(pts)["mean"], atol=1e-12)
    assert loaded.log_marginal_likelihood() == pytest.approx(model.log_marginal_likelihood(), abs=1e-10)
    assert len(loaded.history) == len(model.history)


def test_256_by_256_grid_fits_and_predicts_fast():
    g = [np.linspace(0, 1, 256)] * 2
    X1, X2 = np.meshgrid(*g, indexing="ij")
    truth = np.sin(6 * X1) * np.cos(4 * X2)
    values = truth + 0.1 * np.random.default_rng(0).normal(size=X1.shape)
    t0 = time.perf_counter()
    model = GridGP([gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()), gpytorch.kernels.RBFKernel()], g)
    model.fit(values, steps=20, progress=False)
    pred = model.predict()
    elapsed = time.perf_counter() - t0
    assert len(pred) == 65536
    assert elapsed < 10.0
    rmse = np.sqrt(((pred["mean"].to_numpy() - truth.reshape(-1)) ** 2).mean())
    assert rmse < 0.02  # denoised well below the 0.1 noise level
    assert model.prior.noise.item() == pytest.approx(0.01, rel=0.1)


def test_data_weight_objective_is_the_optimal_tempered_elbo(problem):
    """κ-weighted objective = max_q κ E_q log N(y; f, s) − KL(q || p), checked with the explicit optimum
    q (tempered posterior), on the dense covariance; κ = 1 is the log marginal likelihood."""
    from latentgp.objectives_weighted import data_emphasized_log_marginal

    grid, values, _ = problem
    values = np.nan_to_num(values)
    model = GridGP(_kernels(), grid, mean="zero", noise=0.2).fit(values, steps=0)
    kernels = list(model.kernel.kernels)
    X = torch.tensor(np.stack(np.meshgrid(*grid, indexing="ij"), -1).reshape(-1, 2))
    y = torch.tensor(values.reshape(-1))
    with torch.no_grad():
        K = _dense_kernel(kernels, X, X)
        s = 0.2
        for kappa in (1.0, 3.0):
            Sigma = torch.linalg.inv(torch.linalg.inv(K) + kappa / s * torch.eye(35, dtype=DT))
            mu = Sigma @ (kappa / s * y)
            ell = torch.distributions.Normal(mu, s**0.5).log_prob(y).sum() - Sigma.trace() / (2 * s)
            kl = torch.distributions.kl_divergence(torch.distributions.MultivariateNormal(mu, Sigma),
                                                   torch.distributions.MultivariateNormal(torch.zeros(35, dtype=DT), K))
            elbo = kappa * ell - kl
            dense, *_ = data_emphasized_log_marginal(K, y, torch.tensor(s, dtype=DT), kappa)
            assert float(dense) == pytest.approx(float(elbo), abs=1e-7)
            assert float(model._lml(kappa)[0]) == pytest.approx(float(elbo), abs=1e-7)
    with pytest.raises(ValueError, match="data_weight"):
        model.fit(values, data_weight=0.0)


def test_data_weight_shortens_the_lengthscale_and_needs_fixed_noise(rng):
    """κ > 1 (fixed noise) learns a shorter lengthscale than the evidence (κ = 1): the direction of the
    data emphasis. With a learned noise κ > 1 is unbounded (noise -> 0) and is refused."""
    grid = [np.linspace(0, 1, 40), np.linspace(0, 1, 3)]
    X1, _ = np.meshgrid(*grid, indexing="ij")
    values = np.sin(12 * X1) + 0.5 * rng.normal(size=X1.shape)

    def kernels():
        return [gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()), gpytorch.kernels.RBFKernel()]

    def fitted(kappa):
        return GridGP(kernels(), grid, noise=0.25).fit(values, steps=60, progress=False, data_weight=kappa)

    ls = lambda m: m.kernel.kernels[0].base_kernel.lengthscale.item()  # noqa: E731
    plain, emph = fitted(1.0), fitted(4.0)
    assert ls(emph) < 0.9 * ls(plain)
    with pytest.raises(ValueError, match="data_weight.*unbounded"):
        GridGP(kernels(), grid).fit(values, steps=5, data_weight=4.0)


def test_scale_observations_multiplies_only_observed_sites():
    import pyro
    import pyro.distributions as dist

    from latentgp.objectives_weighted import scale_observations

    def model(y):
        z = pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=DT), 1.0))
        pyro.sample("y", dist.Normal(z, 0.5).expand([3]).to_event(1), obs=y)

    y = torch.tensor([0.1, -0.3, 0.7], dtype=DT)
    plain = pyro.poutine.trace(model).get_trace(y)
    scaled = pyro.poutine.trace(pyro.poutine.replay(scale_observations(model, 3.0), trace=plain)).get_trace(y)
    plain.compute_log_prob()
    scaled.compute_log_prob()
    assert float(scaled.nodes["y"]["log_prob_sum"]) == pytest.approx(3.0 * float(plain.nodes["y"]["log_prob_sum"]))
    assert float(scaled.nodes["z"]["log_prob_sum"]) == pytest.approx(float(plain.nodes["z"]["log_prob_sum"]))
