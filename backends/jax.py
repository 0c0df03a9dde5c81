"""JAX backend: Flax linen ``(module, variables)`` pairs, Flax nnx modules and ``(features, head)`` pairs of JAX
functions; gradients by ``jax.vjp`` of the layers after the target only. ``docs/adapters.md`` describes each
kind, its layer names, its inference mode and the ``jax.jit`` pattern.

Flax is looked up in ``sys.modules`` only. The model is never changed: linen ``variables`` are only passed to
``module.apply`` (the layer's output is read or replaced with ``flax.linen.intercept_methods``), and every nnx call
works on a throw-away copy (``nnx.merge(*nnx.split(model), copy=True)``, made inside the traced function) in
which the submodule is swapped for a tapping wrapper and ``.eval()`` is set. Nothing reads a traced value, and
``explain`` skips its value checks under tracing (:meth:`JaxAdapter.concrete`), so gradient methods jit-compile
whole. The masked passes are ``jax.jit`` functions cached on the adapter, with the model's arrays as arguments.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from camcore.targets import target_scores

from . import check_data_format, model_error, unknown_layer
from .engine import Engine

__all__ = ["JaxAdapter", "accepts"]
# the inference value of the mode arguments a linen root module may take (model_mode="eval")
_INFERENCE_ARGS = {"train": False, "training": False, "is_training": False, "deterministic": True,
                   "use_running_average": True}
_PAIR_LAYER = "features"


def _linen():
    return sys.modules.get("flax.linen")


def _nnx():
    return sys.modules.get("flax.nnx")


def _kind(model) -> str | None:
    """``"linen"``, ``"nnx"``, ``"pair"`` or ``None``; imports nothing (Flax is read from ``sys.modules``)."""
    nn, nnx = _linen(), _nnx()
    pair = isinstance(model, (tuple, list)) and len(model) == 2
    if pair and nn is not None and isinstance(model[0], nn.Module) and isinstance(model[1], Mapping):
        return "linen"
    if nnx is not None and isinstance(model, nnx.Module):
        return "nnx"
    if pair and all(callable(f) and not isinstance(f, Mapping) for f in model):
        return "pair"
    return None


def accepts(model) -> bool:
    """Whether ``model`` is a Flax linen ``(module, variables)`` pair, a Flax nnx module, or a
    ``(features, head)`` pair of callables."""
    return _kind(model) is not None


# --------------------------------------------------------------------------------------- model kinds
# Each kind exposes ``runner(eval_mode, wanted, parts=None)``: a function ``run(x, hook, state=None)`` that calls
# the model once and, after each call of a module in ``wanted`` (``None``: every module), replaces its output ``out``
# by ``hook(name, module_type, out)``. ``run`` is pure apart from the hook, so it runs under jax transforms.
# ``split() -> (static, state)`` separates the model's arrays (``state``, passed to ``run`` as an argument of a
# jitted function instead of being baked into it as constants) from a hashable rest (``static``: the nnx graphdef);
# ``runner(..., parts=(static, None))`` builds a ``run`` for that structure that must be given its ``state``.


class _Linen:
    def __init__(self, module, variables):
        if variables and "params" not in variables:
            raise ValueError(f"model: the linen variables have no 'params' collection (their keys: "
                             f"{', '.join(map(repr, list(variables)[:5]))}); pass (module, variables) with the "
                             f"variables module.init(...) returns, e.g. {{'params': params}}, not the params alone")
        self.module = module
        self.variables = variables
        self.static_names = _variable_paths(variables)

    def names(self) -> list[str]:
        return list(self.static_names)

    def resolve(self, layer):
        if isinstance(layer, str) and not layer.strip("/"):
            raise unknown_layer(layer, self.names())
        if isinstance(layer, (tuple, list)) and layer and all(isinstance(p, str) for p in layer):
            return "/".join(layer)
        if isinstance(layer, str) and layer:
            return layer.strip("/")
        if isinstance(layer, _linen().Module):
            raise TypeError(f"layer: pass a Flax linen submodule by its path (a '/'-joined name such as "
                            f"'Block_0/Conv_0', or a tuple of names), not a {type(layer).__name__} object")
        raise TypeError(f"layer: expected a Flax module path (str such as 'Block_0/Conv_0', or a tuple of "
                        f"names), got {type(layer).__name__}")

    def parameter_layers(self) -> list[str]:
        """Module paths whose ``params`` hold arrays directly, in the variables' (creation) order."""
        out = []

        def walk(tree, prefix):
            if any(not isinstance(v, Mapping) for v in tree.values()) and prefix:
                out.append("/".join(prefix))
            for k, v in tree.items():
                if isinstance(v, Mapping):
                    walk(v, (*prefix, str(k)))

        walk(self.variables.get("params", {}), ())
        return out

    def randomized(self, names, noise):
        """``(module, variables)`` with the params under ``names`` replaced by ``noise`` (a new tree)."""

        def redraw(tree, path):
            inside = any(path[: len(n)] == n for n in split)
            return {k: redraw(v, (*path, str(k))) if isinstance(v, Mapping) else
                    (jnp.asarray(noise(v), dtype=v.dtype) if inside else v) for k, v in tree.items()}

        split = [tuple(n.split("/")) for n in names]
        variables = dict(self.variables)
        variables["params"] = redraw(self.variables["params"], ())
        return self.module, variables

    def _inference(self):
        """The root module and call keywords for model_mode='eval' (see the module docstring)."""
        module, kwargs = self.module, {}
        try:
            params = inspect.signature(type(module).__call__).parameters
        except (TypeError, ValueError):
            params = {}
        for name, value in _INFERENCE_ARGS.items():
            p = params.get(name)
            if p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                kwargs[name] = value
        fields = {f.name for f in dataclasses.fields(module)} & set(_INFERENCE_ARGS)
        if fields:
            module = module.clone(**{f: _INFERENCE_ARGS[f] for f in fields})
        return module, kwargs

    def split(self):
        return None, self.variables

    def runner(self, eval_mode: bool, wanted, parts=None):
        nn = _linen()
        module, kwargs = self._inference() if eval_mode else (self.module, {})

        def run(x, hook, state=None):
            variables = self.variables if state is None else state

            def interceptor(next_fun, args, kw, context):
                out = next_fun(*args, **kw)
                path = context.module.path
                if context.method_name == "__call__" and path:
                    name = "/".join(map(str, path))
                    if wanted is None or name in wanted:
                        out = hook(name, type(context.module), out)
                return out

            with nn.intercept_methods(interceptor):
                if eval_mode:
                    return module.apply(variables, x, **kwargs)
                out, _ = module.apply(variables, x, mutable=True)  # train-mode updates are discarded
                return out

        return run

    def classifier(self, name, trace):
        """``(name, kernel (C, K), bias)`` of a Dense layer: ``name``'s params, else the last ``nn.Dense`` to
        run in the last traced forward pass, else the last module whose params hold a 2-D ``kernel``."""
        params = self.variables.get("params", {})
        if name is None:
            dense = [r.name for r in trace or () if issubclass(r.cls, _linen().Dense)]
            candidates = dense or [n for n in self.static_names if _is_matrix(_lookup(params, n), "kernel")]
            if not candidates:
                raise ValueError("classifier: the model has no Dense layer (no params with a 2-D 'kernel'); name "
                                 "the classifier with classifier=... or pass the class weights as "
                                 "cam_weights=(num_classes, C)")
            name = candidates[-1]
        else:
            name = self.resolve(name)
        leaf = _lookup(params, name)
        if not _is_matrix(leaf, "kernel"):
            raise ValueError(f"classifier: {name!r} has no (C, num_classes) 'kernel' param; pass the class weights "
                             f"as cam_weights=(num_classes, C)")
        return name, leaf["kernel"], leaf.get("bias")


