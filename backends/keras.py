"""Keras 3 adapter (TensorFlow backend): a layer's ``call`` intercepted for one call, ``tf.GradientTape``.

One mechanism serves every kind of Keras model: functional, Sequential, models nested inside models and
subclassed models. For the length of one call the requested layer's ``call`` is replaced on that layer object by
a wrapper that records its output and tells the tape to watch it; the original method is put back in
``finally``. The tape watches nothing else (``watch_accessed_variables=False``), so the layers before the
target are not recorded and ``tape.gradient`` differentiates only the layers after it, w.r.t. the activations
and never the weights.

TensorFlow is not covered by the Array API, so the adapter hands the core NumPy arrays, channels-first
``(B, C, *S)``; ``explain`` then returns a ``tf.Tensor`` for ``tf.Tensor`` inputs and NumPy for NumPy inputs.

Layers are named as Keras names them; a layer inside a nested model is found by its own name when that is
unique, or by its path ``"outer/inner"`` (Keras forbids ``"/"`` in names, so paths are unambiguous).
"""
from __future__ import annotations

import contextlib

import keras
import numpy as np
import tensorflow as tf

from camcore.targets import check_targets, class_indices, target_scores

from . import check_batch_size, check_data_format, check_masks, masked_rows, unknown_layer

__all__ = ["KerasAdapter"]

_MODES = ("eval", "as-is")


def _children(layer) -> list:
    return [c for c in layer._flatten_layers(include_self=False, recursive=False)
            if not isinstance(c, keras.layers.InputLayer)]


def _walk(layer, prefix=""):
    """``(path, layer)`` for every sub-layer of ``layer``, depth first, in the order Keras tracks them."""
    for child in _children(layer):
        path = f"{prefix}{child.name}"
        yield path, child
        yield from _walk(child, path + "/")


def _model_format(model) -> str:
    """The data format of the model's first convolution (else of any layer that declares one; else Keras'
    global default). Pooling and flattening layers carry the global default, so convolutions come first."""
    declared = [(hasattr(layer, "kernel_size"), getattr(layer, "data_format", None)) for _, layer in _walk(model)]
    formats = [fmt for conv, fmt in sorted(declared, key=lambda d: not d[0])
               if fmt in ("channels_last", "channels_first")]
    return formats[0] if formats else keras.config.image_data_format()


def _numpy(tree):
    return tf.nest.map_structure(lambda t: t.numpy() if tf.is_tensor(t) else t, tree)


@contextlib.contextmanager
def _intercepted(layers, wrap):
    """Replace ``layer.call`` by ``wrap(i, original_call)`` for each layer; always restore it."""
    saved = []
    try:
        for i, layer in enumerate(layers):
            saved.append((layer, layer.__dict__.get("call")))
            object.__setattr__(layer, "call", wrap(i, layer.call))
        yield
    finally:
        for layer, own in reversed(saved):
            if own is None:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", own)


