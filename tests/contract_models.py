"""One small CNN with the same weights on every backend kind, and a float64 NumPy oracle of it.

The network (channels-first notation)::

    x (B, 3, H, W) -> conv1 3->4 3x3 'same' -> relu -> conv2 4->5 3x3 'same' (the target layer, A)
                   -> relu -> global average pool -> fc 5->3 (logits)

Weights come from a fixed NumPy RNG in PyTorch's layout (conv ``(O, I, kh, kw)``, dense ``(K, C)``) and are
transposed as each framework needs (``(kh, kw, I, O)`` and ``(C, K)`` for Keras and Flax). The oracle computes
outputs, the target layer's activations ``A`` (``(B, C, H, W)``) and ``d(sum_b s_b)/dA`` for scores
``s_b = sum_k w_{b,k} logit_{b,k}`` by a hand-written chain rule; it never calls camcore or any framework.

Each :class:`Kind` bundles a model as ``camcore.backends.adapter_for`` takes it, the framework's name of the target
layer, its native inputs, and how to check that the model is unchanged (``snapshot`` / ``assert_untouched``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

B, H, W, K = 3, 8, 8, 3
C1, C2 = 4, 5
KINDS = ["torch", "keras", "linen", "nnx", "pair"]


# ------------------------------------------------------------------------------------------- weights, inputs
def weights(seed: int = 0) -> dict:
    """float32 weights in PyTorch's layout; biases chosen so that relu after conv2 cuts part of A."""
    rng = np.random.default_rng(seed)
    f = lambda *s, scale=1.0: (rng.standard_normal(s) * scale).astype(np.float32)  # noqa: E731
    return {"w1": f(C1, 3, 3, 3, scale=1 / np.sqrt(27)), "b1": f(C1, scale=0.1),
            "w2": f(C2, C1, 3, 3, scale=1 / np.sqrt(36)), "b2": f(C2, scale=0.1),
            "wf": f(K, C2), "bf": f(K, scale=0.1)}


