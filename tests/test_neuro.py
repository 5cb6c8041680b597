"""Spike binning, count validation, NWB reading, tidy frames and plots."""
import datetime
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from latentgp.neuro import (
    BinnedSpikes,
    bin_spikes,
    check_counts,
    latents_frame,
    plot_latents,
    plot_raster,
    rates_frame,
    read_nwb_units,
)
from latentgp.simulate import simulate_vdp_spikes


@pytest.fixture(scope="module")
def sim():
    return simulate_vdp_spikes(n_trials=3, n_bins=100, n_neurons=8, seed=0)


def _expand(counts, bin_width, rng):
    """Counts -> spike times placed uniformly inside their bins (away from the edges)."""
    rows = []
    for (t, b, n), c in np.ndenumerate(counts):
        for u in rng.uniform(0.01, 0.99, size=c):
            rows.append((t, n, (b + u) * bin_width))
    return pd.DataFrame(rows, columns=["trial", "neuron", "time"])


def test_round_trip_frame_and_lists(sim, rng):
    counts, bw = sim["counts"], sim["bin_width"]
    n_trials, n_bins, n_neurons = counts.shape
    df = _expand(counts, bw, rng)
    binned = bin_spikes(df, bw, t_start=0.0, t_stop=n_bins * bw, n_neurons=n_neurons)
    np.testing.assert_array_equal(binned.counts, counts)
    assert binned.counts.dtype == np.int64
    np.testing.assert_allclose(binned.bin_edges, bw * np.arange(n_bins + 1), atol=1e-12)
    np.testing.assert_allclose(binned.bin_centers, sim["times"])
    np.testing.assert_array_equal(binned.trial_ids, np.arange(n_trials))
    np.testing.assert_array_equal(binned.neuron_ids, np.arange(n_neurons))

    lists = [[df.time[(df.trial == t) & (df.neuron == n)].to_numpy() for n in range(n_neurons)]
             for t in range(n_trials)]
    np.testing.assert_array_equal(bin_spikes(lists, bw, 0.0, n_bins * bw).counts, counts)


def test_default_window_and_labels():
    df = pd.DataFrame({"tr": ["b", "a", "a"], "unit": [7, 3, 7], "t": [0.25, 0.3, 0.5]})
    b = bin_spikes(df, 0.1, trial_column="tr", neuron_column="unit", time_column="t")
    # window starts at the first spike and ends at the first bin edge past the last spike
    np.testing.assert_allclose(b.bin_edges, [0.25, 0.35, 0.45, 0.55])
    assert list(b.trial_ids) == ["a", "b"] and list(b.neuron_ids) == [3, 7]
    np.testing.assert_array_equal(b.counts[0], [[1, 0], [0, 0], [0, 1]])  # trial "a"
    np.testing.assert_array_equal(b.counts[1], [[0, 1], [0, 0], [0, 0]])  # trial "b"
    # a spike exactly on an edge goes to the bin starting there; the last spike is always kept
    # (binary-exact times: with 0.1-wide bins "on an edge" is decided by the float edges returned)
    e = bin_spikes([[np.array([0.0, 0.25, 0.75])]], 0.25)
    np.testing.assert_array_equal(e.counts[0, :, 0], [1, 1, 0, 1])


def test_empty_trials_and_neurons_kept_as_zeros():
    b = bin_spikes([[[0.1], []], [[], []], [np.array([]), [0.9]]], 0.5, t_start=0, t_stop=1)
    assert b.counts.shape == (3, 2, 2)
    np.testing.assert_array_equal(b.counts.sum(axis=1), [[1, 0], [0, 0], [0, 1]])
    silent = bin_spikes([[[], []]], 0.5, t_start=0, t_stop=1)  # no spikes but a window: all zeros
    assert silent.counts.sum() == 0 and silent.counts.shape == (1, 2, 2)


