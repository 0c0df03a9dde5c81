"""Guided-backpropagation and deconvnet ReLUs for Keras 3 on the TensorFlow backend.

Inside ``with guided_relus(rule)`` every ReLU-like unit ``y = f(x)`` that runs eagerly keeps its forward value,
and for the incoming gradient ``g`` sends back ``g_in`` by ``rule`` (guided: Springenberg et al. 2015; deconvnet:
Zeiler & Fergus 2014)::

    unit                                          g_in by "guided"                g_in by "deconvnet"
    ReLU         y = max(x, 0)                    max(g, 0) * 1[x > 0]            max(g, 0)
    clamp        y = min(max(x, 0), hi)           max(g, 0) * 1[0 < x < hi]       max(g, 0) * 1[x < hi]
    (ReLU6: hi = 6; Keras ``max_value``)
    thresholded  y = min(x * 1[x > t], hi)        max(g, 0) * 1[t < x < hi]       max(g, 0) * 1[x < hi]
    (Keras ``threshold`` t; hi = +inf without ``max_value``)

Leaky ReLU (any non-zero ``negative_slope``), PReLU, ELU, GELU, SiLU/swish and hard-sigmoid/hard-swish are not
ReLU-like: their gradient stays plain and they are not counted.

Patched for the duration of the block (the original objects are put back in ``finally``):

- ``tf.nn.relu`` and ``tf.nn.relu6`` on the ``tf.nn`` module. Keras' TensorFlow backend looks them up there at call
  time (``keras.src.backend.tensorflow.nn.relu(x)`` is ``tf.nn.relu(x)``), which catches ``tf.nn.relu`` called
  directly, ``keras.ops.relu`` / ``keras.ops.relu6``, and ``Activation("relu6")`` / ``keras.activations.relu6``
  (through ``ops.relu6``).
- ``ReLU.static_call`` of ``keras.src.activations.activations``, looked up on the class at call time by
  ``keras.activations.relu`` -- the function object that ``Dense``/``Conv2D(activation="relu")`` and
  ``Activation("relu")`` captured at construction -- and so by ``keras.layers.ReLU``. It is patched as well
  because its ``negative_slope``, ``max_value`` and ``threshold`` never reach ``tf.nn.relu``: a leaky call runs
  as is with its inner ``tf.nn.relu(-x)`` left plain; any other call is one unit with ``t = threshold`` and
  ``hi = max_value``.
- Keras functions built from ReLUs but not ReLU-like run with their inner ReLUs plain: the TensorFlow backend's
  ``hard_sigmoid`` (``relu6(x + 3) / 6``, also behind ``hard_silu``/``hard_swish``) and ``PReLU.call``
  (``relu(x) - alpha * relu(-x)``).

Not covered: graph mode -- a ``tf.function`` (``model.predict``, ``jit_compile``, a traced ``train_step``) traced
before the block or inside it runs plain ReLUs (traces made inside are left plain, so no guided gradient outlives
the block) and is not counted; a ``relu`` bound to another name before the block (``from tensorflow.nn import
relu``), ``tf.compat.v1.nn.relu``, ``tf.raw_ops.Relu``; ``tf.keras.backend.relu``
(``keras.src.legacy.backend.relu``) reaches ``tf.nn.relu`` but its leaky and threshold variants are not told
apart; a ReLU layer used as a gate (MobileNetV3's squeeze-excite ``hard_sigmoid`` is ``layers.ReLU(6.0)(x + 3) /
6``) is guided like any ReLU6; other Keras backends. The patch is process-wide: other threads running Keras
during the block are guided too.
"""
from __future__ import annotations

import contextlib
import functools

import keras
import tensorflow as tf
from keras.src.activations.activations import ReLU as _KerasReLU
from keras.src.backend.tensorflow import nn as _keras_tf_nn
from keras.src.layers.activations.prelu import PReLU as _PReLU

__all__ = ["RULES", "GuidedUnits", "guided_relus"]

RULES = ("guided", "deconvnet")

