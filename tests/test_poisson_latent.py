"""cvHM (PoissonLatentGP): CVI against exact Gaussian conditioning, recovery of VdP latents, errors."""
import numpy as np
import pytest
import scipy.stats
import torch

import latentgp as lgp
from latentgp.kernels import HidaMatern, state_space_form
from latentgp.likelihoods import Gaussian
from latentgp.simulate import r_squared_affine, simulate_vdp_spikes
from latentgp.variational.cvi import (
    Sites,
    elbo_terms,
    expected_log_prior,
    expected_loglik,
    joint_state_space,
    latent_blocks,
    site_targets,
)

T64 = torch.float64


def test_one_cvi_step_with_gaussian_likelihood_is_exact_posterior():
    rng = np.random.default_rng(0)
    L, D, T, noise, bw = 2, 5, 40, 0.3, 0.1
    kernel = HidaMatern(order=1, batch_shape=torch.Size([L])).double()
    kernel.lengthscale = torch.tensor([[[0.4]], [[1.1]]], dtype=T64)
    kernel.omega = torch.tensor([[[2.0]], [[0.7]]], dtype=T64)
    C = torch.tensor(rng.standard_normal((L, D)), dtype=T64)
    d = torch.tensor(rng.standard_normal(D), dtype=T64)
    y = torch.tensor(rng.standard_normal((1, T, D)), dtype=T64)
    dt = torch.full((T,), bw, dtype=T64)
    dt[0] = 0
    lik = Gaussian(noise)
    with torch.no_grad():
        A, Q, P0, H = joint_state_space(state_space_form(kernel), dt)
        prior_var = (H @ P0 @ H.T).expand(1, T, L, L)
        _, g1, g2 = expected_loglik(lik, y, torch.zeros(1, T, L, dtype=T64), prior_var, C, d)
        sites = Sites.zeros((1,), T, L, T64).damped(*site_targets(g1, g2, torch.zeros(1, T, L, dtype=T64), C), 1.0)
        elbo, m_f, V_f = elbo_terms(A, Q, P0, H, sites, lik, y, C, d)
        # dense reference: f stacked as (t, l); K block structure from the kernel itself
        t = torch.arange(T, dtype=T64) * bw
        Kl = kernel(t.unsqueeze(-1)).to_dense()  # (L, T, T)
    K = np.zeros((T * L, T * L))
    for l in range(L):
        K[l::L, l::L] = Kl[l].numpy()
    G = np.kron(np.eye(T), C.numpy().T)  # (T*D, T*L)
    resid = (y[0] - d).numpy().reshape(-1)
    # stable form (no inverse of the ill-conditioned prior covariance)
    KG = K @ G.T
    M = np.linalg.solve(G @ KG + noise * np.eye(T * D), np.c_[resid, KG.T])
    mean = KG @ M[:, 0]
    S = K - KG @ M[:, 1:]
    np.testing.assert_allclose(m_f[0].numpy().reshape(-1), mean, rtol=1e-8, atol=1e-10)
    for tt in range(T):
        np.testing.assert_allclose(V_f[0, tt].numpy(), S[tt * L:(tt + 1) * L, tt * L:(tt + 1) * L],
                                   rtol=1e-8, atol=1e-10)
    # at the exact posterior the ELBO is the log marginal likelihood
    lml = scipy.stats.multivariate_normal(np.tile(d.numpy(), T), G @ K @ G.T + noise * np.eye(T * D)).logpdf(
        y[0].numpy().reshape(-1))
    assert elbo.item() == pytest.approx(lml, rel=1e-8)


