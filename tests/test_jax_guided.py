"""``camcore.backends.jax_guided.guided_vjp``: guided backpropagation and deconvnet gradients by jaxpr rewriting.

Every expected gradient comes from a reference independent of the module: NumPy float64 forward and backward
passes of the same weights with the chain rule written out (dense and convolution layers, the rules' masks), a
hand-derived formula, or ``jax.grad`` where the plain gradient is expected.
"""
from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from camcore.backends.jax_guided import guided_vjp
from flax import nnx

jax.config.update("jax_enable_x64", False)

RULES = ["guided", "deconvnet"]
TOL = {"rtol": 1e-5, "atol": 1e-5}


# ------------------------------------------------------------------------------------------ NumPy references
def rule_backward(rule, g, z, hi=np.inf):
    """The cotangent a ReLU (``hi=inf``) or ReLU6 (``hi=6``) at input ``z`` passes back for output cotangent
    ``g``: guided ``max(g,0)*1[0<z<hi]``, deconvnet ``max(g,0)*1[z<hi]``, plain ``g*1[0<z<hi]``."""
    if rule == "plain":
        return g * ((z > 0) & (z < hi))
    g = np.maximum(g, 0) * (z < hi)
    return g * (z > 0) if rule == "guided" else g


def assert_clear_of_kinks(z, kinks):
    """The float32 and float64 passes put every unit on the same side of its kinks (0, 6)."""
    for k in kinks:
        assert np.abs(z - k).min() > 1e-3


def mlp_reference(p, x, targets, rule):
    """x -> dense -> relu -> dense -> relu6 -> dense -> sum of per-sample target logits, in float64."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x = np.asarray(x, np.float64)
    z1 = x @ p["w1"] + p["b1"]
    h1 = np.maximum(z1, 0)
    z2 = h1 @ p["w2"] + p["b2"]
    h2 = np.minimum(np.maximum(z2, 0), 6)
    logits = h2 @ p["w3"] + p["b3"]
    assert_clear_of_kinks(z1, [0])
    assert_clear_of_kinks(z2, [0, 6])
    assert ((z2 > 6).any() and (z2 < 0).any() and ((z2 > 0) & (z2 < 6)).any()), "every ReLU6 regime is exercised"
    value = logits[np.arange(len(x)), targets].sum()
    d_logits = np.eye(logits.shape[1])[targets]
    d_h2 = d_logits @ p["w3"].T
    d_z2 = rule_backward(rule, d_h2, z2, hi=6)
    d_h1 = d_z2 @ p["w2"].T
    d_z1 = rule_backward(rule, d_h1, z1)
    return value, d_z1 @ p["w1"].T


def im2col(xp, kh, kw):
    """Patches ``(B, Ho, Wo, kh*kw*C)`` of an NHWC array (stride 1, no padding), in (i, j, c) order."""
    h, w = xp.shape[1:3]
    ho, wo = h - kh + 1, w - kw + 1
    cols = [xp[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)]
    return np.concatenate(cols, axis=-1)


def col2im(d_cols, shape, kh, kw):
    """The transpose of :func:`im2col`: scatter-adds patch cotangents back onto the ``shape`` input."""
    out = np.zeros(shape)
    c = shape[-1]
    ho, wo = d_cols.shape[1:3]
    for n, (i, j) in enumerate((i, j) for i in range(kh) for j in range(kw)):
        out[:, i:i + ho, j:j + wo, :] += d_cols[..., n * c:(n + 1) * c]
    return out


def conv_reference(p, x, targets, rule):
    """x (NHWC) -> conv3x3 SAME -> relu -> conv3x3 VALID -> relu -> mean over H, W -> dense -> sum of target
    logits, in float64 (convolutions as im2col matmuls)."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x = np.asarray(x, np.float64)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    k1 = p["k1"].reshape(-1, p["k1"].shape[-1])  # HWIO -> (kh*kw*I, O), matching im2col's order
    k2 = p["k2"].reshape(-1, p["k2"].shape[-1])
    c1 = im2col(xp, 3, 3)
    z1 = c1 @ k1 + p["c1"]
    h1 = np.maximum(z1, 0)
    c2 = im2col(h1, 3, 3)
    z2 = c2 @ k2 + p["c2"]
    h2 = np.maximum(z2, 0)
    pooled = h2.mean(axis=(1, 2))
    logits = pooled @ p["w"] + p["b"]
    assert_clear_of_kinks(z1, [0])
    assert_clear_of_kinks(z2, [0])
    value = logits[np.arange(len(x)), targets].sum()
    d_pooled = np.eye(logits.shape[1])[targets] @ p["w"].T
    d_h2 = np.broadcast_to(d_pooled[:, None, None, :] / (h2.shape[1] * h2.shape[2]), h2.shape)
    d_z2 = rule_backward(rule, d_h2, z2)
    d_h1 = col2im(d_z2 @ k2.T, h1.shape, 3, 3)
    d_z1 = rule_backward(rule, d_h1, z1)
    d_xp = col2im(d_z1 @ k1.T, xp.shape, 3, 3)
    return value, d_xp[:, 1:-1, 1:-1, :]


