"""``camcore.backends.keras_guided.guided_relus`` on real Keras 3 models (TensorFlow backend).

Expected gradients come from a NumPy float64 forward and backward written out by the chain rule (the guided and
deconvnet rules applied by hand at each unit), or from a second formulation of the same network; "plain" means a
``tf.GradientTape`` outside any ``guided_relus`` block.
"""
from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from keras.src.activations.activations import ReLU as KerasReLUOp  # noqa: E402
from keras.src.backend.tensorflow import nn as keras_tf_nn  # noqa: E402

from camcore.backends.keras_guided import guided_relus  # noqa: E402

L = keras.layers
RULES = ["guided", "deconvnet"]
TARGETS = np.array([0, 2, 1])  # a different target logit per sample


# ------------------------------------------------------------------------------------------------ reference
def unit_backward(rule, z, g, t=0.0, hi=None):
    """One ReLU-like unit by hand: plain derivative, or the guided / deconvnet rule, of y = clamp(z*1[z>t], hi)."""
    below_hi = np.ones_like(z, dtype=bool) if hi is None else z < hi
    if rule == "plain":
        return g * ((z > t) & below_hi)
    if rule == "guided":
        return np.maximum(g, 0) * ((z > t) & below_hi)
    assert rule == "deconvnet"
    return np.maximum(g, 0) * below_hi


def unit_forward(z, t=0.0, hi=None):
    y = np.where(z > t, z, 0.0)
    return y if hi is None else np.minimum(y, hi)


def mlp_reference(w, x, rule, hi2=6.0):
    """d/dx sum_b logits[b, TARGETS[b]] of x -> Dense -> relu -> Dense -> clamp(0, hi2) -> Dense(3), float64."""
    (w1, b1), (w2, b2), (w3, _) = [(np.float64(a), np.float64(b)) for a, b in w]
    x = np.float64(x)
    z1 = x @ w1 + b1
    h1 = unit_forward(z1)
    z2 = h1 @ w2 + b2
    g_logits = np.eye(3)[TARGETS]  # d score / d logits; logits = clamp(z2) @ w3 + b3, so d logits / d h2 = w3
    g_h2 = g_logits @ w3.T
    g_z2 = unit_backward(rule, z2, g_h2, hi=hi2)
    g_h1 = g_z2 @ w2.T
    g_z1 = unit_backward(rule, z1, g_h1)
    return g_z1 @ w1.T, (z1, z2, g_h2, g_h1)


def guided_grad(model, x, rule):
    """The gradient of the summed target logits under ``guided_relus(rule)``, and the unit count."""
    x = tf.constant(x)
    with guided_relus(rule) as seen, tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x, training=False)
        s = tf.reduce_sum(tf.gather(y, TARGETS, axis=1, batch_dims=1))
    return tape.gradient(s, x).numpy(), seen.units


def plain_grad(model, x):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        s = tf.reduce_sum(tf.gather(model(x, training=False), TARGETS, axis=1, batch_dims=1))
    return tape.gradient(s, x).numpy()


# ------------------------------------------------------------------------------------------------ the models
@pytest.fixture(scope="module")
def mlp_data():
    """Weights and a batch chosen so both units see negative, in-range and (for the clamp) above-6 inputs and
    both gradient signs: guided, deconvnet and plain all differ."""
    rng = np.random.default_rng(7)
    w = [(rng.normal(size=(5, 8)), rng.normal(size=8) * 0.5),
         (rng.normal(size=(8, 6)) * 1.5, np.array([3.0, -1.0, 5.0, 0.5, 2.0, 4.0])),
         (rng.normal(size=(6, 3)), rng.normal(size=3))]
    w = [(a.astype("float32"), b.astype("float32")) for a, b in w]
    x = (rng.normal(size=(3, 5)) * 1.5).astype("float32")
    _, (z1, z2, g_h2, g_h1) = mlp_reference(w, x, "plain")
    assert (z1 < 0).any() and (z1 > 0).any() and (z2 < 0).any() and (z2 > 6).any() and ((0 < z2) & (z2 < 6)).any()
    assert (g_h2 < 0).any() and (g_h2 > 0).any() and (g_h1 < 0).any() and (g_h1 > 0).any()
    assert min(np.abs(z1).min(), np.abs(z2).min(), np.abs(z2 - 6).min()) > 1e-3  # no switch decided by rounding
    return w, x


