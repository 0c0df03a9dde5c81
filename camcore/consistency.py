"""Cross-framework consistency: do two ports or conversions of one model explain themselves alike, and where do
they part?

- :func:`compare` runs :func:`camcore.explain` on every model (PyTorch, Keras, JAX; the first is the reference)
  for the same inputs, targets and methods and tabulates, per method and layer, how far each model's maps are
  from the reference's, and how far its outputs are.
- :func:`propose_layers` pairs the layers of two models of different frameworks (a port, an ONNX round trip) by
  execution order and output shape, and among the alignments with the most shape-equal pairs the one whose
  activations on the inputs are the most alike; :func:`layers` prints that table.
- :func:`first_divergence` compares the activations of the paired layers in execution order and reports the first
  pair that differs beyond the tolerance, or that only the outputs differ.

Tolerances are relative to the reference's range, per sample: ``max |m - m_ref| / (max m_ref - min m_ref)`` (the
absolute difference where that range is 0), so one number serves normalised maps, raw maps, input gradients,
activations and logits. Defaults, measured on the pretrained EfficientNet-Lite0 ported to PyTorch, Keras and Flax
(``camcore.ports``; docs/consistency.md has the numbers): :data:`MAP_TOLERANCE` for maps and outputs,
:data:`ACTIVATION_TOLERANCE` for activations.

Framework-free like the rest of camcore: backends are reached through :func:`camcore.backends.adapter_for` inside
the functions, and inputs are converted with the frameworks the models already imported.
"""
from __future__ import annotations

import difflib
import html
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ._xp import to_host

__all__ = ["compare", "from_maps", "propose_layers", "layers", "first_divergence", "Consistency", "MapAgreement",
           "OutputAgreement", "LayerMatch", "relative_difference", "correlation", "LayerProposal", "Divergence",
           "MAP_TOLERANCE", "ACTIVATION_TOLERANCE", "DEFAULT_METHODS"]

# Measured with TensorFlow's oneDNN on (2 photos, EfficientNet-Lite0): maps of the torch/Keras/Flax ports at
# _conv_head differ by 5e-6 of their range at most, through tf2onnx + onnx2torch by 5.5e-4 (LayerCAM at _blocks.10).
MAP_TOLERANCE = 5e-3
# The ports' 142 paired activations differ by 4.3e-5 of the range at most (oneDNN off or on); the broken
# conversions of the tests by 5.9e-3 (a batch-norm epsilon 1e-5 for 1e-3) to 0.58 (padding) at the broken layer.
ACTIVATION_TOLERANCE = 1e-3
DEFAULT_METHODS = ("gradcam", "gradcam++", "hirescam", "eigencam")
DATA_FORMATS = ("channels_first", "channels_last")
_KINDS = {"pytorch": "torch", "keras": "keras", "jax": "jax"}  # backend module -> framework


# ================================================================================================== models
@dataclass
class _Model:
    """One model ready to run: its ``name``, the framework ``kind``, the inputs' ``layout`` it takes, its
    ``adapter`` (built for that layout) and the inputs ``x`` in its framework and layout."""

    name: str
    model: object
    kind: str
    layout: str
    adapter: object
    x: object


def _check_models(models, *, exactly: int | None = None, arg: str = "models", value: str = "model") -> list:
    """``[(name, model), ...]``; errors naming the argument ``arg``."""
    want = f"two models {{name: {value}}}" if exactly == 2 else f"two or more models {{name: {value}}}"
    if not isinstance(models, Mapping):
        raise TypeError(f"{arg}: expected a mapping of {want}, the first the reference; got "
                        f"{type(models).__name__}")
    items = list(models.items())
    if len(items) < 2 or (exactly is not None and len(items) != exactly):
        raise ValueError(f"{arg}: expected {want}, the first the reference; got {len(items)}: "
                         f"{[k for k, _ in items]}")
    bad = [k for k, _ in items if not isinstance(k, str)]
    if bad:
        raise TypeError(f"{arg}: expected str names, got {bad[0]!r}")
    return items


def _host_inputs(inputs, data_format: str) -> np.ndarray:
    """The inputs as host NumPy, channels-first ``(B, C, *S)``."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format: expected one of {DATA_FORMATS} (the layout of inputs), got {data_format!r}")
    try:
        x = np.asarray(to_host(inputs))
    except Exception as err:
        raise TypeError(f"inputs: expected a NumPy or framework array, got {type(inputs).__name__}") from err
    if x.ndim < 3 or x.shape[0] == 0:
        layout = "(B, C, *spatial)" if data_format == "channels_first" else "(B, *spatial, C)"
        raise ValueError(f"inputs: expected a non-empty batch {layout} with at least one spatial axis, got shape "
                         f"{x.shape}")
    return np.ascontiguousarray(np.moveaxis(x, -1, 1) if data_format == "channels_last" else x)


def _native(x_first: np.ndarray, kind: str, layout: str):
    """Channels-first host inputs as the framework's array in ``layout``."""
    x = np.ascontiguousarray(np.moveaxis(x_first, 1, -1) if layout == "channels_last" else x_first)
    if kind == "torch":
        return sys.modules["torch"].from_numpy(x.copy())
    if kind == "jax":
        return sys.modules["jax.numpy"].asarray(x)
    return x  # Keras takes NumPy


