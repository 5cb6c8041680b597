"""FunBaT (FunctionalTucker): mode ordering, per-coordinate aggregation, exact GP on a fixed mode, fits."""
import numpy as np
import pandas as pd
import pytest
import torch

import latentgp as lgp
from latentgp.kernels import Matern, state_space_form
from latentgp.variational import cep
from latentgp.variational.cvi import expected_log_prior, latent_blocks

T64 = torch.float64


@pytest.mark.parametrize("ranks", [(2, 3), (2, 3, 2), (3, 1, 2, 2)])
def test_mode_ordering_matches_the_kronecker_product(ranks):
    """a_kᵀ u_k = vec(W)ᵀ (u_1 ⊗ ... ⊗ u_K) for every mode k (row-major vec, Kronecker in mode order),
    and E[a aᵀ] with a point-mass W and factors is a_k a_kᵀ."""
    gen = torch.Generator().manual_seed(len(ranks))
    W = torch.randn(*ranks, dtype=T64, generator=gen)
    us = [torch.randn(1, r, dtype=T64, generator=gen) for r in ranks]
    kron = us[0][0].numpy()
    for u in us[1:]:
        kron = np.kron(kron, u[0].numpy())
    target = W.numpy().reshape(-1) @ kron
    seconds = [u.unsqueeze(-1) * u.unsqueeze(-2) for u in us]
    W2 = W.reshape(*ranks, *([1] * len(ranks))) * W.reshape(*([1] * len(ranks)), *ranks)
    for k in range(len(ranks)):
        Ea, Eaa = cep.other_moments("tucker", k, us, seconds, W, W2)
        assert float(Ea[0] @ us[k][0]) == pytest.approx(target, rel=1e-12)
        np.testing.assert_allclose(Eaa[0].numpy(), torch.outer(Ea[0], Ea[0]).numpy(), rtol=1e-12, atol=1e-14)
    Ef, Ef2 = cep.entry_moments("tucker", us, seconds, W, W2)
    assert float(Ef) == pytest.approx(target, rel=1e-12) and float(Ef2) == pytest.approx(target**2, rel=1e-12)


def test_cp_is_tucker_with_a_superdiagonal_core():
    gen = torch.Generator().manual_seed(0)
    R, K, n = 3, 3, 5
    means = [torch.randn(n, R, dtype=T64, generator=gen) for _ in range(K)]
    L = [torch.randn(n, R, R, dtype=T64, generator=gen) for _ in range(K)]
    seconds = [cep.second_moments(m, l @ l.transpose(-1, -2)) for m, l in zip(means, L, strict=True)]
    W = torch.zeros(R, R, R, dtype=T64)
    W[range(R), range(R), range(R)] = 1.0
    W2 = W.reshape(R, R, R, 1, 1, 1) * W.reshape(1, 1, 1, R, R, R)
    for k in range(K):
        cp, tucker = cep.other_moments("cp", k, means, seconds), cep.other_moments("tucker", k, means, seconds, W, W2)
        for a, b in zip(cp, tucker, strict=True):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-12)
    for a, b in zip(cep.entry_moments("cp", means, seconds), cep.entry_moments("tucker", means, seconds, W, W2),
                    strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)


def _toy(n=300, seed=0, K=2):
    rng = np.random.default_rng(seed)
    coords = rng.uniform(0, 1, (n, K)).round(2)  # repeated coordinate values: several entries per site
    y = np.sin(2 * np.pi * coords[:, 0]) * np.cos(3 * coords[:, 1]) + 0.05 * rng.standard_normal(n)
    return coords, y


