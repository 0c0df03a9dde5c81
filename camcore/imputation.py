"""Noisy linear imputation (ROAD, Rong et al. 2022, sec. 4): each removed pixel takes the weighted mean of its 8
neighbours (1/6 across an edge, 1/12 across a corner, those outside the image left out), plus Gaussian noise.

For the removed set ``U`` of one image this is the linear system ``D_i x_i - sum_j w_ij x_j = 0`` (``i`` in
``U``, ``D_i = sum_j w_ij`` over the neighbours in the image, the kept pixels' values moved to the right-hand
side): a weighted graph Laplacian with the kept pixels as Dirichlet boundary, symmetric positive definite as soon
as one pixel is kept. Rong et al. and pytorch-grad-cam solve it per image with a sparse direct solver on the
host; here it is solved for the whole batch at once, every image and channel its own system, by conjugate
gradients preconditioned with a multigrid V-cycle (damped Jacobi smoothing, 2x2 aggregation, the same stencil on
every level), in the images' own namespace and device (Array-API code).
"""
from __future__ import annotations

import numpy as np

from ._xp import array_namespace, device

__all__ = ["linear_imputation", "noisy_linear_imputation"]


def _part(a, axis: int, start, stop):
    index = [slice(None)] * a.ndim
    index[axis] = slice(start, stop)
    return a[tuple(index)]


def _pad(u):
    """``(..., H, W)`` -> ``(..., H + 2, W + 2)``, a border of zeros."""
    xp = array_namespace(u)
    row = xp.zeros_like(u[..., :1, :])
    u = xp.concat([row, u, row], axis=-2)
    col = xp.zeros_like(u[..., :1])
    return xp.concat([col, u, col], axis=-1)


def _tents(u):
    """The separable ``[1, 2, 1] x [1, 2, 1]`` filter of ``(..., H, W)``, zero outside."""
    p = _pad(u)
    t = p[..., 1:-1] * 2 + (p[..., :-2] + p[..., 2:])
    return t[..., 1:-1, :] * 2 + (t[..., :-2, :] + t[..., 2:, :])


def _neighbours(u):
    """``sum_j w_ij u_j`` over the 8 neighbours of each pixel of ``(..., H, W)`` (zero outside): the
    ``[1, 2, 1] x [1, 2, 1] / 12`` filter less its centre ``1/3``."""
    return (_tents(u) - 4 * u) / 12


def _level(free):
    """One grid of the V-cycle, ``(free, a, g, inv, c, h)``: the removed pixels ``free`` (``(R, 1, H, W)``, 0/1)
    and the coefficients of ``A z = free (D z - N z) = a z - g T z`` (``T`` the ``[1, 2, 1] x [1, 2, 1]``
    filter) and of its Jacobi sweep ``z + inv (r - A z) = c z + h T z + inv r`` (``inv = free / D``). Vectors
    are zero on the kept pixels."""
    xp = array_namespace(free)
    diag = _neighbours(xp.ones_like(free[:1, ...]))
    inv = free / diag
    return free, free * (diag + 1 / 3), free / 12, inv, -inv / 3, inv / 12


def _apply(level, z):
    return level[1] * z - level[2] * _tents(z)


def _smooth(level, z, inv_r):
    """One Jacobi sweep on ``A z = r``, given ``inv r``."""
    return level[4] * z + level[5] * _tents(z) + inv_r


def _pad_even(a):
    xp = array_namespace(a)
    for axis in (-2, -1):
        if a.shape[axis] % 2:
            a = xp.concat([a, xp.zeros_like(_part(a, axis, 0, 1))], axis=axis)
    return a


def _restrict(a, op):
    """``(..., H, W)`` -> ``(..., ceil(H/2), ceil(W/2))``: ``op`` (``xp.add``, ``xp.minimum``) over each 2x2
    block."""
    a = _pad_even(a)
    a = op(a[..., 0::2, :], a[..., 1::2, :])
    return op(a[..., 0::2], a[..., 1::2])


def _prolong(e, shape):
    """Each coarse pixel copied to its 2x2 block, cropped to ``shape``."""
    xp = array_namespace(e)
    h, w = e.shape[-2:]
    lead = tuple(e.shape[:-2])
    fine = xp.broadcast_to(xp.reshape(e, lead + (h, 1, w, 1)), lead + (h, 2, w, 2))
    return xp.reshape(fine, lead + (2 * h, 2 * w))[..., : shape[0], : shape[1]]


def _levels(free, coarsest: int = 4):
    """The grids: a coarse pixel is free when its whole 2x2 block is (the kept pixels stay a boundary)."""
    xp = array_namespace(free)
    levels = [_level(free)]
    while min(levels[-1][0].shape[-2:]) > coarsest:
        levels.append(_level(_restrict(levels[-1][0], xp.minimum)))
    return tuple(levels)


