"""Simulators: shapes, seeding, firing-rate calibration, and the affine R^2 score."""
import numpy as np
import pytest

from latentgp.simulate import gp_latents, poisson_spikes, r_squared_affine, simulate_vdp_spikes, van_der_pol


@pytest.fixture(scope="module")
def vdp():
    return simulate_vdp_spikes(n_trials=10, n_bins=500, n_neurons=50, seed=3)


def test_vdp_spikes_shapes_and_dtypes(vdp):
    assert vdp["latents"].shape == (10, 500, 2) and vdp["latents"].dtype == np.float64
    assert vdp["counts"].shape == (10, 500, 50) and vdp["counts"].dtype == np.int64
    assert vdp["rates"].shape == (10, 500, 50)
    assert vdp["C"].shape == (2, 50) and vdp["d"].shape == (50,)
    assert vdp["bin_width"] == 0.01
    np.testing.assert_allclose(vdp["times"][:2], [0.005, 0.015])
    assert (vdp["counts"] >= 0).all() and (vdp["rates"] > 0).all()


def test_vdp_latents_standardised_and_oscillating(vdp):
    x = vdp["latents"]
    np.testing.assert_allclose(x.mean(axis=(0, 1)), 0, atol=1e-12)
    np.testing.assert_allclose(x.std(axis=(0, 1)), 1, rtol=1e-12)
    # 2-4 cycles per trial: count upward zero crossings of the position
    up = ((x[:, :-1, 0] < 0) & (x[:, 1:, 0] >= 0)).sum(axis=1)
    assert ((up >= 2) & (up <= 4)).all(), up
    # trials start at different phases
    assert np.ptp(x[:, 0, 0]) > 1.0


def test_vdp_periodic():
    # on the limit cycle the trajectory repeats: autocorrelation peaks again at one period
    x = van_der_pol(n_trials=1, n_bins=2000, seed=0)[0, :, 0]
    lags = np.arange(100, 260)  # one period only (~177 bins), not its multiples
    ac = np.array([np.corrcoef(x[:-lag], x[lag:])[0, 1] for lag in lags])
    period_bins = lags[ac.argmax()]
    assert ac.max() > 0.99
    assert abs(period_bins * 0.04 - 7.1) < 0.2  # mu = 1.5 period ~7.1 time units


def test_mean_rates_in_range(vdp):
    empirical = vdp["counts"].mean(axis=(0, 1)) / vdp["bin_width"]
    assert (empirical > 15 * 0.8).all() and (empirical < 40 * 1.2).all()
    # the noise-free rates hit the targets exactly over the simulated data
    model = vdp["rates"].mean(axis=(0, 1))
    assert (model >= 15 - 1e-9).all() and (model <= 40 + 1e-9).all()
    assert vdp["rates"].max() < 300  # modulation keeps rates physiological


def test_poisson_readout_is_log_linear():
    x = van_der_pol(n_trials=2, n_bins=100, seed=1)
    out = poisson_spikes(x, n_neurons=7, seed=2, modulation=0.4)
    np.testing.assert_allclose(np.log(out["rates"]), x @ out["C"] + out["d"], atol=1e-10)
    np.testing.assert_allclose((x.reshape(-1, 2) @ out["C"]).std(axis=0), 0.4, rtol=1e-10)
    np.testing.assert_allclose(out["rates"].mean(axis=(0, 1)), out["mean_rates"], rtol=1e-10)
    assert poisson_spikes(x[0], n_neurons=3, seed=0)["counts"].shape == (1, 100, 3)  # 2-D = one trial


def test_seed_reproducible_and_global_rng_untouched():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = simulate_vdp_spikes(n_trials=2, n_bins=50, n_neurons=5, seed=7)
    b = simulate_vdp_spikes(n_trials=2, n_bins=50, n_neurons=5, seed=7)
    c = simulate_vdp_spikes(n_trials=2, n_bins=50, n_neurons=5, seed=8)
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    for key in ("latents", "counts", "C", "d"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["latents"], c["latents"])
    np.testing.assert_array_equal(gp_latents(0.1, 2, 30, seed=1), gp_latents(0.1, 2, 30, seed=1))