@pytest.mark.parametrize("kind", ["cp", "tucker"])
def test_aggregated_messages_equal_per_entry_message_passing(kind):
    coords, y = _toy(K=3)
    model = lgp.FunctionalTucker(2, kind=kind).fit(coords, y, sweeps=2, progress=False, seed=0)
    for k, mode in enumerate(model._modes):
        precision, shift = model._messages(k)
        ref_p = np.zeros(tuple(precision.shape))
        ref_s = np.zeros(tuple(shift.shape))
        for n in range(len(y)):  # reference: one message per entry, added to its coordinate's site
            rows = [int(m.index[n]) for m in model._modes]  # entry n's moments formed here, per entry
            means = [m.mean[r:r + 1] for m, r in zip(model._modes, rows, strict=True)]
            seconds = [m.cov[r:r + 1] + torch.outer(m.mean[r], m.mean[r])[None]
                       for m, r in zip(model._modes, rows, strict=True)]
            Ea, Eaa = cep.other_moments(kind, k, means, seconds, model._core_mean, model._core_second)
            i = int(mode.index[n])
            ref_p[i] += model._tau * Eaa[0].numpy()
            ref_s[i] += model._tau * (float(model._train[n]) - model._bias_mean) * Ea[0].numpy()
        np.testing.assert_allclose(precision.numpy(), ref_p, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(shift.numpy(), ref_s, rtol=1e-10, atol=1e-10)
        assert precision.shape == (len(mode.values), 2, 2)  # per unique coordinate, not per entry


def test_fixed_mode_posterior_is_exact_gp_regression():
    """Mode 1 known exactly (zero variance), τ fixed: one undamped CEP update of mode 0 is Gaussian
    conditioning of u_0 on y_n = a_nᵀ u_0(i_n) + ε — compare with the dense GP posterior."""
    coords, y = _toy(n=120, seed=2)
    R = 2
    model = lgp.FunctionalTucker(R, kind="cp").fit(coords, y, sweeps=1, learn_hyperparameters=False, progress=False)
    rng = np.random.default_rng(5)
    m1 = model._modes[1]
    m1.mean = torch.as_tensor(rng.standard_normal((len(m1.values), R)))
    m1.cov = torch.zeros(len(m1.values), R, R, dtype=T64)
    model._tau = 7.0
    m0 = model._modes[0]
    m0.sites = type(m0.sites).zeros((), len(m0.values), R, T64)
    model._update_mode(0, 1.0)
    # dense reference
    U = len(m0.values)
    with torch.no_grad():
        Kr = m0.kernel(m0.grid.unsqueeze(-1)).to_dense().numpy()  # (R, U, U)
    Kfull = np.zeros((U * R, U * R))
    for r in range(R):
        Kfull[r::R, r::R] = Kr[r]
    a = m1.mean[m1.index].numpy()  # (N, R)
    G = np.zeros((len(y), U * R))
    G[np.arange(len(y))[:, None], m0.index.numpy()[:, None] * R + np.arange(R)] = a
    assert model._bias_mean != 0.0  # the fitted offset is subtracted from the data the factor sees
    yt = model._train.numpy() - model._bias_mean
    S = G @ Kfull @ G.T + np.eye(len(y)) / 7.0
    KG = Kfull @ G.T
    mean = KG @ np.linalg.solve(S, yt)
    cov = Kfull - KG @ np.linalg.solve(S, KG.T)
    np.testing.assert_allclose(m0.mean.numpy().reshape(-1), mean, rtol=1e-8, atol=1e-9)
    for u in range(U):
        np.testing.assert_allclose(m0.cov[u].numpy(), cov[u * R:(u + 1) * R, u * R:(u + 1) * R], rtol=1e-8, atol=1e-9)


def _cp_rank1(n_grid=40, frac=0.3, noise=0.02, seed=0):
    rng = np.random.default_rng(seed)
    g = np.linspace(0, 1, n_grid)
    I, J = np.meshgrid(g, g, indexing="ij")
    truth = -np.sin(2 * np.pi * I) ** 3 * (1 - np.sin(np.pi * J) ** 3) * np.sin(3 * np.pi * J) ** 3
    coords = np.c_[I.ravel(), J.ravel()]
    perm = rng.permutation(len(coords))
    tr, te = perm[: int(frac * len(perm))], perm[int(frac * len(perm)):]
    y = truth.ravel()[tr] + noise * rng.standard_normal(len(tr))
    return pd.DataFrame({"lat": coords[tr, 0], "lon": coords[tr, 1], "value": y}), coords[te], truth.ravel()[te]


def test_cp_rank1_recovers_the_surface_and_predicts_unseen_coordinates(tmp_path):
    df, test_coords, truth = _cp_rank1()
    model = lgp.FunctionalTucker(1, kind="cp").fit(df, y="value", modes=["lat", "lon"], sweeps=40, progress=False,
                                                   seed=0)
    pred = model.predict(pd.DataFrame(test_coords, columns=["lat", "lon"]))
    assert list(pred.columns) == ["lat", "lon", "mean", "var", "lower", "upper"]
    rmse = np.sqrt(np.mean((pred["mean"] - truth) ** 2))
    assert rmse < 0.02, rmse
    assert model.noise_sd == pytest.approx(0.02, rel=0.25)
    # unseen coordinates (between training values): smooth interpolation, finite variances
    new = model.predict(np.array([[0.123456, 0.654321], [0.5, 0.25]]), include_noise=True)
    assert np.all(new["var"] > 0) and np.all(np.isfinite(new["mean"]))
    f = model.factors("lat", np.linspace(0, 1, 7))
    assert list(f.columns) == ["lat", "factor", "mean", "var", "lower", "upper"] and len(f) == 7
    assert len(model.factors("lon")) == df["lon"].nunique()  # default grid: the training coordinates
    assert len(model.history) >= 2 and "noise_sd" in model.history
    model.save(tmp_path / "funbat.pt")
    back = lgp.load(tmp_path / "funbat.pt")
    pd.testing.assert_frame_equal(back.predict(test_coords[:20]), model.predict(test_coords[:20]))


def test_tucker_three_modes_fits_a_rank_two_interaction():
    rng = np.random.default_rng(1)
    coords = rng.uniform(0, 1, (800, 3))
    f = np.sin(3 * coords[:, 0]) * np.cos(2 * coords[:, 1]) + coords[:, 2] * np.sin(4 * coords[:, 0])
    y = f + 0.05 * rng.standard_normal(len(f))
    model = lgp.FunctionalTucker([3, 3, 3], kind="tucker").fit(coords[:600], y[:600], sweeps=20, progress=False,
                                                                seed=0)
    pred = model.predict(coords[600:])
    rmse = np.sqrt(np.mean((pred["mean"] - f[600:]) ** 2))
    assert rmse < 0.1 * f.std(), rmse  # noise sd is 0.1 x the signal's
    assert model._core_mean.shape == (3, 3, 3)
    assert model.noise_sd == pytest.approx(0.05, rel=0.3)


def test_bad_inputs():
    coords, y = _toy()
    df = pd.DataFrame({"a": coords[:, 0], "b": coords[:, 1], "v": y})
    with pytest.raises(ValueError, match="rank"):
        lgp.FunctionalTucker(0)
    with pytest.raises(ValueError, match="kind"):
        lgp.FunctionalTucker(1, kind="parafac")
    with pytest.raises(ValueError, match="not in the DataFrame"):
        lgp.FunctionalTucker(1).fit(df, y="v", modes=["a", "c"])
    bad = df.copy()
    bad.loc[3, "v"] = np.nan
    with pytest.raises(ValueError, match="finite"):
        lgp.FunctionalTucker(1).fit(bad, y="v")
    one = df.assign(b=0.5)
    with pytest.raises(ValueError, match="single unique coordinate"):
        lgp.FunctionalTucker(1).fit(one, y="v")
    with pytest.raises(ValueError, match="K >= 2"):
        lgp.FunctionalTucker(1).fit(coords[:, :1], y)
    with pytest.raises(ValueError, match="batch_shape"):
        lgp.FunctionalTucker(2, kernels=[Matern(nu=1.5), Matern(nu=1.5)]).fit(coords, y)
    with pytest.raises(lgp.models.base.NotFittedError):
        lgp.FunctionalTucker(1).predict(coords)


def test_svi_fits_the_same_model_at_training_coordinates(tmp_path):
    df, test_coords, truth = _cp_rank1(n_grid=20, frac=0.5)
    cep_fit = lgp.FunctionalTucker(1).fit(df, y="value", sweeps=30, progress=False, seed=0)
    svi = lgp.FunctionalTucker(1).fit(df, y="value", method="svi", steps=400, lr=0.03, tol=None, progress=False,
                                     seed=0)
    assert svi.method_ == "svi" and len(svi.history) == 400
    assert svi.history["loss"].iloc[-50:].mean() < svi.history["loss"].iloc[:50].mean()
    svi_rmse = np.sqrt(np.mean((svi.predict(test_coords)["mean"] - truth) ** 2))
    cep_rmse = np.sqrt(np.mean((cep_fit.predict(test_coords)["mean"] - truth) ** 2))
    assert svi_rmse < 0.5 * truth.std() and cep_rmse <= svi_rmse
    with pytest.raises(ValueError, match="seen in training"):
        svi.predict(np.array([[0.01234, 0.5]]))
    svi.save(tmp_path / "svi.pt")
    pd.testing.assert_frame_equal(lgp.load(tmp_path / "svi.pt").predict(test_coords), svi.predict(test_coords))
    with pytest.raises(ValueError, match="method"):
        lgp.FunctionalTucker(1).fit(df, y="value", method="ep")


def test_offset_and_noise_updates_match_the_closed_form():
    """q(b) and q(τ) after one pass equal the Gaussian / Gamma updates computed densely from the
    per-entry factor moments (E[f] = Σ_r Π_k m_kr, E[f²] = Σ_rr' Π_k E[u_kr u_kr'])."""
    coords, y = _toy(n=200, seed=3, K=3)
    model = lgp.FunctionalTucker(2, kind="cp", noise_prior=(2.0, 0.5)).fit(coords, y, sweeps=3, progress=False, seed=1)
    tau = model._tau
    means = [m.mean[m.index].numpy() for m in model._modes]
    seconds = [(m.cov + m.mean.unsqueeze(-1) * m.mean.unsqueeze(-2))[m.index].numpy() for m in model._modes]
    Ef = np.prod(means, axis=0).sum(-1)
    Ef2 = np.prod(seconds, axis=0).sum((-1, -2))
    yt, n = model._train.numpy(), len(y)
    vb = 1.0 / (1.0 + tau * n)
    mb = vb * tau * (yt - Ef).sum()
    expected = ((yt - mb) ** 2 - 2 * (yt - mb) * Ef + Ef2).sum() + n * vb
    rmse = model._scale * np.sqrt(np.mean((yt - mb - Ef) ** 2))
    assert model._update_noise() == pytest.approx(rmse, rel=1e-10)
    assert model._bias_mean == pytest.approx(mb, rel=1e-10) and model._bias_var == pytest.approx(vb, rel=1e-10)
    assert model._tau == pytest.approx((2.0 + n / 2) / (0.5 + expected / 2), rel=1e-10)


def test_offset_makes_a_shifted_rank_one_surface_exact():
    """y = c + u_1(x) u_2(z) + ε: a centred pure CP cannot represent y - ȳ = u_1 u_2 - (ȳ - c) (the
    constant is not rank one), the model with an offset can. The surface's mean is far from zero."""
    rng = np.random.default_rng(0)
    g = np.linspace(0, 1, 30)
    truth = (2.0 + np.outer(1.2 + np.sin(2 * np.pi * g), np.cos(2 * g))).ravel()
    coords = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    tr = rng.permutation(len(truth))[:400]
    y = truth[tr] + 0.02 * rng.standard_normal(len(tr))
    errs = {}
    for bias in (True, False):
        model = lgp.FunctionalTucker(1, bias=bias).fit(coords[tr], y, sweeps=60, progress=False, seed=0)
        errs[bias] = np.sqrt(np.mean((model.predict(coords)["mean"] - truth) ** 2))
        if bias:
            assert model.noise_sd == pytest.approx(0.02, rel=0.1)
            assert "bias" in model.history
    # without the offset the rank-1 factors must absorb the constant 2: a clearly worse fit
    assert errs[True] < 0.01 and errs[False] > 2 * errs[True], errs
    with pytest.raises(TypeError, match="bias"):
        lgp.FunctionalTucker(1, bias="yes")


def test_hyperparameter_steps_climb_to_the_maximiser_of_the_expected_log_prior():
    """Adam steps on the variational-EM objective (q fixed) converge to the maximiser of E_q[log p_θ(u_k)]
    found by an independent bounded scalar search over the lengthscale (scipy)."""
    from scipy.optimize import minimize_scalar

    coords, y = _toy(n=300, seed=4)
    model = lgp.FunctionalTucker(1).fit(coords, y, sweeps=4, learn_hyperparameters=False, progress=False, seed=0)
    mode = model._modes[0]
    blocks = [b.detach() for b in latent_blocks(mode._smoother, mode.rank)]

    def objective():  # mode 0's part of the M-step objective; the modes' parts are separable
        return -expected_log_prior(state_space_form(mode.kernel), mode.dt, *blocks) / len(mode.values)

    def at(log_ls):
        mode.kernel.lengthscale = torch.full((1, 1, 1), float(np.exp(log_ls)), dtype=T64)
        with torch.no_grad():
            return float(objective())

    ref = float(np.exp(minimize_scalar(at, bounds=(np.log(1e-3), np.log(10.0)), method="bounded",
                                       options={"xatol": 1e-10}).x))
    assert ref > 0.1
    mode.kernel.lengthscale = torch.full((1, 1, 1), 0.05, dtype=T64)  # a start well away from the optimum
    opt = torch.optim.Adam([p for m in model._modes for p in m.kernel.parameters()], lr=0.05)
    for _ in range(400):
        model._hyper_step(opt)  # every mode's step at once, as in fit()
    assert float(mode.kernel.lengthscale.detach()) == pytest.approx(ref, rel=1e-3)


def test_user_kernels_with_an_outputscale_are_learned_and_recorded():
    """A ScaleKernel-wrapped Matérn per mode (state-space form scaled by the outputscale): the history
    records both hyperparameters per mode (this used to raise: the wrapper has no `lengthscale`)."""
    import gpytorch

    coords, y = _toy(n=200, seed=6)
    kernels = [gpytorch.kernels.ScaleKernel(Matern(nu=1.5, batch_shape=torch.Size([2])), batch_shape=torch.Size([2]))
               for _ in range(2)]
    model = lgp.FunctionalTucker(2, kernels=kernels).fit(coords, y, sweeps=3, tol=None, progress=False, seed=0)
    cols = set(model.history.columns)
    assert {"outputscale_mode0_0", "lengthscale_mode1_base_kernel_1"} <= cols
    assert model.history["outputscale_mode0_0"].iloc[-1] != model.history["outputscale_mode0_0"].iloc[0]


def test_batched_expected_log_priors_equal_the_weighted_sum_of_single_chains():
    """FunBaT's M-step evaluates every mode in one batch: equal (value and gradient, 1e-12) to the weighted
    sum of one evaluation per mode, also when the modes' shapes differ (then evaluated one by one)."""
    from latentgp.variational.cvi import expected_log_priors

    coords, y = _toy(n=300, seed=5)
    for rank in (2, [2, 3]):
        kind = "cp" if rank == 2 else "tucker"
        model = lgp.FunctionalTucker(rank, kind=kind).fit(coords, y, sweeps=3, progress=False, seed=0)
        modes = model._modes
        blocks = [[b.detach() for b in latent_blocks(m._smoother, m.rank)] for m in modes]
        weights = [1.0 / len(m.values) for m in modes]
        params = [p for m in modes for p in m.kernel.parameters()]
        forms = [state_space_form(m.kernel) for m in modes]
        together = expected_log_priors([(*f.discretise(m.dt), f.P_inf) for f, m in zip(forms, modes, strict=True)],
                                       blocks, weights=weights)
        g_together = torch.autograd.grad(together, params)
        apart = sum(w * expected_log_prior(state_space_form(m.kernel), m.dt, *b)
                    for m, b, w in zip(modes, blocks, weights, strict=True))
        g_apart = torch.autograd.grad(apart, params)
        assert float(together.detach()) == pytest.approx(float(apart.detach()), rel=1e-12)
        for a, b in zip(g_together, g_apart, strict=True):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_m_step_rebuilds_its_graph_when_the_hyperparameters_did_not_move():
    """The state-space models are cached while θ keeps its values, but each M-step needs a fresh graph
    (backward frees it): two steps that leave θ unchanged (lr = 0) must not reuse a freed graph."""
    coords, y = _toy(n=200, seed=8)
    model = lgp.FunctionalTucker(1).fit(coords, y, sweeps=2, tol=None, progress=False, seed=0)
    before = [m.kernel.lengthscale.detach().clone() for m in model._modes]
    opt = torch.optim.SGD([p for m in model._modes for p in m.kernel.parameters()], lr=0.0)
    for _ in range(2):
        model._hyper_step(opt)
    assert all(torch.equal(b, m.kernel.lengthscale.detach()) for b, m in zip(before, model._modes, strict=True))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for m in model._modes for p in m.kernel.parameters())