class _Nnx:
    def __init__(self, model):
        self.model = model

    def paths(self) -> dict:
        return {_path_name(p): p for p, _ in _nnx().iter_modules(self.model) if p}

    def names(self) -> list[str]:
        return list(self.paths())

    def resolve(self, layer):
        paths = self.paths()
        if isinstance(layer, str) and not layer.strip("/"):
            raise unknown_layer(layer, list(paths))
        if isinstance(layer, _nnx().Module):
            for name, path in paths.items():
                if _child_at(self.model, path) is layer:
                    return name
            raise ValueError(f"layer: the {type(layer).__name__} module passed is not part of the model")
        if isinstance(layer, (tuple, list)) and layer and all(isinstance(p, (str, int)) for p in layer):
            name = _path_name(layer)
        elif isinstance(layer, str) and layer:
            name = layer.strip("/")
            if name not in paths and "/" not in name and name.replace(".", "/") in paths:
                name = name.replace(".", "/")
        else:
            raise TypeError(f"layer: expected an nnx attribute path (str such as 'blocks/1/conv', or a tuple "
                            f"such as ('blocks', 1, 'conv')) or a submodule of the model, got {type(layer).__name__}")
        if name not in paths:
            raise unknown_layer(name, list(paths))
        return name

    def split(self):
        return _nnx().split(self.model)

    def parameter_layers(self) -> list[str]:
        nnx = _nnx()
        out = []
        for name, path in sorted(self.paths().items(), key=lambda item: _definition_key(self.model, item[1])):
            module = _child_at(self.model, path)
            if any(isinstance(v, nnx.Param) for v in vars(module).values()):
                out.append(name)
        return out

    def randomized(self, names, noise):
        nnx = _nnx()
        twin = nnx.merge(*nnx.split(self.model), copy=True)
        paths = self.paths()
        for name in names:
            for _, module in nnx.iter_modules(_child_at(twin, paths[name])):
                for v in vars(module).values():
                    if isinstance(v, nnx.Param):
                        v[...] = jnp.asarray(noise(v[...]), dtype=v[...].dtype)
        return twin

    def runner(self, eval_mode: bool, wanted, parts=None):
        nnx = _nnx()
        graphdef, default = parts or nnx.split(self.model)  # outside any trace; the copy is merged inside `run`
        paths = [(n, p) for n, p in self.paths().items() if wanted is None or n in wanted]

        def run(x, hook, state=None):
            copy = nnx.merge(graphdef, default if state is None else state, copy=True)  # Variables of this trace
            if eval_mode:
                copy.eval()
            sites = []
            for name, path in paths:  # find every parent before swapping any child
                parent = _child_at(copy, path[:-1])
                child = _get_child(parent, path[-1])
                if callable(child):
                    sites.append((parent, path[-1], _Tap(child, name, hook)))
            for parent, key, tap in sites:
                _set_child(parent, key, tap)
            return copy(x)

        return run

    def classifier(self, name, trace):
        nnx = _nnx()
        if name is None:
            linears = [r.name for r in trace or () if issubclass(r.cls, nnx.Linear)]
            if not linears:  # no trace yet: the last one in definition order
                found = [p for p in self.paths().values() if isinstance(_child_at(self.model, p), nnx.Linear)]
                linears = [_path_name(p) for p in sorted(found, key=lambda p: _definition_key(self.model, p))]
            if not linears:
                raise ValueError("classifier: the model has no flax.nnx.Linear layer; name the classifier with "
                                 "classifier=... or pass the class weights as cam_weights=(num_classes, C)")
            name = linears[-1]
        else:
            name = self.resolve(name)
        module = _child_at(self.model, self.paths()[name])
        kernel, bias = getattr(module, "kernel", None), getattr(module, "bias", None)
        kernel = None if kernel is None else kernel[...]
        if kernel is None or getattr(kernel, "ndim", 0) != 2:
            raise ValueError(f"classifier: {name!r} has no (C, num_classes) kernel; got {type(module).__name__}")
        return name, kernel, None if bias is None else bias[...]


