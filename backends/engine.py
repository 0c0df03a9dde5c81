"""The engine every backend shares: input, target and mask checks, one capture pass, and the masked passes.

A backend is a subclass of :class:`Engine` that implements the primitives of :class:`Backend` for one framework
(see ``docs/adapters.md``, "Adding a backend"). The engine builds the contract on them:

- :meth:`Engine.capture` runs the model once with the layers' outputs captured and, for gradient methods, the
  vector-Jacobian product of the summed target scores to them; :meth:`Engine.activations_and_grads` returns it.
- :meth:`Engine.score_masked` scores a whole batch of masked copies, per sample and in chunks
  (:class:`camcore.perturbation.Chunker`), from what one capture already holds: no probe pass. It runs the
  backend's fast path (a torch.fx tail, a ``tf.function``, ``jax.jit``) and, where that fails, the model eagerly,
  once per (layer, call count), with a ``RuntimeWarning`` and ``info["reason"]``.
  :meth:`Engine.forward_masked` is the contract's form of it for masks given whole.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from camcore._xp import array_namespace, float32
from camcore.explain import model_lock
from camcore.perturbation import Chunker
from camcore.targets import check_targets, class_indices, class_scores, first_leaf, target_scores

from . import check_batch_size, check_masks, fell_back

__all__ = ["Backend", "Capture", "Engine", "MODES", "GUIDED_RULES"]

MODES = ("eval", "as-is")
GUIDED_RULES = ("guided", "deconvnet")


class Backend(Protocol):
    """What one framework's module implements (a subclass of :class:`Engine`). ``x`` is the inputs as the
    framework's array; ``named`` a list of ``(name, handle)`` from :meth:`resolve_layer`; "native" arrays are in
    the model's layout, "core" ones channels-first ``(B, C, *S)``."""

    fast_path: str  # info["path"] of layer masks on the fast path: "tail" or "compiled"
    fast_text: str  # the fast path in the fallback warning, "{}" being what it runs: "jitting {}"
    acts_last: bool  # whether the layers of a channels-last model output channels-last feature maps
    pad_chunks: bool  # whether the fast path compiles per chunk shape (short chunks are padded to a power of 2)

    def _array(self, inputs) -> Any:
        """``inputs`` as the framework's array; ``TypeError`` naming ``inputs`` for anything else."""

    def _floating(self, x) -> bool: ...

    def _last(self, x) -> bool:
        """Whether the inputs are channels-last ``(B, *S, C)``."""

    def layer_names(self) -> list[str]: ...

    def resolve_layer(self, layer) -> tuple[str, Any]:
        """``(name, handle)``; ``ValueError`` listing the closest real names for an unknown one."""

    def _session(self, x) -> contextlib.AbstractContextManager:
        """Put the model in its mode for one call and restore everything afterwards."""

    def _trace(self, x) -> list[tuple[str, tuple]]:
        """``(name, core shape)`` of every layer call that outputs one array, in the order calls finish."""

    def _capture(self, x, named, targets, gradients: bool, what: str) -> tuple:
        """``(outputs, native activations, native grads or Nones, {name: calls})``: one pass, each layer at its last
        call; ``grads`` is ``d(sum_b y_b)/dA``. ``what`` names the argument in errors (``"layer"``, ``"at"``)."""

    def _input_grads(self, x, targets, rule: str) -> tuple:
        """``(outputs, d(sum_b y_b)/dx in the inputs' layout, units)`` with every ReLU-like unit backpropagating by
        ``rule`` (``"guided"`` or ``"deconvnet"``, docs/methods.md); ``units``: how many unit calls were guided."""

    def parameter_layers(self) -> list[str]:
        """The layers that hold trainable parameters themselves, in definition order (the input side first)."""

    def _randomized(self, names: list, noise: Callable):
        """A copy of the model whose trainable parameters under the layers ``names`` (their sub-layers too) are
        ``noise(p)``; the model itself is not changed."""

    def _masked(self, name, handle, calls: int, fast: bool) -> Callable | None:
        """``f(x_i, a_i, masks) -> outputs``: the model on ``(1, ...)`` sample ``x_i`` with native ``masks``
        ``(M, ...)`` multiplied into the inputs (``handle=None``) or into the layer's ``calls``-th output (``a_i``,
        its captured value). ``fast``: the compiled or tail form (``None`` when there is none)."""

    def _to_core(self, a, rank: int): ...

    def _from_core(self, masks, x, move: bool):
        """Core masks as native ones beside ``x``; ``move``: their channel axis goes last."""

    def _core_outputs(self, tree): ...

    def _verify(self, fast, cap, at, x0) -> None:
        """Raise when the fast path on sample ``x0`` does not reproduce ``cap.outputs`` (default: trusted)."""

    def concrete(self, a) -> bool: ...

    def to_native(self, maps, inputs): ...

    def linear_classifier(self, name=None) -> tuple: ...

    def traces(self) -> int: ...