def test_em_gradient_equals_elbo_gradient_at_the_exact_posterior():
    """Fisher's identity: at q = p(x | y), d/dθ E_q[log p_θ(x)] (q held fixed, what the fit uses) equals
    d/dθ log p_θ(y) (autograd through the Kalman smoother). Also checks the EM objective's value
    against a Monte-Carlo-free dense computation: E_q[log p(x)] = log N(m; 0, K) - ½ tr(K⁻¹ S)."""
    rng = np.random.default_rng(3)
    L, D, T, noise, bw = 2, 4, 30, 0.5, 0.1
    kernel = HidaMatern(order=1, batch_shape=torch.Size([L])).double()
    kernel.lengthscale = torch.tensor([[[0.5]], [[0.9]]], dtype=T64)
    kernel.omega = torch.tensor([[[1.5]], [[0.4]]], dtype=T64)
    C = torch.tensor(rng.standard_normal((L, D)), dtype=T64)
    d = torch.zeros(D, dtype=T64)
    y = torch.tensor(rng.standard_normal((2, T, D)), dtype=T64)
    dt = torch.full((T,), bw, dtype=T64)
    dt[0] = 0
    lik = Gaussian(noise)
    with torch.no_grad():
        A, Q, P0, H = joint_state_space(state_space_form(kernel), dt)
        zeros = torch.zeros(2, T, L, dtype=T64)
        _, g1, g2 = expected_loglik(lik, y, zeros, (H @ P0 @ H.T).expand(2, T, L, L), C, d)
        sites = Sites.zeros((2,), T, L, T64).damped(*site_targets(g1, g2, zeros, C), 1.0)
    params = list(kernel.parameters())
    A, Q, P0, H = joint_state_space(state_space_form(kernel), dt)
    elbo, _, _, sm = elbo_terms(A, Q, P0, H, sites, lik, y, C, d, return_smoother=True)
    grad_elbo = torch.autograd.grad(elbo, params)
    blocks = [b.detach() for b in latent_blocks(sm, L)]
    em = expected_log_prior(state_space_form(kernel), dt, *blocks)
    grad_em = torch.autograd.grad(em, params)
    for a, b in zip(grad_elbo, grad_em, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-8, atol=1e-10)
    # value: per (trial, latent), E_q[log N(x; 0, Σ_prior)] over the whole state path, by dense algebra
    means, covs, cross = blocks
    form = state_space_form(kernel)
    with torch.no_grad():
        Ad, Qd = form.transition(dt), form.process_noise(dt)
        s = means.shape[-1]
        expected = 0.0
        for l in range(L):
            # dense prior covariance of the stacked state path from x_t = A x_{t-1} + q_t
            Phi = torch.zeros(T * s, T * s, dtype=T64)
            for t in range(T):
                Phi[t * s:(t + 1) * s, t * s:(t + 1) * s] = torch.eye(s, dtype=T64)
                for u in range(t):
                    M = torch.eye(s, dtype=T64)
                    for k in range(u + 1, t + 1):
                        M = Ad[l, k] @ M
                    Phi[t * s:(t + 1) * s, u * s:(u + 1) * s] = M
            noise_cov = torch.block_diag(form.P_inf[l], *[Qd[l, t] for t in range(1, T)])
            Sigma = Phi @ noise_cov @ Phi.T
            for n in range(2):
                S = torch.zeros(T * s, T * s, dtype=T64)
                for t in range(T):
                    S[t * s:(t + 1) * s, t * s:(t + 1) * s] = covs[n, l, t]
                m = means[n, l].reshape(-1)
                # E_q[log N] = log N(m; 0, Σ) - ½ tr(Σ⁻¹ S_q); Σ⁻¹ is block-tridiagonal, so only the
                # diagonal and first off-diagonal blocks of S_q enter.
                for t in range(T - 1):
                    S[(t + 1) * s:(t + 2) * s, t * s:(t + 1) * s] = cross[n, l, t]
                    S[t * s:(t + 1) * s, (t + 1) * s:(t + 2) * s] = cross[n, l, t].T
                Sinv = torch.linalg.inv(Sigma)
                expected += scipy.stats.multivariate_normal(np.zeros(T * s), Sigma.numpy()).logpdf(m.numpy())
                expected -= 0.5 * float((Sinv * S).sum())
    assert em.item() == pytest.approx(expected, rel=1e-7)


@pytest.fixture(scope="module")
def small_vdp():
    return simulate_vdp_spikes(n_trials=4, n_bins=250, n_neurons=40, seed=1)


