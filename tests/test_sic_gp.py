"""SICGP (DKLGP) against dense references: ELBO pieces, exact GP at a full pattern, dense VI."""
import gpytorch
import numpy as np
import pytest
import torch

import latentgp as lgp
from latentgp.models.sic import SICGP
from latentgp.variational.sic import (
    GaussianLikelihood,
    PoissonLikelihood,
    block_system,
    elbo_terms,
    gaussian_optimal_mean,
    sampled_elbo_terms,
)


def _kernel():
    k = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=1.5)).double()
    k.outputscale = torch.tensor(1.0, dtype=torch.float64)
    k.base_kernel.lengthscale = torch.tensor(0.3, dtype=torch.float64)
    return k


def _data(rng, n=40):
    X = rng.uniform(size=(n, 2))
    y = np.sin(6 * X[:, 0]) + np.cos(4 * X[:, 1]) + 0.1 * rng.normal(size=n)
    return X, y


def _dense(model):
    """Dense V, Û, ν, μ of a fitted model (in its internal order)."""
    n = len(model._order)
    P = model._pattern_t
    V = lgp.linalg.sic.SparseInverseCholesky(model.q.values(torch.arange(n)), P).to_dense()
    U = lgp.linalg.sic.SparseInverseCholesky(model._prior_columns(np.arange(n)), P).to_dense()
    return V, U, model.q.nu[:, 0], model._prior_mean()


def test_elbo_pieces_match_dense_and_blocks_are_unbiased(rng):
    X, y = _data(rng, 60)
    m = SICGP(kernel=_kernel(), rho=2.0, noise=0.05, max_neighbors=6).fit(X, y, steps=0, batch_size=16)
    with torch.no_grad():  # move q away from the prior so every term is non-trivial
        m.q.raw.add_(0.1 * torch.as_tensor(rng.normal(size=m.q.raw.shape)) * m.q.mask)
        m.q.nu.add_(0.3 * torch.as_tensor(rng.normal(size=m.q.nu.shape)))
        V, U, nu, mu = _dense(m)
        n = len(nu)
        Sq = torch.cholesky_inverse(torch.linalg.cholesky(V @ V.T))
        Sp_inv = U @ U.T
        kl = 0.5 * (torch.trace(Sp_inv @ Sq) + (nu - mu) @ Sp_inv @ (nu - mu) - n
                    - torch.logdet(Sq) - torch.logdet(Sp_inv))
        noise = 0.05
        r = m._y - nu
        ell = -0.5 * ((r ** 2 + torch.diagonal(Sq)) / noise + np.log(2 * np.pi * noise)).sum()
        everything = np.arange(n)
        e, k, var = elbo_terms(m.q, m._pattern, everything, m._prior_columns(everything), mu, m._y, m.likelihood)
        torch.testing.assert_close(var, torch.diagonal(Sq), rtol=1e-10, atol=1e-12)
        assert k.sum().item() == pytest.approx(kl.item(), rel=1e-9)
        assert e.sum().item() == pytest.approx(ell.item(), rel=1e-10)
        assert m.elbo() == pytest.approx((ell - kl).item(), rel=1e-9)
        # each block's estimate is (#blocks) x its sum; their average over the partition is the ELBO
        per_block = [-m._block_loss(b, False).item() * n for b in m._blocks_idx]
        assert np.mean(per_block) == pytest.approx(m.elbo(), rel=1e-9)
        assert np.std(per_block) > 0


def _perturbed(rng, likelihood="gaussian"):
    """A model with q moved away from the prior, and its training blocks."""
    X, y = _data(rng, 60)
    y = y if likelihood == "gaussian" else (y > 0).astype(float)
    m = SICGP(kernel=_kernel(), rho=2.0, likelihood=likelihood, noise=0.05 if likelihood == "gaussian" else None,
              max_neighbors=6).fit(X, y, steps=0, batch_size=16)
    with torch.no_grad():
        m.q.raw.add_(0.1 * torch.as_tensor(rng.normal(size=m.q.raw.shape)) * m.q.mask)
        m.q.nu.add_(0.3 * torch.as_tensor(rng.normal(size=m.q.nu.shape)))
    return m


