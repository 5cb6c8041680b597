"""The exact-GP objective's closed-form gradient against autograd through a plain Cholesky."""
import math

import numpy as np
import pytest
import torch

from latentgp.objectives import gaussian_log_marginal


def reference(K, r):
    L = torch.linalg.cholesky(K)
    alpha = torch.cholesky_solve(r.unsqueeze(-1), L).squeeze(-1)
    return -0.5 * (r * alpha).sum() - L.diagonal().log().sum() - 0.5 * len(r) * math.log(2 * math.pi)


def test_value_and_gradients_match_autograd_reference():
    rng = np.random.default_rng(0)
    A = torch.tensor(rng.standard_normal((30, 30)), dtype=torch.float64)
    K0 = A @ A.T + 30 * torch.eye(30, dtype=torch.float64)
    r0 = torch.tensor(rng.standard_normal(30), dtype=torch.float64)
    grads = []
    for fn in (lambda K, r: gaussian_log_marginal(K, r)[0], reference):
        K, r = K0.clone().requires_grad_(), r0.clone().requires_grad_()
        value = fn(K, r)
        value.backward()
        grads.append((value.item(), K.grad + K.grad.mT, r.grad))  # symmetric part: K is symmetric
    assert abs(grads[0][0] - grads[1][0]) < 1e-12 * abs(grads[1][0])
    np.testing.assert_allclose(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grads[0][2], grads[1][2], rtol=1e-10, atol=1e-14)


def test_gradcheck_through_a_symmetric_parametrisation():
    rng = np.random.default_rng(1)
    B = torch.tensor(rng.standard_normal((6, 6)), dtype=torch.float64, requires_grad=True)
    r = torch.tensor(rng.standard_normal(6), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda B, r: gaussian_log_marginal(B @ B.T + 6 * torch.eye(6, dtype=torch.float64), r)[0], (B, r))


def test_data_emphasized_objective_is_the_optimum_over_q_of_the_weighted_elbo():
    """max_q κ E_q[log N(y; f, sI)] − KL(q ‖ N(0, K)), evaluated at the optimal q (posterior at noise s/κ)
    by dense algebra, equals data_emphasized_log_marginal."""
    import numpy as np
    import torch

    from latentgp.objectives_weighted import data_emphasized_log_marginal

    rng = np.random.default_rng(0)
    n, s = 12, 0.3
    x = rng.uniform(0, 1, n)
    K = np.exp(-np.abs(x[:, None] - x[None]) / 0.3)  # Matérn-1/2: well conditioned, so inv(K) is accurate
    y = rng.standard_normal(n)
    for kappa in (1.0, 2.5, 10.0):
        Sigma = np.linalg.inv(np.linalg.inv(K) + kappa / s * np.eye(n))
        mu = Sigma @ (kappa / s * y)
        exp_loglik = -0.5 * n * np.log(2 * np.pi * s) - 0.5 * (np.sum((y - mu) ** 2) + np.trace(Sigma)) / s
        Kinv = np.linalg.inv(K)
        kl = 0.5 * (np.trace(Kinv @ Sigma) + mu @ Kinv @ mu - n + np.linalg.slogdet(K)[1]
                    - np.linalg.slogdet(Sigma)[1])
        noise = torch.tensor(s, dtype=torch.float64)
        value = data_emphasized_log_marginal(torch.tensor(K), torch.tensor(y), noise, kappa)[0]
        assert float(value) == pytest.approx(kappa * exp_loglik - kl, rel=1e-8)


def test_gpregressor_data_weight_checks_and_effect():
    import numpy as np

    import latentgp as lgp

    rng = np.random.default_rng(1)
    X = rng.uniform(0, 1, (40, 1))
    y = np.sin(6 * X[:, 0]) + 0.1 * rng.standard_normal(40)
    with pytest.raises(ValueError, match="unbounded"):
        lgp.GPRegressor().fit(X, y, data_weight=5.0)
    with pytest.raises(ValueError, match="data_weight"):
        lgp.GPRegressor(noise=0.01).fit(X, y, method="svi", data_weight=2.0)
    with pytest.raises(ValueError, match="not available"):
        lgp.StateSpaceGP(noise=0.01).fit(X, y, data_weight=2.0)
    plain = lgp.GPRegressor(noise=0.01).fit(X, y, steps=50, progress=False)
    same = lgp.GPRegressor(noise=0.01).fit(X, y, steps=50, progress=False, data_weight=1.0)
    assert plain.log_marginal_likelihood() == pytest.approx(same.log_marginal_likelihood(), rel=1e-10)
    emph = lgp.GPRegressor(noise=0.01).fit(X, y, steps=50, progress=False, data_weight=20.0)
    ls = lambda m: float(m.prior.kernel.base_kernel.lengthscale.detach())  # noqa: E731
    assert ls(emph) < ls(plain)  # more weight on the data: a less smooth fit
