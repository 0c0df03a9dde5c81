"""JAX adapter: Flax linen, Flax nnx and plain JAX function pairs; gradients by ``jax.vjp`` of the tail only.

Three kinds of model are accepted (``camcore.explain`` picks this adapter when ``jax`` is imported and
:func:`accepts` says yes). Flax is looked up in ``sys.modules`` only, so plain-JAX users need no Flax install.

1. **Flax linen** -- a ``(module, variables)`` tuple::

       model = Net()                                       # a flax.linen.Module
       variables = model.init(jax.random.key(0), x)        # {"params": ..., "batch_stats": ...}
       maps = camcore.explain((model, variables), x, method="gradcam", layer="Block_1/Conv_0")

   ``layer`` is the submodule's path as Flax names it, ``"/"``-joined from the root (``"Conv_0"``,
   ``"Block_3/Conv_0"``, ``"conv2"`` for an attribute set in ``setup``), or the path as a tuple
   (``("Block_3", "Conv_0")``; only a list means several layers). Its ``__call__`` output is read (and, for
   ``forward_masked``, multiplied) with ``flax.linen.intercept_methods``: the model's code is never edited and
   ``variables`` is never changed (it is only passed to ``module.apply``). A module called several times shares
   one path; its last call is used.

2. **Flax nnx** -- the ``flax.nnx.Module`` itself::

       model = Net(rngs=nnx.Rngs(0))                       # a flax.nnx.Module
       maps = camcore.explain(model, x, method="gradcam", layer="blocks/1/conv")
       maps = camcore.explain(model, x, method="gradcam", layer=("blocks", 1, "conv"))  # the same layer

   ``layer`` is the attribute path of ``nnx.iter_modules`` joined with ``"/"`` (list/dict items by their
   index or key); a tuple path (ints for list items), a dotted string (``"blocks.1.conv"``) or the submodule object
   itself are accepted too. Every call works on a **throw-away copy** (``nnx.merge(*nnx.split(model), copy=True)``,
   made inside the traced function): the submodule is swapped for a capturing wrapper *in the copy*,
   ``model_mode="eval"`` calls ``copy.eval()``, and batch-norm statistics or RNG counters that a train-mode call
   updates change in the copy only. So the user's module -- its variables, its
   ``deterministic``/``use_running_average`` flags and its submodules -- is never touched, also when the model
   raises midway, and no ``try/finally`` restore is needed. (A copy, not a swap-and-restore on the user's module:
   nnx forbids mutating a Variable created outside the ``jax.vjp``/``jax.eval_shape`` trace that runs the model, and
   a copy cannot leak a wrapper or a flag when something fails.) The wrapper forwards attribute access, indexing and
   iteration to the wrapped module; only calls through the attribute path are seen.

3. **Plain JAX** -- a ``(features, head)`` pair of functions, ``features(x) -> A`` and ``head(A) -> outputs``::

       features = lambda x: backbone(params, x)             # (B, H, W, C) -> (B, h, w, K)
       head = lambda a: classifier(params, a)               # (B, h, w, K) -> (B, num_classes)
       maps = camcore.explain((features, head), x, method="gradcam")   # layer None or "features"

   The only layer is ``"features"`` (the output of ``features``). Pass ``data_format="channels_first"`` when
   both ``x`` and ``A`` are ``(B, C, *S)``.

Equinox models are not supported yet (their layers take one unbatched example and the model is ``jax.vmap``-ed,
so a tapped layer would need a vmapped delta); wrap one as a ``(features, head)`` pair, each ``jax.vmap``-ed.

**Inference mode.** ``model_mode="eval"`` (default): linen -- ``module.apply(variables, x)`` with *no* mutable
collection, so batch statistics are read-only; if the root module's ``__call__`` takes an argument named
``train``, ``training`` or ``is_training`` it gets ``False``, one named ``deterministic`` or
``use_running_average`` gets ``True``, and root dataclass fields with these names are set the same way (via
``module.clone``). nnx -- ``copy.eval()`` (``deterministic=True``, ``use_running_average=True`` on every
submodule that has them). Function pairs are called as they are. ``model_mode="as-is"``: linen --
``module.apply(variables, x, mutable=True)`` with no argument added, and the updated collections (train-mode
batch statistics) are discarded; nnx -- the copy keeps the module's own flags. A model that needs an RNG in
that mode (linen dropout) must be wrapped by the user, e.g. as a function pair.

**Gradients.** A first ``jax.eval_shape`` trace (abstract, no compute) learns each module's output shape and
how often it runs. The real pass adds a zero ``delta`` to the requested layer's output at its last call and
takes ``jax.vjp`` with respect to the deltas only, so the backward pass covers the layers after the target and
never computes parameter gradients; the layers before it are evaluated once, as constants.

**jit.** Nothing here reads a traced value, and ``explain`` skips its value checks under tracing
(:meth:`JaxAdapter.concrete`), so the whole pipeline jit-compiles::

    jax.jit(lambda v, x: camcore.explain((module, v), x, method="gradcam", layer="Block_1"))(variables, x)
    graphdef, state = nnx.split(model)      # nnx: split outside, merge inside (or use nnx.jit on the model)
    jax.jit(lambda s, x: camcore.explain(nnx.merge(graphdef, s), x, method="gradcam", layer="blocks/1"))(state, x)
    jax.jit(lambda x: camcore.explain((features, head), x, method="gradcam"))(x)

Under ``jit``, give ``targets`` as Python ints (or ``None``/a callable): ``camcore.targets.check_targets``
reads an array of targets on the host.

**forward_masked** jits its passes and caches the compiled functions on the adapter (the model's variables are
arguments, not constants baked into the executable), so repeated calls with the same shapes neither retrace nor
recompile. For layer masks the layer's output at its last call is *replaced* by its activations from the unmasked
pass times the mask: nothing depends on the layers before it any more and XLA's dead-code elimination drops them.
A model that cannot be traced (a NumPy step inside) runs eagerly instead, with a warning.

Eager calls run op by op, and the first call compiles every op for its shapes (tens of seconds for an
EfficientNet on CPU, about a second per later call); for repeated use, jit the explain call as above.

Arrays handed to the core are ``jax.Array`` and channels-first ``(B, C, *S)`` (moved from channels-last
``(B, *S, C)`` with ``jnp.moveaxis``); maps come back as a ``jax.Array`` even for NumPy inputs.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import sys
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from camcore.targets import check_targets, class_indices, class_scores, target_scores

from . import check_batch_size, check_data_format, check_masks, fell_back, masked_rows, unknown_layer

__all__ = ["JaxAdapter", "accepts"]

_MODES = ("eval", "as-is")
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
        self.module = module
        self.variables = variables
        self.static_names = _variable_paths(variables)

    def names(self) -> list[str]:
        return list(self.static_names)

    def resolve(self, layer):
        if isinstance(layer, (tuple, list)) and layer and all(isinstance(p, str) for p in layer):
            return "/".join(layer)
        if isinstance(layer, str) and layer:
            return layer.strip("/")
        if isinstance(layer, _linen().Module):
            raise TypeError(f"layer: pass a Flax linen submodule by its path (a '/'-joined name such as "
                            f"'Block_0/Conv_0', or a tuple of names), not a {type(layer).__name__} object")
        raise TypeError(f"layer: expected a Flax module path (str such as 'Block_0/Conv_0', or a tuple of "
                        f"names), got {type(layer).__name__}")

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


class JaxAdapter:
    """Adapter for a Flax linen ``(module, variables)`` pair, a Flax nnx module, or a ``(features, head)`` pair
    of JAX functions (see the module docstring for each kind, its layer names and the jit pattern).

    Args:
        model: the model; it is never changed (linen ``variables`` are only read; nnx modules are copied).
        model_mode: ``"eval"`` (default) runs in inference mode (dropout off, batch-norm running statistics);
            ``"as-is"`` runs the model as it is configured (see the module docstring).
        data_format: ``None`` or ``"channels_last"`` (Flax's layout): inputs ``(B, *S, C)`` and layer outputs
            ``(B, *s, K)``; ``"channels_first"`` when both are ``(B, C, *S)``.
    """

    _compile = True  # False: forward_masked runs the model eagerly (the "full" path), for benchmarks and debugging

    def __init__(self, model, *, model_mode: str = "eval", data_format: str | None = None):
        if model_mode not in _MODES:
            raise ValueError(f"model_mode: expected one of {_MODES}, got {model_mode!r}")
        self.channels_last = check_data_format(data_format, "channels_last")
        kind = _kind(model)
        if kind is None:
            raise TypeError(f"model: expected a Flax linen (module, variables) pair, a Flax nnx module, or a "
                            f"(features, head) pair of JAX functions; got {type(model).__name__}")
        self.model = model
        self.model_mode = model_mode
        self._model = {"linen": lambda: _Linen(*model), "nnx": lambda: _Nnx(model),
                       "pair": lambda: _Pair(*model)}[kind]()
        self._last_trace: list[_Call] | None = None  # the latest abstract trace (all modules, call order)
        self._jits: dict = {}  # forward_masked's jitted functions, by what they compute
        self._no_jit: dict = {}  # why jit failed, per (layer or None, model_mode, static structure)

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
            self.check_inputs(inputs)
            self._trace(jnp.asarray(inputs) if isinstance(inputs, np.ndarray) else inputs)
        names = self._model.names()
        if self._last_trace is not None:
            traced = list(dict.fromkeys(c.name for c in self._last_trace))
            names = traced + [n for n in names if n not in traced]
        return names

    def default_layer(self, inputs) -> str:
        """The last module (in call-finish order: a parent after its children) whose output is a feature map:
        one array of the inputs' rank with more than one spatial position. Costs one abstract trace
        (``jax.eval_shape``), no compute."""
        self.check_inputs(inputs)
        calls = self._trace(_as_jax(inputs))
        maps = [c.name for c in calls if c.out is not None and len(c.out.shape) == inputs.ndim
                and math.prod(self._spatial(c.out.shape)) > 1]
        if not maps:
            layout = "(B, *spatial, C)" if self.channels_last else "(B, C, *spatial)"
            raise ValueError(f"layer: no module of the model outputs a feature map {layout} of the inputs' rank; "
                             f"name the layer to explain")
        return maps[-1]

    # ----------------------------------------------------------------------------------------- inputs
    def check_inputs(self, inputs) -> None:
        layout = "(B, *spatial, C)" if self.channels_last else "(B, C, *spatial)"
        if not isinstance(inputs, (jax.Array, np.ndarray)):
            raise TypeError(f"inputs: expected a jax.Array or a NumPy array {layout} for a JAX model, got "
                            f"{type(inputs).__name__}")
        if not jnp.issubdtype(inputs.dtype, jnp.floating):
            raise TypeError(f"inputs: expected a floating-point array {layout}, got dtype {inputs.dtype}")
        if inputs.ndim < 2 or inputs.shape[0] == 0:
            raise ValueError(f"inputs: expected a non-empty batch {layout} with B >= 1, got shape "
                             f"{tuple(inputs.shape)}")

    def spatial_shape(self, inputs) -> tuple[int, ...]:
        """The inputs' spatial size ``S`` of ``(B, *S, C)`` (channels-last) or ``(B, C, *S)``."""
        return self._spatial(inputs.shape)

    def _spatial(self, shape) -> tuple[int, ...]:
        return tuple(shape[1:-1]) if self.channels_last else tuple(shape[2:])

    def _channels_first(self, a, rank):
        """``(B, C, *S)`` from the native layout; only outputs of the inputs' ``rank`` are feature maps (a
        transformer's ``(B, N, D)`` tokens stay as they are, as in PyTorch)."""
        return jnp.moveaxis(a, -1, 1) if self.channels_last and a.ndim == rank else a

    # ------------------------------------------------------------------------------------ the tracing
    def _runner(self, wanted, parts=None):
        return self._model.runner(self.model_mode == "eval", wanted, parts)

    def _trace(self, x) -> list[_Call]:
        """Every module call of one forward pass, in call-finish order, from an abstract trace."""
        calls: list[_Call] = []

        def hook(name, cls, out):
            spec = jax.ShapeDtypeStruct(out.shape, out.dtype) if isinstance(out, jax.Array) else None
            calls.append(_Call(name, cls, spec, type(out).__name__))
            return out

        run = self._runner(None)
        jax.eval_shape(lambda x: _arrays_only(run(x, hook)), x)
        self._last_trace = calls
        return calls

    def _last_calls(self, calls, names, what="layer"):
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

    # ---------------------------------------------------------------------------- the contract methods
    def activations_and_grads(self, inputs, layers, targets=None, *, gradients=True):
        """One forward pass; for each layer, its activations and ``d(sum_b y_b)/dA``, channels-first.

        Args:
            inputs: ``(B, *S, C)`` (or ``(B, C, *S)`` with ``data_format="channels_first"``) float array.
            layers: list of layer names or paths (see the module docstring).
            targets: as :func:`camcore.targets.check_targets` accepts.
            gradients: ``False`` skips the backward pass (``grads`` is then a list of ``None``).
        Returns:
            ``(outputs, activations, grads)``: the model outputs as it returned them, and per layer the
            activations and gradients, ``(B, C, *s)`` ``jax.Array`` in the model's dtype. A layer called several
            times in one forward pass is taken at its last call.
        """
        self.check_inputs(inputs)
        x = _as_jax(inputs)
        b = x.shape[0]
        names = [self.resolve_layer(layer)[0] for layer in layers]
        targets = check_targets(targets, b)
        last = self._last_calls(self._trace(x), names)
        wanted = set(names)
        run = self._runner(wanted)

        def forward(deltas):
            seen: dict[str, int] = {}
            captured: dict[str, jax.Array] = {}

            def hook(name, cls, out):
                seen[name] = seen.get(name, 0) + 1
                if seen[name] == last[name][0]:  # the last call: capture, and open the gradient path here
                    captured[name] = out
                    if deltas is not None:
                        for i, n in enumerate(names):
                            if n == name:
                                out = out + deltas[i]
                return out

            outputs = run(x, hook)
            return outputs, [captured[n] for n in names]

        if not gradients:
            outputs, acts = forward(None)
            return outputs, [self._channels_first(a, x.ndim) for a in acts], [None] * len(acts)

        def scores_of(deltas):
            outputs, acts = forward(deltas)
            scores, _ = target_scores(targets, outputs, b)
            return scores, (outputs, acts)

        deltas = [jnp.zeros(last[n][1].shape, last[n][1].dtype) for n in names]
        scores, vjp_fn, (outputs, acts) = jax.vjp(scores_of, deltas, has_aux=True)
        (grads,) = vjp_fn(jnp.ones_like(scores))
        return (outputs, [self._channels_first(a, x.ndim) for a in acts],
                [self._channels_first(g, x.ndim) for g in grads])

    def forward_masked(self, inputs, masks, *, at="input", targets=None, batch_size=32, probability=False,
                       progress=None, info=None):
        """Target scores of the model with masks multiplied into the inputs or into a layer's activations.

        Args:
            inputs: ``(B, *S, C)`` (channels-last) or ``(B, C, *S)``.
            masks: ``(M, *shape)`` shared by all samples or ``(B, M, *shape)`` per sample, where ``shape`` is in
                the core's **channels-first** convention and broadcasts against one sample at ``at`` (e.g.
                ``(1, H, W)`` spatial masks on the input, ``(C, 1, 1)`` channel masks on a layer); the adapter
                moves the channel axis to the model's layout.
            at: ``"input"``, or a layer whose output (at its last call) is multiplied by the mask.
            targets: as in :meth:`activations_and_grads`; ``None`` is each sample's top class unmasked.
            batch_size: masked copies run per forward pass; bounds peak memory.
            probability: score class targets by their softmax probability (float32) instead of their logit.
            progress: ``progress(n)`` is called after each forward pass with its number of masks.
            info: a dict that receives ``"path"``: ``"compiled"`` for layer masks scored by a ``jax.jit``
                function in which the layer's last-call output is replaced by the masked activations of the
                unmasked pass (XLA then drops the layers before it), else ``"full"`` (the whole model per chunk,
                jitted for input masks); and ``"reason"`` when jit failed and the model ran eagerly instead (a
                ``RuntimeWarning`` says so too). The jitted functions are cached on the adapter.
        Returns: ``(B, M)`` float32 ``jax.Array``.
        """
        self.check_inputs(inputs)
        check_batch_size(batch_size)
        x = _as_jax(inputs)
        b = x.shape[0]
        masks = jnp.asarray(masks, dtype=x.dtype)
        targets = check_targets(targets, b)
        name = None if isinstance(at, str) and at == "input" else self.resolve_layer(at)[0]
        info = {} if info is None else info
        static, state = self._model.split()
        family = (name, self.model_mode, static)
        jit = {"on": self._compile and family not in self._no_jit}
        if family in self._no_jit:  # it failed before, for this adapter: straight to the eager passes
            _fell_back(info, name, self._no_jit[family], stacklevel=3)

        def jitted(call, eager, stacklevel):
            """``call()`` (jitted), else ``eager()``; when only the eager one works, remember why and warn."""
            failed = None
            if jit["on"]:
                try:
                    return call()
                except Exception as err:  # tracing or compiling failed (or the model raised: the eager pass tells)
                    failed = err
            result = eager()
            if failed is not None:
                jit["on"] = False
                self._no_jit[family] = _reason(failed)
                _fell_back(info, name, self._no_jit[family], stacklevel)
            return result

        plain, acts, n_calls = None, None, 0
        if name is not None or targets is None:  # the unmasked pass: the layer's last call, the top classes
            plain, acts, calls = jitted(lambda: self._probe_jit(name, static, state, x),
                                        lambda: self._probe_eager(name, x), stacklevel=4)
        if name is None:
            sample = tuple(x.shape[1:])
        else:
            n_calls, spec = self._last_calls(calls, [name], what="at")[name]
            sample = tuple(spec.shape[1:])
        rank = len(sample)
        feature_map = self.channels_last and rank == x.ndim - 1
        per_sample = check_masks(masks.shape, b, (b, *(sample[-1:] + sample[:-1] if feature_map else sample)), at)
        # a chunk's channel axis goes last, as the model has it, inside the jitted functions (no extra dispatch)

        idx, checked = targets, [callable(targets)]
        if not callable(targets) and plain is not None:  # top classes / range check on the unmasked outputs
            idx, checked[0] = _class_indices(targets, plain), True
            idx = np.asarray(idx).tolist() if self.concrete(idx) else idx
        made: dict = {}  # built on first use: the eager runner, the jitted chunk function, each sample's slices

        def sample_of(i):
            if i not in made:
                made[i] = tuple(None if a is None else a if b == 1 else a[i : i + 1] for a in (x, acts))
            return made[i]

        def eager(i, chunk):
            xi, m = sample_of(i)[0], chunk.shape[0]
            chunk = jnp.moveaxis(chunk, 1, -1) if feature_map else chunk
            run = made["run"] = made.get("run") or self._runner(set() if name is None else {name}, (static, state))
            if name is None:
                return run(xi * chunk, None), None
            return run(jnp.broadcast_to(xi, (m, *xi.shape[1:])), _masking_hook(chunk, n_calls)), None

        def compiled(i, chunk):
            if "fn" not in made:
                made["fn"] = self._chunk_jit(name, n_calls, static, probability, not callable(targets), feature_map)
            index = None if callable(targets) else np.int32(idx[i]) if isinstance(idx, list) else idx[i]
            return made["fn"](state, *sample_of(i), chunk, index)

        def score(i, chunk):
            out, scores = jitted(lambda: compiled(i, chunk), lambda: eager(i, chunk), stacklevel=6)
            m = chunk.shape[0]
            if callable(targets):
                return target_scores(targets, out, m)[0]
            if not checked[0]:  # class indices given: range-check them against the first chunk's outputs' shape
                _class_indices(targets, out)
                checked[0] = True
            return class_scores(out, idx[i], probability=probability) if scores is None else scores

        rows = masked_rows(masks, b, per_sample, batch_size, score, progress)
        info["path"] = "compiled" if name is not None and jit["on"] else "full"
        joined = [jnp.concatenate(row) if len(row) > 1 else row[0] for row in rows]
        return (jnp.stack(joined) if b > 1 else joined[0][None]).astype(jnp.float32)

    def _probe_eager(self, name, x):
        """``(outputs, the layer's last-call output, [_Call per call of the layer])`` of one eager forward pass."""
        calls, outs = [], []
        plain = self._runner(set() if name is None else {name})(x, _recording_hook(calls, outs))
        return plain, outs[-1] if outs else None, calls

    def _probe_jit(self, name, static, state, x):
        """:meth:`_probe_eager` as a cached ``jax.jit`` function, one per layer and input shape (the calls of the
        layer are recorded while it is traced)."""
        key = ("probe", name, self.model_mode, static, tuple(x.shape), x.dtype)
        if key not in self._jits:
            run, meta = self._runner(set() if name is None else {name}, (static, None)), {"calls": []}

            def probe(state, x):
                calls, outs = [], []
                plain = run(x, _recording_hook(calls, outs), state)
                meta["calls"] = calls
                return _arrays_only(plain), outs[-1] if outs and isinstance(outs[-1], jax.Array) else None

            self._jits[key] = (jax.jit(probe), meta)
        fn, meta = self._jits[key]
        plain, last = fn(state, x)
        return plain, last, meta["calls"]

    def _chunk_jit(self, name, n_calls, static, probability, class_targets, feature_map):
        """The cached ``jax.jit`` function ``f(state, x_i, A_i, masks, index) -> (outputs, scores or None)`` that
        scores one chunk. Input masks: the model on ``x_i * masks``. Layer masks: the model on ``x_i`` tiled to
        the chunk, with the layer's output at its last call replaced by ``A_i * masks``; no output depends on the
        layers before it any more (but for skip connections), so XLA's dead-code elimination drops them.
        ``scores`` are class ``index``'s (logit or probability) when the outputs are ``(M, K)`` logits.
        ``feature_map``: the masks' channel axis (1) moves last, to the model's layout."""
        key = ("chunk", name, n_calls, self.model_mode, static, probability, class_targets, feature_map)
        if key not in self._jits:
            run = self._runner(set() if name is None else {name}, (static, None))

            def chunk_scores(state, xi, a, mask, index):
                mask = jnp.moveaxis(mask, 1, -1) if feature_map else mask  # channels-first masks -> the model's
                if name is None:
                    out = run(xi * mask, None, state)
                else:
                    out = run(jnp.broadcast_to(xi, (mask.shape[0], *xi.shape[1:])), _replacing_hook(a, mask, n_calls),
                              state)
                logits = class_targets and isinstance(out, jax.Array) and out.ndim == 2
                return out, class_scores(out, index, probability=probability) if logits else None

            self._jits[key] = jax.jit(chunk_scores)
        return self._jits[key]

    def traces(self) -> int:
        """How many times this adapter's cached ``jax.jit`` functions have been traced and compiled so far."""
        return sum((f[0] if isinstance(f, tuple) else f)._cache_size() for f in self._jits.values())

    def linear_classifier(self, name=None):
        """``(name, weight (K, C), bias (K,) or None)`` of the classifier named ``name``, or of the last
        ``nn.Dense`` (linen) / ``nnx.Linear`` (nnx) to run in the latest traced forward pass (before any trace:
        the last one in the variables tree / in definition order). Flax kernels are ``(C, K)``, hence transposed here.
        A ``(features, head)`` pair has none: pass ``cam_weights=``."""
        name, kernel, bias = self._model.classifier(name, self._last_trace)
        return name, jnp.asarray(kernel).T, None if bias is None else jnp.asarray(bias)


def _masking_hook(mask, n_calls):
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


def _class_indices(targets, outputs):
    """Each sample's class index (the top class for ``targets=None``), checked against the ``(B, K)`` outputs; a
    model that does not return one array of logits gets ``target_scores``' error. Given indices are checked
    against the outputs' shape only (a NumPy stand-in: no device work) and returned as they are."""
    if not hasattr(outputs, "ndim"):
        target_scores(targets, outputs, 0)  # raises: the model returned ..., not one array of logits
    if targets is None:
        return class_indices(targets, outputs)
    class_indices(targets, np.broadcast_to(np.float32(0), outputs.shape))
    return targets


def _fell_back(info, name, reason, stacklevel):
    """:func:`camcore.backends.fell_back` for the jitted function of layer ``name`` (``None``: the input masks)."""
    what = "the masked model" if name is None else f"only the layers after {name!r}"
    fell_back(info, f"jitting {what}", reason, stacklevel)


def _reason(err) -> str:
    """A one-line reason: jit-compiling the model raised ``err``."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"jit-compiling the model raised {type(err).__name__}: {first}"


def _as_jax(inputs):
    return inputs if isinstance(inputs, jax.Array) else jnp.asarray(inputs)


def _arrays_only(tree):
    return jax.tree.map(lambda a: a if isinstance(a, jax.Array) else None, tree)