class FnMLP(keras.Model):
    """Subclassed: the two units are plain functions called in ``call``."""

    def __init__(self, act1, act2):
        super().__init__()
        self.d1, self.d2, self.d3 = L.Dense(8), L.Dense(6), L.Dense(3)
        self.act1, self.act2 = act1, act2

    def call(self, x):
        return self.d3(self.act2(self.d2(self.act1(self.d1(x)))))


def sequential(*layers):
    return keras.Sequential([keras.Input((5,)), *layers])


MLP_WAYS = {
    "ReLU layer": lambda: sequential(L.Dense(8), L.ReLU(), L.Dense(6), L.ReLU(max_value=6), L.Dense(3)),
    "Activation layer": lambda: sequential(L.Dense(8), L.Activation("relu"), L.Dense(6), L.Activation("relu6"),
                                           L.Dense(3)),
    "activation= argument": lambda: sequential(L.Dense(8, activation="relu"), L.Dense(6, activation="relu6"),
                                               L.Dense(3)),
    "keras.activations": lambda: FnMLP(keras.activations.relu, lambda v: keras.activations.relu(v, max_value=6.0)),
    "keras.activations.relu6": lambda: FnMLP(lambda v: keras.activations.relu(v), keras.activations.relu6),
    "keras.ops": lambda: FnMLP(lambda v: keras.ops.relu(v), lambda v: keras.ops.relu6(v)),
    "tf.nn": lambda: FnMLP(lambda v: tf.nn.relu(v), lambda v: tf.nn.relu6(v)),  # looked up at call time
}


def with_weights(model, w):
    model(np.zeros((1, 5), "float32"))
    dense = [layer for layer in model.layers if isinstance(layer, L.Dense)]
    assert len(dense) == 3
    for layer, (a, b) in zip(dense, w):
        layer.set_weights([a, b])
    return model


@pytest.fixture(scope="module")
def mlps(mlp_data):
    w, _ = mlp_data
    return {name: with_weights(build(), w) for name, build in MLP_WAYS.items()}


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("way", list(MLP_WAYS))
def test_mlp_matches_numpy_chain_rule(mlps, mlp_data, way, rule):
    w, x = mlp_data
    got, units = guided_grad(mlps[way], x, rule)
    want, _ = mlp_reference(w, x, rule)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert units == 2


def test_rules_differ_from_plain_and_each_other(mlps, mlp_data):
    """The data make the check above meaningful: the three backward passes are far apart."""
    w, x = mlp_data
    plain, guided, deconv = (mlp_reference(w, x, r)[0] for r in ("plain", "guided", "deconvnet"))
    np.testing.assert_allclose(plain_grad(mlps["ReLU layer"], x), plain, rtol=1e-5, atol=1e-5)
    for a, b in [(plain, guided), (plain, deconv), (guided, deconv)]:
        assert np.abs(a - b).max() > 0.1


