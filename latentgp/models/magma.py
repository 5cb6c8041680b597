"""Magma: multi-task GP with a shared mean process (Leroy et al.), long-format data.

Task i: y_i = mu_0(t_i) + f_i(t_i) + eps, mu_0 ~ GP(m_0, C_theta0), f_i ~ GP(0, K_theta_i).
EM: the E-step is the Gaussian posterior of mu_0 on the union of all tasks' inputs; the M-step fits
theta_0 and the task hyperparameters (common to all tasks, or one set per task) with the shared loop
:func:`latentgp.fit.optimize`. The M-step maximises the collapsed bound (see
:mod:`latentgp.models.mean_process`), which for Magma is the exact log marginal likelihood and never
inverts C_theta0. :class:`MagmaClust` is the same machinery with K cluster mean processes.
"""
from __future__ import annotations

import copy

import gpytorch
import numpy as np
import pandas as pd
import torch
from scipy.special import xlogy

from ..data import DEFAULT_DTYPE, as_new_inputs, check_int, check_level
from ..fit import optimize, seeded, torch_threads, train
from ..io import kernel_from_spec, kernel_spec, register_model, saved_dtype
from . import mean_process as mp
from . import new_tasks as nt
from .base import Model, prediction_frame


def default_kernel(batch: int | None = None, min_lengthscale: float = 0.0):
    """Squared exponential with an output scale (MagmaClustR's "SE"), optionally one per batch item,
    with lengthscales kept above ``min_lengthscale``."""
    shape = torch.Size([] if batch is None else [batch])
    constraint = gpytorch.constraints.GreaterThan(float(min_lengthscale)) if min_lengthscale > 0 else None
    base = gpytorch.kernels.RBFKernel(batch_shape=shape, lengthscale_constraint=constraint)
    return gpytorch.kernels.ScaleKernel(base, batch_shape=shape)


def lengthscale_floor(union: torch.Tensor) -> float:
    """Half the median distance from an input to its nearest distinct neighbour (over the union of all
    tasks' inputs): with shorter lengthscales typical neighbours are nearly uncorrelated (< e^-2), the
    kernel matrix is almost diagonal whatever the lengthscale, so the data cannot tell them apart.

    A guard, not the fix of a measured failure: on ChickWeight (all chicks weighed on the same days) the
    M-step once left the mean-process lengthscale at ~1e-9 (predictions between weighing days fell
    back to the prior mean). The noise floor in ``Magma._build`` alone restores the smooth fit there
    (lengthscale 6.6 days); on 20 of the chicks the same failure showed its mechanism (noise 1e-73, a
    numerically singular Psi, loss -1.3e10). This floor only keeps lengthscales where the data say
    something about them.
    """
    from scipy.spatial import cKDTree

    pts = union.detach().cpu().numpy()
    if len(pts) < 2:
        return 0.0
    dist, _ = cKDTree(pts).query(pts, k=2)
    return 0.5 * float(np.median(dist[:, 1]))


class _Hyper(gpytorch.Module):
    """Mean-process kernel(s), task kernel(s) and noise(s): everything the M-step optimises."""

    def __init__(self, mean_kernel, task_kernel, n_noise: int | None, min_noise: float = 0.0):
        super().__init__()
        self.mean_kernel = mean_kernel
        self.task_kernel = task_kernel
        shape = () if n_noise is None else (n_noise,)
        self.register_parameter("raw_noise", torch.nn.Parameter(torch.zeros(shape)))
        self.register_constraint("raw_noise", gpytorch.constraints.GreaterThan(float(min_noise)))

    @property
    def noise(self):
        return self.raw_noise_constraint.transform(self.raw_noise)


