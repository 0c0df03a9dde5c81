"""The methods :func:`camcore.explain` accepts: one object each, called with a :class:`Context`, returning the map.

Every method weighs the layer's activations ``A`` (``(B, C, *S)``) and reduces the weighted channels: their sum,
or (Eigen-CAM, ``eigen_smooth=True``) their first principal component oriented by an orientation map. What a
method differs in is its weights, so a method is a small object whose ``weights(ctx, **hyper)`` says how it gets
them: from ``G = dy/dA`` (the gradient formulas of :mod:`camcore.weights`), from the classifier (CAM), from none
(Eigen-CAM), or from the model's scores on masked copies (the Score-CAM family and Ablation-CAM, through
:mod:`camcore.perturbation` and the engine's ``score_masked``). Hyper-parameters are keyword-only, with their
defaults stated once, in ``hyper``. ``explain`` never branches on a method's name.
"""
from __future__ import annotations

import difflib
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from . import maps
from . import perturbation as P
from . import weights as W
from ._xp import array_namespace, expand_to, float32, spatial_axes, to_host
from .targets import class_indices, target_scores

__all__ = ["Context", "Method", "GradientMethod", "CAM", "EigenCAM", "ScoreCAM", "SSCAM", "ISCAM", "AblationCAM",
           "InputGradient", "METHODS", "get_method"]


@dataclass
class Context:
    """What a method sees for one layer.

    Attributes:
        layer: the layer's name. ``activations``: float32 ``(B, C, *S)``; ``grads``: ``dy/dA`` of the same shape
        (negated for ``counterfactual``), or ``None`` for methods without gradients. ``outputs``: the model's
        outputs; ``targets``: the checked targets (``None``, one int per sample, or a callable).
        ``adapter``: the backend's engine (:class:`camcore.backends.engine.Engine`), whose services
        (``score_masked``, ``linear_classifier``) methods that run the model again use, with ``capture`` (the
        engine's capture pass) and ``index`` (this layer's place in it).
        ``counterfactual``, ``eigen_smooth``, ``info`` (a dict to report how a masked method ran, or ``None``);
        ``scale_free``: the map may come up to a positive factor per sample (it will be normalised).
    """

    layer: str
    activations: object
    grads: object
    outputs: object
    targets: object
    adapter: object
    capture: object
    index: int = 0
    counterfactual: bool = False
    eigen_smooth: bool = False
    info: dict | None = None
    scale_free: bool = False

    @cached_property
    def unit_activations(self):
        """``(A / m, m)``: the activations over their per-sample largest magnitude, once for every method of a
        call (:func:`camcore.maps.unit_scale`)."""
        return maps.unit_scale(self.activations, f"layer: the activations of {self.layer!r}")

    @cached_property
    def classes(self):
        """A callable target as it is, else one host int class index per sample."""
        return self.adapter.classes(self.capture)  # the engine's check: also of outputs that are not logits


@dataclass(frozen=True)
class Method:
    """A CAM method. ``name``; ``hyper``: its keyword options and their defaults; ``needs_grads``: whether the
    backend computes ``dy/dA``; ``eigen``: reduce by the first principal component; ``perturbation``: where a
    gradient-free method's masks go, ``"input"`` or ``"layer"`` (``None``: no masked passes); ``guided``: the
    map is multiplied by guided backpropagation; ``rule``: an input-gradient method (:class:`InputGradient`)."""

    name: str
    hyper: dict = field(default_factory=dict)
    needs_grads: bool = True
    eigen: bool = False
    perturbation: str | None = None
    guided: bool = False  # the map times guided backpropagation (Guided Grad-CAM)
    rule: str | None = None  # an input-gradient method: the ReLUs' backward rule, and no layer

    @property
    def counterfactual(self) -> bool:
        """Whether ``counterfactual=True`` means something: it negates the gradients."""
        return self.needs_grads

    def check(self, hyper: dict, *, reshape=None) -> dict:
        """The hyper-parameters, validated; ``ValueError`` naming a bad one."""
        return hyper

    def weights(self, ctx: Context, **hyper):
        """``(B, C)`` or ``(B, C, *S)`` weights of ``ctx.activations``, or ``None`` for all ones."""
        raise NotImplementedError

    def orient(self, ctx: Context, w, weighted):
        """The map the principal component is oriented to agree with: the method's own ``sum_k w_k A_k``, or for
        unweighted activations ``None`` (their energy; see :func:`camcore.maps.principal_component`)."""
        return None if w is None else maps.channel_sum(weighted)

    def __call__(self, ctx: Context, **hyper):
        """The map ``(B, *S)`` before its ReLU: ``sum_k w_k A_k``, or the oriented principal component of
        ``w * A`` for ``eigen`` methods and ``eigen_smooth``. Range-safe: ``w`` and ``A`` are divided by their
        per-sample largest magnitudes first and the product of the two scales multiplies the map at the end,
        or not at all for ``ctx.scale_free`` (the caller normalises the map, which is scale-free)."""
        w = self.weights(ctx, **hyper)
        a, scale = ctx.unit_activations
        if w is not None:
            w, sw = maps.unit_scale(w, f"{self.name}: the channel weights at {ctx.layer!r}")
            scale = _flat(scale) * _flat(sw)
        weighted = maps.weigh(w, a)
        if self.eigen or ctx.eigen_smooth:
            cam = maps.principal_component(weighted, orient=self.orient(ctx, w, weighted))
        else:
            cam = maps.channel_sum(weighted)
        return cam if ctx.scale_free else cam * expand_to(_flat(scale), cam.ndim)


