"""VectorFieldGP / ScalarFieldGP: closed-form fields on the sphere, and a dense twin of the
low-rank (Woodbury) algebra built from the explicit kernel matrix and scipy Cholesky."""
import numpy as np
import pandas as pd
import pytest
import torch

import latentgp
from latentgp.kernels.connection_laplacian import tangent_indices
from latentgp.models.base import NotFittedError
from latentgp.models.vector_field import ScalarFieldGP, VectorFieldGP
from latentgp.testing import dense_gp_lml, dense_gp_predict


def random_sphere(n, seed=0):
    X = np.random.default_rng(seed).standard_normal((n, 3))
    return X / np.linalg.norm(X, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def rotation():
    """Rotation about the z axis (a Killing field) on 700 random sphere points, half observed."""
    X = random_sphere(700)
    V = np.cross([0.0, 0.0, 1.0], X)
    obs = np.random.default_rng(1).permutation(700)[:350]
    model = VectorFieldGP(n_neighbors=10, num_eigenpairs=50).fit(X, V[obs], obs, steps=40, progress=False)
    return X, V, obs, model


def test_rotation_field_recovered(rotation):
    X, V, obs, model = rotation
    pred = model.predict()
    vm = pred[["v0", "v1", "v2"]].to_numpy()
    unobs = np.setdiff1d(np.arange(700), obs)
    assert np.linalg.norm(vm - V) / np.linalg.norm(V) <= 0.1  # issue target (paper ~0.08)
    assert np.linalg.norm(vm[unobs] - V[unobs]) / np.linalg.norm(V[unobs]) <= 0.1
    assert model.history["loss"].iloc[-1] < model.history["loss"].iloc[0]
    assert {"lengthscale", "variance", "noise"} <= set(model.history.columns)


def test_predicted_vectors_are_tangent(rotation):
    X, V, _, model = rotation
    vm = model.predict()[["v0", "v1", "v2"]].to_numpy()
    normal = np.abs((vm * X).sum(1))  # the sphere's normal at x is x
    assert normal.max() < 0.01 * np.linalg.norm(vm, axis=1).max()
    s = model.sample(3, prior=True, seed=0)
    assert s.shape == (3, 700, 3)
    assert np.abs((s * X).sum(-1)).max() < 0.01 * np.abs(s).max()


def test_prediction_frame_and_uncertainty(rotation):
    X, _, obs, model = rotation
    pred = model.predict([3, obs[0], 10], level=0.9)
    assert list(pred.columns[:7]) == ["x0", "x1", "x2", "v0", "v1", "v2", "var"]
    assert list(pred.index) == [3, obs[0], 10] and pred["observed"].tolist() == [3 in obs, True, 10 in obs]
    np.testing.assert_allclose(pred[["x0", "x1", "x2"]].to_numpy(), X[[3, obs[0], 10]])
    assert (pred["v0_lower"] < pred["v0"]).all() and (pred["v0_upper"] > pred["v0"]).all()
    full = model.predict()
    # observed points are less uncertain than unobserved ones on average
    assert full.loc[full.observed, "var"].mean() < full.loc[~full.observed, "var"].mean()
    noisy = model.predict(include_noise=True)
    np.testing.assert_allclose(noisy["var"] - full["var"], 2 * model.prior.noise.item(), rtol=1e-10)


def test_posterior_samples_match_moments(rotation):
    _, _, _, model = rotation
    idx = np.arange(0, 700, 70)
    draws = model.sample(4000, seed=3, indices=idx)
    pred = model.predict(idx)
    sd = np.sqrt(pred["var"].to_numpy() / 2)[:, None]
    err = np.abs(draws.mean(0) - pred[["v0", "v1", "v2"]].to_numpy())
    assert np.all(err < 5 * sd / np.sqrt(4000) + 1e-12)
    np.testing.assert_allclose(draws.var(0).sum(1), pred["var"].to_numpy(), rtol=0.1)
    again = model.sample(2, seed=3, indices=idx)
    np.testing.assert_array_equal(again, model.sample(2, seed=3, indices=idx))


def _dense_twin(model, y_obs_rows, test_rows):
    """Dense GP on the explicit kernel matrix (n d x n d): K from the gpytorch kernel, scipy Cholesky."""
    N = model.kernel.eigenvectors.shape[0]
    with torch.no_grad():
        K = model.kernel(torch.arange(N, dtype=torch.float64)[:, None]).to_dense().numpy()
    noise = model.prior.noise.item()
    Ko = K[np.ix_(y_obs_rows, y_obs_rows)]
    mu, var = dense_gp_predict(Ko, K[np.ix_(y_obs_rows, test_rows)], np.diag(K)[test_rows], model._y.numpy(), noise)
    lml = dense_gp_lml(Ko, model._y.numpy(), noise)
    # full posterior covariance of the test rows, for the ambient marginal variances
    Kinv = np.linalg.solve(Ko + noise * np.eye(len(y_obs_rows)), K[np.ix_(y_obs_rows, test_rows)])
    cov = K[np.ix_(test_rows, test_rows)] - K[np.ix_(test_rows, y_obs_rows)] @ Kinv
    return mu, var, lml, cov


@pytest.mark.parametrize("nu", [None, 1.5])
def test_vector_dense_twin(nu):
    X = random_sphere(120, seed=4)
    rng = np.random.default_rng(5)
    obs = rng.permutation(120)[:50]
    V = np.cross(rng.standard_normal(3), X)[obs] + 0.05 * rng.standard_normal((50, 3))
    model = VectorFieldGP(8, num_eigenpairs=40, nu=nu, lengthscale=3.0, variance=0.8, noise=0.02)
    model.fit(X, V, obs, steps=0)
    d = model.kernel.dim
    rows = tangent_indices(obs, d).long()[:, 0].numpy()
    test = np.arange(120)
    test_rows = tangent_indices(test, d).long()[:, 0].numpy()
    mu, var, lml, cov = _dense_twin(model, rows, test_rows)
    assert abs(model.log_marginal_likelihood() - lml) < 1e-8 * max(1, abs(lml))
    pred = model.predict()
    T = model.frames_.numpy()
    amb = np.einsum("nDd,nd->nD", T, mu.reshape(120, d))
    np.testing.assert_allclose(pred[["v0", "v1", "v2"]].to_numpy(), amb, atol=1e-8)
    np.testing.assert_allclose(pred["var"].to_numpy(), var.reshape(120, d).sum(1), atol=1e-8)
    blocks = np.stack([cov[i * d:(i + 1) * d, i * d:(i + 1) * d] for i in range(120)])
    amb_var = np.einsum("nDa,nab,nDb->nD", T, blocks, T)
    half = (pred["v1_upper"] - pred["v1"]).to_numpy()
    np.testing.assert_allclose(half, 1.959963984540054 * np.sqrt(amb_var[:, 1]), atol=1e-8)


def test_scalar_dense_twin_and_accuracy():
    X = random_sphere(120, seed=6)
    obs = np.arange(0, 120, 2)
    f = X[:, 2] + 0.5 * X[:, 0] * X[:, 1] + 2.0
    model = ScalarFieldGP(8, num_eigenpairs=30, nu=2.5, lengthscale=2.0, variance=0.5, noise=0.01)
    model.fit(X, f[obs], obs, steps=0)
    mu, var, lml, _ = _dense_twin(model, obs, np.arange(120))
    pred = model.predict()
    np.testing.assert_allclose(pred["mean"].to_numpy(), mu + f[obs].mean(), atol=1e-8)
    np.testing.assert_allclose(pred["var"].to_numpy(), var, atol=1e-8)
    assert abs(model.log_marginal_likelihood() - lml) < 1e-8 * max(1, abs(lml))
    # learned hyperparameters on a bigger cloud: a smooth function is interpolated well
    Y = random_sphere(600, seed=7)
    g = Y[:, 2] + 0.5 * Y[:, 0] * Y[:, 1]
    m2 = ScalarFieldGP(10, num_eigenpairs=40).fit(Y, g[::2], np.arange(0, 600, 2), steps=30, progress=False)
    p2 = m2.predict()
    # (predicting the mean everywhere gives 1.0; the graph-Laplacian basis on random points ~0.065)
    assert np.linalg.norm(p2["mean"] - g) / np.linalg.norm(g) < 0.1
    assert {"mean", "var", "lower", "upper"} <= set(p2.columns)


def test_save_load_roundtrip(rotation, tmp_path):
    _, _, _, model = rotation
    model.save(tmp_path / "vf.pt")
    again = latentgp.load(tmp_path / "vf.pt")
    pd.testing.assert_frame_equal(again.predict(), model.predict())
    assert again.log_marginal_likelihood() == model.log_marginal_likelihood()
    pd.testing.assert_frame_equal(again.history, model.history)


def test_bad_input_leaves_model_unchanged(rotation):
    X, V, obs, _ = rotation
    fresh = VectorFieldGP(num_eigenpairs=20)
    with pytest.raises(NotFittedError):
        fresh.predict()
    with pytest.raises(ValueError, match="vectors"):
        fresh.fit(X, V[obs][:, :2], obs)
    with pytest.raises(ValueError, match="vectors"):
        fresh.fit(X, V[obs][:-1], obs)
    bad = V[obs].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="vectors"):
        fresh.fit(X, bad, obs)
    with pytest.raises(ValueError, match="points"):
        fresh.fit(np.where(X > 0.99, np.inf, X), V[obs], obs)
    with pytest.raises(ValueError, match="observed"):
        fresh.fit(X, V[:3], [0, 1, 700])
    with pytest.raises(ValueError, match="observed"):
        fresh.fit(X, V[:3], [0, 1, 1])
    with pytest.raises(ValueError, match="observed"):
        fresh.fit(X, V[:3], np.ones(699, dtype=bool))
    with pytest.raises(ValueError, match="n_neighbors"):
        VectorFieldGP(n_neighbors=10).fit(X[:10], V[:10])
    with pytest.raises(ValueError, match="connected components"):
        fresh.fit(np.r_[X[:100], X[:100] + 5], V[:200])
    with pytest.raises(TypeError, match="n_neighbors"):
        VectorFieldGP(n_neighbors=2.5)
    assert fresh._train is None and fresh.prior is None


