"""GPRegressor against independent references: scipy Cholesky LML and scikit-learn predictions."""
import warnings

import gpytorch
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process import kernels as skk

import latentgp as lgp
from latentgp.linalg.cholesky import JitterWarning
from latentgp.testing import dense_gp_lml, dense_gp_predict

T = torch.float64


def t(v):
    return torch.tensor(v, dtype=T)


def scaled(base, scale):
    k = gpytorch.kernels.ScaleKernel(base).to(T)
    k.outputscale = t(scale)
    return k


def with_ls(k, ls):
    k = k.to(T)
    k.lengthscale = t(ls)
    return k


def kernel_pairs():
    """(latentgp/gpytorch kernel, equivalent sklearn kernel) with fixed hyperparameters."""
    return {
        "matern0.8": (scaled(with_ls(lgp.kernels.Matern(nu=0.8), 0.9), 1.7),
                      skk.ConstantKernel(1.7, "fixed") * skk.Matern(0.9, "fixed", nu=0.8)),
        "matern2.5": (scaled(with_ls(lgp.kernels.Matern(nu=2.5), 1.3), 0.6),
                      skk.ConstantKernel(0.6, "fixed") * skk.Matern(1.3, "fixed", nu=2.5)),
        "rbf": (scaled(with_ls(gpytorch.kernels.RBFKernel(), 0.7), 1.3),
                skk.ConstantKernel(1.3, "fixed") * skk.RBF(0.7, "fixed")),
        "sum": (scaled(with_ls(gpytorch.kernels.RBFKernel(), 2.0), 1.0)
                + scaled(with_ls(lgp.kernels.Matern(nu=1.2), 0.4), 0.3),
                skk.ConstantKernel(1.0, "fixed") * skk.RBF(2.0, "fixed")
                + skk.ConstantKernel(0.3, "fixed") * skk.Matern(0.4, "fixed", nu=1.2)),
        "product": (scaled(with_ls(gpytorch.kernels.RBFKernel(), 3.0), 2.0) * with_ls(lgp.kernels.Matern(nu=0.8), 1.1),
                    skk.ConstantKernel(2.0, "fixed") * skk.RBF(3.0, "fixed") * skk.Matern(1.1, "fixed", nu=0.8)),
    }


@pytest.fixture
def data(rng):
    X = rng.uniform(0, 6, (60, 1))
    y = np.sin(2 * X[:, 0]) + 0.1 * rng.standard_normal(60)
    return X, y


