"""Pieces of the model protocol that every model shares (DESIGN.md, "The shared model protocol")."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy.stats import norm

from ..data import check_level


class NotFittedError(RuntimeError):
    """A method that needs data was called before ``fit``."""


def prediction_frame(inputs: torch.Tensor, columns, mean, var, level: float) -> pd.DataFrame:
    """DataFrame with the input columns and mean, var, lower, upper (central ``level`` interval)."""
    level = check_level(level)
    mean = torch.as_tensor(mean).detach().cpu().numpy()
    var = torch.as_tensor(var).detach().cpu().numpy()
    half = norm.ppf(0.5 + level / 2) * np.sqrt(np.clip(var, 0.0, None))
    frame = pd.DataFrame(inputs.detach().cpu().numpy(), columns=list(columns))
    frame["mean"] = mean
    frame["var"] = var
    frame["lower"] = mean - half
    frame["upper"] = mean + half
    return frame


class Model:
    """Mixin: fitted-state checks, ``history`` and ``save``. Subclasses implement ``_payload`` and
    ``_from_payload`` (see :mod:`latentgp.io`)."""

    history: pd.DataFrame

    def _require_fitted(self, what: str = "this method"):
        if getattr(self, "_train", None) is None:
            raise NotFittedError(f"Call fit(...) before {what}.")

    def save(self, path) -> None:
        """Save configuration, hyperparameters, training data and history (torch.save).

        Load with :func:`latentgp.load` (``torch.load(weights_only=True)``: no pickled code)."""
        from ..io import save_model

        save_model(self, path)