@pytest.fixture(scope="module")
def small_fit(small_vdp):
    return lgp.PoissonLatentGP(2, bin_width=small_vdp["bin_width"]).fit(small_vdp["counts"], steps=25, progress=False)


def test_recovers_van_der_pol_latents(small_fit, small_vdp):
    r2 = r_squared_affine(small_fit.latents(), small_vdp["latents"])
    assert r2 > 0.9
    var = small_fit.latent_variance()
    assert var.shape == (4, 250, 2) and (var > 0).all() and (var < 1.0 + 1e-9).all()  # shrinks from unit prior
    rates = small_fit.rates()
    # predicted rates track the true rates
    assert np.corrcoef(rates.ravel(), small_vdp["rates"].ravel())[0, 1] > 0.8
    frame = small_fit.to_frame()
    assert list(frame.columns) == ["trial", "bin", "time", "latent", "mean", "var", "lower", "upper"]
    assert len(frame) == 4 * 250 * 2


def test_elbo_not_decreasing_and_history(small_fit):
    loss = small_fit.history["loss"].to_numpy()
    assert loss[-1] < loss[0]
    assert {"lengthscale_0", "omega_1"} <= set(small_fit.history.columns)


def test_save_load_roundtrip(small_fit, tmp_path):
    small_fit.save(tmp_path / "cvhm.pt")
    loaded = lgp.load(tmp_path / "cvhm.pt")
    np.testing.assert_array_equal(loaded.latents(), small_fit.latents())


def test_bad_inputs():
    good = np.ones((2, 20, 5), dtype=int)
    with pytest.raises(ValueError, match="`counts`"):
        lgp.PoissonLatentGP(2).fit(-good)
    with pytest.raises(ValueError, match="`counts`"):
        lgp.PoissonLatentGP(2).fit(good + 0.5)
    with pytest.raises(ValueError, match="`counts`"):
        lgp.PoissonLatentGP(6).fit(good)
    with pytest.raises(ValueError, match="`n_latents`"):
        lgp.PoissonLatentGP(0)
    with pytest.raises(ValueError, match="`bin_width`"):
        lgp.PoissonLatentGP(2, bin_width=0)
    with pytest.raises(ValueError, match="`kernel`"):
        lgp.PoissonLatentGP(2, kernel=HidaMatern(order=1))
    with pytest.raises(TypeError, match="state-space"):
        import gpytorch

        lgp.PoissonLatentGP(2, kernel=gpytorch.kernels.RBFKernel(batch_shape=torch.Size([2])))
    with pytest.raises(ValueError, match="`likelihood`"):
        lgp.PoissonLatentGP(2, likelihood="gamma")
    with pytest.raises(ValueError, match="`counts`"):
        lgp.PoissonLatentGP(2, likelihood="bernoulli").fit(good * 2)


def test_r2_does_not_fall_as_the_fit_runs_longer_on_sparse_data():
    """The official code's trap: on sparse data R² collapses (0.91 -> 0.37) as EM runs on, because the
    latent/loading scale is unidentified. Unit prior variance pins it here."""
    from latentgp.simulate import poisson_spikes, van_der_pol

    latents = van_der_pol(n_trials=4, n_bins=250, seed=3)
    sim = poisson_spikes(latents, n_neurons=30, rate_range=(4.0, 12.0), seed=4)
    r2 = []
    for steps in (15, 90):
        model = lgp.PoissonLatentGP(2, bin_width=sim["bin_width"]).fit(sim["counts"], steps=steps, tol=None,
                                                                       progress=False)
        r2.append(r_squared_affine(model.latents(), latents))
    assert r2[0] > 0.6
    assert r2[1] >= r2[0] - 0.01


def test_whittle_hyperparameters(small_vdp):
    model = lgp.PoissonLatentGP(2, bin_width=small_vdp["bin_width"])
    model.fit(small_vdp["counts"], steps=20, hyperparameters="whittle", whittle_every=5, progress=False)
    assert r_squared_affine(model.latents(), small_vdp["latents"]) > 0.85
    with pytest.raises(ValueError, match="`hyperparameters`"):
        model.fit(small_vdp["counts"], hyperparameters="bogus")


