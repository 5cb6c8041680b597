"""Pyro model/guide, NUTS and SVI fits of GPRegressor, and the ArviZ conversion."""
import arviz as az
import matplotlib.pyplot as plt
import numpy as np
import pyro
import pytest
import torch

import latentgp as lgp


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    X = np.sort(rng.uniform(0, 5, 30))
    y = np.sin(2 * X) + 0.1 * rng.standard_normal(30)
    return X, y


@pytest.fixture(scope="module")
def nuts_model(data):
    X, y = data
    return lgp.GPRegressor().fit(X, y, steps=30, method="nuts", num_samples=40, warmup=40, seed=0, progress=False)


def test_nuts_posterior_and_inference_data(nuts_model, data):
    X, y = data
    samples = nuts_model.samples_
    assert set(samples) == {"noise", "kernel.outputscale", "kernel.base_kernel.lengthscale", "mean_module.constant"}
    assert samples["noise"].shape == (40,)
    # the noise posterior sits near the true 0.01 (std 0.1) and has spread
    assert 0.002 < samples["noise"].median() < 0.05
    assert samples["kernel.base_kernel.lengthscale"].std() > 0
    idata = nuts_model.to_inference_data(seed=0)
    assert {"posterior", "posterior_predictive", "log_likelihood", "observed_data"} <= set(idata.groups())
    assert idata.posterior["f"].shape == (1, 40, 30)
    summary = az.summary(idata, var_names=["noise", "kernel.outputscale"])
    assert len(summary) == 2
    loo = az.loo(idata)
    assert np.isfinite(loo.elpd_loo)
    az.plot_ppc(idata, num_pp_samples=20)
    plt.close("all")
    # NUTS prediction is a mixture: finite and close to the truth
    pred = nuts_model.predict(np.linspace(0.5, 4.5, 9))
    np.testing.assert_allclose(pred["mean"], np.sin(2 * np.linspace(0.5, 4.5, 9)), atol=0.2)


def test_map_inference_data_loo_runs(data):
    X, y = data
    model = lgp.GPRegressor().fit(X, y, steps=40)
    idata = model.to_inference_data(num_samples=60, seed=1)
    assert idata.posterior["f"].shape == (1, 60, 30)
    # f draws are posterior draws: their mean approaches the posterior mean at the data
    mean_f = idata.posterior["f"].values[0].mean(0)
    np.testing.assert_allclose(mean_f, model.predict(X)["mean"], atol=4 * 0.1 / np.sqrt(60) + 0.02)
    assert np.isfinite(az.loo(idata).elpd_loo)


def test_svi_fit_and_user_pyro_loop(data):
    X, y = data
    model = lgp.GPRegressor().fit(X, y, steps=150, method="svi", lr=0.05, seed=0, progress=False)
    assert model.history["loss"].iloc[-20:].mean() < model.history["loss"].iloc[:20].mean()
    assert 0.002 < model.prior.noise.item() < 0.05
    idata = model.to_inference_data(num_samples=50, seed=0)
    assert idata.posterior["noise"].std() > 0
    # the documented protocol: a user can run pyro themselves with pyro_model / pyro_guide
    Xt, yt = torch.tensor(X), torch.tensor(y)
    with pyro.get_param_store().scope():
        svi = pyro.infer.SVI(model.pyro_model, model.pyro_guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.Trace_ELBO())
        loss = svi.step(Xt, yt)
    assert np.isfinite(loss)


def test_user_priors_are_used(data):
    X, y = data
    import pyro.distributions as dist

    with pytest.raises(ValueError, match="`priors`"):
        lgp.GPRegressor(priors={"nonexistent": dist.Normal(0.0, 1.0)}).fit(X, y, steps=0)
    prior = dist.LogNormal(np.log(0.5), 0.1)
    model = lgp.GPRegressor(priors={"noise": prior}).fit(X, y, steps=0)
    trace = pyro.poutine.trace(model.pyro_model).get_trace()
    assert trace.nodes["noise"]["fn"] is prior
    # the joint density includes that prior: log p = sum of site log-probs, y included
    trace.compute_log_prob()
    value = trace.nodes["noise"]["value"]
    assert trace.nodes["noise"]["log_prob_sum"] == pytest.approx(prior.log_prob(value).item())
    assert np.isfinite(trace.nodes["y"]["log_prob_sum"].item())
