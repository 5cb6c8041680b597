"""Simulated multi-modal data for MM-GPVAE: GP latents drive Poisson neurons and a rendered moving blob.

Shared latents x (trials, bins, 3) with known squared-exponential timescales (``gp_latents``) are read out
log-linearly by Poisson neurons (``poisson_spikes``) and rendered as a 28 x 28 image per bin: a Gaussian
blob whose centre follows latents 0 and 1 and whose width follows latent 2 (all squashed by tanh so the
blob stays inside the frame).
"""
from __future__ import annotations

import numpy as np

from .simulate import gp_latents, poisson_spikes


def render_blob(latents: np.ndarray, size: int = 28) -> np.ndarray:
    """Images (..., size, size) in [0, 1] from latents (..., 3): centre 0/1, width 2."""
    c = size / 2 - 0.5
    cx = c + 0.3 * size * np.tanh(latents[..., 0])
    cy = c + 0.3 * size * np.tanh(latents[..., 1])
    width = size / 10 * (1 + 0.5 * np.tanh(latents[..., 2]))
    grid = np.arange(size)
    dx = (grid - cx[..., None]) ** 2  # (..., size) columns
    dy = (grid - cy[..., None]) ** 2  # rows
    w2 = 2 * width[..., None, None] ** 2
    return np.exp(-(dy[..., :, None] + dx[..., None, :]) / w2)


def simulate_blob_spikes(n_trials=20, n_bins=50, n_neurons=50, timescales=(0.1, 0.2, 0.4), bin_width=0.02,
                         rate_range=(15.0, 40.0), size=28, seed=None) -> dict:
    """dict(latents (trials, bins, 3), counts int64 (trials, bins, neurons), images (trials, bins, size, size),
    rates, bin_width, timescales)."""
    rng = np.random.default_rng(seed)
    x = gp_latents(np.asarray(timescales, float), n_trials=n_trials, n_bins=n_bins, bin_width=bin_width, seed=rng)
    sp = poisson_spikes(x, n_neurons=n_neurons, rate_range=rate_range, bin_width=bin_width, seed=rng)
    return {"latents": x, "counts": sp["counts"], "images": render_blob(x, size), "rates": sp["rates"],
            "bin_width": bin_width, "timescales": np.asarray(timescales, float)}
