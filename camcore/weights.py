"""Channel-weighting formulas of the class-activation-map family.

Every function takes the layer's activations ``A`` and the gradients ``G = dy^c/dA`` of the target score,
both channels-first ``(B, C, *S)`` with any number of spatial dims, and returns the weights ``w`` that multiply
``A`` before the channels are reduced: ``(B, C)`` for one weight per channel, or ``(B, C, *S)`` for one weight
per element. The map is then ``sum_k w_k * A_k`` (see :mod:`camcore.maps`). Pure Array-API code: the result is
an array of the inputs' namespace and device.
"""
from __future__ import annotations

from ._xp import array_namespace, concrete, spatial_axes, to_host
from .maps import unit_scale

__all__ = [
    "cam",
    "gradcam",
    "gradcam_pp",
    "xgradcam",
    "hirescam",
    "gradcam_elementwise",
    "layercam",
    "eigengradcam",
]


def _safe_div(num, den, eps: float):
    """``num / (den + eps)``, and 0 where that denominator is exactly 0 (instead of inf or NaN)."""
    xp = array_namespace(num, den)
    den = den + eps
    nonzero = den != 0
    return xp.where(nonzero, num / xp.where(nonzero, den, xp.ones_like(den)), xp.zeros_like(num))


def cam(class_weights, target_index, /):
    """CAM (Zhou et al., 2016, https://arxiv.org/abs/1512.04150), eq. (2): ``w^c_k`` = classifier row ``c``.

    Args:
        class_weights: ``(K, C)`` weights of the linear classifier that follows global average pooling.
        target_index: ``(B,)`` integer class index per sample.
    Returns: ``(B, C)``.
    """
    xp = array_namespace(class_weights, target_index)
    k = class_weights.shape[0]
    if concrete(target_index) and target_index.shape[0] and not bool(
            xp.all((target_index >= 0) & (target_index < k))):
        raise ValueError(f"target_index: expected class indices in [0, {k}) for {k} classifier rows, got "
                         f"{to_host(target_index).tolist()}")
    return xp.take(class_weights, target_index, axis=0)


def gradcam(activations, grads, /):
    """Grad-CAM (Selvaraju et al., 2017, https://arxiv.org/abs/1610.02391), eq. (1):
    ``w^c_k = 1/Z * sum_ij dy^c/dA^k_ij`` -- the spatial mean of the gradient.

    Args: ``activations``, ``grads``: ``(B, C, *S)``. Returns: ``(B, C)``.
    """
    xp = array_namespace(activations, grads)
    axes = spatial_axes(grads)
    g, scale = unit_scale(grads, "gradcam: the gradients", keep=2)  # the sum of G overflows near float32's max
    return xp.mean(g, axis=axes) * xp.squeeze(scale, axis=axes)


def gradcam_pp(activations, grads, /, *, eps: float = 0.0):
    """Grad-CAM++ (Chattopadhyay et al., 2018, https://arxiv.org/abs/1710.11063), eq. (19) with the
    exponential score, whose higher derivatives are powers of the first:

        alpha^kc_ij = G_ij^2 / (2 G_ij^2 + sum_ab A^k_ab * G_ij^3 + eps),    w^c_k = sum_ij alpha^kc_ij * relu(G_ij)

    where the denominator is 0 the paper sets alpha = 0; ``eps == 0`` is the paper's formula, pytorch-grad-cam
    uses ``eps=1e-6``. Only ``G_ij > 0`` contributes, and each term is evaluated as
    ``1 / (2 / G_ij + S_k + eps / G_ij^3)`` (``S_k = sum_ab A^k_ab``; ``G / (2 + S_k G + eps / G^2)`` for
    subnormal ``G``): the same value, free of the overflow and underflow of ``G^2``, ``G^3`` and ``S_k * G`` at
    any float32 magnitude (with ``eps > 0``, a term ``~G^3 / eps`` below float32's smallest normal number, 1.2e-38,
    may be 0).

    Args: ``activations``, ``grads``: ``(B, C, *S)``. Returns: ``(B, C)``.
    """
    xp = array_namespace(activations, grads)
    axes = spatial_axes(grads)
    a, m = unit_scale(activations, "gradcam++: the activations", keep=2)
    s = xp.sum(a, axis=axes, keepdims=True)  # S_k / m_k, exactly (m_k a power of two)
    sum_a = s * m
    huge = ~xp.isfinite(sum_a)  # S_k beyond float32: the terms times m_k, from s_k
    sum_a = xp.where(huge, xp.zeros_like(sum_a), sum_a)
    positive = grads > 0
    g = xp.where(positive, grads, xp.ones_like(grads))
    inv = 2 / g
    small = ~xp.isfinite(inv)  # subnormal G: G / (2 + S G), whose S G cannot overflow
    gm = g * m
    num = xp.where(huge, xp.ones_like(g) / m, xp.where(small, g, xp.ones_like(g)))
    den = xp.where(huge, 2 / gm + s, xp.where(small, 2 + sum_a * g, inv + sum_a))
    if eps:
        e = eps / g / g
        den = den + xp.where(huge, e / gm, xp.where(small, e, e / g))
    term = _safe_div(num, den, 0.0)
    return xp.sum(xp.where(positive, term, xp.zeros_like(term)), axis=axes)