class _Pair:
    def __init__(self, features, head):
        self.features, self.head = features, head

    def names(self) -> list[str]:
        return [_PAIR_LAYER]

    def resolve(self, layer):
        if layer == _PAIR_LAYER or layer is self.features:
            return _PAIR_LAYER
        raise ValueError(f"layer: a (features, head) pair of functions has one layer, {_PAIR_LAYER!r} (the output "
                         f"of features(x)); got {layer!r}. Pass layer=None or {_PAIR_LAYER!r}, or split the "
                         f"model at another point")

    def split(self):
        return None, None

    @staticmethod
    def parameter_layers():
        return []

    @staticmethod
    def randomized(names, noise):
        raise ValueError("model: a (features, head) pair of functions exposes no parameters to randomise; pass a "
                         "Flax model")

    def runner(self, eval_mode: bool, wanted, parts=None):
        features, head = self.features, self.head

        def run(x, hook, state=None):
            a = features(x)
            if wanted is None or _PAIR_LAYER in wanted:
                a = hook(_PAIR_LAYER, type(features), a)
            return head(a)

        return run

    def classifier(self, name, trace):
        raise ValueError("classifier: a (features, head) pair of functions exposes no classifier weights; pass "
                         "the class weights as cam_weights=(num_classes, C) for method='cam'")