def test_sampled_estimator_has_the_exact_expectation(rng):
    """The minibatch estimator is quadratic in the draws ε; with the design ε = √N [I, -I] (mean 0, second
    moment I) its average is its Gaussian expectation, which must equal the exact terms -- values and
    gradients (w.r.t. q and the hyperparameters) to rounding error."""
    m = _perturbed(rng)
    for b in m._blocks_idx[:3]:
        system = block_system(m._pattern, b)
        N = len(system.rows)
        assert N < len(m._order) or len(m._blocks_idx) == 1
        design = np.sqrt(N) * torch.eye(N, dtype=torch.float64)
        design = torch.cat([design, -design], 1)
        params = [m.q.raw, m.q.nu] + m.hyperparameters()
        exact = elbo_terms(m.q, m._pattern, b, m._prior_columns(b), m._prior_mean(), m._y[b], m.likelihood)[:2]
        sampled = sampled_elbo_terms(m.q, system, m._prior_columns(b), m._prior_mean(), m._y[b], m.likelihood,
                                     eps=design)
        for e, s_ in zip(exact, sampled, strict=True):
            torch.testing.assert_close(s_, e, rtol=1e-10, atol=1e-10)
        g_exact = torch.autograd.grad((exact[0] - exact[1]).sum(), params, allow_unused=True)
        g_sampled = torch.autograd.grad((sampled[0] - sampled[1]).sum(), params, allow_unused=True)
        for ge, gs in zip(g_exact, g_sampled, strict=True):
            if ge is not None:
                torch.testing.assert_close(gs, ge, rtol=1e-9, atol=1e-10)
                assert gs.abs().max() > 0
        # the default draws solve for half of the antithetic pairs and negate: same values and gradients
        torch.manual_seed(5)
        half = torch.randn(N, 3, dtype=torch.float32).double()
        given = sampled_elbo_terms(m.q, system, m._prior_columns(b), m._prior_mean(), m._y[b], m.likelihood,
                                   eps=torch.cat([half, -half], 1))
        torch.manual_seed(5)
        drawn = sampled_elbo_terms(m.q, system, m._prior_columns(b), m._prior_mean(), m._y[b], m.likelihood,
                                   n_samples=6)
        for x, z in zip(given, drawn, strict=True):
            torch.testing.assert_close(z, x, rtol=1e-12, atol=1e-12)
        for x, z in zip(torch.autograd.grad((given[0] - given[1]).sum(), params[:2]),
                        torch.autograd.grad((drawn[0] - drawn[1]).sum(), params[:2]), strict=True):
            torch.testing.assert_close(z, x, rtol=1e-10, atol=1e-12)


def test_sampled_estimator_is_unbiased_for_bernoulli(rng):
    """Non-Gaussian: quadrature inside, Monte Carlo outside -- the average of many draws matches the exact
    ELBO of the block within 4 standard errors (the KL part is exact with the moment design)."""
    m = _perturbed(rng, "bernoulli")
    b = m._blocks_idx[0]
    system = block_system(m._pattern, b)
    with torch.no_grad():
        e, k, _ = elbo_terms(m.q, m._pattern, b, m._prior_columns(b), m._prior_mean(), m._y[b], m.likelihood)
        torch.manual_seed(0)
        draws = torch.stack([sampled_elbo_terms(m.q, system, m._prior_columns(b), m._prior_mean(), m._y[b],
                                                m.likelihood, n_samples=16)[0].sum() for _ in range(600)])
    se = draws.std() / np.sqrt(len(draws))
    assert abs(draws.mean() - e.sum()) < 4 * se
    assert se < 0.01 * abs(e.sum())  # and the estimator is not uselessly noisy


def test_quadrature_matches_closed_forms():
    y = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    mean = torch.tensor([0.1, 0.5, -0.4], dtype=torch.float64)
    var = torch.tensor([0.2, 1.5, 0.05], dtype=torch.float64)
    g = GaussianLikelihood(noise=0.3)
    torch.testing.assert_close(g.quadrature_log_prob(y, mean, var), g.expected_log_prob(y, mean, var),
                               rtol=1e-12, atol=1e-12)
    counts = torch.tensor([0.0, 3.0, 1.0], dtype=torch.float64)
    closed = counts * mean - torch.exp(mean + var / 2) - torch.lgamma(counts + 1)
    torch.testing.assert_close(PoissonLikelihood().expected_log_prob(counts, mean, var), closed,
                               rtol=1e-10, atol=1e-10)