def xgradcam(activations, grads, /, *, eps: float = 0.0):
    """XGrad-CAM (Fu et al., 2020, https://arxiv.org/abs/2008.02312), eq. (11):
    ``w^c_k = sum_ij (A^k_ij / sum_ab A^k_ab) * G^k_ij``; a channel whose activations sum to 0 gets weight 0
    (``eps`` is added to that sum first; pytorch-grad-cam uses ``1e-7``).

    Args: ``activations``, ``grads``: ``(B, C, *S)``. Returns: ``(B, C)``.
    """
    xp = array_namespace(activations, grads)
    axes = spatial_axes(grads)
    g, scale = unit_scale(grads, "xgradcam: the gradients", keep=2)  # the ratio is linear in G
    a, m = unit_scale(activations, "xgradcam: the activations", keep=2)  # and scale-free in A (eps scaled too)
    w = _safe_div(xp.sum(g * a, axis=axes), xp.sum(a, axis=axes), eps / xp.squeeze(m, axis=axes))
    return w * xp.squeeze(scale, axis=axes)


def hirescam(activations, grads, /):
    """HiResCAM (Draelos & Carin, 2020, https://arxiv.org/abs/2011.08891), eq. (4):
    element-wise weights ``w^k_ij = G^k_ij``, so the map is ``sum_k G^k * A^k``.

    Args: ``activations``, ``grads``: ``(B, C, *S)``. Returns: ``(B, C, *S)``.
    """
    return grads


def gradcam_elementwise(activations, grads, /):
    """Grad-CAM element-wise (pytorch-grad-cam's ``GradCAMElementWise``): map ``sum_k relu(G^k * A^k)``,
    i.e. element-wise weights ``G`` where ``G * A > 0`` and 0 elsewhere.

    Args: ``activations``, ``grads``: ``(B, C, *S)``. Returns: ``(B, C, *S)``.
    """
    xp = array_namespace(activations, grads)
    return xp.where(grads * activations > 0, grads, xp.zeros_like(grads))


def layercam(activations, grads, /):
    """LayerCAM (Jiang et al., 2021, https://doi.org/10.1109/TIP.2021.3089943), eq. (5):
    element-wise weights ``w^k_ij = relu(G^k_ij)``.

    Args: ``activations``, ``grads``: ``(B, C, *S)``. Returns: ``(B, C, *S)``.
    """
    xp = array_namespace(activations, grads)
    return xp.maximum(grads, xp.zeros_like(grads))


def eigengradcam(activations, grads, /):
    """EigenGrad-CAM (pytorch-grad-cam): the first principal component of ``G * A``, i.e. weights ``G``
    reduced with :func:`camcore.maps.principal_component` instead of the channel sum. (Eigen-CAM itself,
    Muhammad & Yeasin 2020, https://arxiv.org/abs/2008.00299, needs no weights: it reduces ``A`` the same way.)

    Args: ``activations``, ``grads``: ``(B, C, *S)``. Returns: ``(B, C, *S)``.
    """
    return grads