class _Tap:
    """Stands in for an nnx submodule (in the throw-away copy only): calls it, then hands the output to the
    hook. Attribute reads, indexing and iteration go to the wrapped module."""

    def __init__(self, inner, name, hook):
        object.__setattr__(self, "_tap", (inner, name, hook))

    def __call__(self, *args, **kwargs):
        inner, name, hook = self._tap
        return hook(name, type(inner), inner(*args, **kwargs))

    def __getattr__(self, attr):
        return getattr(object.__getattribute__(self, "_tap")[0], attr)

    def __getitem__(self, key):
        return self._tap[0][key]

    def __iter__(self):
        return iter(self._tap[0])

    def __len__(self):
        return len(self._tap[0])


def _path_name(path) -> str:
    return "/".join(map(str, path))


def _get_child(parent, key):
    if isinstance(key, int):
        return parent[key]
    try:
        return getattr(parent, key)
    except AttributeError:
        return parent[key]


def _set_child(parent, key, value):
    if isinstance(key, int) or (isinstance(parent, (Mapping, dict)) and not hasattr(type(parent), key)
                                and key in parent):
        parent[key] = value
    else:
        setattr(parent, key, value)


def _child_at(root, path):
    for key in path:
        root = _get_child(root, key)
    return root


def _definition_key(root, path) -> list[int]:
    """Sort key putting nnx module paths in definition order: attributes by assignment order (``vars``),
    list items by index (``nnx.iter_modules`` sorts attribute names alphabetically)."""
    key, obj = [], root
    for part in path:
        if isinstance(part, int):
            key.append(part)
        else:
            names = list(vars(obj)) if hasattr(obj, "__dict__") else []
            key.append(names.index(part) if part in names else len(names))
        obj = _get_child(obj, part)
    return key


def _variable_paths(variables) -> list[str]:
    """Module paths named by a linen variables tree, children before parents (as modules finish)."""
    seen: dict[str, None] = {}

    def walk(tree, prefix):
        for key, value in tree.items():
            if isinstance(value, Mapping):
                path = (*prefix, str(key))
                walk(value, path)
                seen.setdefault("/".join(path), None)

    for collection in variables.values():
        if isinstance(collection, Mapping):
            walk(collection, ())
    return list(seen)


def _lookup(tree, name):
    for key in name.split("/"):
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _is_matrix(leaf, key) -> bool:
    return isinstance(leaf, Mapping) and getattr(leaf.get(key), "ndim", 0) == 2


@dataclasses.dataclass(frozen=True)
class _Call:
    """One call of a module seen by the abstract trace: its name, type, and output (``ShapeDtypeStruct``, or
    the type name when the output is not one array)."""

    name: str
    cls: type
    out: jax.ShapeDtypeStruct | None
    out_type: str


