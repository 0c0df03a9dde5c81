"""Targets: what score of the model a map explains, one scalar per sample.

A target is ``None`` (each sample's top class), an ``int`` (that class for every sample), a sequence of ints
(one class per sample), or a callable ``f(outputs) -> (B,)`` scores for anything else (a segmentation mask's
total, a detection box's score, a captioning model's token log-likelihood, one head of a multi-output model).
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from ._xp import array_namespace, device

__all__ = ["check_targets", "class_indices", "target_scores", "softmax", "class_scores", "first_leaf"]


def check_targets(targets, batch: int):
    """Validate ``targets`` against the batch size before the model runs.

    Returns ``None``, a callable, or a ``list[int]`` of length ``batch``.
    Raises ``TypeError``/``ValueError`` naming ``targets``, what was expected and what was received.
    """
    if targets is None or callable(targets):
        return targets
    if isinstance(targets, (bool, np.bool_)):
        raise TypeError(f"targets: expected None, an int class index, a sequence of ints or a callable; "
                        f"got the bool {targets!r}")
    if isinstance(targets, numbers.Integral):
        return [int(targets)] * batch
    if hasattr(targets, "shape") and hasattr(targets, "dtype"):  # any array: read it once, on the host
        host = np.asarray(targets.tolist() if hasattr(targets, "tolist") else targets)
        scalar_int = host.ndim == 0 and np.issubdtype(host.dtype, np.integer) and host.dtype != np.bool_
        if host.ndim > 1 or (host.ndim == 0 and not scalar_int):
            raise TypeError(f"targets: expected an integer scalar or a 1-D integer array of class indices, got "
                            f"an array of dtype {targets.dtype} and shape {tuple(targets.shape)}")
        if scalar_int:
            return [int(host)] * batch
        targets = host
    if isinstance(targets, (Sequence, np.ndarray)) and not isinstance(targets, (str, bytes)):
        items = list(targets)  # arrays reaching here are 1-D (checked above)
        bad = [t for t in items if isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Integral)]
        if bad:
            raise TypeError(f"targets: expected one int class index per sample, got {bad[0]!r} "
                            f"({type(bad[0]).__name__}) among {items!r}")
        if len(items) != batch:
            raise ValueError(f"targets: expected one class index per sample, {batch} for a batch of {batch}; "
                             f"got {len(items)}: {items!r}")
        return [int(t) for t in items]
    raise TypeError(f"targets: expected None, an int class index, a sequence of ints or a callable "
                    f"f(outputs) -> (B,) scores; got {type(targets).__name__}")


def class_indices(targets, outputs):
    """Class index per sample as a ``(B,)`` integer array (the namespace's default integer dtype: int64, or int32
    in JAX without x64) beside ``outputs`` (``(B, K)`` logits): the top class
    for ``targets=None``, else the checked list. Raises ``ValueError`` for an index outside ``[0, K)``."""
    xp = array_namespace(outputs)
    if outputs.ndim != 2:
        raise ValueError(f"targets: a class index needs model outputs of shape (B, num_classes), but the model "
                         f"returned shape {tuple(outputs.shape)}; pass a callable targets=f(outputs) -> (B,) "
                         f"scores instead")
    if targets is None:
        return xp.astype(xp.argmax(outputs, axis=1), _default_int(xp))
    k = outputs.shape[1]
    bad = [t for t in targets if not 0 <= t < k]
    if bad:
        raise ValueError(f"targets: class index {bad[0]} is out of range for a model with {k} outputs "
                         f"(expected 0 <= index < {k}); got {targets!r}")
    return xp.asarray(targets, dtype=_default_int(xp), device=device(outputs))


def _default_int(xp):
    return xp.asarray(0).dtype


def target_scores(targets, outputs, batch: int, *, differentiable: bool = False):
    """The per-sample scores ``y^c`` to explain, shape ``(B,)``, differentiable in the outputs' framework.

    ``targets`` comes from :func:`check_targets`. For class indices the score is the output (logit) of that
    class; a callable is applied to the raw model outputs (any structure) and must return ``(B,)`` (of the
    outputs' framework when ``differentiable``: a gradient is taken through it).
    Returns ``(scores, indices)`` where ``indices`` is ``None`` for callable targets.
    """
    if callable(targets):
        scores = targets(outputs)
        shape = tuple(getattr(scores, "shape", ()))
        if shape != (batch,):
            raise ValueError(f"targets: the callable must return one score per sample, shape ({batch},); "
                             f"it returned {type(scores).__name__} of shape {shape}")
        want, got = (_framework(first_leaf(outputs)), _framework(scores)) if differentiable else (None, None)
        if want != got:
            raise TypeError(f"targets: the callable must return a {want} array computed from the outputs, so "
                            f"that the gradient can flow through it; it returned {type(scores).__module__}."
                            f"{type(scores).__name__} (compute the score with {want}'s operations, not NumPy's)")
        return scores, None
    if not hasattr(outputs, "ndim"):
        raise ValueError(f"targets: the model returned {type(outputs).__name__}, not one array of logits; "
                         f"pass a callable targets=f(outputs) -> (B,) scores to pick what to explain")
    idx = class_indices(targets, outputs)
    xp = array_namespace(outputs)
    hit = xp.arange(outputs.shape[1], device=device(outputs))[None, :] == idx[:, None]
    return xp.sum(xp.where(hit, outputs, xp.zeros_like(outputs)), axis=1), idx


def softmax(logits, /):
    """Class probabilities ``exp(z_c - max z) / sum_j exp(z_j - max z)`` over the last axis (``(..., K)``), in the
    logits' float dtype; stable for large logits."""
    xp = array_namespace(logits)
    z = logits - xp.max(logits, axis=-1, keepdims=True)
    e = xp.exp(z)
    return e / xp.sum(e, axis=-1, keepdims=True)


def class_scores(outputs, index: int, *, probability: bool = False):
    """``(M,)`` float32 scores of class ``index`` in ``(M, K)`` logits: the logit ``y^c``, or with
    ``probability=True`` the softmax probability ``p^c`` (Score-CAM's score, computed in float32)."""
    xp = array_namespace(outputs)
    out = xp.astype(outputs, xp.float32)
    return (softmax(out) if probability else out)[:, index]


def first_leaf(tree):
    """The first array of an output tree (tuples, lists, dicts)."""
    while isinstance(tree, (list, tuple, dict)) and tree:
        tree = next(iter(tree.values())) if isinstance(tree, dict) else tree[0]
    return tree


def _framework(a) -> str:
    """The top-level package of an array's type (``jaxlib`` arrays are ``jax``'s)."""
    root = type(a).__module__.split(".")[0]
    return {"jaxlib": "jax"}.get(root, root)
