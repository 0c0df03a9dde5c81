"""The JAX adapter (Flax linen, Flax nnx, (features, head) function pairs) and ``camcore.explain`` on it.

Every reference here is computed independently of camcore and of Flax's module machinery: the networks are
written out by hand with ``jax.lax``/``jnp`` from the same weights, gradients come from ``jax.grad`` of the
hand-written tail, Grad-CAM from a NumPy formula, masked scores from plain loops of ``module.apply``.

Cases every backend shares (int/list/None/callable targets, masked scores and their batching, probability,
mask/batch-size/input-dtype errors, unknown layer names, the model left alone) are checked once for all
kinds against a NumPy oracle in ``test_contract.py``; this file keeps the rest.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import camcore
from camcore.backends import adapter_for
from camcore.backends.jax import JaxAdapter, accepts

jax.config.update("jax_enable_x64", False)

# camcore must not ask JAX for int64 (which it truncates to int32 with a warning) when x64 is off
pytestmark = pytest.mark.filterwarnings("error:Explicitly requested dtype int64:UserWarning")

ALL_METHODS = [m for m, s in camcore.METHODS.items() if not (s.rule or s.guided)]  # the maps (B, *S)
B, H, W, K = 2, 16, 16, 5
FORWARDS: list[bool] = []  # one entry per concrete (non-traced) run of a test model's top-level __call__


# ----------------------------------------------------------------------------------------------- models
_NP = [np.random.default_rng(0)]


def reseed(seed):
    """Fix the weights of the next model built, whatever tests ran before."""
    _NP[0] = np.random.default_rng(seed)


def np_init(key, shape, dtype=jnp.float32):
    """Weights from NumPy (XLA compiles jax.random's samplers anew for every shape: seconds each on CPU)."""
    fan_in = int(np.prod(shape[:-1]))
    return jnp.asarray(_NP[0].normal(size=shape) / np.sqrt(fan_in), dtype)


def np_bias(key, shape, dtype=jnp.float32):
    return jnp.asarray(_NP[0].uniform(-0.1, 0.1, size=shape), dtype)


INIT = {"kernel_init": np_init, "bias_init": np_bias}
class Block(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(self.features, (3, 3), strides=self.strides, padding="SAME", **INIT)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.relu(x)


class LinenNet(nn.Module):
    """Block_0 (conv-bn-relu), Block_1 (stride 2), dropout on the map, global average pooling, Dense_0."""

    rate: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = True):  # train=True by default: eval mode must pass train=False
        FORWARDS.append(isinstance(x, jax.core.Tracer))
        x = Block(8)(x, train)
        x = Block(12, strides=2)(x, train)
        x = nn.Dropout(self.rate, deterministic=not train)(x)
        return nn.Dense(K, **INIT)(jnp.mean(x, axis=(1, 2)))


class LinenTwice(nn.Module):
    """A module called twice (shared weights): the adapter takes its last call."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), **INIT)(x)
        shared = nn.Conv(4, (3, 3), name="shared", **INIT)
        x = jnp.tanh(shared(nn.relu(shared(x))))
        return nn.Dense(K, **INIT)(jnp.mean(x, axis=(1, 2)))


class LinenOdd(nn.Module):
    """A layer that returns a tuple, and a layer that runs only in training mode."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), **INIT)(x)
        if train:
            x = nn.Conv(4, (1, 1), name="train_only", **INIT)(x)
        carry, x = Pair2()(x)
        return nn.Dense(K, **INIT)(jnp.mean(x + carry, axis=(1, 2)))


class Pair2(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x * 2, nn.Conv(4, (1, 1), **INIT)(x)


class NnxBlock(nnx.Module):
    def __init__(self, cin, cout, strides, rngs):
        self.conv = nnx.Conv(cin, cout, (3, 3), strides=strides, padding="SAME", rngs=rngs, **INIT)
        self.bn = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.conv(x)))


class NnxNet(nnx.Module):
    def __init__(self, rngs, rate=0.5):
        self.unused = nnx.Linear(3, 3, rngs=rngs, **INIT)  # never called; sorts after 'fc' alphabetically
        self.blocks = nnx.List([NnxBlock(3, 8, 1, rngs), NnxBlock(8, 12, 2, rngs)])
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.fc = nnx.Linear(12, K, rngs=rngs, **INIT)

    def __call__(self, x):
        FORWARDS.append(isinstance(x, jax.core.Tracer))
        for block in self.blocks:
            x = block(x)
        return self.fc(jnp.mean(self.drop(x), axis=(1, 2)))


class NnxTwice(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs, **INIT)
        self.shared = nnx.Conv(4, 4, (3, 3), rngs=rngs, **INIT)
        self.fc = nnx.Linear(4, K, rngs=rngs, **INIT)

    def __call__(self, x):
        x = jnp.tanh(self.shared(nnx.relu(self.shared(self.conv(x)))))
        return self.fc(jnp.mean(x, axis=(1, 2)))


def _randomize_bn(seed, shape):
    """Non-trivial batch-norm statistics and affine parameters, so using or changing them would show."""
    rng = np.random.default_rng(seed)
    u = lambda lo, hi: jnp.asarray(rng.uniform(lo, hi, size=shape), jnp.float32)
    return dict(mean=u(-0.2, 0.2), var=u(0.5, 1.5), scale=u(0.5, 1.5), bias=u(-0.1, 0.3))


