"""Sparse inverse-Cholesky linear algebra against dense and brute-force references."""
import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

import latentgp.linalg.sic as sic_module
from latentgp.linalg.sic import (
    SparseInverseCholesky,
    ancestor_closure,
    check_points,
    maximin_ordering,
    maximin_ordering_bruteforce,
    pattern_mask,
    sic_pattern,
    upper_solve,
)


def _matern32(X, ls=0.3, nugget=1e-6):
    X = torch.as_tensor(X)
    r = torch.cdist(X / ls, X / ls) * np.sqrt(3.0)
    return (1 + r) * torch.exp(-r) + nugget * torch.eye(len(X), dtype=X.dtype)


def _brute_pattern(X, rho, scales, m):
    rows = []
    for i in range(len(X)):
        d = np.sqrt(((X[:i] - X[i]) ** 2).sum(1))
        ok = np.flatnonzero(d <= rho * scales[i])
        rows.append(ok[np.argsort(d[ok])][: (m if m else len(ok))].tolist())
    return rows


@pytest.mark.parametrize("d, ard", [(2, None), (3, [0.5, 1.0, 2.0])])
def test_ordering_matches_bruteforce(rng, d, ard):
    X = rng.uniform(size=(400, d))
    o, s = maximin_ordering(X, ard=ard)
    o2, s2 = maximin_ordering_bruteforce(X, ard=ard)
    np.testing.assert_array_equal(o, o2)
    np.testing.assert_allclose(s, s2, rtol=0, atol=0)
    assert np.isinf(s[0]) and np.all(np.diff(s[1:]) <= 0)  # maximin scales never increase
    # the scale is the distance to the nearest earlier point
    Z = X[o] / (1 if ard is None else np.asarray(ard))
    k = 123
    assert s[k] == pytest.approx(np.sqrt(((Z[:k] - Z[k]) ** 2).sum(1)).min(), rel=1e-12)


@pytest.mark.parametrize("rho, m", [(1.5, 7), (3.0, None), (2.0, 1)])
def test_pattern_matches_bruteforce(rng, rho, m):
    X = rng.uniform(size=(300, 2))
    o, s = maximin_ordering(X)
    P = sic_pattern(X[o], rho, s, m)
    mask = pattern_mask(P).numpy()
    assert (P[:, 0] == np.arange(300)).all()
    for i, ref in enumerate(_brute_pattern(X[o], rho, s, m)):
        assert P[i, 1:][mask[i, 1:]].tolist() == ref


def test_full_pattern_gives_exact_inverse(rng):
    X = rng.uniform(size=(60, 2))
    o, s = maximin_ordering(X)
    P = sic_pattern(X[o], 1e9, s, None)
    K = _matern32(X[o])
    U = SparseInverseCholesky.from_covariance(K, P)
    Ud = U.to_dense()
    assert torch.equal(Ud, torch.triu(Ud))
    Kinv = torch.linalg.inv(K)
    rel = (Ud @ Ud.T - Kinv).abs().max() / Kinv.abs().max()
    assert rel < 1e-8


def _kl_to_prior(K, U):
    n = K.shape[0]
    return 0.5 * (torch.trace(U.T @ K @ U) - n - 2 * torch.log(torch.diagonal(U)).sum() - torch.logdet(K))


def test_trace_identity_and_kl_monotone_in_rho(rng):
    X = rng.uniform(size=(250, 2))
    o, s = maximin_ordering(X)
    K = _matern32(X[o], ls=0.1, nugget=1e-8)
    kls = []
    for rho in (1.0, 1.5, 2.0, 3.0, 4.0):
        U = SparseInverseCholesky.from_covariance(K, sic_pattern(X[o], rho, s, None))
        Ud = U.to_dense()
        assert torch.trace(Ud.T @ K @ Ud).item() == pytest.approx(250, rel=1e-9)
        kls.append(_kl_to_prior(K, Ud).item())
    assert all(a > b for a, b in zip(kls, kls[1:], strict=False)), kls
    assert kls[-1] < 0.2 * kls[0]


