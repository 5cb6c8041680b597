"""MM-GPVAE vs GPFA on simulated spikes + a rendered moving blob; GP-VAE step cost vs a plain VAE and vs T.

Data per seed (``latentgp.simulate_blob.simulate_blob_spikes``): 3 shared squared-exponential GP latents
with timescales 50, 100, 200 ms, 50 trials x 50 bins of 20 ms, 50 Poisson neurons (log-linear readout,
15-40 Hz), and a 28 x 28 image per bin: a Gaussian blob whose centre follows latents 0/1 and whose width
follows latent 2. 40 trials train, 10 are held out.

* MM-GPVAE: ``MultimodalGPVAE(3, (0, 0), n_frequencies=30, bin_width=0.02)``, best of 3 restarts (300 steps
  each), gradient norm clipped at 100, Adam lr 0.01, batch 10, 3000 minibatch steps (quick: 300), default
  encoders/decoder.
* GPFA: ``GPFA(3, bin_width=0.02).fit(counts, steps=300)`` on the same training spikes.

Reported per seed: latent R² after the best affine map (``r_squared_affine``) on the training trials (MM-GPVAE
from spikes + images, and from spikes alone; GPFA from spikes), on the held-out trials from spikes alone
(GPFA: ``transform``), pixel R² of the held-out images predicted from spikes alone, fit time and time per
epoch (one pass over the 40 training trials).

Cost rows: one training step (forward + backward, batch 10, same default encoder/decoder) of GPVAE
(state-space GP prior, Kalman smoother) against the same networks with an i.i.d. N(0, I) prior (a plain
VAE: q(z_t) = N(0, I) x site, closed-form KL per step); and GPVAE step time for T = 100 ... 10,000.
Timings are on a shared 2-core machine under load from other jobs: noisy, compare ratios from the same run.

Run:  .venv/bin/python benchmarks/bench_gpvae.py [--quick]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import append_rows, describe, machine, markdown_table, median, paired_ratio, time_interleaved

from latentgp.models.gpfa import GPFA
from latentgp.models.gpvae import GPVAE
from latentgp.models.mmgpvae import MultimodalGPVAE
from latentgp.simulate import r_squared_affine
from latentgp.simulate_blob import simulate_blob_spikes

BW, TAUS = 0.02, (0.05, 0.1, 0.2)
N_TRAIN, N_TEST, N_BINS, N_NEURONS = 40, 10, 50, 50
RESTARTS = 3  # best-of-3 starts (restart_steps = steps / 10): the fit is seed-sensitive


def pixel_r2(pred, true):
    return 1 - float(((pred - true) ** 2).sum() / ((true - true.mean()) ** 2).sum())


def run_seed(seed: int, steps: int) -> dict:
    D = simulate_blob_spikes(N_TRAIN + N_TEST, N_BINS, N_NEURONS, TAUS, BW, seed=seed)
    tr, te = slice(0, N_TRAIN), slice(N_TRAIN, None)
    x, counts, images = D["latents"], D["counts"], D["images"]
    t0 = time.perf_counter()
    mm = MultimodalGPVAE(3, (0, 0), n_frequencies=30, bin_width=BW)
    mm.fit(counts[tr], images[tr], steps=steps, lr=0.01, batch_size=10, seed=seed, progress=False,
           restarts=RESTARTS, restart_steps=max(1, steps // 10), max_grad_norm=100.0)
    t_mm = time.perf_counter() - t0
    t0 = time.perf_counter()
    gpfa = GPFA(3, bin_width=BW).fit(counts[tr], steps=300, progress=False)
    t_gpfa = time.perf_counter() - t0
    return {
        "seed": seed,
        "R2 MM-GPVAE (spikes+images)": r_squared_affine(mm.latents(), x[tr]),
        "R2 MM-GPVAE (spikes only)": r_squared_affine(mm.latents(spikes=counts[tr]), x[tr]),
        "R2 GPFA": r_squared_affine(gpfa.latents(), x[tr]),
        "held-out R2 MM-GPVAE (spikes)": r_squared_affine(mm.latents(spikes=counts[te]), x[te]),
        "held-out R2 GPFA": r_squared_affine(gpfa.transform(counts[te]), x[te]),
        "held-out pixel R2 from spikes": pixel_r2(mm.predict_behaviour(counts[te], seed=0), images[te]),
        "fit s MM-GPVAE": t_mm,
        "s/epoch MM-GPVAE": t_mm / (steps * 10 / N_TRAIN),
        "fit s GPFA": t_gpfa,
    }


def plain_vae_loss(model: GPVAE, y):
    """Same encoder/decoder/likelihood with an i.i.d. N(0, 1) prior per step: the cost a GP prior adds to."""
    mean, prec = model._encode(y)
    v = 1 / (1 + prec)
    m = v * prec * mean
    kl = 0.5 * (v + m ** 2 - 1 - v.log()).sum((-1, -2))
    z = m + v.sqrt() * torch.randn_like(m)
    return -(model._log_density(y, model.net.decoder(z)).sum((-1, -2)) - kl).sum()


def step_costs(repeats: int, lengths) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    Y = rng.standard_normal((10, 100, 20))
    model = GPVAE(3).fit(Y, steps=0, progress=False)
    y = model._train

    def gp_step():
        model.net.zero_grad()
        (-model.elbo_terms(y)["elbo"].sum()).backward()

    def plain_step():
        model.net.zero_grad()
        plain_vae_loss(model, y).backward()

    times = time_interleaved({"gp": gp_step, "plain": plain_step}, repeats=repeats)
    rows.append({"what": "step, batch 10 x T=100, D=20, L=3", "GPVAE ms": 1e3 * median(times["gp"]),
                 "plain VAE ms": 1e3 * median(times["plain"]),
                 "GPVAE / plain": paired_ratio(times["gp"], times["plain"])})
    for T in lengths:
        Y = rng.standard_normal((4, T, 20))
        m = GPVAE(3).fit(Y, steps=0, progress=False)
        yy = m._train

        def step(m=m, yy=yy):
            m.net.zero_grad()
            (-m.elbo_terms(yy)["elbo"].sum()).backward()

        def plain(m=m, yy=yy):
            m.net.zero_grad()
            plain_vae_loss(m, yy).backward()

        t = time_interleaved({"gp": step, "plain": plain}, repeats=max(2, repeats // 2))
        rows.append({"what": f"step, batch 4 x T={T}", "GPVAE ms": 1e3 * median(t["gp"]),
                     "plain VAE ms": 1e3 * median(t["plain"]), "GPVAE / plain": paired_ratio(t["gp"], t["plain"])})
    return rows


def main(quick: bool = False) -> str:
    torch.set_num_threads(1)
    info = machine()
    seeds = [0, 1, 2]
    steps = 300 if quick else 3000
    rows = [run_seed(s, steps) for s in seeds]
    keys = [k for k in rows[0] if k != "seed"]
    summary = {"seed": "mean"} | {k: float(np.mean([r[k] for r in rows])) for k in keys}
    fmt = [{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows + [summary]]
    costs = step_costs(5 if quick else 11, [100, 1000] if quick else [100, 1000, 10000])
    fmt_costs = [{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()} for r in costs]
    out = (f"MM-GPVAE vs GPFA ({steps} Adam steps; {describe(info)})\n\n" + markdown_table(fmt)
           + "\n\nGPVAE step cost vs a plain VAE (same networks)\n\n" + markdown_table(fmt_costs))
    print(out)
    append_rows("gpvae" + ("_quick" if quick else ""), rows, info)
    append_rows("gpvae_cost" + ("_quick" if quick else ""), costs, info)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    main(ap.parse_args().quick)