def test_out_of_window_spikes_dropped_with_warning():
    with pytest.warns(UserWarning, match="2 of 4 spike"):
        b = bin_spikes([[[-0.1, 0.2, 0.7, 1.0]]], 0.5, t_start=0, t_stop=1)
    np.testing.assert_array_equal(b.counts[0, :, 0], [1, 1])
    with pytest.warns(UserWarning, match="not a whole number"):
        b = bin_spikes([[[0.1]]], 0.3, t_start=0, t_stop=1)
    assert b.n_bins == 4


def test_to_frame(sim):
    b = bin_spikes([[[0.05, 0.06], [0.15]]], 0.1, t_start=0, t_stop=0.2)
    frame = b.to_frame()
    assert list(frame.columns) == ["trial", "neuron", "bin", "time", "count"]
    assert len(frame) == 4 and frame["count"].sum() == 3
    assert frame.query("neuron == 0 and bin == 0")["count"].item() == 2
    np.testing.assert_allclose(frame.query("neuron == 1 and bin == 1")["time"].item(), 0.15)
    assert len(b.to_frame(drop_zeros=True)) == 2
    assert "1 trials x 2 bins x 2 neurons" in repr(b)


@pytest.mark.parametrize("spikes, kwargs, match", [
    (pd.DataFrame({"trial": [0], "neuron": [0], "time": [np.nan]}), {}, "`spikes\\['time'\\]`"),
    (pd.DataFrame({"trial": [0], "neuron": [0], "time": [np.inf]}), {}, "`spikes\\['time'\\]`"),
    (pd.DataFrame({"trial": [0], "unit": [0], "time": [0.1]}), {}, "`spikes` has no column"),
    (pd.DataFrame({"trial": [], "neuron": [], "time": []}), {}, "`spikes` has no rows"),
    (pd.DataFrame({"trial": [0], "neuron": [5], "time": [0.1]}), {"n_neurons": 3}, "`spikes\\['neuron'\\]`"),
    (pd.DataFrame({"trial": [0], "neuron": ["a"], "time": [0.1]}), {"n_neurons": 3},
     "`spikes\\['neuron'\\]`"),
    ([], {}, "`spikes` has no trials"),
    ([[[0.1]], []], {}, "`spikes\\[1\\]` lists no neurons"),
    ([[[0.1]], [[0.2], [0.3]]], {}, "`spikes\\[1\\]` has 2 neurons"),
    ([[[0.1, np.nan]]], {}, "`spikes\\[0\\]\\[0\\]`"),
    ([[0.1, 0.2]], {}, "`spikes\\[0\\]\\[0\\]`"),
    ([np.array([0.1, 0.2])], {}, "`spikes\\[0\\]`"),
    ([[["a"]]], {}, "`spikes\\[0\\]\\[0\\]`"),
    ([[[]]], {}, "`spikes` contains no spike times"),
    ([[[0.1]]], {"n_neurons": 2}, "`n_neurons`"),
    ([[[0.1]]], {"bin_width": 0}, "`bin_width`"),
    ([[[0.1]]], {"bin_width": -1}, "`bin_width`"),
    ([[[0.1]]], {"t_start": 1.0, "t_stop": 0.5}, "`t_stop`"),
    ([[[0.1]]], {"t_start": np.nan}, "`t_start`"),
    ([[[0.1]]], {"t_start": 0.5}, "`t_start`"),
    (np.zeros((2, 3)), {}, "`spikes` must be"),
])
def test_bin_spikes_bad_input(spikes, kwargs, match):
    kwargs = {"bin_width": 0.1, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        bin_spikes(spikes, **kwargs)


def test_check_counts():
    c = np.arange(24).reshape(2, 3, 4)
    for value in (c, c.astype(float), torch.as_tensor(c), c.tolist()):
        out = check_counts(value)
        assert out.dtype == np.int64 and out.shape == (2, 3, 4)
        np.testing.assert_array_equal(out, c)
    assert check_counts(c[0]).shape == (1, 3, 4)  # 2-D = one trial
    b = bin_spikes([[[0.1]]], 0.1, t_start=0, t_stop=0.2)
    np.testing.assert_array_equal(check_counts(b), b.counts)


@pytest.mark.parametrize("bad, match", [
    (-np.ones((2, 2)), "negative"),
    (np.full((2, 2), 0.5), "whole-number"),
    (np.full((2, 2), np.nan), "NaN"),
    (np.zeros((0, 3)), "empty"),
    (np.zeros(5), "3-D"),
    (np.zeros((1, 2, 3, 4)), "3-D"),
    (np.array([["a"]]), "numeric"),
    ([[1, 2], [3]], "rectangular"),
])
def test_check_counts_bad(bad, match):
    with pytest.raises((ValueError, TypeError), match=f"`y`.*{match}"):
        check_counts(bad, name="y")


def _write_nwb(path, with_trials=True):
    pynwb = pytest.importorskip("pynwb")
    nwb = pynwb.NWBFile(session_description="test", identifier="latentgp-test",
                        session_start_time=datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc))
    nwb.add_unit(spike_times=[0.05, 0.15, 1.12, 1.5])
    nwb.add_unit(spike_times=[0.5, 1.01, 2.5])
    nwb.add_unit(spike_times=[0.7])
    if with_trials:
        nwb.add_trial(start_time=0.0, stop_time=1.0)
        nwb.add_trial(start_time=1.0, stop_time=2.2)
    with pynwb.NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    return path