def test_gp_latents_shapes_and_covariance():
    z = gp_latents([0.05, 0.2], n_trials=400, n_bins=40, bin_width=0.01, seed=0)
    assert z.shape == (400, 40, 2)
    # empirical lag-5 correlation matches the squared exponential exp(-0.5 (0.05 / ell)^2)
    for k, ell in enumerate([0.05, 0.2]):
        emp = np.mean(z[:, :-5, k] * z[:, 5:, k])
        assert abs(emp - np.exp(-0.5 * (0.05 / ell) ** 2)) < 0.08
    np.testing.assert_allclose(z.var(axis=(0, 1)), 1, atol=0.15)
    # Matérn-1/2: corr(lag) = exp(-lag / ell)
    m = gp_latents([0.1], n_trials=400, n_bins=20, seed=1, nu=0.5)
    assert abs(np.mean(m[:, :-10, 0] * m[:, 10:, 0]) - np.exp(-1)) < 0.08


def test_gp_latents_accepts_gpytorch_kernel():
    gpytorch = pytest.importorskip("gpytorch")
    import torch

    kernel = gpytorch.kernels.MaternKernel(nu=1.5)
    kernel.lengthscale = 0.2
    out = gp_latents(kernel, n_trials=3, n_bins=50, seed=0)
    ref = gp_latents([0.2], n_trials=3, n_bins=50, seed=0, nu=1.5)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert kernel.raw_lengthscale.dtype == torch.float32  # the user's kernel is not converted in place


def test_r_squared_affine():
    rng = np.random.default_rng(0)
    truth = van_der_pol(n_trials=3, n_bins=200, seed=0)
    A = np.array([[2.0, -1.0, 0.5], [0.3, 1.0, -2.0]])
    est = truth @ A + np.array([1.0, -3.0, 2.0])  # (…, 3) estimate of a 2-D truth
    assert r_squared_affine(est, truth) == pytest.approx(1.0, abs=1e-10)
    assert abs(r_squared_affine(rng.standard_normal((3, 200, 2)), truth)) < 0.02
    noisy = truth + 0.5 * rng.standard_normal(truth.shape)
    assert 0.7 < r_squared_affine(noisy, truth) < 0.9  # 1 - 0.25 / (1 + 0.25) = 0.8
    assert r_squared_affine(est[..., :1], truth[..., :1]) <= 1


@pytest.mark.parametrize("call, match", [
    (lambda: van_der_pol(n_trials=0), "`n_trials`"),
    (lambda: van_der_pol(dt=-1), "`dt`"),
    (lambda: van_der_pol(mu=0), "`mu`"),
    (lambda: poisson_spikes(np.zeros((2, 3, 4, 5))), "`latents`"),
    (lambda: poisson_spikes(np.full((5, 2), np.nan)), "`latents`"),
    (lambda: poisson_spikes(np.zeros((5, 2)), rate_range=(40, 15)), "`rate_range`"),
    (lambda: poisson_spikes(np.zeros((5, 2)), rate_range=5), "`rate_range`"),
    (lambda: poisson_spikes(np.zeros((5, 2)), bin_width=0), "`bin_width`"),
    (lambda: poisson_spikes(np.zeros((5, 2)), modulation=-1), "`modulation`"),
    (lambda: gp_latents([0.1, -1], 2, 10), "`kernel_or_lengthscales`"),
    (lambda: gp_latents("rbf", 2, 10), "`kernel_or_lengthscales`"),
    (lambda: r_squared_affine(np.zeros((3, 4, 1)), np.ones((3, 5, 1))), "`estimate`"),
    (lambda: r_squared_affine(np.arange(10.0), np.ones(10)), "`truth`"),
])
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
