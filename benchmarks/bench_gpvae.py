"""MM-GPVAE vs GPFA on simulated spikes + a rendered moving blob; GP-VAE step cost vs a plain VAE and vs T.

Data per seed (``latentgp.simulate_blob.simulate_blob_spikes``): 3 shared squared-exponential GP latents
with timescales 50, 100, 200 ms, 50 trials x 50 bins of 20 ms, 50 Poisson neurons (log-linear readout,
15-40 Hz), and a 28 x 28 image per bin: a Gaussian blob whose centre follows latents 0/1 and whose width
follows latent 2. 40 trials train, 10 are held out.

* MM-GPVAE: ``MultimodalGPVAE(3, (0, 0), n_frequencies=30, bin_width=0.02)``, best of 3 restarts (300 steps
  each), gradient norm clipped at 100, Adam lr 0.01 (last fifth at ``final_lr`` 0.001), batch 10, 3000 minibatch
  steps (quick: 300), default encoders/decoder. Held-out latents also with ``refine=REFINE`` (sites refitted).
* GPFA: ``GPFA(3, bin_width=0.02).fit(counts, steps=300)`` on the same training spikes.

Reported per seed: latent R² after the best affine map (``r_squared_affine``) on the training trials (MM-GPVAE
from spikes + images, and from spikes alone; GPFA from spikes), on the held-out trials from spikes alone
(GPFA: ``transform``), pixel R² of the held-out images predicted from spikes alone, fit time and time per
epoch (one pass over the 40 training trials).

Cost rows: one training step (forward, backward, Adam update; same default encoder/decoder) of GPVAE (its
default compiled Kalman posterior; for T <= 128 also the dense posterior) against the same networks with an
i.i.d. N(0, I) prior (a plain VAE: q(z_t) = N(0, I) x site, closed-form KL per step), for T = 100 ... 10,000,
and the log-log slope of the GPVAE step time over T; time per epoch of ``GPVAE.fit`` against the plain VAE
trained through the same fit loop.
Co-smoothing: on the held-out trials the even neurons are held in, the odd ones scored (bits/spike against each
neuron's mean rate; ``latentgp.cosmoothing``); "true rates" scores the simulation's own rates (the ceiling).
Timings are on a shared 2-core machine under load from other jobs: noisy, compare ratios from the same run.

Run:  .venv/bin/python benchmarks/bench_gpvae.py [--quick] [--costs-only]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import append_rows, describe, machine, markdown_table, median, paired_ratio, time_interleaved

from latentgp.cosmoothing import co_smoothing, co_smoothing_score
from latentgp.models.gpfa import GPFA
from latentgp.models.gpvae import GPVAE
from latentgp.models.mmgpvae import MultimodalGPVAE
from latentgp.simulate import r_squared_affine
from latentgp.simulate_blob import simulate_blob_spikes

BW, TAUS = 0.02, (0.05, 0.1, 0.2)
N_TRAIN, N_TEST, N_BINS, N_NEURONS = 40, 10, 50, 50
RESTARTS = 3  # best-of-3 starts (restart_steps = steps / 10): the fit is seed-sensitive
REFINE = 50  # L-BFGS iterations fitting q's sites to held-out spikes after the encoder (latents(refine=...))
HELD_IN = np.arange(0, N_NEURONS, 2)  # co-smoothing: even neurons held in, odd ones scored
FIT = {"lr": 0.01, "batch_size": 10, "restarts": RESTARTS, "max_grad_norm": 100.0, "final_lr": 0.001}


def pixel_r2(pred, true):
    return 1 - float(((pred - true) ** 2).sum() / ((true - true.mean()) ** 2).sum())


def run_seed(seed: int, steps: int, **fit) -> dict:
    D = simulate_blob_spikes(N_TRAIN + N_TEST, N_BINS, N_NEURONS, TAUS, BW, seed=seed)
    tr, te = slice(0, N_TRAIN), slice(N_TRAIN, None)
    x, counts, images = D["latents"], D["counts"], D["images"]
    t0 = time.perf_counter()
    mm = MultimodalGPVAE(3, (0, 0), n_frequencies=30, bin_width=BW)
    mm.fit(counts[tr], images[tr], steps=steps, seed=seed, progress=False, restart_steps=max(1, steps // 10),
           **(FIT | fit))
    t_mm = time.perf_counter() - t0
    t0 = time.perf_counter()
    gpfa = GPFA(3, bin_width=BW).fit(counts[tr], steps=300, progress=False)
    t_gpfa = time.perf_counter() - t0
    out = np.setdiff1d(np.arange(N_NEURONS), HELD_IN)
    return {
        "seed": seed,
        "R2 MM-GPVAE (spikes+images)": r_squared_affine(mm.latents(), x[tr]),
        "R2 MM-GPVAE (spikes only)": r_squared_affine(mm.latents(spikes=counts[tr]), x[tr]),
        "R2 GPFA": r_squared_affine(gpfa.latents(), x[tr]),
        "held-out R2 MM-GPVAE (spikes)": r_squared_affine(mm.latents(spikes=counts[te]), x[te]),
        "held-out R2 GPFA": r_squared_affine(gpfa.transform(counts[te]), x[te]),
        "held-out R2 MM-GPVAE (spikes, refined)": r_squared_affine(mm.latents(spikes=counts[te], refine=REFINE),
                                                                  x[te]),
        "held-out pixel R2 from spikes": pixel_r2(mm.predict_behaviour(counts[te], seed=0), images[te]),
        "held-out pixel R2 from spikes (refined)": pixel_r2(mm.predict_behaviour(counts[te], seed=0, refine=REFINE),
                                                            images[te]),
        "co-smoothing bits/spike MM-GPVAE": co_smoothing(mm, counts[te], HELD_IN)["bits_per_spike"],
        "co-smoothing bits/spike GPFA": co_smoothing(gpfa, counts[te], HELD_IN)["bits_per_spike"],
        "co-smoothing bits/spike true rates": co_smoothing_score(counts[te][..., out], D["rates"][te][..., out],
                                                                 BW)["bits_per_spike"],
        "fit s MM-GPVAE": t_mm,
        "s/epoch MM-GPVAE": t_mm / (steps * 10 / N_TRAIN),
        "fit s GPFA": t_gpfa,
    }


def iid_posterior(mean, prec):
    """q(z_t) = N(0, 1) x site N(mean, 1/prec) per step and latent: its mean, variance and KL per sequence."""
    v = 1 / (1 + prec)
    m = v * prec * mean
    return m, v, 0.5 * (v + m ** 2 - 1 - v.log()).sum((-1, -2))


def plain_vae_loss(model: GPVAE, y):
    """Same encoder/decoder/likelihood with an i.i.d. N(0, 1) prior per step: the cost a GP prior adds to."""
    m, v, kl = iid_posterior(*model._encode(y))
    z = m + v.sqrt() * torch.randn_like(m)
    return -(model._log_density(y, model.net.decoder(z)).sum((-1, -2)) - kl).sum()


def _train_step(model: GPVAE, y, plain: bool = False, per_call: int = 1):
    """``per_call`` full training steps (zero_grad, forward, backward, Adam update) on the minibatch y."""
    opt = torch.optim.Adam(model.net.parameters(), lr=1e-5)

    def step():
        for _ in range(per_call):
            opt.zero_grad()
            (plain_vae_loss(model, y) if plain else -model.elbo_terms(y)["elbo"].sum()).backward()
            opt.step()
    return step


def step_costs(repeats: int, cases) -> list[dict]:
    """Per (batch, T): one GPVAE training step (default: compiled Kalman posterior) and one of the plain VAE with
    the same encoder/decoder, interleaved; for T <= 128 also GPVAE with the dense posterior (``dense_max=T``)."""
    rows = []
    rng = np.random.default_rng(0)
    for batch, T, *grid in cases:
        Y = rng.standard_normal((batch, T, 20))
        irregular = grid == ["irregular"]
        times = np.cumsum(rng.uniform(0.5, 1.5, T)) if irregular else None  # one (A, Q) per step
        model = GPVAE(3).fit(Y, times, steps=0, progress=False, seed=0)
        per_call = max(1, 2000 // (batch * T))  # short steps are timed in groups (timer resolution, jitter)
        fns = {"gp": _train_step(model, model._train, per_call=per_call),
               "plain": _train_step(model, model._train, plain=True, per_call=per_call)}
        if T <= 128 and not irregular:
            dense = GPVAE(3, dense_max=T).fit(Y, steps=0, progress=False, seed=0)
            fns["dense"] = _train_step(dense, dense._train, per_call=per_call)
        t = time_interleaved(fns, repeats=repeats if T <= 1000 else max(5, repeats // 2))
        what = f"step, batch {batch} x T={T}, D=20, L=3" + (", irregular times" if irregular else "")
        row = {"what": what, "GPVAE ms": 1e3 * median(t["gp"]) / per_call,
               "plain VAE ms": 1e3 * median(t["plain"]) / per_call, "GPVAE / plain": paired_ratio(t["gp"], t["plain"])}
        if "dense" in t:
            row["dense-q GPVAE / plain"] = paired_ratio(t["dense"], t["plain"])
        rows.append(row)
    return rows


def _fit_fns(Y, batch: int, steps: int):
    """(GPVAE fit, plain-VAE fit through the same loop) on Y (N, T, D) with ``steps`` minibatches of ``batch``.
    Both models are built (networks created) before timing; the GPVAE fit includes its final posterior pass."""
    from latentgp.fit import optimize
    from latentgp.models.vae_parts import minibatches

    N, T = Y.shape[:2]
    gp_model = GPVAE(3).fit(Y, steps=0, progress=False, seed=0)
    plain_model = GPVAE(3).fit(Y, steps=0, progress=False, seed=0)  # the same default networks

    def gp():
        gp_model.fit(Y, steps=steps, batch_size=batch, progress=False, seed=0)

    def plain():
        y, batches = plain_model._train, minibatches(N, batch)

        def loss():
            idx = next(batches)
            return plain_vae_loss(plain_model, y[idx]) / (len(idx) * T)
        optimize(loss, list(plain_model.net.parameters()), method="adam", steps=steps, lr=0.01, progress=False)
    return gp, plain


def epoch_costs(rounds: int, cases, epochs: int = 10) -> list[dict]:
    """Per (sequences N, T, batch): wall time per epoch of ``GPVAE.fit`` (``epochs`` passes, history and the
    final posterior included) and of the same networks trained as a plain VAE through the same loop
    (``latentgp.fit.optimize``, Adam, same minibatch sizes), interleaved over ``rounds``."""
    rows = []
    rng = np.random.default_rng(1)
    for N, T, batch in cases:
        gp, plain = _fit_fns(rng.standard_normal((N, T, 20)), batch, epochs * (N // batch))
        t = time_interleaved({"gp": gp, "plain": plain}, repeats=rounds, warmup=0)
        rows.append({"what": f"epoch, {N} sequences x T={T}, batch {batch}, D=20, L=3",
                     "GPVAE ms/epoch": 1e3 * median(t["gp"]) / epochs,
                     "plain VAE ms/epoch": 1e3 * median(t["plain"]) / epochs,
                     "GPVAE / plain": paired_ratio(t["gp"], t["plain"])})
    return rows


def plain_mm_loss(model: MultimodalGPVAE, spikes, behaviour):
    """MM-GPVAE's encoders, readout and decoder with an i.i.d. N(0, 1) prior per bin instead of the Fourier GP."""
    m, v, kl = iid_posterior(*model._sites(spikes, behaviour))
    mu, var = model._spike_rate_moments(m, v)
    spk = model.likelihood.expected(spikes, mu, var)[0].sum((-1, -2))
    z = (m + v.sqrt() * torch.randn_like(m)).unsqueeze(0)
    beh = model._behaviour_log_density(behaviour, z).sum((-1, -2)).mean(0)
    return -(spk + beh - kl).sum()


