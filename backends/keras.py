"""Keras 3 backend (TensorFlow): a layer's ``call`` intercepted for one call, ``tf.GradientTape``.

One mechanism serves every kind of Keras model: functional, Sequential, models nested inside models and
subclassed models. For the length of one call the requested layer's ``call`` is replaced on that layer object by
a wrapper that records its output and tells the tape to watch it; the original method is put back in
``finally``. The tape watches nothing else (``watch_accessed_variables=False``), so the layers before the
target are not recorded and ``tape.gradient`` differentiates only the layers after it, w.r.t. the activations
and never the weights.

The masked passes run as ``tf.function`` graphs cached on the adapter. For layer masks the layer's output at its
last call is *replaced* by its captured activations times the mask, so the graph no longer needs the layers
before it and TensorFlow prunes them: only the layers after the target run per chunk of masks. A model that
cannot be traced runs eagerly (with a warning).

TensorFlow is not covered by the Array API, so the adapter hands the core NumPy arrays, channels-first
``(B, C, *S)``; ``explain`` then returns a ``tf.Tensor`` for ``tf.Tensor`` inputs and NumPy for NumPy inputs.

Layers are named as Keras names them; a layer inside a nested model is found by its own name when that is
unique, or by its path ``"outer/inner"`` (Keras forbids ``"/"`` in names, so paths are unambiguous).
"""
from __future__ import annotations

import contextlib
import re

import keras
import numpy as np
import tensorflow as tf

from camcore.targets import class_indices, target_scores

from . import check_data_format, model_error, unknown_layer
from .engine import Engine

__all__ = ["KerasAdapter"]


def _children(layer) -> list:
    return [c for c in layer._flatten_layers(include_self=False, recursive=False)
            if not isinstance(c, keras.layers.InputLayer)]


def _walk(layer, prefix=""):
    """``(path, layer)`` for every sub-layer of ``layer``, depth first, in the order Keras tracks them."""
    for child in _children(layer):
        path = f"{prefix}{child.name}"
        yield path, child
        yield from _walk(child, path + "/")


def _model_format(model) -> tuple[str, str | None]:
    """``(format, layer)``: the data format of the model's first convolution (else of any layer that declares
    one; else Keras' global default, with ``layer=None``). Pooling and flattening layers carry the global default,
    so convolutions come first."""
    declared = [(hasattr(layer, "kernel_size"), getattr(layer, "data_format", None), path)
                for path, layer in _walk(model)]
    formats = [(fmt, path) for conv, fmt, path in sorted(declared, key=lambda d: not d[0])
               if fmt in ("channels_last", "channels_first")]
    return formats[0] if formats else (keras.config.image_data_format(), None)


def _numpy(tree):
    return tf.nest.map_structure(lambda t: t.numpy() if tf.is_tensor(t) else t, tree)


def _scoped_function(fn):
    """``tf.function(fn)``, traced inside a ``camcore`` name scope: Keras opens a scope per layer, and a layer name
    such as ``"_conv_stem"`` is not a valid *root* scope in a graph."""
    def scoped(*args):
        with tf.name_scope("camcore"):
            return fn(*args)

    return tf.function(scoped)


def _reason(err) -> str:
    """A one-line reason: tracing the model as a tf.function raised ``err``. AutoGraph's "in user code:" listing
    and Keras' "Exception encountered when calling ..." header are skipped to the message itself; terminal colour
    codes are dropped."""
    name = type(err).__name__
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(err)).splitlines() if ln.strip()]
    start = next((k for k, ln in enumerate(lines) if ln.startswith(f"{name}: ")), None)
    if start is not None:  # AutoGraph: the source lines first, then "Name: message"
        lines = [lines[start][len(name) + 2 :], *lines[start + 1 :]]
    if len(lines) > 1 and lines[0].startswith("Exception encountered when calling"):
        lines = [f"{lines[1]} ({lines[0].removeprefix('Exception encountered when calling ').rstrip('.')})"]
    return f"tracing the model as a tf.function raised {name}: {lines[0] if lines else ''}"


def _at_last_call(n_calls, change):
    """A wrapper factory for :func:`_intercepted` that replaces the layer's output ``out`` by ``change(out)`` at
    its ``n_calls``-th call of the forward pass (its last one) and leaves the other calls alone."""
    seen = [0]

    def wrap(i, call):
        def changed(*args, **kwargs):
            out = call(*args, **kwargs)
            seen[0] += 1
            return change(out) if seen[0] == n_calls else out

        return changed

    return wrap


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


