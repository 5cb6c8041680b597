"""New-task predictions of MagmaClust / Magma (batched, padded) against dense Gaussian algebra in numpy:
q(mu_k) by conditioning on every training task tempered by tau_ik, the new task's evidence
log sum_k pi_k N(y*; mhat_k, Chat_k + Psi*) and its per-cluster conditionals, and the optimum of that
evidence over the task's own hyperparameters found by scipy."""
import numpy as np
import pandas as pd
import pytest
import scipy.optimize as so
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from latentgp.kernels import Matern
from latentgp.models.magma import Magma
from latentgp.models.magmaclust import MagmaClust
from latentgp.simulate_magma import simulate_magma

D = torch.float64



def _table(pred, key):
    return pd.DataFrame.from_dict(pred.attrs[key], orient="index")

def _softplus(x):
    return np.logaddexp(0.0, x)


def _se(a, b, scale, ell):
    return scale * np.exp(-0.5 * ((a[:, None] - b[None, :]) / ell) ** 2)


@pytest.fixture(scope="module")
def fitted():
    """Two overlapping clusters (tau not 0/1), new tasks with 5 and 8 observed points and their own targets
    (one beyond the training inputs)."""
    sim = simulate_magma(14, 9, 2, n_new=2, grid=np.linspace(0, 10, 61), intercepts=[-2.0, 2.0],
                         common_cluster_hp=False, seed=4)
    model = MagmaClust(2).fit(sim.train, steps=2, inner_steps=4, progress=False, seed=0)
    new = sim.new.sort_values(["ID", "Input"])
    first, second = new["ID"].unique()
    obs = pd.concat([new[new.ID == first].iloc[:5], new[new.ID == second].iloc[:8]]).reset_index(drop=True)
    # extra measurement noise (sd 0.3): the new tasks' noise variance is then identifiable, not at its floor
    obs["Output"] += np.random.default_rng(0).normal(0, 0.3, len(obs))
    target = new.merge(obs, how="left", indicator=True).query("_merge == 'left_only'").drop(columns="_merge")
    target = pd.concat([target, pd.DataFrame({"ID": [first], "Input": [10.7], "Output": [np.nan]})])
    return model, obs, target.reset_index(drop=True)


def _hyperposterior(model, A):
    """q(mu_k) at inputs A: mean (K, a), covariance (K, a, a) by dense tempered conditioning."""
    tasks, h = model._train[0], model.hyper
    m = tasks.mask.numpy()
    Xtr, ytr = tasks.X.numpy()[m], tasks.y.numpy()[m]
    task_of = np.repeat(np.arange(m.shape[0]), m.sum(1))
    allx = torch.as_tensor(np.concatenate([Xtr, A]), dtype=D)
    with torch.no_grad():
        C = np.broadcast_to(h.mean_kernel(allx).to_dense().numpy(), (model.n_clusters, len(allx), len(allx)))
        T = h.task_kernel(torch.as_tensor(Xtr, dtype=D)).to_dense().numpy()
        noise = float(h.noise)
    n, pm, tau = len(Xtr), model.prior_mean, model.tau_.numpy()
    block = np.where(task_of[:, None] == task_of[None, :], T, 0) + noise * np.eye(n)
    means, covs = [], []
    for k in range(model.n_clusters):
        S = C[k, :n, :n] + block / tau[task_of, k][:, None]
        B = C[k, n:, :n]
        means.append(pm + B @ np.linalg.solve(S, ytr - pm))
        covs.append(C[k, n:, n:] - B @ np.linalg.solve(S, B.T))
    return np.array(means), np.array(covs)


def _dense_task(model, t, y, s, hp, include_noise=False):
    """Evidence log sum_k pi_k N(y; mhat_k, Chat_k + Psi), cluster probabilities, mixture mean and
    variance at s, for a task with hyperparameters hp = (outputscale, lengthscale, noise)."""
    scale, ell, noise = hp
    A = np.concatenate([t, s])
    mh, Ch = _hyperposterior(model, A[:, None])
    Kt = _se(A, A, scale, ell)
    o = len(t)
    logp, cm, cv = [], [], []
    for k in range(model.n_clusters):
        Sig = Ch[k] + Kt
        Soo = Sig[:o, :o] + noise * np.eye(o)
        logp.append(np.log(model.pi_[k]) + multivariate_normal(mh[k, :o], Soo).logpdf(y))
        cm.append(mh[k, o:] + Sig[o:, :o] @ np.linalg.solve(Soo, y - mh[k, :o]))
        cv.append(np.diag(Sig[o:, o:] - Sig[o:, :o] @ np.linalg.solve(Soo, Sig[:o, o:])) + noise * include_noise)
    logp, cm, cv = np.array(logp), np.array(cm), np.array(cv)
    p = np.exp(logp - logsumexp(logp))
    mean = p @ cm
    return logsumexp(logp), p, mean, p @ (cv + cm**2) - mean**2