def make_linen():
    module = LinenNet()
    x = jnp.zeros((1, H, W, 3))
    reseed(0)
    v = module.init(jax.random.key(0), x, train=False)
    params = jax.tree.map(lambda a: a, v["params"])  # fresh dicts
    stats = jax.tree.map(lambda a: a, v["batch_stats"])
    for i, key in enumerate(["Block_0", "Block_1"]):
        r = _randomize_bn(10 + i, stats[key]["BatchNorm_0"]["mean"].shape)
        stats[key]["BatchNorm_0"] = {"mean": r["mean"], "var": r["var"]}
        params[key]["BatchNorm_0"] = {"scale": r["scale"], "bias": r["bias"]}
    return module, {"params": params, "batch_stats": stats}


def make_nnx(rate=0.5):
    reseed(1)
    model = NnxNet(nnx.Rngs(0, dropout=1), rate=rate)
    for i, block in enumerate(model.blocks):
        r = _randomize_bn(20 + i, block.bn.mean.shape)
        for name in ("mean", "var", "scale", "bias"):
            getattr(block.bn, name)[...] = r[name]
    return model  # flags as constructed: deterministic=False, use_running_average=False (train mode)


def images(b=B, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, H, W, 3)), jnp.float32)


# ---------------------------------------------------------------- the hand-written reference network
def conv(x, kernel, bias, stride=1):
    y = jax.lax.conv_general_dilated(x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y if bias is None else y + bias


def nnx_weights(m):
    blocks = [{"kernel": b.conv.kernel[...], "bias": b.conv.bias[...], "scale": b.bn.scale[...],
               "bn_bias": b.bn.bias[...], "mean": b.bn.mean[...], "var": b.bn.var[...]} for b in m.blocks]
    return {"blocks": blocks, "fc": (m.fc.kernel[...], m.fc.bias[...])}


def stages(P):
    """The network as (point, function) stages; both Flax models compute exactly this in inference mode."""
    b0, b1 = P["blocks"]

    def bn(h, b):
        return (h - b["mean"]) / jnp.sqrt(b["var"] + 1e-5) * b["scale"] + b["bn_bias"]

    def head(a):
        kernel, bias = P["fc"]
        return jnp.mean(a, axis=(1, 2)) @ kernel + bias

    return [("conv0", lambda h: conv(h, b0["kernel"], b0["bias"])), ("block0", lambda h: jax.nn.relu(bn(h, b0))),
            ("conv1", lambda h: conv(h, b1["kernel"], b1["bias"], 2)), ("block1", lambda h: jax.nn.relu(bn(h, b1))),
            ("logits", head)]


def split(P, point):
    """``(prefix, tail)``: the network cut after ``point``."""
    st = stages(P)
    i = [n for n, _ in st].index(point) + 1

    def run(fs, h):
        for _, f in fs:
            h = f(h)
        return h

    return (lambda x: run(st[:i], x)), (lambda a: run(st[i:], a))


def ref_act_grad(P, point, x, score):
    """Independent reference: the activations after ``point`` and ``d(sum_b score_b)/dA`` by ``jax.grad``,
    channels-first."""
    prefix, tail = split(P, point)
    a = prefix(x)
    g = jax.grad(lambda a: jnp.sum(score(tail(a))))(a)
    return np.moveaxis(np.asarray(a), -1, 1), np.moveaxis(np.asarray(g), -1, 1)


def class_score(t):
    return lambda out: out[jnp.arange(out.shape[0]), jnp.asarray(t)]


def np_gradcam(a, g, normalize=True):
    """Grad-CAM in NumPy: relu(sum_c mean_s(G) * A), then per-sample min-max."""
    a, g = np.asarray(a, np.float64), np.asarray(g, np.float64)
    cam = np.maximum((g.mean(axis=(2, 3))[:, :, None, None] * a).sum(1), 0)
    if not normalize:
        return cam
    lo = cam.min(axis=(1, 2), keepdims=True)
    span = cam.max(axis=(1, 2), keepdims=True) - lo
    return np.where(span > 0, (cam - lo) / np.where(span > 0, span, 1), 0)


def close(actual, expected, rtol=1e-4, atol=1e-5):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------- fixtures
LINEN_LAYERS = {"conv0": "Block_0/Conv_0", "block0": "Block_0", "conv1": "Block_1/Conv_0", "block1": "Block_1"}
NNX_LAYERS = {"conv0": "blocks/0/conv", "block0": "blocks/0", "conv1": "blocks/1/conv", "block1": "blocks/1"}


@pytest.fixture(scope="module")
def linen():
    return make_linen()


@pytest.fixture(scope="module")
def linen_P(linen):
    _, v = linen
    p, s = v["params"], v["batch_stats"]
    blocks = [{"kernel": p[b]["Conv_0"]["kernel"], "bias": p[b]["Conv_0"]["bias"],
               "scale": p[b]["BatchNorm_0"]["scale"], "bn_bias": p[b]["BatchNorm_0"]["bias"],
               "mean": s[b]["BatchNorm_0"]["mean"], "var": s[b]["BatchNorm_0"]["var"]} for b in ("Block_0", "Block_1")]
    return {"blocks": blocks, "fc": (p["Dense_0"]["kernel"], p["Dense_0"]["bias"])}


@pytest.fixture(scope="module")
def nnx_model():
    return make_nnx()


@pytest.fixture(scope="module")
def pair(linen_P):
    prefix, tail = split(linen_P, "block1")
    return prefix, tail


@pytest.fixture(scope="module")
def x():
    return images()


@pytest.fixture(scope="module")
def all_kinds(linen, nnx_model, pair, linen_P):
    P_nnx = nnx_weights(nnx_model)
    return {"linen": (linen, LINEN_LAYERS, linen_P), "nnx": (nnx_model, NNX_LAYERS, P_nnx),
            "pair": (pair, {"block1": "features"}, linen_P)}


def test_reference_network_matches_the_flax_models(linen, linen_P, nnx_model, x):
    """The hand-written network is the models' inference-mode forward pass (so it can serve as a reference)."""
    module, v = linen
    full = split(linen_P, "logits")[0]
    close(module.apply(v, x, train=False), full(x))
    P = nnx_weights(nnx_model)
    close(nnx.view(nnx_model, deterministic=True, use_running_average=True)(x), split(P, "logits")[0](x))


# ------------------------------------------------------------------------------ accepts / adapter_for
def test_accepts_each_kind_and_rejects_others(linen, nnx_model, pair):
    module, v = linen
    assert accepts((module, v)) and accepts(nnx_model) and accepts(pair) and accepts(list(pair))
    for bad in [(1, 2), (module, 3), (pair[0],), (pair[0], pair[1], pair[1]), v, "model", (v, pair[0])]:
        assert not accepts(bad), bad
    assert isinstance(adapter_for((module, v)), JaxAdapter)
    assert isinstance(adapter_for(nnx_model), JaxAdapter)
    with pytest.raises(TypeError, match=r"model: expected .*Flax linen \(module, variables\) pair.*got builtins.tuple"):
        camcore.explain((1, 2), images(), method="gradcam")


def test_function_pair_needs_no_flax():
    """A plain-JAX user without Flax: explaining a function pair imports no flax module."""
    code = textwrap.dedent("""
        import json, sys
        import jax, jax.numpy as jnp, numpy as np
        import camcore
        rng = np.random.default_rng(0)
        w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
        feats = lambda x: jax.nn.relu(jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC")))
        head = lambda a: jnp.mean(a, axis=(1, 2)) @ jnp.ones((4, 3))
        m = camcore.explain((feats, head), jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32),
                            method="gradcam")
        print(json.dumps({"shape": list(m.shape), "flax": sorted(k for k in sys.modules if k.split('.')[0] == 'flax')}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"shape": [2, 8, 8], "flax": []}


# ------------------------------------------------------------------------- gradients vs jax.grad
@pytest.mark.parametrize("kind", ["linen", "nnx", "pair"])
def test_activations_and_grads_match_jax_grad(all_kinds, kind, x):
    model, names, P = all_kinds[kind]
    ad = adapter_for(model)
    t = [3, 1]
    for point, layer in names.items():
        a, g = ref_act_grad(P, point, x, class_score(t))
        outputs, acts, grads = ad.activations_and_grads(x, [layer], t)
        assert isinstance(acts[0], jax.Array) and isinstance(grads[0], jax.Array)
        assert acts[0].shape == a.shape and grads[0].shape == g.shape  # channels-first (B, C, h, w)
        close(acts[0], a)
        close(grads[0], g)
        close(outputs, split(P, "logits")[0](x))


@pytest.mark.parametrize("kind", ["linen", "nnx", "pair"])
def test_gradcam_matches_numpy_oracle(all_kinds, kind, x):
    model, names, P = all_kinds[kind]
    point = "block1"
    a, g = ref_act_grad(P, point, x, class_score([3, 1]))
    raw = camcore.explain(model, x, method="gradcam", layer=names[point], targets=[3, 1], normalize=False,
                          upsample=False)
    close(raw, np_gradcam(a, g, normalize=False), atol=1e-5)
    cams = camcore.explain(model, x, method="gradcam", layer=names[point], targets=[3, 1], upsample=False)
    close(cams, np_gradcam(a, g), atol=1e-5)
    full = camcore.explain(model, x, method="gradcam", layer=names[point], targets=[3, 1])
    assert isinstance(full, jax.Array) and full.shape == (B, H, W) and full.dtype == jnp.float32
    # bilinear upsampling with half-pixel centres, as jax.image.resize does it
    ref = np.asarray(jax.image.resize(jnp.asarray(np_gradcam(a, g, normalize=False), jnp.float32), (B, H, W),
                                      "linear"))
    span = np.ptp(ref, axis=(1, 2), keepdims=True)
    ref = np.where(span > 0, (ref - ref.min((1, 2), keepdims=True)) / np.where(span > 0, span, 1), 0)
    close(full, ref, atol=1e-5)


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_gradcam_equals_cam_on_gap_dense_head(all_kinds, kind, x):
    model, names, _ = all_kinds[kind]
    cam = camcore.explain(model, x, method="cam", layer=names["block1"], targets=[3, 1])
    grad = camcore.explain(model, x, method="gradcam", layer=names["block1"], targets=[3, 1])
    close(cam, grad, atol=1e-5)
    ad = adapter_for(model)
    for _ in range(2):  # before any trace (variables / definition order), then from the trace (call order)
        name, wm, bias = ad.linear_classifier()
        assert name == {"linen": "Dense_0", "nnx": "fc"}[kind] and wm.shape == (K, 12) and bias.shape == (K,)
        ad.default_layer(x)
    fc = model[1]["params"]["Dense_0"]["kernel"] if kind == "linen" else model.fc.kernel[...]
    close(wm, np.asarray(fc).T, atol=0)


def test_cam_on_function_pair_needs_cam_weights(pair, linen_P, x):
    with pytest.raises(ValueError, match=r"classifier: a \(features, head\) pair .* cam_weights="):
        camcore.explain(pair, x, method="cam", targets=[3, 1])
    cam = camcore.explain(pair, x, method="cam", targets=[3, 1], cam_weights=linen_P["fc"][0].T)
    close(cam, camcore.explain(pair, x, method="gradcam", targets=[3, 1]), atol=1e-5)


@pytest.mark.parametrize("kind", ["linen", "nnx", "pair"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_on_every_kind(all_kinds, kind, method, linen_P, x):
    model, names, _ = all_kinds[kind]
    extra = {"cam_weights": linen_P["fc"][0].T} if method == "cam" and kind == "pair" else {}
    extra.update({"num_samples": 2} if method in ("sscam", "iscam") else {})  # the draws are tested elsewhere
    cams = camcore.explain(model, x, method=method, layer=names["block1"], **extra)
    assert isinstance(cams, jax.Array) and cams.shape == (B, H, W) and cams.dtype == jnp.float32
    c = np.asarray(cams)
    assert np.isfinite(c).all() and c.min() >= 0 and c.max() <= 1 and c.max() == pytest.approx(1.0)


def test_default_layer_is_the_last_feature_map(linen, nnx_model, pair, x):
    assert JaxAdapter(linen).default_layer(x) == "Dropout_0"  # the map that global pooling reads
    assert JaxAdapter(nnx_model).default_layer(x) == "drop"
    assert JaxAdapter(pair).default_layer(x) == "features"
    close(camcore.explain(linen, x, method="gradcam"), camcore.explain(linen, x, method="gradcam", layer="Block_1"))
    names = JaxAdapter(linen).layer_names(x)
    assert names[:3] == ["Block_0/Conv_0", "Block_0/BatchNorm_0", "Block_0"] and "Dropout_0" in names


# ------------------------------------------------------------------------ one pass, several layers
@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_multi_layer_one_concrete_forward(all_kinds, kind, x):
    model, names, P = all_kinds[kind]
    layers = [names["block1"], names["conv0"], names["block0"]]
    FORWARDS.clear()
    _, acts, grads = adapter_for(model).activations_and_grads(x, layers, [3, 1])
    assert FORWARDS.count(False) == 1  # one concrete forward pass (the others are abstract traces)
    for point, a_, g_ in zip(["block1", "conv0", "block0"], acts, grads):
        a, g = ref_act_grad(P, point, x, class_score([3, 1]))
        close(a_, a)
        close(g_, g)
    FORWARDS.clear()
    fused = camcore.explain(model, x, method="gradcam", layer=layers, targets=[3, 1])
    assert FORWARDS.count(False) == 1 and fused.shape == (B, H, W)


def test_layer_called_twice_is_taken_at_its_last_call(x):
    module = LinenTwice()
    reseed(3)
    v = module.init(jax.random.key(3), x)
    p = v["params"]
    c0 = lambda h: conv(h, p["Conv_0"]["kernel"], p["Conv_0"]["bias"])
    sh = lambda h: conv(h, p["shared"]["kernel"], p["shared"]["bias"])
    head = lambda a: jnp.mean(jnp.tanh(a), axis=(1, 2)) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    a = sh(jax.nn.relu(sh(c0(x))))  # the second call's output
    g = jax.grad(lambda a: jnp.sum(class_score([0, 4])(head(a))))(a)
    _, acts, grads = JaxAdapter((module, v)).activations_and_grads(x, ["shared"], [0, 4])
    close(acts[0], np.moveaxis(np.asarray(a), -1, 1))
    close(grads[0], np.moveaxis(np.asarray(g), -1, 1))

    reseed(4)
    m = NnxTwice(nnx.Rngs(4))
    c0 = lambda h: conv(h, m.conv.kernel[...], m.conv.bias[...])
    sh = lambda h: conv(h, m.shared.kernel[...], m.shared.bias[...])
    head = lambda a: jnp.mean(jnp.tanh(a), axis=(1, 2)) @ m.fc.kernel[...] + m.fc.bias[...]
    a = sh(jax.nn.relu(sh(c0(x))))
    g = jax.grad(lambda a: jnp.sum(class_score([0, 4])(head(a))))(a)
    _, acts, grads = JaxAdapter(m).activations_and_grads(x, ["shared"], [0, 4])
    close(acts[0], np.moveaxis(np.asarray(a), -1, 1))
    close(grads[0], np.moveaxis(np.asarray(g), -1, 1))
    # masking the shared layer multiplies its last call only
    mask = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 4, 1, 1)), jnp.float32)
    got = JaxAdapter(m).forward_masked(x, mask, at="shared", targets=[0, 4])
    for i, t in enumerate([0, 4]):
        for j in range(3):
            close(got[i, j], head(a[i : i + 1] * mask[j, :, 0, 0])[0, t])


# ------------------------------------------------- forward_masked: probability, progress, paths, the jit cache
def loop_logits(fn, x, masks_cl):
    """(B, M, K) logits by plain loops over samples and masks: ``fn(x_i, mask)``."""
    return np.asarray([[np.asarray(fn(x[i : i + 1], mk))[0] for mk in masks_cl] for i in range(x.shape[0])])


def pick(logits, t):
    return logits[np.arange(logits.shape[0]), :, t]


@pytest.mark.parametrize("at,shape", [("input", (1, H, W)), ("Block_1", (12, 1, 1))])
@pytest.mark.parametrize("per_sample", [False, True])
def test_forward_masked_progress(linen, x, at, shape, per_sample):
    masks = jnp.ones((B, 5, *shape) if per_sample else (5, *shape))
    seen = []
    JaxAdapter(linen).forward_masked(x, masks, at=at, targets=1, batch_size=2, progress=seen.append)
    assert seen == [2, 2, 1, 2, 2, 1]  # one call per chunk, M per sample
    seen.clear()
    JaxAdapter(linen).forward_masked(x, masks, at=at, batch_size=5, progress=seen.append)
    assert seen == [5, 5]


@pytest.mark.parametrize("kind", ["linen", "nnx", "pair"])
def test_forward_masked_paths_and_jit_cache(all_kinds, kind, x):
    """Layer masks take the compiled path, input masks the full one; both equal the hand-written loops, also
    with the eager passes (compilation off); a second call with the same shapes traces nothing again (the model's
    Python runs only in the eager capture pass that finds the layer's activations)."""
    model, names, P = all_kinds[kind]
    rng = np.random.default_rng(22)
    chan = jnp.asarray(rng.uniform(size=(5, 12, 1, 1)) > 0.3, jnp.float32)
    prefix, tail = split(P, "block1")
    ref_layer = pick(loop_logits(lambda xi, m: tail(prefix(xi) * m), x, np.moveaxis(np.asarray(chan), 1, -1)), [2, 0])
    spatial = jnp.asarray(rng.uniform(size=(3, 1, H, W)), jnp.float32)
    full = split(P, "logits")[0]
    ref_input = pick(loop_logits(lambda xi, m: full(xi * m), x, np.moveaxis(np.asarray(spatial), 1, -1)), [2, 0])
    ad = adapter_for(model)
    for rep in range(2):
        FORWARDS.clear()
        info = {}
        close(ad.forward_masked(x, chan, at=names["block1"], targets=[2, 0], batch_size=2, info=info), ref_layer)
        assert info == {"path": "compiled"}
        info = {}
        close(ad.forward_masked(x, spatial, targets=[2, 0], info=info), ref_input)
        assert info == {"path": "full"}
        if rep == 0:
            traced = ad.traces()
        else:
            assert ad.traces() == traced and len(FORWARDS) <= 1  # only the eager capture pass ran the model
    ad.compile = False
    info = {}
    close(ad.forward_masked(x, chan, at=names["block1"], targets=[2, 0], batch_size=2, info=info), ref_layer)
    assert info == {"path": "full"}
    close(ad.forward_masked(x, spatial, targets=[2, 0]), ref_input)


def test_forward_masked_compiled_graph_drops_the_layers_before(linen, x):
    """XLA's dead-code elimination: the compiled chunk function for masks at Block_1 has no convolution left (only
    pooling and the dense head run per chunk); at Block_0, only Block_1's convolution; for input masks, both."""
    module, v = linen
    ad = JaxAdapter(linen)
    S = jax.ShapeDtypeStruct
    for layer, act, convs in [("Block_1", (1, 8, 8, 12), 0), ("Block_0", (1, H, W, 8), 1), (None, None, 2)]:
        c = 1 if layer is None else act[-1]
        masks = jnp.ones((2, 1, H, W)) if layer is None else jnp.ones((2, c, 1, 1))
        ad.forward_masked(x, masks, at=layer or "input", targets=1)
        (fn,) = [f for k, f in ad._jits.items() if k[:2] == ("chunk", layer)]
        native = (2, H, W, 1) if layer is None else (2, 1, 1, c)  # the masks' channel axis moved last
        hlo = fn.lower(v, S((1, H, W, 3), jnp.float32), None if act is None else S(act, jnp.float32),
                       S(native, jnp.float32)).compile().as_text()
        assert hlo.count("convolution(") == convs, layer


class LinenSkip(nn.Module):
    """A skip connection around the masked ``mid`` conv: ``relu(conv1(relu(mid(h))) + h)`` with ``h = conv0(x)``."""

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(6, (3, 3), name="conv0", **INIT)(x)
        a = nn.relu(nn.Conv(6, (3, 3), name="mid", **INIT)(h))
        y = nn.relu(nn.Conv(6, (3, 3), name="conv1", **INIT)(a) + h)
        return nn.Dense(K, name="fc", **INIT)(jnp.mean(y, axis=(1, 2)))


def test_forward_masked_skip_connection_around_the_layer(x):
    module = LinenSkip()
    reseed(6)
    v = module.init(jax.random.key(6), x)
    p = v["params"]
    cv = lambda h, n: conv(h, p[n]["kernel"], p[n]["bias"])  # noqa: E731

    def by_hand(xi, m):  # the prefix gives both the skip (h) and the masked activations
        h = cv(xi, "conv0")
        y = jax.nn.relu(cv(jax.nn.relu(cv(h, "mid") * m), "conv1") + h)
        return jnp.mean(y, axis=(1, 2)) @ p["fc"]["kernel"] + p["fc"]["bias"]

    masks = jnp.asarray(np.random.default_rng(23).uniform(size=(B, 4, 6, 1, 1)) > 0.5, jnp.float32)
    ref = np.stack([pick(loop_logits(by_hand, x[i : i + 1], np.moveaxis(np.asarray(masks[i]), 1, -1)), [t])[0]
                    for i, t in enumerate([1, 3])])
    for compiled in (True, False):
        ad = JaxAdapter((module, v))
        ad.compile = compiled
        info = {}
        close(ad.forward_masked(x, masks, at="mid", targets=[1, 3], batch_size=3, info=info), ref)
        assert info == {"path": "compiled" if compiled else "full"}
    assert np.ptp(ref) > 1e-3


def test_forward_masked_shared_layer_last_call_both_paths(x):
    """A module called twice is masked at its last call, on the compiled path and on the eager one."""
    module = LinenTwice()
    reseed(3)
    v = module.init(jax.random.key(3), x)
    p = v["params"]
    c0 = lambda h: conv(h, p["Conv_0"]["kernel"], p["Conv_0"]["bias"])  # noqa: E731
    sh = lambda h: conv(h, p["shared"]["kernel"], p["shared"]["bias"])  # noqa: E731
    head = lambda a: jnp.mean(jnp.tanh(a), axis=(1, 2)) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]  # noqa: E731
    masks = jnp.asarray(np.random.default_rng(24).uniform(size=(3, 4, 1, 1)), jnp.float32)
    cl = np.moveaxis(np.asarray(masks), 1, -1)
    last = pick(loop_logits(lambda xi, m: head(sh(jax.nn.relu(sh(c0(xi)))) * m), x, cl), [0, 4])
    first = pick(loop_logits(lambda xi, m: head(sh(jax.nn.relu(sh(c0(xi)) * m))), x, cl), [0, 4])
    assert np.abs(last - first).max() > 1e-3
    for compiled in (True, False):
        ad = JaxAdapter((module, v))
        ad.compile = compiled
        info = {}
        close(ad.forward_masked(x, masks, at="shared", targets=[0, 4], batch_size=2, info=info), last)
        assert info == {"path": "compiled" if compiled else "full"}


def counting_pair(P):
    """The hand-written network as a (features, head) pair whose features record the batch size of every run
    (``jax.debug.callback`` runs at each execution, jitted or not) and count Python traces."""
    prefix, tail = split(P, "block1")
    runs, traces = [], []

    def features(z):
        traces.append(z.shape[0])
        n = z.shape[0]
        jax.debug.callback(lambda: runs.append(n))
        return prefix(z)

    return (features, tail), runs, traces


def test_forward_masked_input_masks_run_no_extra_forward_pass(linen_P, x):
    """Input masks with class indices: only the masked passes run (no unmasked one); targets=None adds one.
    Repeated calls reuse the jitted function: no new trace."""
    pair, runs, traces = counting_pair(linen_P)
    masks = jnp.asarray(np.random.default_rng(25).uniform(size=(5, 1, H, W)), jnp.float32)
    full = split(linen_P, "logits")[0]
    logits = loop_logits(lambda xi, m: full(xi * m), x, np.moveaxis(np.asarray(masks), 1, -1))
    ad = JaxAdapter(pair)
    for targets, idx in [([2, 0], [2, 0]), (3, [3, 3]), ([2, 0], [2, 0])]:
        runs.clear()
        close(ad.forward_masked(x, masks, targets=targets, batch_size=2), pick(logits, idx))
        jax.effects_barrier()
        assert runs == [2, 2, 1] * B
    assert sorted(traces) == [1, 2]  # one trace per chunk shape, for all three calls
    runs.clear()
    top = np.argmax(np.asarray(full(x)), axis=1).tolist()
    close(ad.forward_masked(x, masks, batch_size=2), pick(logits, top))
    jax.effects_barrier()
    assert runs == [B] + [2, 2, 1] * B  # the unmasked pass for the top classes, then the chunks
    with pytest.raises(ValueError, match=r"targets: class index 5 is out of range for a model with 5 outputs"):
        ad.forward_masked(x, masks, targets=[1, 5])


@pytest.mark.parametrize("at", ["input", "features"])
def test_forward_masked_falls_back_to_eager_when_jit_fails(linen_P, x, at):
    """A head with a host (NumPy) step runs eagerly but cannot be jitted: the eager passes run instead, with
    info["reason"] and a RuntimeWarning; the scores are the plain loop's."""
    prefix, tail = split(linen_P, "block1")
    kernel, bias = linen_P["fc"]

    def host_head(a):
        pooled = np.tanh(np.asarray(jnp.mean(a, axis=(1, 2))))  # on the host: fails under tracing
        return jnp.asarray(pooled) @ kernel + bias

    rng = np.random.default_rng(26)
    if at == "input":
        masks = jnp.asarray(rng.uniform(size=(3, 1, H, W)), jnp.float32)
        fn = lambda xi, m: host_head(prefix(xi * m))  # noqa: E731
    else:
        masks = jnp.asarray(rng.uniform(size=(3, 12, 1, 1)) > 0.3, jnp.float32)
        fn = lambda xi, m: host_head(prefix(xi) * m)  # noqa: E731
    ref = pick(loop_logits(fn, x, np.moveaxis(np.asarray(masks), 1, -1)), [1, 2])
    ad = JaxAdapter((prefix, host_head))
    for _ in range(2):  # the failure is remembered: the second call goes straight to the eager passes
        info = {}
        with pytest.warns(RuntimeWarning, match=r"forward_masked: ran the whole model eagerly .*instead of jitting"):
            got = ad.forward_masked(x, masks, at=at, targets=[1, 2], batch_size=2, info=info)
        assert info["path"] == "full"
        assert "TracerArrayConversionError" in info["reason"] and "\n" not in info["reason"]
        close(got, ref)


def test_forward_masked_model_error_is_not_a_fallback(linen_P, x):
    """A model that raises eagerly too: its error comes out, with no warning about jit."""
    prefix, tail = split(linen_P, "block1")

    def head(a):
        raise RuntimeError("boom: the head failed")

    for at, masks in [("input", jnp.ones((2, 1, H, W))), ("features", jnp.ones((2, 12, 1, 1)))]:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            with pytest.raises(RuntimeError, match="boom: the head failed"):
                JaxAdapter((prefix, head)).forward_masked(x, masks, at=at, targets=1)


# ----------------------------------------------------------------------------------------- jit
def test_jit_linen_equals_eager(linen, x):
    module, v = linen
    for method, layer in [("gradcam++", ["Block_0", "Block_1/Conv_0"]), ("cam", None)]:
        f = jax.jit(lambda v, x: camcore.explain((module, v), x, method=method, layer=layer))
        close(f(v, x), camcore.explain((module, v), x, method=method, layer=layer), atol=1e-5, rtol=0)
    masks = jnp.asarray(np.random.default_rng(2).uniform(size=(3, 12, 1, 1)), jnp.float32)
    fm = jax.jit(lambda v, x: JaxAdapter((module, v)).forward_masked(x, masks, at="Block_1", batch_size=2))
    close(fm(v, x), JaxAdapter((module, v)).forward_masked(x, masks, at="Block_1"), atol=1e-5, rtol=0)


def test_jit_nnx_equals_eager(nnx_model, x):
    eager = camcore.explain(nnx_model, x, method="gradcam", layer="blocks/1/conv", targets=[3, 1])
    graphdef, state = nnx.split(nnx_model)
    f = jax.jit(lambda s, x: camcore.explain(nnx.merge(graphdef, s), x, method="gradcam", layer="blocks/1/conv",
                                             targets=[3, 1]))
    close(f(state, x), eager, atol=1e-5, rtol=0)
    g = nnx.jit(lambda m, x: camcore.explain(m, x, method="gradcam", layer="blocks/1/conv", targets=[3, 1]))
    close(g(nnx_model, x), eager, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["layercam", "eigengradcam"])
def test_jit_pair_equals_eager(pair, x, method):
    f = jax.jit(lambda x: camcore.explain(pair, x, method=method))
    close(f(x), camcore.explain(pair, x, method=method), atol=1e-5, rtol=0)


def test_concrete_and_numpy_inputs(linen, x):
    assert JaxAdapter.concrete(x) and JaxAdapter.concrete(np.ones(2))
    seen = []
    jax.jit(lambda z: seen.append(JaxAdapter.concrete(z)) or z)(x)
    assert seen == [False]
    out = camcore.explain(linen, np.asarray(x), method="gradcam", layer="Block_1")
    assert isinstance(out, jax.Array)  # maps are a jax.Array also for NumPy inputs
    close(out, camcore.explain(linen, x, method="gradcam", layer="Block_1"), atol=1e-6)


def test_channels_first_function_pair(pair, x):
    prefix, tail = pair
    cf = (lambda z: jnp.moveaxis(prefix(jnp.moveaxis(z, 1, -1)), -1, 1),
          lambda a: tail(jnp.moveaxis(a, 1, -1)))
    xcf = jnp.moveaxis(x, -1, 1)
    for method in ["gradcam", "hirescam", "eigencam"]:
        close(camcore.explain(cf, xcf, method=method, data_format="channels_first"),
              camcore.explain(pair, x, method=method), atol=1e-5)
    masks = jnp.asarray(np.random.default_rng(3).uniform(size=(2, 12, 1, 1)), jnp.float32)
    close(JaxAdapter(cf, data_format="channels_first").forward_masked(xcf, masks, at="features"),
          JaxAdapter(pair).forward_masked(x, masks, at="features"))


# --------------------------------------------------------------------------- the model is untouched
def _host(a):
    return np.array(jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a)


def _tree_snapshot(tree):
    return jax.tree_util.tree_structure(tree), [_host(a) for a in jax.tree.leaves(tree)]


def _assert_same(tree, snap):
    struct, leaves = snap
    assert jax.tree_util.tree_structure(tree) == struct
    for a, b in zip(jax.tree.leaves(tree), leaves):
        np.testing.assert_array_equal(_host(a), b)


def _nnx_snapshot(model):
    flags = [(p, type(m).__name__, getattr(m, "deterministic", None), getattr(m, "use_running_average", None))
             for p, m in nnx.iter_modules(model)]
    return flags, _tree_snapshot(nnx.state(model))


def _boom(out):
    raise RuntimeError("boom")


def test_linen_as_is_uses_batch_statistics_and_leaves_variables(x):
    module, v = make_linen()
    module = module.clone(rate=0.0)  # dropout off, so train mode is deterministic without an RNG
    snap = _tree_snapshot(v)
    _, acts, _ = JaxAdapter((module, v), model_mode="as-is").activations_and_grads(x, ["Block_1"], [3, 1])
    _, state = module.apply(v, x, mutable=["batch_stats"])  # train=True: batch statistics
    expected = module.apply(v, x, mutable=["batch_stats", "intermediates"],
                            capture_intermediates=lambda mdl, name: mdl.path == ("Block_1",))[1]
    a = expected["intermediates"]["Block_1"]["__call__"][0]
    close(acts[0], np.moveaxis(np.asarray(a), -1, 1))
    _, eval_acts, _ = JaxAdapter((module, v)).activations_and_grads(x, ["Block_1"], [3, 1])
    assert not np.allclose(np.asarray(acts[0]), np.asarray(eval_acts[0]), atol=1e-3)
    _assert_same(v, snap)


@pytest.mark.parametrize("mode", ["eval", "as-is"])
def test_nnx_state_and_flags_untouched(mode, x):
    model = make_nnx()
    model.blocks[1].bn.use_running_average = True  # mixed flags must survive as they are
    snap = _nnx_snapshot(model)
    ad = JaxAdapter(model, model_mode=mode)
    out = camcore.explain(model, x, method="gradcam", layer=["blocks/0", "blocks/1/conv"], model_mode=mode)
    assert np.isfinite(np.asarray(out)).all()
    ad.forward_masked(x, jnp.ones((2, 1, H, W)))
    ad.forward_masked(x, jnp.ones((2, 8, 1, 1)), at="blocks/0/conv")
    ad.default_layer(x)
    with pytest.raises(RuntimeError, match="boom"):
        ad.activations_and_grads(x, ["blocks/1"], _boom)
    flags, state = _nnx_snapshot(model)
    assert flags == snap[0]
    _assert_same(nnx.state(model), snap[1])
    assert type(model.blocks[1]) is NnxBlock and type(model.blocks[0].conv) is nnx.Conv  # no wrapper left


def test_nnx_eval_mode_really_is_inference(x):
    model = make_nnx()
    P = nnx_weights(model)
    a, _ = ref_act_grad(P, "block1", x, class_score([0, 0]))
    _, acts, _ = JaxAdapter(model).activations_and_grads(x, ["blocks/1"], [0, 0])
    close(acts[0], a)  # running statistics, although the module itself is in train mode
    assert model.blocks[0].bn.use_running_average is False and model.drop.deterministic is False


# ------------------------------------------------------------------------------------- layer naming
def test_nnx_layer_spellings(nnx_model, x):
    ad = JaxAdapter(nnx_model)
    for spelling in ["blocks/1/conv", "blocks.1.conv", ("blocks", 1, "conv"), ["blocks", 1, "conv"],
                     nnx_model.blocks[1].conv]:
        assert ad.resolve_layer(spelling)[0] == "blocks/1/conv"
    assert "blocks/0/bn" in ad.layer_names() and "fc" in ad.layer_names()
    linen = make_linen()
    assert JaxAdapter(linen).resolve_layer(("Block_1", "Conv_0")) == ("Block_1/Conv_0", ("Block_1", "Conv_0"))
    # explain reads a bare tuple as several layers: a tuple path goes inside a list
    for model, path, name in [(linen, ("Block_1", "Conv_0"), "Block_1/Conv_0"),
                              (nnx_model, ("blocks", 1, "conv"), "blocks/1/conv")]:
        close(camcore.explain(model, x, method="gradcam", layer=[path]),
              camcore.explain(model, x, method="gradcam", layer=name), atol=0)


# ------------------------------------------------------------------------------------------- errors
def test_errors(linen, nnx_model, pair, x):
    with pytest.raises(ValueError, match=r"layer: no layer named 'Block_1/Conv_1'.*closest real names: "
                                         r"'Block_1/Conv_0'"):
        camcore.explain(linen, x, method="gradcam", layer="Block_1/Conv_1")
    with pytest.raises(ValueError, match=r"layer: no layer named 'blocks/1/conf'.*'blocks/1/conv'"):
        camcore.explain(nnx_model, x, method="gradcam", layer="blocks/1/conf")
    with pytest.raises(ValueError, match=r"data_format: expected one of \('channels_last', 'channels_first'\) "
                                         r"or None, got 'NHWC'"):
        camcore.explain(linen, x, method="gradcam", data_format="NHWC")
    with pytest.raises(ValueError, match=r"model_mode: expected one of \('eval', 'as-is'\), got 'train'"):
        camcore.explain(nnx_model, x, method="gradcam", model_mode="train")
    with pytest.raises(TypeError, match=r"inputs: expected a jax.Array or a NumPy array \(B, \*spatial, C\) .*"
                                        r"got list"):
        camcore.explain(linen, x.tolist(), method="gradcam")
    with pytest.raises(TypeError, match=r"inputs: expected a floating-point array .*got dtype int32"):
        camcore.explain(linen, jnp.ones((2, 16, 16, 3), jnp.int32), method="gradcam")
    with pytest.raises(ValueError, match=r"inputs: expected a non-empty batch .*got shape \(0, 16, 16, 3\)"):
        camcore.explain(pair, jnp.ones((0, 16, 16, 3)), method="gradcam")
    with pytest.raises(ValueError, match=r"layer: a \(features, head\) pair of functions has one layer, "
                                         r"'features'.*got 'Conv_0'"):
        camcore.explain(pair, x, method="gradcam", layer="Conv_0")
    with pytest.raises(TypeError, match=r"layer: expected an nnx attribute path"):
        camcore.explain(nnx_model, x, method="gradcam", layer=3.0)
    with pytest.raises(ValueError, match=r"layer: 'unused' did not run"):
        camcore.explain(nnx_model, x, method="gradcam", layer="unused")


def test_errors_tuple_output_and_train_only_layer(x):
    module = LinenOdd()
    reseed(5)
    v = module.init(jax.random.key(5), x, train=True)
    with pytest.raises(TypeError, match=r"layer: 'Pair2_0' returns tuple, not an array"):
        camcore.explain((module, v), x, method="gradcam", layer="Pair2_0")
    with pytest.raises(ValueError, match=r"layer: 'train_only' did not run during the forward pass"):
        camcore.explain((module, v), x, method="gradcam", layer="train_only")
    with pytest.raises(TypeError, match=r"at: 'Pair2_0' returns tuple, not an array"):
        JaxAdapter((module, v)).forward_masked(x, jnp.ones((2, 4, 1, 1)), at="Pair2_0")
    with pytest.raises(ValueError, match=r"at: layer 'train_only' did not run during the forward pass"):
        JaxAdapter((module, v)).forward_masked(x, jnp.ones((2, 4, 1, 1)), at="train_only")
    assert camcore.explain((module, v), x, method="gradcam", layer="Pair2_0/Conv_0").shape == (B, H, W)


def test_zero_gradient_is_reported(pair, x):
    """A head that ignores the features: explain's check names the layer and the samples."""
    with pytest.raises(ValueError, match=r"zero gradient w.r.t. 'features' for sample\(s\) \[0, 1\]"):
        camcore.explain((pair[0], lambda a: jnp.zeros((a.shape[0], K))), x, method="gradcam")
