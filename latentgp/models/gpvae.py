"""GP-VAE: a sequence VAE whose latent trajectories have a GP prior over time.

Model, per sequence n: z_l(·) ~ GP(0, k_l) independently for l = 1..L (unit variance; the decoder
carries the scale), y_nt ~ p(y | decoder(z_n(t))) with a Gaussian (learned per-feature variance),
Poisson (log rate) or Bernoulli (logit) likelihood.

Amortised posterior: an encoder maps the sequence to Gaussian sites N(ỹ_ntl; z_l(t), 1/λ_ntl), and
q(z_n) = p(z_n) Π t / Z — a Gauss-Markov posterior with the prior's temporal correlations, computed by
one O(T) Kalman smoothing pass per latent (:mod:`latentgp.variational.amortised`). In training the pass and
its gradient run compiled (:mod:`latentgp.linalg.kalman_sites`: numba filter + RTS smoother and their
hand-written reverse pass); the differentiable parallel scans of :mod:`latentgp.linalg.kalman` are the
fallback, and sequences of at most ``dense_max`` steps can use exactly the same q with dense T x T matrices
(:mod:`latentgp.variational.amortised_dense`, the test twin). Then

    ELBO = Σ_n E_q[log p(y_n | z_n)] - KL(q_n ‖ p),   KL = E_q[Σ log t] - log Z   (closed form),

the expected log-likelihood by reparameterised Matheron draws from q. Encoder, decoder and kernel
hyperparameters are trained jointly on minibatches of sequences, either with torch Adam through
``fit.optimize`` (``method="adam"``) or through Pyro SVI (``method="svi"``): :meth:`GPVAE.pyro_model` /
:meth:`GPVAE.pyro_guide` with a subsampled ``pyro.plate`` over sequences and the same exact KL, registered
for the prior / posterior distribution pair (:mod:`latentgp.variational.amortised_pyro`).
"""
from __future__ import annotations

import contextlib
import itertools

import gpytorch
import numpy as np
import pandas as pd
import torch
from torch import nn

from ..data import DEFAULT_DTYPE, check_int, check_level, check_positive
from ..fit import optimize, run_svi, seeded, torch_threads
from ..io import register_model, saved_dtype
from ..kernels import Matern, state_space_form
from ..variational.amortised import (
    gp_prior,
    markov_prior,
    posterior_and_samples,
)
from .base import Model
from .vae_parts import (
    SiteEncoder,
    check_sequences,
    check_times,
    gaussian_noise_params,
    load_with_networks,
    mean_function,
    minibatches,
    mlp_decoder,
    observation_log_density,
    require_networks,
    resolve_likelihood,
)


def gpvae_elbo(prior, encoder_out, y, decode, log_density, num_samples: int = 1, generator=None):
    """ELBO terms per sequence for sites ``encoder_out`` = (mean, precision) (B, T, L) and data y (B, T, D).

    ``prior``: from :func:`~latentgp.variational.amortised.gp_prior` (dense or state space; same numbers).
    ``decode``: z (S, B, T, L) -> η; ``log_density(y, η)`` elementwise. Returns dict with ``loglik`` (B,)
    (Monte-Carlo average over ``num_samples`` draws from q), ``kl`` (B,) (exact) and ``elbo`` (B,)."""
    post, z = posterior_and_samples(prior, *encoder_out, num_samples, generator)
    loglik = log_density(y, decode(z)).sum((-1, -2)).mean(0)
    return {"loglik": loglik, "kl": post.kl, "elbo": loglik - post.kl, "posterior": post}


def _same_key(a, b) -> bool:
    """(batch, times, kernel parameter values) keys of :meth:`GPVAE._pyro_prior`: equal values, same grid object."""
    return (a[0] == b[0] and a[1] is b[1] and len(a[2]) == len(b[2])
            and all(torch.equal(x, y) for x, y in zip(a[2], b[2], strict=True)))


_PYRO_NAMES = itertools.count()  # one pyro.module name per instance: the param store is keyed by name


