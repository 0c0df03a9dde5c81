"""PyTorch backend: forward hooks that exist for one call, gradients w.r.t. the layer's activations only.

One forward pass serves any number of layers. The layers before the first requested layer run under
``torch.no_grad`` (no autograd graph, no memory for it); the hook on that layer turns gradients on, so the
backward pass (``torch.autograd.grad`` of the target scores w.r.t. the activations) touches only the layers after
it and never accumulates parameter gradients. The hook returns a clone of the activations, so in-place ops after
the layer (``ReLU(inplace=True)``, DenseNet) cannot corrupt what was captured. Layer masks run only the layers
after the layer (:mod:`camcore.backends.torch_tail`), checked against the captured outputs before use.
"""
from __future__ import annotations

import contextlib

import torch

from camcore.targets import target_scores

from . import camcore_error, check_data_format, model_error, unknown_layer
from .engine import Engine
from .torch_tail import Tail

__all__ = ["TorchAdapter"]


def _tensors(tree) -> list:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    return []


def _same_outputs(got, want, rows=None) -> bool:
    """Whether two output trees agree to their dtype's rounding (``max(1e-4, 16 eps)`` relative to each output's
    largest value: 1e-4 for float32, 0.016 for float16, 0.125 for bfloat16), comparing the first ``rows`` rows of
    ``want`` (all when ``None``)."""
    got, want = _tensors(got), [w[:rows] for w in _tensors(want)]

    def tol(w):
        return max(1e-4, 16 * torch.finfo(w.dtype).eps) if w.is_floating_point() else 0.0

    return len(got) == len(want) and all(
        g.shape == w.shape and bool(((g.float() - w.float()).abs() <= tol(w) * (1 + w.float().abs().max())).all())
        for g, w in zip(got, want))