@dataclass(frozen=True)
class GradientMethod(Method):
    """Weights from a formula of :mod:`camcore.weights`: ``formula(A, G, **hyper)``."""

    formula: Callable = None

    def check(self, hyper, *, reshape=None):
        eps = hyper.get("eps", 0.0)
        if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real) or not np.isfinite(eps) or eps < 0:
            raise ValueError(f"eps: expected a finite float >= 0 (added to the formula's denominator), got {eps!r}")
        return {k: float(v) if k == "eps" else v for k, v in hyper.items()}

    def weights(self, ctx, **hyper):
        return self.formula(ctx.activations, ctx.grads, **hyper)


@dataclass(frozen=True)
class EigenGradCAM(GradientMethod):
    """The principal component of ``G * A``, oriented by Grad-CAM's map ``sum_k mean(G_k) A_k``."""

    def orient(self, ctx, w, weighted):  # only its sign matters: computed scale-free
        a = ctx.unit_activations[0]
        return maps.channel_sum(maps.weigh(W.gradcam(a, maps.unit_scale(ctx.grads)[0]), a))


@dataclass(frozen=True)
class EigenCAM(Method):
    """Eigen-CAM (Muhammad & Yeasin 2020): the principal component of the activations themselves."""

    def weights(self, ctx):
        return None


@dataclass(frozen=True)
class CAM(Method):
    """CAM (Zhou et al. 2016): the classifier's row of each sample's class, ``w_k = W_fc[c, k]``.

    ``classifier``: the name of the linear layer after global pooling (default: found by the backend);
    ``cam_weights``: a ``(num_classes, C)`` matrix instead. The premise, logits == ``fc(mean(A))``, is checked.
    ``counterfactual`` negates the row.
    """

    @property
    def counterfactual(self) -> bool:
        return True

    def weights(self, ctx, *, classifier=None, cam_weights=None):
        w = _cam_weights(ctx, classifier, cam_weights)
        return -w if ctx.counterfactual else w


@dataclass(frozen=True)
class InputGradient(Method):
    """Guided backpropagation (Springenberg et al. 2015) or deconvnet (Zeiler & Fergus 2014): the gradient of the
    target score with respect to the inputs, every ReLU-like unit ``y = clamp(x, 0, hi)`` passing back, for an
    incoming gradient ``g``, ``max(g, 0) * 1[0 < x < hi]`` (``rule="guided"``) or ``max(g, 0) * 1[x < hi]``
    (``"deconvnet"``). Computed by the backend (``input_gradients``), shaped like the inputs; no layer."""

    needs_grads: bool = False

    @property
    def counterfactual(self) -> bool:
        return False


def _flat(scale):
    """A per-sample scale ``(B, 1, ...)`` as ``(B,)``."""
    xp = array_namespace(scale)
    return xp.reshape(scale, (scale.shape[0],))