def inputs(b: int = B, seed: int = 1) -> np.ndarray:
    """float32 inputs, channels-first ``(B, 3, H, W)``."""
    return np.random.default_rng(seed).standard_normal((b, 3, H, W)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ the oracle
def _conv(x, w, b):
    """'same' 3x3 cross-correlation, float64: x (N, I, H, W), w (O, I, 3, 3) -> (N, O, H, W)."""
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, w_ = x.shape[2] - 2, x.shape[3] - 2
    out = np.zeros((x.shape[0], w.shape[0], h, w_))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nihw,oi->nohw", x[:, :, i : i + h, j : j + w_], w[:, :, i, j])
    return out + b[None, :, None, None]


class Oracle:
    """The network in float64 NumPy."""

    def __init__(self, p: dict):
        self.p = {k: np.asarray(v, np.float64) for k, v in p.items()}

    def features(self, x):
        """A: conv2's output (before its relu), ``(N, C2, H, W)``, for channels-first ``x``."""
        p = self.p
        return _conv(np.maximum(_conv(np.asarray(x, np.float64), p["w1"], p["b1"]), 0), p["w2"], p["b2"])

    def head(self, a):
        """Logits ``(N, K)`` from A."""
        return np.maximum(a, 0).mean(axis=(2, 3)) @ self.p["wf"].T + self.p["bf"]

    def logits(self, x):
        return self.head(self.features(x))

    def grad(self, a, coef):
        """``d(sum_b sum_k coef[b, k] logit[b, k]) / dA`` by the chain rule: fc, mean, relu."""
        coef = np.broadcast_to(np.asarray(coef, np.float64), (a.shape[0], K))
        dpool = coef @ self.p["wf"]  # (B, C2): d/d(pooled)
        n = a.shape[2] * a.shape[3]
        return dpool[:, :, None, None] / n * (a > 0)

    def act_grad(self, x, targets):
        """``(logits, A, dA)`` for ``targets``: None (top class), an int, a list, or a :class:`Linear` target."""
        a = self.features(x)
        out = self.head(a)
        return out, a, self.grad(a, self.coef(out, targets))

    @staticmethod
    def coef(out, targets):
        """The ``(B, K)`` coefficients of the logits in the score."""
        b = out.shape[0]
        if isinstance(targets, Linear):
            return np.broadcast_to(targets.coef, (b, K))
        idx = out.argmax(1) if targets is None else np.broadcast_to(np.asarray(targets), (b,))
        return np.eye(K)[idx]

    def scores(self, out, targets):
        """``(N,)`` target scores of logits ``out``."""
        return (self.coef(out, targets) * out).sum(1)

    def masked_input(self, x, masks, targets, probability=False):
        """``(B, M)`` scores of ``x_b * mask_m``; ``masks`` channels-first ``(M, 1, H, W)`` or ``(B, M, 1, H, W)``.
        ``targets=None``: each sample's top class on the unmasked inputs."""
        return self._masked(x, self.features(x), masks, targets, probability, lambda b, m: self.logits(x[b] * m))

    def masked_layer(self, x, masks, targets, probability=False):
        """``(B, M)`` scores with A multiplied by channel masks ``(M, C2, 1, 1)`` or ``(B, M, C2, 1, 1)``."""
        a = self.features(x)
        return self._masked(x, a, masks, targets, probability, lambda b, m: self.head(a[b] * m))

    def _masked(self, x, a, masks, targets, probability, run):
        masks = np.asarray(masks, np.float64)
        coef = self.coef(self.head(a), targets)  # (B, K): the classes of the unmasked pass
        per_sample = masks.ndim == 5
        rows = []
        for b in range(a.shape[0]):
            out = run(b, masks[b] if per_sample else masks)  # (M, K): one sample broadcast against M masks
            if probability and not isinstance(targets, Linear):  # a callable's scores are used as they are
                e = np.exp(out - out.max(1, keepdims=True))
                out = e / e.sum(1, keepdims=True)
            rows.append(out @ coef[b])
        return np.stack(rows)

    def gradcam(self, x, targets):
        """Grad-CAM at A from its equation: relu(sum_c mean_ij(dA_c) A_c), per-sample min-max (A has the inputs'
        spatial size, so there is no upsampling)."""
        _, a, g = self.act_grad(x, targets)
        cam = np.maximum((g.mean(axis=(2, 3))[:, :, None, None] * a).sum(1), 0)
        lo = cam.min(axis=(1, 2), keepdims=True)
        span = cam.max(axis=(1, 2), keepdims=True) - lo
        return np.where(span > 0, (cam - lo) / np.where(span > 0, span, 1), 0)


@dataclass(frozen=True)
class Linear:
    """A callable target ``f(out) = sum_k coef[k] * out[:, k]`` that works on every framework's arrays."""

    coef: tuple

    def __call__(self, out):
        total = 0
        for k, c in enumerate(self.coef):
            if c:
                total = total + c * out[:, k]
        return total


# ------------------------------------------------------------------------------------------------- the kinds
@dataclass
class Kind:
    name: str
    model: object
    layer: str  # the framework's name of conv2 (A)
    default: str  # what default_layer must return: the last layer whose output is a feature map
    fc: str | None  # the classifier's name (None: the pair has none)
    channels_last: bool
    native: Callable  # channels-first float NumPy -> the framework's inputs
    snapshot: Callable
    assert_untouched: Callable
    names: tuple  # a few layer names that must be in layer_names()

    def x(self, x_cf=None):
        return self.native(inputs() if x_cf is None else x_cf)


def to_numpy(a):
    """Any framework's array (or a list of them) as float64 NumPy."""
    if isinstance(a, (list, tuple)):
        return [to_numpy(v) for v in a]
    if hasattr(a, "detach"):
        a = a.detach().cpu()
    return np.asarray(a, dtype=np.float64)


def _cl(x):
    return np.ascontiguousarray(np.moveaxis(np.asarray(x), 1, -1))


def _hwio(w):
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def build(name: str, p: dict) -> Kind:
    return {"torch": _torch, "keras": _keras, "linen": _linen, "nnx": _nnx, "pair": _pair}[name](p)


def _torch(p):
    import torch
    from torch import nn

    from model_checks import assert_untouched, snapshot

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.relu1 = nn.Conv2d(3, C1, 3, padding=1), nn.ReLU()
            self.conv2, self.relu2 = nn.Conv2d(C1, C2, 3, padding=1), nn.ReLU()
            self.fc = nn.Linear(C2, K)

        def forward(self, x):
            return self.fc(self.relu2(self.conv2(self.relu1(self.conv1(x)))).mean(dim=(2, 3)))

    model = Net()
    with torch.no_grad():
        for mod, w, b in [(model.conv1, "w1", "b1"), (model.conv2, "w2", "b2"), (model.fc, "wf", "bf")]:
            mod.weight.copy_(torch.from_numpy(p[w]))
            mod.bias.copy_(torch.from_numpy(p[b]))
    model.train()  # no dropout or batch norm: the same function, and the adapter must put the flags back
    return Kind("torch", model, "conv2", "relu2", "fc", False, lambda x: torch.from_numpy(np.array(x, np.float32)),
                lambda: snapshot(model), lambda s: assert_untouched(model, s), ("conv1", "conv2", "relu2", "fc"))


def _keras(p):
    import keras

    L = keras.layers
    inp = keras.Input((H, W, 3), name="image")
    h = L.ReLU(name="relu1")(L.Conv2D(C1, 3, padding="same", name="conv1")(inp))
    h = L.ReLU(name="relu2")(L.Conv2D(C2, 3, padding="same", name="conv2")(h))
    model = keras.Model(inp, L.Dense(K, name="fc")(L.GlobalAveragePooling2D(name="gap")(h)))
    model.get_layer("conv1").set_weights([_hwio(p["w1"]), p["b1"]])
    model.get_layer("conv2").set_weights([_hwio(p["w2"]), p["b2"]])
    model.get_layer("fc").set_weights([np.ascontiguousarray(p["wf"].T), p["bf"]])

    def snap():
        return [(v.path, np.array(v.numpy(), copy=True)) for v in model.variables]

    def untouched(s):
        now = snap()
        assert [q for q, _ in now] == [q for q, _ in s]
        for (path, before), (_, after) in zip(s, now):
            assert before.dtype == after.dtype and np.array_equal(before, after), f"{path} changed"
        for layer in model._flatten_layers(include_self=True, recursive=True):
            assert "call" not in layer.__dict__, f"{layer.name}.call left patched"

    return Kind("keras", model, "conv2", "relu2", "fc", True, lambda x: _cl(np.asarray(x, np.float32)), snap,
                untouched, ("conv1", "conv2", "relu2", "fc"))


def _jax_tree_snapshot(tree):
    import jax

    return jax.tree_util.tree_structure(tree), [np.array(a) for a in jax.tree.leaves(tree)], \
        [id(a) for a in jax.tree.leaves(tree)]


def _jax_tree_same(tree, snap, ids=True):
    import jax

    struct, leaves, idents = snap
    assert jax.tree_util.tree_structure(tree) == struct
    for a, b in zip(jax.tree.leaves(tree), leaves):
        np.testing.assert_array_equal(np.array(a), b)
    if ids:
        assert [id(a) for a in jax.tree.leaves(tree)] == idents, "the variables' arrays were replaced"


def _jnp(x):
    import jax.numpy as jnp

    return jnp.asarray(_cl(np.asarray(x, np.float32)))


def _linen(p):
    import flax.linen as nn
    import jax.numpy as jnp

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Conv(C1, (3, 3), padding="SAME", name="conv1")(x))
            a = nn.Conv(C2, (3, 3), padding="SAME", name="conv2")(h)
            return nn.Dense(K, name="fc")(jnp.mean(nn.relu(a), axis=(1, 2)))

    variables = {"params": {
        "conv1": {"kernel": jnp.asarray(_hwio(p["w1"])), "bias": jnp.asarray(p["b1"])},
        "conv2": {"kernel": jnp.asarray(_hwio(p["w2"])), "bias": jnp.asarray(p["b2"])},
        "fc": {"kernel": jnp.asarray(p["wf"].T), "bias": jnp.asarray(p["bf"])}}}
    model = (Net(), variables)
    return Kind("linen", model, "conv2", "conv2", "fc", True, _jnp, lambda: _jax_tree_snapshot(variables),
                lambda s: _jax_tree_same(variables, s), ("conv1", "conv2", "fc"))