class KerasAdapter:
    """Adapter for a Keras 3 model or layer on the TensorFlow backend.

    Args:
        model: a ``keras.Model`` (functional, Sequential or subclassed) or ``keras.layers.Layer``; it is never
            changed: ``call`` methods are restored and non-trainable variables (batch-norm statistics, seed
            states) are put back after every call, also when the model raises.
        model_mode: ``"eval"`` (default) calls the model with ``training=False``; ``"as-is"`` calls it with
            no ``training`` argument.
        data_format: ``"channels_last"`` or ``"channels_first"``; ``None`` reads it from the model's first
            layer that has a ``data_format`` (else ``keras.config.image_data_format()``).
    """

    def __init__(self, model, *, model_mode: str = "eval", data_format: str | None = None):
        if keras.backend.backend() != "tensorflow":
            raise RuntimeError(f"model: camcore's Keras adapter needs the TensorFlow backend of Keras 3, but "
                               f"KERAS_BACKEND is {keras.backend.backend()!r}; set KERAS_BACKEND=tensorflow "
                               f"(for JAX pass a Flax model; for PyTorch a torch.nn.Module)")
        if model_mode not in _MODES:
            raise ValueError(f"model_mode: expected one of {_MODES}, got {model_mode!r}")
        self.model = model
        self.model_mode = model_mode
        self.channels_last = check_data_format(data_format, _model_format(model))

    # ----------------------------------------------------------------------------------------- layers
    def layer_names(self) -> list[str]:
        """Every layer's path (``"name"``, or ``"outer/inner"`` inside nested models)."""
        return [p for p, _ in _walk(self.model)]

    def resolve_layer(self, layer):
        """``(path, layer)`` for a layer name, a path ``"outer/inner"`` or a layer object of the model."""
        layers = list(_walk(self.model))
        if isinstance(layer, keras.layers.Layer):
            for path, obj in layers:
                if obj is layer:
                    return path, obj
            raise ValueError(f"layer: the {type(layer).__name__} {layer.name!r} passed is not part of the model")
        if not isinstance(layer, str):
            raise TypeError(f"layer: expected a Keras layer name (str) or a keras.layers.Layer of the model, "
                            f"got {type(layer).__name__}")
        by_path = dict(layers)
        if layer in by_path:
            return layer, by_path[layer]
        same = [(p, obj) for p, obj in layers if obj.name == layer]
        if len({id(obj) for _, obj in same}) == 1:
            return same[0]
        if same:
            raise ValueError(f"layer: {layer!r} names several layers in nested models; pick one by its path: "
                             f"{', '.join(repr(p) for p, _ in same)}")
        bare = [obj.name for p, obj in layers if "/" in p]  # nested layers, suggested by name where unambiguous
        paths = [p for p, _ in layers]
        raise unknown_layer(layer, paths + [n for n in dict.fromkeys(bare) if bare.count(n) == 1 and n not in paths])

    def default_layer(self, inputs) -> str:
        """The last layer (in the order calls finish, so a nested model comes after its own layers) whose
        output is a feature map: the inputs' rank and more than one spatial position. Costs one forward pass."""
        x = self._tensor(inputs)
        layers = list(_walk(self.model))
        seen: list[str] = []

        def wrap(i, call):
            def recording(*args, **kwargs):
                out = call(*args, **kwargs)
                if tf.is_tensor(out) and out.shape.rank == x.shape.rank and np.prod(self._spatial(out.shape)) > 1:
                    seen.append(layers[i][0])
                return out

            return recording

        with self._session(x), _intercepted([obj for _, obj in layers], wrap):
            self._call(x)
        if not seen:
            raise ValueError("layer: no layer of the model outputs a feature map of the inputs' rank; name the "
                             "layer to explain")
        return seen[-1]

    # ----------------------------------------------------------------------------------------- inputs
    def check_inputs(self, inputs) -> None:
        if not (tf.is_tensor(inputs) or isinstance(inputs, np.ndarray)):
            raise TypeError(f"inputs: expected a tf.Tensor or a NumPy array for a Keras model, "
                            f"got {type(inputs).__name__}")
        if not (inputs.dtype.is_floating if tf.is_tensor(inputs)
                else np.issubdtype(inputs.dtype, np.floating) or inputs.dtype.name == "bfloat16"):
            raise TypeError(f"inputs: expected a floating-point array, got dtype {inputs.dtype}")
        layout = "(B, *spatial, C)" if self.channels_last else "(B, C, *spatial)"
        if len(inputs.shape) < 2 or inputs.shape[0] == 0:
            raise ValueError(f"inputs: expected a non-empty batch {layout} with B >= 1, got shape "
                             f"{tuple(inputs.shape)}")

    def _spatial(self, shape) -> tuple[int, ...]:
        shape = tuple(shape)
        return shape[1:-1] if self.channels_last else shape[2:]

    def spatial_shape(self, inputs) -> tuple[int, ...]:
        """The inputs' spatial size ``S`` (of ``(B, *S, C)`` channels-last or ``(B, C, *S)``)."""
        return self._spatial(inputs.shape)

    def _tensor(self, inputs):
        self.check_inputs(inputs)
        if not tf.executing_eagerly():
            raise RuntimeError("explain: call camcore eagerly, not inside a tf.function")
        return tf.convert_to_tensor(inputs)

    def _channels_first(self, a, rank):
        """NumPy ``(B, C, *S)`` from the layer's native layout. Only outputs of the inputs' ``rank`` are feature
        maps; others (a transformer's ``(B, N, D)`` tokens) stay as they are, as in PyTorch."""
        a = a.numpy()
        return np.moveaxis(a, -1, 1) if self.channels_last and a.ndim == rank else a

    @staticmethod
    def concrete(a) -> bool:
        """Whether ``a`` holds values (always: the adapter runs eagerly)."""
        return True

    @staticmethod
    def to_native(maps, inputs):
        """The core's NumPy maps as a ``tf.Tensor`` for ``tf.Tensor`` inputs, else as they are."""
        return tf.convert_to_tensor(maps) if tf.is_tensor(inputs) else maps

    # ------------------------------------------------------------------------------------ the session
    @contextlib.contextmanager
    def _session(self, x):
        """Put the model's non-trainable variables (batch-norm statistics, seed states) back afterwards. An
        unbuilt model is first built symbolically, so its variables exist (at their initial values) to save."""
        if not self.model.built:
            self.model(keras.KerasTensor((None, *x.shape[1:]), dtype=x.dtype.name))
        saved = [(v, v.numpy()) for v in self.model.non_trainable_variables]
        try:
            yield
        finally:
            for v, value in saved:
                v.assign(value)

    def _call(self, x):
        return self.model(x, training=False) if self.model_mode == "eval" else self.model(x)

    @staticmethod
    def _scores(targets, outputs, batch):
        """``(B,)`` differentiable target scores: the callable's, or the logit of each sample's class."""
        if callable(targets) or not tf.is_tensor(outputs):
            return target_scores(targets, outputs, batch)[0]
        idx = class_indices(targets, outputs.numpy())
        return tf.gather(outputs, idx, axis=1, batch_dims=1)

    # ---------------------------------------------------------------------------- the contract methods
    def activations_and_grads(self, inputs, layers, targets=None, *, gradients=True):
        """One forward pass; for each layer, its activations and ``d(sum_b y_b)/dA``.

        Args:
            inputs: ``(B, *S, C)`` (channels-last) or ``(B, C, *S)`` float tf.Tensor or NumPy array.
            layers: list of layer names, paths or layer objects.
            targets: as :func:`camcore.targets.check_targets` accepts; a callable gets the model's outputs
                (``tf.Tensor``) and must return ``(B,)`` differentiable scores.
            gradients: ``False`` skips the tape's gradient (``grads`` is then a list of ``None``).
        Returns:
            ``(outputs, activations, grads)`` as NumPy: the outputs as the model returns them, and per layer
            activations and gradients channels-first ``(B, C, *S)``. A layer called several times in one
            forward pass is taken at its last call.
        """
        x = self._tensor(inputs)
        named = [self.resolve_layer(layer) for layer in layers]
        targets = check_targets(targets, x.shape[0])
        captured: dict[int, tf.Tensor] = {}
        tape = tf.GradientTape(watch_accessed_variables=False)

        def wrap(i, call):
            def capturing(*args, **kwargs):
                out = call(*args, **kwargs)
                if not tf.is_tensor(out):
                    raise TypeError(f"layer: {named[i][0]!r} returns {type(out).__name__}, not a tensor; pick a "
                                    f"layer whose output is one tensor")
                tape.watch(out)
                captured[i] = out
                return out

            return capturing

        with self._session(x), _intercepted([obj for _, obj in named], wrap), tape:
            outputs = self._call(x)
            missing = [n for i, (n, _) in enumerate(named) if i not in captured]
            if missing:
                raise ValueError(f"layer: {missing[0]!r} did not run during the forward pass of the inputs")
            total = tf.reduce_sum(self._scores(targets, outputs, x.shape[0])) if gradients else None
        acts = [captured[i] for i in range(len(named))]
        rank = x.shape.rank
        if not gradients:
            return _numpy(outputs), [self._channels_first(a, rank) for a in acts], [None] * len(acts)
        grads = tape.gradient(total, acts)
        for (name, _), g in zip(named, grads):
            if g is None:
                raise ValueError(f"layer: {name!r} does not influence the target scores (no gradient path from "
                                 f"the outputs to it); pick a layer the outputs depend on")
        return (_numpy(outputs), [self._channels_first(a, rank) for a in acts],
                [self._channels_first(tf.convert_to_tensor(g), rank) for g in grads])

    def forward_masked(self, inputs, masks, *, at="input", targets=None, batch_size=32):
        """Target scores with masks multiplied into the inputs or into a layer's activations.

        Args:
            inputs: as in :meth:`activations_and_grads`.
            masks: ``(M, *shape)`` shared by all samples or ``(B, M, *shape)`` per sample, channels-first:
                ``shape`` broadcasts against one sample at ``at`` in the ``(C, *S)`` convention, e.g.
                ``(1, H, W)`` spatial masks or ``(C, 1, 1)`` channel masks (moved to the model's layout here).
            at: ``"input"``, or a layer (name, path or object) whose output is multiplied by the mask.
            targets: as in :meth:`activations_and_grads`; ``None`` is each sample's top class unmasked.
            batch_size: masked copies per forward pass; bounds peak memory.
        Returns: ``(B, M)`` float32 NumPy scores.
        """
        x = self._tensor(inputs)
        check_batch_size(batch_size)
        b = x.shape[0]
        masks = np.asarray(masks)
        targets = check_targets(targets, b)
        named = None if at == "input" else self.resolve_layer(at)
        current: dict[str, tf.Tensor] = {}
        probe: list[tuple] = []

        def wrap(i, call):
            def masking(*args, **kwargs):
                out = call(*args, **kwargs)
                if "mask" not in current:  # the unmasked probe pass: learn the shape at `at`
                    probe.append(tuple(out.shape))
                    return out
                return out * tf.cast(current["mask"], out.dtype)

            return masking

        layers = [] if named is None else [named[1]]
        with self._session(x), _intercepted(layers, wrap):
            plain = self._call(x)
            idx = None if callable(targets) else target_scores(targets, _numpy(plain), b)[1]
            if named is not None and not probe:
                raise ValueError(f"at: layer {named[0]!r} did not run during the forward pass of the inputs")
            at_shape = tuple(x.shape) if named is None else probe[-1]
            feature_map = self.channels_last and len(at_shape) == x.shape.rank
            at_shape = (at_shape[0], at_shape[-1], *at_shape[1:-1]) if feature_map else at_shape
            per_sample = check_masks(masks.shape, b, at_shape, at)
            masks = np.moveaxis(masks, 2 if per_sample else 1, -1) if feature_map else masks

            def score(i, chunk):
                xs = tf.repeat(x[i : i + 1], chunk.shape[0], axis=0)
                if named is None:
                    out = self._call(xs * tf.cast(chunk, xs.dtype))
                else:
                    current["mask"] = chunk
                    out = self._call(xs)
                scores = (target_scores(targets, out, chunk.shape[0])[0] if callable(targets)
                          else out[:, int(idx[i])])
                return np.asarray(scores, dtype=np.float32)

            rows = masked_rows(masks, b, per_sample, batch_size, score)
        return np.stack([np.concatenate(row) for row in rows])

    def linear_classifier(self, name=None):
        """``(name, W (K, C), b (K,) or None)`` as NumPy, of the ``Dense`` layer named ``name`` or of the
        model's last ``Dense`` layer."""
        if name is None:
            dense = [(p, obj) for p, obj in _walk(self.model) if isinstance(obj, keras.layers.Dense)]
            if not dense:
                raise ValueError("classifier: the model has no keras.layers.Dense layer; name the classifier "
                                 "with classifier=... or pass the class weights as cam_weights=(num_classes, C)")
            name, layer = dense[-1]
        else:
            name, layer = self.resolve_layer(name)
        kernel = getattr(layer, "kernel", None)
        if kernel is None or len(kernel.shape) != 2:
            raise ValueError(f"classifier: {name!r} has no (C, num_classes) kernel; got {type(layer).__name__}")
        bias = getattr(layer, "bias", None)
        return name, np.asarray(kernel).T, None if bias is None else np.asarray(bias)
