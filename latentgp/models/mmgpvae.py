"""MM-GPVAE: shared and modality-private GP latents for spikes + behaviour (Gondur et al. 2024).

Latents, per sequence: z = [shared (S) | spike-private (Pa) | behaviour-private (Pb)], each an
independent GP with unit variance, represented in the Fourier domain on a window padded to period P
(``padding``): z_l(t) = Σ_m Φ_m(t) a_lm, a_lm ~ N(0, d_lm), d from the kernel's spectral density
(:func:`latentgp.variational.amortised.fourier_prior_variances`).

Observations, bin t:
    spikes_tn   ~ Poisson(exp(C_nᵀ [shared, spike-private](t) + d_n) · bin_width)   (log-linear, as GPFA/cvHM)
    behaviour_t ~ N(decoder([shared, behaviour-private](t)), σ² I)                  (images or pose, flattened)

q(a) = p(a) × (spike-encoder sites) × (behaviour-encoder sites) / Z: each modality's encoder outputs
Gaussian sites for the latents it sees; shared latents multiply both (a product of experts), so a
missing modality just drops its sites. The ELBO, derived from this model (not from the official code,
which mis-scales and duplicates terms):

    ELBO = Σ_n E_q[log p(spikes_n | z)]   closed form: E[exp η] = exp(m + v/2)
         + Σ_n E_q[log p(behaviour_n | z)]  reparameterised Monte Carlo
         - Σ_n KL(q(a_n) ‖ p(a))            closed form, whitened (amortised.fourier_posterior).

``modality_dropout``: during training a fraction of minibatches is encoded from one modality only (the
ELBO of that q is still a valid bound), so spikes alone give calibrated latents at test time.
"""
from __future__ import annotations

import gpytorch
import numpy as np
import pandas as pd
import torch
from torch import nn

from ..data import DEFAULT_DTYPE, _as_float_array, check_int, check_positive
from ..fit import optimize, seeded, torch_threads
from ..io import register_model, saved_dtype
from ..likelihoods import Poisson
from ..variational.amortised import (
    fourier_basis,
    fourier_marginals,
    fourier_posterior,
    fourier_prior_variances,
    sample_fourier_posterior,
)
from .base import Model
from .vae_parts import (
    SiteEncoder,
    gaussian_log_density,
    gaussian_noise_params,
    load_with_networks,
    minibatches,
    mlp_decoder,
    require_networks,
)

_NETS = ("spike_encoder", "behaviour_encoder", "behaviour_decoder")


def _check_private(private_dims):
    try:
        pa, pb = (int(v) for v in private_dims)
    except (TypeError, ValueError):
        raise TypeError(f"`private_dims` must be a (spikes, behaviour) pair of ints; got {private_dims!r}.") from None
    if pa < 0 or pb < 0:
        raise ValueError(f"`private_dims` must be >= 0; got {private_dims!r}.")
    return pa, pb