def mm_step_costs(repeats: int, batches=(10, 40)) -> list[dict]:
    """One MM-GPVAE training step (forward, backward, Adam update) on the benchmark's data shape (50 bins,
    50 neurons, 28 x 28 frames, n_frequencies 30) against the plain-VAE twin, interleaved."""
    D = simulate_blob_spikes(N_TRAIN, N_BINS, N_NEURONS, TAUS, BW, seed=0)
    mm = MultimodalGPVAE(3, (0, 0), n_frequencies=30, bin_width=BW)
    mm.fit(D["counts"], D["images"], steps=0, progress=False, seed=0)
    y, b = mm._train
    opt = torch.optim.Adam(mm.net.parameters(), lr=1e-4)
    rows = []
    for batch in batches:
        idx = torch.arange(batch)

        def step(plain, idx=idx):
            def run():
                opt.zero_grad()
                loss = plain_mm_loss(mm, y[idx], b[idx]) if plain else -mm.elbo_terms(y[idx], b[idx])["elbo"].sum()
                loss.backward()
                opt.step()
            return run
        t = time_interleaved({"gp": step(False), "plain": step(True)}, repeats=repeats)
        rows.append({"what": f"MM-GPVAE step, batch {batch} x T={N_BINS}, 50 neurons + 784 pixels",
                     "MM-GPVAE ms": 1e3 * median(t["gp"]), "plain VAE ms": 1e3 * median(t["plain"]),
                     "MM-GPVAE / plain": paired_ratio(t["gp"], t["plain"])})
    return rows


