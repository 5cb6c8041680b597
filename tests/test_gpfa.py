"""GPFA: E-step against dense Gaussian conditioning, EM monotonicity, recovery on Poisson data, I/O."""

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

import latentgp
from latentgp.models.base import NotFittedError
from latentgp.models.gpfa import GPFA
from latentgp.simulate import gp_latents, poisson_spikes, r_squared_affine

BW = 0.02  # 20 ms bins
TAUS = np.array([0.05, 0.1, 0.2])  # seconds: 2.5, 5 and 10 bins


@pytest.fixture(scope="module")
def small():
    """5 trials x 30 bins x 10 neurons, 2 latents: for the exact / monotonicity / I/O checks."""
    x = gp_latents([0.1, 0.3], n_trials=5, n_bins=30, bin_width=BW, seed=1)
    return poisson_spikes(x, n_neurons=10, bin_width=BW, seed=2)["counts"]


@pytest.fixture(scope="module")
def recovery():
    x = gp_latents(TAUS, n_trials=20, n_bins=100, bin_width=BW, seed=0)
    sim = poisson_spikes(x, n_neurons=50, bin_width=BW, seed=100)
    model = GPFA(3, bin_width=BW).fit(sim["counts"], steps=150)
    return model, x


def _model_at(counts, C, d, R, tau_bins, sqrt_transform=True):
    """A GPFA at given parameters, built through the load path (no EM)."""
    payload = {"config": {"n_latents": C.shape[1], "bin_width": 1.0, "timescales": None, "min_noise": 1e-3,
                          "sqrt_transform": sqrt_transform},
               "dtype": "float64", "counts": torch.as_tensor(counts),
               "params": {"C": torch.as_tensor(C), "d": torch.as_tensor(d), "R": torch.as_tensor(R),
                          "log_tau": torch.log(torch.as_tensor(tau_bins, dtype=torch.float64))}}
    return GPFA._from_payload(payload, None)


def test_e_step_matches_dense_conditioning():
    """Posterior mean/variance and log marginal likelihood equal plain Gaussian conditioning of
    vec(y) (time-major stacking, built here with numpy/scipy only) to 1e-8."""
    rng = np.random.default_rng(3)
    N, T, q, p = 3, 7, 5, 2
    counts = rng.poisson(2.0, size=(N, T, q))
    C = rng.normal(size=(q, p))
    d = rng.normal(size=q) + 1.5
    R = rng.uniform(0.2, 0.8, size=q)
    tau = np.array([1.3, 3.7])
    model = _model_at(counts, C, d, R, tau)

    t = np.arange(T)
    Ks = [(1 - 1e-3) * np.exp(-((t[:, None] - t[None]) ** 2) / (2 * s**2)) + 1e-3 * np.eye(T) for s in tau]
    # x stacked time-major: index t * p + i
    Kx = np.zeros((T * p, T * p))
    for i, K in enumerate(Ks):
        Kx[i::p, i::p] = K
    Cbar = np.kron(np.eye(T), C)
    cov_y = Cbar @ Kx @ Cbar.T + np.kron(np.eye(T), np.diag(R))
    gain = Kx @ Cbar.T @ np.linalg.inv(cov_y)
    post_cov = Kx - gain @ Cbar @ Kx
    y = np.sqrt(counts).reshape(N, T * q)  # row-major (t, neuron) = time-major vec
    mean_y = np.tile(d, T)
    post_mean = (y - mean_y) @ gain.T  # (N, T p)
    lml = sum(multivariate_normal(mean_y, cov_y).logpdf(yn) for yn in y)

    scale = np.abs(post_mean).max()
    assert np.abs(model.latents() - post_mean.reshape(N, T, p)).max() <= 1e-8 * scale
    var = np.diag(post_cov).reshape(T, p)
    assert np.abs(model.latent_variance() - var[None]).max() <= 1e-8
    assert model.log_marginal_likelihood() == pytest.approx(lml, rel=1e-10, abs=1e-8)
    # full covariance: ours is latent-major, index i * T + t
    perm = np.array([i * T + s for s in range(T) for i in range(p)])
    assert np.abs(model._post.cov.numpy()[np.ix_(perm, perm)] - post_cov).max() <= 1e-8


@pytest.mark.parametrize("learn", [False, True])
def test_em_is_monotone(small, learn):
    """log p(y) never decreases: exact M-step for C, d, R (and guarded GEM step for tau)."""
    init = GPFA(2, bin_width=BW).fit(small, steps=0).log_marginal_likelihood()
    model = GPFA(2, bin_width=BW).fit(small, steps=150, tol=None, learn_timescales=learn)
    lml = np.concatenate([[init], -model.history["loss"].to_numpy() * small.shape[0]])
    assert len(lml) == 151
    drops = np.diff(lml)
    assert drops.min() >= -1e-8 * np.abs(lml).max()
    assert lml[-1] > lml[0]
    if not learn:
        assert np.ptp(model.history[["tau_0", "tau_1"]].to_numpy(), axis=0).max() == 0.0