@register_model
class Magma(Model):
    """Shared-mean-process multi-task GP.

    Parameters
    ----------
    kernel : gpytorch Kernel, optional
        Covariance of the mean process (default ``ScaleKernel(RBFKernel())``, initialised from the data).
    task_kernel : gpytorch Kernel, optional
        Covariance of each task's deviation f_i (default the same family). With ``common_hp=False``
        only the default is allowed (one batched copy per task).
    common_hp : bool
        One set of task hyperparameters (kernel + noise) for all tasks (default) or one per task.
    prior_mean : float, optional
        Constant prior mean m_0 of the mean process (default: the mean of the training outputs).

    Cost: each objective evaluation is O(M n^3 + K N^3) for M tasks of at most n points and N distinct
    inputs over all tasks. Tasks sharing a grid keep N small (201 in the authors' protocol: ~25 ms);
    with continuous, all-distinct inputs N is the number of observations (1500 distinct inputs: ~1.2 s
    per evaluation) -- round the inputs onto a grid first (e.g. ``df["Input"].round(2)``).
    """

    _n_clusters = 1
    _common_cluster_hp = True  # one mean process

    def __init__(self, kernel=None, task_kernel=None, common_hp: bool = True, prior_mean: float | None = None,
                 dtype=DEFAULT_DTYPE):
        for name, k in (("kernel", kernel), ("task_kernel", task_kernel)):
            if k is not None and not isinstance(k, gpytorch.kernels.Kernel):
                raise TypeError(f"`{name}` must be a gpytorch Kernel; got {type(k).__name__}.")
        if not isinstance(common_hp, bool):
            raise TypeError(f"`common_hp` must be True or False; got {common_hp!r}.")
        if task_kernel is not None and not common_hp:
            raise ValueError("`task_kernel` with common_hp=False is not supported: per-task hyperparameters use "
                             "the default kernel (one batched copy per task); pass task_kernel=None.")
        self.kernel, self.task_kernel, self.common_hp = kernel, task_kernel, common_hp
        self.prior_mean = None if prior_mean is None else float(prior_mean)
        self.dtype = dtype
        self.hyper = None
        self.history = None
        self._train = None
        self.tau_ = None
        self.pi_ = None

    # ------------------------------------------------------------------ data
    def _read(self, df, id, x, y):
        ids, X, out, cols = mp.read_long(df, id, x, y, name="df")
        return mp.pad_tasks(ids, X, out, cols, self.dtype)

    def _build(self, tasks: mp.Tasks):
        """Create hyperparameters with data-driven starting values (only at the first fit)."""
        K, M = self._n_clusters, len(tasks.ids)
        y = tasks.y[tasks.mask]
        span = (tasks.union.max(0).values - tasks.union.min(0).values).clamp_min(1e-6)
        # Copies: the user's kernel object stays a template (select_n_clusters fits several models from it).
        self._min_lengthscale = lengthscale_floor(tasks.union)
        floor = self._min_lengthscale
        mean_k = (copy.deepcopy(self.kernel) if self.kernel is not None
                  else default_kernel(None if K == 1 or self._common_cluster_hp else K, floor))
        task_k = (copy.deepcopy(self.task_kernel) if self.task_kernel is not None
                  else default_kernel(None if self.common_hp else M, floor))
        # Noise floor 1e-6 var(y): with SE task kernels on a shared grid, noise -> 0 makes Psi_i singular
        # to machine precision and its Cholesky returns a meaningless, huge "likelihood" (seen on 20
        # ChickWeight chicks: noise 1e-73, loss -1.3e10). The floor is a noise sd of 0.1% of the data's.
        hyper = _Hyper(mean_k, task_k, None if self.common_hp else M, 1e-6 * float(y.var())).to(self.dtype)
        start = max(float(span.mean()) / 5, 2 * floor)  # never at or below the floor (few distinct inputs)
        with torch.no_grad():
            if self.kernel is None:
                mean_k.outputscale = y.var()
                mean_k.base_kernel.lengthscale = start
            if self.task_kernel is None:
                task_k.outputscale = 0.1 * y.var()
                task_k.base_kernel.lengthscale = start
            hyper.raw_noise.fill_(float(hyper.raw_noise_constraint.inverse_transform(0.05 * y.var())))
        self.hyper = hyper
        if self.prior_mean is None:
            self.prior_mean = float(y.mean())

    def _pm(self):
        return torch.full((self._n_clusters,), self.prior_mean, dtype=self.dtype)

    # ------------------------------------------------------------------ objective pieces
    def _terms(self, tasks, weights):
        """Psi, Lambda, r, data terms and q(mu) at the current hyperparameters (differentiable)."""
        h = self.hyper
        Psi = mp.task_covariance(h.task_kernel, h.noise, tasks.X, tasks.mask)
        Lam, r, data, _, Pinv = mp.data_terms(Psi, tasks, self._pm(), weights)
        C = h.mean_kernel(tasks.union).to_dense().expand(self._n_clusters, *Lam.shape[-2:])
        post = mp.mean_posterior(C, Lam, r)
        return Psi, Pinv, post, mp.collapsed_bound(data, r, post)

    def _elbo(self, bound, weights):
        """sum_k F_k + E[log p(z)] + H[q(z)] (the last two vanish for Magma)."""
        tau = weights.detach().numpy()
        extra = float((tau * np.log(np.clip(self.pi_, 1e-300, None))).sum() - xlogy(tau, tau).sum())
        return float(bound.sum()) + extra

    def _init_weights(self, tasks, seed):
        return torch.ones(len(tasks.ids), 1, dtype=self.dtype)

    def _update_weights(self, tasks, post, Psi, Pinv):
        """E-step for the cluster labels (nothing to do for Magma)."""

    def _m_step(self, tasks, inner_steps, lr):
        tau = self.tau_
        n = tasks.n_obs
        optimize(lambda: -self._terms(tasks, tau)[3].sum() / n, self.hyper.parameters(), method="lbfgs",
                 steps=inner_steps, lr=lr, progress=False, tol=1e-9)

    def _record(self):
        h = self.hyper
        row = {"noise": float(h.noise.detach().mean())}
        for name, k in (("mean", h.mean_kernel), ("task", h.task_kernel)):
            if hasattr(k, "outputscale"):
                row[f"{name}_outputscale"] = float(k.outputscale.detach().mean())
                base = getattr(k, "base_kernel", None)
                if base is not None and getattr(base, "lengthscale", None) is not None:
                    row[f"{name}_lengthscale"] = float(base.lengthscale.detach().mean())
        return row

    # ------------------------------------------------------------------ fitting
    def fit(self, df, id: str = "ID", x="Input", y: str = "Output", *, steps: int = 10, inner_steps: int = 20,
            lr: float | None = None, progress: bool | None = None, tol: float = 1e-4, seed: int | None = None):
        """Fit by EM on long-format data (one row per observation: ``id``, input column(s) ``x``, ``y``).

        ``steps`` EM iterations, each an M-step of ``inner_steps`` L-BFGS iterations then an E-step;
        ``steps=0`` only computes the E-step at the current hyperparameters. ``history`` holds the
        negative ELBO per observation (for Magma: minus the log marginal likelihood per observation); EM
        stops early when it changes by less than ``tol`` (relative) in two consecutive iterations. The
        default 1e-4 is ten times tighter than MagmaClustR's ``cv_threshold = 1e-3``; past it the ELBO
        creeps up by well under a nat over the authors' 1500-point simulation, at ~3x the cost.
        Tasks may have different numbers of points and different inputs. Duplicate (ID, input) rows,
        NaN, missing columns and tasks with a single point raise ``ValueError``.
        """
        steps, inner_steps = check_int(steps, "steps"), check_int(inner_steps, "inner_steps", 1)
        tasks = self._read(df, id, x, y)
        if self._train is not None and tasks.X.shape[-1] != self._train[0].X.shape[-1]:
            raise ValueError("`x` names a different number of input columns than the data this model was fitted on.")
        if not self.common_hp and self.hyper is not None and len(tasks.ids) != len(self._train[0].ids):
            raise ValueError("`df`: per-task hyperparameters (common_hp=False) cannot be refitted on a different "
                             "number of tasks; create a new model.")
        if self.hyper is None:
            self._build(tasks)
        self._train = (tasks, {"id": id, "x": list(tasks.columns), "y": y})
        with seeded(seed):
            self.tau_ = self._init_weights(tasks, seed)
        self.pi_ = self.tau_.mean(0).numpy()

        def em_step():
            self._m_step(tasks, inner_steps, lr)
            with torch.no_grad():
                Psi, Pinv, post, _ = self._terms(tasks, self.tau_)
                self._update_weights(tasks, post, Psi, Pinv)
                return -self._elbo(self._terms(tasks, self.tau_)[3], self.tau_) / tasks.n_obs

        # Many small batched factorisations: on a shared 2-core machine intra-op threads were measured
        # 40x slower than one thread (tutorial select_n_clusters: 20 s vs 0.5 s).
        with torch_threads(1):
            self.history = train(em_step, steps=steps, progress=progress, tol=tol, patience=2, record=self._record,
                                 desc=type(self).__name__)
            if steps == 0:  # the promised E-step at the current hyperparameters
                with torch.no_grad():
                    Psi, Pinv, post, _ = self._terms(tasks, self.tau_)
                    self._update_weights(tasks, post, Psi, Pinv)
            self._condition()
        return self

    def _condition(self):
        tasks = self._train[0]
        with torch.no_grad():
            Psi, Pinv, post, bound = self._terms(tasks, self.tau_)
            self._post = post
            self.elbo_ = self._elbo(bound, self.tau_)

    # ------------------------------------------------------------------ results
    def elbo(self) -> float:
        """The variational lower bound at the fitted state (for Magma: the exact log marginal likelihood)."""
        self._require_fitted("elbo()")
        return self.elbo_

    def n_parameters(self) -> int:
        """Free hyperparameters plus mixture weights (used by the variational BIC)."""
        self._require_fitted("n_parameters()")
        return sum(p.numel() for p in self.hyper.parameters()) + self._n_clusters - 1

    def mean_process(self, x_new, level: float = 0.95) -> pd.DataFrame:
        """Posterior of the mean process(es) at ``x_new``: input columns (+ ``cluster``) + mean, var, lower, upper."""
        self._require_fitted("mean_process()")
        S = self._new_inputs(x_new, "x_new")
        with torch.no_grad():
            h, U = self.hyper, self._train[0].union
            K = self._n_clusters
            # the same q(mu_k) blocks as a new task's forecast, with no observed points: only the variances
            # at x_new are formed (a long plotting grid never builds its len(x_new)^2 covariance)
            mean, V = nt.mean_at(self._post, h.mean_kernel, U, self._pm(), S.unsqueeze(0), 0)
            mean, var = mean[0], V.ss[0].expand(K, S.shape[0])
        frames = [prediction_frame(S, self._train[0].columns, mean[k], var[k], level) for k in range(K)]
        if K == 1:
            return frames[0]
        return pd.concat([f.assign(cluster=k) for k, f in enumerate(frames)], ignore_index=True)

    def _new_inputs(self, x_new, name):
        return as_new_inputs(x_new, self._train[0].columns, name, dtype=self.dtype).values

    # ------------------------------------------------------------------ prediction
    def predict(self, df_new, x_new, level: float = 0.95, include_noise: bool = False, *,
                new_task_hp: str | None = None, new_task_steps: int = 200):
        """Predict new task(s) at ``x_new`` from their observations ``df_new`` (long format, same column
        names as in ``fit``; the ID column is optional — without it all rows are one task).

        ``x_new``: inputs shared by every new task, or a DataFrame with the ID column (each task is
        predicted at its own rows). Returns a DataFrame: [ID], input columns, mean, var, lower, upper
        (latent curve mu + f_*; add the noise with ``include_noise=True``). For MagmaClust the prediction
        is the mixture over clusters weighted by the task's posterior cluster probabilities
        tau*_k ∝ pi_k N(y*; mhat_k, Chat_k + Psi*) (mean and variance of the mixture; the interval is the
        normal one with those moments) and the probabilities are in ``attrs["clusters"]`` ({task: {"prob_k": p}};
        ``pd.DataFrame.from_dict(pred.attrs["clusters"], orient="index")`` makes it a table).

        ``new_task_hp``: the new task's own kernel and noise. ``"shared"`` uses the trained ones (only with
        ``common_hp=True``); ``"fit"`` fits them to the task's own points, maximising its evidence
        log sum_k pi_k N(y*; mhat_k, Chat_k + Psi*) given the trained mean processes, from the trained values
        (or their average over training tasks): at most ``new_task_steps`` L-BFGS iterations, one run per
        new task (so a task's answer does not depend on the tasks predicted with it). Default:
        ``"shared"`` with ``common_hp=True``, ``"fit"`` otherwise -- as the authors' MagmaClustR
        (``pred_magmaclust`` / ``train_gp_clust``) and their simulation study (common hyperparameters,
        "Hoo"). ``"fit"`` needs the default task kernel. The values used are in ``attrs["new_task_hp"]``
        (NaN where a custom kernel has no such parameter). With ``"shared"`` new tasks are computed in batches
        (padded to a common length; only the blocks the forecast needs, never the targets x targets covariance,
        in chunks sized to bound memory); with ``"fit"`` one task at a time.
        """
        self._require_fitted("predict()")
        check_level(level)
        mode = self._new_task_mode(new_task_hp)
        steps = check_int(new_task_steps, "new_task_steps")
        names = self._train[1]
        if not isinstance(df_new, pd.DataFrame):
            raise TypeError(f"`df_new` must be a pandas DataFrame (long format); got {type(df_new).__name__}.")
        id_col = names["id"] if names["id"] in df_new.columns else None
        ids, X, y, _ = mp.read_long(df_new, id_col, names["x"], names["y"], name="df_new", min_points=1)
        labels = pd.unique(ids)
        codes = pd.Index(labels).get_indexer(ids)
        # x_new with the ID column: each task is predicted at its own rows; otherwise all at x_new.
        per_task = id_col is not None and isinstance(x_new, pd.DataFrame) and id_col in x_new.columns
        if per_task:
            missing = set(pd.unique(x_new[id_col])) - set(labels)
            if missing:
                raise ValueError(f"`x_new` has IDs without observations in `df_new`: {sorted(missing)[:5]}.")
            S = self._new_inputs(x_new, "x_new").numpy()
            scodes = pd.Index(labels).get_indexer(x_new[id_col].to_numpy())
        else:
            S = np.tile(self._new_inputs(x_new, "x_new").numpy(), (len(labels), 1))
            scodes = np.repeat(np.arange(len(labels)), len(S) // len(labels))
        tasks, slot = self._pad_new(codes, X, y, scodes, S, len(labels))
        with torch_threads(1):
            g = tasks.G.shape[1]
            size = nt.FIT_GROUP if mode == "fit" else nt.chunk_size(self._n_clusters, len(self._train[0].union),
                                                                     g, tasks.n)
            parts = [self._predict_batch(tasks[i:i + size], include_noise, mode, steps)
                     for i in range(0, len(labels), size)]
        probs, mean, var, hp = (torch.cat(t) for t in zip(*parts, strict=True))
        order = np.argsort(scodes, kind="stable")  # tasks in order of first appearance, rows as given
        rows, sl = scodes[order], slot[order]
        at = (torch.as_tensor(rows), torch.as_tensor(sl))
        out = prediction_frame(torch.as_tensor(S[order]), self._train[0].columns, mean[at], var[at], level)
        if id_col is not None:
            out.insert(0, id_col, labels[rows])
        # plain {task: {column: value}} dicts, not DataFrames: pd.concat compares the frames' attrs with ==,
        # which raises for DataFrame values (read them back with pd.DataFrame.from_dict(..., orient="index"))
        out.attrs["clusters"] = {task: dict(zip([f"prob_{k}" for k in range(self._n_clusters)], row, strict=True))
                                 for task, row in zip(labels.tolist(), probs.tolist(), strict=True)}
        out.attrs["new_task_hp"] = {task: dict(zip(["task_outputscale", "task_lengthscale", "noise"], row, strict=True))
                                    for task, row in zip(labels.tolist(), hp.tolist(), strict=True)}
        return out

    def _new_task_mode(self, new_task_hp):
        if new_task_hp is None:
            return "shared" if self.common_hp else "fit"
        if new_task_hp not in ("shared", "fit"):
            raise ValueError(f"`new_task_hp` must be None, 'shared' or 'fit'; got {new_task_hp!r}.")
        if new_task_hp == "shared" and not self.common_hp:
            raise ValueError("`new_task_hp='shared'` needs common_hp=True: with per-task hyperparameters there "
                             "are none to share; use 'fit'.")
        if new_task_hp == "fit" and self.task_kernel is not None:
            raise ValueError("`new_task_hp='fit'` needs the default task kernel (one batched copy per new task); "
                             "with a custom task_kernel use 'shared'.")
        return new_task_hp

    def _pad_new(self, codes, X, y, scodes, S, M):
        """Padded new tasks and the padded slot of each target row; padding inputs repeat the task's
        first observed input (finite, harmless)."""
        first = X[np.unique(codes, return_index=True)[1]]
        Xp, obs, _ = nt.pad_rows(codes, M, X, first)
        yp, _, _ = nt.pad_rows(codes, M, y, np.zeros(M))
        Sp, _, slot = nt.pad_rows(scodes, M, S, first)
        t = lambda a: torch.as_tensor(a, dtype=self.dtype)  # noqa: E731
        tasks = nt.NewTasks(t(np.concatenate([Xp, Sp], 1)), t(yp), torch.as_tensor(obs))  # padding y is 0
        return tasks, slot

    def _predict_batch(self, tasks: nt.NewTasks, include_noise, mode, steps):
        """Cluster probabilities (M, K), mixture mean and variance at the padded targets (M, s) and the
        task hyperparameters used (M, 3)."""
        h = self.hyper
        log_pi = torch.as_tensor(np.log(np.clip(self.pi_, 1e-300, None)), dtype=self.dtype)
        with torch.no_grad():  # q(mu_k) at the tasks' inputs does not depend on their hyperparameters
            mean, V = nt.mean_at(self._post, h.mean_kernel, self._train[0].union, self._pm(), tasks.G, tasks.n)
        kernel, noise = self._new_task_hyper(tasks, mean, V, log_pi, mode, steps)
        with torch.no_grad():
            logpost, cmean, cvar = nt.evidence(tasks, mean, V, nt.kernel_blocks(kernel, tasks.G, tasks.n), noise,
                                               log_pi)
            if include_noise:
                cvar = cvar + torch.as_tensor(noise, dtype=self.dtype).reshape(-1, 1, 1)
            return (*nt.mixture(logpost, cmean, cvar), nt.hyper_table(kernel, noise, tasks.G.shape[0]))

    def _new_task_hyper(self, tasks, mean, V, log_pi, mode, steps):
        """Task kernel and noise of the new tasks: the shared ones, or one batched set fitted per task."""
        h = self.hyper
        if mode == "shared":
            return h.task_kernel, h.noise.detach()
        M = tasks.G.shape[0]
        # the floor the training task kernels were fitted with (0 in files saved before floors existed)
        bound = getattr(getattr(h.task_kernel.base_kernel, "raw_lengthscale_constraint", None), "lower_bound", None)
        k = default_kernel(M, self._min_lengthscale if bound is None else float(bound)).to(self.dtype)
        with torch.no_grad():  # start: the shared values, or the training tasks' average (raw scale)
            for p, q in zip(k.parameters(), h.task_kernel.parameters(), strict=True):
                p.copy_((q if self.common_hp else q.mean(0)).expand_as(p))
        raw_noise = torch.nn.Parameter(h.raw_noise.detach().mean().expand(M).clone())
        noise = lambda: h.raw_noise_constraint.transform(raw_noise)  # noqa: E731
        if steps > 0:
            n_obs, V_obs = tasks.obs.sum(), nt.Blocks(V.oo, None, None)

            def loss():  # one task per run (nt.FIT_GROUP): its own step lengths and curvature
                logpost, _, _ = nt.evidence(tasks, mean, V_obs, nt.kernel_blocks(k, tasks.G, tasks.n, False), noise(),
                                            log_pi)
                return -torch.logsumexp(logpost, -1).sum() / n_obs

            optimize(loss, list(k.parameters()) + [raw_noise], steps=steps, progress=False, tol=1e-9)
        return k, noise().detach()

    # ------------------------------------------------------------------ plotting
    def plot_prediction(self, pred: pd.DataFrame, observed: pd.DataFrame | None = None, *, ax=None,
                        label: str | None = None, color=None):
        """Plot a 1-D prediction frame (mean and interval band) and optionally the observed points."""
        import matplotlib.pyplot as plt

        ax = plt.gca() if ax is None else ax
        names = self._train[1]
        x = names["x"][0]
        order = np.argsort(pred[x].to_numpy())
        p = pred.iloc[order]
        line, = ax.plot(p[x], p["mean"], color=color, label=label or type(self).__name__)
        ax.fill_between(p[x], p["lower"], p["upper"], color=line.get_color(), alpha=0.2)
        if observed is not None:
            ax.plot(observed[x], observed[names["y"]], "o", color="k", ms=4)
        ax.set_xlabel(x)
        ax.set_ylabel(names["y"])
        return ax

    # ------------------------------------------------------------------ save / load
    def _config(self):
        return {"common_hp": self.common_hp, "prior_mean": self.prior_mean,
                "default_kernel": self.kernel is None, "default_task_kernel": self.task_kernel is None}

    def _payload(self):
        tasks, names = self._train
        m = tasks.mask
        ids = np.repeat(np.arange(len(tasks.ids)), m.sum(1).numpy())
        return {
            "config": {**self._config(), "names": names,
                       "ids": [i.item() if hasattr(i, "item") else i for i in tasks.ids]},
            "kernel": self.hyper.mean_kernel,
            "task_kernel": kernel_spec(self.hyper.task_kernel),
            "state": self.hyper.state_dict(),
            "data": {"code": torch.as_tensor(ids), "X": tasks.X[m], "y": tasks.y[m], "tau": self.tau_},
        }

    @classmethod
    def _make(cls, cfg, kernel, task_kernel, dtype):
        return cls(kernel=kernel, task_kernel=task_kernel, common_hp=cfg["common_hp"], prior_mean=cfg["prior_mean"],
                   dtype=dtype)

    @classmethod
    def _from_payload(cls, payload, kernel):
        cfg, data = payload["config"], payload["data"]
        task_kernel = kernel_from_spec(payload["task_kernel"])
        model = cls._make(cfg, None if cfg["default_kernel"] else kernel,
                          None if cfg["default_task_kernel"] else task_kernel, saved_dtype(payload))
        labels = np.asarray(cfg["ids"], dtype=object)[data["code"].numpy()]
        names = cfg["names"]
        tasks = mp.pad_tasks(labels, data["X"].numpy(), data["y"].numpy(), tuple(names["x"]), model.dtype)
        tasks.ids = list(cfg["ids"])
        model._build(tasks)
        model.hyper.load_state_dict(payload["state"])
        model._train = (tasks, names)
        model.tau_ = data["tau"]
        model.pi_ = model.tau_.mean(0).numpy()
        model._condition()
        return model
