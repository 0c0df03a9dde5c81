"""Faithfulness of maps to the model: the score of the target as the pixels a map ranks highest are removed or
inserted (RISE), and the confidence on the image times its map (Grad-CAM++). One score per sample, as NumPy.

The perturbed inputs are built in the inputs' own framework and device (Array-API code) and scored in chunks of
``batch_size`` rows by the model through its backend's engine (one forward pass per chunk, all samples and steps
together; no gradient). Scores are the target's softmax probability for class targets (``targets=None``: each
sample's top class on the unperturbed inputs), or a callable target's own score.
"""
from __future__ import annotations

import numpy as np

from ._xp import array_namespace, device, float32, to_host
from .imputation import noisy_linear_imputation
from .perturbation import progress_bar
from .targets import check_targets, class_indices, softmax, target_scores

__all__ = ["deletion_auc", "insertion_auc", "deletion_curve", "road_curve", "road", "average_drop",
           "increase_in_confidence", "win", "BASELINES", "ROAD_ORDERS"]

BASELINES = ("zeros", "mean", "blur")
ROAD_ORDERS = ("morf", "lerf", "combined")
PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
IMPUTE_ROWS = 8  # images imputed together: the solver's arrays stay in the CPU's caches (32: 2x slower per image)


def _engine(model, model_mode, data_format, batch_size):
    from camcore.backends import adapter_for, check_batch_size  # here: camcore imports no framework

    check_batch_size(batch_size)
    return adapter_for(model, model_mode=model_mode, data_format=data_format)