def _kind(adapter) -> str:
    return _KINDS[type(adapter).__module__.rsplit(".", 1)[-1]]


def _declared_layout(model, kind: str, channels: int, rank: int) -> str | None:
    """A Keras model's layout from its input shape ``(None, *dims)``: ``None`` when it does not tell."""
    if kind != "keras":
        return None
    try:
        dims = tuple(model.inputs[0].shape[1:])
    except Exception:  # subclassed or unbuilt: no symbolic inputs
        return None
    if len(dims) != rank - 1:
        return None
    if dims[-1] == channels and dims[0] != channels:
        return "channels_last"
    if dims[0] == channels and dims[-1] != channels:
        return "channels_first"
    return None


def _prepare(name: str, model, x_first: np.ndarray, trace: bool = False):
    """A :class:`_Model` for ``model`` and the channels-first inputs, and (``trace``) its trace on them.

    The layout: a Keras model's input shape when it tells; otherwise channels-first, then channels-last when the
    model refuses channels-first inputs (one abstract or single-sample pass each).
    """
    from camcore.backends import adapter_for  # here: camcore imports no framework

    kind = _kind(adapter_for(model))
    declared = _declared_layout(model, kind, x_first.shape[1], x_first.ndim)
    order = [declared] if declared else list(DATA_FORMATS)
    errors = []
    for layout in order:
        adapter = adapter_for(model, data_format=layout)
        x = adapter.check_inputs(_native(x_first, kind, layout))
        probe = x if trace else x[:1]
        try:
            with adapter.session(probe):
                seen = adapter._trace(probe)
        except Exception as err:
            errors.append(f"{layout}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            continue
        return _Model(name, model, kind, layout, adapter, x), (seen if trace else None)
    raise ValueError(f"inputs: model {name!r} ({kind}) refused the inputs of shape {tuple(x_first.shape)} "
                     f"(given once, channels-first after data_format) in every layout tried: {'; '.join(errors)}")


def _outputs(m: _Model) -> np.ndarray | None:
    """The model's outputs as host float64 (``None`` when they are not one array)."""
    out = m.adapter.capture(m.x, [], None, gradients=False).outputs
    return np.asarray(to_host(out), np.float64) if hasattr(out, "shape") else None


# ================================================================================================ measures
def _per_sample(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float64).reshape(a.shape[0], -1)


def relative_difference(ref, got) -> tuple[float, float]:
    """``(max abs difference, max relative difference)`` over samples of ``got`` from ``ref`` (same shape
    ``(B, ...)``): per sample ``max |got - ref| / (max ref - min ref)``, the absolute difference where the
    reference is constant."""
    r, g = _per_sample(ref), _per_sample(got)
    diff = np.abs(g - r).max(axis=1)
    span = r.max(axis=1) - r.min(axis=1)
    rel = np.where(span > 0, diff / np.where(span > 0, span, 1.0), diff)
    return float(diff.max()), float(rel.max())


def correlation(ref, got) -> float:
    """The smallest per-sample Pearson correlation of ``got`` and ``ref`` ``(B, ...)`` (1 for two equal constant
    samples, NaN for one constant sample against a varying one)."""
    r, g = _per_sample(ref), _per_sample(got)
    r, g = r - r.mean(axis=1, keepdims=True), g - g.mean(axis=1, keepdims=True)
    out = []
    for a, b in zip(r, g):
        den = math.sqrt(float(np.sum(a * a)) * float(np.sum(b * b)))  # np.sum, not BLAS: exact and fast
        out.append(float(np.sum(a * b)) / den if den > 0 else 1.0 if np.array_equal(a, b) else math.nan)
    return min(out)


def _check_tolerance(tolerance, name: str = "tolerance") -> float:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"{name}: expected a non-negative number (relative to the reference's range), got "
                         f"{tolerance!r}")
    return float(tolerance)


def _finite(v):
    return v if isinstance(v, float) and math.isfinite(v) else None if isinstance(v, float) else v


# ================================================================================================= compare
@dataclass(frozen=True)
class MapAgreement:
    """One model's maps against the reference's for one method and layer (the reference's name; ``"input"`` for
    input gradients). ``max_abs_diff`` and ``relative_diff`` are the worst over samples, ``correlation`` the
    smallest; ``passed``: ``relative_diff <= tolerance``."""

    method: str
    layer: str
    model: str
    model_layer: str
    max_abs_diff: float
    relative_diff: float
    correlation: float
    passed: bool


@dataclass(frozen=True)
class OutputAgreement:
    """One model's outputs against the reference's: the max abs logit difference, relative to the reference's
    range per sample, and the fraction of samples with the same top class (``None`` for outputs that are not
    ``(B, K)``). ``passed``: same top classes and ``relative_diff <= tolerance``."""

    model: str
    max_abs_diff: float
    relative_diff: float
    top1_agreement: float | None
    passed: bool