@dataclass
class Capture:
    """One capture pass: native inputs ``x``, the core ``outputs``, the layers ``named`` with their native and
    core activations and core grads (``None`` without gradients), the checked ``targets`` and ``calls`` per
    layer name."""

    x: Any
    outputs: Any
    named: list
    native: list
    acts: list
    grads: list
    targets: Any
    calls: dict


class Engine:
    """The contract on a backend's primitives. ``model_mode``: ``"eval"`` or ``"as-is"``; ``compile=False`` runs
    the masked passes eagerly (the ``"full"`` path), for benchmarks and debugging."""

    fast_path, fast_text = "compiled", "{}"
    acts_last = True  # the layers of channels-last models compute channels-last feature maps (not torch's)
    pad_chunks = True  # the fast path compiles per chunk shape: pad a short last chunk to a power of two
    compile = True

    def __init__(self, model, *, model_mode: str = "eval", compile: bool = True):
        if model_mode not in MODES:
            raise ValueError(f"model_mode: expected one of {MODES}, got {model_mode!r}")
        self.model, self.model_mode = model, model_mode
        if not compile:
            self.compile = False
        self._failed: dict = {}  # why the fast path failed, per (layer name or None, its calls)

    def session(self, x):
        """The model's lock (one per model object, re-entrant: calls on one model from several threads or adapters
        never interleave) and the backend's session for one call."""
        stack = contextlib.ExitStack()
        stack.enter_context(model_lock(self.model))
        stack.enter_context(self._session(x))
        return stack

    # ----------------------------------------------------------------------------------------- inputs
    def check_inputs(self, inputs):
        """The inputs as the framework's array; ``TypeError``/``ValueError`` naming ``inputs``."""
        x = self._array(inputs)
        layout = "(B, *spatial, C)" if self._last(x) else "(B, C, *spatial)"
        if not self._floating(x):
            raise TypeError(f"inputs: expected a floating-point array {layout}, got dtype {x.dtype}")
        if len(x.shape) < 2 or x.shape[0] == 0:
            raise ValueError(f"inputs: expected a non-empty batch {layout} with B >= 1, got shape "
                             f"{tuple(x.shape)}")
        return x

    def spatial_shape(self, inputs) -> tuple[int, ...]:
        """The inputs' spatial size ``S`` of ``(B, *S, C)`` (channels-last) or ``(B, C, *S)``."""
        shape = tuple(inputs.shape)
        return shape[1:-1] if self._last(inputs) else shape[2:]

    def trace(self, inputs) -> list[tuple[str, tuple]]:
        """``(name, channels-first output shape)`` of every layer call that outputs one array, in the order calls
        finish (a container after its children). Costs one pass (JAX: abstract)."""
        x = self.check_inputs(inputs)
        with self.session(x):
            return self._trace(x)

    @staticmethod
    def is_feature_map(shape: tuple, rank: int) -> bool:
        """Whether a layer output of channels-first ``shape`` is a feature map for inputs of ``rank``: the same
        rank and more than one spatial position (a layer CAM methods can explain)."""
        return len(shape) == rank and math.prod(shape[2:]) > 1

    def default_layer(self, inputs) -> str:
        """The last layer (in the order calls finish: a container after its children) whose output is a
        feature map (:meth:`is_feature_map`). Costs one pass (JAX: abstract)."""
        rank = len(self.check_inputs(inputs).shape)
        maps = [n for n, s in self.trace(inputs) if self.is_feature_map(s, rank)]
        if not maps:
            raise ValueError("layer: no layer of the model outputs a feature map of the inputs' rank; name the "
                             "layer to explain")
        return maps[-1]

    # ------------------------------------------------------------------------------------- capture
    def capture(self, inputs, layers, targets=None, *, gradients: bool = True, what: str = "layer") -> Capture:
        """One forward pass with ``layers`` captured (and ``d(sum_b y_b)/dA`` for ``gradients``)."""
        x = self.check_inputs(inputs)
        named = [self.resolve_layer(layer) for layer in layers]
        targets = check_targets(targets, x.shape[0])
        with self.session(x):
            outputs, native, grads, calls = self._capture(x, named, targets, gradients, what)
        rank = len(x.shape)
        return Capture(x, outputs, named, native, [self._to_core(a, rank) for a in native],
                       [None if g is None else self._to_core(g, rank) for g in grads], targets, calls)

    def activations_and_grads(self, inputs, layers, targets=None, *, gradients: bool = True):
        """``(outputs, activations, grads)``: per layer, its output at its last call and ``d(sum_b y_b)/dA``
        (``None`` for ``gradients=False``), channels-first ``(B, C, *S)`` in the model's dtype and device."""
        cap = self.capture(inputs, layers, targets, gradients=gradients)
        return cap.outputs, cap.acts, cap.grads

    def input_gradients(self, inputs, targets=None, *, rule: str = "guided"):
        """``(outputs, grads)``: the gradient of the summed target scores with respect to the inputs, ``grads``
        shaped like them (the model's layout), every ReLU-like unit backpropagating by ``rule``: ``"guided"``
        (guided backpropagation) or ``"deconvnet"``. One forward and one backward pass for the batch; a
        ``RuntimeWarning`` where the model ran no ReLU-like unit (the gradient is then the plain one)."""
        if rule not in GUIDED_RULES:
            raise ValueError(f"rule: expected one of {GUIDED_RULES}, got {rule!r}")
        x = self.check_inputs(inputs)
        targets = check_targets(targets, x.shape[0])
        with self.session(x):
            outputs, grads, units = self._input_grads(x, targets, rule)
        if isinstance(targets, list):  # class indices: range-checked against the outputs
            self.classes(Capture(x, self._core_outputs(outputs), [], [], [], [], targets, {}))
        if units == 0 and self.concrete(grads):
            warnings.warn(f"{rule}: the model ran no ReLU-like unit (ReLU, ReLU6 or a clamp at 0; GELU, SiLU and "
                          f"leaky ReLUs are not), so guidance does not apply: these are the plain input gradients",
                          RuntimeWarning, stacklevel=3)
        return outputs, grads

    def randomized(self, layers, seed: int = 0):
        """A copy of the model with the trainable parameters of ``layers`` (names or layer objects; their
        sub-layers too) re-drawn as Gaussian noise of each parameter's own root-mean-square, ``p ~ N(0, rms(p)^2)``
        (NumPy's generator seeded by ``seed``, layer by layer in the order given): the model-randomisation test
        (Adebayo et al. 2018). The model itself is never changed."""
        import numpy as np

        names = [self.resolve_layer(layer)[0] for layer in layers]
        rng = np.random.default_rng(seed)

        def noise(p):
            p = np.asarray(p, np.float64)
            rms = float(np.sqrt(np.mean(p * p))) if p.size else 0.0
            return rng.normal(0.0, rms, size=p.shape).astype(np.float32)

        return self._randomized(names, noise)

    def classes(self, cap: Capture):
        """A callable target as it is, else one class index per sample (the top class for ``None``), checked
        against the captured outputs."""
        if callable(cap.targets) or cap.outputs is None:  # no outputs yet: checked on the first chunk's
            return cap.targets
        if not hasattr(cap.outputs, "ndim"):
            target_scores(cap.targets, cap.outputs, 0)  # raises: the model returned ..., not one array of logits
        idx = class_indices(cap.targets, cap.outputs)
        return idx.tolist() if self.concrete(idx) else idx

    # ------------------------------------------------------------------------------------- masked passes
    def forward_masked(self, inputs, masks, *, at="input", targets=None, batch_size: int = 32,
                       probability: bool = False, progress=None, info=None):
        """``(B, M)`` float32 target scores with ``masks`` multiplied into the inputs or into a layer's last-call
        output (see ``docs/adapters.md``): ``(M, *shape)`` shared or ``(B, M, *shape)`` per sample, channels-first.
        One unmasked pass first, for the activations at ``at`` and the top classes."""
        check_batch_size(batch_size)
        layer = None if isinstance(at, str) and at == "input" else at
        if layer is None and targets is not None:  # input masks, given targets: no unmasked pass is needed
            x = self.check_inputs(inputs)
            cap = Capture(x, None, [], [], [], [], check_targets(targets, x.shape[0]), {})
        else:
            cap = self.capture(inputs, [] if layer is None else [layer], targets, gradients=False, what="at")
        x, b = cap.x, cap.x.shape[0]
        shape = tuple(x.shape)
        at_shape = tuple(cap.acts[0].shape) if layer else (b, shape[-1], *shape[1:-1]) if self._last(x) else shape
        per_sample = check_masks(tuple(masks.shape), b, at_shape, at)
        count = masks.shape[1 if per_sample else 0]
        plans = [(count, (lambda s, e, i=i: masks[i][s:e]) if per_sample else (lambda s, e: masks[s:e]))
                 for i in range(b)]
        rows = self.score_masked(cap, plans, at=None if layer is None else 0, classes=self.classes(cap),
                                 probability=probability, chunker=Chunker(batch_size), progress=progress, info=info)
        return float32(array_namespace(rows[0]).stack(rows))

    def score_masked(self, cap: Capture, plans, *, at: int | None = None, classes, probability: bool = False,
                     chunker: Chunker | None = None, progress=None, info: dict | None = None) -> list:
        """Per sample ``i``, the ``(count_i,)`` float32 target scores of its masked copies (``None`` for none), where
        ``plans[i] = (count_i, make_i)`` and ``make_i(start, stop)`` gives core masks ``(stop - start, *shape)``
        for the inputs (``at=None``) or for captured layer ``at`` (its index in ``cap.named``). ``classes``: from
        :meth:`classes`; ``chunker``: the chunk sizes (default 32); ``progress(n)`` after each chunk; ``info``
        gets ``"path"`` and, after a fallback, ``"reason"``."""
        info = {} if info is None else info
        chunker = Chunker(32) if chunker is None else chunker
        x, rank = cap.x, len(cap.x.shape)
        name, handle = (None, None) if at is None else cap.named[at]
        calls = 0 if at is None else cap.calls[name]
        key = (name, calls)
        # channels-last feature maps: the masks' channel axis moves last
        move = self._last(x) and (at is None or self.acts_last and len(cap.native[at].shape) == rank)
        what = "the masked model" if name is None else f"only the layers after {name!r}"
        rows = []
        xs = [x[i : i + 1] for i in range(len(plans))]  # one object per sample: a tail keeps its prefix by it
        with self.session(x):
            fast, eager = self._fast(key, name, handle, calls, cap, at, xs, what, info), None
            for i, (count, make) in enumerate(plans):
                xi, ai = xs[i], None if at is None else cap.native[at][i : i + 1]
                got = []
                for start, stop in chunker.split(count):
                    core, m = make(start, stop), stop - start
                    out = failed = None
                    if fast is not None:
                        try:
                            out = fast(xi, ai, self._from_core(_padded(core) if self.pad_chunks else core, x, move))
                        except Exception as err:  # tracing failed (or the model raised: the eager pass tells)
                            failed = err
                    if out is None:
                        eager = eager or self._masked(name, handle, calls, fast=False)
                        out = eager(xi, ai, self._from_core(core, x, move))
                    if failed is not None:  # the eager pass worked: the fast path was the problem
                        fast, self._failed[key] = None, self._reason(failed)
                        fell_back(info, self.fast_text.format(what), self._failed[key], stacklevel=3)
                    if cap.outputs is None and not callable(classes) and not rows and not got:  # range check
                        self.classes(Capture(x, self._core_outputs(out), [], [], [], [], classes, {}))
                    got.append(self._pick(out, classes, i, m, probability)[:m])
                    if progress is not None:
                        progress(m)
                rows.append(None if not got else got[0] if len(got) == 1 else array_namespace(got[0]).concat(got))
        info["path"] = self.fast_path if at is not None and fast is not None else "full"
        return rows

    def _fast(self, key, name, handle, calls, cap, at, xs, what, info):
        """The backend's fast path for these masks, checked (:meth:`_verify`), or ``None``: off, none, or failed
        (now or before: remembered per key, and warned about at each call)."""
        if not self.compile:
            return None
        if key in self._failed:
            fell_back(info, self.fast_text.format(what), self._failed[key], stacklevel=4)
            return None
        try:
            fast = self._masked(name, handle, calls, fast=True)
            if fast is not None and xs:
                self._verify(fast, cap, at, xs[0])
            return fast
        except Exception as err:  # any failure of tracing or batching: the eager passes are always right
            self._failed[key] = self._reason(err)
            fell_back(info, self.fast_text.format(what), self._failed[key], stacklevel=4)
            return None

    def _verify(self, fast, cap: Capture, at, x0) -> None:
        """Raise when ``fast`` on the first sample ``x0`` does not reproduce the captured outputs (a backend whose fast path is not exact by
        construction checks it here; the others trust it)."""

    def _pick(self, out, classes, i: int, m: int, probability: bool):
        """``(m,)`` float32 scores of sample ``i``'s target in the outputs of ``m`` masked copies (or more: padded)."""
        if callable(classes):
            return float32(self._core_outputs(target_scores(classes, out, len(first_leaf(out)))[0]))
        return class_scores(self._core_outputs(out), classes[i], probability=probability)

    @staticmethod
    def _reason(err) -> str:
        """A one-line reason for a fallback: the error's type and first line."""
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"


def _padded(masks):
    """``masks`` ``(m, ...)`` with the last one repeated up to the next power of two: a compiled fast path then
    sees at most ``log2`` chunk shapes, whatever the number of masks (the extra scores are dropped)."""
    m = masks.shape[0]
    size = 1 << (m - 1).bit_length()
    if size == m:
        return masks
    xp = array_namespace(masks)
    return xp.concat([masks, xp.broadcast_to(masks[-1:], (size - m, *masks.shape[1:]))])

