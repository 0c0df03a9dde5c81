"""Guided backpropagation and deconvnet gradients of any JAX function, by rewriting its ReLU units in the jaxpr.

``guided_vjp(fn, x, rule)`` traces ``fn`` at ``x`` with :func:`jax.make_jaxpr` and evaluates the jaxpr again with an
interpreter under :func:`jax.vjp`. Every equation binds as it is, except the **ReLU units**, which are computed by
:func:`jax.custom_vjp` functions with the same forward value and the backward of ``rule`` (``g`` the cotangent of
the unit's output ``y``, ``g_in`` the one it passes to its input ``x``):

- a ReLU ``y = max(x, 0)``: the ``max`` primitive with one operand all zeros (either order), which is what
  ``jax.nn.relu``, ``flax.linen.relu``, ``flax.nnx.relu``, ``jnp.maximum(x, 0)`` and ``jnp.clip(x, 0, hi)`` lower to:

  - guided (Springenberg et al. 2015):  ``g_in = max(g, 0) * 1[x > 0]``
  - deconvnet (Zeiler & Fergus 2014):   ``g_in = max(g, 0)``

- a clamp ``y = clamp(0, x, hi)`` (``lax.clamp`` with a lower bound all zeros):

  - guided:     ``g_in = max(g, 0) * 1[0 < x < hi]``
  - deconvnet:  ``g_in = max(g, 0) * 1[x < hi]``

  which is what the composition gives for ReLU6 ``min(max(x, 0), 6)`` (``jax.nn.relu6``), whose ``min`` keeps its
  plain gradient ``1[x < 6]``.

An operand is "all zeros" when it is a literal or a constant of the jaxpr equal to zero, or comes from one through
``convert_element_type``, ``broadcast_in_dim``, ``reshape``, ``squeeze``, ``transpose`` or ``copy``, also across the
sub-jaxprs the interpreter enters (on jax 0.10 ``jnp.clip(x, 0, 6)`` is ``min(max(x, convert(0)), convert(6))`` in a
``jit``, not a ``clamp``). Only floating-point units count. Leaky ReLU (a ``select_n``), PReLU, GELU, SiLU and ELU are
no ReLU units and keep their plain gradients.

The interpreter enters the sub-jaxprs of ``jit``, ``closed_call``, ``call`` and ``remat2`` (``jax.checkpoint``),
inlined; and of ``custom_jvp_call`` and ``custom_vjp_call`` when they hold a unit (their custom rule is dropped: the
unit's rule replaces it); one without a unit binds as it is, custom rule included. Every other primitive with
sub-jaxprs (``scan``, ``while``, ``cond``, ...) binds as it is, and a :class:`RuntimeWarning` tells how many units
inside keep their plain gradients.
"""
from __future__ import annotations

import warnings
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

__all__ = ["RULES", "guided_vjp"]

RULES = ("guided", "deconvnet")
# the primitives whose sub-jaxpr (the parameter named) is entered, under their names in jax 0.10 ("jit" was "pjit",
# "remat2" is jax.checkpoint's)
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "call": "call_jaxpr", "remat2": "jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr"}
_CUSTOM = {"custom_jvp_call", "custom_vjp_call"}  # entered only when they hold a unit
# single-operand primitives whose output is all zeros when their operand is
_ZERO_KEEPING = {"convert_element_type", "broadcast_in_dim", "reshape", "squeeze", "transpose", "copy"}


def _make_units(guided: bool):
    """The ReLU and clamp units of one rule, as ``jax.custom_vjp`` functions."""

    def rectify(g, x):
        """``max(g, 0) * 1[x > 0]`` (guided) or ``max(g, 0)`` (deconvnet)."""
        g = jnp.maximum(g, 0)
        return jnp.where(x > 0, g, 0) if guided else g

    @jax.custom_vjp
    def relu(x):
        return jnp.maximum(x, 0)

    relu.defvjp(lambda x: (relu(x), x), lambda x, g: (rectify(g, x),))

    @jax.custom_vjp
    def clamp(lo, x, hi):
        return jax.lax.clamp(lo, x, hi)

    def clamp_bwd(res, g):
        lo, x, hi = res
        g_hi = jnp.where(x > hi, g, 0)  # the upper bound keeps its plain gradient; the lower one is a constant
        return jnp.zeros_like(lo), jnp.where(x < hi, rectify(g, x), 0), g_hi if jnp.ndim(hi) else g_hi.sum()

    clamp.defvjp(lambda lo, x, hi: (clamp(lo, x, hi), (lo, x, hi)), clamp_bwd)
    return relu, clamp


_UNITS = {"guided": _make_units(True), "deconvnet": _make_units(False)}


def _open(jaxpr) -> Jaxpr:
    """The ``Jaxpr`` of a ``ClosedJaxpr`` or ``Jaxpr``."""
    return jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr


def _subjaxprs(params):
    """The ``ClosedJaxpr`` and ``Jaxpr`` values in an equation's parameters, also inside tuples (``cond``)."""
    for value in params.values():
        yield from (v for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, (ClosedJaxpr, Jaxpr)))


def _zero_value(value) -> bool:
    """Whether a concrete value is all zeros (a tracer never is)."""
    return not isinstance(value, jax.core.Tracer) and not np.any(np.asarray(value))