def _maps(cams, size, b) -> np.ndarray:
    """Host float64 maps ``(B, *size)``; ``ValueError`` naming ``cams`` for another shape or non-finite values."""
    m = np.asarray(to_host(cams), np.float64)
    if m.shape != (b, *size):
        raise ValueError(f"cams: expected maps of shape {(b, *size)} (one per sample, at the inputs' spatial size: "
                         f"explain(..., upsample=True)), got {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("cams: the maps contain NaN or inf")
    return m


def _scores(engine, chunks, total, classes, targets, progress):
    """``(total,)`` host float64 target scores of the perturbed inputs that ``chunks`` yields (arrays of the core's
    namespace, ``total`` rows in all), the target of row ``j`` being ``classes[j]`` (an int per row) or the
    callable ``targets``; one forward pass per chunk."""
    out, done, bar = [], 0, progress_bar(total, progress, unit="image")
    try:
        for chunk in chunks:
            xp = array_namespace(chunk)
            outputs = engine.capture(chunk, [], None, gradients=False).outputs
            if callable(targets):
                s = target_scores(targets, outputs, chunk.shape[0])[0]
            else:
                p = softmax(float32(outputs))
                onehot = np.eye(p.shape[1], dtype=np.float32)[classes[done : done + chunk.shape[0]]]
                s = xp.sum(p * xp.asarray(onehot, device=device(p)), axis=1)
            out.append(np.asarray(to_host(s), np.float64))
            done += chunk.shape[0]
            bar.update(chunk.shape[0])
    finally:
        bar.close()
    return np.concatenate(out)


def _chunks(rows, batch_size):
    """``rows`` (an array) in slices of ``batch_size``."""
    return (rows[start : start + batch_size] for start in range(0, rows.shape[0], batch_size))


def _ranks(cams, descending: bool) -> np.ndarray:
    """``(B, N)`` place of each pixel of the flattened ``cams`` in the order of saliency (highest first when
    ``descending``), ties by position."""
    flat = cams.reshape(cams.shape[0], -1)
    order = np.argsort(-flat if descending else flat, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(flat.shape[1])[None, :], axis=1)
    return rank


def _setup(model, inputs, cams, targets, model_mode, data_format, batch_size):
    engine = _engine(model, model_mode, data_format, batch_size)
    x = engine.check_inputs(inputs)
    b = x.shape[0]
    checked = check_targets(targets, b)
    size = engine.spatial_shape(x)
    cams = _maps(cams, size, b)
    core = engine._core_outputs(x)
    if callable(checked):
        classes = None
    else:
        outputs = engine.capture(x, [], checked, gradients=False).outputs
        classes = [int(c) for c in to_host(class_indices(checked, outputs)).tolist()]
    return engine, core, cams, checked, classes, engine._last(x)


def _baseline(x, baseline, last: bool):
    """The image pixels are replaced by: ``"zeros"``; ``"mean"``, each sample's per-channel mean; ``"blur"``, a
    Gaussian blur (sigma 5 pixels, radius 10, edges replicated) of the image, as RISE's insertion; or an array
    shaped like ``x``."""
    xp = array_namespace(x)
    spatial = tuple(range(1, x.ndim - 1)) if last else tuple(range(2, x.ndim))
    if isinstance(baseline, str):
        if baseline not in BASELINES:
            raise ValueError(f"baseline: expected one of {BASELINES} or an array shaped like the inputs, got "
                             f"{baseline!r}")
        if baseline == "zeros":
            return xp.zeros_like(x)
        if baseline == "mean":
            return xp.broadcast_to(xp.mean(x, axis=spatial, keepdims=True), x.shape)
        return _blur(x, spatial)
    base = xp.asarray(baseline, dtype=x.dtype, device=device(x)) if not hasattr(baseline, "shape") else baseline
    if tuple(base.shape) != tuple(x.shape):
        raise ValueError(f"baseline: expected an array of the inputs' shape {tuple(x.shape)}, got "
                         f"{tuple(base.shape)}")
    return base


def _blur(x, axes, sigma: float = 5.0, radius: int = 10):
    """Separable Gaussian blur of ``x`` along ``axes`` (edges replicated)."""
    xp = array_namespace(x)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = taps / taps.sum()
    for axis in axes:
        n = x.shape[axis]
        idx = np.clip(np.arange(n)[:, None] + np.arange(-radius, radius + 1)[None, :], 0, n - 1)  # (n, taps)
        out = None
        for k, w in enumerate(taps):
            term = xp.take(x, xp.asarray(idx[:, k], device=device(x)), axis=axis) * float(w)
            out = term if out is None else out + term
        x = out
    return x


def deletion_curve(model, inputs, cams, *, targets=None, steps: int = 20, baseline="zeros", insertion=False,
                   batch_size: int = 32, model_mode: str = "eval", data_format=None, progress=None) -> np.ndarray:
    """``(B, steps + 1)``: the target's score as the ``k / steps`` fraction of pixels that ``cams`` ranks highest
    (ties by position) is replaced by ``baseline`` (deletion), or, with ``insertion``, is put back into the
    baseline (insertion), ``k = 0 .. steps`` (RISE, Petsiuk et al. 2018, sec. 4.1). ``cams``: ``(B, *S)`` maps at
    the inputs' spatial size; every channel of a pixel moves together."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    engine, x, cams, checked, classes, last = _setup(model, inputs, cams, targets, model_mode, data_format,
                                                      batch_size)
    xp = array_namespace(x)
    base = _baseline(x, baseline, last)
    b, n = cams.shape[0], int(np.prod(cams.shape[1:]))
    rank = _ranks(cams, descending=True)
    counts = np.rint(np.arange(steps + 1) / steps * n).astype(np.int64)

    def rows(i):
        moved = rank[i][None, :] < counts[:, None]  # (steps + 1, N): the pixels taken at each step
        keep = moved if insertion else ~moved
        m = xp.asarray(keep.reshape(steps + 1, *cams.shape[1:]).astype(np.float32), device=device(x))
        m = xp.astype(xp.expand_dims(m, axis=-1 if last else 1), x.dtype)  # broadcast over the channels
        return x[i : i + 1] * m + base[i : i + 1] * (1 - m)

    chunks = _chunks(xp.concat([rows(i) for i in range(b)]), batch_size)
    per_row = None if classes is None else [c for c in classes for _ in range(steps + 1)]
    return _scores(engine, chunks, b * (steps + 1), per_row, checked, progress).reshape(b, steps + 1)


def _auc(curve):
    """The trapezoid area under each ``(B, K + 1)`` curve over ``[0, 1]``."""
    return (curve[:, 1:] + curve[:, :-1]).sum(axis=1) / (2 * (curve.shape[1] - 1))


def deletion_auc(model, inputs, cams, **options) -> np.ndarray:
    """``(B,)`` area under the deletion curve (:func:`deletion_curve`): lower is more faithful (removing what the
    map ranks first destroys the score fastest)."""
    return _auc(deletion_curve(model, inputs, cams, **options))


def insertion_auc(model, inputs, cams, *, baseline="blur", **options) -> np.ndarray:
    """``(B,)`` area under the insertion curve (into a blurred image by default, as RISE): higher is more
    faithful."""
    return _auc(deletion_curve(model, inputs, cams, baseline=baseline, insertion=True, **options))


def _removed_counts(percentiles, n: int) -> np.ndarray:
    """How many of ``n`` pixels ``p`` % removes: ``n - ceil((n - 1)(100 - p) / 100)``, the pixels at or above the
    map's ``(100 - p)``-th percentile (NumPy's linear interpolation) when its values are distinct, as
    pytorch-grad-cam's ROAD thresholds them."""
    if isinstance(percentiles, (str, bytes)) or not hasattr(percentiles, "__len__") or not len(percentiles):
        raise ValueError(f"percentiles: expected a non-empty sequence of numbers in (0, 100), got {percentiles!r}")
    p = np.asarray(percentiles, np.float64)
    if p.ndim != 1 or not np.all((p > 0) & (p < 100)):
        raise ValueError(f"percentiles: expected numbers strictly between 0 and 100, got {list(percentiles)!r}")
    return n - np.ceil(np.round((n - 1) * (100 - p) / 100, 9)).astype(np.int64)