def _nnx(p):
    import jax.numpy as jnp
    from flax import nnx

    zeros = lambda key, shape, dtype=jnp.float32: jnp.zeros(shape, dtype)  # noqa: E731 (no jax.random compiles)
    init = {"kernel_init": zeros, "bias_init": zeros}

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(3, C1, (3, 3), padding="SAME", rngs=rngs, **init)
            self.conv2 = nnx.Conv(C1, C2, (3, 3), padding="SAME", rngs=rngs, **init)
            self.fc = nnx.Linear(C2, K, rngs=rngs, **init)

        def __call__(self, x):
            a = self.conv2(nnx.relu(self.conv1(x)))
            return self.fc(jnp.mean(nnx.relu(a), axis=(1, 2)))

    model = Net(nnx.Rngs(0))
    model.conv1.kernel[...] = jnp.asarray(_hwio(p["w1"]))
    model.conv1.bias[...] = jnp.asarray(p["b1"])
    model.conv2.kernel[...] = jnp.asarray(_hwio(p["w2"]))
    model.conv2.bias[...] = jnp.asarray(p["b2"])
    model.fc.kernel[...] = jnp.asarray(p["wf"].T)
    model.fc.bias[...] = jnp.asarray(p["bf"])

    def snap():
        types = [(path, type(m)) for path, m in nnx.iter_modules(model)]
        return types, _jax_tree_snapshot(nnx.state(model))

    def untouched(s):
        assert [(path, type(m)) for path, m in nnx.iter_modules(model)] == s[0], "a submodule was swapped"
        _jax_tree_same(nnx.state(model), s[1], ids=False)

    return Kind("nnx", model, "conv2", "conv2", "fc", True, _jnp, snap, untouched, ("conv1", "conv2", "fc"))


def _pair(p):
    import jax
    import jax.numpy as jnp

    w1, w2 = jnp.asarray(_hwio(p["w1"])), jnp.asarray(_hwio(p["w2"]))
    b1, b2 = jnp.asarray(p["b1"]), jnp.asarray(p["b2"])
    wf, bf = jnp.asarray(p["wf"]), jnp.asarray(p["bf"])

    def conv(x, w, b):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b

    def features(x):
        return conv(jax.nn.relu(conv(x, w1, b1)), w2, b2)

    def head(a):
        return jnp.mean(jax.nn.relu(a), axis=(1, 2)) @ wf.T + bf

    leaves = (w1, w2, b1, b2, wf, bf)
    return Kind("pair", (features, head), "features", "features", None, True, _jnp,
                lambda: _jax_tree_snapshot(leaves), lambda s: _jax_tree_same(leaves, s), ("features",))