def _vcycle(levels, r, k: int = 0, sweeps: int = 2):
    """An approximate ``A^-1 r`` on level ``k``: ``sweeps`` Jacobi sweeps from zero, the residual's correction
    from the next level (2x2 sums down, copies up), ``sweeps`` sweeps; only sweeps on the coarsest. Symmetric
    positive definite, so it preconditions CG."""
    level = levels[k]
    z = inv_r = level[3] * r
    if k + 1 == len(levels):
        for _ in range(4 * sweeps - 1):
            z = _smooth(level, z, inv_r)
        return z
    for _ in range(sweeps - 1):
        z = _smooth(level, z, inv_r)
    xp = array_namespace(r)
    coarse = _vcycle(levels, _restrict(r - _apply(level, z), xp.add), k + 1, sweeps)
    z = z + level[0] * _prolong(coarse, tuple(r.shape[-2:]))
    for _ in range(sweeps):
        z = _smooth(level, z, inv_r)
    return z


def _dot(a, b):
    xp = array_namespace(a)
    return xp.sum(a * b, axis=(-2, -1), keepdims=True)


def _ratio(num, den):
    """``num / den`` where ``den > 0``, else 0 (a system already solved, or one with nothing removed)."""
    xp = array_namespace(num)
    ok = den > 0
    return xp.where(ok, num / xp.where(ok, den, xp.ones_like(den)), xp.zeros_like(den))


def _start(x, free):
    """The grids, the right-hand side ``b = free N(x (1 - free))`` and CG's state ``(z, r, p, rs, |b|)``."""
    xp = array_namespace(x)
    levels = _levels(free)
    b = free * _neighbours(x * (1 - free))
    s = _vcycle(levels, b)
    return levels, (xp.zeros_like(b), b, s, _dot(b, s), xp.sqrt(_dot(b, b)))


def _iterate(levels, state):
    """One preconditioned CG step; also the largest relative residual ``|r| / |b|`` over the systems."""
    xp = array_namespace(state[0])
    z, r, p, rs, norm_b = state
    q = _apply(levels[0], p)
    alpha = _ratio(rs, _dot(p, q))
    z, r = z + alpha * p, r - alpha * q
    s = _vcycle(levels, r)
    rs_new = _dot(r, s)
    p = s + _ratio(rs_new, rs) * p
    worst = xp.max(_ratio(xp.sqrt(_dot(r, r)), norm_b))
    return (z, r, p, rs_new, norm_b), worst


def linear_imputation(images, removed, *, tol: float = 1e-4, max_iter: int = 100):
    """``(R, C, H, W)``: the channels-first ``images`` with the pixels where ``removed`` (``(R, H, W)``, bool or
    0/1) is set replaced by the solution of the imputation system (module docstring), solved by CG to a relative
    residual ``tol`` in every image and channel (float32 at least; about 8 iterations for ``1e-4``, whatever
    the size). Images with no pixel kept are not solved: their removed pixels are 0."""
    xp = array_namespace(images)
    dtype = xp.float64 if images.dtype == xp.float64 else xp.float32
    x = xp.astype(images, dtype)
    free = xp.astype(xp.expand_dims(xp.astype(removed, xp.bool), axis=1), dtype)  # (R, 1, H, W)
    levels, state = _start(x, free)
    for _ in range(max_iter):
        state, worst = _iterate(levels, state)
        if float(worst) <= tol:
            break
    return xp.astype(x * (1 - free) + state[0], images.dtype)


def noisy_linear_imputation(images, removed, *, noise: float = 0.01, seed=0, **solver):
    """:func:`linear_imputation` plus ``noise * N(0, 1)`` on each removed pixel and channel, drawn on the host by
    NumPy's generator from ``seed``, or from ``seed[r]`` for image ``r`` when it is a list (the same noise on
    every backend and device, however the images are batched)."""
    xp = array_namespace(images)
    out = linear_imputation(images, removed, **solver)
    if noise:
        seeds = seed if isinstance(seed, list) else [seed]
        shape = tuple(images.shape[1:]) if isinstance(seed, list) else tuple(images.shape)
        draws = np.stack([np.random.default_rng(s).standard_normal(shape, np.float32) for s in seeds])
        n = xp.asarray(draws.reshape(tuple(images.shape)), device=device(images))
        free = xp.expand_dims(xp.astype(xp.astype(removed, xp.bool), images.dtype), axis=1)
        out = out + noise * free * xp.astype(n, images.dtype)
    return out