def _cam_weights(ctx, classifier, cam_weights):
    """CAM's ``(B, C)`` weights: rows of ``cam_weights``, or of the classifier, checked to be the linear layer
    applied to the global average of the activations (CAM's premise)."""
    a, outputs, targets, adapter, name = ctx.activations, ctx.outputs, ctx.targets, ctx.adapter, ctx.layer
    xp = array_namespace(a)
    c = a.shape[1]
    logits = outputs if hasattr(outputs, "ndim") and outputs.ndim == 2 else None
    if callable(targets) or (logits is None and targets is None):
        raise ValueError("targets: method='cam' explains a class: pass class indices (an int or one per sample), "
                         "or None with a model that returns (B, num_classes) logits")
    idx = class_indices(targets, float32(logits)) if logits is not None else xp.asarray(targets)
    if cam_weights is not None:
        wm = xp.asarray(cam_weights)
        if wm.ndim != 2 or wm.shape[1] != c:
            raise ValueError(f"cam_weights: expected a (num_classes, {c}) matrix for layer {name!r} with {c} "
                             f"channels, got shape {tuple(wm.shape)}")
        if adapter.concrete(idx) and int(xp.max(idx)) >= wm.shape[0]:
            raise ValueError(f"targets: class index {int(xp.max(idx))} is out of range for cam_weights with "
                             f"{wm.shape[0]} rows")
        return W.cam(float32(wm), idx)
    cname, wm, bias = adapter.linear_classifier(classifier)
    wm = float32(wm)
    if wm.shape[1] != c:
        raise ValueError(f"layer: method='cam' needs the feature map the classifier {cname!r} reads after global "
                         f"pooling; {name!r} has {c} channels but {cname!r} expects {wm.shape[1]}")
    if logits is not None and adapter.concrete(a):  # CAM's premise: logits == classifier(GAP(A)); verify it
        pred = xp.matmul(xp.mean(a, axis=spatial_axes(a)), xp.matrix_transpose(wm))
        pred = pred if bias is None else pred + float32(bias)
        ref = float32(logits)
        err = float(xp.max(xp.abs(pred - ref)))
        rel = max(1e-3, 8 * float(xp.finfo(logits.dtype).eps))  # a bfloat16 model's logits carry 8 bits
        if err > rel * (1.0 + float(xp.max(xp.abs(ref)))):
            raise ValueError(f"layer: method='cam' needs the layer whose global average pooling feeds the "
                             f"classifier {cname!r} directly, but the outputs differ from {cname!r}(mean of "
                             f"{name!r}) by up to {err:.3g}; pick that layer, or pass cam_weights=")
    return W.cam(wm, idx)


# ------------------------------------------------------------------------------------ gradient-free methods
_MASKED = {"batch_size": None, "progress": None}  # options of every gradient-free method (None: chosen)
_SCORE = {**_MASKED, "weighting": "probability", "top_k": None}


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _check_masked(hyper: dict) -> dict:
    """``hyper`` with integer options as Python ints; ``ValueError`` naming a bad hyper-parameter of a
    gradient-free method."""
    batch_size = hyper.get("batch_size")
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise ValueError(f"batch_size: expected None (chosen by camcore) or a positive int, got {batch_size!r}")
    num_samples = hyper.get("num_samples", 1)
    if not _is_int(num_samples) or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
    top_k = hyper.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k: expected None or a positive int (the number of channels to score), got {top_k!r}")
    if hyper.get("weighting", P.WEIGHTINGS[0]) not in P.WEIGHTINGS:
        raise ValueError(f"weighting: expected one of {P.WEIGHTINGS}, got {hyper['weighting']!r}")
    std = hyper.get("std", 0.0)
    if isinstance(std, (bool, np.bool_)) or not isinstance(std, numbers.Real) or not np.isfinite(std) or std < 0:
        raise ValueError(f"std: expected a finite float >= 0 (the noise's standard deviation), got {std!r}")
    seed = hyper.get("seed", 0)
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    if not (hyper.get("progress") is None or isinstance(hyper["progress"], bool)):
        raise ValueError(f"progress: expected None (a bar on terminals), True or False, got {hyper['progress']!r}")
    return {k: int(v) if _is_int(v) else v for k, v in hyper.items()}


def _host_activations(method: Method, ctx: Context):
    """The activations' NumPy copy, from which the masks are chosen; refused under ``jax.jit`` tracing."""
    if not ctx.adapter.concrete(ctx.activations):
        raise ValueError(f"method: {method.name!r} chooses its masks from the activations' values, so it runs "
                         f"eagerly; call explain outside jax.jit (the forward passes are compiled inside)")
    return to_host(ctx.activations)


@dataclass(frozen=True)
class ScoreCAM(Method):
    """Score-CAM (Wang et al. 2020): ``w_k = p^c(X * M_k)`` with ``M_k`` channel ``k`` upsampled and normalised
    (:mod:`camcore.perturbation`); ``top_k`` scores only the ``k`` channels of largest variance (Faster
    Score-CAM), ``weighting="channel-softmax"`` is pytorch-grad-cam's rule. Subclasses vary the masks."""

    hyper: dict = field(default_factory=lambda: dict(_SCORE))
    needs_grads: bool = False
    perturbation: str = "input"
    dedupe = True  # identical masks are scored once; False where each draw differs

    def check(self, hyper, *, reshape=None):
        return _check_masked(hyper)

    def draws(self, hyper) -> int:
        """How many masked copies each channel's mask gives (averaged into its weight)."""
        return 1

    def vary(self, masks, draws, channels, sample, hyper):
        """The ``(M, 1, *S)`` masks of (channel, draw) pairs ``channels[m]``, ``draws[m]`` of one sample."""
        return masks

    def weights(self, ctx, *, batch_size, progress, weighting, top_k, **hyper):
        host = _host_activations(self, ctx)
        return P.score_weights(
            ctx.adapter, ctx.capture, ctx.activations, host, ctx.classes, draws=self.draws(hyper),
            vary=lambda masks, draws, channels, sample: self.vary(masks, draws, channels, sample, hyper),
            dedupe=self.dedupe, weighting=weighting, top_k=top_k, batch_size=batch_size, progress=progress,
            info=ctx.info)