def test_one_kernel_for_every_mode_is_copied_per_mode_and_shared_kernels_tie():
    """``kernel=`` (the issue's signature) gives every mode its own copy, learned separately, and leaves the
    user's object untouched; the same object in ``kernels=`` ties the modes' hyperparameters (one parameter,
    stepped once per sweep); bad kernels are refused before fitting."""
    coords, y = _toy(n=300, seed=9)
    template = Matern(nu=1.5, batch_shape=torch.Size([2])).double()
    template.lengthscale = torch.full((2, 1, 1), 0.3, dtype=T64)
    model = lgp.FunctionalTucker(2, "cp", template).fit(coords, y, sweeps=5, tol=None, progress=False, seed=0)
    k0, k1 = (m.kernel for m in model._modes)
    assert k0 is not template and k1 is not template and k0 is not k1
    assert torch.allclose(template.lengthscale, torch.full((2, 1, 1), 0.3, dtype=T64))
    assert not torch.allclose(k0.lengthscale, k1.lengthscale)  # learned per mode
    shared = Matern(nu=1.5, batch_shape=torch.Size([2])).double()
    tied = lgp.FunctionalTucker(2, kernels=[shared, shared]).fit(coords, y, sweeps=5, tol=None, progress=False, seed=0)
    assert tied._modes[0].kernel is tied._modes[1].kernel
    assert tied.history["lengthscale_mode0_0"].equals(tied.history["lengthscale_mode1_0"])
    with pytest.raises(TypeError, match="kernel"):
        lgp.FunctionalTucker(2, "cp", 1.5)
    with pytest.raises(ValueError, match="either"):
        lgp.FunctionalTucker(2, kernel=template, kernels=[template, template])
    with pytest.raises(ValueError, match=r"kernel \(mode 0\) must have batch_shape \(3,\)"):
        lgp.FunctionalTucker(3, kernel=template).fit(coords, y, sweeps=1, progress=False)


