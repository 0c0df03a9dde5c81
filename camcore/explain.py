"""``camcore.explain`` and ``camcore.Explainer``: from a model and inputs to class-activation maps, on any backend.

``Explainer(model, method=..., layer=..., **options)`` checks its options and builds the backend adapter once, so
what the adapter compiles or traces (Keras ``tf.function`` graphs, JAX ``jit`` functions, PyTorch ``torch.fx``
tails) serves every later call; ``explain(model, inputs, ...)`` is the one-shot form. Calls on one model are
serialised by a lock per model (re-entrant), so threads sharing a model never interleave the hooks, patched
layer calls and mode switches that one call puts on it and takes off again.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable

import numpy as np

from . import maps
from ._xp import array_namespace, float32, to_host
from .methods import Context, get_method

__all__ = ["explain", "Explainer"]

_COMMON = {"counterfactual": False, "eigen_smooth": False, "guided": False, "reshape": None, "model_mode": "eval",
           "data_format": None, "info": None}
_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one re-entrant lock per model object
_LOCKS_GUARD = threading.Lock()


def model_lock(model):
    """The re-entrant lock of ``model`` (a context manager); models that cannot be weakly referenced (a Flax
    ``(module, variables)`` tuple, a pair of functions: pure, never changed) need none and get a no-op."""
    try:
        with _LOCKS_GUARD:
            lock = _LOCKS.get(model)
            if lock is None:
                lock = _LOCKS[model] = threading.RLock()
        return lock
    except TypeError:
        return contextlib.nullcontext()


def explain(model, inputs, *, method: str, layer=None, targets=None, normalize: bool = True,
            upsample: bool = True, **options):
    """Class-activation maps of ``model`` for ``inputs``.

    Args:
        model: a ``torch.nn.Module``, a Keras 3 model (TensorFlow backend), a Flax linen ``(module, variables)``
            pair, a Flax nnx module, or a ``(features, head)`` pair of JAX functions; see ``docs/adapters.md``.
        inputs: a float batch in the model's own layout: ``(B, C, *S)`` for PyTorch, ``(B, *S, C)`` for
            channels-last Keras and JAX models and channels-last torch models (S: 1, 2 or 3 spatial dims); an
            array of the model's framework (NumPy is fine for Keras and JAX).
        method: ``"cam"``, ``"gradcam"``, ``"gradcam++"``, ``"xgradcam"``, ``"hirescam"``,
            ``"gradcam-elementwise"``, ``"layercam"``, ``"eigencam"``, ``"eigengradcam"``, or the gradient-free
            ``"scorecam"``, ``"sscam"``, ``"iscam"``, ``"ablationcam"`` (see :mod:`camcore.perturbation`); the
            input gradients ``"guided-backprop"`` and ``"deconvnet"`` (no layer) and ``"guided-gradcam"``; or a
            list of them: a dict of maps per method, all from one forward (and backward) pass, which is how to
            compare methods on equal terms (each method takes its own options from ``options``).
        layer: the framework's name of the layer (``"layer4.1"``, ``"Block_3/Conv_0"``), the layer object, or a
            list of them (fused, from one forward pass); ``None`` picks the last layer that outputs a feature map.
        targets: ``None`` (top class per sample), an int, a list of one int per sample, or a callable
            ``f(outputs) -> (B,)`` scores.
        normalize: min-max normalise each map to ``[0, 1]`` (a constant map becomes zeros).
        upsample: resize the maps to the inputs' spatial size (linear interpolation); ``False`` keeps the
            layer's resolution (the finest one when several layers are fused).
        **options:
            ``guided`` (False): multiply the normalised map by guided backpropagation (Guided Grad-CAM for
            any method), shaped like the inputs. ``counterfactual`` (False): explain ``-y^c`` (Grad-CAM sec. 3.2): the regions whose increase would
            lower the score. ``eigen_smooth`` (False): reduce the weighted channels by their first principal
            component instead of their sum. ``reshape``: a callable applied to activations and gradients
            before the formulas, e.g. :func:`camcore.tokens_to_grid` for vision transformers.
            ``model_mode`` ("eval"): or "as-is" to keep the modules' training flags. ``data_format``:
            ``"channels_last"`` or ``"channels_first"``, the layout of the inputs (default: read from the model;
            a torch model converted from Keras through ONNX takes channels-last inputs).
            For ``"cam"``: ``classifier`` (name of the linear layer after global pooling; default: found
            automatically) or ``cam_weights`` ((num_classes, C) matrix). Method hyper-parameters: ``eps`` for
            ``"gradcam++"`` and ``"xgradcam"``. Gradient-free methods: ``batch_size`` (masked copies per forward
            pass; None: the Score-CAM family times its first passes and picks the fastest chunk,
            :class:`camcore.perturbation.Chunker`; Ablation-CAM 32), ``progress`` (None: a tqdm bar when stderr is a
            terminal; True/False); Score-CAM family: ``weighting`` ("probability": the target's softmax probability,
            as the authors; or "channel-softmax": a softmax over channels of the logits, as pytorch-grad-cam),
            ``top_k`` (Faster Score-CAM: score only the k channels of largest variance); ``"sscam"``: ``num_samples``
            (10), ``std`` (2.0), ``seed`` (0); ``"iscam"``: ``num_samples`` (10). ``info``: a dict to receive how a
            gradient-free method ran (``"path"``, ``"reason"``, ``"masked_forwards"``).
    Returns:
        float32 maps ``(B, *S)`` of the inputs' framework and device (``(B, H, W)`` for images), whatever the
        model's channel layout; for input-gradient and guided methods, float32 arrays shaped like the inputs
        (the model's layout); ``{method: maps}`` for a list of methods.
    """
    # two statements: traced inside a tf.function, AutoGraph misreads the chained ``Explainer(...)(...)`` call
    explainer = Explainer(model, method=method, layer=layer, normalize=normalize, upsample=upsample, **options)
    return explainer(inputs, targets=targets)


class Explainer:
    """A persistent :func:`explain` for one model: ``Explainer(model, method=..., layer=..., **options)`` checks the
    options, builds the backend adapter and resolves the named layers once; ``explainer(inputs, targets=...)``
    returns the maps, and what the adapter compiled on the first call (graphs, jitted functions, fx tails) serves
    the later ones. Arguments as for :func:`explain`; ``layer=None`` picks the default layer on the first call
    and keeps it. Also a context manager: leaving it (or :meth:`close`) releases the adapter and its graphs.

    The model is never changed between or after calls; its weights may change between calls (they are read at
    each call), its structure (the layers, the graph) should not, since compiled tails follow the first call's.
    Calls on one model, from any number of Explainers and threads, are serialised by a lock per model.
    """

    def __init__(self, model, *, method: str, layer=None, normalize: bool = True, upsample: bool = True,
                 **options):
        from camcore.backends import adapter_for  # import here: camcore itself imports no framework

        self._several = isinstance(method, (list, tuple))
        specs = [get_method(m) for m in (method if self._several else [method])]
        if not specs:
            raise ValueError("method: expected a method name or a non-empty list of them, got an empty list")
        allowed = {**_COMMON, **{k: v for spec in specs for k, v in spec.hyper.items()}}
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            which = ", ".join(repr(spec.name) for spec in specs)
            raise TypeError(f"explain: unknown option(s) {', '.join(map(repr, unknown))} for method {which}; "
                            f"expected any of {', '.join(sorted(allowed))}")
        opts = {**allowed, **options}
        _check_common({"counterfactual": opts["counterfactual"], "eigen_smooth": opts["eigen_smooth"],
                       "guided": opts["guided"], "normalize": normalize, "upsample": upsample}, opts["info"],
                      opts["reshape"])
        for spec in specs:
            if opts["counterfactual"] and not spec.counterfactual:
                raise ValueError(f"counterfactual: {spec.name!r} uses no gradient, so it has no counterfactual map; "
                                 f"use a gradient method such as 'gradcam'")
            if (opts["guided"] or spec.guided) and spec.rule is None and (opts["counterfactual"] or not upsample):
                raise ValueError(f"guided: {spec.name!r} guided multiplies guided backpropagation of the score by the "
                                 f"map at the inputs' size: it needs upsample=True and counterfactual=False")
        if layer is not None and all(spec.rule for spec in specs):
            raise ValueError(f"layer: {specs[0].name!r} is a gradient with respect to the inputs and takes no layer; "
                             f"pass layer=None")
        self.model, self.methods, self.normalize, self.upsample = model, specs, normalize, upsample
        self.method = specs[0]
        self._hyper = [spec.check({k: opts[k] for k in spec.hyper}, reshape=opts["reshape"]) for spec in specs]
        self._opts = opts
        self._adapter = adapter_for(model, model_mode=opts["model_mode"], data_format=opts["data_format"])
        # only a list means several layers: a tuple can be one layer's path (Flax)
        self._layers = None if layer is None else list(layer) if isinstance(layer, list) else [layer]
        if self._layers == []:
            raise ValueError("layer: expected a layer or a non-empty list of layers, got an empty list")
        self._names = None if self._layers is None else [self._adapter.resolve_layer(lay)[0] for lay in self._layers]

    @property
    def adapter(self):
        """The backend adapter (``camcore.backends``); ``RuntimeError`` once the Explainer is closed."""
        if self._adapter is None:
            raise RuntimeError("Explainer: this Explainer is closed; make a new one")
        return self._adapter

    def __call__(self, inputs, targets=None, *, info: dict | None = None):
        """Maps ``(B, *S)`` of ``inputs`` for ``targets`` (as :func:`explain`); ``info`` overrides the option."""
        adapter, opts = self.adapter, self._opts
        _check_common({}, info, None)
        with model_lock(self.model):
            x = adapter.check_inputs(inputs)
            layered = [(spec, hyper) for spec, hyper in zip(self.methods, self._hyper) if spec.rule is None]
            cams = self._maps(x, targets, layered, info) if layered else []
            rules = {spec.rule for spec in self.methods if spec.rule}
            if opts["guided"] or any(spec.guided for spec, _ in layered):
                rules.add("guided")
            guided = {rule: float32(adapter._core_outputs(adapter.input_gradients(x, targets, rule=rule)[1]))
                      for rule in sorted(rules)}
            out, last = [], adapter._last(x)
            for spec in self.methods:
                if spec.rule:
                    out.append(guided[spec.rule])
                    continue
                cam = cams.pop(0)
                out.append(maps.guide(guided["guided"], cam, channels_last=last) if opts["guided"] or spec.guided
                           else cam)
            out = [adapter.to_native(o, inputs) for o in out]
            return dict(zip((spec.name for spec in self.methods), out)) if self._several else out[0]

    def _maps(self, x, targets, methods, info) -> list:
        """The maps ``(B, *S)`` of the layer methods, ``methods`` as ``(spec, hyper)`` pairs (normalised where
        asked), from one capture."""
        adapter, opts = self.adapter, self._opts
        if self._layers is None:
            self._layers = [adapter.default_layer(x)]
            self._names = [adapter.resolve_layer(self._layers[0])[0]]
        grads = any(spec.needs_grads for spec, _ in methods)
        cap = adapter.capture(x, self._layers, targets, gradients=grads)
        if isinstance(cap.targets, list):  # class indices: range-checked against the outputs, for every method
            adapter.classes(cap)
        reshape: Callable | None = opts["reshape"]
        cams: list[list] = [[] for _ in methods]  # per method, per layer
        for k, (name, a, g) in enumerate(zip(self._names, cap.acts, cap.grads)):
            a = float32(reshape(a) if reshape else a)
            g = None if g is None else float32(reshape(g) if reshape else g)
            if adapter.concrete(a):  # values exist (not a jit trace): check them
                _check_layer_arrays(name, a, g)
            if opts["counterfactual"] and g is not None:
                g = -g
            ctx = Context(name, a, g, cap.outputs, cap.targets, adapter, cap, k,
                          counterfactual=opts["counterfactual"], eigen_smooth=opts["eigen_smooth"],
                          info=opts["info"] if info is None else info, scale_free=self.normalize)
            for j, (spec, hyper) in enumerate(methods):
                cams[j].append(maps.relu(spec(ctx, **hyper)))
        size = _output_size(adapter.spatial_shape(x), cams[0], self.upsample)
        out = [maps.fuse(c, size) for c in cams]
        for (spec, _), o in zip(methods, out):
            if adapter.concrete(o):
                _check_map(spec.name, o, raw=not self.normalize)
        return [maps.normalize(o) if self.normalize else o for o in out]

    def close(self) -> None:
        """Release the adapter and what it compiled; later calls raise."""
        self._adapter = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _check_common(flags: dict, info, reshape) -> None:
    """``TypeError`` naming an option of the wrong type: the flags must be ``True`` or ``False`` (a string such as
    ``"no"`` is not a flag), ``info`` ``None`` or a dict to fill, ``reshape`` ``None`` or a callable."""
    for key, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{key}: expected True or False, got {value!r}")
    if info is not None and not isinstance(info, dict):
        raise TypeError(f"info: expected None or a dict for camcore to fill, got {type(info).__name__}")
    if reshape is not None and not callable(reshape):
        raise TypeError(f"reshape: expected None or a callable f(a) -> (B, C, *S), such as camcore.tokens_to_grid; "
                        f"got {type(reshape).__name__}")


def _check_map(method: str, cam, *, raw: bool) -> None:
    """``ValueError`` naming the samples whose map is not finite. Only raw maps (``normalize=False``) carry their
    scale, so only they can overflow float32; normalised ones are computed scale-free."""
    xp = array_namespace(cam)
    bad = ~xp.all(xp.isfinite(cam), axis=tuple(range(1, cam.ndim)))
    if bool(xp.any(bad)):
        samples = [i for i, v in enumerate(to_host(bad).tolist()) if v]
        if raw:
            raise ValueError(f"{method}: the raw map of sample(s) {samples} overflows float32 (weights times "
                             f"activations beyond 3.4e38); pass normalize=True, which computes the maps scale-free")
        raise ValueError(f"{method}: the map of sample(s) {samples} is not finite: the method's weights overflowed "
                         f"(a saturated model?); try another method or layer")


def _check_layer_arrays(name, a, g):
    xp = array_namespace(a)
    if a.ndim < 3:
        raise ValueError(f"layer: {name!r} outputs shape {tuple(a.shape)}, not a channels-first feature map "
                         f"(B, C, *spatial); pick a convolutional layer, or pass reshape= for token layers")
    if not bool(xp.all(xp.isfinite(a))):
        raise ValueError(f"layer: the activations of {name!r} contain NaN or inf")
    if g is None:
        return
    if not bool(xp.all(xp.isfinite(g))):
        raise ValueError(f"layer: the gradients at {name!r} contain NaN or inf")
    dead = xp.all(g == 0, axis=tuple(range(1, g.ndim)))
    if bool(xp.any(dead)):
        samples = [i for i, d in enumerate(dead.tolist() if hasattr(dead, "tolist") else list(dead)) if d]
        raise ValueError(f"layer: the target scores have zero gradient w.r.t. {name!r} for sample(s) {samples}: "
                         f"the layer does not influence the target there (saturated or disconnected); pick "
                         f"another layer or target")


def _output_size(input_size, cams, upsample):
    finest = max((tuple(c.shape[1:]) for c in cams), key=lambda s: (len(s), _prod(s)))
    if not upsample:
        return finest
    if len(input_size) != len(finest):
        raise ValueError(f"upsample: the maps have {len(finest)} spatial dims {finest} but the inputs have "
                         f"{len(input_size)} {tuple(input_size)}; pass upsample=False")
    if any(m > n for m, n in zip(finest, input_size)) and any(m < n for m, n in zip(finest, input_size)):
        # e.g. (7, 7) maps for inputs read as (B, C, H, W) = (B, 224, 224, 3): the spatial shape (224, 3) is wrong
        raise ValueError(f"upsample: the maps {finest} are larger than the inputs' spatial shape "
                         f"{tuple(input_size)} along one axis and smaller along another, so the inputs' layout was "
                         f"misread; pass data_format='channels_last' (inputs (B, *spatial, C)) or "
                         f"'channels_first' (inputs (B, C, *spatial)), or upsample=False")
    return tuple(input_size)


def _prod(s):
    out = 1
    for v in s:
        out *= v
    return out