def road_curve(model, inputs, cams, *, targets=None, order: str = "morf", percentiles=PERCENTILES,
               noise: float = 0.01, seed: int = 0, tol: float = 1e-4, batch_size: int = 32, model_mode: str = "eval",
               data_format=None, progress=None) -> np.ndarray:
    """``(B, P)``: the target's score on each image with ``p`` % of its pixels removed and imputed, ``p`` in
    ``percentiles`` (ROAD, Rong et al. 2022, sec. 4): the most relevant first (``order="morf"``: a faithful map
    makes the score fall fast) or the least (``"lerf"``: it stays). The removed pixels (every channel) take the
    noisy linear imputation of :mod:`camcore.imputation` (weighted mean of the 8 neighbours, solved to a
    relative residual ``tol``, plus ``noise * N(0, 1)`` drawn by NumPy from ``(seed, sample, percentile)``: the
    same on every backend). ``cams``: ``(B, H, W)`` maps at the inputs' size; ties are removed by position.
    Images and their imputations are built ``batch_size`` rows at a time, in the inputs' framework and device."""
    if order not in ROAD_ORDERS[:2]:
        raise ValueError(f"order: expected 'morf' or 'lerf', got {order!r}")
    engine, x, cams, checked, classes, last = _setup(model, inputs, cams, targets, model_mode, data_format,
                                                      batch_size)
    if x.ndim != 4:
        raise ValueError(f"inputs: ROAD imputes images, (B, C, H, W) or (B, H, W, C); got shape {tuple(x.shape)}")
    xp = array_namespace(x)
    b, size = cams.shape[0], cams.shape[1:]
    counts = _removed_counts(percentiles, int(np.prod(size)))
    rank = _ranks(cams, descending=order == "morf")
    jobs = [(i, j) for i in range(b) for j in range(len(counts))]
    images = xp.permute_dims(x, (0, 3, 1, 2)) if last else x

    def chunks():
        for start in range(0, len(jobs), batch_size):
            part = jobs[start : start + batch_size]
            out = xp.concat([impute(part[k : k + IMPUTE_ROWS]) for k in range(0, len(part), IMPUTE_ROWS)])
            yield xp.permute_dims(out, (0, 2, 3, 1)) if last else out

    def impute(part):
        removed = np.stack([(rank[i] < counts[j]).reshape(size) for i, j in part])
        sample = xp.asarray(np.asarray([i for i, _ in part]), device=device(x))
        return noisy_linear_imputation(xp.take(images, sample, axis=0), xp.asarray(removed, device=device(x)),
                                       noise=noise, seed=[(seed, i, j) for i, j in part], tol=tol)

    per_row = None if classes is None else [classes[i] for i, _ in jobs]
    return _scores(engine, chunks(), len(jobs), per_row, checked, progress).reshape(b, len(counts))