@register_model
class GPVAE(Model):
    """GP-VAE for many sequences of equal length (sequences, time, features).

    Parameters
    ----------
    latent_dim : int
    kernel : gpytorch kernel with batch_shape (latent_dim,) and a state-space form
        Default ``Matern(nu=1.5, batch_shape=(latent_dim,))``, lengthscale initialised to a tenth of the
        sequence duration and learned. Its variance should be 1 (the decoder sets the scale).
    encoder : nn.Module, optional
        Maps y (B, T, D) to ``(mean, precision)`` of the sites, each (B, T, latent_dim), precision > 0.
        Default :class:`~latentgp.models.vae_parts.SiteEncoder` (1-D convolution, ``hidden``, ``context``).
    decoder : nn.Module, optional
        Maps z (..., T, latent_dim) to natural parameters (..., T, D). Default: a per-step MLP.
    likelihood : "gaussian" | "poisson" | "bernoulli"
    min_noise : float
        Gaussian likelihood only: floor on each feature's noise variance, relative to its data variance
        (keeps the likelihood bounded on noiseless data).
    dense_max : int
        Training on sequences of at most this many steps computes q and its KL with dense T x T matrices
        (one Cholesky per sequence and latent; not when a minibatch's T x T temporaries would exceed 128 MiB),
        longer ones with the O(T) Kalman smoother. Both are exact. Default 0 = always Kalman: its compiled
        pass is 3-4x faster per training step than the dense one at T = 100 (BENCHMARKS.md), and O(T).
    """

    def __init__(self, latent_dim: int, kernel=None, encoder=None, decoder=None, likelihood="gaussian", *,
                 hidden: int = 64, context: int = 2, bin_width: float = 1.0, min_noise: float = 1e-3,
                 dense_max: int = 0, dtype=DEFAULT_DTYPE):
        self.latent_dim = check_int(latent_dim, "latent_dim", 1)
        self.likelihood = resolve_likelihood(likelihood, check_positive(bin_width, "bin_width"))
        for name, net in (("encoder", encoder), ("decoder", decoder)):
            if net is not None and not isinstance(net, nn.Module):
                raise TypeError(f"`{name}` must be a torch.nn.Module; got {type(net).__name__}.")
        self._default_kernel = kernel is None
        if kernel is None:
            kernel = Matern(nu=1.5, batch_shape=torch.Size([self.latent_dim]))
        if not isinstance(kernel, gpytorch.kernels.Kernel):
            raise TypeError(f"`kernel` must be a gpytorch Kernel; got {type(kernel).__name__}.")
        if tuple(kernel.batch_shape) != (self.latent_dim,):
            raise ValueError(f"`kernel` must have batch_shape ({self.latent_dim},), one kernel per latent; got "
                             f"{tuple(kernel.batch_shape)}.")
        state_space_form(kernel)  # TypeError naming the alternatives if there is no state-space form
        self.config = {"latent_dim": self.latent_dim, "likelihood": self.likelihood.name, "hidden": int(hidden),
                       "context": int(context), "bin_width": float(bin_width),
                       "min_noise": float(check_positive(min_noise, "min_noise")),
                       "dense_max": check_int(dense_max, "dense_max"),
                       "custom_encoder": encoder is not None, "custom_decoder": decoder is not None}
        self.dtype = dtype
        self.net = nn.Module()
        self.net.kernel = kernel.to(dtype)
        self.net.encoder = None if encoder is None else encoder.to(dtype)
        self.net.decoder = None if decoder is None else decoder.to(dtype)
        self.history = None
        self._train = None
        self._pyro_net = None  # during fit(method="svi"): the modules SVI trains (without the kernel if fixed)
        self._pyro_name = f"gpvae{next(_PYRO_NAMES)}"
        self._prior_stash = None  # (key, prior) from the last pyro_guide call, for the pyro_model call after it

    # ------------------------------------------------------------------ building blocks
    def _build(self, n_features: int, Y: torch.Tensor, times: torch.Tensor):
        cfg = self.config
        if self.net.encoder is None:
            self.net.encoder = SiteEncoder(n_features, self.latent_dim, cfg["hidden"], cfg["context"]).to(self.dtype)
        if self.net.decoder is None:
            self.net.decoder = mlp_decoder(self.latent_dim, n_features, cfg["hidden"]).to(self.dtype)
        if self.likelihood.name == "gaussian":
            self.net.log_noise, floor = gaussian_noise_params(Y, n_features, cfg["min_noise"], self.dtype)
            self.net.register_buffer("noise_floor", floor)
        if self._default_kernel and Y is not None:
            with torch.no_grad():
                self.net.kernel.lengthscale = torch.full_like(self.net.kernel.lengthscale,
                                                              0.1 * float(times[-1] - times[0]))

    def _log_density(self, y, eta):
        return observation_log_density(self.likelihood, y, eta, getattr(self.net, "log_noise", None),
                                       getattr(self.net, "noise_floor", None))

    def _encode(self, Y):
        out = self.net.encoder(Y)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError("The encoder must return a (mean, precision) pair, each (B, T, latent_dim).")
        mean, prec = out
        if mean.shape != Y.shape[:-1] + (self.latent_dim,) or prec.shape != mean.shape:
            raise ValueError(f"The encoder returned shapes {tuple(mean.shape)}, {tuple(prec.shape)}; expected "
                             f"{tuple(Y.shape[:-1]) + (self.latent_dim,)} for both.")
        return mean, prec

    def elbo_terms(self, Y, num_samples: int = 1, generator=None, prior=None):
        """ELBO terms per sequence (dict of tensors, see :func:`gpvae_elbo`) at the current parameters."""
        if prior is None:
            prior = gp_prior(self.net.kernel, self._times, self.config["dense_max"], len(Y))
        return gpvae_elbo(prior, self._encode(Y), Y, self.net.decoder, self._log_density, num_samples, generator)

    # ------------------------------------------------------------------ fitting
    def fit(self, Y, times=None, *, steps: int = 500, lr: float = 0.01, batch_size: int | None = None,
            num_samples: int = 1, learn_kernel: bool = True, method: str = "adam", progress=None,
            tol: float | None = None, seed=None):
        """Train encoder, decoder (and kernel) on Y (sequences, time, features) by maximising the ELBO.

        ``batch_size`` sequences per step (default all); ``num_samples``: for "adam", draws from one q per
        step; for "svi", Pyro particles, i.e. ``num_samples`` independent minibatches, encoder and decoder
        passes per step (``num_samples`` times the cost; the expected objective is the same).
        ``method``: "adam" (torch Adam on the ELBO) or "svi" (Pyro SVI with ``TraceMeanField_ELBO`` on
        :meth:`pyro_model` / :meth:`pyro_guide`, the same objective and the same exact KL; the Pyro param
        store is scoped to the fit). The loss in ``history`` is -ELBO per observed time step
        (sequences x time): of the minibatch for "adam", of the data set (minibatch scaled by N/batch) for "svi"."""
        if method not in ("adam", "svi"):
            raise ValueError(f"`method` must be 'adam' or 'svi'; got {method!r}.")
        arr = check_sequences(Y, "Y", self.likelihood)
        t = check_times(times, arr.shape[1], self.dtype)
        steps = check_int(steps, "steps")
        num_samples = check_int(num_samples, "num_samples", 1)
        lr = check_positive(lr, "lr")
        if batch_size is not None:
            batch_size = check_int(batch_size, "batch_size", 1)
        y = torch.as_tensor(arr, dtype=self.dtype)
        N, T, D = y.shape
        if batch_size is not None and batch_size >= N:  # a batch of every sequence is the full batch
            batch_size = None
        if self._train is not None and D != self._train.shape[2]:  # a refit with a different feature count
            if self.config["custom_encoder"] or self.config["custom_decoder"]:
                raise ValueError(f"`Y` has {D} features but the user-supplied encoder/decoder were built for "
                                 f"{self._train.shape[2]}; pass networks for the new width to a new GPVAE.")
            self.net.encoder = self.net.decoder = None  # default networks are rebuilt for the new width
        self._train, self._times = y, t
        with seeded(seed):
            self._build(D, y, t)
            if method == "svi":
                with torch_threads(1):
                    self.history = self._fit_svi(steps, lr, batch_size, num_samples, learn_kernel, progress, tol)
                self._posterior()
                return self
            params = [p for name, p in self.net.named_parameters() if learn_kernel or not name.startswith("kernel")]
            batches = minibatches(N, batch_size)

            def loss():
                idx = next(batches)
                terms = self.elbo_terms(y[idx], num_samples)
                return -terms["elbo"].sum() / (len(idx) * T)

            with torch_threads(1):
                self.history = optimize(loss, params, method="adam", steps=steps, lr=lr, progress=progress, tol=tol,
                                        record=self._record, desc="GPVAE") if steps else None
        self._posterior()
        return self

    def _fit_svi(self, steps, lr, batch_size, num_samples, learn_kernel, progress, tol):
        """Pyro SVI on pyro_model/pyro_guide; ``learn_kernel=False`` keeps the kernel out of the param store."""
        import pyro

        learned = nn.Module()  # what SVI's optimiser sees, registered as one pyro.module
        for name, child in self.net.named_children():
            if learn_kernel or name != "kernel":
                learned.add_module(name, child)
        if "log_noise" in self.net._parameters:
            learned.log_noise = self.net.log_noise
        self._pyro_net = learned
        N, T = self._train.shape[:2]
        try:
            with pyro.get_param_store().scope():
                elbo = pyro.infer.TraceMeanField_ELBO(num_particles=num_samples, max_plate_nesting=1)
                history = run_svi(self.pyro_model, self.pyro_guide, None, batch_size, steps=steps, lr=lr,
                                  elbo=elbo, progress=progress, tol=tol, record=self._record,
                                  desc="GPVAE SVI") if steps else None
        finally:
            self._pyro_net = None
        if history is not None:
            history["loss"] = history["loss"] / (N * T)  # per observed time step, as for method="adam"
        return history

    # ------------------------------------------------------------------ Pyro model / guide
    def _pyro_data(self, Y):
        if Y is None or Y is self._train:
            self._require_fitted("pyro_model()/pyro_guide() without data")
            return self._train
        return self._new(Y)

    @contextlib.contextmanager
    def _pyro_sequences(self, Y, batch_size, guide: bool):
        """Register the networks and open the (subsampled) plate over sequences: yields (y_batch, prior)."""
        import pyro

        y = self._pyro_data(Y)
        pyro.module(self._pyro_name, self.net if self._pyro_net is None else self._pyro_net)
        with pyro.plate("sequences", len(y), subsample_size=batch_size) as idx:
            yield y[idx], self._pyro_prior(len(idx), guide)

    def _pyro_prior(self, batch: int, guide: bool):
        """The GP prior on the grid. SVI runs the guide, then the model at the same parameters: the guide's prior
        is handed to the model once (valid while the kernel's parameters are unmodified) instead of rebuilt."""
        key = (batch, self._times, [p.detach().clone() for p in self.net.kernel.parameters()])
        stash, self._prior_stash = self._prior_stash, None
        if not guide and stash is not None and _same_key(stash[0], key):
            return stash[1]
        prior = gp_prior(self.net.kernel, self._times, self.config["dense_max"], batch)
        if guide:
            self._prior_stash = (key, prior)
        return prior

    def pyro_model(self, Y=None, batch_size: int | None = None):
        """Pyro model: z_n ~ GP prior (site "z", event (T, latent_dim)) and log p(y_n | z_n) (factor "y") in a
        plate over sequences subsampled to ``batch_size`` (terms scaled by N / batch_size). ``Y`` defaults to
        the training data; the networks must exist (after ``fit``; ``steps=0`` is enough). With
        ``pyro.infer.TraceMeanField_ELBO`` the KL to :meth:`pyro_guide` is exact (registered closed form)."""
        import pyro

        from ..variational.amortised_pyro import GPPathPrior

        with self._pyro_sequences(Y, batch_size, guide=False) as (y, prior):
            z = pyro.sample("z", GPPathPrior(prior, len(y)))
            pyro.factor("y", self._log_density(y, self.net.decoder(z)).sum((-1, -2)))

    def pyro_guide(self, Y=None, batch_size: int | None = None):
        """Pyro guide: z_n ~ q(z_n) = GP prior × encoder sites / Z, the amortised posterior."""
        import pyro

        from ..variational.amortised_pyro import AmortisedGPPosterior

        with self._pyro_sequences(Y, batch_size, guide=True) as (y, prior):
            pyro.sample("z", AmortisedGPPosterior(prior, *self._encode(y)))

    def _record(self):
        ls = self.net.kernel.lengthscale.detach().flatten().tolist()
        return {f"lengthscale_{i}": v for i, v in enumerate(ls)}

    def _posterior(self):
        with torch.no_grad():
            self._post = self._infer(self._train)

    def _infer(self, y):
        prior = markov_prior(self.net.kernel, self._times)
        return posterior_and_samples(prior, *self._encode(y), 0)[0]  # compiled pass (the scans if it cannot run)

    def _new(self, Y):
        """Validated new sequences (same length and features as the training data) as a tensor."""
        self._require_fitted("this method")
        if Y is None:
            return self._train
        arr = check_sequences(Y, "Y", self.likelihood, self._train.shape[2])
        if arr.shape[1] != self._train.shape[1]:
            raise ValueError(f"`Y` has {arr.shape[1]} time steps; the model's time grid has {self._train.shape[1]}.")
        return torch.as_tensor(arr, dtype=self.dtype)

    # ------------------------------------------------------------------ results
    def latents(self, Y=None) -> np.ndarray:
        """Posterior means (sequences, time, latent_dim); of the training data, or of new sequences ``Y``."""
        self._require_fitted("latents()")
        post = self._post if Y is None else self._infer_nograd(self._new(Y))
        return post.mean.numpy().copy()

    def latent_variance(self, Y=None) -> np.ndarray:
        """Posterior marginal variances (sequences, time, latent_dim)."""
        self._require_fitted("latent_variance()")
        post = self._post if Y is None else self._infer_nograd(self._new(Y))
        return post.var.numpy().copy()

    @property
    def times_(self) -> np.ndarray:
        """The time grid (T,) shared by all sequences."""
        self._require_fitted("times_")
        return self._times.numpy().copy()

    def _infer_nograd(self, y):
        with torch.no_grad():
            return self._infer(y)

    def sample_latents(self, num_samples: int = 100, Y=None, seed=None) -> np.ndarray:
        """Joint posterior draws of the latent paths, (num_samples, sequences, time, latent_dim)."""
        y = self._new(Y)
        num_samples = check_int(num_samples, "num_samples", 1)
        with torch.no_grad(), seeded(seed):
            prior = markov_prior(self.net.kernel, self._times)
            return posterior_and_samples(prior, *self._encode(y), num_samples)[1].numpy()

    def elbo(self, Y=None, num_samples: int = 64, seed=None) -> float:
        """ELBO (nats, summed over sequences) with ``num_samples`` draws for the likelihood term."""
        y = self._new(Y)
        with torch.no_grad(), seeded(seed):
            return float(self.elbo_terms(y, num_samples)["elbo"].sum())

    def reconstruct(self, Y=None, num_samples: int = 64, seed=None) -> np.ndarray:
        """Posterior-predictive mean E_q[E(y | z)] (sequences, time, features) of ``Y`` (default: training data)."""
        return self._predictive(Y, num_samples, seed).mean(0).numpy()

    def _predictive(self, Y, num_samples, seed):
        draws = self.sample_latents(num_samples, Y, seed)
        with torch.no_grad():
            return mean_function(self.likelihood, self.net.decoder(torch.as_tensor(draws)))

    def predict(self, Y=None, level: float = 0.95, num_samples: int = 64, seed=None) -> pd.DataFrame:
        """Long DataFrame (sequence, time, feature, mean, var, lower, upper) of the reconstructed observation
        mean E(y | z) under q: Monte-Carlo mean, variance and central ``level`` quantiles over draws."""
        level = check_level(level)
        mu = self._predictive(Y, num_samples, seed)  # (S, N, T, D)
        S, N, T, D = mu.shape
        q = torch.quantile(mu, torch.tensor([0.5 - level / 2, 0.5 + level / 2], dtype=mu.dtype), dim=0)
        idx = np.indices((N, T, D)).reshape(3, -1)
        return pd.DataFrame({"sequence": idx[0], "time": self._times.numpy()[idx[1]], "feature": idx[2],
                             "mean": mu.mean(0).flatten().numpy(), "var": mu.var(0, unbiased=False).flatten().numpy(),
                             "lower": q[0].flatten().numpy(), "upper": q[1].flatten().numpy()})

    def to_inference_data(self, num_samples: int = 100, seed=None):
        """ArviZ InferenceData: posterior latent draws (one chain), posterior-predictive observation means,
        pointwise log-likelihood at those draws, observed data."""
        from ..convert import to_inference_data

        self._require_fitted("to_inference_data()")
        z = torch.as_tensor(self.sample_latents(num_samples, seed=seed))
        with torch.no_grad():
            eta = self.net.decoder(z)
            loglik = self._log_density(self._train, eta).sum(-1)
        dims = {"z": ["sequence", "time", "latent"], "y": ["sequence", "time", "feature"],
                "y_mean": ["sequence", "time", "feature"], "y_ll": ["sequence", "time"]}
        return to_inference_data({"z": z.numpy()[None]}, {"y_mean": mean_function(self.likelihood, eta).numpy()[None]},
                                 {"y_ll": loglik.numpy()[None]}, {"y": self._train.numpy()}, dims=dims)

    def plot_latents(self, sequence: int = 0, ax=None, level: float = 0.95):
        """Posterior mean latent trajectories of one training sequence with ``level`` bands."""
        import matplotlib.pyplot as plt
        from scipy.stats import norm

        self._require_fitted("plot_latents()")
        ax = plt.gca() if ax is None else ax
        t = self._times.numpy()
        m, v = self._post.mean[sequence].numpy(), self._post.var[sequence].numpy()
        half = norm.ppf(0.5 + check_level(level) / 2) * np.sqrt(v)
        for l in range(self.latent_dim):
            (line,) = ax.plot(t, m[:, l], label=f"z{l}")
            ax.fill_between(t, m[:, l] - half[:, l], m[:, l] + half[:, l], color=line.get_color(), alpha=0.2)
        ax.set_xlabel("time")
        ax.legend(loc="upper right")
        return ax

    # ------------------------------------------------------------------ save / load
    def _payload(self):
        self._require_fitted("save()")
        state = {k: v for k, v in self.net.state_dict().items() if not k.startswith("kernel.")}
        return {"config": dict(self.config), "kernel": self.net.kernel, "state": state,
                "kernel_state": self.net.kernel.state_dict(),
                "data": {"Y": self._train, "times": self._times}, "default_kernel": self._default_kernel}

    @classmethod
    def _from_payload(cls, payload, kernel, encoder=None, decoder=None):
        cfg = dict(payload["config"])
        require_networks(cfg, {"encoder": encoder, "decoder": decoder}, cls.__name__)
        for k in ("custom_encoder", "custom_decoder"):
            cfg.pop(k)
        model = cls(kernel=kernel, encoder=encoder, decoder=decoder, **cfg, dtype=saved_dtype(payload))
        model._default_kernel = payload["default_kernel"]
        model.net.kernel.load_state_dict(payload["kernel_state"])
        Y, times = payload["data"]["Y"], payload["data"]["times"]
        model._train, model._times = Y, times
        model._build(Y.shape[2], None, times)
        model.net.load_state_dict({**payload["state"], **{f"kernel.{k}": v for k, v in
                                                          payload["kernel_state"].items()}})
        model._posterior()
        return model

    @classmethod
    def load(cls, path, encoder=None, decoder=None):
        """Load a saved GPVAE; pass freshly constructed ``encoder``/``decoder`` modules if the model was
        fitted with user-supplied ones (only their weights are stored: files load with weights_only=True)."""
        return load_with_networks(cls, path, encoder=encoder, decoder=decoder)