@pytest.mark.parametrize("rule", RULES)
def test_keras_relu_max_value_and_threshold(mlp_data, rule):
    """``max_value`` other than 6 (a clamp via clip) and ``threshold`` are one unit each, by the clamp rule."""
    w, x = mlp_data
    hi = 4.0
    model = with_weights(FnMLP(lambda v: keras.activations.relu(v), L.ReLU(max_value=hi)), w)
    got, units = guided_grad(model, x, rule)
    np.testing.assert_allclose(got, mlp_reference(w, x, rule, hi2=hi)[0], rtol=1e-5, atol=1e-5)
    assert units == 2

    t = 0.7
    v = tf.constant(x @ w[0][0] + w[0][1])
    g = np.random.default_rng(1).normal(size=v.shape).astype("float32")
    assert np.abs(v.numpy() - t).min() > 1e-3
    with guided_relus(rule) as seen, tf.GradientTape() as tape:
        tape.watch(v)
        y = keras.activations.relu(v, threshold=t)
        s = tf.reduce_sum(y * g)
    np.testing.assert_allclose(y.numpy(), unit_forward(v.numpy(), t=t), rtol=1e-6)
    np.testing.assert_allclose(tape.gradient(s, v).numpy(), unit_backward(rule, v.numpy(), g, t=t), rtol=1e-6)
    assert seen.units == 1


NOT_RELU_LIKE = {  # each builds a fresh unit (a layer is built for one input width)
    "slope": lambda: lambda v: keras.activations.relu(v, negative_slope=0.1),
    "slope+max": lambda: lambda v: keras.activations.relu(v, negative_slope=0.1, max_value=6.0),
    "slope+threshold": lambda: lambda v: keras.activations.relu(v, negative_slope=0.1, threshold=0.5),
    "ReLU layer slope+max": lambda: L.ReLU(negative_slope=0.2, max_value=3.0),
    "LeakyReLU": lambda: L.LeakyReLU(0.1),
    "PReLU": lambda: L.PReLU(alpha_initializer=keras.initializers.Constant(0.3)),
    "ELU": L.ELU,
    "gelu": lambda: keras.activations.gelu,
    "silu": lambda: keras.activations.silu,
    "hard_sigmoid": lambda: keras.activations.hard_sigmoid,
    "hard_swish layer": lambda: L.Activation("hard_swish"),
    "ops.hard_silu": lambda: lambda v: keras.ops.hard_silu(v),
}


@pytest.mark.parametrize("kind", list(NOT_RELU_LIKE))
def test_not_relu_like_units_keep_plain_gradients(mlp_data, kind):
    w, x = mlp_data
    model = with_weights(FnMLP(NOT_RELU_LIKE[kind](), NOT_RELU_LIKE[kind]()), w)
    got, units = guided_grad(model, x, "guided")
    assert units == 0
    np.testing.assert_allclose(got, plain_grad(model, x), rtol=1e-6, atol=1e-7)


def test_gelu_only_model(mlp_data):
    w, x = mlp_data
    model = with_weights(sequential(L.Dense(8, activation="gelu"), L.Activation("gelu"), L.Dense(6),
                                    L.Dense(3)), w)
    for rule in RULES:
        got, units = guided_grad(model, x, rule)
        assert units == 0
        np.testing.assert_allclose(got, plain_grad(model, x), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ conv
def conv_reference(kernel, bias, wd, x, rule):
    """x (B,6,6,2) -> Conv2D 3x3 valid + relu -> flatten -> Dense(3): the target-logit gradient, float64."""
    k, b, wd, x = np.float64(kernel), np.float64(bias), np.float64(wd), np.float64(x)
    patches = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))  # (B, 4, 4, C, 3, 3)
    z = np.einsum("bijcuv,uvcf->bijf", patches, k) + b
    g_h = (np.eye(3)[TARGETS] @ wd.T).reshape(z.shape)
    g_z = unit_backward(rule, z, g_h)
    g_x = np.zeros_like(x)
    for u in range(3):
        for v in range(3):
            g_x[:, u:u + 4, v:v + 4, :] += np.einsum("bijf,cf->bijc", g_z, k[u, v])
    return g_x, z


class ConvNet(keras.Model):
    """The same network written as a subclassed model calling ``tf.nn.relu`` itself."""

    def __init__(self):
        super().__init__()
        self.conv, self.flat, self.head = L.Conv2D(4, 3), L.Flatten(), L.Dense(3)

    def call(self, x):
        return self.head(self.flat(tf.nn.relu(self.conv(x))))