class KerasAdapter(Engine):
    """Adapter for a Keras 3 model or layer on the TensorFlow backend.

    Args:
        model: a ``keras.Model`` (functional, Sequential or subclassed) or ``keras.layers.Layer``; it is never
            changed: ``call`` methods are restored and non-trainable variables (batch-norm statistics, seed
            states) are put back after every call, also when the model raises.
        model_mode: ``"eval"`` (default) calls the model with ``training=False``; ``"as-is"`` calls it with
            no ``training`` argument.
        data_format: ``"channels_last"`` or ``"channels_first"``; ``None`` reads it from the model's first
            layer that has a ``data_format`` (else ``keras.config.image_data_format()``).
        compile: ``False`` runs the masked passes eagerly instead of as ``tf.function`` graphs.
    """

    fast_text = "{} in a tf.function"

    def __init__(self, model, *, model_mode: str = "eval", data_format: str | None = None, compile: bool = True):
        if keras.backend.backend() != "tensorflow":
            raise RuntimeError(f"model: camcore's Keras adapter needs the TensorFlow backend of Keras 3, but "
                               f"KERAS_BACKEND is {keras.backend.backend()!r}; set KERAS_BACKEND=tensorflow "
                               f"(for JAX pass a Flax model; for PyTorch a torch.nn.Module)")
        super().__init__(model, model_mode=model_mode, compile=compile)
        declared, layer = _model_format(model)
        self.channels_last = check_data_format(data_format, declared)
        if layer is not None and data_format not in (None, declared):
            raise ValueError(f"data_format: {data_format!r} given, but the model's layer {layer!r} computes "
                             f"{declared} feature maps; pass data_format=None (camcore reads it from the model)")
        self._graphs: dict = {}  # the masked passes' cached tf.functions, per layer and call count

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

    # ----------------------------------------------------------------------------------------- arrays
    def _array(self, inputs):
        if not (tf.is_tensor(inputs) or isinstance(inputs, np.ndarray)):
            raise TypeError(f"inputs: expected a tf.Tensor or a NumPy array for a Keras model, "
                            f"got {type(inputs).__name__}")
        if not tf.executing_eagerly():
            raise RuntimeError("explain: call camcore eagerly, not inside a tf.function")
        return inputs

    @staticmethod
    def _floating(x) -> bool:
        return x.dtype.is_floating if tf.is_tensor(x) else np.issubdtype(x.dtype, np.floating) or \
            x.dtype.name == "bfloat16"

    def _last(self, x) -> bool:
        return self.channels_last

    def _to_core(self, a, rank):
        """NumPy ``(B, C, *S)`` from the layer's native layout. Only outputs of the inputs' ``rank`` are feature
        maps; others (a transformer's ``(B, N, D)`` tokens) stay as they are, as in PyTorch."""
        a = tf.convert_to_tensor(a).numpy()
        return np.moveaxis(a, -1, 1) if self.channels_last and a.ndim == rank else a

    @staticmethod
    def _from_core(masks, x, move):
        masks = np.asarray(masks)
        return tf.convert_to_tensor(np.moveaxis(masks, 1, -1) if move else masks)

    _core_outputs = staticmethod(_numpy)
    _reason = staticmethod(_reason)

    @staticmethod
    def concrete(a) -> bool:
        """Whether ``a`` holds values (always: the adapter runs eagerly)."""
        return True

    @staticmethod
    def to_native(maps, inputs):
        """The core's NumPy maps as a ``tf.Tensor`` for ``tf.Tensor`` inputs, else as they are."""
        return tf.convert_to_tensor(maps) if tf.is_tensor(inputs) else maps

    # ------------------------------------------------------------------------------------- primitives
    @contextlib.contextmanager
    def _session(self, x):
        """Put the model's non-trainable variables (batch-norm statistics, seed states) back afterwards. An
        unbuilt model is first built symbolically, so its variables exist (at their initial values) to save."""
        if not self.model.built:
            self.model(keras.KerasTensor((None, *x.shape[1:]), dtype=x.dtype.name))
        saved = []
        for v in self.model.non_trainable_variables:
            tv = getattr(v, "value", None)  # the tf.Variable behind a Keras variable: a snapshot stays on device
            saved.append((tv, tv.read_value()) if isinstance(tv, tf.Variable) else (v, v.numpy()))
        try:
            yield
        finally:
            for v, value in saved:
                v.assign(value)

    def _call(self, x):
        return self.model(x, training=False) if self.model_mode == "eval" else self.model(x)

    def _forward(self, x):
        """:meth:`_call`; an error of the model's own names the inputs' shape and layout (the fast path's tracing
        calls :meth:`_call`, so that a fallback's reason is the framework's own)."""
        try:
            return self._call(x)
        except Exception as err:
            raise model_error(err, x.shape, self.channels_last) from err

    def _trace(self, x):
        layers, seen = list(_walk(self.model)), []

        def wrap(i, call):
            def recording(*args, **kwargs):
                out = call(*args, **kwargs)
                if tf.is_tensor(out):
                    shape = tuple(out.shape)
                    last = self.channels_last and len(shape) == len(x.shape)
                    seen.append((layers[i][0], (shape[0], shape[-1], *shape[1:-1]) if last else shape))
                return out

            return recording

        with _intercepted([obj for _, obj in layers], wrap):
            self._forward(x)
        return seen

    def parameter_layers(self):
        return [path for path, layer in _walk(self.model) if layer.trainable_weights and not _children(layer)]

    def _randomized(self, names, noise):
        try:
            twin = keras.models.clone_model(self.model)
        except Exception as err:
            raise TypeError(f"model: the model-randomisation test needs a copy of the model, and "
                            f"keras.models.clone_model cannot copy this {type(self.model).__name__} ({err}); use a "
                            f"functional or Sequential model") from err
        twin.set_weights(self.model.get_weights())
        layers = dict(_walk(twin))
        for name in names:
            for v in layers[name].trainable_weights:
                v.assign(noise(v.numpy()))
        return twin

    def _input_grads(self, x, targets, rule):
        from .keras_guided import guided_relus

        x = tf.convert_to_tensor(x)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(x)
            with guided_relus(rule) as seen:
                outputs = self._forward(x)
            total = tf.reduce_sum(self._scores(targets, outputs, x.shape[0]))  # outside: plain
        return _numpy(outputs), tape.gradient(total, x), seen.units

    @staticmethod
    def _scores(targets, outputs, batch):
        if callable(targets) or not tf.is_tensor(outputs):
            return target_scores(targets, outputs, batch, differentiable=True)[0]
        return tf.gather(outputs, class_indices(targets, outputs.numpy()), axis=1, batch_dims=1)

    def _capture(self, x, named, targets, gradients, what):
        x = tf.convert_to_tensor(x)
        captured: dict[int, tf.Tensor] = {}
        calls = {name: 0 for name, _ in named}
        tape = tf.GradientTape(watch_accessed_variables=False)

        def wrap(i, call):
            def capturing(*args, **kwargs):
                out = call(*args, **kwargs)
                if not tf.is_tensor(out):
                    raise TypeError(f"{what}: {named[i][0]!r} returns {type(out).__name__}, not a tensor; pick a "
                                    f"layer whose output is one tensor")
                tape.watch(out)
                captured[i] = out
                calls[named[i][0]] += 1
                return out

            return capturing

        with _intercepted([obj for _, obj in named], wrap), tape:
            outputs = self._forward(x)
            missing = [n for i, (n, _) in enumerate(named) if i not in captured]
            if missing:
                raise ValueError(f"{what}: {'layer ' if what == 'at' else ''}{missing[0]!r} did not run during the "
                             f"forward pass of the inputs")
            if gradients:
                total = tf.reduce_sum(self._scores(targets, outputs, x.shape[0]))
        acts = [captured[i] for i in range(len(named))]
        if not gradients:
            return _numpy(outputs), acts, [None] * len(acts), calls
        grads = tape.gradient(total, acts)
        for (name, _), g in zip(named, grads):
            if g is None:
                raise ValueError(f"layer: {name!r} does not influence the target scores (no gradient path from "
                                 f"the outputs to it); pick a layer the outputs depend on")
        return _numpy(outputs), acts, grads, calls

    def _masked(self, name, layer, calls, fast):
        """Input masks: ``model(x_i * masks)``. Layer masks: eagerly, the layer's last-call output times the mask;
        compiled, the model on ``x_i`` tiled to the chunk with that output *replaced* by ``A_i * masks``: nothing
        depends on the layers before it any more (unless a skip connection does), so TensorFlow prunes them from
        the graph. Graphs are cached per layer and call count, traced once per chunk shape."""
        def run(xi, ai, masks):
            if layer is None:
                return self._call(xi * tf.cast(masks, xi.dtype))
            if fast:
                change = lambda out: ai * tf.cast(masks, ai.dtype)  # noqa: E731
            else:
                change = lambda out: out * tf.cast(masks, out.dtype)  # noqa: E731
            with _intercepted([layer], _at_last_call(calls, change)):
                return self._call(tf.repeat(xi, masks.shape[0], axis=0))

        if not fast:
            return lambda xi, ai, masks: run(tf.convert_to_tensor(xi), ai, masks)
        key = ("input",) if layer is None else ("layer", id(layer), calls)
        if key not in self._graphs:
            self._graphs[key] = _scoped_function(run)
        graph = self._graphs[key]
        return lambda xi, ai, masks: graph(tf.convert_to_tensor(xi), ai, masks)

    def traces(self) -> int:
        """How many times this adapter's cached ``tf.function`` graphs have been traced so far."""
        return sum(g.experimental_get_tracing_count() for g in self._graphs.values())

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
