"""Keras 3 adapter (TensorFlow backend): a layer's ``call`` intercepted for one call, ``tf.GradientTape``.

One mechanism serves every kind of Keras model: functional, Sequential, models nested inside models and
subclassed models. For the length of one call the requested layer's ``call`` is replaced on that layer object by
a wrapper that records its output and tells the tape to watch it; the original method is put back in
``finally``. The tape watches nothing else (``watch_accessed_variables=False``), so the layers before the
target are not recorded and ``tape.gradient`` differentiates only the layers after it, w.r.t. the activations
and never the weights.

``forward_masked`` runs its masked passes as ``tf.function`` graphs cached on the adapter. For layer masks the
layer's output at its last call is *replaced* by its activations from the unmasked pass times the mask, so the
graph no longer needs the layers before it and TensorFlow prunes them: only the layers after the target run per
chunk of masks. A model that cannot be traced runs eagerly (with a warning).

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

from camcore.targets import check_targets, class_indices, class_scores, target_scores

from . import check_batch_size, check_data_format, check_masks, fell_back, masked_rows, unknown_layer

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


def _class_list(targets, outputs) -> list[int]:
    """Each sample's class index (the top class for ``targets=None``), checked against the ``(B, K)`` NumPy
    outputs; a model that does not return one array of logits gets ``target_scores``' error."""
    if not hasattr(outputs, "ndim"):
        target_scores(targets, outputs, 0)  # raises: the model returned ..., not one array of logits
    return class_indices(targets, outputs).tolist()


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


