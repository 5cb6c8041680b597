"""Connection Laplacian and its spectral kernel against closed forms and dense references.

References: the spectrum of the rough Laplacian on tangent fields of the unit sphere (l(l+1) - 1,
multiplicity 2(2l+1)) and of the Laplace-Beltrami operator (l(l+1), multiplicity 2l+1); a
loop-over-edges dense assembly of the Laplacian; numpy's dense eigh.
"""
import warnings

import numpy as np
import pytest
import torch

from latentgp.kernels.connection_laplacian import ConnectionLaplacianKernel, tangent_indices
from latentgp.linalg.connection_laplacian import DisconnectedGraphWarning, connection_laplacian


def fibonacci_sphere(n):
    i = np.arange(n) + 0.5
    phi, theta = np.arccos(1 - 2 * i / n), np.pi * (1 + 5**0.5) * i
    return np.c_[np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)]


@pytest.fixture(scope="module")
def sphere():
    return connection_laplacian(fibonacci_sphere(676), n_neighbors=10, num_eigenpairs=30)


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((150, 3))
    return connection_laplacian(X / np.linalg.norm(X, axis=1, keepdims=True), 8, num_eigenpairs=20)


def test_sphere_connection_spectrum_groups_6_10_14(sphere):
    ev = sphere.eigenvalues / sphere.eigenvalues[:6].mean()
    # continuum: 1, 5, 11 (ratios of l(l+1) - 1); the paper reports 1, 5, 10.7 for 676 points
    assert np.all(np.abs(ev[:6] - 1) < 0.05)
    assert np.all(np.abs(ev[6:16] - 5) < 0.3)
    assert np.all(np.abs(ev[16:30] - 10.8) < 0.4)
    assert ev[6] / ev[5] > 4 and ev[16] / ev[15] > 2  # clear gaps between the groups


def test_sphere_graph_laplacian_spectrum(sphere):
    vals, vecs = sphere.eigenpairs(16, field="scalar")
    assert abs(vals[0]) < 1e-8 and np.allclose(np.abs(vecs[:, 0]), 1 / np.sqrt(676), atol=1e-6)
    ev = vals[1:] / vals[1:4].mean()  # l(l+1) = 2, 6, 12 with multiplicity 3, 5, 7 -> 1, 3, 6
    assert np.all(np.abs(ev[:3] - 1) < 0.03) and np.all(np.abs(ev[3:8] - 3) < 0.15)
    assert np.all(np.abs(ev[8:15] - 6) < 0.35)


def test_frames_orthonormal_and_tangent(sphere):
    T = sphere.frames
    assert sphere.dim == 2 and T.shape == (676, 3, 2)
    np.testing.assert_allclose(np.einsum("nDa,nDb->nab", T, T), np.broadcast_to(np.eye(2), (676, 2, 2)), atol=1e-12)
    # the true normal of the unit sphere at x is x itself
    assert np.abs(np.einsum("nDd,nD->nd", T, sphere.points)).max() < 5e-3


def test_quadratic_frames_beat_plain_pca():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((700, 3))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    tilt = {fit: np.abs(np.einsum("nDd,nD->nd", connection_laplacian(X, 10, num_eigenpairs=None, frame_fit=fit)
                                  .frames, X)).mean() for fit in ("pca", "quadratic")}
    assert tilt["quadratic"] < 0.05 * tilt["pca"]


def test_alignments_orthogonal_and_close_to_frame_products(sphere):
    O, (i, j) = sphere.alignments, sphere.edges.T
    np.testing.assert_allclose(np.einsum("eab,eac->ebc", O, O), np.broadcast_to(np.eye(2), O.shape), atol=1e-12)
    M = np.einsum("eDa,eDb->eab", sphere.frames[i], sphere.frames[j])
    assert np.abs(O - M).max() < 0.05  # neighbouring tangent planes are nearly parallel


