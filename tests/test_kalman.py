"""Tests for the parallel-scan Kalman filter/smoother against a dense and a sequential twin."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import scipy.stats
import torch

from latentgp.linalg.kalman import kalman_filter, kalman_smoother
from latentgp.linalg.scan import associative_scan, state_scan

DT = torch.float64


def _relerr(a, b) -> float:
    """max |a - b| / max |b| (entrywise relative error is meaningless for near-zero covariances)."""
    a, b = torch.as_tensor(a, dtype=DT), torch.as_tensor(b, dtype=DT)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


# ------------------------------------------------------------------------------------------------
# random models
# ------------------------------------------------------------------------------------------------
def _spd(rng, *shape_and_n, lo=0.1):
    *shape, n = shape_and_n
    G = rng.standard_normal((*shape, n, n)) / math.sqrt(n)
    return G @ np.swapaxes(G, -1, -2) + lo * np.eye(n)


def random_model(seed, s, p, batch, T, time_varying_H=True, missing=0.3):
    """Stable continuous-time dynamics discretised at irregular dt: A_t = expm(F dt_t)."""
    rng = np.random.default_rng(seed)
    bsz = int(np.prod(batch)) if batch else 1
    A = np.empty((bsz, T, s, s))
    Q = np.empty((bsz, T, s, s))
    for b in range(bsz):
        N = rng.standard_normal((s, s))
        F = -(_spd(rng, s, lo=0.2)) + 0.5 * (N - N.T)  # symmetric part negative definite => stable
        dt = rng.uniform(0.05, 1.0, size=T)
        A[b] = torch.linalg.matrix_exp(torch.tensor(F[None] * dt[:, None, None])).numpy()  # one batched call
        Q[b] = _spd(rng, T, s, lo=0.05) * dt[:, None, None]
    H = rng.standard_normal((bsz, T, p, s) if time_varying_H else (p, s))
    R = _spd(rng, bsz, T, p, lo=0.2) * 0.5
    P0 = _spd(rng, bsz, s, lo=0.3)
    m0 = rng.standard_normal((bsz, s))
    y = rng.standard_normal((bsz, T, p)) * 2.0
    mask = rng.uniform(size=(bsz, T)) > missing
    if missing > 0:  # a missing first and last step in element 0, observed ones in element 1
        mask[0, 0] = mask[0, -1] = False
    if bsz > 1:
        mask[1, 0] = mask[1, -1] = True
    y[~mask] = np.nan  # missing entries must be ignored, NaN included

    def shp(x, tail):
        return torch.tensor(x, dtype=DT).reshape(tuple(batch) + x.shape[x.ndim - tail :])

    return dict(
        A=shp(A, 3),
        Q=shp(Q, 3),
        H=shp(H, 3) if time_varying_H else torch.tensor(H, dtype=DT),
        R=shp(R, 3),
        y=shp(y, 2),
        P0=shp(P0, 2),
        m0=shp(m0, 1),
        mask=torch.tensor(mask).reshape(tuple(batch) + (T,)),
    )


# ------------------------------------------------------------------------------------------------
# dense twin: the joint Gaussian of x_{0..T-1}, conditioned exactly on the observed y's
# ------------------------------------------------------------------------------------------------
def dense_posterior(A, Q, H, R, y, P0, m0, mask):
    """One (unbatched) model; differentiable torch. Returns means, covs, cross, ll, (mean_y, cov_y)."""
    T, s = A.shape[0], A.shape[-1]
    sym = lambda x: 0.5 * (x + x.transpose(-1, -2))  # noqa: E731  (same convention as the library)
    Q, R, P0 = sym(Q), sym(R), sym(P0)
    if H.dim() == 2:
        H = H.expand(T, *H.shape)
    # x = B (xi + m0 e_0),  B = (I - subdiag(A))^{-1},  xi ~ N(0, blockdiag(P0, Q_1, .., Q_{T-1}))
    Ab = torch.eye(T * s, dtype=DT)
    D = torch.zeros(T * s, T * s, dtype=DT)
    D[:s, :s] = P0
    for t in range(1, T):
        Ab[t * s : (t + 1) * s, (t - 1) * s : t * s] = -A[t]
        D[t * s : (t + 1) * s, t * s : (t + 1) * s] = Q[t]
    Bm = torch.linalg.solve_triangular(Ab, torch.eye(T * s, dtype=DT), upper=False)
    mu = Bm[:, :s] @ m0
    Sig = Bm @ D @ Bm.T
    obs = [t for t in range(T) if mask[t]]
    if obs:
        Hobs = torch.block_diag(*[H[t] for t in obs])  # (n_obs p, n_obs s) -> place into columns
        cols = torch.cat([torch.arange(t * s, (t + 1) * s) for t in obs])
        Hbig = torch.zeros(Hobs.shape[0], T * s, dtype=DT)
        Hbig[:, cols] = Hobs
        Rbig = torch.block_diag(*[R[t] for t in obs])
        yobs = torch.cat([y[t] for t in obs])
        mean_y, cov_y = Hbig @ mu, Hbig @ Sig @ Hbig.T + Rbig
        Kd = torch.linalg.solve(cov_y, Hbig @ Sig).T
        mpost = mu + Kd @ (yobs - mean_y)
        Ppost = Sig - Kd @ Hbig @ Sig
        ll = torch.distributions.MultivariateNormal(mean_y, covariance_matrix=cov_y).log_prob(yobs)
    else:
        mpost, Ppost, ll, mean_y, cov_y = mu, Sig, torch.zeros((), dtype=DT), None, None
    means = mpost.reshape(T, s)
    blocks = Ppost.reshape(T, s, T, s)
    covs = torch.stack([blocks[t, :, t] for t in range(T)])
    cross = torch.stack([blocks[t + 1, :, t] for t in range(T - 1)]) if T > 1 else torch.zeros(0, s, s)
    return means, covs, cross, ll, (mean_y, cov_y, yobs if obs else None)


def _element(model, idx):
    """The idx-th batch element of a random_model dict, unbatched (a 2-D H stays shared)."""
    out = {}
    for k, v in model.items():
        shared = k == "H" and v.dim() == 2
        out[k] = v if shared else v.reshape((-1,) + v.shape[v.dim() - _EVENT[k] :])[idx]
    return out


_EVENT = dict(A=3, Q=3, H=3, R=3, y=2, P0=2, m0=1, mask=1)


@pytest.mark.parametrize("T", [1, 2, 7, 64, 100])
@pytest.mark.parametrize("batch", [(), (3, 2)])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("s", [1, 2, 4])
def test_smoother_matches_dense_twin(s, p, batch, T):
    model = random_model(1000 * s + 100 * p + T + len(batch), s, p, batch, T, time_varying_H=(s + T) % 2 == 0)
    res = kalman_smoother(**model)
    filt = kalman_filter(**model)
    assert res.means.shape == batch + (T, s) and res.covs.shape == batch + (T, s, s)
    assert res.cross_covs.shape == batch + (T - 1, s, s) and res.log_likelihood.shape == batch
    flat = lambda x: x.reshape((-1,) + x.shape[len(batch) :])  # noqa: E731  (batch dims -> one)
    for i in range(int(np.prod(batch)) if batch else 1):
        el = _element(model, i)
        means, covs, cross, ll, (mean_y, cov_y, yobs) = dense_posterior(**el)
        assert _relerr(flat(res.means)[i], means) <= 1e-8
        assert _relerr(flat(res.covs)[i], covs) <= 1e-8
        if T > 1:
            assert _relerr(flat(res.cross_covs)[i], cross) <= 1e-8
        # the filtered moment at the last step is the smoothed one
        assert _relerr(flat(filt.means)[i][-1], means[-1]) <= 1e-8
        assert _relerr(flat(filt.covs)[i][-1], covs[-1]) <= 1e-8
        if yobs is None:
            ll_ref = 0.0
            assert flat(res.log_likelihood)[i].item() == 0.0
        else:
            ll_ref = scipy.stats.multivariate_normal.logpdf(yobs.numpy(), mean_y.numpy(), cov_y.numpy())
        got = flat(res.log_likelihood)[i].item()
        assert abs(got - ll_ref) <= 1e-8 * max(1.0, abs(ll_ref))
        assert flat(filt.log_likelihood)[i].item() == pytest.approx(got, rel=1e-12, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# sequential twin: textbook Kalman filter + RTS smoother, Python loop over time
# ------------------------------------------------------------------------------------------------
def sequential_kalman(A, Q, H, R, y, P0, m0, mask):
    T, s = A.shape[-3], A.shape[-1]
    if H.dim() == 2:
        H = H.expand(A.shape[:-3] + (T,) + H.shape)
    I = torch.eye(s, dtype=DT)
    mf, Pf, mps, Pps = [], [], [], []
    ll = torch.zeros(A.shape[:-3], dtype=DT)
    m, P = m0, P0
    for t in range(T):
        if t > 0:
            m = (A[..., t, :, :] @ m[..., None])[..., 0]
            P = A[..., t, :, :] @ P @ A[..., t, :, :].mT + Q[..., t, :, :]
        mps.append(m)
        Pps.append(P)
        Ht, Rt, yt, ob = H[..., t, :, :], R[..., t, :, :], y[..., t, :], mask[..., t]
        S = Ht @ P @ Ht.mT + Rt
        v = torch.where(ob[..., None], yt, 0.0) - (Ht @ m[..., None])[..., 0]
        K = torch.linalg.solve(S, Ht @ P).mT * ob[..., None, None]
        lt = torch.distributions.MultivariateNormal(torch.zeros_like(v), covariance_matrix=S).log_prob(v)
        ll = ll + torch.where(ob, lt, 0.0)
        m = m + (K @ v[..., None])[..., 0]
        P = (I - K @ Ht) @ P @ (I - K @ Ht).mT + K @ Rt @ K.mT
        mf.append(m)
        Pf.append(P)
    ms, Ps, cross = [mf[-1]], [Pf[-1]], []
    for t in range(T - 2, -1, -1):
        G = torch.linalg.solve(Pps[t + 1], A[..., t + 1, :, :] @ Pf[t]).mT
        ms.insert(0, mf[t] + (G @ (ms[0] - mps[t + 1])[..., None])[..., 0])
        cross.insert(0, Ps[0] @ G.mT)
        Ps.insert(0, Pf[t] + G @ (Ps[0] - Pps[t + 1]) @ G.mT)
    st = lambda xs, d: torch.stack(xs, dim=-d)  # noqa: E731
    return st(mf, 2), st(Pf, 3), st(ms, 2), st(Ps, 3), st(cross, 3), ll


def _twin_errors(model):
    """Relative errors of the parallel filter/smoother against the sequential twin, and the smoother."""
    mf, Pf, ms, Ps, cross, ll = sequential_kalman(**model)
    f = kalman_filter(**model)
    r = kalman_smoother(**model)
    errs = dict(mf=_relerr(f.means, mf), Pf=_relerr(f.covs, Pf), ms=_relerr(r.means, ms), Ps=_relerr(r.covs, Ps),
                cross=_relerr(r.cross_covs, cross), ll_filter=_relerr(f.log_likelihood, ll),
                ll_smoother=_relerr(r.log_likelihood, ll))
    return errs, r


def test_matches_sequential_twin_T500():
    errs, r = _twin_errors(random_model(7, s=3, p=2, batch=(4,), T=500))
    assert max(errs.values()) <= 1e-10, errs
    assert torch.isfinite(r.means).all()  # NaN y at missing steps did not leak


def test_gradients_match_dense_twin():
    model = random_model(11, s=2, p=2, batch=(), T=25)
    model["y"] = torch.nan_to_num(model["y"], nan=0.3)  # finite y so d/dy is defined everywhere
    leaves = ("A", "Q", "R", "P0", "y", "m0")
    for k in leaves:
        model[k] = model[k].clone().requires_grad_(True)
    g_scan = torch.autograd.grad(kalman_filter(**model).log_likelihood, [model[k] for k in leaves])
    g_dense = torch.autograd.grad(dense_posterior(**model)[3], [model[k] for k in leaves])
    for k, a, b in zip(leaves, g_scan, g_dense, strict=True):
        assert _relerr(a, b) <= 1e-8, (k, _relerr(a, b))
    assert torch.allclose(g_scan[1], g_scan[1].mT)  # Q symmetrised on entry => symmetric gradient
    assert (g_scan[4][~model["mask"]] == 0).all()  # missing y's have no influence


def test_broadcasting_and_defaults():
    T, s, p = 9, 2, 1
    m = random_model(3, s, p, (), T, time_varying_H=False, missing=0.0)
    full = kalman_smoother(**m)
    # time-invariant A, Q, R given with a size-1 time axis; H as plain (p, s); batch dims from y only
    Ac, Qc, Rc = m["A"][3:4], m["Q"][3:4], m["R"][3:4]
    yb = torch.stack([m["y"], m["y"] + 1.0])
    r = kalman_smoother(Ac, Qc, m["H"], Rc, yb, m["P0"], m["m0"])
    full_T = (Ac.expand(T, s, s), Qc.expand(T, s, s), m["H"].expand(T, p, s), Rc.expand(T, p, p))
    r_ref = kalman_smoother(*full_T, m["y"] + 1.0, m["P0"], m["m0"], mask=torch.ones(T, dtype=torch.bool))
    assert r.means.shape == (2, T, s) and r.log_likelihood.shape == (2,)
    assert _relerr(r.means[1], r_ref.means) <= 1e-12 and _relerr(r.covs[1], r_ref.covs) <= 1e-12
    ll_ref = r_ref.log_likelihood.item()
    assert abs(r.log_likelihood[1].item() - ll_ref) <= 1e-12 * abs(ll_ref)
    # m0=None means zeros
    z = kalman_filter(m["A"], m["Q"], m["H"], m["R"], m["y"], m["P0"])
    z_ref = kalman_filter(m["A"], m["Q"], m["H"], m["R"], m["y"], m["P0"], m0=torch.zeros(s, dtype=DT))
    assert torch.equal(z.means, z_ref.means)
    assert full.log_likelihood.isfinite()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 17, 64, 100])
@pytest.mark.parametrize("reverse", [False, True])
def test_associative_scan_noncommutative(n, reverse):
    """Prefix products of rotations-with-shear (non-commutative, norm-bounded) vs a Python loop."""
    g = torch.Generator().manual_seed(n)
    X = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=DT))[0]
    add = torch.randn(n, 3, generator=g, dtype=DT)
    # affine maps x -> X x + a composed as (later after earlier): associative, not commutative
    comb = lambda e, l: (l[0] @ e[0], (l[0] @ e[1][..., None])[..., 0] + l[1])  # noqa: E731, E741
    out = associative_scan(comb, (X, add), reverse=reverse)
    order = range(n - 1, -1, -1) if reverse else range(n)
    acc, ref = None, {}
    for i in order:
        cur = (X[i], add[i])
        acc = cur if acc is None else (comb(cur, acc) if reverse else comb(acc, cur))
        ref[i] = acc
    assert torch.allclose(out[0], torch.stack([ref[i][0] for i in range(n)]), atol=1e-12)
    assert torch.allclose(out[1], torch.stack([ref[i][1] for i in range(n)]), atol=1e-12)


@pytest.mark.parametrize("T", [129, 257, 517])
def test_odd_scan_levels_match_sequential_twin(T):
    """Lengths that make the odd/even (Blelloch) levels of both scans odd before Hillis-Steele takes over."""
    errs, _ = _twin_errors(random_model(T, s=2, p=1, batch=(2,), T=T))
    assert max(errs.values()) <= 1e-10, errs


@pytest.mark.parametrize("T", [25, 517])
@pytest.mark.parametrize("which", ["loglik", "filter", "smoother"])
def test_gradients_of_every_output_match_sequential_twin(T, which):
    """Gradients of the log-likelihood alone (the one-scan adjoint), of a weighted sum of every filter
    output (the general adjoint) and of every smoother output, for every input, vs autograd through the
    textbook recursion."""
    model = random_model(19 + T, s=2, p=2, batch=(2,), T=T)
    model["y"] = torch.nan_to_num(model["y"], nan=0.3)
    leaves = ("A", "Q", "H", "R", "y", "P0", "m0")
    for k in leaves:
        model[k] = model[k].clone().requires_grad_(True)
    g = torch.Generator().manual_seed(T)
    w = {
        k: torch.randn(shape, generator=g, dtype=DT)
        for k, shape in (("ll", (2,)), ("m", (2, T, 2)), ("P", (2, T, 2, 2)), ("c", (2, T - 1, 2, 2)))
    }
    mf, Pf, ms, Ps, cross, ll = sequential_kalman(**model)
    if which == "loglik":
        ours = kalman_filter(**model).log_likelihood
        loss, ref = (w["ll"] * ours).sum(), (w["ll"] * ll).sum()
    elif which == "filter":
        r = kalman_filter(**model)
        loss = (w["ll"] * r.log_likelihood).sum() + (w["m"] * r.means).sum() + (w["P"] * r.covs).sum()
        ref = (w["ll"] * ll).sum() + (w["m"] * mf).sum() + (w["P"] * Pf).sum()
    else:
        r = kalman_smoother(**model)
        loss = (w["ll"] * r.log_likelihood).sum() + (w["m"] * r.means).sum() + (w["P"] * r.covs).sum()
        loss = loss + (w["c"] * r.cross_covs).sum()
        ref = (w["ll"] * ll).sum() + (w["m"] * ms).sum() + (w["P"] * Ps).sum() + (w["c"] * cross).sum()
    got = torch.autograd.grad(loss, [model[k] for k in leaves])
    want = torch.autograd.grad(ref, [model[k] for k in leaves])
    for k, a, b in zip(leaves, got, want, strict=True):
        if k in ("Q", "R", "P0"):  # symmetrised on entry: the gradient is the symmetric part
            b = 0.5 * (b + b.mT)
        assert _relerr(a, b) <= 1e-8, (k, _relerr(a, b))


def test_broadcast_inputs_get_summed_gradients():
    """Size-1 time axes, missing batch axes and a plain 2-D H: gradients equal those of the expanded
    inputs, summed over the broadcast axes."""
    T, s, p, nb = 40, 2, 1, 3
    m = random_model(5, s, p, (nb,), T, time_varying_H=False, missing=0.2)
    y = torch.nan_to_num(m["y"], nan=0.0)
    small = dict(A=m["A"][0, 3:4], Q=m["Q"][0, 3:4], H=m["H"], R=m["R"][0, :1], P0=m["P0"][0], m0=m["m0"][0])
    small = {k: v.clone().requires_grad_(True) for k, v in small.items()}
    ll = kalman_filter(small["A"], small["Q"], small["H"], small["R"], y, small["P0"], small["m0"], m["mask"])
    g_small = torch.autograd.grad(ll.log_likelihood.sum(), list(small.values()))
    big = dict(
        A=small["A"].detach().expand(nb, T, s, s),
        Q=small["Q"].detach().expand(nb, T, s, s),
        H=small["H"].detach().expand(nb, T, p, s),
        R=small["R"].detach().expand(nb, T, p, p),
        P0=small["P0"].detach().expand(nb, s, s),
        m0=small["m0"].detach().expand(nb, s),
    )
    big = {k: v.clone().requires_grad_(True) for k, v in big.items()}
    ll_big = kalman_filter(big["A"], big["Q"], big["H"], big["R"], y, big["P0"], big["m0"], m["mask"])
    assert _relerr(ll.log_likelihood, ll_big.log_likelihood) <= 1e-13
    g_big = torch.autograd.grad(ll_big.log_likelihood.sum(), list(big.values()))
    for k, a, b in zip(small, g_small, g_big, strict=True):
        b = b.sum((0, 1) if b.dim() == 4 else 0).reshape(a.shape)
        assert _relerr(a, b) <= 1e-12, k


def test_second_derivatives_are_refused():
    m = random_model(2, 2, 1, (), 10, missing=0.0)
    Q = m["Q"].clone().requires_grad_(True)
    ll = kalman_filter(m["A"], Q, m["H"], m["R"], m["y"], m["P0"]).log_likelihood
    (gQ,) = torch.autograd.grad(ll, Q, create_graph=True)
    with pytest.raises(RuntimeError):
        gQ.sum().backward()


def test_float32():
    m = random_model(4, 2, 1, (3,), 300, missing=0.1)
    ref = kalman_filter(**m).log_likelihood
    m32 = {k: v.float() if v.is_floating_point() else v for k, v in m.items()}
    m32["Q"].requires_grad_(True)
    r = kalman_filter(**m32)
    r.log_likelihood.sum().backward()
    assert r.means.dtype == torch.float32 and torch.isfinite(m32["Q"].grad).all()
    assert torch.allclose(r.log_likelihood.double(), ref, rtol=1e-4)
    assert kalman_smoother(**m32).covs.dtype == torch.float32


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 9, 17, 33, 100])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("base", [1, 4, 128])
def test_state_scan_affine_recursion(n, reverse, base):
    """x_t = M_t x_{t-1} + v_t (x_{-1} = 0), or x_t = M_t x_{t+1} + v_t from the end, vs a Python loop;
    elements are packed [M | v] with the states x as prefixes."""
    g = torch.Generator().manual_seed(n)
    d = 3
    E = torch.cat((0.6 * torch.randn(n, d, d, generator=g, dtype=DT), torch.randn(n, d, 1, generator=g, dtype=DT)), 2)

    def compose(outer, inner):  # x -> outer(inner(x))
        return torch.cat((outer[..., :d] @ inner[..., :d], outer[..., :d] @ inner[..., d:] + outer[..., d:]), -1)

    combine = (lambda a, b: compose(a, b)) if reverse else (lambda a, b: compose(b, a))

    def apply(x, e):
        return e[..., :d] @ x + e[..., d:]

    def run(E):
        return state_scan(combine, apply, lambda e: e[..., d:], E, axis=0, reverse=reverse, base=base)

    out = run(E)
    x, ref = torch.zeros(d, 1, dtype=DT), [None] * n
    for t in range(n - 1, -1, -1) if reverse else range(n):
        x = apply(x, E[t])
        ref[t] = x
    assert torch.allclose(out, torch.stack(ref), atol=1e-12)
    if n <= 9:
        assert torch.autograd.gradcheck(run, (E.clone().requires_grad_(True),))


# ------------------------------------------------------------------------------------------------
# speed: Matérn-3/2 (s = 2) at T = 100,000, log-likelihood + backward
# ------------------------------------------------------------------------------------------------
def matern32_ssm(dt, lengthscale, variance):
    """Exact discretisation of the Matérn-3/2 SDE (closed-form expm; Q = P_inf - A P_inf A^T)."""
    lam = math.sqrt(3.0) / lengthscale
    e = torch.exp(-lam * dt)
    row0 = torch.stack((1 + lam * dt, dt), -1)
    row1 = torch.stack((-(lam**2) * dt, 1 - lam * dt), -1)
    A = e[:, None, None] * torch.stack((row0, row1), -2)
    Pinf = torch.diag(torch.stack((variance, variance * lam**2)))
    Q = Pinf - A @ Pinf @ A.mT
    return A, Q, Pinf


def test_speed_matern32_T1e5():
    T = 100_000
    g = torch.Generator().manual_seed(0)
    dt = torch.rand(T, generator=g, dtype=DT) * 0.02 + 0.005
    ell = torch.tensor(0.3, dtype=DT, requires_grad=True)
    var = torch.tensor(1.5, dtype=DT, requires_grad=True)
    noise = torch.tensor(0.1, dtype=DT, requires_grad=True)
    y = torch.randn(T, 1, generator=g, dtype=DT)
    t0 = time.perf_counter()
    A, Q, Pinf = matern32_ssm(dt, ell, var)
    H = torch.tensor([[1.0, 0.0]], dtype=DT)
    ll = kalman_filter(A, Q, H, (noise * torch.eye(1, dtype=DT)).expand(1, 1, 1), y, Pinf).log_likelihood
    ll.backward()
    elapsed = time.perf_counter() - t0
    print(f"\nMatern-3/2 T=1e5 loglik+backward: {elapsed:.2f} s")
    assert torch.isfinite(ll) and all(torch.isfinite(x.grad) for x in (ell, var, noise))
    assert elapsed < 10.0


# ------------------------------------------------------------------------------------------------
# the compiled sequential engine (numba): same moments as the dense twin and the scan
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 2, 50])
@pytest.mark.parametrize("batch", [(), (3, 2)])
@pytest.mark.parametrize("s,p", [(1, 1), (2, 1), (4, 2)])
def test_compiled_engine_matches_dense_twin(s, p, batch, T):
    model = random_model(500 * s + 10 * p + T + len(batch), s, p, batch, T, time_varying_H=T % 2 == 0)
    res = kalman_smoother(**model, engine="compiled")
    scan = kalman_smoother(**model, engine="scan")
    assert res.means.shape == batch + (T, s) and res.cross_covs.shape == batch + (T - 1, s, s)
    assert res.means.dtype == DT
    flat = lambda x: x.reshape((-1,) + x.shape[len(batch) :])  # noqa: E731
    for i in range(int(np.prod(batch)) if batch else 1):
        means, covs, cross, ll, _ = dense_posterior(**_element(model, i))
        assert _relerr(flat(res.means)[i], means) <= 1e-8
        assert _relerr(flat(res.covs)[i], covs) <= 1e-8
        if T > 1:
            assert _relerr(flat(res.cross_covs)[i], cross) <= 1e-8
        assert abs(flat(res.log_likelihood)[i].item() - float(ll)) <= 1e-8 * max(1.0, abs(float(ll)))
    for a, b in zip(res, scan, strict=True):
        assert a.shape == b.shape and (a.numel() == 0 or _relerr(a, b) <= 1e-10)


def test_compiled_engine_broadcasting_and_policy():
    T, s, p = 9, 2, 1
    m = random_model(3, s, p, (), T, time_varying_H=False, missing=0.0)
    Ac, Qc, Rc = m["A"][3:4], m["Q"][3:4], m["R"][3:4]  # size-1 time axes, batch only from y
    yb = torch.stack([m["y"], m["y"] + 1.0])
    r = kalman_smoother(Ac, Qc, m["H"], Rc, yb, m["P0"], m["m0"], engine="compiled")
    r_ref = kalman_smoother(Ac, Qc, m["H"], Rc, yb, m["P0"], m["m0"], engine="scan")
    for a, b in zip(r, r_ref, strict=True):
        assert a.shape == b.shape and _relerr(a, b) <= 1e-10
    with pytest.raises(ValueError, match="engine"):
        kalman_smoother(Ac, Qc, m["H"], Rc, yb, m["P0"], engine="fast")
    with pytest.raises(ValueError, match="gradient"):
        kalman_smoother(Ac.clone().requires_grad_(True), Qc, m["H"], Rc, yb, m["P0"], engine="compiled")
    # "auto" with a gradient takes the scan and stays differentiable
    A_ = Ac.clone().requires_grad_(True)
    kalman_smoother(A_, Qc, m["H"], Rc, yb, m["P0"], engine="auto").means.sum().backward()
    assert A_.grad is not None and torch.isfinite(A_.grad).all()
    # a singular predictive covariance (no process noise, degenerate prior) falls back to the scan's jitter
    Z = torch.zeros(1, s, s, dtype=DT)
    with pytest.warns(Warning, match="jitter"):
        r0 = kalman_smoother(torch.eye(s, dtype=DT)[None], Z, m["H"], Rc, m["y"], Z[0], engine="compiled")
    assert torch.isfinite(r0.means).all() and float(r0.covs.abs().max()) <= 1e-6


def test_compiled_engine_is_fast_for_small_states():
    """The reason it exists: a 6-dimensional state over 200 steps (FunBaT's case) in well under a ms."""
    m = random_model(5, s=6, p=3, batch=(), T=200, missing=0.0)
    kalman_smoother(**m, engine="compiled")  # compile (or load the cache)

    def best(engine, repeats):  # fastest of several calls: robust to a busy machine
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            kalman_smoother(**m, engine=engine)
            times.append(time.perf_counter() - start)
        return min(times)

    compiled, scan = best("compiled", 20), best("scan", 5)
    assert compiled < 0.25 * scan, (compiled, scan)  # measured ~0.1


def test_compiled_engine_is_cached_across_processes():
    """numba's on-disk cache must hit in a new process (a nested closure never did: ~6 s per process)."""
    import subprocess
    import sys

    code = ("import torch\n"
            "from latentgp.linalg.kalman import kalman_smoother\n"
            "from latentgp.linalg import kalman_compiled as kc\n"
            "d = dict(dtype=torch.float64)\n"
            "A = torch.eye(2, **d)[None]\n"
            "kalman_smoother(A, 0.1 * A, torch.ones(1, 2, **d), torch.ones(1, 1, 1, **d), torch.zeros(3, 1, **d),"
            " torch.eye(2, **d), engine='compiled')\n"
            "st = kc._smooth.stats\n"
            "print(sum(st.cache_hits.values()), sum(st.cache_misses.values()))\n")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
            for _ in range(2)]
    hits, misses = map(int, runs[1].stdout.split())
    assert hits == 1 and misses == 0, [r.stdout for r in runs]