# ----------------------------------------------------------------------------------------------- models
def mlp_params(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"w1": (5, 8), "b1": (8,), "w2": (8, 6), "b2": (6,), "w3": (6, 4), "b3": (4,)}
    scale = {"w1": 1.0, "b1": 0.5, "w2": 1.5, "b2": 1.0, "w3": 1.0, "b3": 0.5}
    return {k: (scale[k] * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}


X = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32) * 2
TARGETS = np.array([0, 3, 1, 2])


def picked(logits, targets):
    return jnp.sum(logits[jnp.arange(logits.shape[0]), targets])


RELUS = {
    "jax.nn.relu": jax.nn.relu,
    "jnp.maximum(z, 0)": lambda z: jnp.maximum(z, 0),
    "jnp.maximum(0., z)": lambda z: jnp.maximum(0.0, z),
    "jnp.maximum(z, zeros_like)": lambda z: jnp.maximum(z, jnp.zeros_like(z)),
    "jit(jax.nn.relu)": jax.jit(jax.nn.relu),
    "checkpoint(jax.nn.relu)": jax.checkpoint(jax.nn.relu),
}
RELU6S = {
    "jax.nn.relu6": jax.nn.relu6,
    "min(max(z, 0), 6)": lambda z: jnp.minimum(jnp.maximum(z, 0), 6),
    "jnp.clip(z, 0, 6)": lambda z: jnp.clip(z, 0, 6),
    "lax.clamp(0, z, 6)": lambda z: jax.lax.clamp(0.0, z, 6.0),
}


def mlp(p, x, relu=jax.nn.relu, relu6=jax.nn.relu6):
    h1 = relu(x @ p["w1"] + p["b1"])
    h2 = relu6(h1 @ p["w2"] + p["b2"])
    return h2 @ p["w3"] + p["b3"]


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(8)(x))
        x = nn.relu6(nn.Dense(6)(x))
        return nn.Dense(4)(x)


def linen_variables(p):
    return {"params": {f"Dense_{i}": {"kernel": jnp.asarray(p[f"w{i + 1}"]), "bias": jnp.asarray(p[f"b{i + 1}"])}
                       for i in range(3)}}


class NnxMLP(nnx.Module):
    def __init__(self, p):
        def linear(i, n_in, n_out):
            layer = nnx.Linear(n_in, n_out, rngs=nnx.Rngs(0))
            layer.kernel[...] = jnp.asarray(p[f"w{i}"])
            layer.bias[...] = jnp.asarray(p[f"b{i}"])
            return layer

        self.l1, self.l2, self.l3 = linear(1, 5, 8), linear(2, 8, 6), linear(3, 6, 4)

    def __call__(self, x):
        return self.l3(nnx.relu6(self.l2(nnx.relu(self.l1(x)))))


