"""Post-processing of class-activation maps: reduce over channels, rectify, upsample, normalise, fuse.

All functions are pure Array-API code on channels-first arrays with any number of spatial dims ``S``; the result
has the inputs' namespace and device.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ._xp import array_namespace, concrete as _concrete, device, expand_to

__all__ = ["weigh", "channel_sum", "unit_scale", "principal_component", "relu", "normalize", "upsample", "fuse",
           "guide"]


def weigh(weights, activations, /):
    """``w * A`` with ``(B, C)`` weights broadcast over space, or ``(B, C, *S)`` weights taken element-wise.
    Returns ``(B, C, *S)``; ``weights=None`` means all ones (returns ``A``)."""
    if weights is None:
        return activations
    return expand_to(weights, activations.ndim) * activations


def channel_sum(weighted, /):
    """``sum_k X_k``: ``(B, C, *S) -> (B, *S)``, the combination step of every CAM."""
    xp = array_namespace(weighted)
    return xp.sum(weighted, axis=1)


def principal_component(weighted, /, *, orient=None):
    """Projection of each position's channel vector on the first principal component (Eigen-CAM, eq. (4)).

    For each sample, ``X`` is read as ``N = prod(S)`` points in ``R^C``, centred over the points, and projected
    on its first right singular vector ``v_1``: ``p = (X - mean) v_1``, shape ``(B, *S)``. The SVD's sign is
    arbitrary; it is fixed so that ``p`` has non-negative covariance with the ``(B, *S)`` map ``orient``, by
    default the per-position energy ``e = sum_k X_k^2``: the side of the component where the layer responds
    strongly is positive. That holds at layers with signed activations (a convolution before its batch norm, a
    residual sum) as at rectified ones, where the channel sum does not (docs/methods.md, "Eigen-CAM sign").
    Methods that weigh the activations pass their own map (EigenGrad-CAM: Grad-CAM's).
    """
    xp = array_namespace(weighted)
    b, c, *s = weighted.shape
    n = int(np.prod(s))
    points = xp.permute_dims(xp.reshape(weighted, (b, c, n)), (0, 2, 1))  # (B, N, C)
    # centring, the SVD and the energy overflow near float32's maximum otherwise
    points, scale = unit_scale(points, "eigen: the weighted activations")
    reference = xp.sum(points * points, axis=2) if orient is None else \
        unit_scale(xp.reshape(orient, (b, n)), "eigen: the orientation map")[0]
    points = points - xp.mean(points, axis=1, keepdims=True)
    _, _, vh = xp.linalg.svd(points, full_matrices=False)
    v1 = vh[:, 0, :]  # (B, C)
    proj = xp.sum(points * v1[:, None, :], axis=2)  # (B, N), zero-mean over N
    agreement = xp.sum(proj * reference, axis=1)  # N times the covariance with the reference (proj has mean 0)
    sign = xp.where(agreement < 0, -xp.ones_like(agreement), xp.ones_like(agreement))
    return xp.reshape(proj * (sign[:, None] * scale[:, :, 0]), (b, *s))


def unit_scale(x, what: str = "the array", /, *, keep: int = 1):
    """``(x / m, m)``: ``m`` the power of two at or just below the largest ``|x|`` over all but the first ``keep``
    axes (each sample's, or with ``keep=2`` each channel's; 1 where that is 0), keeping those axes. ``x / m`` lies
    in ``[-2, 2]``, so the scale-free part of a computation cannot overflow, and it is exact: a power of two only
    moves the exponent, so sums and products on ``x / m`` round exactly as on ``x`` (an exact zero stays zero).
    Non-finite values raise ``ValueError`` starting with ``what`` (an SVD never returns on them) where they can be
    read (not under ``jax.jit``)."""
    xp = array_namespace(x)
    axes = tuple(range(keep, x.ndim))
    m = xp.max(xp.abs(x), axis=axes, keepdims=True)
    if _concrete(m) and not bool(xp.all(xp.isfinite(m))):
        raise ValueError(f"{what} contain NaN or inf (an overflow upstream, or non-finite weights)")
    info = xp.finfo(x.dtype)  # the exponents of the largest number and of the smallest subnormal one
    lo, hi = math.log2(float(info.smallest_normal) * float(info.eps)), math.frexp(float(info.max))[1] - 1
    e = xp.clip(xp.floor(xp.log2(xp.where(m > 0, m, xp.ones_like(m)))), lo, hi)
    m = xp.pow(xp.full_like(m, 2), e)
    return x / m, m


def relu(cam, /):
    """``max(cam, 0)``: keep the regions with a positive influence on the target (Grad-CAM eq. (2))."""
    xp = array_namespace(cam)
    return xp.maximum(cam, xp.zeros_like(cam))


def normalize(cam, /):
    """Per-sample min-max normalisation of ``(B, *S)`` maps to ``[0, 1]``; a constant map becomes all zeros
    (never NaN). Range-safe (the maps are divided by their largest magnitude first); NaN or inf raise
    ``ValueError`` where they can be read."""
    xp = array_namespace(cam)
    if cam.ndim < 2 or any(n == 0 for n in cam.shape[1:]):
        raise ValueError(f"normalize: expected maps (B, *S) with at least one position, got shape {tuple(cam.shape)}")
    axes = tuple(range(1, cam.ndim))
    cam = unit_scale(cam, "normalize: the maps")[0]  # the span max - min overflows near float32's maximum
    lo = xp.min(cam, axis=axes, keepdims=True)
    span = xp.max(cam, axis=axes, keepdims=True) - lo
    flat = span == 0  # NaN (only under jax.jit, where nothing can raise) stays NaN, never a blank map
    return xp.where(flat, xp.zeros_like(cam), (cam - lo) / xp.where(flat, xp.ones_like(span), span))


def _linear_taps(n_in: int, n_out: int):
    """Source indices and weights of 1-D linear resampling with half-pixel centres (``align_corners=False``,
    as OpenCV's ``INTER_LINEAR`` and ``torch.nn.functional.interpolate``), clamped at the borders."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def upsample(cam, size: Sequence[int], /):
    """Separable linear interpolation of ``(B, *S)`` maps to ``(B, *size)`` for any number of spatial dims
    (bilinear for images, trilinear for volumes), half-pixel centres. Identity where sizes already match."""
    xp = array_namespace(cam)
    if any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1 for v in size):
        raise ValueError(f"upsample: size must be positive ints, got {tuple(size)}")
    size = tuple(int(v) for v in size)
    if len(size) != cam.ndim - 1:
        raise ValueError(f"upsample: size must have {cam.ndim - 1} entries for maps of shape "
                         f"{tuple(cam.shape)}, got {size}")
    dev = device(cam)
    for axis, (n_in, n_out) in enumerate(zip(cam.shape[1:], size), start=1):
        if n_in == n_out:
            continue
        i0, i1, t = _linear_taps(n_in, n_out)
        shape = [1] * cam.ndim
        shape[axis] = n_out
        t = xp.reshape(xp.asarray(t, dtype=cam.dtype, device=dev), tuple(shape))
        lo = xp.take(cam, xp.asarray(i0, device=dev), axis=axis)
        hi = xp.take(cam, xp.asarray(i1, device=dev), axis=axis)
        # a convex combination (hi - lo overflows near float32's maximum), exact where neighbours are equal
        cam = xp.where(hi == lo, lo, lo * (1 - t) + hi * t)
    return cam


def fuse(cams: Sequence, size: Sequence[int] | None = None, /):
    """Fuse the maps of several layers (pytorch-grad-cam's ``aggregate_multi_layers``): each ``(B, *S_l)`` map is
    min-max normalised at its own resolution (raw scales differ between layers), upsampled to ``size`` (default:
    the first map's ``S``), and the maps are averaged. Returns ``(B, *size)``; a single map is only upsampled
    (not normalised)."""
    if not len(cams):
        raise ValueError("fuse: expected one map per layer, got none")
    size = tuple(cams[0].shape[1:]) if size is None else tuple(size)
    if len(cams) == 1:
        return upsample(cams[0], size)
    xp = array_namespace(*cams)
    return xp.mean(xp.stack([upsample(normalize(c), size) for c in cams], axis=0), axis=0)


def guide(grads, cam, /, *, channels_last: bool = False):
    """Guided Grad-CAM (Selvaraju et al. 2017, sec. 3): guided backpropagation ``grads`` times the map ``cam``
    ``(B, *S)`` (normalised, at the inputs' size), broadcast over the channels: ``grads`` and the result are
    ``(B, C, *S)``, or ``(B, *S, C)`` for ``channels_last``."""
    xp = array_namespace(grads, cam)
    if tuple(cam.shape) != tuple(grads.shape[:1] + (grads.shape[1:-1] if channels_last else grads.shape[2:])):
        raise ValueError(f"guided: the map {tuple(cam.shape)} does not match the inputs' spatial shape of the "
                         f"gradients {tuple(grads.shape)}; guided maps need upsample=True")
    return grads * xp.expand_dims(xp.astype(cam, grads.dtype), axis=-1 if channels_last else 1)