def test_operator_ops_match_dense(rng):
    X = rng.uniform(size=(80, 2))
    o, s = maximin_ordering(X)
    K = _matern32(X[o])
    U = SparseInverseCholesky.from_covariance(K, sic_pattern(X[o], 2.0, s, 5))
    Ud = U.to_dense()
    B = torch.as_tensor(rng.normal(size=(80, 3)))
    torch.testing.assert_close(U @ B, Ud @ B, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(U.mT @ B, Ud.T @ B, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(U.solve(B), torch.linalg.solve_triangular(Ud, B, upper=True), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(U.mT.solve(B), torch.linalg.solve_triangular(Ud.T, B, upper=False),
                               rtol=1e-9, atol=1e-9)
    # the transposed solve (used to draw q's centred field) is differentiable in U and b
    vals = U.values.detach().clone().requires_grad_(True)
    mask = pattern_mask(U.pattern)
    assert torch.autograd.gradcheck(lambda v, b: SparseInverseCholesky(v * mask, U.pattern).mT.solve(b),
                                    (vals, B[:, :2].clone().requires_grad_(True)))
    assert U.logdet().item() == pytest.approx(torch.logdet(Ud).item(), rel=1e-10)
    torch.testing.assert_close(U.diagonal(), torch.diagonal(Ud))
    torch.testing.assert_close(U.inverse_covariance_matmul(B), Ud @ Ud.T @ B)


@pytest.mark.parametrize("mkl", [True, False])
def test_solve_gradient_and_restricted_solve(rng, monkeypatch, mkl):
    """Both solver back ends (MKL through torch CSR, SciPy's SuperLU) against dense solves and gradcheck."""
    if mkl and not (torch.backends.mkl.is_available() and hasattr(torch, "triangular_solve")):
        pytest.skip("torch built without MKL or without triangular_solve")
    monkeypatch.setattr(sic_module, "USE_MKL", mkl)
    X = rng.uniform(size=(40, 2))
    o, s = maximin_ordering(X)
    P = torch.as_tensor(sic_pattern(X[o], 2.0, s, 4))
    U = SparseInverseCholesky.from_covariance(_matern32(X[o]), P)
    vals = U.values.detach().clone().requires_grad_(True)
    rhs = torch.tensor(rng.normal(size=(40, 2)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, b: upper_solve(v * pattern_mask(P), P, b), (vals, rhs))
    Ud = U.to_dense().detach()
    torch.testing.assert_close(U.solve(rhs.detach()), torch.linalg.solve_triangular(Ud, rhs.detach(), upper=True),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(U.mT.solve(rhs.detach()), torch.linalg.solve_triangular(Ud.T, rhs.detach(), upper=False),
                               rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda v, b: SparseInverseCholesky(v * pattern_mask(P), P).mT.solve(b), (vals, rhs))
    # solving on the ancestor closure of a batch gives the same rows as the full solve
    batch = np.array([39, 25, 31])
    A = ancestor_closure(P.numpy(), batch)
    loc = -np.ones(40, dtype=np.int64)
    loc[A] = np.arange(len(A))
    b = torch.zeros(40, 3, dtype=torch.float64)
    b[batch, [0, 1, 2]] = 1.0
    full = U.solve(b)
    sub = upper_solve(U.values[A], torch.as_tensor(loc[P.numpy()[A]]), b[A])
    torch.testing.assert_close(sub, full[A], rtol=1e-12, atol=1e-12)
    assert full[np.setdiff1d(np.arange(40), A)].abs().max() == 0
    if mkl and not sic_module.USE_MKL:  # the MKL call raised and the solver fell back: SciPy was tested twice
        pytest.skip("this torch build's MKL sparse triangular solve raised; only the SciPy path ran")
    assert sic_module.USE_MKL is mkl


def test_bad_input(rng):
    X = rng.uniform(size=(20, 2))
    o, s = maximin_ordering(X)
    with pytest.raises(ValueError, match="rho"):
        sic_pattern(X, 0.0, s, 3)
    with pytest.raises(ValueError, match="rho"):
        sic_pattern(X, -1.0, s, 3)
    with pytest.raises(ValueError, match="max_neighbors"):
        sic_pattern(X, 2.0, s, 0)
    X[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        maximin_ordering(X)
    Y = rng.uniform(size=(10, 2))
    Y[4] = Y[7]
    with pytest.raises(ValueError, match="duplicated"):
        check_points(Y, "X")


@pytest.mark.slow
def test_ordering_scales_to_1e5(rng):
    import time

    X = rng.uniform(size=(100_000, 2))
    t0 = time.perf_counter()
    maximin_ordering(X)
    assert time.perf_counter() - t0 < 30


def test_reference_pattern_is_trimmed_to_the_found_neighbours(rng):
    """Without a cap, prediction patterns must not be padded to the whole training set (memory)."""
    ref = rng.uniform(size=(500, 2))
    q = rng.uniform(size=(40, 2))
    d, _ = cKDTree(ref).query(q)
    nb = sic_pattern(q, 2.0, d, None, reference=ref)
    found = (nb >= 0).sum(1)
    assert nb.shape[1] == found.max() < 50
    # every listed neighbour lies within the radius, and none within it is missing
    dist = np.sqrt(((q[:, None] - ref[None]) ** 2).sum(-1))
    np.testing.assert_array_equal(found, (dist <= 2.0 * d[:, None]).sum(1))


def test_sparse_solve_falls_back_to_scipy_when_torch_cannot(rng, monkeypatch):
    """A torch build whose sparse triangular solve raises (e.g. Windows wheels: MKL present, sparse solve
    not compiled) switches to SciPy for good, with the same answer."""
    X = rng.uniform(size=(30, 2))
    o, s = maximin_ordering(X)
    P = torch.as_tensor(sic_pattern(X[o], 2.0, s, 4))
    U = SparseInverseCholesky.from_covariance(_matern32(X[o]), P)
    rhs = torch.tensor(rng.normal(size=(30, 3)))

    def broken(*args, **kwargs):
        raise RuntimeError("Calling triangular_solve on a sparse CPU tensor requires Linux platform")

    monkeypatch.setattr(sic_module, "USE_MKL", True)
    monkeypatch.setattr(torch, "triangular_solve", broken, raising=False)
    got = sic_module.upper_solve(U.values, P, rhs)
    assert sic_module.USE_MKL is False
    monkeypatch.setattr(sic_module, "USE_MKL", False)
    torch.testing.assert_close(got, sic_module.upper_solve(U.values, P, rhs), rtol=0, atol=0)
    Ud = U.to_dense()
    torch.testing.assert_close(got, torch.linalg.solve_triangular(Ud, rhs, upper=True), rtol=1e-10, atol=1e-10)