@register_model
class MultimodalGPVAE(Model):
    """MM-GPVAE on spike counts (sequences, time, neurons) and behaviour (sequences, time, *shape).

    Parameters
    ----------
    shared_dim : int
        Latents read out by both modalities.
    private_dims : (int, int)
        Latents private to the spikes and to the behaviour.
    n_frequencies : int
        K frequencies 0, 2π/P, ..., 2π(K-1)/P (2K-1 real coefficients per latent).
    kernel : gpytorch kernel with batch_shape (shared + private latents,) and a spectral density
        Default ``RBFKernel`` (as GPFA), lengthscale initialised to a tenth of the duration, learned.
    padding : float
        Period P = duration x (1 + padding): the Fourier representation is periodic, so pad to keep the
        two ends of a sequence uncorrelated.
    spike_encoder, behaviour_encoder : nn.Module, optional
        Map (B, T, features) to site (mean, precision), each (B, T, latents that modality sees). Defaults:
        :class:`~latentgp.models.vae_parts.SiteEncoder` on sqrt(counts) and on the flattened behaviour.
    behaviour_decoder : nn.Module, optional
        (..., T, shared + behaviour-private) -> (..., T, prod(shape)). Default a per-step MLP.
    min_noise : float
        Floor on the behaviour noise variance relative to the behaviour's variance: rendered images are
        noiseless, and without a floor the Gaussian likelihood is unbounded (the fit ends in inf gradients).
    """

    def __init__(self, shared_dim: int, private_dims=(0, 0), n_frequencies: int = 20, kernel=None, *,
                 spike_encoder=None, behaviour_encoder=None, behaviour_decoder=None, bin_width: float = 1.0,
                 padding: float = 0.5, hidden: int = 64, context: int = 2, min_noise: float = 1e-3,
                 dtype=DEFAULT_DTYPE):
        shared = check_int(shared_dim, "shared_dim", 1)
        pa, pb = _check_private(private_dims)
        K = check_int(n_frequencies, "n_frequencies", 1)
        bin_width = check_positive(bin_width, "bin_width")
        if not (isinstance(padding, (int, float)) and padding >= 0):
            raise ValueError(f"`padding` must be a number >= 0; got {padding!r}.")
        L = shared + pa + pb
        nets = {"spike_encoder": spike_encoder, "behaviour_encoder": behaviour_encoder,
                "behaviour_decoder": behaviour_decoder}
        for name, net in nets.items():
            if net is not None and not isinstance(net, nn.Module):
                raise TypeError(f"`{name}` must be a torch.nn.Module; got {type(net).__name__}.")
        self._default_kernel = kernel is None
        if kernel is None:
            kernel = gpytorch.kernels.RBFKernel(batch_shape=torch.Size([L]))
        if not isinstance(kernel, gpytorch.kernels.Kernel):
            raise TypeError(f"`kernel` must be a gpytorch Kernel; got {type(kernel).__name__}.")
        if tuple(kernel.batch_shape) != (L,):
            raise ValueError(f"`kernel` must have batch_shape ({L},) (shared + private latents); got "
                             f"{tuple(kernel.batch_shape)}.")
        self.config = {"shared_dim": shared, "private_dims": [pa, pb], "n_frequencies": K, "bin_width": bin_width,
                       "padding": float(padding), "hidden": int(hidden), "context": int(context),
                       "min_noise": float(check_positive(min_noise, "min_noise")),
                       **{f"custom_{k}": v is not None for k, v in nets.items()}}
        # latent indices seen by each modality
        self._spk_idx = list(range(shared)) + list(range(shared, shared + pa))
        self._beh_idx = list(range(shared)) + list(range(shared + pa, L))
        self.n_latents = L
        self.dtype = dtype
        self.likelihood = Poisson(bin_width)
        self.net = nn.Module()
        self.net.kernel = kernel.to(dtype)
        for name, net in nets.items():
            setattr(self.net, name, None if net is None else net.to(dtype))
        self.history = None
        self._train = None

    # ------------------------------------------------------------------ data
    def _check_spikes(self, spikes, name="spikes", against_fit=True):
        from ..neuro import check_counts

        arr = check_counts(spikes, name)
        if against_fit and self._train is not None and arr.shape[2] != self._train[0].shape[2]:
            raise ValueError(f"`{name}` has {arr.shape[2]} neurons; the model was fitted with "
                             f"{self._train[0].shape[2]}.")
        return torch.as_tensor(arr, dtype=self.dtype)

    def _check_behaviour(self, behaviour, n_seq=None, name="behaviour", against_fit=True):
        arr = _as_float_array(behaviour, name)
        if arr.ndim < 3:
            raise ValueError(f"`{name}` must be (sequences, time, *shape), e.g. (N, T, 28, 28) images or "
                             f"(N, T, features) pose; got shape {arr.shape}.")
        if n_seq is not None and arr.shape[:2] != n_seq:
            raise ValueError(f"`{name}` has (sequences, time) = {arr.shape[:2]} but the spikes have {n_seq}.")
        shape = getattr(self, "behaviour_shape_", None) if against_fit else None
        if shape is not None and tuple(arr.shape[2:]) != shape:
            raise ValueError(f"`{name}` frames have shape {arr.shape[2:]}; the decoder produces {shape}.")
        return torch.as_tensor(arr.reshape(*arr.shape[:2], -1), dtype=self.dtype)

    # ------------------------------------------------------------------ model pieces
    def _build(self, n_neurons, n_pixels, spikes=None, behaviour=None):
        cfg, net = self.config, self.net
        if net.spike_encoder is None:
            net.spike_encoder = SiteEncoder(n_neurons, len(self._spk_idx), cfg["hidden"], cfg["context"]).to(self.dtype)
        if net.behaviour_encoder is None:
            net.behaviour_encoder = SiteEncoder(n_pixels, len(self._beh_idx), cfg["hidden"],
                                                cfg["context"]).to(self.dtype)
        if net.behaviour_decoder is None:
            net.behaviour_decoder = mlp_decoder(len(self._beh_idx), n_pixels, cfg["hidden"]).to(self.dtype)
        net.C = nn.Parameter(self._init_loadings(spikes, n_neurons))
        rate = spikes.mean((0, 1)) + 1e-2 if spikes is not None else torch.ones(n_neurons, dtype=self.dtype)
        net.d = nn.Parameter(torch.log(rate / cfg["bin_width"]))
        # one noise variance for all behaviour features, floored (rendered images are noiseless)
        net.log_noise, floor = gaussian_noise_params(None if behaviour is None else behaviour.reshape(-1, 1), 1,
                                                     cfg["min_noise"], self.dtype)
        net.register_buffer("noise_floor", floor)
        if self._default_kernel and spikes is not None:
            with torch.no_grad():
                net.kernel.lengthscale = torch.full_like(net.kernel.lengthscale, 0.1 * self._duration)

    def _init_loadings(self, spikes, n_neurons):
        """Loadings along the leading principal directions of sqrt(counts) (log-rate std 0.3 per latent):
        a readout that already separates the population's main modes speeds up training a lot compared
        with a random one. Random directions fill any latents beyond the data's rank."""
        k = len(self._spk_idx)
        gen = torch.Generator().manual_seed(0)
        C = torch.randn(k, n_neurons, dtype=self.dtype, generator=gen) / n_neurons ** 0.5
        if spikes is not None:
            flat = torch.sqrt(spikes).reshape(-1, n_neurons)
            vt = torch.linalg.svd(flat - flat.mean(0), full_matrices=False)[2]
            r = min(k, vt.shape[0])
            C[:r] = vt[:r]
        return 0.3 * n_neurons ** 0.5 * C / C.norm(dim=1, keepdim=True)

    def _grid(self, T):
        bw, cfg = self.config["bin_width"], self.config
        self._duration = T * bw
        self.times_ = (torch.arange(T, dtype=self.dtype) + 0.5) * bw
        self.period_ = self._duration * (1 + cfg["padding"])
        self._basis = fourier_basis(self.times_, cfg["n_frequencies"], self.period_)

    def _sites(self, spikes, behaviour):
        """Combined site (mean, precision) (B, T, L): natural parameters add over modalities."""
        ref = spikes if spikes is not None else behaviour
        B, T = ref.shape[:2]
        lam = torch.zeros(B, T, self.n_latents, dtype=self.dtype)
        h = torch.zeros_like(lam)
        # counts enter the encoder as sqrt(counts) (variance-stabilised, as in GPFA)
        for data, enc, idx in ((None if spikes is None else torch.sqrt(spikes), self.net.spike_encoder, self._spk_idx),
                               (behaviour, self.net.behaviour_encoder, self._beh_idx)):
            if data is None:
                continue
            mean, prec = enc(data)
            cols = torch.tensor(idx)
            lam = lam.index_add(-1, cols, prec)
            h = h.index_add(-1, cols, prec * mean)
        return h / lam.clamp_min(1e-300), lam

    def posterior(self, spikes=None, behaviour=None):
        """q(a) from whichever modalities are given (tensors as validated by the model)."""
        d = fourier_prior_variances(self.net.kernel, self.config["n_frequencies"], self.period_)
        return fourier_posterior(d, self._basis, *self._sites(spikes, behaviour))

    def _spike_rate_moments(self, mean, var, readout=None):
        """Mean and variance of η = z_spk C + d under q (latents are independent under q); ``readout``: a
        (C, d) to use instead of the network's (e.g. fixed, for a subset of neurons)."""
        C, d = (self.net.C, self.net.d) if readout is None else readout
        return mean[..., self._spk_idx] @ C + d, var[..., self._spk_idx] @ C ** 2

    def _behaviour_log_density(self, behaviour, z):
        eta = self.net.behaviour_decoder(z[..., self._beh_idx])
        return gaussian_log_density(behaviour, eta, self.net.log_noise, self.net.noise_floor)

    def elbo_terms(self, spikes, behaviour, num_samples: int = 1, encode=("spikes", "behaviour"), generator=None):
        """ELBO terms per sequence: ``spikes`` (closed form), ``behaviour`` (MC over ``num_samples``; 0 if
        ``behaviour`` is None), ``kl`` and ``elbo``, each (B,); ``encode`` chooses which modalities' sites form q."""
        post = self.posterior(spikes if "spikes" in encode else None, behaviour if "behaviour" in encode else None)
        mean, var = fourier_marginals(post, self._basis)
        mu, v = self._spike_rate_moments(mean, var)
        spk = self.likelihood.expected(spikes, mu, v)[0].sum((-1, -2))
        if behaviour is None:  # the spikes-only model (the warm-up's objective): no behaviour term
            beh = torch.zeros_like(spk)
        else:
            z = sample_fourier_posterior(post, self._basis, num_samples, generator)
            beh = self._behaviour_log_density(behaviour, z).sum((-1, -2)).mean(0)
        return {"spikes": spk, "behaviour": beh, "kl": post.kl, "elbo": spk + beh - post.kl, "posterior": post}

    # ------------------------------------------------------------------ fitting
    def fit(self, spikes, behaviour, *, steps: int = 1000, lr: float = 0.01, batch_size: int | None = None,
            num_samples: int = 1, modality_dropout: float = 0.25, learn_kernel: bool = True, restarts: int = 1,
            restart_steps: int = 300, max_grad_norm: float | None = 100.0, final_lr: float | None = None,
            spike_warmup: int | None = None, progress=None, tol: float | None = None, seed=None):
        """Adam on the ELBO over minibatches of sequences; history loss = -ELBO per (sequence x bin).

        ``restarts`` > 1 (default networks only): that many fresh initialisations are each trained for
        ``restart_steps`` steps, the one with the highest ELBO is kept and trained for ``steps`` more. The
        fit is seed-sensitive (a poor start can end in a poor local optimum); restarts trade time for it.
        ``max_grad_norm`` (default 100; None = no clipping): clip Adam's gradient norm and skip non-finite steps
        (:func:`latentgp.fit.optimize`): without it a rare exploding minibatch can send the encoder to NaN.
        ``final_lr``: the last fifth of ``steps`` (``steps // 5``: none below 5 steps) runs as a second Adam phase
        at this learning rate (e.g. lr / 10; it runs even if ``tol`` stopped the first phase early): with
        single-sample stochastic gradients a constant lr keeps the parameters jittering around an optimum.
        ``spike_warmup`` (default ``steps // 5``): every fresh initialisation first trains the spike pathway alone
        (spike encoder, readout, kernel) for that many steps on the spikes-only ELBO, then the full model. The
        behaviour term is usually far larger (hundreds of pixels per bin against tens of neurons) and from a random
        start it can settle the latents in a poor optimum that the log-linear spike readout then cannot undo; a
        start from the spike model anchors them (measured: see BENCHMARKS.md). 0 disables it.
        """
        y = self._check_spikes(spikes, against_fit=False)  # a refit may change the data's shapes
        N, T, n_neurons = y.shape
        frames = _as_float_array(behaviour, "behaviour")
        b = self._check_behaviour(frames, (N, T), against_fit=False)
        steps, num_samples = check_int(steps, "steps"), check_int(num_samples, "num_samples", 1)
        lr = check_positive(lr, "lr")
        if not 0 <= modality_dropout < 0.5 + 1e-12:
            raise ValueError(f"`modality_dropout` must be in [0, 0.5]; got {modality_dropout}.")
        if batch_size is not None:
            batch_size = check_int(batch_size, "batch_size", 1)
        if T < 2:
            raise ValueError(f"`spikes` needs at least 2 bins per sequence; got {T}.")
        restarts, restart_steps = check_int(restarts, "restarts", 1), check_int(restart_steps, "restart_steps", 1)
        max_grad_norm = check_positive(max_grad_norm, "max_grad_norm", allow_none=True)
        final_lr = check_positive(final_lr, "final_lr", allow_none=True)
        spike_warmup = steps // 5 if spike_warmup is None else check_int(spike_warmup, "spike_warmup")
        if restarts > 1 and any(v for k, v in self.config.items() if k.startswith("custom_")):
            raise ValueError("`restarts` > 1 re-initialises the default networks; it cannot be used with networks "
                             "you supplied (run several fits with different seeds instead).")
        if self._train is not None:  # a refit with other widths: rebuild the default networks, refuse custom ones
            widths = {"spike_encoder": (n_neurons, self._train[0].shape[-1]),
                      "behaviour_encoder": (b.shape[-1], self._train[1].shape[-1]),
                      "behaviour_decoder": (b.shape[-1], self._train[1].shape[-1])}
            for name, (new, old) in widths.items():
                if new != old:
                    if self.config.get(f"custom_{name}"):
                        raise ValueError(f"The data's width changed ({old} -> {new}) but `{name}` was supplied by "
                                         "you for the old width; create a new MultimodalGPVAE.")
                    setattr(self.net, name, None)
        self.behaviour_shape_ = tuple(frames.shape[2:])
        self._train = (y, b)
        self._grid(T)
        with seeded(seed):
            kernel_start = {k: v.clone() for k, v in self.net.kernel.state_dict().items()}
            self._build(n_neurons, b.shape[-1], y, b)
            batches = minibatches(N, batch_size)

            def loss():
                idx = next(batches)
                u = float(torch.rand(()))
                encode = (("spikes",) if u < modality_dropout else ("behaviour",) if u < 2 * modality_dropout
                          else ("spikes", "behaviour"))
                terms = self.elbo_terms(y[idx], b[idx], num_samples, encode)
                return -terms["elbo"].sum() / (len(idx) * T)

            def spike_loss():
                idx = next(batches)
                return -self.elbo_terms(y[idx], None, encode=("spikes",))["elbo"].sum() / (len(idx) * T)

            def trainable(spikes_only=False):
                return [p for name, p in self.net.named_parameters() if (learn_kernel or not name.startswith("kernel"))
                        and not (spikes_only and name.startswith(("behaviour", "log_noise")))]

            def warm_up():
                if spike_warmup:
                    optimize(spike_loss, trainable(spikes_only=True), method="adam", steps=spike_warmup, lr=lr,
                             progress=False, max_grad_norm=max_grad_norm)

            with torch_threads(1):
                if restarts > 1:
                    self._best_of_restarts(restarts, restart_steps, loss, trainable, lr, kernel_start,
                                           (n_neurons, b.shape[-1], y, b), max_grad_norm, warm_up)
                else:
                    warm_up()
                tail = steps // 5 if final_lr is not None else 0
                phases = [(n, rate) for n, rate in ((steps - tail, lr), (tail, final_lr)) if n]
                parts = [optimize(loss, trainable(), method="adam", steps=n, lr=rate, progress=progress, tol=tol,
                                  record=self._record, desc="MM-GPVAE", max_grad_norm=max_grad_norm)
                         for n, rate in phases]
                if len(parts) == 2:
                    parts[1] = parts[1].assign(step=parts[1]["step"] + parts[0]["step"].max() + 1)
                self.history = pd.concat(parts, ignore_index=True) if parts else None
        return self

    def _best_of_restarts(self, restarts, restart_steps, loss, trainable, lr, kernel_start, build_args,
                          max_grad_norm, warm_up):
        """Train ``restarts`` fresh starts briefly (each after ``warm_up()``); keep the state with the highest
        ELBO (a start that diverges scores -inf)."""
        import copy
        import math

        best = (-math.inf, None)
        for r in range(restarts):
            if r > 0:  # fresh default networks, the same data-driven start for the rest
                self.net.spike_encoder = self.net.behaviour_encoder = self.net.behaviour_decoder = None
                self.net.kernel.load_state_dict(kernel_start)
                self._build(*build_args)
            try:
                warm_up()
                optimize(loss, trainable(), method="adam", steps=restart_steps, lr=lr, progress=False,
                         max_grad_norm=max_grad_norm)
                with torch.no_grad():
                    score = float(self.elbo_terms(*self._train, 4)["elbo"].sum())
            except (FloatingPointError, torch.linalg.LinAlgError):
                score = -math.inf
            if score > best[0]:
                best = (score, copy.deepcopy(self.net))
        if best[1] is None:
            raise FloatingPointError("Every restart diverged; lower the learning rate (lr=...).")
        self.net = best[1]

    def _record(self):
        return {f"lengthscale_{i}": v for i, v in enumerate(self.net.kernel.lengthscale.detach().flatten().tolist())}

    # ------------------------------------------------------------------ inference on new / partial data
    def _inputs(self, spikes, behaviour):
        self._require_fitted("this method")
        if spikes is None and behaviour is None:
            return self._train
        y = None if spikes is None else self._check_spikes(spikes)
        b = None if behaviour is None else self._check_behaviour(behaviour, None if y is None else tuple(y.shape[:2]))
        T = (y if y is not None else b).shape[1]
        if T != len(self.times_):
            raise ValueError(f"Sequences have {T} bins; the model's Fourier grid has {len(self.times_)}.")
        return y, b

    def _marginals(self, spikes, behaviour, refine: int = 0):
        refine = check_int(refine, "refine")
        if refine and (spikes is None or behaviour is not None):
            raise ValueError("`refine` applies to inference from spikes alone: pass `spikes` and no `behaviour`.")
        y, b = self._inputs(spikes, behaviour)
        if refine:  # start from the encoder's sites, then fit them to these spikes (closes the amortisation gap)
            with torch.no_grad():
                mean0, prec0 = self._sites(y, None)
            post = self._fit_sites(y, torch.arange(y.shape[2]), refine, mean0, prec0)
        else:
            with torch.no_grad():
                post = self.posterior(y, b)
        with torch.no_grad():
            return post, *fourier_marginals(post, self._basis)

    def latents(self, spikes=None, behaviour=None, refine: int = 0) -> np.ndarray:
        """Posterior means (sequences, time, shared + private latents) from the given modalities
        (default: both training modalities). Latents a modality does not see stay at the prior (0).

        ``refine`` > 0 (spikes alone): after the encoder, fit q's sites to these spikes by that many L-BFGS
        iterations on the closed-form spike ELBO -- the encoder is only an approximation of the best q
        (the amortisation gap), which matters most on new trials."""
        return self._marginals(spikes, behaviour, refine)[1].numpy()

    def latent_variance(self, spikes=None, behaviour=None, refine: int = 0) -> np.ndarray:
        return self._marginals(spikes, behaviour, refine)[2].numpy()

    def predict_behaviour(self, spikes=None, behaviour=None, num_samples: int = 32, seed=None,
                          refine: int = 0) -> np.ndarray:
        """E_q[decoder(z)] (sequences, time, *shape), q inferred from the modalities passed: ``spikes`` alone
        is the cross-modal prediction; ``behaviour`` too (or only) gives a reconstruction; neither: the
        training data with both modalities. ``refine``: as in :meth:`latents`."""
        post = self._marginals(spikes, behaviour, refine)[0]
        with torch.no_grad(), seeded(seed):
            z = sample_fourier_posterior(post, self._basis, check_int(num_samples, "num_samples", 1))
            out = self.net.behaviour_decoder(z[..., self._beh_idx]).mean(0)
        return out.reshape(*out.shape[:2], *self.behaviour_shape_).numpy()

    def predict_rates(self, spikes=None, behaviour=None) -> np.ndarray:
        """E_q[exp(η)] spikes per unit time (sequences, time, neurons), closed form; q from ``behaviour``
        alone predicts spiking from behaviour."""
        _, mean, var = self._marginals(spikes, behaviour)
        with torch.no_grad():
            mu, v = self._spike_rate_moments(mean, var)
            return torch.exp(mu + 0.5 * v).numpy()

    def _fit_sites(self, y, idx, steps: int, mean0, prec0):
        """q = prior x free Gaussian sites (a mean and log-precision per bin and latent, from ``mean0``, ``prec0``)
        fitted by L-BFGS (``steps``) on the closed-form ELBO of the spikes of neurons ``idx`` (``y`` holds just
        those), readout and kernel fixed: non-amortised inference in the fitted model. Returns q (no grad)."""
        with torch.no_grad():
            d = fourier_prior_variances(self.net.kernel, self.config["n_frequencies"], self.period_)
            C, off = self.net.C.detach()[:, idx], self.net.d.detach()[idx]
        site_mean = mean0.detach().clone().requires_grad_(True)
        site_logprec = prec0.detach().clamp_min(1e-6).log().requires_grad_(True)

        def loss():
            post = fourier_posterior(d, self._basis, site_mean, torch.exp(site_logprec))
            mean, var = fourier_marginals(post, self._basis)
            ll = self.likelihood.expected(y, *self._spike_rate_moments(mean, var, (C, off)))[0]
            return -(ll.sum() - post.kl.sum()) / y.shape[:2].numel()

        with torch_threads(1):
            optimize(loss, [site_mean, site_logprec], method="lbfgs", steps=steps, progress=False)
        with torch.no_grad():
            return fourier_posterior(d, self._basis, site_mean, torch.exp(site_logprec))

    def heldout_rates(self, spikes_in, held_in, *, steps: int = 100) -> np.ndarray:
        """Co-smoothing: rates E_q[exp η] per unit time of every neuron (sequences, time, neurons), with q
        inferred from the ``held_in`` neurons' counts ``spikes_in`` (sequences, time, len(held_in)) alone.

        The spike encoder was trained on all neurons and cannot take a subset, so q keeps its form (prior x
        Gaussian sites) but its sites are fitted to these sequences (:meth:`_fit_sites`, ``steps`` L-BFGS
        iterations from uninformative sites: mean 0, precision 1) on the held-in neurons' Poisson likelihood. Scores:
        :func:`latentgp.cosmoothing.co_smoothing`."""
        from ..cosmoothing import check_neuron_split

        self._require_fitted("heldout_rates()")
        idx = torch.as_tensor(check_neuron_split(held_in, self.net.C.shape[1]))
        y = self._check_spikes(spikes_in, "spikes_in", against_fit=False)
        if y.shape[2] != len(idx) or y.shape[1] != len(self.times_):
            raise ValueError(f"`spikes_in` has shape {tuple(y.shape)}; expected (sequences, {len(self.times_)}, "
                             f"{len(idx)}) for these held-in neurons.")
        steps = check_int(steps, "steps", 1)
        zeros = torch.zeros(*y.shape[:2], self.n_latents, dtype=self.dtype)
        post = self._fit_sites(y, idx, steps, zeros, torch.ones_like(zeros))
        with torch.no_grad():
            mu, v = self._spike_rate_moments(*fourier_marginals(post, self._basis))
            return torch.exp(mu + 0.5 * v).numpy()

    def elbo(self, num_samples: int = 64, seed=None) -> float:
        self._require_fitted("elbo()")
        with torch.no_grad(), seeded(seed):
            return float(self.elbo_terms(*self._train, num_samples)["elbo"].sum())

    def plot_cross_modal(self, spikes, behaviour, sequence: int = 0, frames=(0, 1, 2, 3), axes=None):
        """True behaviour frames (top) vs frames predicted from ``spikes`` alone (bottom); images only."""
        import matplotlib.pyplot as plt

        pred = self.predict_behaviour(spikes)
        true = _as_float_array(behaviour, "behaviour")
        if len(self.behaviour_shape_) != 2:
            raise ValueError("plot_cross_modal draws image frames; the behaviour is not (height, width).")
        if axes is None:
            _, axes = plt.subplots(2, len(frames), figsize=(2 * len(frames), 4))
        for j, f in enumerate(frames):
            lim = {"vmin": float(true.min()), "vmax": float(true.max())}  # one grey scale for both rows
            axes[0, j].imshow(true[sequence, f], cmap="gray", **lim)
            axes[1, j].imshow(pred[sequence, f], cmap="gray", **lim)
            axes[0, j].set_title(f"t={f}")
            for a in axes[:, j]:
                a.axis("off")
        return axes

    # ------------------------------------------------------------------ save / load
    def _payload(self):
        self._require_fitted("save()")
        return {"config": dict(self.config), "kernel": self.net.kernel, "state": self.net.state_dict(),
                "data": {"spikes": self._train[0], "behaviour": self._train[1],
                         "behaviour_shape": list(self.behaviour_shape_)}, "default_kernel": self._default_kernel}

    @classmethod
    def _from_payload(cls, payload, kernel, spike_encoder=None, behaviour_encoder=None, behaviour_decoder=None):
        cfg = dict(payload["config"])
        nets = {"spike_encoder": spike_encoder, "behaviour_encoder": behaviour_encoder,
                "behaviour_decoder": behaviour_decoder}
        require_networks(cfg, nets, cls.__name__)
        for k in _NETS:
            cfg.pop(f"custom_{k}")
        model = cls(kernel=kernel, **nets, **cfg, dtype=saved_dtype(payload))
        model._default_kernel = payload["default_kernel"]
        y, b = payload["data"]["spikes"], payload["data"]["behaviour"]
        model.behaviour_shape_ = tuple(payload["data"]["behaviour_shape"])
        model._train = (y, b)
        model._grid(y.shape[1])
        model._build(y.shape[2], b.shape[2])
        model.net.load_state_dict(payload["state"])
        return model

    @classmethod
    def load(cls, path, spike_encoder=None, behaviour_encoder=None, behaviour_decoder=None):
        """Load a saved model; pass rebuilt user networks if it was fitted with any (weights only are stored)."""
        return load_with_networks(cls, path, spike_encoder=spike_encoder, behaviour_encoder=behaviour_encoder,
                                  behaviour_decoder=behaviour_decoder)