def _check_against_dense(model, obs, target, pred, hp_used, include_noise):
    for tid in obs["ID"].unique():
        o, s = obs[obs.ID == tid], target[target.ID == tid]
        _, p, mean, var = _dense_task(model, o.Input.to_numpy(), o.Output.to_numpy(), s.Input.to_numpy(),
                                      hp_used.loc[tid].to_numpy()[[0, 1, 2]], include_noise)
        got = pred[pred.ID == tid]
        np.testing.assert_allclose(got["Input"], s["Input"])  # each task's rows, in the order given
        np.testing.assert_allclose(got["mean"], mean, atol=1e-8, rtol=0)
        np.testing.assert_allclose(got["var"], var, atol=1e-8, rtol=0)
        np.testing.assert_allclose(_table(pred, "clusters").loc[tid], p, atol=1e-8, rtol=0)


def test_shared_hyperparameters_prediction_equals_dense_mixture(fitted):
    model, obs, target = fitted
    pred = model.predict(obs, target[["ID", "Input"]], include_noise=True)
    hp = _table(pred, "new_task_hp")
    h = model.hyper
    assert np.allclose(hp["noise"], float(h.noise.detach())) and np.allclose(
        hp["task_lengthscale"], float(h.task_kernel.base_kernel.lengthscale.detach()))
    probs = _table(pred, "clusters").to_numpy()
    assert probs.min() > 1e-6, probs  # both clusters matter: the mixture itself is checked
    _check_against_dense(model, obs, target, pred, hp, include_noise=True)


def test_fitted_new_task_hyperparameters_reach_the_dense_optimum(fitted):
    """The new-task fit (one L-BFGS run per task) reaches, per task, the optimum scipy finds on the dense
    evidence in the same parametrisation (lengthscale floor + softplus, noise floor + softplus), from
    the same start (the trained shared values)."""
    model, obs, target = fitted
    pred = model.predict(obs, target[["ID", "Input"]], new_task_hp="fit")
    hp = _table(pred, "new_task_hp")
    h = model.hyper
    ls_floor = float(h.task_kernel.base_kernel.raw_lengthscale_constraint.lower_bound)
    noise_floor = float(h.raw_noise_constraint.lower_bound)
    to_hp = lambda r: (_softplus(r[0]), ls_floor + _softplus(r[1]), noise_floor + _softplus(r[2]))  # noqa: E731
    raw = [h.task_kernel.raw_outputscale, h.task_kernel.base_kernel.raw_lengthscale, h.raw_noise]
    start = np.array([float(r.detach()) for r in raw])
    shared = np.array(to_hp(start))
    for tid in obs["ID"].unique():
        o = obs[obs.ID == tid]
        t, y = o.Input.to_numpy(), o.Output.to_numpy()
        objective = lambda r, t=t, y=y: -_dense_task(model, t, y, t[:0], to_hp(r))[0]  # noqa: E731
        best = so.minimize(objective, start, method="L-BFGS-B", options={"gtol": 1e-10, "ftol": 1e-14})
        ours = hp.loc[tid].to_numpy()
        # The evidence is flat in a noise variance near 0 (5 points, lengthscale ~1; the gradient in the raw
        # parameter is ~1e-5 of the noise's): both optimisers stop within ~1e-5 nats, the noise is compared
        # absolutely. A wrong objective moves the optimum by far more.
        assert -_dense_task(model, t, y, t[:0], ours)[0] <= best.fun + 1e-4, (tid, ours, to_hp(best.x))
        np.testing.assert_allclose(ours[:2], to_hp(best.x)[:2], rtol=2e-3)
        assert abs(ours[2] - to_hp(best.x)[2]) < 1e-3
        assert not np.allclose(ours, shared, rtol=1e-2)  # the fit moved away from the shared values
    _check_against_dense(model, obs, target, pred, hp, include_noise=False)


