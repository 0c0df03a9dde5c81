"""``camcore.explain``: one call from a model and inputs to class-activation maps, on any backend."""
from __future__ import annotations

from collections.abc import Callable

from . import maps
from . import perturbation as P
from ._xp import array_namespace, float32, spatial_axes, to_host
from .methods import get_method
from .targets import check_targets, class_indices, target_scores
from .weights import cam as cam_weights_for

__all__ = ["explain"]

_COMMON = {"counterfactual": False, "eigen_smooth": False, "reshape": None, "model_mode": "eval",
           "data_format": None, "classifier": None, "cam_weights": None, "info": None}


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
            ``"scorecam"``, ``"sscam"``, ``"iscam"``, ``"ablationcam"`` (see :mod:`camcore.perturbation`).
        layer: the framework's name of the layer (``"layer4.1"``, ``"Block_3/Conv_0"``), the layer object, or a
            list of them (fused, from one forward pass); ``None`` picks the last layer that outputs a feature map.
        targets: ``None`` (top class per sample), an int, a list of one int per sample, or a callable
            ``f(outputs) -> (B,)`` scores.
        normalize: min-max normalise each map to ``[0, 1]`` (a constant map becomes zeros).
        upsample: resize the maps to the inputs' spatial size (linear interpolation); ``False`` keeps the
            layer's resolution (the finest one when several layers are fused).
        **options:
            ``counterfactual`` (False): explain ``-y^c`` (Grad-CAM sec. 3.2): the regions whose increase would
            lower the score. ``eigen_smooth`` (False): reduce the weighted channels by their first principal
            component instead of their sum. ``reshape``: a callable applied to activations and gradients
            before the formulas, e.g. :func:`camcore.tokens_to_grid` for vision transformers.
            ``model_mode`` ("eval"): or "as-is" to keep the modules' training flags. ``data_format``:
            ``"channels_last"`` or ``"channels_first"``, the layout of the inputs (default: read from the model;
            a torch model converted from Keras through ONNX takes channels-last inputs).
            For ``"cam"``: ``classifier`` (name of the linear layer after global pooling; default: found
            automatically) or ``cam_weights`` ((num_classes, C) matrix). Method hyper-parameters: ``eps``
            for ``"gradcam++"`` and ``"xgradcam"``. Gradient-free methods: ``batch_size`` (32, masked copies
            per forward pass), ``progress`` (None: a tqdm bar when stderr is a terminal; True/False);
            Score-CAM family: ``weighting`` ("probability": the target's softmax probability, as the authors;
            or "channel-softmax": a softmax over channels of the logits, as pytorch-grad-cam), ``top_k``
            (Faster Score-CAM: score only the k channels of largest variance); ``"sscam"``: ``num_samples``
            (10), ``std`` (2.0), ``seed`` (0); ``"iscam"``: ``num_samples`` (10). ``info``: a dict to receive
            how a gradient-free method ran (``"path"``, ``"reason"``, ``"masked_forwards"``).
    Returns:
        float32 maps ``(B, *S)`` of the inputs' framework and device (``(B, H, W)`` for images), whatever the
        model's channel layout.
    """
    from camcore.backends import adapter_for  # import here: camcore itself imports no framework

    spec = get_method(method)
    allowed = {**_COMMON, **spec.hyper}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"explain: unknown option(s) {', '.join(map(repr, unknown))} for method {spec.name!r}; "
                        f"expected any of {', '.join(sorted(allowed))}")
    opts = {**allowed, **options}
    hyper = {k: opts[k] for k in spec.hyper}
    if opts["counterfactual"] and not (spec.needs_grads or spec.name == "cam"):
        raise ValueError(f"counterfactual: {spec.name!r} uses no gradient, so it has no counterfactual map; "
                         f"use a gradient method such as 'gradcam'")
    if spec.perturbation:
        hyper = P.check_options(spec.name, hyper, opts["reshape"])
    if spec.name != "cam" and (opts["classifier"] is not None or opts["cam_weights"] is not None):
        raise TypeError(f"explain: 'classifier' and 'cam_weights' apply to method='cam' only, not {spec.name!r}")

    adapter = adapter_for(model, model_mode=opts["model_mode"], data_format=opts["data_format"])
    adapter.check_inputs(inputs)
    targets = check_targets(targets, inputs.shape[0])
    # only a list means several layers: a tuple can be one layer's path (Flax)
    layers = list(layer) if isinstance(layer, list) else [adapter.default_layer(inputs) if layer is None else layer]
    if not layers:
        raise ValueError("layer: expected a layer or a non-empty list of layers, got an empty list")
    names = [adapter.resolve_layer(lay)[0] for lay in layers]
    outputs, acts, grads = adapter.activations_and_grads(inputs, layers, targets, gradients=spec.needs_grads)
    reshape: Callable | None = opts["reshape"]
    classes = _classes(targets, outputs) if spec.perturbation else None

    cams = []
    for name, a, g in zip(names, acts, grads):
        a = float32(reshape(a) if reshape else a)
        g = None if g is None else float32(reshape(g) if reshape else g)
        if adapter.concrete(a):  # values exist (not a jit trace): check them
            _check_layer_arrays(name, a, g)
        if opts["counterfactual"] and g is not None:
            g = -g
        if spec.name == "cam":
            w = _cam_weights(adapter, name, a, outputs, targets, opts)
            w = -w if opts["counterfactual"] else w
        elif spec.perturbation:
            w = _perturbation_weights(spec, adapter, inputs, name, a, outputs, targets, classes, hyper, opts["info"])
        else:
            w = None if spec.weights is None else spec.weights(a, g, **hyper)
        weighted = maps.weigh(w, a)
        if spec.eigen or opts["eigen_smooth"]:  # oriented by the method's map, else by the activation energy
            orient = spec.orient(a, g) if spec.orient else None if w is None else maps.channel_sum(weighted)
            raw = maps.principal_component(weighted, orient=orient)
        else:
            raw = maps.channel_sum(weighted)
        cams.append(maps.relu(raw))

    size = _output_size(adapter.spatial_shape(inputs), cams, upsample)
    out = maps.fuse(cams, size)
    return adapter.to_native(maps.normalize(out) if normalize else out, inputs)


def _classes(targets, outputs):
    """A callable target as it is, else one host int class index per sample."""
    return targets if callable(targets) else to_host(class_indices(targets, outputs)).tolist()


def _perturbation_weights(spec, adapter, inputs, name, a, outputs, targets, classes, hyper, info):
    if not adapter.concrete(a):
        raise ValueError(f"method: {spec.name!r} chooses its masks from the activations' values, so it runs "
                         f"eagerly; call explain outside jax.jit (the forward passes are compiled inside)")
    host = to_host(a)
    run = {k: hyper[k] for k in ("batch_size", "progress")}
    if spec.perturbation == "layer":
        y = target_scores(targets, outputs, a.shape[0])[0]
        return P.ablation_weights(adapter, inputs, name, a, host, y, classes, info=info, **run)
    return P.score_weights(adapter, inputs, a, host, classes, variant=spec.name, info=info,
                           **{k: v for k, v in hyper.items() if k not in run}, **run)


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


def _cam_weights(adapter, name, a, outputs, targets, opts):
    """CAM's ``(B, C)`` weights: rows of the user's ``cam_weights``, or of the classifier, checked to be the
    linear layer applied to the global average of ``a`` (CAM's premise)."""
    xp = array_namespace(a)
    c = a.shape[1]
    logits = outputs if hasattr(outputs, "ndim") and outputs.ndim == 2 else None
    if callable(targets) or (logits is None and targets is None):
        raise ValueError("targets: method='cam' explains a class: pass class indices (an int or one per sample), "
                         "or None with a model that returns (B, num_classes) logits")
    idx = (class_indices(targets, float32(logits)) if logits is not None
           else xp.asarray(targets))
    if opts["cam_weights"] is not None:
        wm = xp.asarray(opts["cam_weights"])
        if wm.ndim != 2 or wm.shape[1] != c:
            raise ValueError(f"cam_weights: expected a (num_classes, {c}) matrix for layer {name!r} with {c} "
                             f"channels, got shape {tuple(wm.shape)}")
        if adapter.concrete(idx) and int(xp.max(idx)) >= wm.shape[0]:
            raise ValueError(f"targets: class index {int(xp.max(idx))} is out of range for cam_weights with "
                             f"{wm.shape[0]} rows")
        return cam_weights_for(float32(wm), idx)
    cname, wm, bias = adapter.linear_classifier(opts["classifier"])
    wm = float32(wm)
    if wm.shape[1] != c:
        raise ValueError(f"layer: method='cam' needs the feature map the classifier {cname!r} reads after global "
                         f"pooling; {name!r} has {c} channels but {cname!r} expects {wm.shape[1]}")
    if logits is not None and adapter.concrete(a):  # CAM's premise: logits == classifier(GAP(A)); verify it
        pred = xp.matmul(xp.mean(a, axis=spatial_axes(a)), xp.matrix_transpose(wm))
        pred = pred if bias is None else pred + float32(bias)
        ref = float32(logits)
        err = float(xp.max(xp.abs(pred - ref)))
        if err > 1e-3 * (1.0 + float(xp.max(xp.abs(ref)))):
            raise ValueError(f"layer: method='cam' needs the layer whose global average pooling feeds the "
                             f"classifier {cname!r} directly, but the outputs differ from {cname!r}(mean of "
                             f"{name!r}) by up to {err:.3g}; pick that layer, or pass cam_weights=")
    return cam_weights_for(wm, idx)


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