def test_full_pattern_matches_exact_gp(rng):
    X, y = _data(rng, 40)
    Xs = rng.uniform(size=(25, 2))
    exact = lgp.GPRegressor(kernel=_kernel(), noise=0.01, mean="zero").fit(X, y, steps=0)
    ref = exact.predict(Xs)
    m = SICGP(kernel=_kernel(), rho=1e6, noise=0.01, max_neighbors=None, mean="zero")
    m.fit(X, y, steps=150, method="lbfgs", learn_hyperparameters=False, tol=None)
    got = m.predict(Xs)
    # Achieved after 150 L-BFGS steps: means to ~1e-6, variances to ~1e-3 relative.
    assert np.abs(got["mean"] - ref["mean"]).max() < 1e-4
    assert np.abs(got["var"] / ref["var"] - 1).max() < 1e-2
    lml = exact.log_marginal_likelihood()
    assert lml - 1e-3 < m.elbo() <= lml + 1e-9


def test_minibatch_fit_learns_and_roundtrips(rng, tmp_path):
    X, y = _data(rng, 300)
    m = SICGP(rho=2.0, max_neighbors=10).fit(X, y, steps=150, batch_size=64, lr=0.05, seed=1)
    assert {"step", "loss", "lengthscale", "outputscale", "noise"} <= set(m.history.columns)
    assert m.history.loss.iloc[-20:].mean() < m.history.loss.iloc[:10].mean()
    Xs = rng.uniform(size=(50, 2))
    pred = m.predict(Xs)
    truth = np.sin(6 * Xs[:, 0]) + np.cos(4 * Xs[:, 1])
    assert np.sqrt(np.mean((pred["mean"] - truth) ** 2)) < 0.35 * truth.std()
    assert list(pred.columns) == ["x0", "x1", "mean", "var", "lower", "upper"]
    m.save(tmp_path / "sic.pt")
    again = lgp.load(tmp_path / "sic.pt")
    np.testing.assert_allclose(again.predict(Xs)[["mean", "var"]], pred[["mean", "var"]], rtol=1e-12)


def _dense_vi(K, y, loglik, steps=200):
    """Independent reference: Gaussian VI with a dense Cholesky-parametrised q, 1-D Gauss-Hermite."""
    n = len(y)
    x, w = np.polynomial.hermite_e.hermegauss(40)
    x, w = torch.as_tensor(x), torch.as_tensor(w / w.sum())
    m = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    Lraw = torch.zeros(n, n, dtype=torch.float64)
    Lraw.diagonal().fill_(-1.0)
    Lraw.requires_grad_(True)
    Kinv, logdetK = torch.linalg.inv(K), torch.logdet(K)
    opt = torch.optim.LBFGS([m, Lraw], max_iter=steps, line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                            tolerance_change=1e-14)

    def neg_elbo():
        L = torch.tril(Lraw, -1) + torch.diag(torch.exp(torch.diagonal(Lraw)))
        S = L @ L.T
        f = m[:, None] + torch.sqrt(torch.diagonal(S))[:, None] * x
        ell = (loglik(y[:, None], f) * w).sum()
        kl = 0.5 * (torch.trace(Kinv @ S) + m @ Kinv @ m - n + logdetK - 2 * torch.diagonal(Lraw).sum())
        return kl - ell

    def closure():
        opt.zero_grad()
        loss = neg_elbo()
        loss.backward()
        return loss

    opt.step(closure)
    return -neg_elbo().item()


def test_bernoulli_full_pattern_matches_dense_vi(rng):
    X = rng.uniform(size=(25, 2))
    y = (np.sin(6 * X[:, 0]) + 0.3 * rng.normal(size=25) > 0).astype(float)
    m = SICGP(kernel=_kernel(), rho=1e6, likelihood="bernoulli", max_neighbors=None, mean="zero")
    m.fit(X, y, steps=150, method="lbfgs", learn_hyperparameters=False)
    K = _kernel()(m._X).to_dense().detach()
    ref = _dense_vi(K, m._y, lambda yy, f: yy * f - torch.nn.functional.softplus(f))
    assert m.elbo() == pytest.approx(ref, abs=1e-4)
    assert m.elbo() <= ref + 1e-8


