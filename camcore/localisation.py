"""Localisation metrics for class-activation maps: weakly-supervised boxes, IoU, the pointing games.

Pure NumPy. The maps ``cams`` are ``(B, H, W)`` (one map per sample, at the resolution the boxes refer to); they
may come from any framework (NumPy, a torch tensor on any device, a JAX array, nested lists) and the results are
NumPy arrays.

Pixel conventions: pixel ``(x, y)`` is column ``x`` (along the width) and row ``y`` of a map, i.e. ``map[y, x]``.
A box ``(x0, y0, x1, y1)`` is END-EXCLUSIVE: it holds the pixels ``x0 <= x < x1``, ``y0 <= y < y1``; its area is
``(x1 - x0) * (y1 - y0)`` and ``x0 == x1`` or ``y0 == y1`` is an empty box. Ground-truth boxes given with maps
must hold integer pixel coordinates inside the map (``0 <= x0 <= x1 <= W``, ``0 <= y0 <= y1 <= H``).

- :func:`boxes_from_cam`: the CAM paper's box (Zhou et al. 2016, sec. 4.1): keep the pixels of at least
  ``threshold`` (20%) of the map's maximum, box the largest connected component.
- :func:`box_iou`, :func:`localisation_accuracy`: the box is correct when its IoU with the ground truth is at least
  ``iou`` (0.5), the ILSVRC localisation criterion used there.
- :func:`pointing_game` (Zhang et al. 2018): a hit when the map's maximum lies within ``tolerance`` (15) pixels of
  the object.
- :func:`energy_pointing_game` (Score-CAM, Wang et al. 2020, sec. 4.3): the share of the map's energy in the box.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["boxes_from_cam", "box_iou", "localisation_accuracy", "pointing_game", "energy_pointing_game"]


# ------------------------------------------------------------------------------------------------- validation
def _to_numpy(x, name: str) -> np.ndarray:
    """A NumPy view or copy of an array of any framework: NumPy, torch (``.detach().cpu()`` first), anything with
    ``__array__`` (JAX, CuPy via its host copy, ...), or with ``.tolist()`` (e.g. a bfloat16 tensor), or lists."""
    if isinstance(x, np.ndarray):
        a = x
    else:
        if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch: leave the graph and the device
            x = x.detach().cpu()
        try:
            a = np.asarray(x)
        except (TypeError, ValueError, RuntimeError) as err:  # e.g. a dtype NumPy does not have (bfloat16)
            if not hasattr(x, "tolist"):
                raise TypeError(f"{name}: expected an array, got {type(x).__name__} ({err})") from None
            a = np.asarray(x.tolist())
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected real numbers, got an array of dtype {a.dtype}")
    return a


def _maps(cams, *, non_negative: bool = False) -> np.ndarray:
    """``cams`` as a finite float64 ``(B, H, W)`` array with ``H, W >= 1``."""
    a = _to_numpy(cams, "cams")
    if a.ndim != 3 or a.shape[1] == 0 or a.shape[2] == 0:
        hint = " (add a leading axis for a single map: cams[None])" if a.ndim == 2 else ""
        raise ValueError(f"cams: expected maps (B, H, W) with H, W >= 1, got shape {a.shape}{hint}")
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        raise ValueError(f"cams: expected finite maps, got {int((~np.isfinite(a)).sum())} NaN or inf values")
    if non_negative and (a < 0).any():
        raise ValueError(f"cams: expected non-negative maps (rectify them first, e.g. with a ReLU), got a minimum "
                         f"of {a.min():g}")
    return a


def _number(value, name: str, *, low: float, high: float = math.inf, open_low: bool = False) -> float:
    """``value`` as a float in ``[low, high]`` (``(low, high]`` with ``open_low``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    v = float(value)
    ok = (v > low if open_low else v >= low) and v <= high
    if not ok or math.isnan(v):
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{']' if high < math.inf else ')'}"
        raise ValueError(f"{name}: expected a number in {interval}, got {value!r}")
    return v


def _box_array(boxes, name: str) -> np.ndarray:
    """Finite float64 boxes ``(..., 4)`` with ``x0 <= x1``, ``y0 <= y1``, leading dims of at most one axis."""
    b = _to_numpy(boxes, name)
    if b.ndim not in (1, 2) or b.shape[-1] != 4:
        raise ValueError(f"{name}: expected (N, 4) boxes (x0, y0, x1, y1) or one (4,) box, got shape {b.shape}")
    b = b.astype(np.float64, copy=False)
    if not np.isfinite(b).all():
        raise ValueError(f"{name}: expected finite box coordinates, got NaN or inf")
    bad = (b[..., 0] > b[..., 2]) | (b[..., 1] > b[..., 3])
    if bad.any():
        i = int(np.flatnonzero(bad.reshape(-1))[0])
        raise ValueError(f"{name}: expected boxes (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1, box {i} is "
                         f"{tuple(b.reshape(-1, 4)[i].tolist())}")
    return b


def _map_boxes(boxes, shape: tuple[int, int, int]) -> np.ndarray:
    """Ground-truth boxes for ``B`` maps of ``shape = (B, H, W)``: int64 ``(B, 4)``, integer pixel coordinates with
    ``0 <= x0 <= x1 <= W`` and ``0 <= y0 <= y1 <= H``."""
    n, h, w = shape
    b = _to_numpy(boxes, "boxes")
    if b.shape != (n, 4):
        raise ValueError(f"boxes: expected (B, 4) boxes (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1 for {n} maps, "
                         f"got shape {b.shape}")
    if b.dtype.kind == "f" and (not np.isfinite(b).all() or (b != np.round(b)).any()):
        raise ValueError("boxes: expected integer pixel coordinates (end-exclusive), got non-integer values")
    b = b.astype(np.int64)
    x0, y0, x1, y1 = b.T
    bad = (x0 < 0) | (x0 > x1) | (x1 > w) | (y0 < 0) | (y0 > y1) | (y1 > h)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"boxes: expected (x0, y0, x1, y1) with 0 <= x0 <= x1 <= {w} (the width) and "
                         f"0 <= y0 <= y1 <= {h} (the height) of the maps, box {i} is {tuple(b[i].tolist())}")
    return b