def test_recovers_latents_and_timescales(recovery):
    """Acceptance: Poisson data with a log-linear readout, R^2 >= 0.85, sorted timescales within 15%."""
    model, x = recovery
    r2 = r_squared_affine(model.latents(), x)
    err = np.sort(model.timescales_) / TAUS - 1
    print(f"GPFA recovery: R2 = {r2:.4f}, timescales {np.sort(model.timescales_)} s, "
          f"rel. errors {np.round(err, 3)}, {len(model.history)} EM iterations")
    assert r2 >= 0.85
    assert np.abs(err).max() <= 0.15
    # orthonormalised latents carry the same information and reproduce C x
    assert r_squared_affine(model.latents(orthonormalize=True), x) == pytest.approx(r2, abs=1e-8)
    U, _ = model._orth_map()
    np.testing.assert_allclose(model.latents(True) @ U.numpy().T, model.latents() @ model.loadings_.T,
                               atol=1e-10)


def test_accessors_shapes(recovery):
    model, x = recovery
    N, T, p = x.shape
    assert model.latents().shape == model.latent_variance().shape == (N, T, p)
    assert (model.latent_variance() > 0).all()
    rates = model.rates()
    assert rates.shape == (N, T, 50) and (rates >= 0).all()
    frame = model.to_frame()
    assert list(frame.columns) == ["trial", "bin", "time", "latent", "mean", "var", "lower", "upper"]
    assert len(frame) == N * T * p
    np.testing.assert_allclose(frame["time"].iloc[:2], [0.5 * BW, 1.5 * BW])
    assert list(model.history.columns) == ["step", "loss", "tau_0", "tau_1", "tau_2"]
    # trials are independent given the parameters: inference on a subset reproduces their latents
    counts = model._train[0]
    np.testing.assert_allclose(model.transform(counts[3:5]), model.latents()[3:5], atol=1e-10)


def test_save_load_round_trip(small, tmp_path):
    model = GPFA(2, bin_width=BW, timescales=[0.1, 0.2]).fit(small, steps=5)
    path = tmp_path / "gpfa.pt"
    model.save(path)
    back = latentgp.load(path)
    assert isinstance(back, GPFA)
    np.testing.assert_array_equal(back.latents(), model.latents())
    np.testing.assert_array_equal(back.latent_variance(), model.latent_variance())
    np.testing.assert_array_equal(back.timescales_, model.timescales_)
    np.testing.assert_array_equal(back.transform(small[:2]), model.transform(small[:2]))
    assert back.log_marginal_likelihood() == model.log_marginal_likelihood()
    assert back.history.equals(model.history)
    assert back.config == model.config


def test_bad_input(small):
    with pytest.raises(ValueError, match="`n_latents`"):
        GPFA(0)
    with pytest.raises(TypeError, match="`n_latents`"):
        GPFA(2.5)
    with pytest.raises(ValueError, match="`bin_width`"):
        GPFA(2, bin_width=0)
    with pytest.raises(ValueError, match="`timescales`"):
        GPFA(2, timescales=[0.1])
    with pytest.raises(ValueError, match="`timescales`"):
        GPFA(2, timescales=[0.1, -1.0])
    with pytest.raises(TypeError, match="`timescales`"):
        GPFA(2, timescales=["a", "b"])
    with pytest.raises(ValueError, match="`min_noise`"):
        GPFA(2, min_noise=0)
    model = GPFA(2)
    with pytest.raises(NotFittedError):
        model.latents()
    model.fit(small, steps=2)
    before = model.latents()
    bad = small.astype(float)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="`counts`"):
        model.fit(bad)
    with pytest.raises(ValueError, match="`counts`"):
        model.fit(-small)
    with pytest.raises(ValueError, match="`counts`.*bin"):
        model.fit(small[:, :2])
    with pytest.raises(ValueError, match="`n_latents`"):
        GPFA(10).fit(small)
    with pytest.raises(ValueError, match="`n_latents`"):
        model.fit(small[:, :, :2])
    with pytest.raises(ValueError, match="`steps`"):
        model.fit(small, steps=-1)
    with pytest.raises(ValueError, match="`counts`"):
        model.transform(small[:, :, :5])
    np.testing.assert_array_equal(model.latents(), before)  # failed calls changed nothing


def test_transform_accepts_silent_trials(small):
    """New trials without spikes have a proper posterior (the GP prior): transform must not refuse them
    (it did, with the fitting-time 'no spikes at all' check); trials are inferred independently."""
    model = GPFA(2, bin_width=BW, timescales=[0.1, 0.2]).fit(small, steps=3)
    silent = np.zeros_like(small[:1])
    both = model.transform(np.concatenate([silent, small[:1]]))
    assert np.isfinite(both).all() and both.shape == (2,) + small.shape[1:2] + (2,)
    np.testing.assert_allclose(both[0], model.transform(silent)[0], atol=1e-10)
    np.testing.assert_allclose(both[1], model.transform(small[:1])[0], atol=1e-10)
    assert np.abs(both[0]).max() > 0  # pulled away from 0 by the offsets d, not a constant stand-in