def road(model, inputs, cams, *, order: str = "morf", **options) -> np.ndarray:
    """``(B,)`` ROAD's score of each map, the mean over the percentiles of :func:`road_curve`: ``"morf"`` (lower is
    more faithful), ``"lerf"`` (higher is), or ``"combined"``, the mean of ``(LeRF - MoRF) / 2`` (higher is;
    pytorch-grad-cam's ``ROADCombined``)."""
    if order not in ROAD_ORDERS:
        raise ValueError(f"order: expected one of {ROAD_ORDERS}, got {order!r}")
    if order != "combined":
        return road_curve(model, inputs, cams, order=order, **options).mean(axis=1)
    lerf = road_curve(model, inputs, cams, order="lerf", **options)
    return ((lerf - road_curve(model, inputs, cams, order="morf", **options)) / 2).mean(axis=1)


def _confidences(model, inputs, cams, targets, model_mode, data_format):
    """``(Y, O)``: the target's probability on the images and on the images times their maps."""
    engine, x, cams, checked, classes, last = _setup(model, inputs, cams, targets, model_mode, data_format, 1)
    xp = array_namespace(x)
    m = xp.asarray(cams.astype(np.float32), device=device(x))
    if float(cams.min()) < 0 or float(cams.max()) > 1:
        raise ValueError("cams: expected normalised maps in [0, 1] (explain's default normalize=True)")
    explained = x * xp.astype(xp.expand_dims(m, axis=-1 if last else 1), x.dtype)
    scores = _scores(engine, [xp.concat([x, explained])], 2 * x.shape[0], None if classes is None else classes * 2,
                     checked, False)
    return scores[: x.shape[0]], scores[x.shape[0]:]


def average_drop(model, inputs, cams, *, targets=None, model_mode="eval", data_format=None) -> np.ndarray:
    """``(B,)`` drop in % of the target's probability from the image to the image times its map, ``100 *
    max(0, Y - O) / Y`` (Grad-CAM++, Chattopadhyay et al. 2018, sec. 6.1; its "Average Drop" is the mean over a
    data set): lower is better."""
    y, o = _confidences(model, inputs, cams, targets, model_mode, data_format)
    return 100 * np.maximum(0.0, y - o) / np.where(y > 0, y, 1.0)


def increase_in_confidence(model, inputs, cams, *, targets=None, model_mode="eval", data_format=None) -> np.ndarray:
    """``(B,)`` bool: the target's probability is higher on the image times its map than on the image, ``O > Y``
    (Grad-CAM++ sec. 6.1, "% Incr. in Confidence" is the mean over a data set)."""
    y, o = _confidences(model, inputs, cams, targets, model_mode, data_format)
    return o > y


def win(drops: dict) -> dict:
    """``{method: (B,) bool}``: per sample, whether the method's :func:`average_drop` is the lowest of the methods
    compared (Grad-CAM++ sec. 6.1, "Win %": the mean over a data set); a tie wins for each tied method."""
    if not drops:
        raise ValueError("drops: expected {method: (B,) average drops} of at least one method, got none")
    values = {k: np.asarray(v, np.float64) for k, v in drops.items()}
    shapes = {v.shape for v in values.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"drops: expected one (B,) array per method, all of one B; got shapes "
                         f"{ {k: v.shape for k, v in values.items()} }")
    best = np.min(np.stack(list(values.values())), axis=0)
    return {k: v == best for k, v in values.items()}
