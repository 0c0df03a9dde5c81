"""Guided backpropagation and deconvnet on every backend (issue 14): the contract's small CNN with the same weights
on PyTorch, Keras, Flax linen, Flax nnx and a pair of JAX functions, its ReLUs called every way each framework
offers, against one float64 NumPy oracle of the guided backward written from the rules; and the real
EfficientNet-Lite0 ports (ReLU6 units: modules, layers, ``jnp.clip``) agree across frameworks."""
from __future__ import annotations

import numpy as np
import pytest

import contract_models as cm
from contract_models import C1, C2, H, K, W, to_numpy

pytest.importorskip("tensorflow")
pytest.importorskip("flax")

import camcore  # noqa: E402

P = cm.weights()
TARGETS = [2, 0, 1]
RULES = {"guided-backprop": "guided", "deconvnet": "deconvnet"}


def _conv_input_grad(g, w):
    """The gradient of a 'same' 3x3 cross-correlation with respect to its input: ``(N, O, H, W) -> (N, I, H, W)``."""
    n, _, h, w_ = g.shape
    out = np.zeros((n, w.shape[1], h + 2, w_ + 2))
    for i in range(3):
        for j in range(3):
            out[:, :, i : i + h, j : j + w_] += np.einsum("nohw,oi->nihw", g, w[:, :, i, j])
    return out[:, :, 1:-1, 1:-1]


def oracle(x, targets, rule):
    """``d y_c / d x`` of the contract CNN in float64, each ReLU passing back ``max(g, 0) * 1[z > 0]`` (guided) or
    ``max(g, 0)`` (deconvnet) for its input ``z``; channels-first ``(B, 3, H, W)``."""
    o = cm.Oracle(P)
    p = o.p
    z1 = cm._conv(np.asarray(x, np.float64), p["w1"], p["b1"])
    z2 = cm._conv(np.maximum(z1, 0), p["w2"], p["b2"])
    g = (np.eye(K)[targets] @ p["wf"])[:, :, None, None] / (H * W) * np.ones_like(z2)  # d y / d relu(z2)

    def unit(g, z):
        return np.maximum(g, 0) * ((z > 0) if rule == "guided" else 1.0)

    g = _conv_input_grad(unit(g, z2), p["w2"])
    return _conv_input_grad(unit(g, z1), p["w1"])


# ------------------------------------------------------------------------------- the ways of calling a ReLU
def torch_variants():
    import torch
    import torch.nn.functional as F

    base = cm.build("torch", P).model
    ways = {"F.relu": F.relu, "torch.relu": torch.relu, "x.relu()": lambda t: t.relu(),
            "clamp(min=0)": lambda t: t.clamp(min=0), "relu_ in place": lambda t: t.relu_()}

    class Functional(torch.nn.Module):
        def __init__(self, relu):
            super().__init__()
            self.conv1, self.conv2, self.fc, self.relu = base.conv1, base.conv2, base.fc, relu

        def forward(self, x):
            return self.fc(self.relu(self.conv2(self.relu(self.conv1(x)))).mean(dim=(2, 3)))

    return {"nn.ReLU": base, **{k: Functional(f).eval() for k, f in ways.items()}}


def keras_variants():
    import keras
    import tensorflow as tf

    from contract_models import _hwio

    L = keras.layers

    def functional(act):
        inp = keras.Input((H, W, 3))
        h = act(L.Conv2D(C1, 3, padding="same", name="conv1")(inp))
        h = act(L.Conv2D(C2, 3, padding="same", name="conv2")(h))
        return keras.Model(inp, L.Dense(K, name="fc")(L.GlobalAveragePooling2D()(h)))

    def fused():
        inp = keras.Input((H, W, 3))
        h = L.Conv2D(C1, 3, padding="same", activation="relu", name="conv1")(inp)
        h = L.Conv2D(C2, 3, padding="same", activation="relu", name="conv2")(h)
        return keras.Model(inp, L.Dense(K, name="fc")(L.GlobalAveragePooling2D()(h)))

    class Subclassed(keras.Model):
        def __init__(self, relu):
            super().__init__()
            self.relu = relu
            self.conv1 = L.Conv2D(C1, 3, padding="same")
            self.conv2 = L.Conv2D(C2, 3, padding="same")
            self.fc = L.Dense(K)

        def call(self, x):
            return self.fc(keras.ops.mean(self.relu(self.conv2(self.relu(self.conv1(x)))), axis=(1, 2)))

    models = {"ReLU layer": cm.build("keras", P).model,
              "Activation('relu')": functional(lambda t: L.Activation("relu")(t)),
              "Conv2D(activation='relu')": fused(),
              "keras.activations.relu": Subclassed(keras.activations.relu),
              "keras.ops.relu": Subclassed(keras.ops.relu),
              "tf.nn.relu": Subclassed(lambda t: tf.nn.relu(t))}  # looked up at call time, as a call() does
    for name, m in models.items():
        if name == "ReLU layer":
            continue
        m(np.zeros((1, H, W, 3), np.float32))
        convs = [lay for lay in m.layers if isinstance(lay, L.Conv2D)]
        dense = [lay for lay in m.layers if isinstance(lay, L.Dense)][0]
        convs[0].set_weights([_hwio(P["w1"]), P["b1"]])
        convs[1].set_weights([_hwio(P["w2"]), P["b2"]])
        dense.set_weights([np.ascontiguousarray(P["wf"].T), P["bf"]])
    return models


