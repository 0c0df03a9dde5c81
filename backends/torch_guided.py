"""Guided backpropagation and deconvnet on PyTorch, for ReLUs however the model calls them.

Within :class:`GuidedMode` (a ``TorchFunctionMode``), every ReLU-like unit the model runs -- ``nn.ReLU`` and
``nn.ReLU6`` modules, ``F.relu``/``F.relu6``/``F.hardtanh(x, 0, hi)``, ``torch.relu``, ``x.relu()``, their in-place
forms, and ``clamp``/``clamp_min``/``clip`` with a lower bound of 0 -- computes its usual value, and its backward,
for an incoming gradient ``g`` at input ``x`` of a unit ``y = clamp(x, 0, hi)`` (``hi = inf`` for ReLU), is

    guided (Springenberg et al. 2015):   g_in = max(g, 0) * 1[0 < x < hi]
    deconvnet (Zeiler & Fergus 2014):    g_in = max(g, 0) * 1[x < hi]

Leaky ReLU, PReLU, ELU, GELU and SiLU are not ReLU-like (their negative side passes signal): they keep their plain
gradient. Not covered: a ReLU written as ``torch.maximum(x, zeros)`` or ``x * (x > 0)``, and code that runs
outside Python's torch function dispatch (TorchScript, compiled graphs).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["GuidedMode", "RULES"]

RULES = ("guided", "deconvnet")


class _Unit(torch.autograd.Function):
    """``y = clamp(x, 0, hi)`` with the backward of ``rule``; saves the backward's mask, not ``x`` (so an in-place
    unit can write ``y`` into ``x``)."""

    @staticmethod
    def forward(ctx, x, hi: float, rule: str):
        below = x < hi
        ctx.save_for_backward(below & (x > 0) if rule == "guided" else below)
        return x.clamp(0, hi) if math.isfinite(hi) else x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return g.clamp(min=0) * mask, None, None


def _bound(value) -> float | None:
    """A Python number bound, or ``None`` for a tensor bound (not a unit camcore rewrites)."""
    if value is None:
        return math.inf
    return float(value) if isinstance(value, (int, float)) else None


def _unit(func, args, kwargs):
    """``(x, hi, inplace)`` when ``func(*args, **kwargs)`` is a ReLU-like unit, else ``None``."""
    if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
        return None
    x, rest = args[0], args[1:]
    if func in _RELU:
        return x, math.inf, func in _INPLACE or bool(kwargs.get("inplace", rest[0] if rest else False))
    if func in _RELU6:
        return x, 6.0, bool(kwargs.get("inplace", rest[0] if rest else False))
    if func in _HARDTANH:
        lo, hi, inplace = (list(rest) + [-1.0, 1.0, False][len(rest):])[:3]
        lo, hi = kwargs.get("min_val", lo), kwargs.get("max_val", hi)
        inplace = func is F.hardtanh_ or bool(kwargs.get("inplace", inplace))
        return (x, float(hi), inplace) if lo == 0 and _bound(hi) is not None else None
    if func in _CLAMP:
        lo = kwargs.get("min", rest[0] if rest else None)
        hi = None if func in _CLAMP_MIN else kwargs.get("max", rest[1] if len(rest) > 1 else None)
        if isinstance(lo, (int, float)) and lo == 0 and _bound(hi) is not None:
            return x, _bound(hi), func in _CLAMP_INPLACE
    return None


_RELU = {torch.relu, torch.relu_, F.relu, F.relu_, torch.Tensor.relu, torch.Tensor.relu_}
_INPLACE = {torch.relu_, F.relu_, torch.Tensor.relu_}
_RELU6 = {F.relu6}
_HARDTANH = {F.hardtanh, F.hardtanh_}
_CLAMP_MIN = {torch.clamp_min, torch.Tensor.clamp_min, torch.clamp_min_, torch.Tensor.clamp_min_}
_CLAMP_INPLACE = {torch.clamp_, torch.Tensor.clamp_, torch.clip_, torch.Tensor.clip_, torch.clamp_min_,
                  torch.Tensor.clamp_min_}
_CLAMP = {torch.clamp, torch.Tensor.clamp, torch.clip, torch.Tensor.clip} | _CLAMP_MIN | _CLAMP_INPLACE


class GuidedMode(TorchFunctionMode):
    """Inside the block, ReLU-like units backpropagate by ``rule`` (``"guided"`` or ``"deconvnet"``);
    ``units`` counts the unit calls rewritten. Take the gradient after leaving the block (the backward's own
    clamps must not be rewritten)."""

    def __init__(self, rule: str):
        if rule not in RULES:
            raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
        super().__init__()
        self.rule, self.units = rule, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        unit = _unit(func, args, kwargs)
        if unit is None:
            return func(*args, **kwargs)
        x, hi, inplace = unit
        self.units += 1
        y = _Unit.apply(x, hi, self.rule)
        return x.copy_(y) if inplace else y
