"""Input validation and conversion: the one place where bad input becomes a clear error.

Every public ``fit``/``predict`` converts its arguments here *before* touching model state, so a
``ValueError``/``TypeError`` always names the offending argument and leaves the model unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

DEFAULT_DTYPE = torch.float64


@dataclass(frozen=True)
class Inputs:
    """Validated 2-D inputs with the column names used in output DataFrames."""

    values: torch.Tensor  # (n, d)
    columns: tuple[str, ...]


def _to_numpy(value, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, (pd.DataFrame, pd.Series)):
        return value.to_numpy()
    if isinstance(value, (np.ndarray, list, tuple)) or np.isscalar(value):
        return np.asarray(value)
    raise TypeError(
        f"`{name}` must be a numpy array, torch tensor, pandas DataFrame/Series or list, "
        f"not {type(value).__name__}."
    )


def _as_float_array(value, name: str) -> np.ndarray:
    arr = _to_numpy(value, name)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        try:
            arr = arr.astype(float)
        except (TypeError, ValueError):
            raise TypeError(f"`{name}` must be numeric; got values of dtype {arr.dtype}.") from None
    arr = arr.astype(float)
    if arr.size == 0:
        raise ValueError(f"`{name}` is empty.")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f"`{name}` contains {bad} NaN or infinite value(s); drop or impute them first.")
    return arr


def as_inputs(X, name: str = "X", *, columns=None, dtype=DEFAULT_DTYPE) -> Inputs:
    """Convert ``X`` (n,), (n, d) array-like or DataFrame to an (n, d) tensor plus column names.

    ``columns`` selects DataFrame columns (unknown names raise ``ValueError``).
    """
    if isinstance(X, pd.DataFrame):
        if columns is not None:
            columns = [columns] if isinstance(columns, str) else list(columns)
            missing = [c for c in columns if c not in X.columns]
            if missing:
                raise ValueError(f"`{name}` has no column(s) {missing}; available: {list(X.columns)}.")
            X = X[columns]
        names = tuple(str(c) for c in X.columns)
    elif isinstance(X, pd.Series):
        names = (str(X.name) if X.name is not None else "x0",)
    else:
        names = None
    arr = _as_float_array(X, name)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"`{name}` must be 1-D (n,) or 2-D (n, d); got shape {arr.shape}.")
    if names is None:
        names = ("x",) if arr.shape[1] == 1 else tuple(f"x{i}" for i in range(arr.shape[1]))
    return Inputs(torch.as_tensor(arr, dtype=dtype), names)


def as_new_inputs(X, columns, name: str = "X", dtype=DEFAULT_DTYPE) -> Inputs:
    """New inputs for a model fitted on input ``columns``: a DataFrame is read by those column names, and
    the number of columns must match (``ValueError`` naming ``name`` otherwise)."""
    columns = list(columns)
    new = as_inputs(X, name, columns=columns if isinstance(X, pd.DataFrame) else None, dtype=dtype)
    if new.values.shape[1] != len(columns):
        raise ValueError(f"`{name}` has {new.values.shape[1]} columns; the model was fitted on {len(columns)}.")
    return new


def as_targets(y, n: int, name: str = "y", dtype=DEFAULT_DTYPE) -> torch.Tensor:
    """Convert ``y`` to a 1-D tensor of length ``n``."""
    if isinstance(y, pd.DataFrame):
        if y.shape[1] != 1:
            raise ValueError(f"`{name}` must have one column; got {y.shape[1]}.")
        y = y.iloc[:, 0]
    arr = _as_float_array(y, name)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D (n,); got shape {arr.shape}.")
    if arr.shape[0] != n:
        raise ValueError(f"`{name}` has {arr.shape[0]} values but X has {n} rows; they must match.")
    return torch.as_tensor(arr, dtype=dtype)


def split_frame(X, y, x=None):
    """Resolve ``fit(df, "target")`` / ``fit(df, y_array, x=[...])`` into (X, y) pieces.

    If ``y`` is a column name of the DataFrame ``X``, the targets come from that column and the
    inputs are ``x`` (if given) or all other columns.
    """
    if isinstance(y, str):
        if not isinstance(X, pd.DataFrame):
            raise TypeError("`y` given as a column name requires `X` to be a pandas DataFrame.")
        if y not in X.columns:
            raise ValueError(f"`y`: column {y!r} not in X; available: {list(X.columns)}.")
        target = X[y]
        if x is None:
            x = [c for c in X.columns if c != y]
            if not x:
                raise ValueError("`X` has no input columns besides the target `y`.")
        return X, target, x
    return X, y, x



def regression_data(X, y, x, dtype):
    """``fit(X, y)`` / ``fit(df, "target")`` / ``fit(df, y, x=[...])`` for a regression model, validated:
    (inputs, targets, target name)."""
    X, y, x = split_frame(X, y, x)
    if y is None:
        raise TypeError("`y` is required: an array of targets or the name of a column of X.")
    inputs = as_inputs(X, "X", columns=x, dtype=dtype)
    target = as_targets(y, inputs.values.shape[0], "y", dtype=dtype)
    name = y.name if hasattr(y, "name") and y.name is not None else "y"
    return inputs, target, str(name)

def check_positive(value, name: str, *, allow_none: bool = False):
    if value is None and allow_none:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a positive number; got {value!r}.") from None
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"`{name}` must be a positive finite number; got {value!r}.")
    return v


def check_int(value, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an integer; got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}; got {value}.")
    return int(value)


def check_level(level) -> float:
    v = check_positive(level, "level")
    if not v < 1:
        raise ValueError(f"`level` must be in (0, 1); got {level!r}.")
    return v


def check_point_estimate_kernel(kernel, model: str):
    """``kernel`` must be a gpytorch Kernel (or None) without registered priors: ``model`` fits point estimates
    of the hyperparameters and would ignore priors silently."""
    import gpytorch

    if kernel is None:
        return
    if not isinstance(kernel, gpytorch.kernels.Kernel):
        raise TypeError(f"`kernel` must be a gpytorch Kernel; got {type(kernel).__name__}.")
    if any(True for _ in kernel.named_priors()):
        raise ValueError(f"`kernel` has priors registered on its hyperparameters; {model} fits point estimates and "
                         "would ignore them silently: pass a kernel without priors (GPRegressor supports "
                         "hyperparameter priors).")