# ------------------------------------------------------------------------------------- connected components
def _roots(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Connected components of the graph on nodes ``0..n-1`` with edges ``(u[i], v[i])``: ``root[k]`` is the
    smallest node of ``k``'s component.

    Vectorised union-find: each round hooks, for every edge joining two different trees, the larger root under
    the smaller one (``parent[i] <= i`` always holds, so no cycle can form), then compresses every path to its
    root by pointer jumping. Every round hooks at least one root, so the loop ends; on CAM masks it takes a
    handful of rounds (the trees merge along whole chains of runs at once)."""
    parent = np.arange(n, dtype=np.int64)
    while u.size:
        ru, rv = parent[u], parent[v]
        cross = ru != rv
        if not cross.any():
            break
        u, v, ru, rv = u[cross], v[cross], ru[cross], rv[cross]  # edges inside one tree stay inside it
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))
        while True:
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up
    return parent


def _largest_component_boxes(mask: np.ndarray, peak: np.ndarray) -> np.ndarray:
    """Box of the largest 4-connected component of each ``(H, W)`` mask of ``mask (B, H, W)``; ties: the component
    holding a pixel of ``peak`` (the map's maximal pixels), then the first in raster order. ``(0, 0, 0, 0)`` for an
    empty mask.

    The masks are cut into runs (maximal horizontal segments of kept pixels, in raster order over all maps); two
    runs of adjacent rows of one map are joined when their columns overlap, which is 4-connectivity (a run
    ``[s, e)`` and a run ``[s', e')`` of the next row touch iff ``s < e'`` and ``s' < e``; diagonal contact does
    not count). Components are then found on the graph of runs by :func:`_roots`."""
    n_maps, h, w = mask.shape
    out = np.zeros((n_maps, 4), dtype=np.int64)
    rows = mask.reshape(n_maps * h, w)
    edges = np.diff(np.pad(rows, ((0, 0), (1, 1))).astype(np.int8), axis=1)  # +1 at a run's start, -1 past its end
    row, start = np.nonzero(edges == 1)
    _, end = np.nonzero(edges == -1)  # same order: runs of a row alternate start, end
    if row.size == 0:
        return out
    length = end - start

    # Runs of the next row overlapping run i: a contiguous slice [lo, hi) of the (raster-ordered) runs.
    stride = w + 1
    start_key, end_key = row * stride + start, row * stride + end
    src = np.flatnonzero(row % h != h - 1)  # a map's last row has no next row (the next map's first row is no neighbour)
    lo = np.searchsorted(end_key, (row[src] + 1) * stride + start[src], side="right")  # first with end > start
    hi = np.searchsorted(start_key, (row[src] + 1) * stride + end[src], side="left")  # past the last with start < end
    count = np.maximum(hi - lo, 0)
    u = np.repeat(src, count)
    v = np.repeat(lo - np.cumsum(count) + count, count) + np.arange(count.sum())
    root = _roots(row.size, u, v)

    # Maximal pixels per run, from a prefix count along each row.
    prefix = np.zeros((n_maps * h, w + 1), dtype=np.int64)
    np.cumsum(peak.reshape(n_maps * h, w), axis=1, out=prefix[:, 1:])
    holds_peak = prefix[row, end] > prefix[row, start]

    size = np.bincount(root, weights=length, minlength=row.size)
    peaked = np.bincount(root, weights=holds_peak, minlength=row.size) > 0
    comps = np.flatnonzero(root == np.arange(row.size))  # one root per component, its first run in raster order
    comp_map = row[comps] // h
    order = np.lexsort((comps, ~peaked[comps], -size[comps], comp_map))  # per map: largest, peaked, first
    best = comps[order[np.r_[True, comp_map[order][1:] != comp_map[order][:-1]]]]
    chosen = np.zeros(row.size, dtype=bool)
    chosen[best] = True
    runs = np.flatnonzero(chosen[root])  # raster order: grouped by map, rows increasing
    r_map = row[runs] // h
    first = np.r_[0, np.flatnonzero(r_map[1:] != r_map[:-1]) + 1]
    last = np.r_[first[1:], runs.size] - 1
    maps_ = r_map[first]
    out[maps_, 0] = np.minimum.reduceat(start[runs], first)
    out[maps_, 1] = row[runs[first]] % h
    out[maps_, 2] = np.maximum.reduceat(end[runs], first)
    out[maps_, 3] = row[runs[last]] % h + 1
    return out


# ------------------------------------------------------------------------------------------------ public API
def boxes_from_cam(cams, threshold: float = 0.2) -> np.ndarray:
    """The CAM paper's weakly-supervised box (Zhou et al. 2016, sec. 4.1): per map, keep the pixels with value
    ``>= threshold * max(map)``, take the largest 4-connected component of them and return its bounding box.

    ``cams (B, H, W)`` -> int64 ``(B, 4)`` boxes ``(x0, y0, x1, y1)``, end-exclusive, in pixels of the map (``x``
    along the width). Ties between equally large components go to the one holding a maximal pixel of the map,
    then to the first in raster order. A map whose maximum is ``<= 0`` gives the empty box ``(0, 0, 0, 0)``.
    ``threshold`` is in ``[0, 1]`` (the paper's 0.2)."""
    m = _maps(cams)
    t = _number(threshold, "threshold", low=0.0, high=1.0)
    top = m.max(axis=(1, 2), keepdims=True)
    live = top > 0
    return _largest_component_boxes((m >= t * top) & live, (m == top) & live)


def box_iou(a, b) -> np.ndarray:
    """Intersection over union of end-exclusive boxes ``(x0, y0, x1, y1)``: ``|a & b| / |a | b|``.

    ``a (N, 4)`` and ``b (N, 4)``, either may be a single ``(4,)`` box (or ``(1, 4)``) broadcast against the other
    -> float64 ``(N,)`` (a 0-d array when both are single ``(4,)`` boxes). An empty box (zero width or height) has
    IoU 0 with any box, itself included, never NaN."""
    a, b = _box_array(a, "a"), _box_array(b, "b")
    try:
        shape = np.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    except ValueError:
        raise ValueError(f"a, b: expected (N, 4) and (N, 4) boxes, or a single (4,) box, got shapes {a.shape} and "
                         f"{b.shape}") from None
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    union = ((a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
             - inter)
    out = np.divide(inter, union, out=np.zeros(shape), where=union > 0)
    return np.asarray(out, dtype=np.float64).reshape(shape)


def localisation_accuracy(cams, boxes, threshold: float = 0.2, iou: float = 0.5) -> np.ndarray:
    """The CAM paper's localisation criterion (Zhou et al. 2016, sec. 4.1): the box of :func:`boxes_from_cam`
    (at ``threshold``) is correct when its IoU with the ground-truth box is ``>= iou`` (ILSVRC: 0.5).

    ``cams (B, H, W)``, ``boxes (B, 4)`` end-exclusive integer pixel boxes -> bool ``(B,)``. ``iou`` is in
    ``(0, 1]``. The mean of the result is the localisation accuracy (1 - the paper's localisation error, when
    the class is given)."""
    m = _maps(cams)
    gt = _map_boxes(boxes, m.shape)
    level = _number(iou, "iou", low=0.0, high=1.0, open_low=True)
    return box_iou(boxes_from_cam(m, threshold), gt) >= level


def pointing_game(cams, boxes, tolerance: float = 15) -> np.ndarray:
    """The pointing game (Zhang et al. 2018, "Top-down neural attention by excitation backprop", sec. 5.1): a
    hit when the map's maximum lies within ``tolerance`` pixels of the ground-truth box.

    The distance of pixel ``(x, y)`` to the box is the Euclidean distance to its nearest pixel in the box (0
    inside). Ties: when several pixels reach the maximum, the map hits if any of them is within ``tolerance``; a
    constant map (e.g. all zero) points nowhere and misses. An empty box is never hit.

    ``cams (B, H, W)``, ``boxes (B, 4)`` end-exclusive integer pixel boxes, ``tolerance >= 0`` (the paper's 15
    pixels) -> bool ``(B,)``; the mean is the pointing accuracy."""
    m = _maps(cams)
    gt = _map_boxes(boxes, m.shape)
    tol = _number(tolerance, "tolerance", low=0.0)
    if math.isinf(tol):
        raise ValueError(f"tolerance: expected a finite number >= 0, got {tolerance!r}")
    x0, y0, x1, y1 = (c[:, None] for c in gt.T)
    xs, ys = np.arange(m.shape[2])[None], np.arange(m.shape[1])[None]
    dx = np.maximum(np.maximum(x0 - xs, xs - (x1 - 1)), 0)  # (B, W): columns to the nearest box column
    dy = np.maximum(np.maximum(y0 - ys, ys - (y1 - 1)), 0)  # (B, H)
    near = dy[:, :, None] ** 2 + dx[:, None, :] ** 2 <= tol * tol
    peak = m == m.max(axis=(1, 2), keepdims=True)
    nonempty = (gt[:, 2] > gt[:, 0]) & (gt[:, 3] > gt[:, 1])
    informative = m.max(axis=(1, 2)) > m.min(axis=(1, 2))
    return (peak & near).any(axis=(1, 2)) & nonempty & informative


def energy_pointing_game(cams, boxes) -> np.ndarray:
    """The energy-based pointing game (Score-CAM, Wang et al. 2020, sec. 4.3): the share of the map's energy that
    falls in the ground-truth box, ``sum(map[box]) / sum(map)``.

    ``cams (B, H, W)`` non-negative (negative values raise ``ValueError``: rectify first), ``boxes (B, 4)``
    end-exclusive integer pixel boxes -> float64 ``(B,)`` in ``[0, 1]``. An all-zero map (no energy) gives 0."""
    m = _maps(cams, non_negative=True)
    gt = _map_boxes(boxes, m.shape)
    x0, y0, x1, y1 = (c[:, None] for c in gt.T)
    xs, ys = np.arange(m.shape[2])[None], np.arange(m.shape[1])[None]
    inside = ((ys >= y0) & (ys < y1))[:, :, None] & ((xs >= x0) & (xs < x1))[:, None, :]
    total = m.sum(axis=(1, 2))
    part = np.where(inside, m, 0.0).sum(axis=(1, 2))
    return np.divide(part, total, out=np.zeros(m.shape[0]), where=total > 0)
