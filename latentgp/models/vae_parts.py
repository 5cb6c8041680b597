"""Pieces shared by the GP-VAE models: default networks, observation log-densities, input checks."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..data import _as_float_array
from ..likelihoods import get_likelihood


class SiteEncoder(nn.Module):
    """Default encoder: sequences (B, T, D) -> Gaussian sites (mean, precision), each (B, T, L).

    A 1-D convolution over ``2 context + 1`` neighbouring steps, a tanh layer, then per-step outputs;
    the GP prior does the long-range smoothing, so the encoder only needs local context. Precisions
    are softplus(·) + 1e-6, so a site can say "no information" but never has a zero variance."""

    def __init__(self, n_inputs: int, n_latents: int, hidden: int = 64, context: int = 2):
        super().__init__()
        self.n_latents = n_latents
        self.net = nn.Sequential(nn.Conv1d(n_inputs, hidden, 2 * context + 1, padding=context), nn.Tanh(),
                                 nn.Conv1d(hidden, hidden, 1), nn.Tanh(), nn.Conv1d(hidden, 2 * n_latents, 1))

    def forward(self, y: torch.Tensor):
        out = self.net(y.transpose(-1, -2)).transpose(-1, -2)
        mean, raw = out.split(self.n_latents, -1)
        return mean, nn.functional.softplus(raw) + 1e-6


def mlp_decoder(n_latents: int, n_outputs: int, hidden: int = 64) -> nn.Module:
    """Default decoder: per-step MLP, latents (..., T, L) -> natural parameters (..., T, D)."""
    return nn.Sequential(nn.Linear(n_latents, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, n_outputs))


def gaussian_noise_params(y: torch.Tensor | None, n_features: int, min_noise: float, dtype):
    """Learnable log-variance (init: half the data variance) and a fixed floor ``min_noise`` x data variance.

    The floor matters: for noiseless data (e.g. rendered images) the Gaussian likelihood is unbounded as
    the variance -> 0, and an unfloored fit ends in infinite gradients."""
    var = y.reshape(-1, n_features).var(0) if y is not None else torch.ones(n_features, dtype=dtype)
    var = var.clamp_min(1e-2 * float(var.mean()) + 1e-12)  # constant features borrow the pooled scale
    return nn.Parameter(torch.log(0.5 * var + 1e-12)), min_noise * var + 1e-12


def gaussian_log_density(y, eta, log_noise, floor):
    noise = floor + torch.exp(log_noise)
    return -0.5 * ((y - eta) ** 2 / noise + torch.log(noise) + math.log(2 * math.pi))


def observation_log_density(likelihood, y: torch.Tensor, eta: torch.Tensor, log_noise=None, floor=None):
    """log p(y | η) elementwise; Gaussian uses the learnable variance floor + exp(log_noise) (broadcast over
    features), Poisson/Bernoulli the library likelihoods at a point η (variance 0)."""
    if likelihood.name == "gaussian":
        return gaussian_log_density(y, eta, log_noise, floor)
    return likelihood.expected(y, eta, torch.zeros_like(eta))[0]


def mean_function(likelihood, eta: torch.Tensor) -> torch.Tensor:
    """E[y | η]: identity, rate exp(η)·bin_width, or sigmoid(η)."""
    if likelihood.name == "poisson":
        return torch.exp(eta) * likelihood.bin_width
    if likelihood.name == "bernoulli":
        return torch.sigmoid(eta)
    return eta


def check_sequences(Y, name: str = "Y", likelihood=None, n_features: int | None = None) -> np.ndarray:
    """(sequences, time, features) float array; 2-D means one sequence. NaN, wrong rank, too few
    steps, a feature count that does not match a fitted model, or values outside the likelihood's
    support raise ValueError/TypeError naming ``name``. Ragged sequences must be padded by the user
    (they are not supported: a clear error)."""
    if isinstance(Y, (list, tuple)) and len(Y) and hasattr(Y[0], "__len__"):
        lengths = {len(y) for y in Y}
        if len(lengths) > 1:
            raise ValueError(f"`{name}`: sequences have different lengths {sorted(lengths)}; pad or crop them "
                             "to a common length (variable-length sequences are not supported).")
    arr = _as_float_array(Y, name)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"`{name}` must be 3-D (sequences, time, features) or 2-D (time, features); got shape "
                         f"{arr.shape}.")
    if arr.shape[1] < 2:
        raise ValueError(f"`{name}` needs at least 2 time steps per sequence; got {arr.shape[1]}.")
    if n_features is not None and arr.shape[2] != n_features:
        raise ValueError(f"`{name}` has {arr.shape[2]} features but the model was fitted with {n_features}.")
    if likelihood is not None:
        likelihood.check(arr, name)
    return arr


def check_times(times, T: int, dtype) -> torch.Tensor:
    """Strictly increasing time points (T,) shared by all sequences; None -> 0, 1, ..., T-1."""
    if times is None:
        return torch.arange(T, dtype=dtype)
    t = _as_float_array(times, "times")
    if t.ndim != 1 or len(t) != T:
        raise ValueError(f"`times` must be 1-D with one entry per time step ({T}); got shape {t.shape}.")
    if not (np.diff(t) > 0).all():
        raise ValueError("`times` must be strictly increasing.")
    return torch.as_tensor(t, dtype=dtype)


def resolve_likelihood(likelihood, bin_width: float = 1.0):
    lik = get_likelihood(likelihood, bin_width)
    if lik.name not in ("gaussian", "poisson", "bernoulli"):
        raise ValueError(f"`likelihood` must be 'gaussian', 'poisson' or 'bernoulli'; got {lik.name!r}.")
    return lik


def minibatches(n: int, batch_size: int | None, generator=None):
    """Endless stream of index tensors: shuffled epochs cut into batches of ``batch_size``."""
    size = n if batch_size is None else min(int(batch_size), n)
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - size + 1, size):
            yield order[i:i + size]


def load_with_networks(cls, path, **networks):
    """Load a saved model of class ``cls``, handing user-built networks (whose weights the file holds)
    to ``cls._from_payload``; the file is read with weights_only=True (no pickled code)."""
    import pandas as pd

    from ..io import FORMAT, kernel_from_spec

    payload = torch.load(path, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("class") != cls.__name__:
        raise ValueError(f"`path`: {path} is not a saved {cls.__name__}.")
    model = cls._from_payload(payload, kernel_from_spec(payload["kernel"]), **networks)
    model.history = None if payload["history"] is None else pd.DataFrame(payload["history"])
    return model


def require_networks(config: dict, networks: dict, cls_name: str):
    """A model fitted with user-supplied networks can only be rebuilt if the caller passes them again."""
    for name, net in networks.items():
        if config.get(f"custom_{name}") and net is None:
            raise ValueError(f"This model was fitted with a user-supplied {name}; rebuild that module and load "
                             f"with {cls_name}.load(path, {name}=...).")