@pytest.mark.parametrize("name", list(kernel_pairs()))
def test_predictions_match_sklearn(name, data):
    kernel, sk_kernel = kernel_pairs()[name]
    X, y = data
    noise = 0.02
    model = lgp.GPRegressor(kernel=kernel, mean="zero", noise=noise).fit(X, y, steps=0)
    sk = GaussianProcessRegressor(sk_kernel, alpha=noise, optimizer=None).fit(X, y)
    Xs = np.linspace(-1, 7, 41)[:, None]
    mu, sd = sk.predict(Xs, return_std=True)
    pred = model.predict(Xs)
    np.testing.assert_allclose(pred["mean"], mu, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(pred["var"], sd**2, rtol=1e-8, atol=1e-8)
    assert model.log_marginal_likelihood() == pytest.approx(sk.log_marginal_likelihood_value_, rel=1e-8)


@pytest.mark.parametrize("name", ["matern0.8", "rbf", "sum"])
def test_lml_and_posterior_match_scipy_cholesky(name, data):
    kernel, _ = kernel_pairs()[name]
    X, y = data
    model = lgp.GPRegressor(kernel=kernel, mean="constant", noise=0.05)
    model.fit(X, y, steps=0)
    c = model.prior.mean_module.constant.item()
    with torch.no_grad():
        K = kernel(t(X)).to_dense().numpy()
        Xs = np.linspace(0, 6, 13)[:, None]
        Ks = kernel(t(X), t(Xs)).to_dense().numpy()
        kss = kernel(t(Xs), diag=True).numpy()
    assert model.log_marginal_likelihood() == pytest.approx(dense_gp_lml(K, y, 0.05, c), rel=1e-10)
    mu, var = dense_gp_predict(K, Ks, kss, y, 0.05, c)
    pred = model.predict(Xs, include_noise=True)
    np.testing.assert_allclose(pred["mean"], mu, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(pred["var"], var + 0.05, rtol=1e-9, atol=1e-10)


def test_fit_increases_lml_and_records_history(data):
    X, y = data
    model = lgp.GPRegressor()
    model.fit(X, y, steps=0)
    before = model.log_marginal_likelihood()
    model.fit(X, y, steps=60, seed=1)
    after = model.log_marginal_likelihood()
    assert after > before + 1.0
    h = model.history
    assert {"step", "loss", "noise", "kernel.outputscale", "kernel.base_kernel.lengthscale"} <= set(h.columns)
    assert h["loss"].iloc[-1] == pytest.approx(-after / len(y), rel=1e-6)
    # the fitted noise is near the simulated noise variance 0.01
    assert 0.003 < model.prior.noise.item() < 0.03


def test_adam_and_seed_reproducible_without_touching_global_rng(data):
    X, y = data
    torch.manual_seed(123)
    expected = torch.rand(())
    torch.manual_seed(123)
    a = lgp.GPRegressor().fit(X, y, steps=15, method="adam", lr=0.05, seed=3)
    b = lgp.GPRegressor().fit(X, y, steps=15, method="adam", lr=0.05, seed=3)
    assert torch.rand(()) == expected  # fitting with seed= did not consume the global stream
    pd.testing.assert_frame_equal(a.history, b.history)


def test_dataframe_in_and_out(data):
    X, y = data
    df = pd.DataFrame({"time": X[:, 0], "extra": 1.0, "signal": y})
    model = lgp.GPRegressor(noise=0.01).fit(df, "signal", x=["time"], steps=0)
    pred = model.predict(pd.DataFrame({"time": [0.5, 1.5], "other": [3, 4]}))
    assert list(pred.columns) == ["time", "mean", "var", "lower", "upper"]
    arr = lgp.GPRegressor(noise=0.01).fit(X, y, steps=0).predict(np.array([0.5, 1.5]))
    np.testing.assert_allclose(pred["mean"], arr["mean"], rtol=1e-12)
    torch_pred = lgp.GPRegressor(noise=0.01).fit(torch.tensor(X), torch.tensor(y), steps=0).predict(t([0.5, 1.5]))
    np.testing.assert_allclose(torch_pred["mean"], arr["mean"], rtol=1e-12)
    # interval: level=0.9 is narrower than 0.95 and symmetric about the mean
    p90 = model.predict(pd.DataFrame({"time": [0.5]}), level=0.9)
    p95 = model.predict(pd.DataFrame({"time": [0.5]}), level=0.95)
    assert (p90["upper"] - p90["lower"]).item() < (p95["upper"] - p95["lower"]).item()
    assert (p95["upper"] - p95["mean"]).item() == pytest.approx(1.959964 * np.sqrt(p95["var"].item()), rel=1e-6)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((np.array([[0.0], [np.nan], [1.0]]), np.zeros(3)), {}, "`X`"),
        ((np.zeros((3, 1)), np.array([0.0, np.inf, 1.0])), {}, "`y`"),
        ((np.zeros((3, 1)), np.zeros(4)), {}, "`y`"),
        ((np.zeros((0, 1)), np.zeros(0)), {}, "`X`"),
        ((np.zeros((3, 1, 2)), np.zeros(3)), {}, "`X`"),
        ((pd.DataFrame({"a": [1.0, 2, 3]}), "b"), {}, "`y`"),
        ((pd.DataFrame({"a": [1.0, 2, 3], "b": [1.0, 2, 3]}), "b"), {"x": ["zz"]}, "`X`"),
        ((np.zeros((3, 1)), np.zeros(3)), {"method": "bogus"}, "`method`"),
        ((np.zeros((3, 1)), np.zeros(3)), {"steps": -1}, "`steps`"),
    ],
)
def test_bad_input_names_argument_and_leaves_state(args, kwargs, match, data):
    X, y = data
    model = lgp.GPRegressor(noise=0.1).fit(X, y, steps=0)
    before = model.predict(np.array([1.0]))
    with pytest.raises((ValueError, TypeError), match=match):
        model.fit(*args, **kwargs)
    pd.testing.assert_frame_equal(model.predict(np.array([1.0])), before)