def _detach(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach()
    if isinstance(tree, (list, tuple)):
        return type(tree)(_detach(t) for t in tree)
    if isinstance(tree, dict):
        return {k: _detach(v) for k, v in tree.items()}
    return tree


@contextlib.contextmanager
def _hooked(pairs):
    """Forward hooks ``(module, hook)`` registered for the block, always removed."""
    handles = []
    try:
        handles.extend(m.register_forward_hook(h) for m, h in pairs)
        yield
    finally:
        for h in handles:
            h.remove()


class TorchAdapter(Engine):
    """Adapter for a ``torch.nn.Module``.

    Args:
        model: the model; it is never changed (weights, buffers, ``training`` flags and hooks are the same
            after every call, also when the model raises).
        model_mode: ``"eval"`` (default) runs the call in inference mode (dropout off, batch-norm statistics
            frozen); ``"as-is"`` keeps each module's own ``training`` flag (buffers are restored afterwards).
        data_format: the layout of the *inputs*: ``"channels_first"`` ``(B, C, *S)``, ``"channels_last"``
            ``(B, *S, C)`` (e.g. a Keras model converted through ONNX with ``tf2onnx`` + ``onnx2torch``), or
            ``None``: channels-last when the model's first convolution takes as many channels as the inputs' last
            dimension and not as many as their second, else channels-first. The layers' activations are
            channels-first either way, as PyTorch's modules compute them (``reshape=`` handles others).
        compile: ``False`` runs layer masks through the whole model (the ``"full"`` path) instead of the tail.
    """

    fast_path, fast_text, acts_last, pad_chunks = "tail", "{} (a torch.fx split)", False, False

    def __init__(self, model: torch.nn.Module, *, model_mode: str = "eval", data_format: str | None = None,
                 compile: bool = True):
        super().__init__(model, model_mode=model_mode, compile=compile)
        self._tails: dict = {}  # the torch.fx split per layer module
        self._memory_format_ok: bool | None = None  # whether channels-last strides give the same outputs
        # True/False: channels-last/first inputs as given; None: read from the model for each batch of inputs
        self._given_last = None if data_format is None else check_data_format(data_format, "channels_first")
        conv = next((m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
        self._in_channels = None if conv is None else conv.in_channels  # of the first convolution: the layout

    # ----------------------------------------------------------------------------------------- layers
    def resolve_layer(self, layer) -> tuple[str, torch.nn.Module]:
        """``(name, module)`` for a module path such as ``"layer4.1"`` or a module object of the model."""
        if isinstance(layer, torch.nn.Module):
            for name, module in self.model.named_modules():
                if module is layer:
                    return name or type(layer).__name__, module
            raise ValueError(f"layer: the {type(layer).__name__} module passed is not part of the model")
        if not isinstance(layer, str):
            raise TypeError(f"layer: expected a module path (str) or a torch.nn.Module of the model, "
                            f"got {type(layer).__name__}")
        modules = dict(self.model.named_modules())
        if layer not in modules or layer == "":
            raise unknown_layer(layer, [n for n in modules if n])
        return layer, modules[layer]

    def layer_names(self) -> list[str]:
        return [n for n, _ in self.model.named_modules() if n]

    # ----------------------------------------------------------------------------------------- inputs
    def channels_last(self, inputs) -> bool:
        """Whether ``inputs`` are laid out ``(B, *S, C)``: ``data_format`` if given, else read from the model's
        first convolution (see the class docstring)."""
        if self._given_last is not None:
            return self._given_last
        return inputs.ndim >= 3 and inputs.shape[-1] == self._in_channels != inputs.shape[1]

    _last = channels_last

    @staticmethod
    def _array(inputs):
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"inputs: expected a torch.Tensor for a PyTorch model, got {type(inputs).__name__}")
        return inputs

    @staticmethod
    def _floating(x) -> bool:
        return x.is_floating_point()

    @staticmethod
    def concrete(a) -> bool:
        """Whether ``a`` holds values (always, in eager PyTorch)."""
        return True

    @staticmethod
    def to_native(maps, inputs):
        """The core's result is already a tensor beside the inputs."""
        return maps

    @staticmethod
    def _to_core(a, rank):
        return a

    @staticmethod
    def _from_core(masks, x, move):
        masks = torch.as_tensor(masks, device=x.device).to(x.dtype)
        return torch.movedim(masks, 1, -1) if move else masks

    @staticmethod
    def _core_outputs(tree):
        return tree

    def _forward(self, x):
        """``model(x)``; an error of the model's own comes back with the inputs' shape and a layout hint
        (:func:`camcore.backends.model_error`), the original as its ``__cause__``."""
        try:
            return self.model(x)
        except Exception as err:
            raise model_error(err, x.shape, self.channels_last(x), self._mismatch(x)) from err

    def _mismatch(self, x) -> str:
        """What differs between the inputs and the model's first floating parameter: dtype, device ("" if none)."""
        p = next((t for t in (*self.model.parameters(), *self.model.buffers()) if t.is_floating_point()), None)
        if p is None:
            return ""
        parts = [f"the inputs are {x.dtype} and the model's parameters {p.dtype}: pass inputs.to({p.dtype})"
                 if x.dtype != p.dtype else "",
                 f"the inputs are on {x.device} and the model on {p.device}: pass inputs.to('{p.device}')"
                 if x.device != p.device else ""]
        return "; ".join(q for q in parts if q)

    @contextlib.contextmanager
    def _session(self, x):
        """Set the model's mode for one call, with autograd off; restore flags, buffers and grad mode after."""
        model = self.model
        flags = [(m, m.training) for m in model.modules()]
        grad_mode = torch.is_grad_enabled()
        if self.model_mode == "eval":
            model.eval()
        # buffers can change even in eval mode (quantisation observers); they are small, so always restore them
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        try:
            torch.set_grad_enabled(False)
            yield
        finally:
            for m, flag in flags:
                m.training = flag
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            torch.set_grad_enabled(grad_mode)

    # ------------------------------------------------------------------------------------- primitives
    def _trace(self, x):
        seen: list = []
        names = {m: n for n, m in self.model.named_modules() if n}

        def hook(module, args, out):
            if isinstance(out, torch.Tensor):
                seen.append((names[module], tuple(out.shape)))

        with _hooked([(m, hook) for m in names]):
            self._forward(x)
        return seen

    def parameter_layers(self):
        return [n for n, m in self.model.named_modules()
                if n and any(p.requires_grad for p in m.parameters(recurse=False))]

    def _randomized(self, names, noise):
        import copy

        twin = copy.deepcopy(self.model)
        with torch.no_grad():
            for name in names:
                for p in twin.get_submodule(name).parameters():
                    if p.requires_grad:
                        p.copy_(torch.from_numpy(noise(p.detach().float().cpu().numpy())).to(p))
        return twin

    def _input_grads(self, x, targets, rule):
        from .torch_guided import GuidedMode

        xg = x.detach().requires_grad_(True)
        with torch.enable_grad():
            with GuidedMode(rule) as mode:
                outputs = self._forward(xg)
            scores, _ = target_scores(targets, outputs, x.shape[0], differentiable=True)  # outside: plain
            (grads,) = torch.autograd.grad(scores.sum(), xg)
        return _detach(outputs), grads, mode.units

    def _capture(self, x, named, targets, gradients, what):
        if gradients and torch.is_inference_mode_enabled():
            raise RuntimeError("explain: gradient methods need autograd, which torch.inference_mode() switches off "
                               "for good; call camcore outside inference mode (torch.no_grad() is fine)")
        captured: dict[int, torch.Tensor] = {}
        calls = {name: 0 for name, _ in named}

        def make_hook(i, name):
            def hook(module, args, out):
                if not isinstance(out, torch.Tensor):
                    raise camcore_error(TypeError(f"{what}: {name!r} returns {type(out).__name__}, not a tensor; "
                                                  f"pick a layer whose output is one tensor"))
                calls[name] += 1
                if not gradients:
                    captured[i] = out.detach().clone()
                    return None
                if not out.requires_grad:  # first captured layer: the graph starts here
                    torch.set_grad_enabled(True)
                    out = out.detach().requires_grad_(True)
                captured[i] = out
                return out.clone()

            return hook

        with _hooked([(m, make_hook(i, n)) for i, (n, m) in enumerate(named)]):
            outputs = self._forward(x)
        missing = [n for i, (n, _) in enumerate(named) if i not in captured]
        if missing:
            raise ValueError(f"{what}: {'layer ' if what == 'at' else ''}{missing[0]!r} did not run during the "
                             f"forward pass of the inputs")
        acts = [captured[i] for i in range(len(named))]
        if not gradients:
            return _detach(outputs), acts, [None] * len(acts), calls
        torch.set_grad_enabled(True)
        scores, _ = target_scores(targets, outputs, x.shape[0], differentiable=True)
        if not scores.requires_grad:
            raise ValueError(f"layer: the target scores do not depend on layer {named[0][0]!r}")
        grads = torch.autograd.grad(scores.sum(), acts, allow_unused=True)
        for (name, _), g in zip(named, grads):
            if g is None:
                raise ValueError(f"layer: {name!r} does not influence the target scores (no gradient path "
                                 f"from the outputs to it); pick a layer the outputs depend on")
        return _detach(outputs), [a.detach() for a in acts], list(grads), calls

    def _masked(self, name, module, calls, fast):
        if module is None:  # input masks: no tail; the whole model, in channels-last strides where that is exact
            return None if fast else (lambda xi, ai, masks: self._forward_fast(xi * masks))
        if fast:
            tail = self._tails.get(module) or self._tails.setdefault(module, Tail(self.model, module))
            return lambda xi, ai, masks: tail(xi, masks)

        def run(xi, ai, masks):
            seen = [0]

            def hook(mod, args, out):
                seen[0] += 1
                return out * masks if seen[0] == calls else None

            with _hooked([(module, hook)]):
                return self._forward(xi.expand(masks.shape[0], *xi.shape[1:]))

        return run

    def _verify(self, fast, cap, at, x0):
        if at is None:
            return
        ones = torch.ones((1,) * cap.native[at].ndim, dtype=cap.x.dtype, device=cap.x.device)
        if not _same_outputs(fast(x0, None, ones), cap.outputs, rows=1):
            raise RuntimeError("the traced graph does not reproduce the model's outputs")

    def _forward_fast(self, x):
        """``model(x)``, for 4-D inputs on a CPU in channels-last *memory format* (the tensor's logical layout and
        the model are unchanged) when the model has convolutions: PyTorch's CPU convolutions run about 2x faster
        so. Checked on the first call: the outputs must agree with the contiguous run's, else (or if the model
        raises on such strides, e.g. ``x.view(...)``) this adapter keeps contiguous inputs."""
        if x.ndim != 4 or x.device.type != "cpu" or self._in_channels is None or self._memory_format_ok is False:
            return self._forward(x)
        fast = x.contiguous(memory_format=torch.channels_last)
        if self._memory_format_ok is None:
            want = self._forward(x)
            try:
                self._memory_format_ok = _same_outputs(self.model(fast), want)
            except Exception:
                self._memory_format_ok = False
            return want
        return self._forward(fast)

    def traces(self) -> int:
        """How many graphs this adapter has built so far (``torch.fx`` splits for the tail path)."""
        return len(self._tails)

    def linear_classifier(self, name=None):
        """``(name, weight (K, C), bias (K,) or None)`` of the classifier named ``name``, or of the model's last
        ``torch.nn.Linear`` module when ``name`` is None."""
        if name is None:
            linears = [(n, m) for n, m in self.model.named_modules() if isinstance(m, torch.nn.Linear)]
            if not linears:
                raise ValueError("classifier: the model has no torch.nn.Linear layer; name the classifier with "
                                 "classifier=... or pass the class weights as cam_weights=(num_classes, C)")
            name, module = linears[-1]
        else:
            name, module = self.resolve_layer(name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise ValueError(f"classifier: {name!r} has no (num_classes, C) weight matrix; "
                             f"got {type(module).__name__}")
        bias = getattr(module, "bias", None)
        return name, weight.detach(), None if bias is None else bias.detach()
