"""Array-API plumbing shared by the core: namespace look-up and small helpers.

Every core function takes native arrays (NumPy, PyTorch, JAX, array-api-strict, ...) and returns arrays of the
same namespace on the same device. Nothing here imports a framework.
"""
from __future__ import annotations

import numpy as np
from array_api_compat import array_namespace, device

__all__ = ["array_namespace", "device", "spatial_axes", "expand_to", "float32", "to_host", "concrete"]


def spatial_axes(a) -> tuple[int, ...]:
    """The spatial axes of a channels-first array ``(B, C, *S)``: ``(2, ..., a.ndim - 1)``."""
    return tuple(range(2, a.ndim))


def expand_to(w, ndim: int):
    """Append singleton axes to ``w`` until it has ``ndim`` dimensions (``(B, C)`` -> ``(B, C, 1, 1)``)."""
    xp = array_namespace(w)
    return xp.reshape(w, tuple(w.shape) + (1,) * (ndim - w.ndim))


def float32(a):
    """``a`` as float32 (no copy when it already is)."""
    xp = array_namespace(a)
    return a if a.dtype == xp.float32 else xp.astype(a, xp.float32)


def to_host(a) -> np.ndarray:
    """A host NumPy copy of an array of any framework (a device array is copied to the CPU first)."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "detach"):  # torch
        a = a.detach().cpu()
    return np.asarray(a)


def concrete(a) -> bool:
    """Whether ``a`` holds values that Python can read: false for a JAX tracer (under ``jax.jit``, ``vmap``),
    told by its type without importing JAX; false for a tensor on PyTorch's data-less ``meta`` device."""
    if getattr(a, "is_meta", False):
        return False
    return not any(cls.__name__.endswith("Tracer") and cls.__module__.startswith("jax") for cls in type(a).__mro__)