def jax_variants():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    linen_model, variables = cm.build("linen", P).model
    ways = {"jax.nn.relu": jax.nn.relu, "jnp.maximum(x, 0)": lambda t: jnp.maximum(t, 0.0),
            "jnp.maximum(0, x)": lambda t: jnp.maximum(0.0, t)}

    def linen_with(relu):
        class Net(nn.Module):
            @nn.compact
            def __call__(self, x):
                h = relu(nn.Conv(C1, (3, 3), padding="SAME", name="conv1")(x))
                a = nn.Conv(C2, (3, 3), padding="SAME", name="conv2")(h)
                return nn.Dense(K, name="fc")(jnp.mean(relu(a), axis=(1, 2)))

        return Net(), variables

    return {"linen nn.relu": (linen_model, variables), "nnx.relu": cm.build("nnx", P).model,
            "pair jax.nn.relu": cm.build("pair", P).model, **{f"linen {k}": linen_with(f) for k, f in ways.items()}}


VARIANTS = {"torch": torch_variants, "keras": keras_variants, "jax": jax_variants}


@pytest.mark.parametrize("framework", list(VARIANTS))
def test_every_way_of_calling_relu_gets_the_oracles_guided_gradient(framework):
    x_cf = cm.inputs()
    last = framework != "torch"
    x = np.ascontiguousarray(np.moveaxis(x_cf, 1, -1)) if last else x_cf
    if framework == "torch":
        import torch

        x = torch.from_numpy(x)
    for name, model in VARIANTS[framework]().items():
        got = camcore.explain(model, x, method=list(RULES), targets=TARGETS)
        for method, rule in RULES.items():
            g = to_numpy(got[method])
            g = np.moveaxis(g, -1, 1) if last else g
            want = oracle(x_cf, TARGETS, rule)
            np.testing.assert_allclose(g, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=f"{name} {method}")


@pytest.mark.parametrize("name", cm.KINDS)
def test_guided_gradcam_is_its_parts_and_leaves_every_kind_untouched(name):
    """On every backend kind: Guided Grad-CAM equals guided backpropagation times the normalised Grad-CAM map
    (broadcast over the channels, in the model's layout), and the model is exactly as before (weights, flags, layer
    calls, the patched TensorFlow functions and the torch function mode)."""
    import tensorflow as tf
    import torch

    kind = cm.build(name, P)
    snap = kind.snapshot()
    relu, relu6 = tf.nn.relu, tf.nn.relu6
    x = kind.x()
    got = camcore.explain(kind.model, x, method=["guided-gradcam", "guided-backprop", "gradcam"], layer=kind.layer,
                          targets=TARGETS)
    gb, cam = to_numpy(got["guided-backprop"]), to_numpy(got["gradcam"])
    want = gb * (cam[..., None] if kind.channels_last else cam[:, None])
    np.testing.assert_allclose(to_numpy(got["guided-gradcam"]), want, rtol=0, atol=1e-7)
    kind.assert_untouched(snap)
    assert tf.nn.relu is relu and tf.nn.relu6 is relu6 and not torch.overrides._get_current_function_mode_stack()


def test_guided_backprop_under_jax_jit_equals_eager():
    import jax

    module, v = cm.build("linen", P).model
    x = cm.build("linen", P).x()
    f = jax.jit(lambda v, x: camcore.explain((module, v), x, method=["guided-backprop", "guided-gradcam"],
                                             layer="conv2", targets=TARGETS))
    jitted, eager = f(v, x), camcore.explain((module, v), x, method=["guided-backprop", "guided-gradcam"],
                                            layer="conv2", targets=TARGETS)
    for m in eager:
        np.testing.assert_allclose(to_numpy(jitted[m]), to_numpy(eager[m]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.moveaxis(to_numpy(eager["guided-backprop"]), -1, 1),
                               oracle(cm.inputs(), TARGETS, "guided"), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["keras", "linen"])
def test_no_relu_warns_on_keras_and_jax(name):
    """A model without a ReLU-like unit: guidance does not apply, said at run time, plain gradients returned."""
    if name == "keras":
        import keras

        inp = keras.Input((H, W, 3))
        model = keras.Model(inp, keras.layers.Dense(K)(keras.layers.GlobalAveragePooling2D()(
            keras.layers.Conv2D(C1, 3, padding="same", activation="gelu")(inp))))
    else:
        import flax.linen as nn
        import jax

        class Net(nn.Module):
            @nn.compact
            def __call__(self, x):
                return nn.Dense(K)(nn.gelu(nn.Conv(C1, (3, 3))(x)).mean(axis=(1, 2)))

        module = Net()
        model = (module, module.init(jax.random.PRNGKey(0), np.zeros((1, H, W, 3), np.float32)))
    with pytest.warns(RuntimeWarning, match=r"guided: the model ran no ReLU-like unit"):
        camcore.explain(model, np.asarray(cm.build("keras", P).x()), method="guided-backprop", targets=TARGETS)
