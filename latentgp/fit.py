"""The one training loop every model uses.

``train`` runs any "one step" callable with a tqdm bar, early stopping and a history record;
``optimize`` (torch Adam / L-BFGS on a loss function) and ``run_svi`` (Pyro SVI on a model/guide)
only build that step callable. Seeding is local: :func:`seeded` forks torch's RNG, so fitting with
``seed=`` is reproducible and never changes the caller's global random state.
"""
from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm


@contextlib.contextmanager
def seeded(seed: int | None):
    """Run the block with torch (and numpy) seeded, restoring the global RNG states afterwards."""
    if seed is None:
        yield
        return
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        np.random.seed(int(seed) % 2**32)
        try:
            yield
        finally:
            np.random.set_state(np_state)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch intra-op threads, restoring the previous number afterwards.

    Kalman scans are thousands of tiny ops: extra threads only add synchronisation, and on a small
    loaded machine two threads were measured 10-100x slower than one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def show_progress(progress: bool | None) -> bool:
    """``progress=None`` means: show a bar only in an interactive terminal."""
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


def train(
    step: Callable[[], float],
    *,
    steps: int,
    progress: bool | None = None,
    tol: float | None = None,
    patience: int = 5,
    record: Callable[[], dict] | None = None,
    desc: str = "fit",
) -> pd.DataFrame:
    """Call ``step()`` (one optimisation step returning the loss) up to ``steps`` times.

    Stops early when the relative loss change stays below ``tol`` for ``patience`` consecutive
    steps. Returns the history: one row per step with ``step``, ``loss`` and ``record()``'s values.
    A non-finite loss raises ``FloatingPointError`` (never a silent NaN fit).
    """
    rows = []
    calm = 0
    prev = None
    bar = tqdm(range(int(steps)), desc=desc, disable=not show_progress(progress), leave=False)
    for i in bar:
        loss = float(step())
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"The loss became {loss} at step {i}; lower the learning rate (lr=...) or check the data scale."
            )
        row = {"step": i, "loss": loss}
        if record is not None:
            row.update(record())
        rows.append(row)
        bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        if tol is not None and prev is not None:
            calm = calm + 1 if abs(loss - prev) <= tol * max(abs(prev), 1.0) else 0
            if calm >= patience:
                break
        prev = loss
    bar.close()
    return pd.DataFrame(rows, columns=["step", "loss"] + (list(rows[0])[2:] if rows else []))


def optimize(
    loss_fn: Callable[[], torch.Tensor],
    params: Iterable[torch.nn.Parameter],
    *,
    method: str = "lbfgs",
    steps: int = 100,
    lr: float | None = None,
    max_grad_norm: float | None = None,
    **train_kwargs,
) -> pd.DataFrame:
    """Minimise ``loss_fn()`` over ``params`` with Adam or L-BFGS (strong-Wolfe line search).

    ``max_grad_norm`` (Adam): clip the gradient's total norm, and skip a step whose gradient is not
    finite -- for stochastic objectives with rare exploding minibatches (neural encoders)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("There are no free hyperparameters to optimise; use steps=0 to only condition.")
    if method == "adam":
        opt = torch.optim.Adam(params, lr=0.05 if lr is None else lr)

        def step():
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            if max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                if not torch.isfinite(norm):
                    return loss.item()  # a non-finite gradient: skip this step
            opt.step()
            return loss.item()

    elif method == "lbfgs":
        # max_iter=1: one quasi-Newton iteration per step, so history/early stopping see every iterate;
        # max_eval must then be raised explicitly or the line search gets a single evaluation and stalls.
        opt = torch.optim.LBFGS(params, lr=1.0 if lr is None else lr, max_iter=1, max_eval=25,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            try:
                loss = loss_fn()
            except torch.linalg.LinAlgError:
                loss = None
            if loss is None or not torch.isfinite(loss):
                # A line-search trial point outside the valid region (e.g. a lengthscale underflowing
                # to 0): report +inf so the strong-Wolfe search backtracks instead of crashing.
                for p in params:
                    p.grad = torch.zeros_like(p)
                return torch.tensor(math.inf, dtype=params[0].dtype)
            loss.backward()
            return loss.detach()

        def step():
            return opt.step(closure).item()

    else:
        raise ValueError(f"`method` must be 'adam' or 'lbfgs' for optimisation; got {method!r}.")
    return train(step, steps=steps, **train_kwargs)


def run_svi(model, guide, *args, steps: int = 500, lr: float = 0.01, num_particles: int = 1, elbo=None,
            **train_kwargs):
    """Pyro SVI (Adam) on ``model``/``guide`` through :func:`train`.

    ``elbo``: a Pyro ELBO instance (default ``Trace_ELBO(num_particles)``); e.g. ``TraceMeanField_ELBO`` to use
    KL divergences registered for the guide/model distribution pairs instead of sampled log-density ratios."""
    import pyro

    elbo = pyro.infer.Trace_ELBO(num_particles) if elbo is None else elbo
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": lr}), elbo)
    return train(lambda: svi.step(*args), steps=steps, **train_kwargs)