def test_prior_only_fit_and_plot(tmp_path):
    import matplotlib.pyplot as plt

    from latentgp.plot_vector_field import plot_scalar_field, plot_vector_field

    X = random_sphere(200, seed=8)
    model = VectorFieldGP(num_eigenpairs=20).fit(X)
    pred = model.predict()
    assert np.all(pred[["v0", "v1", "v2"]].to_numpy() == 0) and not pred["observed"].any()
    ax = plot_vector_field(pred.assign(v0=1.0 - X[:, 0] ** 2), data=(X[:5], np.ones((5, 3))))
    assert ax.name == "3d"
    ax2 = plot_scalar_field(ScalarFieldGP(num_eigenpairs=10).fit(X, X[:, 0]).predict(), column="var")
    assert ax2.name == "3d"
    plt.close("all")


def test_pyro_model_and_inference_data(rotation):
    import pyro

    _, _, _, model = rotation
    trace = pyro.poutine.trace(pyro.poutine.condition(model.pyro_model, data={
        "kernel.lengthscale": model.kernel.lengthscale.detach().reshape(1, 1),
        "kernel.variance": model.kernel.variance.detach(), "noise": model.prior.noise.detach()})).get_trace()
    assert abs(float(trace.nodes["y"]["fn"].log_prob(trace.nodes["y"]["value"])) - model.log_marginal_likelihood()) \
        < 1e-8 * abs(model.log_marginal_likelihood())
    idata = model.to_inference_data(num_samples=50, seed=0)
    assert idata.posterior["f"].shape == (1, 50, 700)
    assert {"posterior", "posterior_predictive", "log_likelihood", "observed_data"} <= set(idata.groups())
    assert model.tangent_fraction() > 0.999