def test_sparse_assembly_matches_dense_loop(small):
    n, d = small.n, small.dim
    Ld = np.zeros((n * d, n * d))
    for (i, j), w, O in zip(small.edges, small.weights, small.alignments, strict=True):  # reference: plain loop
        Ld[i * d:(i + 1) * d, j * d:(j + 1) * d] -= w * O
        Ld[j * d:(j + 1) * d, i * d:(i + 1) * d] -= w * O.T
        for a in (i, j):
            Ld[a * d:(a + 1) * d, a * d:(a + 1) * d] += w * np.eye(d)
    np.testing.assert_allclose(small.laplacian.toarray(), Ld, atol=1e-14)
    G = np.zeros((n, n))
    G[small.edges[:, 0], small.edges[:, 1]] = G[small.edges[:, 1], small.edges[:, 0]] = -small.weights
    G[np.diag_indices(n)] = -G.sum(1)
    np.testing.assert_allclose(small.graph_laplacian.toarray(), G, atol=1e-14)


def test_eigsh_matches_dense_eigh(small):
    for field, L in (("vector", small.laplacian), ("scalar", small.graph_laplacian)):
        vals, vecs = small.eigenpairs(20, field)
        ref = np.linalg.eigvalsh(L.toarray())[:20]
        np.testing.assert_allclose(vals, np.clip(ref, 0, None), atol=1e-9)
        np.testing.assert_allclose(L @ vecs, vecs * vals, atol=1e-8)


def test_dimension_estimate():
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 2 * np.pi, 300)
    circle = np.c_[np.cos(t), np.sin(t), 0.01 * rng.standard_normal(300)]
    plane = np.c_[rng.uniform(size=(400, 2)), np.zeros((400, 3))] @ np.linalg.qr(rng.standard_normal((5, 5)))[0]
    assert connection_laplacian(circle, 10, num_eigenpairs=None).dim == 1
    assert connection_laplacian(plane, 10, num_eigenpairs=None).dim == 2


def test_kernel_is_low_rank_psd_and_matches_spectral_formula(small):
    vals, vecs = small.eigenpairs(20)
    for nu in (None, 1.5):
        k = ConnectionLaplacianKernel(small, 20, nu=nu, lengthscale=3.0, variance=0.7)
        x = tangent_indices(np.arange(small.n), small.dim)
        K = k(x).to_dense().detach().numpy()
        s = np.exp(-0.5 * 9.0 * vals) if nu is None else (2 * nu / 9.0 + vals) ** -(nu + 1.0)
        S = 0.7 * len(x) * s / s.sum()
        np.testing.assert_allclose(K, (vecs * S) @ vecs.T, atol=1e-12)
        assert np.linalg.eigvalsh(K).min() > -1e-10
        np.testing.assert_allclose(np.diag(K).mean(), 0.7, rtol=1e-12)
        cross = k(x[:7], x[5:30]).to_dense().detach().numpy()
        np.testing.assert_allclose(cross, K[:7, 5:30], atol=1e-12)
        np.testing.assert_allclose(k(x[:9], diag=True).detach().numpy(), np.diag(K)[:9], atol=1e-12)


def test_kernel_gradients_flow(small):
    k = ConnectionLaplacianKernel(small, 20, nu=2.5)
    x = tangent_indices(np.arange(10), small.dim)
    k(x).to_dense().sum().backward()
    assert k.raw_lengthscale.grad is not None and torch.isfinite(k.raw_lengthscale.grad).all()


def test_bad_input():
    X = fibonacci_sphere(60)
    with pytest.raises(ValueError, match="points"):
        connection_laplacian(np.where(np.arange(180).reshape(60, 3) == 7, np.nan, X), 5)
    with pytest.raises(ValueError, match="n_neighbors"):
        connection_laplacian(X, 60)
    with pytest.raises(ValueError, match="points"):
        connection_laplacian(X[:, :1], 5)
    with pytest.raises(ValueError, match="dim"):
        connection_laplacian(X, 5, dim=4)
    two = np.r_[X, X + 10.0]
    with pytest.raises(ValueError, match="connected components"):
        connection_laplacian(two, 5, num_eigenpairs=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        connection_laplacian(two, 5, num_eigenpairs=None, on_disconnected="warn")
    assert any(issubclass(w.category, DisconnectedGraphWarning) for w in caught)
    with pytest.raises(ValueError, match="num_eigenpairs"):
        connection_laplacian(X, 5, num_eigenpairs=120)
    with pytest.raises(TypeError, match="dim"):
        ConnectionLaplacianKernel(eigenpairs=(np.ones(3), np.eye(5)[:, :3]))
