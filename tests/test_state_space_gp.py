"""StateSpaceGP (Kalman) against its dense twin GPRegressor (Cholesky): same LML and predictions."""
import copy

import gpytorch
import numpy as np
import pandas as pd
import pytest
import torch

import latentgp as lgp

T64 = torch.float64


def f64(v):
    return torch.tensor(v, dtype=T64)


def random_kernel(kind, rng):
    ls = f64(rng.uniform(0.5, 5.0))
    if kind in ("m12", "m32", "m52", "m72"):
        k = lgp.kernels.Matern(nu={"m12": 0.5, "m32": 1.5, "m52": 2.5, "m72": 3.5}[kind]).double()
        k.lengthscale = ls
    elif kind == "hida2":
        k = lgp.kernels.HidaMatern(order=2).double()
        k.lengthscale, k.omega = ls, f64(rng.uniform(0.2, 3.0))
    elif kind == "sum":
        a, b = lgp.kernels.Matern(nu=0.5).double(), lgp.kernels.HidaMatern(order=1).double()
        a.lengthscale, b.lengthscale, b.omega = ls, f64(rng.uniform(1, 4)), f64(1.3)
        k = gpytorch.kernels.ScaleKernel(a).double() + gpytorch.kernels.ScaleKernel(b).double()
        k.kernels[0].outputscale, k.kernels[1].outputscale = f64(0.7), f64(1.9)
        return k
    elif kind == "gpytorch":
        k = gpytorch.kernels.MaternKernel(nu=2.5).double()
        k.lengthscale = ls
    k = gpytorch.kernels.ScaleKernel(k).double()
    k.outputscale = f64(rng.uniform(0.5, 2.0))
    return k


@pytest.mark.parametrize("kind", ["m12", "m32", "m52", "m72", "hida2", "sum", "gpytorch"])
def test_dense_twin_T500(kind):
    rng = np.random.default_rng(hash(kind) % 2**32)
    t = rng.uniform(0, 100, 500)  # irregular and unsorted
    y = np.sin(t / 4) + 0.3 * rng.standard_normal(500)
    kernel = random_kernel(kind, rng)
    noise = float(rng.uniform(0.01, 0.3))
    fast = lgp.StateSpaceGP(kernel=kernel, noise=noise, mean="constant").fit(t, y, steps=0)
    dense = lgp.GPRegressor(kernel=copy.deepcopy(kernel), noise=noise, mean="constant").fit(t, y, steps=0)
    assert fast.log_marginal_likelihood() == pytest.approx(dense.log_marginal_likelihood(), rel=1e-8)
    # at training times, between them and beyond both ends
    new = np.concatenate([t[:20], rng.uniform(0, 100, 30), [-10.0, -1.0, 101.0, 130.0]])
    for include_noise in (False, True):
        a, b = fast.predict(new, include_noise=include_noise), dense.predict(new, include_noise=include_noise)
        np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-8, atol=1e-8 * np.abs(b["mean"]).max())
        np.testing.assert_allclose(a["var"], b["var"], rtol=1e-8, atol=1e-8 * b["var"].max())


def test_gradient_matches_dense_twin():
    rng = np.random.default_rng(3)
    t = np.sort(rng.uniform(0, 30, 200))
    y = np.cos(t) + 0.1 * rng.standard_normal(200)
    kernel = random_kernel("m32", rng)
    fast = lgp.StateSpaceGP(kernel=kernel, mean="constant").fit(t, y, steps=0)
    dense = lgp.GPRegressor(kernel=copy.deepcopy(kernel), mean="constant").fit(t, y, steps=0)
    dense.prior.load_state_dict(fast.prior.state_dict())
    X, yt = fast._train[0].values, fast._train[1]
    grads = []
    for m in (fast, dense):
        m.prior.zero_grad()
        m._lml(X, yt).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.prior.parameters()]))
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-8, atol=1e-10)


def test_fit_learns_lengthscale_and_matches_dense_fit():
    rng = np.random.default_rng(5)
    t = np.linspace(0, 60, 300)
    kernel = random_kernel("m32", rng)
    with torch.no_grad():
        K = kernel(f64(t)).to_dense().numpy()
    y = np.linalg.cholesky(K + 1e-9 * np.eye(300)) @ rng.standard_normal(300) + 0.1 * rng.standard_normal(300)
    model = lgp.StateSpaceGP(mean="zero").fit(t, y, steps=40, progress=False)
    dense = lgp.GPRegressor(kernel=copy.deepcopy(model.kernel), noise=model.prior.noise.item(), mean="zero")
    dense.fit(t, y, steps=0)
    assert model.log_marginal_likelihood() == pytest.approx(dense.log_marginal_likelihood(), rel=1e-8)
    # the learned fit is at least as good as the data-generating hyperparameters
    truth = lgp.StateSpaceGP(kernel=kernel, noise=0.01, mean="zero").fit(t, y, steps=0)
    assert model.log_marginal_likelihood() >= truth.log_marginal_likelihood() - 1e-6


@pytest.mark.parametrize("kernel, hint", [
    (gpytorch.kernels.RBFKernel(), "Matern"),
    (lgp.kernels.Matern(nu=0.8), "1/2"),
    (gpytorch.kernels.PeriodicKernel(), "HidaMatern"),
])
def test_kernels_without_state_space_form_raise(kernel, hint):
    with pytest.raises(TypeError, match=hint):
        lgp.StateSpaceGP(kernel=kernel)


def test_bad_input_and_dataframe():
    model = lgp.StateSpaceGP(noise=0.1)
    with pytest.raises(ValueError, match="`X`"):
        model.fit(np.zeros((10, 2)), np.zeros(10))
    with pytest.raises(ValueError, match="`y`"):
        model.fit(np.arange(10.0), np.r_[np.zeros(9), np.nan])
    df = pd.DataFrame({"time": np.arange(20.0), "v": np.sin(np.arange(20.0))})
    pred = model.fit(df, "v", steps=0).predict(pd.DataFrame({"time": [2.5, 30.0]}))
    assert list(pred.columns) == ["time", "mean", "var", "lower", "upper"]


def test_save_load_and_inference_data(tmp_path):
    rng = np.random.default_rng(2)
    t = rng.uniform(0, 10, 40)
    y = np.sin(t) + 0.1 * rng.standard_normal(40)
    model = lgp.StateSpaceGP().fit(t, y, steps=5)
    model.save(tmp_path / "ss.pt")
    loaded = lgp.load(tmp_path / "ss.pt")
    assert type(loaded) is lgp.StateSpaceGP
    new = np.linspace(-1, 11, 25)
    assert (loaded.predict(new).to_numpy() == model.predict(new).to_numpy()).all()
    idata = model.to_inference_data(num_samples=30, seed=0)
    assert idata.posterior["f"].shape == (1, 30, 40)