def conv_params(seed=2):
    rng = np.random.default_rng(seed)
    shapes = {"k1": (3, 3, 2, 4), "c1": (4,), "k2": (3, 3, 4, 3), "c2": (3,), "w": (3, 5), "b": (5,)}
    return {k: (0.7 * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}


def convnet(p, x):
    def conv(x, k, padding):
        return jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    h = jax.nn.relu(conv(x, p["k1"], "SAME") + p["c1"])
    h = jnp.maximum(conv(h, p["k2"], "VALID") + p["c2"], 0)
    return h.mean(axis=(1, 2)) @ p["w"] + p["b"]


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("relu", list(RELUS))
def test_mlp_matches_numpy_for_every_relu_spelling(rule, relu):
    p = mlp_params()
    value, grad, units = guided_vjp(lambda x: picked(mlp(p, x, relu=RELUS[relu]), TARGETS), jnp.asarray(X), rule)
    ref_value, ref_grad = mlp_reference(p, X, TARGETS, rule)
    assert units == 2
    assert grad.shape == X.shape and grad.dtype == jnp.float32
    np.testing.assert_allclose(value, ref_value, **TOL)
    np.testing.assert_allclose(grad, ref_grad, **TOL)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("relu6", list(RELU6S))
def test_relu6_composition_for_every_spelling(rule, relu6):
    """guided ReLU6 = max(g,0)*1[0<x<6], deconvnet ReLU6 = max(g,0)*1[x<6] (the plain min keeps 1[x<6])."""
    p = mlp_params()
    _, grad, units = guided_vjp(lambda x: picked(mlp(p, x, relu6=RELU6S[relu6]), TARGETS), jnp.asarray(X), rule)
    assert units == 2
    np.testing.assert_allclose(grad, mlp_reference(p, X, TARGETS, rule)[1], **TOL)


def test_relu6_rules_elementwise():
    """The two rules on one ReLU6 layer, element by element: every sign of g and every regime of x."""
    x = jnp.array([-2.0, -0.5, 0.5, 3.0, 7.0, 9.0, 1.0, -1.0])
    w = jnp.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, -2.0, 2.0])  # g = w
    expected = {"guided": [0, 0, 1, 0, 0, 0, 0, 0], "deconvnet": [1, 0, 1, 0, 0, 0, 0, 2]}
    for spelling in RELU6S.values():
        for rule, want in expected.items():
            _, grad, units = guided_vjp(lambda x, f=spelling: f(x) * w, x, rule)
            assert units == 1
            np.testing.assert_array_equal(grad, want)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_flax_modules(rule, kind):
    p = mlp_params()
    if kind == "linen":
        module, variables = LinenMLP(), linen_variables(p)
        model = lambda x: module.apply(variables, x)  # noqa: E731
    else:
        model = NnxMLP(p)
    value, grad, units = guided_vjp(lambda x: picked(model(x), TARGETS), jnp.asarray(X), rule)
    ref_value, ref_grad = mlp_reference(p, X, TARGETS, rule)
    assert units == 2
    np.testing.assert_allclose(value, ref_value, **TOL)
    np.testing.assert_allclose(grad, ref_grad, **TOL)


@pytest.mark.parametrize("rule", RULES)
def test_convnet_batch_of_three_with_different_targets(rule):
    p = conv_params()
    x = np.random.default_rng(3).normal(size=(3, 6, 6, 2)).astype(np.float32)
    targets = np.array([0, 3, 1])
    value, grad, units = guided_vjp(lambda x: picked(convnet(p, x), targets), jnp.asarray(x), rule)
    ref_value, ref_grad = conv_reference(p, x, targets, rule)
    assert units == 2
    assert grad.shape == x.shape
    np.testing.assert_allclose(value, ref_value, **TOL)
    np.testing.assert_allclose(grad, ref_grad, **TOL)
    # the rules differ from each other and from the plain gradient, which the reference also gives
    np.testing.assert_allclose(jax.grad(lambda x: picked(convnet(p, x), targets))(jnp.asarray(x)),
                               conv_reference(p, x, targets, "plain")[1], **TOL)
    assert np.abs(ref_grad - conv_reference(p, x, targets, "plain")[1]).max() > 1e-3


def test_the_rules_differ_from_each_other_and_from_plain():
    p = mlp_params()
    refs = {r: mlp_reference(p, X, TARGETS, r)[1] for r in ["guided", "deconvnet", "plain"]}
    np.testing.assert_allclose(jax.grad(lambda x: picked(mlp(p, x), TARGETS))(jnp.asarray(X)), refs["plain"], **TOL)
    for a, b in [("guided", "deconvnet"), ("guided", "plain"), ("deconvnet", "plain")]:
        assert np.abs(refs[a] - refs[b]).max() > 1e-3