@dataclass(frozen=True)
class SSCAM(ScoreCAM):
    """SS-CAM (Wang, Naidu et al. 2020): ``w_k = 1/N sum_n p^c(X * (M_k + delta_n))``, ``delta_n ~ N(0, std^2)``
    per pixel, drawn from ``default_rng((seed, sample, channel, draw))`` (the same noise at any batch size and
    on any framework)."""

    hyper: dict = field(default_factory=lambda: {**_SCORE, "num_samples": 10, "std": 2.0, "seed": 0})
    dedupe = False  # noisy masks are all different

    def draws(self, hyper):
        return hyper["num_samples"]

    def vary(self, masks, draws, channels, sample, hyper):
        return P.noisy_masks(masks, draws, channels, sample, std=hyper["std"], seed=hyper["seed"])


@dataclass(frozen=True)
class ISCAM(ScoreCAM):
    """IS-CAM (Naidu et al. 2020): ``w_k = 1/N sum_{i=1..N} p^c(X * (i/N) M_k)``, the scores integrated along
    the path from the black image to ``X * M_k``."""

    hyper: dict = field(default_factory=lambda: {**_SCORE, "num_samples": 10})

    def draws(self, hyper):
        return hyper["num_samples"]

    def vary(self, masks, draws, channels, sample, hyper):
        return P.scaled_masks(masks, draws, hyper["num_samples"])


@dataclass(frozen=True)
class AblationCAM(Method):
    """Ablation-CAM (Desai & Ramaswamy 2020, eq. 2): ``w_k = (y^c - y^c_k) / y^c``, ``y^c_k`` the score with
    channel ``k`` of the layer set to 0."""

    hyper: dict = field(default_factory=lambda: dict(_MASKED))
    needs_grads: bool = False
    perturbation: str = "layer"

    def check(self, hyper, *, reshape=None):
        if reshape is not None:
            raise ValueError(f"reshape: {self.name!r} zeroes channels of the layer's own output, so it does not "
                             f"take reshape= (token layers); use 'scorecam' or a gradient method there")
        return _check_masked(hyper)

    def weights(self, ctx, *, batch_size, progress):
        host = _host_activations(self, ctx)
        y = target_scores(ctx.targets, ctx.outputs, ctx.activations.shape[0])[0]
        return P.ablation_weights(ctx.adapter, ctx.capture, ctx.index, ctx.activations, host, y, ctx.classes,
                                  batch_size=batch_size, progress=progress, info=ctx.info)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        CAM("cam", hyper={"classifier": None, "cam_weights": None}, needs_grads=False),
        GradientMethod("gradcam", formula=W.gradcam),
        GradientMethod("gradcam++", hyper={"eps": 0.0}, formula=W.gradcam_pp),
        GradientMethod("xgradcam", hyper={"eps": 0.0}, formula=W.xgradcam),
        GradientMethod("hirescam", formula=W.hirescam),
        GradientMethod("gradcam-elementwise", formula=W.gradcam_elementwise),
        GradientMethod("layercam", formula=W.layercam),
        EigenCAM("eigencam", needs_grads=False, eigen=True),
        EigenGradCAM("eigengradcam", eigen=True, formula=W.eigengradcam),
        ScoreCAM("scorecam"),
        SSCAM("sscam"),
        ISCAM("iscam"),
        AblationCAM("ablationcam"),
        GradientMethod("guided-gradcam", formula=W.gradcam, guided=True),
        InputGradient("guided-backprop", rule="guided"),
        InputGradient("deconvnet", rule="deconvnet"),
    ]
}


def get_method(name) -> Method:
    """The registered method called ``name`` (case-insensitive); ``ValueError`` listing the close names."""
    key = name.lower().replace("_", "-") if isinstance(name, str) else name
    if key in METHODS:
        return METHODS[key]
    close = difflib.get_close_matches(str(key), METHODS, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"method: unknown method {name!r}; expected one of {', '.join(METHODS)}.{hint}")
