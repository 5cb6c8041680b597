"""ArviZ conversion shared by every model's ``to_inference_data``."""
from __future__ import annotations


def to_inference_data(posterior: dict, posterior_predictive: dict, log_likelihood: dict, observed_data: dict,
                      dims: dict | None = None, coords: dict | None = None):
    """Build ``arviz.InferenceData`` from arrays shaped (chain, draw, ...) (observed: no chain/draw).

    Every group that ``az.summary``, ``az.plot_ppc`` and ``az.loo`` need is filled: posterior,
    posterior_predictive, pointwise log_likelihood and observed_data.
    """
    import arviz as az

    return az.from_dict(
        posterior=posterior,
        posterior_predictive=posterior_predictive,
        log_likelihood=log_likelihood,
        observed_data=observed_data,
        dims=dims,
        coords=coords,
    )
