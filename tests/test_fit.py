"""The shared training loop: a step whose gradient is not finite is skipped when clipping is on."""
import pytest
import torch

from latentgp.fit import optimize


def _run(max_grad_norm):
    x = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    calls = []

    def loss():
        calls.append(1)
        value = (x * x).sum()
        if len(calls) == 2:  # one bad minibatch: finite loss, NaN gradient (sqrt'(0) x 0)
            value = value + torch.sqrt((x[0] - x[0].detach()).abs())
        return value

    optimize(loss, [x], method="adam", steps=3, lr=0.1, max_grad_norm=max_grad_norm)
    return x.detach()


def test_non_finite_gradient_step_is_skipped_with_clipping():
    with pytest.raises(FloatingPointError):  # without the guard the NaN reaches the parameters, then the loss
        _run(None)
    x = _run(1.0)
    assert torch.isfinite(x).all()
    assert (x < torch.tensor([3.0, 4.0], dtype=torch.float64)).all()  # the other two steps still descended
