"""Why Magma beats the per-task GP on some data sets of the Magma benchmark and not on others.

Reads ``bench_output/magma_per_task.csv`` (written by ``bench_magma.py``) and replays each data set's
simulation. Magma has one mean process; on three-cluster data it is (about) the average of the
cluster curves, and a new task's forecast reverts to it beyond the task's observed points. The
constant-mean GP's forecast reverts to the task's own level instead. Which reference is closer to
the truth over the forecast window decides which wins, so per data set we compute

    dev    = mean square, over the forecast inputs and new tasks, of (own cluster curve - average curve)
    change = mean square of (own cluster curve - its value at the last observed input)
    q      = dev / change

and relate q to the Magma / GP MSE ratio (Spearman) and to who wins.

Run: ``python benchmarks/magma_ordering.py [--per-cluster-hp]`` (the flag as given to bench_magma.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_magma import per_task_csv  # noqa: E402
from common import OUTPUT  # noqa: E402

from latentgp.simulate_magma import simulate_magma, split_observed  # noqa: E402

GP = "GP per task (constant mean)"


def geometry(seed: int, common_cluster_hp: bool) -> dict:
    sim = simulate_magma(50, 30, 3, n_new=20, seed=seed, common_cluster_hp=common_cluster_hp)
    observed, target = split_observed(sim.new, 20)
    curves = sim.means.pivot(index="Input", columns="cluster", values="mean")
    forecast = curves.loc[np.sort(target["Input"].unique())].to_numpy()
    last = curves.loc[observed["Input"].max()].to_numpy()
    z = sim.clusters[target["ID"].unique()].to_numpy()
    dev = np.mean((forecast[:, z] - forecast.mean(1, keepdims=True)) ** 2)
    change = np.mean((forecast[:, z] - last[z]) ** 2)
    return {"seed": seed, "dev": dev, "change": change, "q": dev / change}


def main(common_cluster_hp: bool = True) -> pd.DataFrame:
    df = pd.read_csv(OUTPUT / per_task_csv(common_cluster_hp))
    per_set = df.groupby(["seed", "method"])["mse"].mean().unstack()
    table = pd.DataFrame([geometry(s, common_cluster_hp) for s in per_set.index]).set_index("seed")
    table["magma_over_gp"] = per_set["Magma"] / per_set[GP]
    table["magma_wins"] = table["magma_over_gp"] < 1
    rho, p = spearmanr(table["q"], table["magma_over_gp"])
    print(f"Spearman(q, Magma/GP MSE) = {rho:+.2f} (p = {p:.1e}); "
          f"Magma beats the GP in {table['magma_wins'].mean():.0%} of {len(table)} data sets")
    for thr in (2, 3):
        low = table["q"] < thr
        print(f"q < {thr}: Magma wins {int(table.loc[low, 'magma_wins'].sum())}/{int(low.sum())}; "
              f"q >= {thr}: {int(table.loc[~low, 'magma_wins'].sum())}/{int((~low).sum())}")
    print(table.groupby("magma_wins")[["dev", "change", "q"]].median().round(2).to_string())
    return table


if __name__ == "__main__":
    main(common_cluster_hp="--per-cluster-hp" not in sys.argv)