def test_read_nwb_units_with_trials(tmp_path):
    path = _write_nwb(tmp_path / "units.nwb")
    b = read_nwb_units(path, 0.1)
    # window [0, shortest trial = 1.0); spike times relative to each trial's start
    assert b.counts.shape == (2, 10, 3)
    np.testing.assert_array_equal(b.trial_ids, [0, 1])
    np.testing.assert_array_equal(b.neuron_ids, [0, 1, 2])
    expected = np.zeros((2, 10, 3), dtype=int)
    for trial, unit, rel in [(0, 0, 0.05), (0, 0, 0.15), (0, 1, 0.5), (0, 2, 0.7),
                             (1, 0, 0.12), (1, 0, 0.5), (1, 1, 0.01)]:
        expected[trial, int(rel / 0.1), unit] += 1
    np.testing.assert_array_equal(b.counts, expected)
    # explicit windows around custom events, relative times may start before the event
    w = read_nwb_units(path, 0.5, trials=[[1.0, 2.0], [2.0, 3.0]], t_start=-0.5, t_stop=0.5)
    # trial 0 window [0.5, 1.5): 0.5, 0.7, 1.01, 1.12; trial 1 window [1.5, 2.5): 1.5 (2.5 excluded)
    np.testing.assert_array_equal(w.counts.sum(axis=(1, 2)), [4, 1])


def test_read_nwb_units_without_trials(tmp_path):
    path = _write_nwb(tmp_path / "units.nwb", with_trials=False)
    b = read_nwb_units(path, 0.5)
    assert b.n_trials == 1 and b.counts.sum() == 8  # every spike, absolute times
    assert b.bin_edges[0] == pytest.approx(0.05) and b.bin_edges[-1] > 2.5
    with_trials = _write_nwb(tmp_path / "t.nwb")
    assert read_nwb_units(with_trials, 0.5, trials=False).n_trials == 1


def test_read_nwb_units_errors(tmp_path, monkeypatch):
    path = _write_nwb(tmp_path / "units.nwb")
    with pytest.raises(ValueError, match="`trials`"):
        read_nwb_units(path, 0.1, trials=[0.0, 1.0])
    with pytest.raises(ValueError, match="`bin_width`"):
        read_nwb_units(path, 5.0)
    monkeypatch.setitem(sys.modules, "pynwb", None)
    with pytest.raises(ImportError, match=r"pip install latentgp\[neuro\]"):
        read_nwb_units(path, 0.1)