class _Rewriter:
    """Evaluates jaxprs with the ReLU units of ``rule`` rewritten; counts them (``units``) and the units left with
    their plain gradients inside primitives it does not enter (``plain``, by primitive name)."""

    def __init__(self, rule: str):
        self.rule = rule
        self.relu, self.clamp = _UNITS[rule]
        self.units = 0
        self.plain: Counter[str] = Counter()

    def run(self, jaxpr, args, zeros):
        """The outputs of ``jaxpr`` (a ``ClosedJaxpr`` or an open ``Jaxpr``) at ``args``, and which are all zeros;
        ``zeros[i]`` says whether ``args[i]`` is."""
        consts = jaxpr.consts if isinstance(jaxpr, ClosedJaxpr) else ()
        jaxpr = _open(jaxpr)
        env = dict(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        zero = {v for v, z in zip(jaxpr.invars, zeros) if z}
        constvars = set(jaxpr.constvars)

        def read(v):
            return v.val if isinstance(v, Literal) else env[v]

        def is_zero(v):  # constants are looked at only when asked: they may be large
            return (_zero_value(v.val) if isinstance(v, Literal)
                    else v in zero or (v in constvars and _zero_value(env[v])))

        for eqn in jaxpr.eqns:
            outs, out_zeros = self._eqn(eqn, [read(v) for v in eqn.invars], [is_zero(v) for v in eqn.invars])
            env.update(zip(eqn.outvars, outs))
            zero.update(v for v, z in zip(eqn.outvars, out_zeros) if z)
        return [read(v) for v in jaxpr.outvars], [is_zero(v) for v in jaxpr.outvars]

    def probe(self, jaxpr, zeros) -> _Rewriter:
        """A rewriter that has evaluated ``jaxpr`` abstractly (its counts, no computation)."""
        probe = _Rewriter(self.rule)
        jax.eval_shape(lambda *args: probe.run(jaxpr, args, zeros)[0],
                       *(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in _open(jaxpr).invars))
        return probe

    def _eqn(self, eqn, invals, zeros):
        """The outputs of one equation, and which are all zeros."""
        name = eqn.primitive.name
        if name in ("max", "clamp") and jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.floating):
            if name == "max" and zeros.count(True) == 1:
                self.units += 1
                unit = self.relu(invals[zeros.index(False)])
                return [jnp.broadcast_to(unit, eqn.outvars[0].aval.shape)], [False]
            if name == "clamp" and zeros[0] and not zeros[1]:
                self.units += 1
                return [self.clamp(*invals)], [False]
        if name in _CALLS:
            sub = eqn.params[_CALLS[name]]
            probe = self.probe(sub, zeros) if name in _CUSTOM else None
            if probe is None or probe.units:
                return self.run(sub, invals, zeros)
            self.plain.update(probe.plain)
        else:
            for sub in _subjaxprs(eqn.params):
                probe = self.probe(sub, [False] * len(_open(sub).invars))
                if left := probe.units + probe.plain.total():
                    self.plain[name] += left
        with eqn.ctx.manager:
            outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
        outs = outs if eqn.primitive.multiple_results else [outs]
        return outs, [name in _ZERO_KEEPING and zeros[0]] * len(outs)


def guided_vjp(fn, x, rule: str, *, has_aux: bool = False):
    """Guided-backpropagation or deconvnet gradient of ``jnp.sum(fn(x))`` with respect to ``x``.

    Returns ``(value, grad, units)``: ``value = fn(x)`` (a scalar or any array; with ``has_aux``, ``fn`` returns
    ``(value, aux)`` and ``value`` is that pair, ``aux`` taking no gradient); ``grad``, of the shape and dtype
    of ``x``, the gradient of ``jnp.sum(value)`` with the backward of every ReLU unit replaced by ``rule``
    (``g`` the cotangent of the unit's output, ``g_in`` the one it passes to its input ``x``):

    - ``"guided"``:     ``g_in = max(g, 0) * 1[x > 0]``; through ReLU6 ``max(g, 0) * 1[0 < x < 6]``
    - ``"deconvnet"``:  ``g_in = max(g, 0)``; through ReLU6 ``max(g, 0) * 1[x < 6]``

    and every other operation's plain; ``units``, how many ReLU units (jaxpr equations) were rewritten. Works on
    a tracer ``x`` too (inside ``jax.jit``). Warns (``RuntimeWarning``) when units inside ``scan``, ``while``,
    ``cond`` or other control flow keep their plain gradients.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(map(repr, RULES))}; got {rule!r}")
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(x)
    rewriter = _Rewriter(rule)
    treedef = jax.tree.structure(shape)

    def run(x):
        out = treedef.unflatten(rewriter.run(closed, [x], [False])[0])
        return out if has_aux else (out, None)

    value, vjp, aux = jax.vjp(run, x, has_aux=True)
    (grad,) = vjp(jax.tree.map(jnp.ones_like, value))
    if rewriter.plain:
        where = ", ".join(f"{n} in {name}" for name, n in rewriter.plain.items())
        warnings.warn(f"guided_vjp: ReLU units inside control flow keep their plain gradients ({where}): control "
                      f"flow is bound as it is, not rewritten", RuntimeWarning, stacklevel=2)
    return ((value, aux) if has_aux else value), grad, rewriter.units