def test_magma_batched_prediction_of_several_tasks_at_shared_inputs():
    """Magma (K = 1), x_new without IDs: every task predicted at the same inputs, equal to predicting
    each task alone."""
    sim = simulate_magma(10, 8, 1, n_new=3, grid=np.linspace(0, 10, 41), seed=2)
    model = Magma().fit(sim.train, steps=2, inner_steps=3, progress=False)
    obs = sim.new.groupby("ID").head(4).reset_index(drop=True)
    obs = obs.drop(index=[0])  # tasks with 3, 4 and 4 points
    grid = pd.DataFrame({"Input": [1.0, 5.5, 9.0]})
    both = model.predict(obs, grid)
    assert list(both["ID"]) == list(np.repeat(obs["ID"].unique(), 3))
    for tid in obs["ID"].unique():
        alone = model.predict(obs[obs.ID == tid], grid)
        np.testing.assert_allclose(both[both.ID == tid]["mean"], alone["mean"], atol=1e-10, rtol=0)
        np.testing.assert_allclose(both[both.ID == tid]["var"], alone["var"], atol=1e-10, rtol=0)


def test_new_task_hp_option_is_checked(fitted):
    model, obs, target = fitted
    with pytest.raises(ValueError, match="new_task_hp"):
        model.predict(obs, target[["ID", "Input"]], new_task_hp="own")
    per_task = Magma(common_hp=False).fit(obs, steps=0, progress=False)
    with pytest.raises(ValueError, match="common_hp=True"):
        per_task.predict(obs, target[["ID", "Input"]], new_task_hp="shared")
    import gpytorch

    custom = Magma(task_kernel=gpytorch.kernels.ScaleKernel(Matern(nu=1.5))).fit(obs, steps=0, progress=False)
    with pytest.raises(ValueError, match="default task kernel"):
        custom.predict(obs, target[["ID", "Input"]], new_task_hp="fit")


def test_chunks_and_fitted_hyperparameters_do_not_depend_on_the_batch(monkeypatch):
    """Predicting new tasks together equals predicting each alone: in chunks of one (a tiny memory budget)
    and, with new_task_hp="fit", with each task's own L-BFGS run (a shared run once left a 5-point task's
    noise on its floor, 0.4 nats short of its optimum). Few points per task, several tasks."""
    from latentgp.models import new_tasks as nt

    sim = simulate_magma(14, 9, 2, n_new=6, grid=np.linspace(0, 10, 61), seed=4)
    model = MagmaClust(2).fit(sim.train, steps=2, inner_steps=4, progress=False, seed=0)
    new = sim.new.sort_values(["ID", "Input"])
    obs = new.groupby("ID").head(5).reset_index(drop=True)
    grid = pd.DataFrame({"Input": np.linspace(0, 12, 200)})
    for mode in ("shared", "fit"):
        together = model.predict(obs, grid, new_task_hp=mode)
        others = [pd.concat([model.predict(obs[obs.ID == tid], grid, new_task_hp=mode) for tid in obs.ID.unique()],
                            ignore_index=True)]
        if mode == "shared":  # ("fit" always runs one task per group, FIT_GROUP: the budget does not apply)
            with monkeypatch.context() as mp:
                mp.setattr(nt, "BUDGET", 1)  # chunk_size -> 1 task per batch
                others.append(model.predict(obs, grid, new_task_hp=mode))
        for other in others:
            np.testing.assert_allclose(other["mean"], together["mean"], atol=1e-8, rtol=0)
            np.testing.assert_allclose(other["var"], together["var"], atol=1e-8, rtol=0)
        assert len(together) == 6 * len(grid)


def test_mean_process_equals_dense_hyperposterior(fitted):
    """mean_process (variances only, never the grid's full covariance) against dense tempered conditioning."""
    model = fitted[0]
    grid = np.array([0.3, 2.5, 7.1, 10.7])
    out = model.mean_process(pd.DataFrame({"Input": grid}))
    mean, cov = _hyperposterior(model, grid[:, None])
    for k in range(model.n_clusters):
        got = out[out.cluster == k]
        np.testing.assert_allclose(got["mean"], mean[k], atol=1e-8, rtol=0)
        np.testing.assert_allclose(got["var"], np.diagonal(cov[k]), atol=1e-8, rtol=0)