def test_batched_m_step_needing_jitter_equals_per_mode_sum():
    """A near-duplicate coordinate (gap 1e-9) makes one chain's Q(dt) need jitter; jitter is decided per
    chain, so the batch must equal the per-chain sum (value and gradient) and leave the other chain alone."""
    from latentgp.variational.cvi import expected_log_priors

    g = torch.Generator().manual_seed(0)
    kernels = [Matern(nu=1.5, batch_shape=torch.Size([2])).double() for _ in range(2)]
    kernels[0].lengthscale = torch.full((2, 1, 1), 0.01, dtype=T64)
    kernels[1].lengthscale = torch.full((2, 1, 1), 30.0, dtype=T64)
    dts = [torch.tensor([0.0, 0.1, 1e-9, 0.05], dtype=T64), torch.tensor([0.0, 0.3, 0.2, 0.2, 0.1], dtype=T64)]
    blocks = []
    for dt in dts:
        T = len(dt)
        G = torch.randn(2, T, 2, 2, dtype=T64, generator=g)
        blocks.append((torch.randn(2, T, 2, dtype=T64, generator=g), G @ G.mT + 0.1 * torch.eye(2, dtype=T64),
                       0.1 * torch.randn(2, T - 1, 2, 2, dtype=T64, generator=g)))
    params = [p for k in kernels for p in k.parameters()]
    forms = [state_space_form(k) for k in kernels]
    priors = [(*f.discretise(dt), f.P_inf) for f, dt in zip(forms, dts, strict=True)]
    together = expected_log_priors(priors, blocks, weights=[0.5, 2.0])
    apart = 0.5 * expected_log_prior(state_space_form(kernels[0]), dts[0], *blocks[0]) + 2.0 * expected_log_prior(
        state_space_form(kernels[1]), dts[1], *blocks[1])
    assert float(together.detach()) == pytest.approx(float(apart.detach()), rel=1e-12)
    for a, b in zip(torch.autograd.grad(together, params), torch.autograd.grad(apart, params), strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    from latentgp.variational.cvi import trace_solve_logdet

    with pytest.raises(torch.linalg.LinAlgError):  # the batch does need jitter (else this tests nothing)
        Q = torch.cat([p[1][..., 1:, :, :] for p in priors], -3)
        trace_solve_logdet(Q, torch.eye(2, dtype=T64).expand_as(Q))


def test_refit_renames_history_and_fitted_model_deep_copies():
    """History columns follow the current fit's mode names; a fitted model (after M-steps) can be deep-copied
    (no tensors with a freed graph left behind); Tucker fits with the same seed are reproducible."""
    import copy

    coords, y = _toy(n=200, seed=10)
    ks = [Matern(nu=1.5, batch_shape=torch.Size([1])).double() for _ in range(2)]
    model = lgp.FunctionalTucker(1, kernels=ks)
    model.fit(pd.DataFrame({"a": coords[:, 0], "b": coords[:, 1], "v": y}), y="v", sweeps=2, progress=False)
    model.fit(pd.DataFrame({"time": coords[:, 0], "space": coords[:, 1], "v": y}), y="v", sweeps=2, progress=False)
    assert "lengthscale_time_0" in model.history and "lengthscale_a_0" not in model.history
    twin = copy.deepcopy(model)
    assert np.allclose(twin.predict(coords[:5])["mean"], model.predict(coords[:5])["mean"])
    fits = [lgp.FunctionalTucker([2, 2], kind="tucker").fit(coords, y, sweeps=3, progress=False, seed=4) for _ in "ab"]
    assert fits[0].history["loss"].equals(fits[1].history["loss"])