def test_latents_frame():
    mean = np.arange(12.0).reshape(2, 3, 2)
    var = np.full_like(mean, 4.0)
    f = latents_frame(mean, var, bin_centers=[0.5, 1.5, 2.5], trial_ids=["x", "y"], level=0.95)
    assert list(f.columns) == ["trial", "bin", "time", "latent", "mean", "var", "lower", "upper"]
    assert len(f) == 12
    row = f.query("trial == 'y' and bin == 2 and latent == 1")
    assert row["mean"].item() == mean[1, 2, 1] and row["time"].item() == 2.5
    np.testing.assert_allclose(row["upper"].item() - row["mean"].item(), 1.959964 * 2, rtol=1e-5)
    g = latents_frame(torch.as_tensor(mean[0]))  # 2-D = one trial, no variance
    assert g["var"].isna().all() and g["lower"].isna().all() and (g["trial"] == 0).all()
    with pytest.raises(ValueError, match="`variance`"):
        latents_frame(mean, -var)
    with pytest.raises(ValueError, match="`variance`"):
        latents_frame(mean, var[:1])
    with pytest.raises(ValueError, match="`bin_centers`"):
        latents_frame(mean, bin_centers=[1, 2])
    with pytest.raises(ValueError, match="`level`"):
        latents_frame(mean, level=1.5)


def test_rates_frame(sim):
    f = rates_frame(sim["rates"], bin_centers=sim["times"], neuron_ids=[f"n{i}" for i in range(8)])
    assert list(f.columns) == ["trial", "bin", "time", "neuron", "rate"]
    assert len(f) == sim["rates"].size
    row = f.query("trial == 2 and bin == 7 and neuron == 'n3'")
    assert row["rate"].item() == sim["rates"][2, 7, 3]
    with pytest.raises(ValueError, match="`neuron_ids`"):
        rates_frame(sim["rates"], neuron_ids=[1, 2])
    with pytest.raises(ValueError, match="`rates`"):
        rates_frame(-sim["rates"])


def test_plots(sim):
    import matplotlib.pyplot as plt

    latents = sim["latents"] @ np.array([[1.0, 0.5], [-0.5, 1.0]])  # an affine-equivalent "estimate"
    frame = latents_frame(latents, np.full_like(latents, 0.01), bin_centers=sim["times"])
    ax = plot_latents(frame, trial=1, truth=sim["latents"])
    assert len(ax.lines) == 4 and len(ax.collections) == 2  # 2 means + 2 aligned truths, 2 bands
    # aligned truth lies on the estimate
    np.testing.assert_allclose(ax.lines[2].get_ydata(), latents[1, :, 0], atol=1e-8)
    ax = plot_latents((latents, None), trial=0, truth=sim["latents"][0], align=False)
    assert len(ax.lines) == 4
    with pytest.raises(ValueError, match="`trial`"):
        plot_latents(frame, trial=3)

    binned = bin_spikes(_expand(sim["counts"], 0.01, np.random.default_rng(1)), 0.01, t_start=0, t_stop=1.0,
                        n_neurons=8)
    ax = plot_raster(binned, rates=sim["rates"], trial=2)
    assert len(ax.images) == 1 and len(ax.lines) == 8
    ax = plot_raster(sim["counts"], rates=sim["rates"][0], trial=0, neurons=[1, 3])
    assert len(ax.lines) == 2
    with pytest.raises(ValueError, match="`rates`"):
        plot_raster(sim["counts"], rates=sim["rates"][:, :50])
    many = np.random.default_rng(0).poisson(1.0, size=(1, 20, 50))
    ax = plot_raster(many, rates=np.ones((20, 50)) + np.arange(20)[:, None])
    assert len(ax.lines) == 30 and "30 of 50 neurons" in ax.get_title()  # capped for readability
    with pytest.raises(ValueError, match="`neurons`"):
        plot_raster(sim["counts"], neurons=[99])
    plt.close("all")


def test_binned_spikes_is_plain_dataclass():
    b = BinnedSpikes(np.zeros((1, 2, 1), dtype=np.int64), np.array([0.0, 1.0, 2.0]), np.array([0]),
                     np.array([0]), 1.0)
    np.testing.assert_allclose(b.bin_centers, [0.5, 1.5])
    assert (b.n_trials, b.n_bins, b.n_neurons) == (1, 2, 1)
