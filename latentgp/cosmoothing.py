"""Held-out-neuron co-smoothing (Neural Latents Benchmark style; Pei et al. 2021).

On held-out trials a model sees only the *held-in* neurons, infers the latents from them, and predicts the
firing rates of the *held-out* neurons, which are scored by their Poisson log-likelihood:

    LL = Σ_{trials, bins, held-out n} [y log(r Δ) - r Δ - log y!]      (r: predicted rate per unit time)
    bits/spike = (LL - LL_null) / (n_spikes · ln 2)

with the null model predicting each held-out neuron's mean count per bin over the scored data (NLB's
convention). ``nats_per_bin`` is LL / (trials · bins · held-out neurons).

Models: :class:`~latentgp.models.mmgpvae.MultimodalGPVAE` (``heldout_rates``: non-amortised inference of q
from the held-in neurons) and :class:`~latentgp.models.gpfa.GPFA` (``heldout_rates``: the exact
GPFA posterior from the held-in rows of C, d, R).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .data import _as_float_array


def check_neuron_split(held_in, n_neurons: int) -> np.ndarray:
    """Distinct neuron indices in [0, n_neurons), at least one held in and one held out, in the caller's
    order (the held-in counts' columns follow it)."""
    idx = np.asarray(held_in)
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"`held_in` must be a non-empty 1-D sequence of neuron indices; got {held_in!r}.")
    if len(np.unique(idx)) != len(idx) or idx.min() < 0 or idx.max() >= n_neurons:
        raise ValueError(f"`held_in` must be distinct indices in [0, {n_neurons}); got {idx.tolist()}.")
    if len(idx) == n_neurons:
        raise ValueError("`held_in` holds in every neuron; leave at least one out to score.")
    return idx


def poisson_log_likelihood(counts, rates, bin_width: float = 1.0) -> float:
    """Σ log Poisson(counts; rates · bin_width) over all entries (nats, full constant)."""
    y = torch.as_tensor(_as_float_array(counts, "counts"), dtype=torch.float64)
    mu = torch.as_tensor(_as_float_array(rates, "rates"), dtype=torch.float64) * bin_width
    if y.shape != mu.shape:
        raise ValueError(f"`rates` has shape {tuple(mu.shape)}; `counts` has {tuple(y.shape)}.")
    if (mu <= 0).any():
        raise ValueError("`rates` must be positive (a zero rate gives -inf log-likelihood where spikes occur).")
    return float((torch.special.xlogy(y, mu) - mu - torch.lgamma(y + 1)).sum())


def co_smoothing_score(counts_out, rates_out, bin_width: float = 1.0) -> dict:
    """Scores of predicted rates (per unit time) of held-out neurons against their counts (trials, bins, n_out):
    ``ll`` (nats), ``ll_null``, ``nats_per_bin`` and ``bits_per_spike`` (> 0: better than each neuron's mean)."""
    y = _as_float_array(counts_out, "counts_out")
    if y.ndim != 3:
        raise ValueError(f"`counts_out` must be (trials, bins, neurons); got shape {y.shape}.")
    null = np.broadcast_to(y.mean((0, 1)).clip(1e-12) / bin_width, y.shape)
    ll = poisson_log_likelihood(y, rates_out, bin_width)
    ll_null = poisson_log_likelihood(y, null, bin_width)
    n_spikes = float(y.sum())
    return {"ll": ll, "ll_null": ll_null, "nats_per_bin": ll / y.size,
            "bits_per_spike": (ll - ll_null) / (n_spikes * math.log(2)) if n_spikes > 0 else float("nan")}


def co_smoothing(model, counts, held_in, **inference) -> dict:
    """Co-smoothing scores of ``model`` on trials ``counts`` (trials, bins, all neurons): latents inferred from the
    ``held_in`` neurons only, the other neurons' predicted rates scored (:func:`co_smoothing_score`). Extra
    keyword arguments go to the model's held-out inference (e.g. ``steps`` for MM-GPVAE)."""
    arr = _as_float_array(counts, "counts")
    if arr.ndim != 3:
        raise ValueError(f"`counts` must be (trials, bins, neurons); got shape {arr.shape}.")
    idx = check_neuron_split(held_in, arr.shape[2])
    out = np.setdiff1d(np.arange(arr.shape[2]), idx)
    if not hasattr(model, "heldout_rates"):
        raise TypeError(f"`model` must be a MultimodalGPVAE or a GPFA; got {type(model).__name__}.")
    rates = model.heldout_rates(arr[..., idx], idx, **inference)
    if rates.shape[2] != arr.shape[2]:
        raise ValueError(f"`counts` has {arr.shape[2]} neurons but the model predicts {rates.shape[2]}; pass every "
                         "neuron the model was fitted on.")
    return co_smoothing_score(arr[..., out], rates[..., out], model.config["bin_width"])
