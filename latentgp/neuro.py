"""Spike-train pipeline: spike times -> binned counts -> (latent model) -> tidy frames and plots.

One shape convention throughout: counts, latents and rates are (trials, bins, units), where
units are neurons or latent dimensions.  All trials share one time window [t_start, t_stop)
measured relative to the trial (the latent models assume aligned, equal-length trials).

Validation follows ``latentgp.data``: bad input raises ValueError/TypeError naming the argument.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from .data import _as_float_array, _to_numpy, check_int, check_level, check_positive

__all__ = [
    "BinnedSpikes", "bin_spikes", "check_counts", "read_nwb_units", "latents_frame", "rates_frame",
    "plot_latents", "plot_raster",
]


@dataclass(eq=False)  # eq on arrays is ambiguous; compare .counts explicitly instead
class BinnedSpikes:
    """Spike counts on a shared bin grid.

    counts: int64 (trials, bins, neurons); bin_edges: (bins + 1,) times relative to the trial;
    trial_ids / neuron_ids: labels of the first / last axis; bin_width: in the time unit of the
    spike times (seconds for NWB).
    """

    counts: np.ndarray
    bin_edges: np.ndarray
    trial_ids: np.ndarray
    neuron_ids: np.ndarray
    bin_width: float

    @property
    def bin_centers(self) -> np.ndarray:
        return 0.5 * (self.bin_edges[:-1] + self.bin_edges[1:])

    @property
    def n_trials(self) -> int:
        return self.counts.shape[0]

    @property
    def n_bins(self) -> int:
        return self.counts.shape[1]

    @property
    def n_neurons(self) -> int:
        return self.counts.shape[2]

    def to_frame(self, drop_zeros: bool = False) -> pd.DataFrame:
        """Long tidy frame: trial, neuron, bin, time (bin centre), count; one row per cell.

        Rows are ordered trial, neuron, bin so each neuron's time series is contiguous.
        ``drop_zeros`` keeps only non-empty bins (much smaller for sparse recordings).
        """
        frame = _long_frame(self.counts, "neuron", "count", self.bin_centers, self.trial_ids, self.neuron_ids)
        return frame[frame["count"] > 0].reset_index(drop=True) if drop_zeros else frame

    def __repr__(self) -> str:  # the default repr would print every count
        return (f"BinnedSpikes({self.n_trials} trials x {self.n_bins} bins x {self.n_neurons} neurons, "
                f"bin_width={self.bin_width:g}, window=[{self.bin_edges[0]:g}, {self.bin_edges[-1]:g}), "
                f"{int(self.counts.sum())} spikes)")


# ---------------------------------------------------------------------------------------------
# binning


def bin_spikes(spikes, bin_width, t_start=None, t_stop=None, n_neurons=None, trial_column="trial",
               neuron_column="neuron", time_column="time") -> BinnedSpikes:
    """Count spikes in bins of ``bin_width`` on the window [t_start, t_stop) shared by all trials.

    ``spikes`` is either
      * a DataFrame with one row per spike and columns ``trial_column``, ``neuron_column``,
        ``time_column`` (``trial_column=None``: all rows are one trial).  Trials and neurons are
        the sorted unique values present; with ``n_neurons`` the neuron ids must be the integers
        0..n_neurons-1, so neurons that never fire still get a (zero) column.
      * a list over trials of lists over neurons of 1-D spike-time arrays.  Every trial must list
        the same number of neurons; a trial (or neuron) without spikes stays as zeros.

    Defaults: ``t_start`` = earliest spike, ``t_stop`` = just past the latest spike.  The window
    is always a whole number of bins: a ``t_stop`` that is not is extended to the next bin edge
    (with a warning).  Spikes outside the window are dropped with a warning.
    """
    if isinstance(spikes, pd.DataFrame):
        trial_idx, neuron_idx, times, trial_ids, neuron_ids = _flat_from_frame(
            spikes, trial_column, neuron_column, time_column, n_neurons)
    elif isinstance(spikes, (list, tuple)):
        trial_idx, neuron_idx, times, trial_ids, neuron_ids = _flat_from_lists(spikes, n_neurons)
    else:
        raise TypeError("`spikes` must be a DataFrame (trial, neuron, time columns) or a list over trials "
                        f"of lists over neurons of spike-time arrays; got {type(spikes).__name__}.")
    return _bin_flat(trial_idx, neuron_idx, times, trial_ids, neuron_ids, bin_width, t_start, t_stop)


def _flat_from_frame(df, trial_column, neuron_column, time_column, n_neurons):
    wanted = [c for c in (trial_column, neuron_column, time_column) if c is not None]
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise ValueError(f"`spikes` has no column(s) {missing}; available: {list(df.columns)}. Name yours "
                         "with `trial_column`, `neuron_column` and `time_column`.")
    if len(df) == 0:
        raise ValueError("`spikes` has no rows (no spikes), so there are no trials or neurons to bin.")
    times = _as_float_array(df[time_column], f"spikes[{time_column!r}]")
    if trial_column is None:
        trial_idx, trial_ids = np.zeros(len(df), dtype=np.int64), np.array([0])
    else:
        trial_idx, trial_ids = _factorize(df[trial_column], f"spikes[{trial_column!r}]")
    if n_neurons is None:
        neuron_idx, neuron_ids = _factorize(df[neuron_column], f"spikes[{neuron_column!r}]")
    else:
        n = check_int(n_neurons, "n_neurons", 1)
        name = f"spikes[{neuron_column!r}]"
        try:
            raw = df[neuron_column].to_numpy(dtype=float)
        except (TypeError, ValueError):
            raise TypeError(f"`{name}` must hold integer neuron indices when `n_neurons` is given.") from None
        if not (np.isfinite(raw).all() and np.array_equal(raw, np.round(raw))):
            raise TypeError(f"`{name}` must hold integer neuron indices when `n_neurons` is given.")
        if raw.min() < 0 or raw.max() >= n:
            raise ValueError(f"`{name}` has neuron indices in [{raw.min():g}, {raw.max():g}], outside "
                             f"0..n_neurons-1 = 0..{n - 1}.")
        neuron_idx, neuron_ids = raw.astype(np.int64), np.arange(n)
    return trial_idx, neuron_idx, times, trial_ids, neuron_ids


def _factorize(column: pd.Series, name: str):
    if column.isna().any():
        raise ValueError(f"`{name}` has {int(column.isna().sum())} missing value(s).")
    codes, uniques = pd.factorize(column, sort=True)
    return codes.astype(np.int64), np.asarray(uniques)


def _flat_from_lists(spikes, n_neurons):
    if len(spikes) == 0:
        raise ValueError("`spikes` has no trials.")
    arrays, n_per_trial = [], None
    hint = "`spikes` is nested trials -> neurons -> spike times; for a single trial pass [spikes]."
    for i, trial in enumerate(spikes):
        ragged = isinstance(trial, np.ndarray) and trial.dtype == object  # np.array of per-neuron arrays
        if not (isinstance(trial, (list, tuple)) or ragged):
            raise TypeError(f"`spikes[{i}]` must be a list over neurons of spike-time arrays, not "
                            f"{type(trial).__name__}. {hint}")
        if len(trial) == 0:
            raise ValueError(f"`spikes[{i}]` lists no neurons; a trial needs one (possibly empty) spike-time "
                             "array per neuron.")
        if n_per_trial is None:
            n_per_trial = len(trial)
        elif len(trial) != n_per_trial:
            raise ValueError(f"`spikes[{i}]` has {len(trial)} neurons but `spikes[0]` has {n_per_trial}; "
                             "every trial must list the same neurons.")
        for j, train in enumerate(trial):
            try:
                arr = np.asarray(train, dtype=float)
            except (TypeError, ValueError):
                raise TypeError(f"`spikes[{i}][{j}]` must be numeric spike times.") from None
            if arr.ndim != 1:
                raise TypeError(f"`spikes[{i}][{j}]` must be a 1-D array of spike times; got shape "
                                f"{arr.shape}. {hint}")
            arrays.append(arr)
    if n_neurons is not None and check_int(n_neurons, "n_neurons", 1) != n_per_trial:
        raise ValueError(f"`n_neurons` is {n_neurons} but each trial in `spikes` lists {n_per_trial} "
                         "neurons.")
    lengths = np.array([a.size for a in arrays])
    times = np.concatenate(arrays)
    cell = np.repeat(np.arange(lengths.size), lengths)  # cell = trial * n_neurons + neuron
    trial_idx, neuron_idx = np.divmod(cell, n_per_trial)
    bad = np.flatnonzero(~np.isfinite(times))
    if bad.size:
        raise ValueError(f"`spikes[{trial_idx[bad[0]]}][{neuron_idx[bad[0]]}]` contains NaN or infinite "
                         f"spike times ({bad.size} in total).")
    return trial_idx, neuron_idx, times, np.arange(len(spikes)), np.arange(n_per_trial)


def _check_time(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a number; got {value!r}.") from None
    if not math.isfinite(v):
        raise ValueError(f"`{name}` must be finite; got {value!r}.")
    return v


def _whole_bins(t0: float, t1: float, bw: float) -> int:
    """Bins covering [t0, t1), rounding a fractional last bin up (with a warning)."""
    if t1 <= t0:
        raise ValueError(f"`t_stop` = {t1:g} must be greater than `t_start` = {t0:g}.")
    ratio = (t1 - t0) / bw
    n_bins = max(1, math.ceil(ratio - 1e-9 * max(1.0, ratio)))  # tolerate 0.3 / 0.1 = 2.9999...
    if abs(n_bins - ratio) > 1e-9 * max(1.0, ratio):
        warnings.warn(f"`t_stop`: the window [{t0:g}, {t1:g}) is not a whole number of {bw:g}-wide bins; "
                      f"extended to {t0 + n_bins * bw:g}.", UserWarning, stacklevel=4)
    return n_bins


def _bin_flat(trial_idx, neuron_idx, times, trial_ids, neuron_ids, bin_width, t_start, t_stop, warn=True):
    """Shared core: one bincount over flat (trial, bin, neuron) indices."""
    bw = check_positive(bin_width, "bin_width")
    if (t_start is None or t_stop is None) and times.size == 0:
        raise ValueError("`spikes` contains no spike times; pass `t_start` and `t_stop` to bin an empty "
                         "recording.")
    t0 = float(times.min()) if t_start is None else _check_time(t_start, "t_start")
    if t_stop is None:
        last = float(times.max())
        if last < t0:
            raise ValueError(f"`t_start` = {t0:g} is after every spike (latest {last:g}).")
        n_bins = int(np.floor((last - t0) / bw)) + 1
        while t0 + n_bins * bw <= last:  # guard against round-off leaving the latest spike out
            n_bins += 1
    else:
        n_bins = _whole_bins(t0, _check_time(t_stop, "t_stop"), bw)
    edges = t0 + bw * np.arange(n_bins + 1)
    # searchsorted against the returned edges (not floor((t - t0) / bw)) so a spike exactly on an
    # edge lands in the bin that the edges say it does
    b = np.searchsorted(edges, times, side="right") - 1
    inside = (b >= 0) & (b < n_bins)
    if warn and not inside.all():
        warnings.warn(f"`spikes`: {int((~inside).sum())} of {times.size} spike(s) fall outside the window "
                      f"[{edges[0]:g}, {edges[-1]:g}) and were dropped.", UserWarning, stacklevel=3)
    n_trials, n_neurons = len(trial_ids), len(neuron_ids)
    flat = (trial_idx[inside] * n_bins + b[inside]) * n_neurons + neuron_idx[inside]
    counts = np.bincount(flat, minlength=n_trials * n_bins * n_neurons).astype(np.int64)
    return BinnedSpikes(counts.reshape(n_trials, n_bins, n_neurons), edges, np.asarray(trial_ids),
                        np.asarray(neuron_ids), bw)


def check_counts(counts, name: str = "counts") -> np.ndarray:
    """Validate spike counts and return them as int64 (trials, bins, neurons).

    Accepts numpy/torch/nested lists/DataFrames or a BinnedSpikes; a 2-D (bins, neurons) array is
    one trial.  Counts must be finite non-negative integers (floats like 3.0 are fine).
    """
    if isinstance(counts, BinnedSpikes):
        counts = counts.counts
    try:
        arr = _to_numpy(counts, name)
    except ValueError:  # ragged nested lists
        raise ValueError(f"`{name}` must be a rectangular array; got ragged nested lists.") from None
    if arr.dtype == bool:
        arr = arr.astype(np.int64)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"`{name}` must hold numeric spike counts; got dtype {arr.dtype}.")
    if arr.size == 0:
        raise ValueError(f"`{name}` is empty (shape {arr.shape}).")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"`{name}` must be 3-D (trials, bins, neurons) or 2-D (bins, neurons); got shape "
                         f"{arr.shape}.")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError(f"`{name}` contains {int((~np.isfinite(arr)).sum())} NaN or infinite value(s).")
        if not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"`{name}` must hold whole-number spike counts; found non-integer values.")
    if (arr < 0).any():
        raise ValueError(f"`{name}` contains {int((arr < 0).sum())} negative count(s).")
    return np.ascontiguousarray(arr, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# NWB


def read_nwb_units(path, bin_width, trials=None, t_start=None, t_stop=None) -> BinnedSpikes:
    """Bin the spike times of an NWB file's units table.

    ``trials``: None uses the file's trials table if it has one (otherwise one trial spanning all
    spikes); False ignores it (one trial); or an (n_trials, 2) array of [start, stop) times.
    With trials, spike times are taken relative to each trial's start and ``t_start``/``t_stop``
    are relative too; by default the window is [0, shortest trial) cut to whole bins, so no bin
    runs past the end of any trial.  Without trials, times (and the window) are absolute.
    Neuron ids are the units table ids; trial ids the trials table ids (else 0..n-1).
    """
    try:
        from pynwb import NWBHDF5IO
    except ImportError:
        raise ImportError("read_nwb_units needs pynwb: pip install latentgp[neuro]") from None
    with NWBHDF5IO(str(path), "r") as io:
        nwb = io.read()
        if nwb.units is None or len(nwb.units) == 0:
            raise ValueError(f"`path`: {path} has no units table (no sorted spikes).")
        if "spike_times" not in nwb.units.colnames:
            raise ValueError(f"`path`: the units table of {path} has no spike_times column.")
        ragged = nwb.units["spike_times"]  # VectorIndex: .data = end offsets, .target = flat times
        ends = np.asarray(ragged.data[:], dtype=np.int64)
        flat_times = np.asarray(ragged.target.data[:], dtype=float)
        neuron_ids = np.asarray(nwb.units.id[:])
        table = nwb.trials if trials is None else None
        windows, trial_ids = None, None
        if table is not None and len(table) > 0:
            windows = np.column_stack([table["start_time"].data[:], table["stop_time"].data[:]]).astype(float)
            trial_ids = np.asarray(table.id[:])
    neuron_of_spike = np.repeat(np.arange(ends.size), np.diff(ends, prepend=0))
    if not np.isfinite(flat_times).all():
        raise ValueError(f"`path`: the units table of {path} has NaN or infinite spike times.")

    if trials is not None and trials is not False:
        windows = _as_float_array(trials, "trials")
        if windows.ndim != 2 or windows.shape[1] != 2:
            raise ValueError(f"`trials` must be an (n_trials, 2) array of [start, stop) times; got shape "
                             f"{windows.shape}.")
        trial_ids = np.arange(len(windows))
    if windows is None:
        zeros = np.zeros(flat_times.size, dtype=np.int64)
        return _bin_flat(zeros, neuron_of_spike, flat_times, np.array([0]), neuron_ids, bin_width, t_start,
                         t_stop)

    bw = check_positive(bin_width, "bin_width")
    durations = windows[:, 1] - windows[:, 0]
    if (durations <= 0).any():
        raise ValueError(f"`trials`: {int((durations <= 0).sum())} trial(s) have stop <= start.")
    rel_start = 0.0 if t_start is None else _check_time(t_start, "t_start")
    if t_stop is None:
        # round *down*: a bin running past the end of a trial would count spikes of the next one
        n_bins = math.floor((durations.min() - rel_start) / bw * (1 + 1e-12))
        if n_bins < 1:
            raise ValueError(f"`bin_width` = {bw:g} / `t_start` = {rel_start:g} leave no whole bin inside "
                             f"the shortest trial ({durations.min():g} long).")
    else:
        n_bins = _whole_bins(rel_start, _check_time(t_stop, "t_stop"), bw)
    rel_stop = rel_start + n_bins * bw
    # select each trial's spikes by binary search on the sorted flat times (O(S log S), not trials x S);
    # the selection is a hair wider and _bin_flat makes the exact cut in relative time, silently, so
    # round-off between absolute and relative times can neither lose spikes nor cause warnings
    order = np.argsort(flat_times, kind="stable")
    sorted_times = flat_times[order]
    pad = 1e-6 * bw
    lo = np.searchsorted(sorted_times, windows[:, 0] + rel_start - pad, side="left")
    hi = np.searchsorted(sorted_times, windows[:, 0] + rel_stop + pad, side="left")
    take = np.concatenate([order[a:b] for a, b in zip(lo, hi, strict=True)]) if len(lo) else np.array([], int)
    trial_idx = np.repeat(np.arange(len(windows)), hi - lo)
    times = flat_times[take] - windows[trial_idx, 0]
    return _bin_flat(trial_idx, neuron_of_spike[take], times, trial_ids, neuron_ids, bw, rel_start, rel_stop,
                     warn=False)


# ---------------------------------------------------------------------------------------------
# tidy frames


def _as_3d(value, name: str) -> np.ndarray:
    arr = _as_float_array(value, name)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"`{name}` must be 3-D (trials, bins, k) or 2-D (bins, k); got shape {arr.shape}.")
    return arr


def _axis_values(values, n: int, name: str, default) -> np.ndarray:
    if values is None:
        return default
    arr = np.asarray(_to_numpy(values, name)).ravel()
    if arr.size != n:
        raise ValueError(f"`{name}` has {arr.size} entries but the data have {n} along that axis.")
    return arr


def _long_frame(values, unit: str, value: str, bin_centers, trial_ids, unit_ids) -> pd.DataFrame:
    """(trials, bins, units) -> rows ordered trial, unit, bin."""
    n_trials, n_bins, n_units = values.shape
    times = _axis_values(bin_centers, n_bins, "bin_centers", np.arange(n_bins, dtype=float))
    times = np.asarray(times, dtype=float)
    trial_ids = _axis_values(trial_ids, n_trials, "trial_ids", np.arange(n_trials))
    unit_ids = _axis_values(unit_ids, n_units, f"{unit}_ids", np.arange(n_units))
    return pd.DataFrame({
        "trial": np.repeat(trial_ids, n_units * n_bins),
        unit: np.tile(np.repeat(unit_ids, n_bins), n_trials),
        "bin": np.tile(np.arange(n_bins), n_trials * n_units),
        "time": np.tile(times, n_trials * n_units),
        value: values.transpose(0, 2, 1).ravel(),
    })


def latents_frame(latents, variance=None, bin_centers=None, trial_ids=None, level=0.95) -> pd.DataFrame:
    """Tidy posterior latents: trial, bin, time, latent, mean, var, lower, upper.

    ``latents``/``variance``: (trials, bins, k) posterior means / marginal variances (2-D = one
    trial).  lower/upper is the central ``level`` Gaussian interval; without ``variance`` the var,
    lower and upper columns are NaN.  ``time`` is ``bin_centers`` or the bin index.
    """
    mean = _as_3d(latents, "latents")
    z = NormalDist().inv_cdf(0.5 + check_level(level) / 2)
    if variance is None:
        var = np.full_like(mean, np.nan)
    else:
        var = _as_3d(variance, "variance")
        if var.shape != mean.shape:
            raise ValueError(f"`variance` has shape {var.shape} but `latents` has {mean.shape}.")
        if (var < 0).any():
            raise ValueError(f"`variance` has {int((var < 0).sum())} negative value(s).")
    frame = _long_frame(mean, "latent", "mean", bin_centers, trial_ids, None)
    frame = frame[["trial", "bin", "time", "latent", "mean"]]
    sd = np.sqrt(var.transpose(0, 2, 1).ravel())
    frame["var"] = sd**2
    frame["lower"] = frame["mean"].to_numpy() - z * sd
    frame["upper"] = frame["mean"].to_numpy() + z * sd
    return frame


def rates_frame(rates, bin_centers=None, trial_ids=None, neuron_ids=None) -> pd.DataFrame:
    """Tidy firing rates: trial, bin, time, neuron, rate (rates in whatever unit they are given)."""
    arr = _as_3d(rates, "rates")
    if (arr < 0).any():
        raise ValueError(f"`rates` has {int((arr < 0).sum())} negative value(s).")
    frame = _long_frame(arr, "neuron", "rate", bin_centers, trial_ids, neuron_ids)
    return frame[["trial", "bin", "time", "neuron", "rate"]]


# ---------------------------------------------------------------------------------------------
# plots (matplotlib imported only when drawing)


def _trial_position(trial, n_trials: int) -> int:
    t = check_int(trial, "trial", 0)
    if t >= n_trials:
        raise ValueError(f"`trial` = {t} but there are only {n_trials} trial(s).")
    return t


_MAX_RASTER_ROWS = 30


def plot_latents(frame_or_arrays, trial=0, ax=None, *, truth=None, align=True, bin_centers=None, level=0.95):
    """Posterior mean of each latent with its interval band over time, for one trial.

    ``frame_or_arrays``: a ``latents_frame`` DataFrame, a (trials, bins, k) mean array, or a
    (mean, variance) pair.  ``trial`` is the trial's position (0 = first), not its id.
    ``truth``: optional true latents, (trials, bins, m) or (bins, m) for this trial, drawn dashed.
    Latents are identified only up to an affine map, so with ``align`` the truth is mapped into the
    estimate's coordinates by least squares (on this trial) before drawing.  Returns the Axes.
    """
    import matplotlib.pyplot as plt

    frame = frame_or_arrays
    if not isinstance(frame, pd.DataFrame):
        mean, var = frame if isinstance(frame, tuple) else (frame, None)
        frame = latents_frame(mean, var, bin_centers=bin_centers, level=level)
    missing = [c for c in ("trial", "time", "latent", "mean") if c not in frame.columns]
    if missing:
        raise ValueError(f"`frame_or_arrays` has no column(s) {missing}; pass a latents_frame() result.")
    ids = pd.unique(frame["trial"])
    pos = _trial_position(trial, len(ids))
    sub = frame[frame["trial"] == ids[pos]].sort_values(["latent", "time"])
    latent_ids = pd.unique(sub["latent"])
    times = sub[sub["latent"] == latent_ids[0]]["time"].to_numpy()
    est = np.column_stack([sub[sub["latent"] == k]["mean"].to_numpy() for k in latent_ids])

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.5))
    has_band = {"lower", "upper"} <= set(sub.columns) and sub["lower"].notna().any()
    for i, k in enumerate(latent_ids):
        rows = sub[sub["latent"] == k]
        if has_band:
            ax.fill_between(times, rows["lower"], rows["upper"], color=f"C{i}", alpha=0.2, linewidth=0)
        ax.plot(times, rows["mean"], color=f"C{i}", label=f"latent {k}")
    if truth is not None:
        true = _as_float_array(truth, "truth")
        true = true[pos] if true.ndim == 3 else true
        if true.ndim == 1:
            true = true[:, None]
        if true.shape[0] != len(times):
            raise ValueError(f"`truth` has {true.shape[0]} bins per trial but the latents have {len(times)}.")
        if align:
            design = np.column_stack([true, np.ones(len(true))])
            true = design @ np.linalg.lstsq(design, est, rcond=None)[0]
        for i in range(true.shape[1]):  # black dashes stay visible on top of the coloured means
            ax.plot(times, true[:, i], color="k", linestyle="--", linewidth=1.2,
                    label=("truth (affine-aligned)" if align else "truth") if i == 0 else None)
    ax.set_xlabel("time")
    ax.set_ylabel("latent")
    ax.set_title(f"trial {ids[pos]}: posterior mean" + (" and interval" if has_band else ""))
    ax.legend(loc="upper right", fontsize="small")
    return ax


def plot_raster(counts_or_binned, rates=None, trial=0, ax=None, *, neurons=None, bin_centers=None):
    """Spike counts of one trial as a grey image (neuron x time) with inferred rates overlaid.

    Each neuron's rate is drawn as a line inside its own row, min-max scaled to the row height
    (so rate shapes, not absolute rates, are compared with the spikes).  ``rates``: (trials, bins,
    neurons), or (bins, neurons) for this trial.  ``trial`` is a position (0 = first); ``neurons``
    a list of neuron positions to show (default: all, or 30 evenly spaced ones if there are more).
    Returns the Axes.
    """
    import matplotlib.pyplot as plt

    if isinstance(counts_or_binned, BinnedSpikes):
        edges, ids = counts_or_binned.bin_edges, counts_or_binned.neuron_ids
    else:
        edges, ids = None, None
    counts = check_counts(counts_or_binned, "counts_or_binned")
    pos = _trial_position(trial, counts.shape[0])
    n_bins, n_neurons = counts.shape[1:]
    if edges is None:
        if bin_centers is None:
            edges = np.arange(n_bins + 1, dtype=float) - 0.5
        else:
            c = np.asarray(_axis_values(bin_centers, n_bins, "bin_centers", None), dtype=float)
            step = np.diff(c).mean() if n_bins > 1 else 1.0
            edges = np.concatenate([c - step / 2, [c[-1] + step / 2]])
    if neurons is None:  # beyond ~30 rows the per-row rate lines become unreadable
        sel = np.unique(np.linspace(0, n_neurons - 1, min(n_neurons, _MAX_RASTER_ROWS)).round().astype(int))
    else:
        sel = np.atleast_1d(np.asarray(neurons, dtype=int))
    if sel.size == 0 or sel.min() < 0 or sel.max() >= n_neurons:
        raise ValueError(f"`neurons` must be positions in 0..{n_neurons - 1}; got {neurons!r}.")
    image = counts[pos][:, sel].T

    if ax is None:
        _, ax = plt.subplots(figsize=(9, max(2.5, 0.15 * sel.size + 1)))
    vmax = max(1.0, float(np.percentile(image[image > 0], 99)) if (image > 0).any() else 1.0)
    ax.imshow(image, aspect="auto", origin="lower", cmap="Greys", interpolation="nearest", vmin=0, vmax=vmax,
              extent=(edges[0], edges[-1], -0.5, sel.size - 0.5))
    if rates is not None:
        r = _as_3d(rates, "rates")
        r = r[0] if r.shape[0] == 1 and counts.shape[0] > 1 else r[pos]  # 2-D rates = this trial
        if r.shape != (n_bins, n_neurons):
            raise ValueError(f"`rates` has {r.shape} (bins, neurons) per trial but counts have "
                             f"{(n_bins, n_neurons)}.")
        centers = 0.5 * (edges[:-1] + edges[1:])
        for row, n in enumerate(sel):
            lo, hi = r[:, n].min(), r[:, n].max()
            scaled = (r[:, n] - lo) / (hi - lo) if hi > lo else np.full(n_bins, 0.5)
            ax.plot(centers, row - 0.4 + 0.8 * scaled, color="C1", linewidth=1.5,
                    label="rate (min-max scaled per neuron)" if row == 0 else None)
        ax.legend(loc="upper right", fontsize="small")
    rows = np.arange(0, sel.size, max(1, sel.size // 15))  # label rows with neuron ids, not row numbers
    ax.set_yticks(rows)
    ax.set_yticklabels([str(ids[sel[i]]) if ids is not None else str(sel[i]) for i in rows])
    ax.set_ylim(-0.5, sel.size - 0.5)
    ax.set_xlabel("time")
    ax.set_ylabel("neuron")
    shown = "" if sel.size == n_neurons else f", {sel.size} of {n_neurons} neurons"
    ax.set_title(f"trial {pos}: spike counts (grey){shown}")
    return ax
