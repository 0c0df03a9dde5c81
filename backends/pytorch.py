"""PyTorch adapter: forward hooks that exist for one call, gradients w.r.t. the layer's activations only.

One forward pass serves any number of layers. The layers before the first requested layer run under
``torch.no_grad`` (no autograd graph, no memory for it); the hook on that layer turns gradients on, so the
backward pass (``torch.autograd.grad`` of the target scores w.r.t. the activations) touches only the layers after
it and never accumulates parameter gradients. The hook returns a clone of the activations, so in-place ops after
the layer (``ReLU(inplace=True)``, DenseNet) cannot corrupt what was captured.
"""
from __future__ import annotations

import contextlib

import torch

from camcore.targets import check_targets, class_indices, class_scores, target_scores

from . import (camcore_error, check_batch_size, check_data_format, check_masks, fell_back, masked_rows,
               model_error, unknown_layer)
from .torch_tail import Tail

__all__ = ["TorchAdapter"]

_MODES = ("eval", "as-is")


def _tensors(tree) -> list:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    return []


def _same_outputs(got, want, rows=None) -> bool:
    """Whether two output trees agree to float32 rounding (relative to each output's largest value), comparing
    the first ``rows`` rows of ``want`` (all when ``None``)."""
    got, want = _tensors(got), [w[:rows] for w in _tensors(want)]
    return len(got) == len(want) and all(
        g.shape == w.shape and bool(((g.float() - w.float()).abs() <= 1e-4 * (1 + w.float().abs().max())).all())
        for g, w in zip(got, want))