@pytest.mark.parametrize("rule", RULES)
def test_no_relu_model_gives_the_plain_gradient(rule):
    p = mlp_params()

    def gelu_mlp(x):
        return picked(mlp(p, x, relu=jax.nn.gelu, relu6=jax.nn.silu), TARGETS)

    value, grad, units = guided_vjp(gelu_mlp, jnp.asarray(X), rule)
    assert units == 0
    np.testing.assert_allclose(value, gelu_mlp(jnp.asarray(X)), rtol=1e-6)
    np.testing.assert_allclose(grad, jax.grad(gelu_mlp)(jnp.asarray(X)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rule", RULES)
def test_leaky_relu_keeps_its_plain_gradient(rule):
    x = jnp.array([-2.0, -0.5, 0.5, 3.0])
    w = jnp.array([1.0, -1.0, -1.0, 2.0])
    _, grad, units = guided_vjp(lambda x: jax.nn.leaky_relu(x, 0.1) * w, x, rule)
    assert units == 0
    np.testing.assert_allclose(grad, [0.1, -0.1, -1.0, 2.0], rtol=1e-6)  # w * (1 if x >= 0 else 0.1)


@pytest.mark.parametrize("rule", RULES)
def test_under_jit_matches_eager(rule):
    p = mlp_params()
    x = jnp.asarray(X)
    eager = guided_vjp(lambda x: picked(mlp(p, x), TARGETS), x, rule)
    jitted = jax.jit(lambda x: guided_vjp(lambda x: picked(mlp(p, x), TARGETS), x, rule))(x)
    # the weights as traced arguments too: the jaxpr's constants are then tracers of the outer jit
    with_params = jax.jit(lambda p, x: guided_vjp(lambda x: picked(mlp(p, x), TARGETS), x, rule)[1])(p, x)
    assert int(jitted[2]) == eager[2] == 2
    np.testing.assert_allclose(jitted[0], eager[0], **TOL)
    np.testing.assert_allclose(jitted[1], eager[1], **TOL)
    np.testing.assert_allclose(with_params, eager[1], **TOL)
    np.testing.assert_allclose(jitted[1], mlp_reference(p, X, TARGETS, rule)[1], **TOL)


def test_array_valued_fn_uses_the_gradient_of_its_sum():
    x = jnp.array([[-1.0, 2.0], [3.0, -4.0]])
    value, grad, units = guided_vjp(lambda x: -jax.nn.relu(x) + 2 * jax.nn.relu(x), x, "deconvnet")
    assert units == 2 and value.shape == x.shape
    np.testing.assert_allclose(value, [[0.0, 2.0], [3.0, 0.0]])
    np.testing.assert_allclose(grad, [[2.0, 2.0], [2.0, 2.0]])  # max(-1, 0) + max(2, 0) per unit


def test_custom_vjp_without_a_unit_keeps_its_rule_and_with_one_is_rewritten():
    x = jnp.array([-1.0, 2.0])

    @jax.custom_vjp
    def sin100(x):
        return jnp.sin(x)

    sin100.defvjp(lambda x: (sin100(x), None), lambda _, g: (100 * g,))

    @jax.custom_vjp
    def relu100(x):
        return jax.nn.relu(x)

    relu100.defvjp(lambda x: (relu100(x), None), lambda _, g: (100 * g,))
    _, grad, units = guided_vjp(lambda x: sin100(x), x, "guided")
    assert units == 0
    np.testing.assert_allclose(grad, [100.0, 100.0])
    _, grad, units = guided_vjp(lambda x: -relu100(x), x, "deconvnet")
    assert units == 1
    np.testing.assert_allclose(grad, [0.0, 0.0])  # max(-1, 0): the unit's rule replaced the custom one


def test_relu_inside_scan_keeps_its_plain_gradient_with_a_warning():
    x = jnp.array([-1.0, 2.0, 3.0])

    def scanned(x):
        return jax.lax.scan(lambda c, a: (c, -jax.nn.relu(a)), 0.0, x)[1]

    with pytest.warns(RuntimeWarning, match="plain gradients.*1 in scan"):
        _, grad, units = guided_vjp(scanned, x, "deconvnet")
    assert units == 0
    np.testing.assert_allclose(grad, [0.0, -1.0, -1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guided_vjp(lambda x: jax.lax.scan(lambda c, a: (c, jnp.sin(a)), 0.0, x)[1], x, "guided")


@pytest.mark.parametrize("bad", ["Guided", "plain", None])
def test_bad_rule(bad):
    with pytest.raises(ValueError, match=r"rule must be one of 'guided', 'deconvnet'; got") as err:
        guided_vjp(jnp.sin, jnp.ones(2), bad)
    assert repr(bad) in str(err.value)
