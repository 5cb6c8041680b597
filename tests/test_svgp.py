"""SVGP: ELBO vs the exact log marginal likelihood, the data-emphasized objective, protocol, bad input."""
import gpytorch
import numpy as np
import pytest
import torch

import latentgp as lgp

DT = torch.float64


def _kernel():
    k = gpytorch.kernels.ScaleKernel(lgp.kernels.Matern(nu=1.5)).to(DT)
    k.base_kernel.lengthscale = torch.tensor(0.7, dtype=DT)
    k.outputscale = torch.tensor(1.3, dtype=DT)
    return k


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    x = np.sort(rng.uniform(0, 6, 24))
    return x, np.sin(x) + 0.2 * rng.standard_normal(24)


@pytest.fixture(scope="module")
def at_optimum(data):
    """Inducing inputs = all training inputs, hyperparameters fixed, full q optimised by L-BFGS."""
    x, y = data
    model = lgp.SVGP(kernel=_kernel(), num_inducing=len(x), mean="zero", noise=0.05, learn_inducing=False)
    return model.fit(x, y, method="lbfgs", steps=300, learn_hyperparameters=False, progress=False, tol=1e-14, seed=0)


def test_elbo_reaches_exact_log_marginal_likelihood(data, at_optimum):
    # With Z = X the collapsed bound is tight (Titsias 2009): max_q ELBO = log p(y), and q(f) = the exact posterior.
    x, y = data
    exact = lgp.GPRegressor(kernel=_kernel(), mean="zero", noise=0.05).fit(x, y, steps=0)
    assert at_optimum.elbo() == pytest.approx(exact.log_marginal_likelihood(), rel=1e-7)
    new = np.linspace(-0.5, 6.5, 9)
    ours, ref = at_optimum.predict(new), exact.predict(new)
    np.testing.assert_allclose(ours["mean"].to_numpy(), ref["mean"].to_numpy(), atol=1e-5)
    np.testing.assert_allclose(ours["var"].to_numpy(), ref["var"].to_numpy(), atol=1e-5)


def test_data_weight_scales_the_expected_log_likelihood(data, at_optimum):
    # E_q log N(y; f, s) from q's marginals, written out: log N(y; m, s) − v / (2 s).
    x, y = data
    fm = at_optimum.predict(x)
    m, v, s = fm["mean"].to_numpy(), fm["var"].to_numpy(), 0.05
    ell = np.sum(-0.5 * np.log(2 * np.pi * s) - 0.5 * ((y - m) ** 2 + v) / s)
    for kappa in (3.0, 10.0):
        assert at_optimum.elbo(kappa) - at_optimum.elbo() == pytest.approx((kappa - 1) * ell, rel=1e-10)


def test_minibatch_fit_history_and_noise(data):
    x, y = data
    model = lgp.SVGP(num_inducing=8).fit(x, y, steps=150, batch_size=10, lr=0.05, progress=False, seed=1)
    h = model.history
    assert {"step", "loss", "noise", "lengthscale"} <= set(h.columns) and len(h) == 150
    assert h["loss"].iloc[-20:].mean() < h["loss"].iloc[:20].mean()
    pred = model.predict(x, include_noise=True)
    assert (pred["var"] > model.predict(x)["var"]).all()


def test_save_load_predicts_identically(data, at_optimum, tmp_path):
    at_optimum.save(tmp_path / "svgp.pt")
    loaded = lgp.load(tmp_path / "svgp.pt")
    new = np.linspace(0, 6, 5)
    np.testing.assert_array_equal(loaded.predict(new).to_numpy(), at_optimum.predict(new).to_numpy())
    assert loaded.elbo() == at_optimum.elbo()


def test_bad_input(data):
    x, y = data
    with pytest.raises(ValueError, match="variational"):
        lgp.SVGP(variational="diagonal")
    with pytest.raises(ValueError, match="num_inducing"):
        lgp.SVGP(num_inducing=0)
    with_prior = gpytorch.kernels.RBFKernel(lengthscale_prior=gpytorch.priors.GammaPrior(2.0, 2.0))
    with pytest.raises(ValueError, match="priors"):
        lgp.SVGP(kernel=with_prior)
    model = lgp.SVGP(num_inducing=len(x))
    with pytest.raises(ValueError, match="data_weight"):
        model.fit(x, y, data_weight=3.0, steps=5)  # learned noise, M >= n: no optimum
    assert model.gp is None and model._train is None  # nothing changed
    with pytest.raises(ValueError, match="data_weight"):
        model.fit(x, y, data_weight=-1.0)
    with pytest.raises(ValueError, match="y"):
        model.fit(x, np.where(np.arange(len(y)) == 3, np.nan, y))
    with pytest.raises(ValueError, match="lbfgs"):
        model.fit(x, y, method="lbfgs", batch_size=4)
    with pytest.raises(lgp.models.base.NotFittedError):
        model.predict(x)
    model.fit(x, y, steps=1, progress=False)
    with pytest.raises(ValueError, match="`X` has 2 input columns"):
        model.fit(np.column_stack([x, x]), y, steps=1)