# Keras functions that are not ReLU-like but are built from ReLUs; they run with their inner ReLUs plain:
# hard_sigmoid is relu6(x + 3) / 6 (and hard_silu = x * hard_sigmoid(x)); PReLU is relu(x) - alpha * relu(-x).
_PLAIN_REGIONS = [(_keras_tf_nn, "hard_sigmoid"), (_PReLU, "call")]


class GuidedUnits:
    """What ``guided_relus`` yields: ``units`` counts the unit calls whose backward was replaced by ``rule``."""

    def __init__(self, rule: str):
        self.rule = rule
        self.units = 0

    def __repr__(self):
        return f"GuidedUnits(rule={self.rule!r}, units={self.units})"


def _guided_unit(forward, x, rule, t, hi):
    """``forward(x)``, sending back ``g_in = max(g, 0) * 1[x > t] * 1[x < hi]`` ("guided") or
    ``max(g, 0) * 1[x < hi]`` ("deconvnet"); ``hi=None`` drops the ``1[x < hi]`` factor."""

    @tf.custom_gradient
    def unit(x):
        keep = x > t if rule == "guided" else tf.ones_like(x, dtype=tf.bool)
        if hi is not None:
            keep = keep & (x < tf.cast(hi, x.dtype))

        def grad(g):
            return tf.where(keep & (g > 0), g, tf.zeros_like(g))

        return forward(x), grad

    return unit(x)


@contextlib.contextmanager
def guided_relus(rule: str):
    """Within the block, every ReLU-like unit that Keras 3 (TensorFlow backend) runs eagerly computes its usual
    forward value but its backward by `rule`; yields a counter object whose `.units` is how many unit calls were
    guided. Everything is restored in `finally`, also when the block raises.

    ``rule`` is ``"guided"`` or ``"deconvnet"``; the rules, what is patched and what is not covered are in the
    module docstring.
    """
    if rule not in RULES:
        raise ValueError(f"guided_relus: rule must be one of {RULES}, got rule={rule!r}")
    seen = GuidedUnits(rule)
    relu, relu6, static_call = tf.nn.relu, tf.nn.relu6, _KerasReLU.static_call
    plain = False  # True while an original runs on behalf of a unit or a plain region: its inner ReLUs stay plain

    def run_plain(fn, *args, **kwargs):
        nonlocal plain
        plain, was = True, plain
        try:
            return fn(*args, **kwargs)
        finally:
            plain = was

    def guide(fn, x, t, hi):
        seen.units += 1
        return _guided_unit(lambda v: run_plain(fn, v), x, rule, t, hi)

    def active():
        return not plain and tf.executing_eagerly()

    def guided_relu(features, name=None):
        if not active():
            return relu(features, name=name)
        return guide(lambda v: relu(v, name=name), tf.convert_to_tensor(features), 0.0, None)

    def guided_relu6(features, name=None):
        if not active():
            return relu6(features, name=name)
        return guide(lambda v: relu6(v, name=name), tf.convert_to_tensor(features), 0.0, 6.0)

    def guided_static_call(x, negative_slope=0.0, max_value=None, threshold=0.0):
        def original(v):
            return static_call(v, negative_slope=negative_slope, max_value=max_value, threshold=threshold)

        if not active():
            return original(x)
        if negative_slope != 0.0:
            return run_plain(original, x)
        return guide(original, keras.ops.convert_to_tensor(x), threshold, max_value)

    def plain_region(fn):
        return functools.wraps(fn)(lambda *args, **kwargs: run_plain(fn, *args, **kwargs))

    patches = [(tf.nn, "relu", guided_relu), (tf.nn, "relu6", guided_relu6),
               (_KerasReLU, "static_call", staticmethod(guided_static_call))]
    patches += [(owner, name, plain_region(getattr(owner, name))) for owner, name in _PLAIN_REGIONS]
    saved = [(owner, name, vars(owner)[name]) for owner, name, _ in patches]
    try:
        for owner, name, new in patches:
            setattr(owner, name, new)
        yield seen
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
