"""cvHM: latent trajectories from spike trains with Hida-Matérn state-space GPs and CVI.

Dowling, Zhao & Park (2023), "Linear time GPs for inferring latent trajectories from neural spike
trains". Latents x_l(t), l = 1..L, are independent GPs (unit prior variance, so the scale of the
loadings is identified); counts y_tn ~ Poisson(exp(C_n · x_t + d_n) · bin_width) (or Bernoulli /
Gaussian). Inference alternates a damped CVI step on Gaussian sites (one Kalman smoothing pass) with
a gradient step on the ELBO for the loadings C, biases d and the kernel hyperparameters, all on the
shared training loop. Cost is linear in the number of bins.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data import DEFAULT_DTYPE, check_int, check_positive
from ..fit import seeded, torch_threads, train
from ..io import register_model, saved_dtype
from ..kernels import HidaMatern, state_space_form
from ..likelihoods import get_likelihood
from ..variational.cvi import (
    Sites,
    elbo_terms,
    expected_log_prior,
    expected_loglik,
    joint_state_space,
    latent_blocks,
    site_targets,
)
from .base import Model


def _init_from_counts(counts: np.ndarray, n_latents: int, bin_width: float, smooth_bins: float = 4.0,
                      log_link: bool = True):
    """Loadings, biases, initial latents and timescales from the data (trap: a fixed initial
    lengthscale changes the answer a lot, so start from the data's own autocorrelation).
    ``log_link=False`` (Gaussian observations, which may be negative): work on the values themselves."""
    from scipy.ndimage import gaussian_filter1d

    N, T, D = counts.shape
    smooth = gaussian_filter1d(counts.astype(float), smooth_bins, axis=1)
    if log_link:
        rate = counts.mean((0, 1)) + 1e-3
        d = np.log(rate / bin_width)
        z = np.log(smooth + 0.5 * rate) - np.log(rate)
    else:
        d = counts.mean((0, 1))
        z = smooth - d
    flat = z.reshape(-1, D)
    flat = flat - flat.mean(0)
    _, s, vt = np.linalg.svd(flat, full_matrices=False)
    proj = flat @ vt[:n_latents].T
    sd = proj.std(0) + 1e-12
    C = vt[:n_latents] * sd[:, None]  # latents with unit variance
    latents = (proj / sd).reshape(N, T, n_latents)
    # timescale: lag where the autocorrelation falls below 1/e; frequency: periodogram peak.
    x = latents - latents.mean(1, keepdims=True)
    spec = (np.abs(np.fft.rfft(x, axis=1)) ** 2).mean(0)  # (F, L)
    acf = np.fft.irfft(np.abs(np.fft.rfft(x, n=2 * T, axis=1)) ** 2, axis=1)[:, :T].mean(0)
    acf = acf / acf[:1]
    lags = np.array([np.argmax(acf[:, l] < np.exp(-1)) or T // 4 for l in range(n_latents)])
    freqs = np.fft.rfftfreq(T, d=bin_width)
    peak = freqs[1:][np.argmax(spec[1:], axis=0)]
    return C, d, np.maximum(lags, 2) * bin_width, 2 * np.pi * peak


@register_model
class PoissonLatentGP(Model):
    """cvHM latent-trajectory model for spike counts (trials, bins, neurons).

    Parameters
    ----------
    n_latents : int
    kernel : gpytorch kernel with ``batch_shape == (n_latents,)`` and a state-space form
        Default ``HidaMatern(order=1, batch_shape=(n_latents,))`` -- Matérn-3/2 × cos(ω τ) per latent,
        lengthscale and ω learned. The kernel's variance is *not* learned (unit prior variance).
    bin_width : float
        Bin width in seconds: rates are exp(C x + d) spikes/s, times are bin centres.
    likelihood : "poisson" | "bernoulli" | "gaussian" or a :class:`latentgp.likelihoods.Likelihood`.
    """

    def __init__(self, n_latents: int, kernel=None, bin_width: float = 1.0, likelihood="poisson",
                 dtype=DEFAULT_DTYPE):
        self.n_latents = check_int(n_latents, "n_latents", 1)
        self.bin_width = check_positive(bin_width, "bin_width")
        self.likelihood = get_likelihood(likelihood, self.bin_width)
        self._default_kernel = kernel is None
        if kernel is None:
            kernel = HidaMatern(order=1, batch_shape=torch.Size([self.n_latents]))
        if tuple(kernel.batch_shape) != (self.n_latents,):
            raise ValueError(f"`kernel` must have batch_shape ({self.n_latents},) -- one kernel per latent; "
                             f"got {tuple(kernel.batch_shape)}.")
        state_space_form(kernel)  # TypeError naming an alternative if it has no state-space form
        self.kernel = kernel.to(dtype)
        self.dtype = dtype
        self.history = None
        self._train = None

    # ------------------------------------------------------------------ fitting
    def fit(self, counts, *, steps: int | None = None, lr: float | None = None, cvi_step: float = 0.5,
            warmup: int = 5, hyperparameters: str = "elbo", whittle_every: int = 10, method: str = "cvi",
            num_particles: int = 1, progress=None, tol: float | None = 1e-6, seed=None):
        """Fit by CVI (sites) + Adam on the ELBO (loadings, biases and, by default, kernel hyperparameters).

        ``method="cvi"`` (default: 30 steps, lr 0.05) is cvHM. ``method="svi"`` (default: 2,000 steps,
        lr 0.01) fits the same model by Pyro SVI instead, for comparison: whitened latents
        (:mod:`latentgp.variational.whitened`) with a mean-field Normal guide, ``num_particles`` samples
        per step, loadings/biases/kernel learned on the same ELBO. It needs many more steps, and its
        mean-field q understates posterior correlations; ``cvi_step``, ``warmup`` and the Whittle
        option do not apply to it.

        ``warmup`` CVI steps with everything else fixed come first; then every step is one damped CVI
        step (``cvi_step``) and one Adam step (``lr``). ``hyperparameters``: ``"elbo"`` (learned with
        the loadings), ``"whittle"`` (every ``whittle_every`` steps, maximise the aliased Whittle
        likelihood of the posterior's expected periodogram, :mod:`latentgp.whittle`) or ``"fixed"``.
        ``history`` records the negative ELBO per bin and the hyperparameters.
        """
        from ..neuro import check_counts

        y_np = check_counts(counts) if self.likelihood.name != "gaussian" else self._check_gaussian(counts)
        self.likelihood.check(y_np)
        N, T, D = y_np.shape
        if T < 4:
            raise ValueError(f"`counts` needs at least 4 bins per trial; got {T}.")
        if D < self.n_latents:
            raise ValueError(f"`counts` has {D} neurons, fewer than n_latents={self.n_latents}.")
        warmup = check_int(warmup, "warmup")
        if not 0 < cvi_step <= 1:
            raise ValueError(f"`cvi_step` must be in (0, 1]; got {cvi_step}.")
        if hyperparameters not in ("elbo", "whittle", "fixed"):
            raise ValueError(f"`hyperparameters` must be 'elbo', 'whittle' or 'fixed'; got {hyperparameters!r}.")
        if method not in ("cvi", "svi"):
            raise ValueError(f"`method` must be 'cvi' or 'svi'; got {method!r}.")
        if method == "svi" and hyperparameters == "whittle":
            raise ValueError("hyperparameters='whittle' is only available with method='cvi'.")
        num_particles = check_int(num_particles, "num_particles", 1)
        steps = check_int((30 if method == "cvi" else 2000) if steps is None else steps, "steps")
        lr = check_positive((0.05 if method == "cvi" else 0.01) if lr is None else lr, "lr")
        whittle_every = check_int(whittle_every, "whittle_every", 1)

        y = torch.as_tensor(y_np, dtype=self.dtype)
        C0, d0, lengthscales, omegas = _init_from_counts(y_np, self.n_latents, self.bin_width,
                                                         log_link=self.likelihood.name != "gaussian")
        with torch.no_grad():
            if self._default_kernel:
                self.kernel.lengthscale = torch.as_tensor(lengthscales, dtype=self.dtype).reshape(-1, 1, 1)
                self.kernel.omega = torch.as_tensor(np.maximum(omegas, 1e-3), dtype=self.dtype).reshape(-1, 1, 1)
        self.C = torch.nn.Parameter(torch.as_tensor(C0, dtype=self.dtype))
        self.d = torch.nn.Parameter(torch.as_tensor(d0, dtype=self.dtype))
        self._train = y
        self.sites = Sites.zeros((N,), T, self.n_latents, self.dtype)
        dt = torch.full((T,), self.bin_width, dtype=self.dtype)
        dt[0] = 0.0
        self._dt = dt
        self.method_ = method
        if method == "svi":
            return self._fit_svi(y, steps, lr, num_particles, hyperparameters == "elbo", progress, tol, seed)

        params = [self.C, self.d] + (list(self.kernel.parameters()) if hyperparameters == "elbo" else [])
        opt = torch.optim.Adam(params, lr=lr)
        count = [0]



        def step(update_params=True):
            # E-step quantities: one Kalman smoothing pass of the sites, no autograd through it.
            with torch.no_grad():
                A, Q, P0, H = joint_state_space(state_space_form(self.kernel), dt)
                elbo, m_f, V_f, sm = elbo_terms(A, Q, P0, H, self.sites, self.likelihood, y, self.C, self.d,
                                                return_smoother=True)
            if update_params:
                # Variational-EM gradient step with q held fixed: E_q[log p(y | C f + d)] for the
                # loadings, E_q[log p_θ(x)] for the kernel. Where the sites are optimal this is the
                # ELBO's total gradient (tests: Fisher identity), at a fraction of the cost of
                # back-propagating through the smoother.
                opt.zero_grad()
                objective = expected_loglik(self.likelihood, y, m_f, V_f, self.C, self.d)[0].sum()
                if hyperparameters == "elbo":
                    blocks = latent_blocks(sm, self.n_latents)
                    objective = objective + expected_log_prior(state_space_form(self.kernel), dt, *blocks)
                (-objective / (N * T)).backward()
                opt.step()
            with torch.no_grad():  # CVI on the sites at the q just computed
                _, g1, g2 = expected_loglik(self.likelihood, y, m_f, V_f, self.C, self.d)
                self.sites = self.sites.damped(*site_targets(g1, g2, m_f, self.C.detach()), cvi_step)
            count[0] += update_params
            if hyperparameters == "whittle" and update_params and count[0] % whittle_every == 0:
                self._whittle_update()
            return -elbo.item() / (N * T)

        with seeded(seed), torch_threads(1):
            train(lambda: step(False), steps=warmup, progress=progress, desc="cvHM warm-up")
            self.history = train(step, steps=steps, progress=progress, tol=tol, record=self._record, desc="cvHM")
        self._posterior()
        return self

    def _fit_svi(self, y, steps, lr, num_particles, learn_kernel, progress, tol, seed):
        import pyro
        import pyro.distributions as dist
        from pyro.infer.autoguide import AutoNormal

        from ..fit import run_svi
        from ..variational.whitened import whitened_latents, whitened_moments

        N, T, _ = y.shape
        S = state_space_form(self.kernel).state_dim * self.n_latents
        zeros = torch.zeros(N, T, S, dtype=self.dtype)
        learned = torch.nn.Module()  # what SVI's optimiser updates, registered in one pyro.module
        learned.C, learned.d = self.C, self.d
        if learn_kernel:
            learned.kernel = self.kernel

        def model():
            pyro.module("cvhm", learned)
            A, Q, P0, H = joint_state_space(state_space_form(self.kernel), self._dt)
            eps = pyro.sample("eps", dist.Normal(zeros, 1.0).to_event(3))
            f = whitened_latents(A, Q, P0, H, eps)
            loglik = self.likelihood.expected(y, f @ self.C + self.d, torch.zeros_like(y))[0]
            pyro.factor("y", loglik.sum())

        with seeded(seed), pyro.get_param_store().scope():
            guide = AutoNormal(model, init_scale=0.1)
            history = run_svi(model, guide, steps=steps, lr=lr, num_particles=num_particles, progress=progress,
                              tol=tol, record=self._record, desc="cvHM SVI")
            with torch.no_grad():
                loc, scale = guide.locs.eps, guide.scales.eps
                A, Q, P0, H = joint_state_space(state_space_form(self.kernel), self._dt)
                self._svi_q = (loc.detach().clone(), scale.detach().clone())
                self._m, self._V = whitened_moments(A, Q, P0, H, *self._svi_q)
                elbo = -pyro.infer.Trace_ELBO(num_particles=32, vectorize_particles=False).loss(model, guide)
        history["loss"] = history["loss"] / (N * T)  # per bin, as for CVI
        self.history = history
        self._elbo = float(elbo)
        self.sites = None
        return self

    def _whittle_update(self, iterations: int = 10, num_samples: int = 16):
        """Kernel hyperparameters from the aliased Whittle likelihood of E_q[periodogram].

        E_q[I] is averaged over posterior sample paths (Matheron's rule on the Kalman smoother), so it
        includes the posterior's *correlated* uncertainty: using |FFT(mean)|² alone, or adding
        |FFT(std)|², puts the uncertainty at the wrong frequencies and biases the lengthscales."""
        from ..fit import optimize
        from ..variational.cvi import sample_posterior_latents
        from ..whittle import periodogram, whittle_log_likelihood

        with torch.no_grad():
            A, Q, P0, H = joint_state_space(state_space_form(self.kernel), self._dt)
            f = sample_posterior_latents(A, Q, P0, H, self.sites, num_samples)  # (S, N, T, L)
            freqs, I = periodogram(f.transpose(-1, -2), self.bin_width)  # (S, N, L, J)
            expected = (freqs, I.mean(0))
        n_terms = expected[1].numel()
        # The latents' scale trades off against the loadings, so fit the spectrum's shape only.
        optimize(lambda: -whittle_log_likelihood(self.kernel, None, self.bin_width, expected_periodogram=expected,
                                                 profile_scale=True) / n_terms,
                 self.kernel.parameters(), method="lbfgs", steps=iterations, progress=False)

    @staticmethod
    def _check_gaussian(y):
        from ..data import _as_float_array

        arr = _as_float_array(y, "counts")
        return arr[None] if arr.ndim == 2 else arr

    def _record(self):
        out = {}
        for name, value in (("lengthscale", getattr(self.kernel, "lengthscale", None)),
                            ("omega", getattr(self.kernel, "omega", None))):
            if value is not None:
                for i, v in enumerate(value.detach().flatten().tolist()):
                    out[f"{name}_{i}"] = v
        return out

    def _posterior(self):
        if self.sites is None:  # an SVI fit: its moments were computed from the guide
            return
        with torch.no_grad():
            A, Q, P0, H = joint_state_space(state_space_form(self.kernel), self._dt)
            elbo, m_f, V_f = elbo_terms(A, Q, P0, H, self.sites, self.likelihood, self._train, self.C, self.d)
        self._elbo, self._m, self._V = elbo.item(), m_f, V_f

    # ------------------------------------------------------------------ results
    def latents(self) -> np.ndarray:
        """Posterior means of the latents, (trials, bins, n_latents)."""
        self._require_fitted("latents()")
        return self._m.numpy().copy()

    def latent_variance(self) -> np.ndarray:
        """Posterior marginal variances of the latents, (trials, bins, n_latents)."""
        self._require_fitted("latent_variance()")
        return self._V.diagonal(dim1=-2, dim2=-1).numpy().copy()

    def elbo(self) -> float:
        self._require_fitted("elbo()")
        return self._elbo

    def rates(self) -> np.ndarray:
        """Posterior expected firing rates E[exp(C x + d)] in spikes per unit time, (trials, bins, neurons)."""
        self._require_fitted("rates()")
        with torch.no_grad():
            mu = self._m @ self.C + self.d
            var = torch.einsum("ld,...lk,kd->...d", self.C, self._V, self.C)
            return torch.exp(mu + 0.5 * var).numpy()

    def sample_latents(self, num_samples: int = 100, seed=None) -> np.ndarray:
        """Joint posterior draws of the latent paths, (num_samples, trials, bins, n_latents): Matheron's
        rule on the Kalman smoother for a CVI fit, the whitened guide for an SVI fit."""
        from ..variational.cvi import sample_posterior_latents
        from ..variational.whitened import whitened_latents

        self._require_fitted("sample_latents()")
        num_samples = check_int(num_samples, "num_samples", 1)
        with seeded(seed), torch.no_grad():
            A, Q, P0, H = joint_state_space(state_space_form(self.kernel), self._dt)
            if self.sites is not None:
                return sample_posterior_latents(A, Q, P0, H, self.sites, num_samples).numpy()
            loc, scale = self._svi_q
            eps = loc + scale * torch.randn(num_samples, *loc.shape, dtype=loc.dtype)
            return whitened_latents(A, Q, P0, H, eps).numpy()

    def to_inference_data(self, num_samples: int = 50, seed=None):
        """ArviZ InferenceData: posterior ``latents`` (joint draws, :meth:`sample_latents`) with the fitted
        loadings ``C`` and biases ``d`` repeated, posterior_predictive and pointwise log_likelihood of
        ``counts`` under the model's likelihood, observed_data ``counts``. Dims: trial, bin, latent, neuron.
        (C, d and the kernel are point estimates; the draws are of the latents given them. Memory is
        num_samples x trials x bins x neurons x 8 bytes per group.)"""
        from ..convert import to_inference_data

        f = torch.as_tensor(self.sample_latents(num_samples, seed))
        with seeded(None if seed is None else seed + 1), torch.no_grad():
            eta = f @ self.C + self.d
            y_rep = self.likelihood.sample(eta)
            loglik = self.likelihood.log_prob(self._train, eta)
        S = f.shape[0]
        dims = {"latents": ["trial", "bin", "latent"], "C": ["latent", "neuron"], "d": ["neuron"],
                "counts": ["trial", "bin", "neuron"]}
        return to_inference_data(
            posterior={"latents": f.numpy()[None], "C": self.C.detach().expand(S, -1, -1).numpy()[None],
                       "d": self.d.detach().expand(S, -1).numpy()[None]},
            posterior_predictive={"counts": y_rep.numpy()[None]},
            log_likelihood={"counts": loglik.numpy()[None]},
            observed_data={"counts": self._train.numpy()},
            dims=dims,
            coords={"bin": self.bin_centers},
        )

    @property
    def bin_centers(self) -> np.ndarray:
        self._require_fitted("bin_centers")
        return (np.arange(self._train.shape[1]) + 0.5) * self.bin_width

    def to_frame(self, level: float = 0.95):
        """Tidy DataFrame: trial, bin, time, latent, mean, var, lower, upper."""
        from ..neuro import latents_frame

        return latents_frame(self.latents(), self.latent_variance(), bin_centers=self.bin_centers, level=level)

    # ------------------------------------------------------------------ save / load
    def _payload(self):
        state = {"kernel": self.kernel.state_dict(), "C": self.C.detach(), "d": self.d.detach()}
        if self.sites is not None:
            state.update(precision=self.sites.precision, shift=self.sites.shift)
        else:  # SVI: the guide's moments of the latents
            state.update(mean=self._m, cov=self._V, elbo=torch.tensor(self._elbo), svi_loc=self._svi_q[0],
                         svi_scale=self._svi_q[1])
        return {"config": {"n_latents": self.n_latents, "bin_width": self.bin_width,
                           "likelihood": self.likelihood.name, "default_kernel": self._default_kernel,
                           "method": getattr(self, "method_", "cvi")},
                "kernel": self.kernel, "state": state, "data": {"counts": self._train}}

    @classmethod
    def _from_payload(cls, payload, kernel):
        cfg = payload["config"]
        model = cls(cfg["n_latents"], kernel=kernel, bin_width=cfg["bin_width"], likelihood=cfg["likelihood"],
                    dtype=saved_dtype(payload))
        model._default_kernel = cfg["default_kernel"]
        model.method_ = cfg.get("method", "cvi")
        st = payload["state"]
        model.kernel.load_state_dict(st["kernel"])
        model.C, model.d = torch.nn.Parameter(st["C"]), torch.nn.Parameter(st["d"])
        model._train = payload["data"]["counts"]
        T = model._train.shape[1]
        model._dt = torch.full((T,), model.bin_width, dtype=model.dtype)
        model._dt[0] = 0.0
        if "precision" in st:
            model.sites = Sites(st["precision"], st["shift"])
            model._posterior()
        else:
            model.sites = None
            model._m, model._V, model._elbo = st["mean"], st["cov"], float(st["elbo"])
            model._svi_q = (st["svi_loc"], st["svi_scale"])
        return model