def _detach(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach()
    if isinstance(tree, (list, tuple)):
        return type(tree)(_detach(t) for t in tree)
    if isinstance(tree, dict):
        return {k: _detach(v) for k, v in tree.items()}
    return tree


class TorchAdapter:
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
    """

    def __init__(self, model: torch.nn.Module, *, model_mode: str = "eval", data_format: str | None = None):
        if model_mode not in _MODES:
            raise ValueError(f"model_mode: expected one of {_MODES}, got {model_mode!r}")
        self.model = model
        self.model_mode = model_mode
        self._tails: dict = {}  # forward_masked's torch.fx split per layer module, or why it could not be built
        self._memory_format_ok: bool | None = None  # whether channels-last strides give the same outputs
        # True/False: channels-last/first inputs as given; None: read from the model for each batch of inputs
        self._given_last = None if data_format is None else check_data_format(data_format, "channels_first")
        conv = next((m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
        self._in_channels = None if conv is None else conv.in_channels  # of the first convolution: the layout

    @staticmethod
    def concrete(a) -> bool:
        """Whether ``a`` holds values (always, in eager PyTorch)."""
        return True

    @staticmethod
    def to_native(maps, inputs):
        """The core's result is already a tensor beside the inputs."""
        return maps

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

    def default_layer(self, inputs) -> str:
        """The last module (in execution order) whose output is a feature map: same rank as ``inputs`` and
        more than one spatial position. Costs one forward pass without gradients. A container whose output is
        its last child's is listed after that child, so e.g. an ``nn.Sequential`` itself can be picked."""
        self.check_inputs(inputs)
        seen: list[str] = []
        names = {m: n for n, m in self.model.named_modules() if n}

        def hook(module, args, out):
            if isinstance(out, torch.Tensor) and out.ndim == inputs.ndim and out.shape[2:].numel() > 1:
                seen.append(names[module])

        with self._session() as hooks, torch.no_grad():
            hooks.extend(m.register_forward_hook(hook) for m in names)
            self._forward(inputs)
        if not seen:
            raise ValueError("layer: no module of the model outputs a channels-first feature map of the "
                             "inputs' rank; name the layer to explain")
        return seen[-1]

    def layer_names(self) -> list[str]:
        return [n for n, _ in self.model.named_modules() if n]

    # ----------------------------------------------------------------------------------------- inputs
    def channels_last(self, inputs) -> bool:
        """Whether ``inputs`` are laid out ``(B, *S, C)``: ``data_format`` if given, else read from the model's
        first convolution (see the class docstring)."""
        if self._given_last is not None:
            return self._given_last
        return inputs.ndim >= 3 and inputs.shape[-1] == self._in_channels != inputs.shape[1]

    def check_inputs(self, inputs) -> None:
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"inputs: expected a torch.Tensor for a PyTorch model, got {type(inputs).__name__}")
        layout = "(B, *spatial, C)" if self.channels_last(inputs) else "(B, C, *spatial)"
        if not inputs.is_floating_point():
            raise TypeError(f"inputs: expected a floating-point tensor {layout}, got dtype {inputs.dtype}")
        if inputs.ndim < 2 or inputs.shape[0] == 0:
            raise ValueError(f"inputs: expected a non-empty batch {layout} with B >= 1, "
                             f"got shape {tuple(inputs.shape)}")

    def spatial_shape(self, inputs) -> tuple[int, ...]:
        """The inputs' spatial size ``S`` of ``(B, C, *S)`` or, channels-last, ``(B, *S, C)``."""
        return tuple(inputs.shape[1:-1] if self.channels_last(inputs) else inputs.shape[2:])

    def _forward(self, x):
        """``model(x)``; an error of the model's own comes back with the inputs' shape and a layout hint
        (:func:`camcore.backends.model_error`), the original as its ``__cause__``."""
        try:
            return self.model(x)
        except Exception as err:
            raise model_error(err, x.shape, self.channels_last(x)) from err

    # ------------------------------------------------------------------------------------ the session
    @contextlib.contextmanager
    def _session(self):
        """Set the model's mode for one call; remove hooks, restore flags, buffers and grad mode afterwards."""
        model = self.model
        flags = [(m, m.training) for m in model.modules()]
        grad_mode = torch.is_grad_enabled()
        hooks: list = []
        if self.model_mode == "eval":
            model.eval()
        # buffers can change even in eval mode (quantisation observers); they are small, so always restore them
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        try:
            yield hooks
        finally:
            for h in hooks:
                h.remove()
            for m, flag in flags:
                m.training = flag
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            torch.set_grad_enabled(grad_mode)

    # ---------------------------------------------------------------------------- the contract methods
    def activations_and_grads(self, inputs, layers, targets=None, *, gradients=True):
        """One forward pass; for each layer, its activations and ``d(sum_b y_b)/dA`` (``(B, C, *S)``).

        Args:
            inputs: ``(B, C, *S)`` float tensor on the model's device.
            layers: list of module paths or module objects.
            targets: as :func:`camcore.targets.check_targets` accepts.
            gradients: ``False`` skips the backward pass (``grads`` is then a list of ``None``).
        Returns:
            ``(outputs, activations, grads)``: the detached model outputs, and per layer the detached
            activations and gradients as the layer produced them (model dtype, model device). A layer called
            several times in one forward pass is taken at its last call.
        """
        self.check_inputs(inputs)
        if gradients and torch.is_inference_mode_enabled():
            raise RuntimeError("explain: gradient methods need autograd, which torch.inference_mode() switches off "
                               "for good; call camcore outside inference mode (torch.no_grad() is fine)")
        named = [self.resolve_layer(layer) for layer in layers]
        targets = check_targets(targets, inputs.shape[0])
        captured: dict[int, torch.Tensor] = {}

        def make_hook(i, name):
            def hook(module, args, out):
                if not isinstance(out, torch.Tensor):
                    raise camcore_error(TypeError(f"layer: {name!r} returns {type(out).__name__}, not a tensor; "
                                                  f"pick a layer whose output is one tensor"))
                if not gradients:
                    captured[i] = out.detach().clone()
                    return None
                if not out.requires_grad:  # first captured layer: the graph starts here
                    torch.set_grad_enabled(True)
                    out = out.detach().requires_grad_(True)
                captured[i] = out
                return out.clone()

            return hook

        with self._session() as hooks:
            hooks.extend(m.register_forward_hook(make_hook(i, n)) for i, (n, m) in enumerate(named))
            torch.set_grad_enabled(False)
            outputs = self._forward(inputs)
            missing = [n for i, (n, _) in enumerate(named) if i not in captured]
            if missing:
                raise ValueError(f"layer: {missing[0]!r} did not run during the forward pass of the inputs")
            acts = [captured[i] for i in range(len(named))]
            if not gradients:
                return _detach(outputs), acts, [None] * len(acts)
            torch.set_grad_enabled(True)
            scores, _ = target_scores(targets, outputs, inputs.shape[0])
            if not scores.requires_grad:
                raise ValueError(f"layer: the target scores do not depend on layer {named[0][0]!r}")
            grads = torch.autograd.grad(scores.sum(), acts, allow_unused=True)
            for (name, _), g in zip(named, grads):
                if g is None:
                    raise ValueError(f"layer: {name!r} does not influence the target scores (no gradient path "
                                     f"from the outputs to it); pick a layer the outputs depend on")
        return _detach(outputs), [a.detach() for a in acts], list(grads)

    def forward_masked(self, inputs, masks, *, at="input", targets=None, batch_size=32, probability=False,
                       progress=None, info=None):
        """Target scores of the model with masks multiplied into the inputs or into a layer's activations.

        Args:
            inputs: ``(B, C, *S)``, or ``(B, *S, C)`` for channels-last inputs.
            masks: ``(M, *shape)`` shared by all samples or ``(B, M, *shape)`` per sample, where ``shape``
                broadcasts against one channels-first sample at ``at`` (e.g. ``(1, H, W)`` spatial masks on the
                input, also for channels-last inputs, where they are moved to the inputs' layout here;
                ``(C, 1, 1)`` channel masks on a layer).
            at: ``"input"``, or a layer (name or module) whose output, at its last call, is multiplied by the mask.
            targets: as in :meth:`activations_and_grads`; ``None`` is each sample's top class unmasked.
            batch_size: masked copies run per forward pass; bounds peak memory.
            probability: score class targets by their softmax probability instead of their logit.
            progress: ``progress(n)`` is called after each forward pass with its number of masks.
            info: a dict that receives ``"path"``: ``"full"`` (whole model per chunk), or ``"tail"`` for layer
                masks (the layers before ``at`` run once per sample, see :mod:`camcore.backends.torch_tail`);
                and ``"reason"`` when the tail path could not be used (a ``RuntimeWarning`` says so too).
        Returns: ``(B, M)`` float32 scores, on the inputs' device.
        """
        self.check_inputs(inputs)
        check_batch_size(batch_size)
        b = inputs.shape[0]
        masks = torch.as_tensor(masks, device=inputs.device).to(inputs.dtype)
        targets = check_targets(targets, b)
        layer = None if at == "input" else self.resolve_layer(at)
        info = {} if info is None else info
        calls = [0, 0]  # calls of the layer in the current pass; in the unmasked pass
        current: dict[str, torch.Tensor] = {}
        probe: list[torch.Size] = []

        def hook(module, args, out):
            calls[0] += 1
            if "mask" not in current:  # the unmasked probe pass: learn the shape at `at`, count the calls
                probe.append(out.shape)
                return None
            return out * current["mask"] if calls[0] == calls[1] else None

        with self._session() as hooks, torch.no_grad():
            idx = None if callable(targets) else targets
            if layer is not None:
                hooks.append(layer[1].register_forward_hook(hook))
            if layer is not None or targets is None:  # shape at `at`, and the top classes
                plain = self._forward(inputs)
                idx = None if callable(targets) else class_indices(targets, plain).tolist()
                calls[1] = calls[0]
            if layer is not None and not probe:
                raise ValueError(f"at: layer {layer[0]!r} did not run during the forward pass of the inputs")
            last = layer is None and self.channels_last(inputs)  # input masks come channels-first
            at_shape = (b, inputs.shape[-1], *inputs.shape[1:-1]) if last else inputs.shape
            per_sample = check_masks(masks.shape, b, at_shape if layer is None else probe[-1], at)
            masks = torch.movedim(masks, 2 if per_sample else 1, -1) if last else masks
            checked = [layer is not None or not isinstance(targets, list)]  # else: range-check on first use

            def pick(i, out, m):
                if idx is None:
                    return target_scores(targets, out, m)[0].float()
                if not checked[0]:  # class indices given: range-check them against the first outputs
                    class_indices(idx, out)
                    checked[0] = True
                return class_scores(out, idx[i], probability=probability)

            def full(i, chunk):
                x = inputs[i : i + 1]
                if layer is None:
                    return pick(i, self._forward_fast(x * chunk), chunk.shape[0])
                current["mask"], calls[0] = chunk, 0
                return pick(i, self._forward(x.expand(chunk.shape[0], *x.shape[1:])), chunk.shape[0])

            score, info["path"] = full, "full"
            if layer is not None:
                tail = self._tail(layer, inputs, plain, info)
                if tail is not None:
                    score, info["path"] = (lambda i, chunk: pick(i, tail(i, inputs[i : i + 1], chunk),
                                                                 chunk.shape[0])), "tail"
            rows = masked_rows(masks, b, per_sample, batch_size, score, progress)
        return torch.stack([torch.cat(row) for row in rows]).float()

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

    def _tail(self, layer, inputs, plain, info):
        """The :class:`~camcore.backends.torch_tail.Tail` of the model after ``layer``, checked to reproduce the
        model's outputs for the first sample; ``None`` (with ``info["reason"]`` and a warning) when unusable."""
        name, module = layer
        try:
            tail = self._tails.get(module)
            if isinstance(tail, Exception):
                raise tail.with_traceback(None)  # not a traceback longer on every call
            if tail is None:
                try:
                    tail = self._tails[module] = Tail(self.model, module)
                except Exception as err:  # untraceable: remembered, the next call falls back at once
                    self._tails[module] = err
                    raise
            tail.reset()
            ones = torch.ones((1, *[1] * (inputs.ndim - 1)), dtype=inputs.dtype, device=inputs.device)
            if not _same_outputs(tail(0, inputs[:1], ones), plain, rows=1):
                raise RuntimeError("the traced graph does not reproduce the model's outputs")
            return tail
        except Exception as err:  # any failure of tracing or vmap: the full passes are always right
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            fell_back(info, f"only the layers after {name!r} (a torch.fx split)", reason, stacklevel=3)
            return None

    def traces(self) -> int:
        """How many graphs this adapter has built so far (``torch.fx`` splits for the tail path)."""
        return sum(1 for t in self._tails.values() if isinstance(t, Tail))

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