def test_posterior_samples_match_smoother_moments(small_fit):
    """Matheron samples used for the expected periodogram have the smoother's mean and variance."""
    from latentgp.variational.cvi import sample_posterior_latents

    m = small_fit
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        A, Q, P0, H = joint_state_space(state_space_form(m.kernel), m._dt)
        f = sample_posterior_latents(A, Q, P0, H, m.sites, 200, generator=gen)
    mean, var = m.latents(), m.latent_variance()
    se = np.sqrt(var / 200)
    z = (f.mean(0).numpy() - mean) / se
    assert np.abs(z).max() < 5.5 and abs(z.mean()) < 0.2
    ratio = f.var(0).numpy() / var
    assert abs(ratio.mean() - 1) < 0.03


def test_whitened_moments_equal_the_dense_linear_map():
    """q(f) of the SVI guide: exact moments by scans vs the dense map ε -> f built column by column."""
    from latentgp.variational.whitened import whitened_latents, whitened_moments

    L, T = 2, 25
    kernel = HidaMatern(order=1, batch_shape=torch.Size([L])).double()
    kernel.lengthscale = torch.tensor([[[0.3]], [[0.8]]], dtype=T64)
    dt = torch.full((T,), 0.1, dtype=T64)
    dt[0] = 0
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        A, Q, P0, H = joint_state_space(state_space_form(kernel), dt)
        S = P0.shape[-1]
        loc = torch.randn(2, T, S, dtype=T64, generator=gen)
        scale = torch.rand(2, T, S, dtype=T64, generator=gen)
        mean, cov = whitened_moments(A, Q, P0, H, loc, scale)
        M = whitened_latents(A, Q, P0, H, torch.eye(T * S, dtype=T64).reshape(T * S, T, S)).reshape(T * S, T * L).T
        for n in range(2):
            np.testing.assert_allclose(mean[n].reshape(-1).numpy(), (M @ loc[n].reshape(-1)).numpy(), atol=1e-12)
            dense = M @ torch.diag(scale[n].reshape(-1) ** 2) @ M.T
            for t in range(T):
                np.testing.assert_allclose(cov[n, t].numpy(), dense[t * L:(t + 1) * L, t * L:(t + 1) * L].numpy(),
                                           atol=1e-12)
        # with the prior's own noise (loc 0, scale 1) the marginals are the stationary prior covariance
        _, prior = whitened_moments(A, Q, P0, H, torch.zeros(1, T, S, dtype=T64), torch.ones(1, T, S, dtype=T64))
        np.testing.assert_allclose(prior[0].numpy(), (H @ P0 @ H.T).expand(T, L, L).numpy(), atol=1e-9)


def test_svi_fits_the_same_model_and_cvi_reaches_a_higher_elbo(small_vdp, small_fit, tmp_path):
    svi = lgp.PoissonLatentGP(2, bin_width=small_vdp["bin_width"])
    svi.fit(small_vdp["counts"], method="svi", steps=300, lr=0.02, tol=None, progress=False, seed=0)
    assert svi.method_ == "svi" and len(svi.history) == 300
    assert r_squared_affine(svi.latents(), small_vdp["latents"]) > 0.85
    assert np.all(svi.latent_variance() > 0)
    # The best Gaussian q of this model is prior x Gaussian sites on f (CVI's family), which includes the
    # whitened mean-field q: at convergence CVI's ELBO must be the higher one.
    assert small_fit.elbo() > svi.elbo()
    draws = svi.sample_latents(300, seed=0)  # the guide's draws have the reported moments
    z = (draws.mean(0) - svi.latents()) / np.sqrt(svi.latent_variance() / 300)
    assert np.abs(z).max() < 5.5 and abs(z.mean()) < 0.2
    assert abs((draws.var(0) / svi.latent_variance()).mean() - 1) < 0.03
    svi.save(tmp_path / "svi.pt")
    back = lgp.load(tmp_path / "svi.pt")
    np.testing.assert_array_equal(back.latents(), svi.latents())
    np.testing.assert_array_equal(back.sample_latents(3, seed=1), svi.sample_latents(3, seed=1))
    with pytest.raises(ValueError, match="method"):
        svi.fit(small_vdp["counts"], method="nuts")
    with pytest.raises(ValueError, match="whittle"):
        svi.fit(small_vdp["counts"], method="svi", hyperparameters="whittle")