def test_bad_constructor_and_predict_arguments(data):
    with pytest.raises(ValueError, match="`mean`"):
        lgp.GPRegressor(mean="linear")
    with pytest.raises(ValueError, match="`noise`"):
        lgp.GPRegressor(noise=-1.0)
    with pytest.raises(TypeError, match="`kernel`"):
        lgp.GPRegressor(kernel="rbf")
    model = lgp.GPRegressor(noise=0.1)
    with pytest.raises(RuntimeError, match="fit"):
        model.predict(np.zeros(3))
    X, y = data
    model.fit(X, y, steps=0)
    with pytest.raises(ValueError, match="`X`"):
        model.predict(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="`level`"):
        model.predict(np.zeros(3), level=1.5)


@pytest.mark.parametrize("noise", [1e-10, 1e-300])
def test_jitter_policy_duplicates_tiny_noise(noise):
    X = np.repeat(np.linspace(0, 1, 20), 3)[:, None]
    y = np.sin(3 * X[:, 0])
    kernel = scaled(with_ls(gpytorch.kernels.RBFKernel(), 0.5), 1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = lgp.GPRegressor(kernel=kernel, noise=noise).fit(X, y, steps=0)
    warned = any(issubclass(w.category, JitterWarning) for w in caught)
    assert warned == (model.jitter_ > 0)
    if noise == 1e-300:  # numerically singular: the policy must have added jitter
        assert model.jitter_ > 0
    pred = model.predict(np.linspace(0, 1, 7))
    assert np.isfinite(pred[["mean", "var"]].to_numpy()).all()
    np.testing.assert_allclose(pred["mean"], np.sin(3 * np.linspace(0, 1, 7)), atol=1e-4)
    assert np.isfinite(model.log_marginal_likelihood())


def test_jitter_policy_huge_lengthscale_is_finite_or_clear_error(rng):
    X = rng.uniform(0, 1, (40, 1))
    y = rng.standard_normal(40)
    kernel = scaled(with_ls(gpytorch.kernels.RBFKernel(), 1e6), 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", JitterWarning)
        try:
            model = lgp.GPRegressor(kernel=kernel, noise=1e-10).fit(X, y, steps=0)
        except torch.linalg.LinAlgError as err:
            assert "noise" in str(err)
            return
    assert np.isfinite(model.log_marginal_likelihood())
    assert np.isfinite(model.predict(np.linspace(0, 1, 5))[["mean", "var"]].to_numpy()).all()


def test_save_load_predicts_bitwise(tmp_path, data):
    X, y = data
    kernel = scaled(lgp.kernels.Matern(nu=0.8), 1.0) + scaled(gpytorch.kernels.RBFKernel(), 1.0)
    model = lgp.GPRegressor(kernel=kernel).fit(pd.DataFrame({"t": X[:, 0], "y": y}), "y", steps=10)
    model.save(tmp_path / "m.pt")
    loaded = lgp.load(tmp_path / "m.pt")
    new = pd.DataFrame({"t": np.linspace(-1, 7, 50)})
    a, b = model.predict(new), loaded.predict(new)
    assert (a.to_numpy() == b.to_numpy()).all()
    assert loaded.log_marginal_likelihood() == model.log_marginal_likelihood()
    pd.testing.assert_frame_equal(loaded.history, model.history)
    with pytest.raises(ValueError, match="`path`"):
        torch.save({"x": 1}, tmp_path / "bad.pt")
        lgp.load(tmp_path / "bad.pt")


def test_first_fit_keeps_hyperparameters_the_user_set(data):
    X, y = data
    model = lgp.GPRegressor(mean="constant")
    model.prior.mean_module.constant = t(-3.0)
    model.fit(X, y, steps=0)
    assert model.prior.mean_module.constant.item() == -3.0  # user value kept
    assert model.prior.noise.item() == pytest.approx(0.1 * np.var(y, ddof=1), rel=1e-10)  # data-initialised
