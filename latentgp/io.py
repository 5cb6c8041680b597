"""save/load for every model: configuration, hyperparameters and training data in one torch file.

Files are read with ``torch.load(weights_only=True)``: they hold only tensors, numbers, strings,
lists and dicts. Kernels are stored as a structural spec (type name, constructor arguments,
children) plus the model's ``state_dict``; kernel classes are looked up in a registry, extend it
with :func:`register_kernel` for your own kernel classes.
"""
from __future__ import annotations

import gpytorch
import torch

FORMAT = 1
_KERNELS: dict[str, type] = {}
_MODELS: dict[str, type] = {}
# Constructor arguments read back from kernel attributes (besides ard_num_dims / batch_shape).
_EXTRA_ARGS = ("nu", "order", "num_mixtures", "num_dimensions", "min_scale")


def register_kernel(cls: type) -> type:
    """Allow ``cls`` (a gpytorch Kernel subclass) inside saved models."""
    _KERNELS[cls.__name__] = cls
    return cls


def register_model(cls: type) -> type:
    _MODELS[cls.__name__] = cls
    return cls


def _default_registry():
    from . import kernels as lk

    gk = gpytorch.kernels
    for cls in (gk.RBFKernel, gk.MaternKernel, gk.PeriodicKernel, gk.LinearKernel, gk.RQKernel, gk.CosineKernel,
                gk.ScaleKernel, gk.AdditiveKernel, gk.ProductKernel, gk.SpectralMixtureKernel,
                gk.PolynomialKernel, lk.Matern, lk.HidaMatern, lk.SpectralMixture):
        _KERNELS.setdefault(cls.__name__, cls)


def kernel_spec(kernel) -> dict:
    """A weights-only-safe description of a kernel's structure (values live in the state_dict)."""
    _default_registry()
    name = type(kernel).__name__
    if _KERNELS.get(name) is not type(kernel):
        raise TypeError(
            f"Cannot save a model with kernel type {name}; register it with latentgp.io.register_kernel({name})."
        )
    spec = {"type": name, "args": {}, "children": []}
    if kernel.ard_num_dims is not None and not isinstance(kernel, gpytorch.kernels.ScaleKernel):
        spec["args"]["ard_num_dims"] = int(kernel.ard_num_dims)
    if len(kernel.batch_shape):
        spec["args"]["batch_shape"] = [int(b) for b in kernel.batch_shape]
    if kernel.active_dims is not None:
        spec["args"]["active_dims"] = [int(a) for a in kernel.active_dims]
    for arg in _EXTRA_ARGS:
        if hasattr(kernel, arg) and isinstance(getattr(kernel, arg), (int, float)):
            spec["args"][arg] = getattr(kernel, arg)
    if isinstance(kernel, gpytorch.kernels.ScaleKernel):
        spec["children"] = [kernel_spec(kernel.base_kernel)]
    elif isinstance(kernel, (gpytorch.kernels.AdditiveKernel, gpytorch.kernels.ProductKernel)):
        spec["children"] = [kernel_spec(k) for k in kernel.kernels]
    return spec


def kernel_from_spec(spec: dict):
    _default_registry()
    if spec["type"] not in _KERNELS:
        raise TypeError(f"Unknown kernel type {spec['type']!r} in saved file; register it with register_kernel.")
    args = dict(spec["args"])
    if "batch_shape" in args:
        args["batch_shape"] = torch.Size(args["batch_shape"])
    if "active_dims" in args:
        args["active_dims"] = tuple(args["active_dims"])
    children = [kernel_from_spec(c) for c in spec["children"]]
    return _KERNELS[spec["type"]](*children, **args)


def saved_dtype(payload: dict) -> torch.dtype:
    """The floating dtype a model was saved with (files without one were float64)."""
    return getattr(torch, payload.get("dtype", "float64"))


def save_model(model, path) -> None:
    payload = model._payload()
    if isinstance(getattr(model, "dtype", None), torch.dtype):  # models rebuild at this dtype in _from_payload
        payload.setdefault("dtype", str(model.dtype).replace("torch.", ""))
    payload["kernel"] = kernel_spec(payload["kernel"]) if payload.get("kernel") is not None else None
    history = getattr(model, "history", None)
    payload["history"] = None if history is None else {c: history[c].tolist() for c in history.columns}
    payload["format"] = FORMAT
    payload["class"] = type(model).__name__
    torch.save(payload, path)


def load(path):
    """Load a model saved with ``model.save(path)``; it predicts identically without refitting."""
    import pandas as pd

    payload = torch.load(path, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"`path`: {path} is not a latentgp model file (format {FORMAT}).")
    cls = _MODELS.get(payload["class"])
    if cls is None:
        raise ValueError(f"`path`: unknown model class {payload['class']!r}.")
    kernel = kernel_from_spec(payload["kernel"]) if payload.get("kernel") is not None else None
    model = cls._from_payload(payload, kernel)
    model.history = None if payload["history"] is None else pd.DataFrame(payload["history"])
    return model