def test_bad_input(rng):
    X, y = _data(rng, 20)
    with pytest.raises(ValueError, match="rho"):
        SICGP(rho=0.0)
    with pytest.raises(ValueError, match="max_neighbors"):
        SICGP(max_neighbors=0)
    with pytest.raises(ValueError, match="likelihood"):
        SICGP(likelihood="cauchy")
    m = SICGP()
    Xn = X.copy()
    Xn[2, 0] = np.nan
    with pytest.raises(ValueError, match="X"):
        m.fit(Xn, y, steps=0)
    Xd = X.copy()
    Xd[5] = Xd[9]
    with pytest.raises(ValueError, match="duplicated"):
        m.fit(Xd, y, steps=0)
    with pytest.raises(ValueError, match="y"):
        SICGP(likelihood="bernoulli").fit(X, y, steps=0)
    with pytest.raises(ValueError, match="n_samples"):
        m.fit(X, y, steps=1, n_samples=0)
    assert m._train is None  # nothing was stored by the failed calls
    with pytest.raises(lgp.models.base.NotFittedError):
        m.predict(X)


def test_data_weight_scales_the_expected_log_likelihood(rng):
    X, y = _data(rng, 60)
    with pytest.raises(ValueError, match="unbounded"):
        SICGP(kernel=_kernel(), rho=2.0, max_neighbors=6).fit(X, y, steps=5, data_weight=3.0)
    m = SICGP(kernel=_kernel(), rho=2.0, noise=0.05, max_neighbors=6).fit(X, y, steps=0, batch_size=16,
                                                                          data_weight=3.0)
    n = len(m._order)
    everything = np.arange(n)
    with torch.no_grad():
        e, k, _ = elbo_terms(m.q, m._pattern, everything, m._prior_columns(everything), m._prior_mean(), m._y,
                             m.likelihood)
        assert -m._block_loss(everything, False).item() * n == pytest.approx((3.0 * e - k).sum().item(), rel=1e-12)
    # with κ > 1 and the noise fixed, the fitted lengthscale is shorter (the data weigh more than the prior)
    fits = {}
    for kappa in (1.0, 20.0):
        fit = SICGP(rho=3.0, noise=0.01, max_neighbors=10).fit(X, y, method="lbfgs", steps=60, data_weight=kappa,
                                                                  progress=False)
        fits[kappa] = float(fit.kernel.base_kernel.lengthscale.detach())
    assert fits[20.0] < fits[1.0]


