"""Sanity checks for saliency maps (Adebayo et al. 2018, "Sanity Checks for Saliency Maps", sec. 3): a method
that explains the model must change its maps when the model's weights are randomised. One score per sample, as
NumPy.

- :func:`randomization_check`: the cascading model-parameter randomisation test (the layers re-drawn from the top,
  one more at each step) or its independent-layer variant (one layer at a time), on copies of the model.
- :func:`spearman` and :func:`ssim`: the similarity of two batches of maps.
"""
from __future__ import annotations

import numpy as np

from ._xp import to_host

__all__ = ["randomization_check", "spearman", "ssim"]


def _pair(a, b):
    a, b = np.asarray(to_host(a), np.float64), np.asarray(to_host(b), np.float64)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"maps: expected two batches of maps (B, *S) of one shape, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("maps: the maps contain NaN or inf")
    return a, b


def _ranks(x):
    """Ranks ``1..N`` along the last axis of ``(B, N)``, ties given their average rank."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        _, inverse, counts = np.unique(x[i], return_inverse=True, return_counts=True)
        first = np.cumsum(counts) - counts  # the rank - 1 of each distinct value's first occurrence
        out[i] = (first + (counts + 1) / 2)[inverse.ravel()]
    return out


def spearman(a, b) -> np.ndarray:
    """``(B,)`` Spearman rank correlation of each pair of maps (flattened; ties get their average rank); 0 where a
    map is constant (no ranking)."""
    a, b = _pair(a, b)
    ra, rb = _ranks(a.reshape(a.shape[0], -1)), _ranks(b.reshape(b.shape[0], -1))
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    den = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    return np.divide((ra * rb).sum(1), den, out=np.zeros(a.shape[0]), where=den > 0)


def _gauss(x, sigma: float, radius: int, axis: int):
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    n = x.shape[axis]
    out = np.zeros(x.shape[:axis] + (n - 2 * radius,) + x.shape[axis + 1:])
    for k, w in enumerate(taps):
        out += w * np.take(x, np.arange(k, k + n - 2 * radius), axis=axis)
    return out


def _radius(sigma: float) -> int:
    return int(3.5 * sigma + 0.5)


def ssim(a, b, *, data_range: float = 1.0, sigma: float = 1.5) -> np.ndarray:
    """``(B,)`` mean structural similarity of each pair of ``(H, W)`` maps (Wang et al. 2004): local means,
    variances and covariance under a Gaussian window (``sigma`` 1.5, radius ``3.5 sigma``), ``C1 = (0.01 L)^2``,
    ``C2 = (0.03 L)^2`` with ``L = data_range`` (1 for normalised maps), averaged over the valid windows."""
    a, b = _pair(a, b)
    if a.ndim != 3:
        raise ValueError(f"maps: ssim compares (B, H, W) maps, got shape {a.shape}")
    radius = _radius(sigma)
    if min(a.shape[1:]) <= 2 * radius:
        raise ValueError(f"maps: ssim needs maps larger than its {2 * radius + 1}-pixel window, got {a.shape[1:]}")

    def blur(x):
        return _gauss(_gauss(x, sigma, radius, 1), sigma, radius, 2)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ma, mb = blur(a), blur(b)
    va, vb, cov = blur(a * a) - ma * ma, blur(b * b) - mb * mb, blur(a * b) - ma * mb
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    return s.mean(axis=(1, 2))


def randomization_check(model, inputs, *, method: str, layer=None, targets=None, layers=None, cascade: bool = True,
                        seed: int = 0, model_mode: str = "eval", data_format=None, progress=None, **options) -> dict:
    """The model-parameter randomisation test: maps of ``method`` on copies of ``model`` whose layers are re-drawn
    (:meth:`Engine.randomized`: Gaussian noise of each parameter's own RMS), compared with the maps of the model.

    ``layers``: what is randomised, from the top (the output side) down -- names or lists of names (a group
    randomised together, e.g. a block); default: every layer holding parameters, the last first. ``cascade``: step
    ``k`` randomises ``layers[:k + 1]`` (the cascading test); ``False``: ``layers[k]`` alone (independent). Targets
    are fixed to the model's own classes (``targets=None``: its top class per sample), so every step explains the
    same class. ``options`` go to :func:`camcore.explain`. Returns ``{"layers": the names of each step,
    "spearman": (steps, B), "ssim": (steps, B)}`` (SSIM for 2-D maps larger than its 11-pixel window only;
    ``None`` otherwise). A method that
    passes loses similarity as the model loses its weights. The model itself is never changed. ``progress``: a bar
    over the steps (default: when stderr is a terminal)."""
    from camcore.backends import adapter_for  # here: camcore imports no framework

    from .explain import explain
    from .perturbation import progress_bar
    from .targets import check_targets, class_indices

    engine = adapter_for(model, model_mode=model_mode, data_format=data_format)
    x = engine.check_inputs(inputs)
    checked = check_targets(targets, x.shape[0])
    if not callable(checked):
        outputs = engine.capture(x, [], checked, gradients=False).outputs
        checked = [int(c) for c in to_host(class_indices(checked, outputs)).tolist()]
    groups = [[n] for n in engine.parameter_layers()[::-1]] if layers is None else \
        [list(g) if isinstance(g, (list, tuple)) else [g] for g in layers]
    if not groups:
        raise ValueError("layers: the model has no layer with trainable parameters to randomise")
    kwargs = dict(method=method, layer=layer, targets=checked, model_mode=model_mode, data_format=data_format,
                  **options)
    spatial = len(engine.spatial_shape(x))

    def as_maps(out):
        """``(B, *S)`` maps; input gradients ``(B, C, *S)``/``(B, *S, C)`` as their largest magnitude over the
        channels, min-max normalised per sample (Adebayo et al.'s absolute-value visualisation)."""
        m = np.asarray(to_host(out), np.float64)
        if m.ndim == spatial + 1:
            return m
        m = np.abs(m).max(axis=-1 if engine._last(x) else 1)
        lo = m.min(axis=tuple(range(1, m.ndim)), keepdims=True)
        span = m.max(axis=tuple(range(1, m.ndim)), keepdims=True) - lo
        return np.divide(m - lo, span, out=np.zeros_like(m), where=span > 0)

    reference = as_maps(explain(model, inputs, **kwargs))
    steps, rho, sim, bar = [], [], [], progress_bar(len(groups), progress, unit="model")
    try:
        for k, group in enumerate(groups):
            chosen = [n for g in groups[: k + 1] for n in g] if cascade else group
            twin = engine.randomized(chosen, seed=seed + k)
            maps = as_maps(explain(twin, inputs, **kwargs))
            steps.append(group)
            rho.append(spearman(reference, maps))
            fits = maps.ndim == 3 and min(maps.shape[1:]) > 2 * _radius(1.5)
            sim.append(ssim(reference, maps) if fits else None)
            bar.update()
    finally:
        bar.close()
    return {"layers": steps, "spearman": np.stack(rho), "ssim": None if sim[0] is None else np.stack(sim)}
