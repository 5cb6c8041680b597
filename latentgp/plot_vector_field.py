"""Matplotlib helpers for fields on point clouds (``VectorFieldGP`` / ``ScalarFieldGP`` predictions).

matplotlib is imported only when a plot is drawn.
"""
from __future__ import annotations

import numpy as np


def _columns(pred, prefix: str) -> list[str]:
    cols = [c for c in pred.columns if c.startswith(prefix) and c[len(prefix):].isdigit()]
    if not cols:
        raise ValueError(f"`pred` has no {prefix}0, {prefix}1, ... columns; pass a predict() DataFrame.")
    return sorted(cols, key=lambda c: int(c[len(prefix):]))


def plot_vector_field(pred, ax=None, *, color: str | None = "var", length: float | None = None, every: int = 1,
                      cmap: str = "viridis", data=None, colorbar: bool = True, title: str | None = None):
    """Quiver plot of a predicted vector field, arrows coloured by ``pred[color]`` (default: the
    posterior variance, so uncertain regions stand out). 3-D axes for D >= 3 (first three
    coordinates), 2-D for D = 2.

    ``length`` scales the arrows (default: 0.8 x the median nearest-point spacing / median speed),
    ``every`` thins the arrows, ``data`` = (points, vectors) draws observed vectors in black.
    Returns the Axes.
    """
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors

    xc, vc = _columns(pred, "x"), _columns(pred, "v")
    if every < 1:
        raise ValueError(f"`every` must be >= 1; got {every}.")
    sub = pred.iloc[::every]
    X, V = sub[xc].to_numpy(), sub[vc].to_numpy()
    three = X.shape[1] >= 3
    X, V = X[:, :3 if three else 2], V[:, :3 if three else 2]
    if ax is None:
        fig = plt.figure(figsize=(8, 7) if three else (7, 6))
        ax = fig.add_subplot(projection="3d" if three else None)
    if length is None:
        from scipy.spatial import cKDTree

        spacing = np.median(cKDTree(X).query(X, k=2)[0][:, 1]) if len(X) > 1 else 1.0
        speed = np.median(np.linalg.norm(V, axis=1)) or 1.0
        length = 0.8 * every**0.5 * spacing / speed
    rgba = None
    if color is not None:
        if color not in sub.columns:
            raise ValueError(f"`color`: column {color!r} not in the prediction frame.")
        values = sub[color].to_numpy(dtype=float)
        normer = colors.Normalize(values.min(), values.max() if values.max() > values.min() else values.min() + 1)
        mapper = cm.ScalarMappable(normer, cmap)
        rgba = mapper.to_rgba(values)
    kw = {} if rgba is None else {"color": rgba}
    if three:
        ax.quiver(*X.T, *(V * length).T, length=1.0, normalize=False, linewidth=1.0, **kw)
    else:
        ax.quiver(*X.T, *(V * length).T, angles="xy", scale_units="xy", scale=1.0, width=0.003, **kw)
    if three:
        ax.set_box_aspect(np.ptp(X, 0) + 1e-12)  # true proportions: flat surfaces must look flat
    if data is not None:
        P, W = (np.asarray(a, dtype=float)[:, :3 if three else 2] for a in data)
        if three:
            ax.quiver(*P.T, *(W * length).T, length=1.0, normalize=False, color="k", linewidth=0.6, alpha=0.6)
        else:
            ax.quiver(*P.T, *(W * length).T, angles="xy", scale_units="xy", scale=1.0, width=0.002, color="k")
    if rgba is not None and colorbar:
        plt.colorbar(mapper, ax=ax, shrink=0.6, label=color)
    for name, axis in zip(xc, ("x", "y", "z"), strict=False):
        getattr(ax, f"set_{axis}label")(name)
    if title:
        ax.set_title(title)
    return ax


def plot_scalar_field(pred, ax=None, *, column: str = "mean", cmap: str = "viridis", size: float = 8.0,
                      title: str | None = None):
    """Scatter of the point cloud coloured by a prediction column (``mean`` or ``var``). Returns the Axes."""
    import matplotlib.pyplot as plt

    xc = _columns(pred, "x")
    if column not in pred.columns:
        raise ValueError(f"`column`: {column!r} not in the prediction frame.")
    X = pred[xc].to_numpy()
    three = X.shape[1] >= 3
    if ax is None:
        fig = plt.figure(figsize=(8, 7) if three else (7, 6))
        ax = fig.add_subplot(projection="3d" if three else None)
    art = ax.scatter(*X[:, :3 if three else 2].T, c=pred[column].to_numpy(), s=size, cmap=cmap)
    if three:
        ax.set_box_aspect(np.ptp(X[:, :3], 0) + 1e-12)
    plt.colorbar(art, ax=ax, shrink=0.6, label=column)
    if title:
        ax.set_title(title)
    return ax
