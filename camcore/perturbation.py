"""Gradient-free channel weights: the Score-CAM family (masks on the input) and Ablation-CAM (channels zeroed at
the layer).

The pure functions build masks and turn scores into weights; :func:`score_weights` and :func:`ablation_weights`
hand a backend's engine (``score_masked``) one plan of masks per sample, made lazily chunk by chunk
(:class:`Chunker`), for the whole batch at once. Masks are
channels-first and of the activations' namespace and device; a host copy of the activations (small: ``(C, *s)``
per sample) decides which masks to run.

- Score-CAM (Wang et al. 2020, and the authors' code): ``M_k = s(U(A_k))`` (upsample to the input size, min-max
  normalise to ``[0, 1]``; a constant channel gives ``M_k = 0``), ``w_k = softmax(f(X * M_k))_c``.
- SS-CAM (Wang, Naidu et al. 2020): ``w_k = 1/N sum_n softmax(f(X * (M_k + delta_n)))_c`` with
  ``delta_n ~ N(0, sigma^2)`` per pixel; the paper's ``N = 10``, ``sigma = 2``.
- IS-CAM (Naidu et al. 2020): ``w_k = 1/N sum_{i=1..N} softmax(f(X * (i/N) M_k))_c``, the scores integrated along
  the straight path from the black image to ``X * M_k``; ``N = 10``.
- ``top_k`` (Faster Score-CAM): only the ``k`` channels of largest spatial variance are scored, the others weigh 0.
- ``weighting="channel-softmax"``: pytorch-grad-cam's and torch-cam's rule, ``w = softmax_k(y^c(X * M_k))`` over
  the channels, from logits.
- Ablation-CAM (Desai & Ramaswamy 2020, eq. 2): ``w_k = (y^c - y^c_k) / y^c``, ``y^c_k`` the score with channel
  ``k`` of the layer set to zero. An all-zero channel is not run: ablating it changes nothing (``w_k = 0``).

Identical masks (constant channels, duplicated channels) are scored once per sample.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from . import maps
from ._xp import array_namespace, device, float32, to_host

__all__ = ["channel_masks", "distinct_channels", "top_variance_channels", "channel_softmax", "ablation_masks",
           "noisy_masks", "scaled_masks", "Chunker", "score_weights", "ablation_weights", "WEIGHTINGS"]

WEIGHTINGS = ("probability", "channel-softmax")


# --------------------------------------------------------------------------------------------- pure functions
def channel_masks(a, size, /):
    """Score-CAM's masks ``s(U(A_k))``: ``(M, *s)`` channels -> ``(M, 1, *size)``, each upsampled (linear,
    half-pixel centres) and min-max normalised to ``[0, 1]``; a constant channel gives an all-zero mask."""
    xp = array_namespace(a)
    return xp.expand_dims(maps.normalize(maps.upsample(a, size)), axis=1)


def distinct_channels(a, /) -> tuple[np.ndarray, np.ndarray]:
    """``(keep, inverse)`` for one sample's host activations ``(C, *s)``: ``keep`` indexes one channel per distinct
    Score-CAM mask and ``a[keep][inverse]`` has the masks of ``a``. Constant channels all give the zero mask, and
    bit-identical channels the same mask."""
    a = np.ascontiguousarray(a.reshape(a.shape[0], -1))
    constant = (a == a[:, :1]).all(axis=1)
    keys = np.where(constant[:, None], 0, a)  # every constant channel -> one key
    _, keep, inverse = np.unique(keys.view(np.dtype((np.void, keys.dtype.itemsize * keys.shape[1]))).ravel(),
                                 return_index=True, return_inverse=True)
    return keep, inverse.ravel()


def top_variance_channels(a, k: int, /) -> np.ndarray:
    """Faster Score-CAM's selection: for host activations ``(B, C, *s)``, the ``(B, k)`` indices of the ``k``
    channels of largest variance over space, in decreasing order (ties: lower index first)."""
    var = a.reshape(a.shape[0], a.shape[1], -1).astype(np.float64).var(axis=2)
    return np.argsort(-var, axis=1, kind="stable")[:, :k]


def channel_softmax(scores, /):
    """``softmax_k(scores)`` over the channel axis of ``(B, C)`` scores (pytorch-grad-cam's Score-CAM weights)."""
    xp = array_namespace(scores)
    e = xp.exp(scores - xp.max(scores, axis=1, keepdims=True))
    return e / xp.sum(e, axis=1, keepdims=True)


def ablation_masks(channels, num_channels: int, rank: int, *, like):
    """``(M, C, 1, ..., 1)`` masks of ones with a zero at each ``channels[m]`` (one sample's ``rank``-dim
    activations are ``(C, *s)``); of ``like``'s namespace and device."""
    xp = array_namespace(like)
    m = np.ones((len(channels), num_channels), dtype=np.float32)
    m[np.arange(len(channels)), np.asarray(channels, dtype=np.int64)] = 0
    return xp.asarray(m.reshape(m.shape + (1,) * (rank - 1)), device=device(like))


def scaled_masks(masks, draws, n: int, /):
    """IS-CAM's masks ``(i/N) M_k`` for ``(M, 1, *S)`` masks, ``i = draws + 1``."""
    xp = array_namespace(masks)
    coeff = np.asarray((np.asarray(draws) + 1) / n, dtype=np.float32).reshape((-1,) + (1,) * (masks.ndim - 1))
    return masks * xp.asarray(coeff, device=device(masks))


def noisy_masks(masks, draws, channels, sample: int, /, *, std: float, seed: int):
    """SS-CAM's masks ``M_k + delta`` for ``(M, 1, *S)`` masks: one generator per (seed, sample, channel, draw), so
    the noise does not depend on the batch size or the framework."""
    xp = array_namespace(masks)
    noise = np.stack([np.random.default_rng((seed, sample, int(k), int(d))).normal(0.0, std, masks.shape[1:])
                      for k, d in zip(channels, draws)]).astype(np.float32)
    return masks + xp.asarray(noise, device=device(masks))


# ------------------------------------------------------------------------------------------------ drivers
class Chunker:
    """Chunk sizes for the masked passes: ``batch_size`` when given; else a size found by timing the caller's work
    on each chunk (between two ``next`` of :meth:`split`): from ``first``, the size doubles while the best time per
    item of two chunks of it is at least 10% below the previous size's, and goes back to the previous size for good
    when it is not (on a CPU small chunks often run fastest, on a GPU large ones). The search carries over from one
    :meth:`split` to the next, so the samples of a batch share it. ``clock``: the timer (seconds)."""

    def __init__(self, batch_size: int | None = None, *, first: int = 4, cap: int = 256, clock=time.perf_counter):
        self.size, self.cap, self.clock = first if batch_size is None else batch_size, cap, clock
        self.growing = batch_size is None
        self._best, self._tried = None, []

    def split(self, total: int):
        """``(start, stop)`` chunks covering ``range(total)``, in order."""
        start = 0
        while start < total:
            stop = min(start + self.size, total)
            t0 = self.clock()
            yield start, stop
            if self.growing:
                self._tried.append((self.clock() - t0) / (stop - start))
                if len(self._tried) == 2 or stop == total:
                    self._settle()
            start = stop

    def _settle(self) -> None:
        per, self._tried = min(self._tried), []
        if self._best is not None and per > 0.9 * self._best[1]:  # not 10% faster per item: the smaller size
            self.size, self.growing = self._best[0], False
        elif self.size >= self.cap:
            self.growing = False
        else:
            self._best, self.size = (self.size, per), 2 * self.size


def progress_bar(total: int, progress, unit: str = "mask"):
    """A tqdm bar over ``total`` forwards (of ``unit``) when ``progress`` is True, or None and stderr is a
    terminal; else a no-op object with ``update``/``close``."""
    show = progress if progress is not None else sys.stderr.isatty()
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="camcore", unit=unit, leave=False)


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def score_weights(engine, cap, a, host, classes, *, draws=1, vary=None, dedupe=True, weighting="probability",
                  top_k=None, batch_size=None, progress=None, info=None):
    """``(B, C)`` Score-CAM-family weights (see the module docstring) of activations ``a`` (``(B, C, *s)``, ``host``
    their NumPy copy) captured by ``cap`` (a backend's :class:`~camcore.backends.engine.Capture`), from one
    :meth:`~camcore.backends.engine.Engine.score_masked` call for the whole batch, with masks on the inputs.

    ``classes``: one class index per sample, or a callable target (its scores are used as they are, also under
    ``weighting="probability"``). Each chosen channel's mask is run ``draws`` times, as
    ``vary(masks, draws, channels, sample)`` makes them (:func:`noisy_masks`, :func:`scaled_masks`; ``None``: as
    they are), and its scores averaged; ``dedupe`` scores identical masks once.
    """
    xp = array_namespace(a)
    b, c = a.shape[:2]
    size = engine.spatial_shape(cap.x)
    n = draws
    chosen = (np.broadcast_to(np.arange(c), (b, c)) if top_k is None else top_variance_channels(host, top_k))
    picks = []
    for i in range(b):
        if dedupe:
            keep, inverse = distinct_channels(host[i, chosen[i]])
        else:
            keep, inverse = np.arange(len(chosen[i])), np.arange(len(chosen[i]))
        picks.append((chosen[i][keep], inverse))

    def plan(i, channels):
        def make(start, stop):  # the masks of (channel, draw) pairs start..stop, channel-major
            j = np.arange(start, stop)
            masks = channel_masks(xp.take(a[i], xp.asarray(channels[j // n], device=device(a)), axis=0), size)
            return masks if vary is None else vary(masks, j % n, channels[j // n], i)

        return len(channels) * n, make

    total = sum(len(ch) for ch, _ in picks) * n
    bar = progress_bar(total, progress)
    try:
        flat = engine.score_masked(cap, [plan(i, ch) for i, (ch, _) in enumerate(picks)], classes=classes,
                                   probability=weighting == "probability", chunker=Chunker(batch_size),
                                   progress=bar.update, info=info)
    finally:
        bar.close()
    rows = [xp.take(xp.mean(xp.reshape(f, (len(ch), n)), axis=1), xp.asarray(inv, device=device(a)), axis=0)
            for f, (ch, inv) in zip(flat, picks)]
    if info is not None:
        info["masked_forwards"] = info.get("masked_forwards", 0) + total
    return _scatter(xp, rows, chosen, c, a, weighting)


def _scatter(xp, rows, chosen, c, like, weighting):
    """``(B, C)`` weights from each sample's scores of its chosen channels; unchosen channels weigh 0."""
    scores = xp.stack(rows)  # (B, k)
    if weighting == "channel-softmax":
        scores = channel_softmax(scores)
    if chosen.shape[1] == c and (chosen == np.arange(c)).all():
        return scores
    onehot = np.zeros((chosen.shape[0], chosen.shape[1], c), dtype=np.float32)
    onehot[np.arange(chosen.shape[0])[:, None], np.arange(chosen.shape[1])[None, :], chosen] = 1
    return xp.sum(scores[:, :, None] * xp.asarray(onehot, device=device(like)), axis=1)


def ablation_weights(engine, cap, k: int, a, host, y, classes, *, batch_size=None, progress=None, info=None):
    """``(B, C)`` Ablation-CAM weights ``(y - y_k) / y`` of the ``k``-th captured layer of ``cap``, whose
    activations are ``a`` (``(B, C, *s)``, ``host`` their NumPy copy), from one
    :meth:`~camcore.backends.engine.Engine.score_masked` call with channel masks at the layer; ``y``: the ``(B,)``
    unmasked target scores; ``classes`` as in :func:`score_weights`. ``batch_size=None``: 32 ablations per pass."""
    xp = array_namespace(a)
    b, c = a.shape[:2]
    yh = np.asarray(to_host(float32(y)), dtype=np.float64)  # NumPy has no bfloat16
    if (yh == 0).any():
        raise ValueError(f"targets: the target score is exactly 0 for sample(s) {np.flatnonzero(yh == 0).tolist()}, "
                         f"so Ablation-CAM's (y - y_k) / y is undefined; explain another target")
    live = [np.flatnonzero(~(host[i].reshape(c, -1) == 0).all(axis=1)) for i in range(b)]
    plans = [(len(lv), lambda s, e, lv=lv: ablation_masks(lv[s:e], c, a.ndim - 1, like=a)) for lv in live]
    bar = progress_bar(sum(len(lv) for lv in live), progress)
    try:
        got = engine.score_masked(cap, plans, at=k, classes=classes, chunker=Chunker(32 if batch_size is None
                                  else batch_size), progress=bar.update, info=info) if any(map(len, live)) else []
    finally:
        bar.close()
    rows = []
    for i in range(b):
        ablated = np.full(c, float(yh[i]), dtype=np.float32)  # all-zero channels: ablation changes nothing
        if len(live[i]):
            ablated[live[i]] = to_host(got[i])
        rows.append((yh[i] - ablated.astype(np.float64)) / yh[i])
    if info is not None:
        info["masked_forwards"] = info.get("masked_forwards", 0) + sum(len(lv) for lv in live)
    return xp.asarray(np.stack(rows).astype(np.float32), device=device(a))