def _fell_back(info, named, reason, stacklevel):
    """:func:`camcore.backends.fell_back` for the graph of ``named``'s layer (``None``: the input masks)."""
    what = "the masked model" if named is None else f"only the layers after {named[0]!r}"
    fell_back(info, f"{what} in a tf.function", reason, stacklevel)


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

    _compile = True  # False: forward_masked runs the model eagerly (the "full" path), for benchmarks and debugging

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
        self._graphs: dict = {}  # forward_masked's cached tf.functions (or why one failed), per layer and call count

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

    def forward_masked(self, inputs, masks, *, at="input", targets=None, batch_size=32, probability=False,
                       progress=None, info=None):
        """Target scores with masks multiplied into the inputs or into a layer's activations.

        Args:
            inputs: as in :meth:`activations_and_grads`.
            masks: ``(M, *shape)`` shared by all samples or ``(B, M, *shape)`` per sample, channels-first:
                ``shape`` broadcasts against one sample at ``at`` in the ``(C, *S)`` convention, e.g.
                ``(1, H, W)`` spatial masks or ``(C, 1, 1)`` channel masks (moved to the model's layout here).
            at: ``"input"``, or a layer (name, path or object) whose output, at its last call, is multiplied by
                the mask.
            targets: as in :meth:`activations_and_grads`; ``None`` is each sample's top class unmasked.
            batch_size: masked copies per forward pass; bounds peak memory.
            probability: score class targets by their softmax probability (float32) instead of their logit.
            progress: ``progress(n)`` is called after each forward pass with its number of masks.
            info: a dict that receives ``"path"``: ``"compiled"`` for layer masks run by a ``tf.function`` in
                which the layer's output is replaced by the masked activations of the unmasked pass (graph
                pruning then drops the layers before it), else ``"full"`` (the whole model per chunk, a cached
                ``tf.function`` for input masks); and ``"reason"`` when the graph could not be used (a
                ``RuntimeWarning`` says so too) and the model ran eagerly instead.
        Returns: ``(B, M)`` float32 NumPy scores.
        """
        x = self._tensor(inputs)
        check_batch_size(batch_size)
        b = x.shape[0]
        masks = np.asarray(masks)
        targets = check_targets(targets, b)
        named = None if isinstance(at, str) and at == "input" else self.resolve_layer(at)
        info = {} if info is None else info
        with self._session(x):
            plain, acts, n_calls, untraceable = None, None, 0, None
            if named is not None or targets is None:  # the unmasked pass: the shape at `at`, the top classes
                plain, acts, n_calls, untraceable = self._probe(x, named)
            at_shape = tuple(x.shape) if named is None else tuple(acts.shape)
            feature_map = self.channels_last and len(at_shape) == x.shape.rank
            at_shape = (at_shape[0], at_shape[-1], *at_shape[1:-1]) if feature_map else at_shape
            per_sample = check_masks(masks.shape, b, at_shape, at)
            masks = np.moveaxis(masks, 2 if per_sample else 1, -1) if feature_map else masks
            idx = None if callable(targets) or plain is None else _class_list(targets, _numpy(plain))
            checked = [idx is not None]  # explicit class indices are range-checked on the first chunk's outputs

            def pick(i, out, m):
                if callable(targets):
                    return np.asarray(target_scores(targets, out, m)[0], dtype=np.float32)
                out = _numpy(out)
                if not checked[0]:
                    _class_list(targets, out)
                    checked[0] = True
                return class_scores(out, (targets if idx is None else idx)[i], probability=probability)

            def full(i, chunk):
                xi, m = x[i : i + 1], chunk.shape[0]
                if named is None:
                    return self._call(xi * tf.cast(chunk, xi.dtype))
                mask = lambda out: out * tf.cast(chunk, out.dtype)  # noqa: E731
                with _intercepted([named[1]], _at_last_call(n_calls, mask)):
                    return self._call(tf.repeat(xi, m, axis=0))

            key = ("input",) if named is None else ("layer", id(named[1]), n_calls)
            graph = untraceable or self._graph(key, named, n_calls)
            run = {"graph": graph if callable(graph) else None}
            if isinstance(graph, str):  # it failed (before, or in the probe pass): straight to the eager passes
                _fell_back(info, named, graph, stacklevel=3)

            def score(i, chunk):
                out = failed = None
                if run["graph"] is not None:
                    xi = x if b == 1 else x[i : i + 1]
                    args = (xi, tf.convert_to_tensor(chunk)) if named is None else \
                        (xi, acts if b == 1 else acts[i : i + 1], tf.convert_to_tensor(chunk))
                    try:
                        out = run["graph"](*args)
                    except Exception as err:  # tracing failed (or the model raised: the eager pass tells)
                        failed = err
                if run["graph"] is None or failed is not None:
                    out = full(i, chunk)
                if failed is not None:  # the eager pass worked: the graph was the problem
                    run["graph"] = None
                    self._graphs[key] = _reason(failed)
                    _fell_back(info, named, self._graphs[key], stacklevel=5)
                return pick(i, out, chunk.shape[0])

            rows = masked_rows(masks, b, per_sample, batch_size, score, progress)
        info["path"] = "compiled" if named is not None and run["graph"] is not None else "full"
        return np.stack([np.concatenate(row) for row in rows])

    def _probe(self, x, named):
        """The unmasked forward pass: ``(outputs, activations of the layer's last call, its number of calls,
        None or why the graph failed)``; a cached ``tf.function`` (one per layer and input shape: the call count
        is read while it is traced), or eager when graphs are off or fail."""
        key = ("probe", None if named is None else id(named[1]), tuple(x.shape), x.dtype.name)
        graph, failed = (self._graphs.get(key) if self._compile else "off"), None
        if graph is None:
            meta: dict = {}

            def probe_graph(x):
                plain, seen = self._recorded(x, named)
                meta.update(n=len(seen), last=seen[-1] if seen else None)
                return plain, seen[-1] if seen and tf.is_tensor(seen[-1]) else None

            graph = self._graphs[key] = (_scoped_function(probe_graph), meta)
        if isinstance(graph, tuple):
            try:
                plain, last = graph[0](x)
                n_calls, seen = graph[1]["n"], [graph[1]["last"]] if graph[1]["n"] else []
            except Exception as err:  # tracing failed (or the model raised: the eager pass tells)
                failed = err
        if not isinstance(graph, tuple) or failed is not None:
            plain, seen = self._recorded(x, named)
            n_calls, last = len(seen), seen[-1] if seen else None
        if named is not None:
            if not seen:
                raise ValueError(f"at: layer {named[0]!r} did not run during the forward pass of the inputs")
            if not tf.is_tensor(seen[-1]):
                raise TypeError(f"at: {named[0]!r} returns {type(seen[-1]).__name__}, not a tensor; pick a layer "
                                f"whose output is one tensor")
        if failed is not None:  # the eager pass worked: the graph was the problem
            self._graphs[key] = _reason(failed)
        reason = self._graphs[key] if isinstance(self._graphs.get(key), str) else None
        return plain, last, n_calls, reason

    def _recorded(self, x, named):
        """``(outputs, [the layer's output at each call])`` of one unmasked forward pass."""
        seen = []

        def wrap(i, call):
            def recording(*args, **kwargs):
                out = call(*args, **kwargs)
                seen.append(out)
                return out

            return recording

        with _intercepted([] if named is None else [named[1]], wrap):
            return self._call(x), seen

    def _graph(self, key, named, n_calls):
        """The cached ``tf.function`` scoring one chunk (``None`` when graphs are off; the reason string when it
        failed before). Input masks: ``f(x_i, masks) = model(x_i * masks)``. Layer masks:
        ``f(x_i, A_i, masks)`` runs the model on ``x_i`` tiled to the chunk with the layer's last-call output
        replaced by ``A_i * masks``: nothing depends on the layers before it any more (unless a skip connection
        does), so TensorFlow prunes them from the graph. Traced once per chunk shape."""
        if not self._compile:
            return None
        if key not in self._graphs:
            if named is None:
                def chunk_graph(xi, mask):
                    return self._call(xi * tf.cast(mask, xi.dtype))
            else:
                def chunk_graph(xi, a, mask):
                    replace = lambda out: a * tf.cast(mask, a.dtype)  # noqa: E731
                    with _intercepted([named[1]], _at_last_call(n_calls, replace)):
                        return self._call(tf.repeat(xi, mask.shape[0], axis=0))
            self._graphs[key] = _scoped_function(chunk_graph)
        return self._graphs[key]

    def traces(self) -> int:
        """How many times this adapter's cached ``tf.function`` graphs have been traced so far."""
        graphs = [g[0] if isinstance(g, tuple) else g for g in self._graphs.values()]
        return sum(g.experimental_get_tracing_count() for g in graphs if hasattr(g, "experimental_get_tracing_count"))

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