class JaxAdapter(Engine):
    """Adapter for a Flax linen ``(module, variables)`` pair, a Flax nnx module, or a ``(features, head)`` pair
    of JAX functions (see the module docstring for each kind, its layer names and the jit pattern).

    Args:
        model: the model; it is never changed (linen ``variables`` are only read; nnx modules are copied).
        model_mode: ``"eval"`` (default) runs in inference mode (dropout off, batch-norm running statistics);
            ``"as-is"`` runs the model as it is configured (see the module docstring).
        data_format: ``None`` or ``"channels_last"`` (Flax's layout): inputs ``(B, *S, C)`` and layer outputs
            ``(B, *s, K)``; ``"channels_first"`` when both are ``(B, C, *S)``.
        compile: ``False`` runs the masked passes eagerly instead of jitted.
    """

    fast_text = "jitting {}"

    def __init__(self, model, *, model_mode: str = "eval", data_format: str | None = None, compile: bool = True):
        super().__init__(model, model_mode=model_mode, compile=compile)
        self.channels_last = check_data_format(data_format, "channels_last")
        kind = _kind(model)
        if kind is None:
            raise TypeError(f"model: expected a Flax linen (module, variables) pair, a Flax nnx module, or a "
                            f"(features, head) pair of JAX functions; got {type(model).__name__}")
        self._model = {"linen": lambda: _Linen(*model), "nnx": lambda: _Nnx(model),
                       "pair": lambda: _Pair(*model)}[kind]()
        self._last_trace: list[_Call] | None = None  # the latest abstract trace (all modules, call order)
        self._jits: dict = {}  # the masked passes' jitted functions, by what they compute

    @staticmethod
    def concrete(a) -> bool:
        """Whether ``a`` holds values: ``False`` for a ``jax.core.Tracer`` (under ``jax.jit``, ``vmap``, ...)."""
        return not isinstance(a, jax.core.Tracer)

    @staticmethod
    def to_native(maps, inputs):
        """The maps as a ``jax.Array`` (also when ``inputs`` was NumPy: the model computed them in JAX)."""
        return maps if isinstance(maps, jax.Array) else jnp.asarray(maps)

    # ----------------------------------------------------------------------------------------- layers
    def resolve_layer(self, layer) -> tuple[str, object]:
        """``(name, layer)``: the layer's ``"/"``-joined name, and its path tuple (linen), its submodule (nnx) or
        the ``features`` function (pair).

        Linen submodules exist only while the model runs, so a linen name is checked against the variables'
        module paths and the modules seen by the latest trace; a name found in neither is checked again (and
        reported with the closest real names) by the trace that starts every contract method."""
        name = self._model.resolve(layer)
        if isinstance(self._model, _Linen):
            if self._last_trace is not None and name not in self.layer_names():
                raise unknown_layer(name, self.layer_names())
            return name, tuple(name.split("/"))
        if isinstance(self._model, _Nnx):
            return name, _child_at(self.model, self._model.paths()[name])
        return name, self._model.features

    def layer_names(self, inputs=None) -> list[str]:
        """The model's layer names. For linen, parameter-free submodules (dropout, blocks without params) are
        known only after a trace: pass ``inputs`` (or call any contract method first) to include them."""
        if inputs is not None:
            self._trace(self.check_inputs(inputs))
        names = self._model.names()
        if self._last_trace is not None:
            traced = list(dict.fromkeys(c.name for c in self._last_trace))
            names = traced + [n for n in names if n not in traced]
        return names

    # ----------------------------------------------------------------------------------------- arrays
    def _array(self, inputs):
        if not isinstance(inputs, (jax.Array, np.ndarray)):
            layout = "(B, *spatial, C)" if self.channels_last else "(B, C, *spatial)"
            raise TypeError(f"inputs: expected a jax.Array or a NumPy array {layout} for a JAX model, got "
                            f"{type(inputs).__name__}")
        return inputs if isinstance(inputs, jax.Array) else jnp.asarray(inputs)

    @staticmethod
    def _floating(x) -> bool:
        return jnp.issubdtype(x.dtype, jnp.floating)

    def _last(self, x) -> bool:
        return self.channels_last

    def _to_core(self, a, rank):
        """``(B, C, *S)`` from the native layout; only outputs of the inputs' ``rank`` are feature maps (a
        transformer's ``(B, N, D)`` tokens stay as they are, as in PyTorch)."""
        return jnp.moveaxis(a, -1, 1) if self.channels_last and a.ndim == rank else a

    @staticmethod
    def _from_core(masks, x, move):
        masks = jnp.asarray(masks, dtype=x.dtype)
        return jnp.moveaxis(masks, 1, -1) if move else masks

    @staticmethod
    def _core_outputs(tree):
        return tree

    @staticmethod
    def _reason(err) -> str:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"jit-compiling the model raised {type(err).__name__}: {first}"

    # ------------------------------------------------------------------------------------- primitives
    def _runner(self, wanted, parts=None):
        run = self._model.runner(self.model_mode == "eval", wanted, parts)

        def guarded(x, hook, state=None):  # the model's own errors name the inputs' shape and layout
            try:
                return run(x, hook, state)
            except Exception as err:
                raise model_error(err, x.shape, self.channels_last) from err

        return guarded

    def _session(self, x):
        return contextlib.nullcontext()  # pure: nothing to put back

    def _trace(self, x):
        """Every module call of one forward pass, in call-finish order, from an abstract trace."""
        calls: list[_Call] = []
        run = self._runner(None)
        jax.eval_shape(lambda x: _arrays_only(run(x, _recording_hook(calls, []))), x)
        self._last_trace = self._checked_layout(calls)
        last, rank = self.channels_last, len(x.shape)
        shapes = [(c.name, tuple(c.out.shape)) for c in calls if c.out is not None]
        return [(n, (s[0], s[-1], *s[1:-1]) if last and len(s) == rank else s) for n, s in shapes]

    def _checked_layout(self, calls):
        """``calls``; ``ValueError`` for ``data_format="channels_first"`` on a model with Flax convolutions, whose
        feature maps are channels-last whatever the inputs' layout (the maps would be read along the wrong axes)."""
        convs = tuple(c for c in (getattr(_linen(), "Conv", None), getattr(_linen(), "ConvTranspose", None),
                                  getattr(_nnx(), "Conv", None), getattr(_nnx(), "ConvTranspose", None)) if c)
        conv = None if self.channels_last else next((c.name for c in calls if issubclass(c.cls, convs)), None)
        if conv is not None:
            raise ValueError(f"data_format: 'channels_first' given, but the model's layer {conv!r} is a Flax "
                             f"convolution, which computes channels-last feature maps (B, *S, C); pass channels-last "
                             f"inputs and data_format=None")
        return calls

    def _last_calls(self, calls, names, what):
        """Per name: ``(number of calls, output spec of the last call)``; errors for layers that do not run or do
        not output one array."""
        found = {}
        for name in names:
            mine = [c for c in calls if c.name == name]
            if not mine:
                if isinstance(self._model, _Linen) and name not in self._model.static_names:
                    raise unknown_layer(name, self.layer_names())
                raise ValueError(f"{what}: {'layer ' if what == 'at' else ''}{name!r} did not run during the forward "
                                 f"pass of the inputs")
            if mine[-1].out is None:
                raise TypeError(f"{what}: {name!r} returns {mine[-1].out_type}, not an array; pick a layer whose "
                                f"output is one array")
            found[name] = (len(mine), mine[-1].out)
        return found

    def _capture(self, x, named, targets, gradients, what):
        """The abstract trace learns each layer's calls; the real pass adds a zero ``delta`` to the layer's output
        at its last call and takes ``jax.vjp`` w.r.t. the deltas only (the layers after the target)."""
        names = [n for n, _ in named]
        if not gradients:  # one eager pass records every module call (no abstract trace: host steps are fine)
            calls, outs = [], []
            outputs = self._runner(None)(x, _recording_hook(calls, outs))
            self._last_trace = self._checked_layout(calls)
            last = self._last_calls(calls, names, what)
            acts = [[o for c, o in zip(calls, outs) if c.name == n][-1] for n in names]
            return outputs, acts, [None] * len(acts), {n: last[n][0] for n in names}
        self._trace(x)
        last = self._last_calls(self._last_trace, names, what)
        run = self._runner(set(names))

        def forward(deltas):
            seen: dict[str, int] = {}
            captured: dict[str, jax.Array] = {}

            def hook(name, cls, out):
                seen[name] = seen.get(name, 0) + 1
                if seen[name] == last[name][0]:  # the last call: capture, and open the gradient path here
                    captured[name] = out
                    for i, n in enumerate(names):
                        if n == name:
                            out = out + deltas[i]
                return out

            outputs = run(x, hook)
            return outputs, [captured[n] for n in names]

        def scores_of(deltas):
            outputs, acts = forward(deltas)
            try:
                scores = target_scores(targets, outputs, x.shape[0])[0]
            except jax.errors.TracerArrayConversionError as err:  # a callable that reads values with NumPy
                raise TypeError("targets: the callable must return a jax array computed from the outputs with "
                                "jax.numpy, so that the gradient can flow through it; it converted the traced "
                                "outputs to NumPy (compute the score with jax.numpy's operations)") from err
            return scores, (outputs, acts)

        deltas = [jnp.zeros(last[n][1].shape, last[n][1].dtype) for n in names]
        scores, vjp_fn, (outputs, acts) = jax.vjp(scores_of, deltas, has_aux=True)
        (grads,) = vjp_fn(jnp.ones_like(scores))
        return outputs, acts, list(grads), {n: last[n][0] for n in names}

    def parameter_layers(self):
        return self._model.parameter_layers()

    def _randomized(self, names, noise):
        return self._model.randomized(names, noise)

    def _input_grads(self, x, targets, rule):
        """The guided pass, jit-compiled (interpreting the rewritten jaxpr op by op costs a compilation per
        primitive) and cached per rule, structure and class targets, with the model's arrays as arguments."""
        from .jax_guided import guided_vjp

        static, state = self._model.split()
        key = None if callable(targets) else ("guided", rule, self.model_mode, static, tuple(targets or ()))
        if key not in self._jits:
            run, seen = self._runner(set(), (static, None)), {}

            def grads(state, x):
                def scores(z):  # the outputs ride along as an auxiliary value (no gradient)
                    outputs = run(z, None, state)
                    return target_scores(targets, outputs, z.shape[0])[0], _arrays_only(outputs)

                (_, outputs), g, seen["units"] = guided_vjp(scores, x, rule, has_aux=True)
                return outputs, g

            self._jits[key] = jax.jit(grads), seen
        fn, seen = self._jits[key]
        if key is None:
            del self._jits[key]
        outputs, grads = fn(state, x)
        return outputs, grads, seen["units"]

    def _masked(self, name, layer, calls, fast):
        """Input masks: the model on ``x_i * masks``. Layer masks: eagerly, the layer's last-call output times the
        mask; jitted, the model on ``x_i`` tiled to the chunk with that output *replaced* by ``A_i * masks``: no
        output depends on the layers before it any more (but for skip connections), so XLA drops them. The jitted
        functions take the model's arrays as arguments (not constants) and are cached per layer and structure."""
        static, state = self._model.split()

        def run_with(run):
            def chunk(state, xi, ai, masks):
                if name is None:
                    return run(xi * masks, None, state)
                tiled = jnp.broadcast_to(xi, (masks.shape[0], *xi.shape[1:]))
                return run(tiled, (_replacing_hook if fast else _masking_hook)(ai, masks, calls), state)

            return chunk

        if not fast:
            chunk = run_with(self._runner(set() if name is None else {name}, (static, state)))
            return lambda xi, ai, masks: chunk(None, xi, ai, masks)
        key = ("chunk", name, calls, self.model_mode, static)
        if key not in self._jits:
            run = self._runner(set() if name is None else {name}, (static, None))
            self._jits[key] = jax.jit(lambda *args: _arrays_only(run_with(run)(*args)))
        fn = self._jits[key]
        return lambda xi, ai, masks: fn(state, xi, ai, masks)

    def traces(self) -> int:
        """How many times this adapter's cached ``jax.jit`` functions have been traced and compiled so far."""
        return sum(f._cache_size() for f in self._jits.values())

    def linear_classifier(self, name=None):
        """``(name, weight (K, C), bias (K,) or None)`` of the classifier named ``name``, or of the last
        ``nn.Dense`` (linen) / ``nnx.Linear`` (nnx) to run in the latest traced forward pass (before any trace:
        the last one in the variables tree / in definition order). Flax kernels are ``(C, K)``, hence transposed here.
        A ``(features, head)`` pair has none: pass ``cam_weights=``."""
        name, kernel, bias = self._model.classifier(name, self._last_trace)
        return name, jnp.asarray(kernel).T, None if bias is None else jnp.asarray(bias)


def _masking_hook(a, mask, n_calls):
    """Multiply the layer's output by ``mask`` at its ``n_calls``-th (last) call."""
    seen = [0]

    def hook(name, cls, out):
        seen[0] += 1
        return out * mask.astype(out.dtype) if seen[0] == n_calls else out

    return hook


def _replacing_hook(a, mask, n_calls):
    """Replace the layer's output by ``a * mask`` at its ``n_calls``-th (last) call: the output no longer
    depends on what computed it."""
    seen = [0]

    def hook(name, cls, out):
        seen[0] += 1
        if seen[0] != n_calls:
            return out
        return jnp.broadcast_to(a * mask.astype(a.dtype), out.shape).astype(out.dtype)

    return hook


def _recording_hook(calls, outs):
    """Record each call of the layer (``_Call``) and its output; change nothing."""

    def hook(name, cls, out):
        spec = jax.ShapeDtypeStruct(out.shape, out.dtype) if isinstance(out, jax.Array) else None
        calls.append(_Call(name, cls, spec, type(out).__name__))
        outs.append(out)
        return out

    return hook


def _arrays_only(tree):
    return jax.tree.map(lambda a: a if isinstance(a, jax.Array) else None, tree)