def slope(rows, key: str) -> float:
    """Log-log slope of ``key`` against T over the batch-4 rows (1 = linear)."""
    pts = [(int(r["what"].split("T=")[1].split(",")[0]), r[key]) for r in rows
           if "batch 4 x" in r["what"] and "irregular" not in r["what"]]
    T, ms = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(T, ms, 1)[0])


def cost_tables(quick: bool = False) -> tuple[str, list[dict]]:
    """The GPVAE / MM-GPVAE cost tables (markdown) and their rows."""
    fmt = lambda rows: [{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]  # noqa: E731
    cases = [(10, 100), (40, 100), (4, 100), (4, 1000), (4, 1000, "irregular")] + (
        [] if quick else [(4, 300), (4, 3000), (4, 10000)])
    costs = step_costs(5 if quick else 11, cases)
    epochs = epoch_costs(3, [(40, 100, 10), (16, 1000, 4)] if quick else [(40, 100, 10), (40, 100, 40),
                                                                           (16, 1000, 4)])
    costs_mm = mm_step_costs(5 if quick else 11)
    out = ("GPVAE training step vs a plain VAE (same networks, Adam update included)\n\n" + markdown_table(fmt(costs))
           + f"\n\nlog-log slope of the GPVAE step time over T (batch 4): {slope(costs, 'GPVAE ms'):.2f}"
           + "\n\nGPVAE time per epoch vs a plain VAE (same networks and fit loop)\n\n" + markdown_table(fmt(epochs))
           + "\n\nMM-GPVAE step cost vs a plain VAE (same networks)\n\n" + markdown_table(fmt(costs_mm)))
    return out, costs + epochs + costs_mm


def main(quick: bool = False) -> str:
    torch.set_num_threads(1)
    info = machine()
    seeds = range(3) if quick else range(5)
    steps = 300 if quick else 3000
    rows = [run_seed(s, steps) for s in seeds]
    keys = [k for k in rows[0] if k != "seed"]
    summary = {"seed": "mean"} | {k: float(np.mean([r[k] for r in rows])) for k in keys}
    fmt = [{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows + [summary]]
    tables, cost_rows = cost_tables(quick)
    out = f"MM-GPVAE vs GPFA ({steps} Adam steps; {describe(info)})\n\n" + markdown_table(fmt) + "\n\n" + tables
    print(out)
    append_rows("gpvae" + ("_quick" if quick else ""), rows, info)
    append_rows("gpvae_cost" + ("_quick" if quick else ""), cost_rows, info)
    return out


def main_costs(quick: bool = False) -> str:
    torch.set_num_threads(1)
    info = machine()
    out, rows = cost_tables(quick)
    print(f"GP-VAE costs ({describe(info)})\n\n" + out)
    append_rows("gpvae_cost" + ("_quick" if quick else ""), rows, info)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--costs-only", action="store_true", help="only the GPVAE / MM-GPVAE cost tables")
    args = ap.parse_args()
    main_costs(args.quick) if args.costs_only else main(args.quick)