def test_to_inference_data(small_fit, small_vdp):
    import arviz as az

    idata = small_fit.to_inference_data(num_samples=20, seed=0)
    N, T, D = small_vdp["counts"].shape
    assert idata.posterior["latents"].shape == (1, 20, N, T, 2)
    assert idata.posterior_predictive["counts"].shape == (1, 20, N, T, D)
    np.testing.assert_array_equal(idata.observed_data["counts"].values, small_vdp["counts"])
    # pointwise log-likelihood is the Poisson log-pmf at the drawn rates
    eta = idata.posterior["latents"].values[0, 0] @ small_fit.C.detach().numpy() + small_fit.d.detach().numpy()
    ref = scipy.stats.poisson(np.exp(eta) * small_vdp["bin_width"]).logpmf(small_vdp["counts"])
    np.testing.assert_allclose(idata.log_likelihood["counts"].values[0, 0], ref, rtol=1e-10, atol=1e-10)
    # the replicated counts have the data's total rate (within 3 %)
    assert abs(idata.posterior_predictive["counts"].values.mean() / small_vdp["counts"].mean() - 1) < 0.03
    assert np.isfinite(az.waic(idata, var_name="counts").elpd_waic)


def test_gaussian_likelihood_with_negative_values_starts_finite():
    """The data-driven start must not take logs of real-valued (Gaussian) observations."""
    rng = np.random.default_rng(0)
    y = rng.normal(size=(2, 40, 5)) - 2.0
    m = lgp.PoissonLatentGP(1, likelihood="gaussian", bin_width=0.1).fit(y, steps=3, progress=False)
    assert np.isfinite(m.latents()).all() and np.isfinite(m.elbo())


@pytest.mark.parametrize("s", [1, 2, 3])
def test_trace_solve_logdet_matches_dense_linear_algebra(s):
    """The M-step's tr(M⁻¹S) + log|M| (closed form for s <= 2, Cholesky above) against inv/slogdet, value and
    gradient; a singular M gets the documented jitter, or a LinAlgError naming it without a jitter scale."""
    from latentgp.variational.cvi import trace_solve_logdet

    g = torch.Generator().manual_seed(s)
    G = torch.randn(4, 7, s, s, dtype=torch.float64, generator=g)
    M = (G @ G.mT + 0.1 * torch.eye(s, dtype=torch.float64)).requires_grad_(True)
    S = torch.randn(4, 7, s, s, dtype=torch.float64, generator=g)
    got = trace_solve_logdet(M, S)
    ref = (torch.linalg.inv(M) @ S).diagonal(dim1=-2, dim2=-1).sum(-1) + torch.linalg.slogdet(M)[1]
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    (g_got,) = torch.autograd.grad(got.sum(), M)
    (g_ref,) = torch.autograd.grad(ref.sum(), M)
    sym = lambda x: 0.5 * (x + x.mT)  # noqa: E731  (M is symmetric: only its symmetric part is defined)
    assert torch.allclose(sym(g_got), sym(g_ref), rtol=1e-10, atol=1e-10)
    singular = torch.zeros(s, s, dtype=torch.float64)
    singular[0, 0] = 1.0  # rank one
    if s > 1:
        with pytest.raises(torch.linalg.LinAlgError, match="Q is not positive definite"):
            trace_solve_logdet(singular, S[0, 0], what="Q")
        jittered = trace_solve_logdet(singular, torch.eye(s, dtype=torch.float64), jitter_scale=1.0)
        assert torch.isfinite(jittered) and float(jittered) > 1e11  # tr((M + 1e-12 I)^-1) ~ (s - 1) 1e12