@dataclass(frozen=True)
class Consistency:
    """What :func:`compare` found: ``maps`` (one row per method, layer and compared model), ``outputs`` (one per
    compared model), and how it ran (``layouts`` per model, the class ``targets`` used)."""

    reference: str
    models: tuple
    tolerance: float
    maps: tuple
    outputs: tuple
    layouts: dict
    targets: object

    @property
    def passed(self) -> bool:
        """Every map and every output within the tolerance."""
        return all(r.passed for r in self.maps) and all(r.passed for r in self.outputs)

    def failures(self) -> list:
        """The rows that did not pass."""
        return [r for r in (*self.maps, *self.outputs) if not r.passed]

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (non-finite numbers as ``None``)."""
        rows = lambda rs: [{k: _finite(v) for k, v in vars(r).items()} for r in rs]  # noqa: E731
        return {"reference": self.reference, "models": list(self.models), "tolerance": self.tolerance,
                "passed": self.passed, "layouts": dict(self.layouts),
                "targets": self.targets if isinstance(self.targets, (list, type(None))) else "callable",
                "maps": rows(self.maps), "outputs": rows(self.outputs)}

    def _tables(self):
        """``[(title, header, rows)]`` of strings, shared by markdown and HTML."""
        maps = [(r.method, r.layer, r.model, r.model_layer, f"{r.max_abs_diff:.2e}", f"{r.relative_diff:.2e}",
                 f"{r.correlation:.6f}", "yes" if r.passed else "NO") for r in self.maps]
        outs = [(r.model, f"{r.max_abs_diff:.2e}", f"{r.relative_diff:.2e}",
                 "-" if r.top1_agreement is None else f"{r.top1_agreement:.0%}", "yes" if r.passed else "NO")
                for r in self.outputs]
        ref = self.reference
        return [(f"Maps against {ref}", ("method", f"layer ({ref})", "model", "layer there", "max abs diff",
                                        "relative", "correlation", "within tol."), maps),
                (f"Outputs against {ref}", ("model", "max abs logit diff", "relative", "top-1 agreement",
                                           "within tol."), outs)]

    def _summary(self) -> str:
        verdict = "PASSED" if self.passed else f"FAILED ({len(self.failures())} row(s) beyond the tolerance)"
        layouts = ", ".join(f"{k}: {v}" for k, v in self.layouts.items())
        return (f"{verdict}: {len(self.models)} models, reference {self.reference!r}, tolerance {self.tolerance:g} "
                f"of the reference's range per sample" + (f"; inputs: {layouts}" if layouts else ""))

    def to_markdown(self) -> str:
        """The result as markdown: a summary line and two tables."""
        out = [self._summary()]
        for title, header, rows in self._tables():
            out += ["", f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            out += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.to_markdown()

    def to_html(self) -> str:
        """A self-contained HTML ``<section>`` (inline styles, no scripts or external resources) for a report."""
        e, cell = html.escape, "border:1px solid #ccc;padding:2px 6px;text-align:left"
        bad = "background:#fdd;font-weight:bold"
        out = ['<section class="camcore-consistency" style="font-family:sans-serif">',
               "<h2>Cross-framework consistency</h2>", f"<p>{e(self._summary())}</p>"]
        for title, header, rows in self._tables():
            out += [f'<table style="border-collapse:collapse;margin-bottom:1em"><caption style="text-align:left">'
                    f"{e(title)}</caption>", "<tr>" + "".join(f'<th style="{cell}">{e(h)}</th>' for h in header)
                    + "</tr>"]
            for row in rows:
                style = f"{cell};{bad}" if row[-1] == "NO" else cell
                out.append("<tr>" + "".join(f'<td style="{style}">{e(v)}</td>' for v in row) + "</tr>")
            out.append("</table>")
        return "\n".join(out + ["</section>"])


def _check_layers(layers, names: list) -> dict:
    """``{model name: [layer, ...]}``, all lists of one length; a single name or list applies to every model."""
    if isinstance(layers, Mapping):
        missing = [n for n in names if n not in layers]
        if missing:
            raise ValueError(f"layers: no layer given for model {missing[0]!r}; expected a layer name (or a list of "
                             f"corresponding layers) for each of {names}, got layers for {list(layers)}")
        extra = [k for k in layers if k not in names]
        if extra:
            raise ValueError(f"layers: {extra[0]!r} is not one of the models {names}")
        out = {n: list(layers[n]) if isinstance(layers[n], list) else [layers[n]] for n in names}
    elif layers is not None:
        out = {n: list(layers) if isinstance(layers, list) else [layers] for n in names}
    else:
        raise ValueError(f"layers: expected {{model name: layer}} for each of {names} (propose_layers finds "
                         f"them), or one layer name shared by every model; got None")
    sizes = {n: len(v) for n, v in out.items()}
    if len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise ValueError(f"layers: expected the same non-zero number of corresponding layers for every model, got "
                         f"{sizes}")
    return out


def _as_first(maps, m: _Model, spec) -> np.ndarray:
    """Host float64 maps; input gradients and guided maps (shaped like the inputs) channels-first."""
    a = np.asarray(to_host(maps), np.float64)
    shaped_like_inputs = spec.rule is not None or spec.guided
    return np.moveaxis(a, -1, 1) if shaped_like_inputs and m.layout == "channels_last" else a


def _explain(m: _Model, specs, every, layer, targets, options) -> dict:
    """``{method: host maps}`` of one model at one layer (``None`` for input-gradient methods only); ``every``:
    all the methods compared, whose options not meant for ``specs`` are left out of this call."""
    import camcore

    others = {k for s in every if s not in specs for k in s.hyper} - {k for s in specs for k in s.hyper}
    opts = {k: v for k, v in options.items() if k not in others}
    if any(s.perturbation for s in specs):
        opts.setdefault("progress", False)
    try:
        got = camcore.explain(m.model, m.x, method=[s.name for s in specs], layer=layer, targets=targets,
                              data_format=m.layout, **opts)
    except (ValueError, TypeError) as err:
        raise type(err)(f"model {m.name!r}: {err}") from err
    return {s.name: _as_first(got[s.name], m, s) for s in specs}


def compare(models, inputs, *, methods=DEFAULT_METHODS, layers=None, targets=None,
            tolerance: float = MAP_TOLERANCE, data_format: str = "channels_first", **options) -> Consistency:
    """Explain ``inputs`` with every model and compare each model's maps and outputs with the reference's.

    Args:
        models: ``{name: model}``, two or more models of any backend (a ``torch.nn.Module``, a Keras model, a Flax
            ``(module, variables)`` pair, ...); the first is the reference.
        inputs: one batch, NumPy or any framework's array, ``(B, C, *S)`` (``data_format="channels_last"``:
            ``(B, *S, C)``). Each model gets it in its framework and layout: a Keras model's declared input shape
            decides where it tells; otherwise channels-first, and channels-last when the model refuses
            channels-first inputs (a PyTorch model converted from Keras through ONNX, a Flax model). The dtype is
            kept.
        methods: method names of :func:`camcore.explain`; input gradients (``"guided-backprop"``,
            ``"deconvnet"``) are compared once, at layer ``"input"``.
        layers: ``{model name: layer}`` or ``{model name: [layer, ...]}`` (the i-th layers correspond), or one
            name (or list) every model shares. :func:`propose_layers` finds them.
        targets: as for :func:`camcore.explain`; ``None``: each sample's top class **on the reference**, used
            for every model, so that every model explains the same classes.
        tolerance: the largest relative difference ``max |m - m_ref| / (max m_ref - min m_ref)`` per sample that
            passes, for the maps and the logits (see the module docstring).
        data_format: the layout of ``inputs``.
        **options: for :func:`camcore.explain` (``top_k=``, ``eps=``, ``counterfactual=``, ...); the
            gradient-free methods run with ``progress=False`` unless given.
    Returns:
        a :class:`Consistency`: ``.passed``, ``.to_markdown()``, ``.to_dict()``, ``.to_html()``.
    """
    from camcore.methods import get_method

    items = _check_models(models)
    tolerance = _check_tolerance(tolerance)
    if isinstance(methods, str):
        methods = [methods]
    specs = [get_method(m) for m in methods]
    if not specs:
        raise ValueError("methods: expected one or more method names, got none")
    names = [n for n, _ in items]
    layer_lists = _check_layers(layers, names) if any(s.rule is None for s in specs) else {n: [] for n in names}
    x_first = _host_inputs(inputs, data_format)
    runs = [_prepare(n, model, x_first)[0] for n, model in items]
    for m in runs:  # every name checked before any map is computed
        for layer in layer_lists[m.name]:
            try:
                m.adapter.resolve_layer(layer)
            except (ValueError, TypeError) as err:
                raise type(err)(f"layers: model {m.name!r}: {err}") from err
    outputs = [_outputs(m) for m in runs]
    if targets is None and outputs[0] is not None and outputs[0].ndim == 2:
        targets = outputs[0].argmax(axis=1).tolist()
    layered, rules = [s for s in specs if s.rule is None], [s for s in specs if s.rule is not None]
    got: dict = {}  # (method, k) -> [maps per model]; k: layer index, -1 for input gradients
    for m in runs:
        for k, layer in enumerate(layer_lists[m.name]):
            chosen = layered + (rules if k == 0 else [])
            for name, maps in _explain(m, chosen, specs, layer, targets, options).items():
                got.setdefault((name, -1 if get_method(name).rule else k), []).append(maps)
        if not layer_lists[m.name]:
            for name, maps in _explain(m, rules, specs, None, targets, options).items():
                got.setdefault((name, -1), []).append(maps)
    rows = []
    for (method, k), maps in got.items():
        for m, other in zip(runs[1:], maps[1:]):
            if other.shape != maps[0].shape:
                raise ValueError(f"layers: {method!r} maps of {m.name!r} are {other.shape}, the reference's "
                                 f"{maps[0].shape}: the layers do not correspond")
            ref_layer = "input" if k < 0 else str(layer_lists[runs[0].name][k])
            rows.append(_map_row(method, ref_layer, m.name, "input" if k < 0 else str(layer_lists[m.name][k]),
                                 maps[0], other, tolerance))
    return Consistency(runs[0].name, tuple(names), tolerance, tuple(rows),
                       tuple(_output_rows(runs, outputs, tolerance)), {m.name: m.layout for m in runs}, targets)


def _map_row(method, ref_layer, name, layer, ref, got, tolerance) -> MapAgreement:
    diff, rel = relative_difference(ref, got)
    return MapAgreement(method, ref_layer, name, layer, diff, rel, correlation(ref, got), rel <= tolerance)


def from_maps(maps, *, layers=None, outputs=None, tolerance: float = MAP_TOLERANCE, layouts=None,
              targets=None) -> Consistency:
    """A :class:`Consistency` of maps already computed (by ``camcore demo``, or a user's own runs).

    Args:
        maps: ``{model: {method: (B, ...) maps}}``, two or more models, the first the reference; every model has
            the reference's methods, with maps of the same shape (channels-first where shaped like the inputs).
        layers: ``{model: {method: layer name}}`` for the table (default ``"-"``).
        outputs: ``{model: (B, K) outputs}`` to compare too.
        layouts: ``{model: layout}`` for the summary.
    """
    items = _check_models(maps, arg="maps", value="{method: maps}")
    for name, per_method in items:
        if not isinstance(per_method, Mapping):
            raise TypeError(f"maps: model {name!r}: expected a mapping {{method: maps}}, got "
                            f"{type(per_method).__name__}")
    tolerance = _check_tolerance(tolerance)
    layers = layers or {}
    (ref_name, ref), rows = items[0], []
    for method, ref_maps in ref.items():
        ref_maps = np.asarray(to_host(ref_maps), np.float64)
        for name, got in items[1:]:
            if method not in got:
                raise ValueError(f"maps: model {name!r} has no maps for {method!r}, the reference's methods are "
                                 f"{list(ref)}")
            other = np.asarray(to_host(got[method]), np.float64)
            if other.shape != ref_maps.shape:
                raise ValueError(f"maps: {method!r} maps of {name!r} are {other.shape}, the reference's "
                                 f"{ref_maps.shape}")
            layer_of = lambda n: str(layers.get(n, {}).get(method, "-"))  # noqa: E731
            rows.append(_map_row(method, layer_of(ref_name), name, layer_of(name), ref_maps, other, tolerance))
    out_rows = []
    if outputs is not None:
        host = [None if outputs.get(n) is None else np.asarray(to_host(outputs[n]), np.float64) for n, _ in items]
        out_rows = [_output_agreement(n, host[0], h, tolerance) for (n, _), h in zip(items[1:], host[1:])]
    return Consistency(ref_name, tuple(n for n, _ in items), tolerance, tuple(rows), tuple(out_rows),
                       dict(layouts or {}), targets)


def _output_agreement(name: str, ref, got, tolerance: float) -> OutputAgreement:
    if ref is None or got is None or ref.shape != got.shape:
        return OutputAgreement(name, math.inf, math.inf, None, False)
    diff, rel = relative_difference(ref, got)
    top1 = float(np.mean(ref.argmax(1) == got.argmax(1))) if ref.ndim == 2 else None
    return OutputAgreement(name, diff, rel, top1, rel <= tolerance and top1 in (None, 1.0))


def _output_rows(runs, outputs, tolerance) -> list:
    return [_output_agreement(m.name, outputs[0], out, tolerance) for m, out in zip(runs[1:], outputs[1:])]


# ========================================================================================= layer proposal
@dataclass(frozen=True)
class LayerMatch:
    """Two corresponding layers: their names (``aliases``: the other names of the same output, such as a block
    whose output is its last layer's), their channels-first output ``shape`` and the ``similarity`` of their
    activations on the inputs, ``1 - |a - b| / (|a| + |b|)`` (1: equal)."""

    a: str
    b: str
    shape: tuple
    similarity: float
    a_aliases: tuple = ()
    b_aliases: tuple = ()


@dataclass(frozen=True)
class LayerProposal:
    """Proposed layer pairs of models ``names`` (a, b), in execution order. ``proposal["_conv_head"]`` is model
    b's layer for a's ``"_conv_head"`` (or one of its aliases); :meth:`pairs` feeds :func:`first_divergence` and
    ``{names[0]: [...], names[1]: [...]}`` from :meth:`layers_for` feeds :func:`compare`."""

    names: tuple
    matches: tuple
    unmatched: dict = field(default_factory=dict)

    def __getitem__(self, a: str) -> str:
        for m in self.matches:
            if a == m.a or a in m.a_aliases:
                return m.b
        raise KeyError(f"{a!r}: no proposed match in {self.names[1]!r} for this layer of {self.names[0]!r}")

    def __len__(self) -> int:
        return len(self.matches)

    def pairs(self) -> list:
        return [(m.a, m.b) for m in self.matches]

    def layers_for(self, a_layers) -> dict:
        """``{name_a: a_layers, name_b: [their matches]}`` for :func:`compare`'s ``layers``."""
        a_layers = list(a_layers) if isinstance(a_layers, list) else [a_layers]
        return {self.names[0]: a_layers, self.names[1]: [self[a] for a in a_layers]}

    def to_markdown(self) -> str:
        a, b = self.names
        out = [f"| # | {a} | {b} | shape (channels-first) | similarity |", "|---|---|---|---|---|"]
        for i, m in enumerate(self.matches):
            na = m.a + (f" (= {', '.join(m.a_aliases)})" if m.a_aliases else "")
            nb = m.b + (f" (= {', '.join(m.b_aliases)})" if m.b_aliases else "")
            out.append(f"| {i} | {na} | {nb} | {m.shape} | {m.similarity:.6f} |")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.to_markdown()


@dataclass
class _Entry:
    """One layer call of a trace: name, channels-first shape, whether it is the name's last call (the one a capture
    reads), its host activation (last calls only) and the names of the same output."""

    name: str
    shape: tuple
    last: bool
    act: np.ndarray | None = None
    aliases: list = field(default_factory=list)


def _activations(m: _Model, names: list, what: str = "layers") -> tuple:
    """One pass of ``m`` with ``names`` captured, no gradients: ``({name: host float32 channels-first
    activation}, host float64 outputs or None)``; an unknown name raises naming ``what`` and the model."""
    try:
        cap = m.adapter.capture(m.x, names, None, gradients=False)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{what}: in model {m.name!r}: {err}") from err
    out = np.asarray(to_host(cap.outputs), np.float64) if hasattr(cap.outputs, "shape") else None
    return {n: np.ascontiguousarray(to_host(a), np.float32) for n, a in zip(names, cap.acts)}, out


def _entries(m: _Model, trace) -> tuple:
    """``(entries, outputs)``: the trace as :class:`_Entry` with activations, where a call whose output equals
    the previous entry's (a block returning its last layer's output, an identity) folds into it as an alias."""
    counts: dict = {}
    for name, _ in trace:
        counts[name] = counts.get(name, 0) + 1
    seen: dict = {}
    entries = []
    for name, shape in trace:
        seen[name] = seen.get(name, 0) + 1
        entries.append(_Entry(name, tuple(shape), seen[name] == counts[name]))
    acts, outputs = _activations(m, list(dict.fromkeys(e.name for e in entries if e.last)))
    out: list = []
    for e in entries:
        if e.last:
            e.act = acts[e.name]
            e.shape = tuple(e.act.shape)  # the capture's shape is the truth
        prev = out[-1] if out else None
        if (e.act is not None and prev is not None and prev.act is not None and prev.shape == e.shape
                and np.array_equal(prev.act, e.act)):
            prev.aliases.append(e.name)
            continue
        out.append(e)
    return out, outputs


_SAMPLE = 16384  # activation elements compared per pair of layers (a fixed random subset per shape)


def _similarities(ea: list, eb: list) -> dict:
    """``{(i, j): similarity}`` for every shape-equal pair of entries with activations, on a fixed random subset
    of ``_SAMPLE`` elements per shape."""
    picks: dict = {}

    def sample(e):
        if e.shape not in picks:
            size = int(np.prod(e.shape))
            picks[e.shape] = (np.unique(np.random.default_rng(0).integers(0, size, _SAMPLE)) if size > _SAMPLE
                              else slice(None))
        return e.act.reshape(-1)[picks[e.shape]].astype(np.float64)

    va = {i: sample(e) for i, e in enumerate(ea) if e.act is not None}
    vb = {j: sample(e) for j, e in enumerate(eb) if e.act is not None}
    by_shape: dict = {}
    for j in vb:
        by_shape.setdefault(eb[j].shape, []).append(j)
    norm = lambda v: math.sqrt(float(np.sum(v * v)))  # noqa: E731  (no BLAS call: fast for one vector)
    na, nb = {i: norm(v) for i, v in va.items()}, {j: norm(v) for j, v in vb.items()}
    out: dict = {}
    for i, a in va.items():
        for j in by_shape.get(ea[i].shape, []):
            den = na[i] + nb[j]
            out[i, j] = 1.0 - norm(a - vb[j]) / den if den > 0 else 1.0
    return out


def _name_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", ".", name.lower()).strip(".")


def _align(ea: list, eb: list, sims: dict) -> list:
    """``[(i, j), ...]`` in order: the alignment with the most shape-equal pairs and, among those, the largest sum
    of similarities (and name resemblance, to break exact ties). Dynamic programming, O(len(ea) * len(eb))."""
    n, m = len(ea), len(eb)
    bonus = 1.0 / (min(n, m) + 1)  # the similarities of all pairs together stay below one more pair
    weight = {}
    for i, e in enumerate(ea):
        for j, f in enumerate(eb):
            if e.shape == f.shape:
                s = max(0.0, sims.get((i, j), 0.0))
                name = difflib.SequenceMatcher(None, _name_key(e.name), _name_key(f.name)).ratio()
                weight[i, j] = 1.0 + bonus * (0.999 * s + 0.001 * name)
    score = np.zeros((n + 1, m + 1))
    move = np.zeros((n + 1, m + 1), np.int8)  # 0: skip a, 1: skip b, 2: pair
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            best, how = score[i - 1, j], 0
            if score[i, j - 1] > best:
                best, how = score[i, j - 1], 1
            w = weight.get((i - 1, j - 1))
            if w is not None and score[i - 1, j - 1] + w > best:
                best, how = score[i - 1, j - 1] + w, 2
            score[i, j], move[i, j] = best, how
    pairs, i, j = [], n, m
    while i > 0 and j > 0:
        if move[i, j] == 2:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif move[i, j] == 0:
            i -= 1
        else:
            j -= 1
    return pairs[::-1]


def _propose(a: _Model, trace_a, b: _Model, trace_b):
    """``(LayerProposal, {model name: ({layer name: activation}, outputs)})``."""
    (ea, out_a), (eb, out_b) = _entries(a, trace_a), _entries(b, trace_b)
    sims = _similarities(ea, eb)
    pairs = _align(ea, eb, sims)
    matches = tuple(LayerMatch(ea[i].name, eb[j].name, ea[i].shape, sims.get((i, j), math.nan),
                               tuple(ea[i].aliases), tuple(eb[j].aliases))
                    for i, j in pairs if ea[i].last and eb[j].last)  # a capture reads a layer's last call only
    used_a, used_b = {i for i, _ in pairs}, {j for _, j in pairs}
    unmatched = {a.name: [e.name for i, e in enumerate(ea) if i not in used_a],
                 b.name: [e.name for j, e in enumerate(eb) if j not in used_b]}
    acts = {m.name: ({n: e.act for e in es if e.act is not None for n in (e.name, *e.aliases)}, out)
            for m, es, out in ((a, ea, out_a), (b, eb, out_b))}
    return LayerProposal((a.name, b.name), matches, unmatched), acts


def propose_layers(model_a, model_b, inputs, *, data_format: str = "channels_first",
                   names: tuple = ("a", "b")) -> LayerProposal:
    """Propose which layers of two models (of any frameworks) correspond.

    Both models run once on ``inputs`` (``(B, C, *S)``, or ``(B, *S, C)`` with ``data_format="channels_last"``;
    each model gets its own layout, as in :func:`compare`) with every layer's output captured. Shapes are
    compared channels-first (the adapters move channels-last feature maps), and a layer call whose output equals
    the previous one's (a block and its last layer, an identity) counts once, with its names as aliases. The
    proposal is the alignment, in execution order, with the most shape-equal pairs and, among those, the most
    similar activations (``1 - |a - b| / (|a| + |b|)``): a convolution with a batch norm folded in pairs with the
    unfolded model's batch-norm output, not its convolution. Layers called several times appear at their last
    call only (what a capture reads). Costs one pass per model with every layer captured.

    Args:
        names: the two models' names in the table.
    Returns:
        a :class:`LayerProposal` (print it for the table; override any pair before using it).
    """
    if not (isinstance(names, tuple) and len(names) == 2 and all(isinstance(n, str) for n in names)
            and names[0] != names[1]):
        raise ValueError(f"names: expected two different str names for the models, got {names!r}")
    x_first = _host_inputs(inputs, data_format)
    a, trace_a = _prepare(names[0], model_a, x_first, trace=True)
    b, trace_b = _prepare(names[1], model_b, x_first, trace=True)
    return _propose(a, trace_a, b, trace_b)[0]


def layers(model_a, model_b, inputs, **kwargs) -> LayerProposal:
    """Print the table of :func:`propose_layers` (same arguments) and return the proposal."""
    proposal = propose_layers(model_a, model_b, inputs, **kwargs)
    print(proposal.to_markdown())
    return proposal


# ==================================================================================== divergence localisation
@dataclass(frozen=True)
class Divergence:
    """What :func:`first_divergence` found between ``reference`` and ``other``.

    ``kind``: ``"layer"`` (the pair ``layer``/``other_layer``, ``index``-th in execution order, is the first
    whose activations differ by ``difference`` of the reference's range, more than ``tolerance``),
    ``"outputs"`` (every compared layer agrees but the outputs do not) or ``"none"``. ``checked``:
    ``((layer, other_layer, relative difference), ...)`` for every compared pair, in order; ``outputs``: the
    outputs' :class:`OutputAgreement`; ``shapes``: the channels-first shapes of the divergent pair (a pair of
    different shapes diverges by ``inf``).
    """

    reference: str
    other: str
    kind: str
    layer: str | None
    other_layer: str | None
    index: int | None
    difference: float
    max_abs_diff: float
    tolerance: float
    checked: tuple
    outputs: OutputAgreement
    shapes: tuple | None = None

    @property
    def found(self) -> bool:
        return self.kind != "none"

    def __str__(self) -> str:
        o = self.outputs
        outs = (f"outputs: max abs difference {o.max_abs_diff:.3g} ({o.relative_diff:.3g} of the range), top-1 "
                f"agreement {'-' if o.top1_agreement is None else f'{o.top1_agreement:.0%}'}")
        if self.kind == "layer" and self.shapes[0] != self.shapes[1]:
            return (f"{self.other!r} first diverges from {self.reference!r} at layer {self.layer!r} "
                    f"({self.other!r}: {self.other_layer!r}), pair {self.index} of {len(self.checked)}: the outputs' "
                    f"shapes differ, {self.shapes[0]} and {self.shapes[1]} (channels-first); {outs}")
        if self.kind == "layer":
            return (f"{self.other!r} first diverges from {self.reference!r} at layer {self.layer!r} "
                    f"({self.other!r}: {self.other_layer!r}), pair {self.index} of {len(self.checked)}: max abs "
                    f"difference {self.max_abs_diff:.3g}, {self.difference:.3g} of the reference's range "
                    f"(tolerance {self.tolerance:g}); {outs}")
        if self.kind == "outputs":
            return (f"every one of the {len(self.checked)} compared layers agrees within {self.tolerance:g}, but "
                    f"the outputs mismatch ({outs}): look at the layers after the last compared one "
                    f"({self.checked[-1][0] if self.checked else '-'!r}), e.g. the classifier")
        return f"no divergence: {len(self.checked)} layers agree within {self.tolerance:g}; {outs}"

    def to_dict(self) -> dict:
        d = {k: _finite(v) for k, v in vars(self).items() if k not in ("checked", "outputs", "shapes")}
        d["shapes"] = None if self.shapes is None else [list(map(int, sh)) for sh in self.shapes]
        d["checked"] = [[a, b, _finite(r)] for a, b, r in self.checked]
        d["outputs"] = {k: _finite(v) for k, v in vars(self.outputs).items()}
        return d


def _check_pairs(pairs, names) -> list:
    if isinstance(pairs, LayerProposal):
        return pairs.pairs()
    if isinstance(pairs, Mapping):
        return list(pairs.items())
    try:
        out = [tuple(p) for p in pairs]
    except TypeError:
        out = None
    if out is None or not out or any(len(p) != 2 for p in out):
        raise ValueError(f"pairs: expected a LayerProposal, {{layer of {names[0]!r}: layer of {names[1]!r}}} or a "
                         f"non-empty list of (layer, layer) pairs; got {pairs!r}")
    return out


def first_divergence(models, inputs, *, tolerance: float = ACTIVATION_TOLERANCE, pairs=None,
                     data_format: str = "channels_first", output_tolerance: float = MAP_TOLERANCE) -> Divergence:
    """The first pair of corresponding layers, in execution order, whose activations differ.

    Args:
        models: ``{name: model}``, exactly two (the first is the reference).
        inputs: as for :func:`compare` (``data_format`` is their layout).
        tolerance: the largest relative difference of two paired activations that counts as agreeing,
            ``max |a - a_ref| / (max a_ref - min a_ref)`` per sample.
        pairs: ``[(reference layer, other layer), ...]``, a dict, or a :class:`LayerProposal`; ``None``: the
            pairs :func:`propose_layers` proposes. They are compared in the reference's execution order.
        output_tolerance: the same measure for the outputs (logits), which must also agree on the top class.
    Returns:
        a :class:`Divergence`; print it for a sentence. A pair whose activations are the models' outputs
        themselves (the classifier's) is not a layer pair: its disagreement is an output mismatch.
    """
    (na, model_a), (nb, model_b) = _check_models(models, exactly=2)
    tolerance = _check_tolerance(tolerance)
    output_tolerance = _check_tolerance(output_tolerance, "output_tolerance")
    x_first = _host_inputs(inputs, data_format)
    a, trace_a = _prepare(na, model_a, x_first, trace=pairs is None)
    b, trace_b = _prepare(nb, model_b, x_first, trace=pairs is None)
    if pairs is None:
        proposal, captured = _propose(a, trace_a, b, trace_b)
        pairs = proposal.pairs()
        (acts_a, out_a), (acts_b, out_b) = captured[na], captured[nb]
    else:
        pairs = _check_pairs(pairs, (na, nb))
        acts_a, out_a = _activations(a, list(dict.fromkeys(p[0] for p in pairs)), "pairs")
        acts_b, out_b = _activations(b, list(dict.fromkeys(p[1] for p in pairs)), "pairs")
    checked, first = [], None
    for la, lb in pairs:
        ra, rb = acts_a[la], acts_b[lb]
        if _is_output(ra, out_a) and _is_output(rb, out_b):
            continue  # the classifier's output: compared as the outputs
        diff, rel = relative_difference(ra, rb) if ra.shape == rb.shape else (math.inf, math.inf)
        checked.append((la, lb, rel))
        if first is None and not rel <= tolerance:
            first = (len(checked) - 1, la, lb, rel, diff, (ra.shape, rb.shape))
    outputs = _output_agreement(nb, out_a, out_b, output_tolerance)
    if first is not None:
        return Divergence(na, nb, "layer", first[1], first[2], first[0], first[3], first[4], tolerance,
                          tuple(checked), outputs, first[5])
    kind = "none" if outputs.passed else "outputs"
    return Divergence(na, nb, kind, None, None, None, outputs.relative_diff if kind == "outputs" else 0.0,
                      outputs.max_abs_diff if kind == "outputs" else 0.0, tolerance, tuple(checked), outputs)


def _is_output(act: np.ndarray, out) -> bool:
    return out is not None and act.shape == out.shape and np.array_equal(act, out)
