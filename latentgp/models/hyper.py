"""Hyperparameters as Pyro sample sites: priors, constrained <-> raw maps, functional evaluation.

A model's prior is a gpytorch Module whose free parameters carry gpytorch constraints. Each free
parameter becomes one Pyro site named after it without ``raw_`` (``kernel.base_kernel.lengthscale``):
positive parameters get ``LogNormal(log c, 1)``, unconstrained ones ``Normal(c, s)``, centred at
``c`` = the value when priors were first built (after data-driven initialisation), unless the user
passes a prior for that site. Parameters with other constraints (bounded intervals) are sampled on
their raw scale under the site name that keeps ``raw_``.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyro.distributions as dist
import torch
from gpytorch.constraints import Positive


@dataclass
class Site:
    name: str  # Pyro site name
    raw_name: str  # parameter name in the module
    constraint: object | None  # gpytorch constraint or None
    prior: dist.Distribution

    def to_raw(self, value: torch.Tensor) -> torch.Tensor:
        if self.name == self.raw_name or self.constraint is None:
            return value
        return self.constraint.inverse_transform(value)

    def from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        if self.name == self.raw_name or self.constraint is None:
            return raw
        return self.constraint.transform(raw)


def _is_plain_positive(constraint) -> bool:
    return isinstance(constraint, Positive) or (
        constraint is not None
        and float(constraint.lower_bound.max()) == 0.0
        and bool(torch.isinf(constraint.upper_bound).all())
    )


def build_sites(module, user_priors: dict | None = None, loc_scale: float = 1.0) -> list[Site]:
    """One :class:`Site` per free parameter of ``module``."""
    user_priors = dict(user_priors or {})
    sites = []
    for raw_name, param, constraint in module.named_parameters_and_constraints():
        if not param.requires_grad:
            continue
        raw = param.detach().clone()
        if constraint is None:
            name = raw_name.replace("raw_", "")
            prior = dist.Normal(raw, torch.full_like(raw, loc_scale), validate_args=False)
        elif _is_plain_positive(constraint):
            name = raw_name.replace("raw_", "")
            value = constraint.transform(raw)
            prior = dist.LogNormal(value.log(), torch.ones_like(value), validate_args=False)
        else:
            name = raw_name
            prior = dist.Normal(raw, torch.ones_like(raw), validate_args=False)
        if name in user_priors:
            prior = user_priors.pop(name)
        prior = prior.expand(param.shape).to_event(param.dim()) if param.dim() else prior
        sites.append(Site(name, raw_name, constraint, prior))
    if user_priors:
        raise ValueError(
            f"`priors`: unknown site(s) {sorted(user_priors)}; available: {[s.name for s in sites]}."
        )
    return sites


def current_values(module, sites: list[Site]) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    return {s.name: s.from_raw(params[s.raw_name].detach()).clone() for s in sites}


def set_values(module, sites: list[Site], values: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    with torch.no_grad():
        for s in sites:
            if s.name in values:
                params[s.raw_name].copy_(s.to_raw(torch.as_tensor(values[s.name], dtype=params[s.raw_name].dtype)))


def raw_overrides(sites: list[Site], values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map sampled constrained values to raw tensors for ``torch.func.functional_call``."""
    return {s.raw_name: s.to_raw(values[s.name]) for s in sites}
