"""The exact-GP objective's closed-form gradient against autograd through a plain Cholesky."""
import math

import numpy as np
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
