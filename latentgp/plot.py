"""Matplotlib helpers (matplotlib is imported only when a plot is drawn)."""
from __future__ import annotations

import numpy as np


def plot_posterior(pred, x: str | None = None, data=None, ax=None, *, label="posterior mean",
                   band_label="interval", color="C0", data_kwargs=None):
    """Posterior mean and interval band for 1-D inputs.

    ``pred`` is a predict() DataFrame (input column + mean, lower, upper); ``x`` names the input
    column (default: the first column); ``data`` an optional (x, y) pair of observations to overlay.
    Returns the Axes.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 4))
    x = pred.columns[0] if x is None else x
    if x not in pred.columns:
        raise ValueError(f"`x`: column {x!r} not in the prediction frame {list(pred.columns)}.")
    order = np.argsort(pred[x].to_numpy())
    xs = pred[x].to_numpy()[order]
    ax.fill_between(xs, pred["lower"].to_numpy()[order], pred["upper"].to_numpy()[order], color=color,
                    alpha=0.25, label=band_label, linewidth=0)
    ax.plot(xs, pred["mean"].to_numpy()[order], color=color, label=label)
    if data is not None:
        kw = {"s": 8, "color": "k", "label": "data", "zorder": 3}
        kw.update(data_kwargs or {})
        ax.scatter(np.asarray(data[0]).ravel(), np.asarray(data[1]).ravel(), **kw)
    ax.set_xlabel(x)
    ax.legend(loc="best")
    return ax