def test_predict_at_training_inputs_equals_training_marginals(rng):
    """A query that coincides with a training point is that point's f: its q marginal, exactly (no jitter)."""
    X = np.sort(rng.uniform(size=(60, 1)), axis=0)
    y = np.sin(6 * X[:, 0]) + 0.1 * rng.normal(size=60)
    m = SICGP(kernel=_kernel(), rho=2.0, noise=0.01, max_neighbors=6).fit(X, y, steps=30, progress=False)
    pred = m.predict(X[:3])
    ref = m.training_marginals().iloc[:3]
    np.testing.assert_allclose(pred["mean"].to_numpy(), ref["mean"].to_numpy(), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(pred["var"].to_numpy(), ref["var"].to_numpy(), rtol=1e-8, atol=1e-10)


def test_likelihood_instance_roundtrips(rng, tmp_path):
    from latentgp.variational.sic import GaussianLikelihood as GL
    from latentgp.variational.sic import StudentTLikelihood

    X, y = _data(rng, 40)
    with pytest.raises(ValueError, match="likelihood instance"):
        SICGP(likelihood=GL(), noise=0.1)
    for lik in (GL(noise=0.05), StudentTLikelihood(df=30.0)):
        m = SICGP(kernel=_kernel(), likelihood=lik, max_neighbors=6).fit(X, y, steps=5, progress=False)
        m.save(tmp_path / "m.pt")
        back = lgp.load(tmp_path / "m.pt")
        assert back.elbo() == pytest.approx(m.elbo(), rel=1e-10)


def test_row_adam_matches_sparse_adam(rng):
    """RowAdam (per-row state, the rows given) takes the same steps as torch.optim.SparseAdam."""
    from latentgp.variational.sic import RowAdam

    p1 = torch.nn.Parameter(torch.as_tensor(rng.normal(size=(30, 4))))
    p2 = torch.nn.Parameter(p1.detach().clone())
    start = p1.detach().clone()
    sparse, rows_opt = torch.optim.SparseAdam([p1], lr=0.1), RowAdam([p2], lr=0.1)
    untouched = torch.ones(30, dtype=torch.bool)
    for _ in range(6):
        rows = torch.as_tensor(np.sort(rng.choice(30, size=8, replace=False)))
        g = torch.as_tensor(rng.normal(size=(8, 4)))
        p1.grad = torch.sparse_coo_tensor(rows[None], g, p1.shape)
        sparse.step()
        rows_opt.step([rows], [g])
        untouched[rows] = False
        torch.testing.assert_close(p2, p1, rtol=1e-12, atol=1e-12)
    assert untouched.any() and torch.equal(p2[untouched], start[untouched])


@pytest.mark.parametrize("kappa", [1.0, 3.0])
def test_closed_form_mean_is_the_elbo_optimum(rng, kappa):
    """gaussian_optimal_mean against the maximiser of the exact ELBO, float64, for both preconditioners. The
    ELBO is quadratic in ν, so its Hessian columns are exact differences of autograd gradients and one
    Newton step from anywhere lands on the optimum (checked with the default preconditioner and with none)."""

    m = _perturbed(rng)
    n = len(m._order)
    everything = np.arange(n)
    U = m._prior_columns(everything).detach()

    def grad_at(nu):
        with torch.no_grad():
            m.q.nu.copy_(nu[:, None])
        e, k, _ = elbo_terms(m.q, m._pattern, everything, U, m._prior_mean(), m._y, m.likelihood)
        return torch.autograd.grad(-(kappa * e - k).sum(), m.q.nu)[0][:, 0]

    nu0 = m.q.nu.detach()[:, 0].clone()
    g0 = grad_at(nu0)
    H = torch.stack([grad_at(nu0 + torch.eye(n, dtype=nu0.dtype)[j]) - g0 for j in range(n)], 1)
    ref = nu0 - torch.linalg.solve(H, g0)
    prec = kappa / m.likelihood.noise
    for precondition in (None, lambda r: r):
        nu, iters = gaussian_optimal_mean(U, m._pattern_t, m._prior_mean(), m._y, prec, tol=1e-13,
                                          precondition=precondition)
        torch.testing.assert_close(nu, ref, rtol=0, atol=1e-8 * ref.abs().max().item())
        assert 0 < iters < 5 * n
    assert grad_at(nu).abs().max() < 1e-8 * g0.abs().max()
    # warm-started at the answer, no iterations are needed
    assert gaussian_optimal_mean(U, m._pattern_t, m._prior_mean(), m._y, prec, x0=ref, tol=1e-6)[1] == 0


def test_local_posterior_columns_match_dense_neighbourhood_posteriors(rng):
    from latentgp.variational.sic import local_posterior_columns

    m = _perturbed(rng)
    P = m._pattern_t
    U = m._prior_columns(np.arange(len(m._order))).detach()
    W = local_posterior_columns(U, 1 / 0.05)
    for i in (0, 7, 33, 59):
        s = P[i][m.q.mask[i]]
        K = m.kernel(m._X[s]).to_dense().detach()
        Q = torch.linalg.inv(K) + torch.eye(len(s), dtype=K.dtype) / 0.05  # local posterior precision
        torch.testing.assert_close(W[i][m.q.mask[i]], Q[:, 0] / Q[0, 0].sqrt(), rtol=1e-8, atol=1e-10)
        assert (W[i][~m.q.mask[i]] == 0).all()


@pytest.mark.parametrize("mkl", [True, False])
def test_closed_form_mean_in_fit(rng, monkeypatch, mkl):
    """After a fit (hyperparameters learned) ν is the exact-ELBO optimum, with either sparse-solve back end."""
    import latentgp.linalg.sic as sic_linalg

    if mkl and not (torch.backends.mkl.is_available() and hasattr(torch, "triangular_solve")):
        pytest.skip("torch built without MKL or without triangular_solve")
    monkeypatch.setattr(sic_linalg, "USE_MKL", mkl)
    X, y = _data(rng, 200)
    m = SICGP(kernel=_kernel(), rho=2.0, noise=0.05, max_neighbors=6)
    m.fit(X, y, steps=40, batch_size=32, lr=0.05, seed=0, progress=False, closed_form=np.True_)
    n = len(m._order)
    everything = np.arange(n)
    e, k, _ = elbo_terms(m.q, m._pattern, everything, m._prior_columns(everything), m._prior_mean(), m._y,
                         m.likelihood)
    g = torch.autograd.grad((e - k).sum(), m.q.nu)[0]
    assert g.abs().max() < 1e-4 * m._y.abs().max() / float(m.likelihood.noise)
    if mkl and not sic_linalg.USE_MKL:  # the MKL call raised and the solver fell back: SciPy was tested twice
        pytest.skip("this torch build's MKL sparse triangular solve raised; only the SciPy path ran")
    assert sic_linalg.USE_MKL is mkl
    with pytest.raises(ValueError, match="closed_form"):
        SICGP(likelihood="bernoulli").fit(X, (y > 0).astype(float), steps=1, closed_form=True)
    with pytest.raises(TypeError, match="closed_form"):
        SICGP().fit(X, y, steps=1, closed_form="yes")
    with pytest.raises(ValueError, match="closed_form"):
        SICGP().fit(X, y, steps=1, method="lbfgs", closed_form=True)
    SICGP(rho=1.5).fit(X[:50], y[:50], steps=1, method="lbfgs", progress=False)  # default: no closed form there


def test_optimal_mean_of_data_at_the_prior_mean_is_the_prior_mean(rng):
    """y = μ everywhere: ν* = μ exactly (CG used to chase a zero tolerance into NaN from a warm start)."""
    X, _ = _data(rng, 120)
    m = SICGP(kernel=_kernel(), rho=2.0, noise=0.05, max_neighbors=6, mean="zero")
    m.fit(X, np.zeros(len(X)), steps=0)
    nu, it = gaussian_optimal_mean(m._all_prior_columns(), m._pattern_t, m._prior_mean(), m._y, 20.0,
                                   x0=torch.ones(len(X), dtype=m._y.dtype))
    assert it == 0 and torch.equal(nu, torch.zeros_like(nu))


def test_closed_form_updates_reach_a_higher_elbo(rng):
    """Learning hyperparameters on a short-lengthscale surface: with ν solved exactly and V following the
    hyperparameters, the same number of minibatch steps ends at a much higher exact ELBO (measured here:
    15 vs -183 nats)."""
    X = rng.uniform(size=(300, 2))
    y = np.sin(15 * X[:, 0]) * np.cos(11 * X[:, 1]) + 0.1 * rng.normal(size=300)
    elbo = {cf: SICGP(rho=2.0, max_neighbors=8).fit(X, y, steps=40, batch_size=64, lr=0.05, seed=0, progress=False,
                                                    closed_form=cf).elbo() for cf in (True, False)}
    assert elbo[True] > elbo[False] + 50, elbo


def test_kernel_priors_and_bad_chunk_are_refused(rng):
    """SICGP fits point estimates: a kernel with priors would be ignored silently (as in SVGP, the same check);
    a non-positive prediction chunk used to return uninitialised memory."""
    import gpytorch

    with pytest.raises(ValueError, match="priors"):
        SICGP(kernel=gpytorch.kernels.RBFKernel(lengthscale_prior=gpytorch.priors.GammaPrior(2.0, 2.0)))
    X, y = _data(rng, 60)
    m = SICGP(kernel=_kernel(), noise=0.05, max_neighbors=5).fit(X, y, steps=2, progress=False, seed=0)
    for bad in (0, -5):
        with pytest.raises(ValueError, match="chunk"):
            m.latent_moments(X[:4], chunk=bad)