@pytest.mark.parametrize("rule", RULES)
def test_conv_relu_two_formulations_and_numpy(rule):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 6, 6, 2)).astype("float32")
    seq = keras.Sequential([keras.Input((6, 6, 2)), L.Conv2D(4, 3, activation="relu"), L.Flatten(), L.Dense(3)])
    sub = ConvNet()
    sub(x[:1])
    for src, dst in [(seq.layers[0], sub.conv), (seq.layers[2], sub.head)]:
        dst.set_weights(src.get_weights())
    kernel, bias = seq.layers[0].get_weights()
    wd, _ = seq.layers[2].get_weights()
    want, z = conv_reference(kernel, bias, wd, x, rule)
    assert (z < 0).any() and (z > 0).any() and np.abs(z).min() > 1e-4
    got_seq, n_seq = guided_grad(seq, x, rule)
    got_sub, n_sub = guided_grad(sub, x, rule)
    np.testing.assert_allclose(got_seq, got_sub, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_seq, want, rtol=1e-5, atol=1e-5)
    assert n_seq == n_sub == 1
    assert np.abs(got_seq - plain_grad(seq, x)).max() > 0.05


# ------------------------------------------------------------------------------------------------ restore
def patched_objects():
    """Everything guided_relus replaces inside the block (the first five), and public names it must leave alone."""
    return (tf.nn.relu, tf.nn.relu6, vars(KerasReLUOp)["static_call"], keras_tf_nn.hard_sigmoid, vars(L.PReLU)["call"],
            keras.activations.relu, keras.ops.relu, keras_tf_nn.relu, keras.activations.hard_silu)


def test_restored_after_block_and_after_raise(mlps, mlp_data):
    w, x = mlp_data
    before = patched_objects()
    model = mlps["tf.nn"]
    plain = plain_grad(model, x)
    guided_grad(model, x, "guided")
    assert all(a is b for a, b in zip(patched_objects(), before))
    np.testing.assert_allclose(plain_grad(model, x), plain, rtol=0, atol=0)

    with pytest.raises(RuntimeError, match="boom"), guided_relus("deconvnet") as seen:
        inside = patched_objects()
        assert all(a is not b for a, b in zip(inside[:5], before[:5]))
        assert all(a is b for a, b in zip(inside[5:], before[5:]))
        model(x)
        raise RuntimeError("boom")
    assert seen.units == 2
    assert all(a is b for a, b in zip(patched_objects(), before))
    for name in MLP_WAYS:
        np.testing.assert_allclose(plain_grad(mlps[name], x), mlp_reference(w, x, "plain")[0], rtol=1e-5,
                                   atol=1e-5)


def test_graph_mode_is_left_plain(mlp_data):
    """A tf.function traced inside the block is not guided (and so stays plain after it), and is not counted."""
    w, x = mlp_data
    model = with_weights(sequential(L.Dense(8, activation="relu"), L.Dense(6, activation="relu6"), L.Dense(3)), w)
    fn = tf.function(lambda v: model(v, training=False))
    xt = tf.constant(x)
    with guided_relus("guided") as seen, tf.GradientTape() as tape:
        tape.watch(xt)
        s = tf.reduce_sum(tf.gather(fn(xt), TARGETS, axis=1, batch_dims=1))
    assert seen.units == 0
    np.testing.assert_allclose(tape.gradient(s, xt).numpy(), mlp_reference(w, x, "plain")[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["Guided", "backprop", None, 1])
def test_bad_rule(bad):
    before = patched_objects()
    with pytest.raises(ValueError, match=r"rule.*'guided'.*'deconvnet'.*" + repr(bad)), guided_relus(bad):
        pass
    assert all(a is b for a, b in zip(patched_objects(), before))
