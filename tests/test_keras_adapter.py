"""The Keras 3 adapter (TensorFlow backend) and ``camcore.explain`` on real Keras models (no mocks).

Every reference value here is computed independently of camcore: the network split by hand into a prefix
(``keras.Model(m.input, m.get_layer(name).output)`` or the layers called one by one) and a tail called by hand on
a watched tensor under our own ``tf.GradientTape``; a NumPy Grad-CAM written from the equation;
``tf.image.resize`` for the upsampling; plain Python loops for masked forward passes.

Cases every backend shares (int/list/None/callable targets, masked scores and their batching, probability,
mask/batch-size/input-dtype errors, unknown layer names, the model left alone) are checked once for all
kinds against a NumPy oracle in ``test_contract.py``; this file keeps the rest.
"""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import camcore  # noqa: E402
from camcore.backends import adapter_for  # noqa: E402
from camcore.backends.keras import KerasAdapter  # noqa: E402

import keras_models as km  # noqa: E402

ALL_METHODS = [m for m, s in camcore.METHODS.items() if not (s.rule or s.guided)]  # the maps (B, *S)
L = keras.layers


# ---------------------------------------------------------------------------------------------- helpers
_CASES: dict = {}


def case(kind):
    """The model of ``kind`` (built once per test session; tests never change it -- that is checked)."""
    if kind not in _CASES:
        _CASES[kind] = km.BUILDERS[kind]()
    return _CASES[kind]


def all_layers(model):
    return list(model._flatten_layers(include_self=True, recursive=True))


def snapshot(model):
    """Every variable of the model (trainable, non-trainable, seed-generator states), copied."""
    return [(v.path, np.array(v.numpy(), copy=True)) for v in model.variables]


def assert_untouched(model, snap):
    now = snapshot(model)
    assert [p for p, _ in now] == [p for p, _ in snap]
    for (path, before), (_, after) in zip(snap, now):
        assert before.dtype == after.dtype and np.array_equal(before, after), f"{path} changed"
    for layer in all_layers(model):
        assert "call" not in layer.__dict__, f"{layer.name}.call left patched"


def to_cf(a, channels_last=True):
    """A native activation as NumPy channels-first (B, C, *S), moved by hand."""
    a = np.asarray(a)
    return np.moveaxis(a, -1, 1) if channels_last else a


def run_chain(chain, h, start=0, stop=None):
    for _, layer in chain[start:stop]:
        h = layer(h, training=False)
    return h


def hand_split(c, layer):
    """``(prefix, tail)``: ``prefix(x) -> A`` (the layer's output, native layout) and ``tail(A) -> logits``."""
    paths = [p for p, _ in c.chain]
    k = paths.index(layer)
    if c.kind == "functional":
        sub = keras.Model(c.model.input, c.model.get_layer(layer).output)
        prefix = lambda x: sub(x, training=False)  # noqa: E731
    elif c.kind == "nested":
        backbone = c.extra["backbone"]
        sub = keras.Model(backbone.input, backbone.get_layer(layer.split("/")[1]).output)
        prefix = lambda x: sub(x, training=False)  # noqa: E731
    else:
        prefix = lambda x: run_chain(c.chain, x, 0, k + 1)  # noqa: E731
    return prefix, lambda a: run_chain(c.chain, a, k + 1)


def class_score(targets):
    return lambda out: tf.gather(out, targets, axis=1, batch_dims=1)


def reference(prefix, tail, x, score_fn):
    """Independent ``(outputs, A, dA)``: the prefix, then the tail on a watched tensor under our own tape."""
    a = tf.convert_to_tensor(prefix(tf.convert_to_tensor(x)))
    with tf.GradientTape() as tape:
        tape.watch(a)
        out = tail(a)
        total = tf.reduce_sum(score_fn(out))
    return out, a.numpy(), tape.gradient(total, a).numpy()


def ref_case(c, layer, score_fn, x=None):
    prefix, tail = hand_split(c, layer)
    out, a, g = reference(prefix, tail, c.x if x is None else x, score_fn)
    return np.asarray(out), to_cf(a, c.channels_last), to_cf(g, c.channels_last)


def np_gradcam(a, g, counterfactual=False):
    """Grad-CAM from the equation, NumPy, channels-first: w_c = mean_ij dy/dA_c, relu(sum_c w_c A_c); the
    counterfactual map explains -y (Grad-CAM sec. 3.2)."""
    axes = tuple(range(2, a.ndim))
    w = g.astype(np.float64).mean(axis=axes)
    raw = np.einsum("bc...,bc->b...", a.astype(np.float64), w)
    return np.maximum(-raw if counterfactual else raw, 0.0)


def np_eigencam(a):
    """Eigen-CAM from its definition: each sample's positions as points in R^C, centred, projected on the first
    right singular vector; the sign chosen so the projection correlates non-negatively with each position's energy
    (sum of squares over channels); relu."""
    maps = []
    for sample in a.astype(np.float64):
        raw = sample.reshape(sample.shape[0], -1).T  # (N, C)
        pts = raw - raw.mean(axis=0)
        _, _, vt = np.linalg.svd(pts, full_matrices=False)
        proj = pts @ vt[0]
        if np.dot(proj, (raw**2).sum(axis=1)) < 0:
            proj = -proj
        maps.append(np.maximum(proj, 0.0).reshape(sample.shape[1:]))
    return np.stack(maps)


def minmax(cam):
    cam = np.asarray(cam, dtype=np.float64)
    axes = tuple(range(1, cam.ndim))
    lo = cam.min(axis=axes, keepdims=True)
    span = cam.max(axis=axes, keepdims=True) - lo
    return np.where(span > 0, (cam - lo) / np.where(span > 0, span, 1.0), 0.0)


def tf_resize(cam, size):
    """Linear resize of (B, *S) maps with ``tf.image.resize`` (bilinear, half-pixel centres), 1-3 spatial dims."""
    cam = tf.convert_to_tensor(np.asarray(cam, dtype=np.float32))
    if len(size) == 1:
        return tf.image.resize(cam[:, :, None, None], (size[0], 1), "bilinear")[:, :, 0, 0].numpy()
    if len(size) == 2:
        return tf.image.resize(cam[..., None], size, "bilinear")[..., 0].numpy()
    b, d, h, w = cam.shape
    hw = tf.image.resize(tf.reshape(cam, (b * d, h, w, 1)), size[1:], "bilinear")  # (B*D, H', W', 1)
    hw = tf.reshape(hw, (b, d, size[1] * size[2], 1))
    return tf.reshape(tf.image.resize(hw, (size[0], size[1] * size[2]), "bilinear"), (b, *size)).numpy()


def close(actual, expected, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                               rtol=rtol, atol=atol)


def top_classes(model, x):
    return np.argmax(np.asarray(model(x, training=False)), axis=1).tolist()


KINDS = list(km.BUILDERS)
TARGETS = {10: [3, 7, 1], 6: [0, 5, 2], 5: [4, 1, 2]}


def targets_for(c):
    return TARGETS[c.num_classes][: c.x.shape[0]]


# ------------------------------------------------------------------------------------------- 1. model kinds
def test_tf_keras_is_keras_3():
    """With Keras 3 installed, ``tf.keras`` resolves to Keras 3 itself (``keras._tf_keras``): the same classes."""
    assert tf.keras.Model is keras.Model and tf.keras.layers.Conv2D is keras.layers.Conv2D
    assert isinstance(case("tf.keras").model, keras.Model)


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_for_picks_keras_adapter(kind):
    assert type(adapter_for(case(kind).model)) is KerasAdapter
    assert adapter_for(case(kind).model).channels_last is case(kind).channels_last


def test_adapter_for_bare_layer_and_options():
    block = km.ConvBlock(4)
    block(km.images())
    ad = adapter_for(block, model_mode="as-is", data_format="channels_last")  # channels_first: refused (its
    assert type(ad) is KerasAdapter and ad.model_mode == "as-is" and ad.channels_last is True  # conv is channels_last)
    assert ad.layer_names() == ["conv", "bn", "relu"]


def test_layer_names_and_paths():
    assert KerasAdapter(case("functional").model).layer_names() == [p for p, _ in case("functional").chain]
    nested = KerasAdapter(case("nested").model)
    assert nested.layer_names() == ["backbone"] + [p for p, _ in case("nested").chain]
    sub = KerasAdapter(case("subclassed").model)
    assert sub.layer_names() == ["block1", "block1/conv", "block1/bn", "block1/relu", "block2", "block2/conv",
                                 "block2/bn", "block2/relu", "gap", "drop", "fc"]
    # a nested layer by its bare name (unique) and by its path: the same layer object
    m = case("nested")
    inner = m.extra["backbone"].get_layer("conv2")
    assert nested.resolve_layer("conv2") == ("backbone/conv2", inner)
    assert nested.resolve_layer("backbone/conv2") == ("backbone/conv2", inner)
    assert nested.resolve_layer(inner) == ("backbone/conv2", inner)
    by_name = camcore.explain(m.model, m.x, method="gradcam", layer="relu1", targets=[3, 7])
    by_path = camcore.explain(m.model, m.x, method="gradcam", layer="backbone/relu1", targets=[3, 7])
    close(by_name, by_path, rtol=0, atol=0)
    # a top-level layer's bare name
    assert nested.resolve_layer("fc") == ("fc", m.model.get_layer("fc"))


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_method_on_every_model_kind(kind, method):
    """Finite maps in [0, 1] of shape (B, *S) whatever the layout; tf.Tensor in -> tf.Tensor out, NumPy in ->
    NumPy out (the same values); the model untouched afterwards."""
    c = case(kind)
    snap = snapshot(c.model)
    cams = camcore.explain(c.model, tf.constant(c.x), method=method, layer=c.cam_layer)
    assert tf.is_tensor(cams) and cams.dtype == tf.float32
    assert tuple(cams.shape) == (c.x.shape[0], *c.spatial)
    arr = cams.numpy()
    assert np.all(np.isfinite(arr)) and arr.min() >= 0.0 and arr.max() <= 1.0
    assert arr.max() == 1.0  # not a degenerate (all-zero) map on these models
    as_np = camcore.explain(c.model, c.x, method=method, layer=c.cam_layer)
    assert isinstance(as_np, np.ndarray) and as_np.dtype == np.float32
    close(as_np, arr, rtol=0, atol=1e-6)
    assert_untouched(c.model, snap)


# ------------------------------------------------------------------------ 2. independent references
@pytest.mark.parametrize("kind", KINDS)
def test_activations_and_grads_match_hand_split(kind):
    c = case(kind)
    targets = targets_for(c)
    for layer in (c.cam_layer, c.mid_layer):
        out_ref, a, g = ref_case(c, layer, class_score(targets))
        outputs, acts, grads = KerasAdapter(c.model).activations_and_grads(c.x, [layer], targets)
        assert isinstance(outputs, np.ndarray) and isinstance(acts[0], np.ndarray)
        assert acts[0].shape == a.shape and grads[0].shape == g.shape  # channels-first (B, C, *S)
        close(outputs, out_ref)
        close(acts[0], a)
        close(grads[0], g)
        assert np.abs(g).max() > 0
    # gradients=False: activations only
    _, acts, grads = KerasAdapter(c.model).activations_and_grads(c.x, [c.mid_layer], targets, gradients=False)
    close(acts[0], ref_case(c, c.mid_layer, class_score(targets))[1])
    assert grads == [None]


@pytest.mark.parametrize("kind", KINDS)
def test_gradcam_matches_numpy_oracle(kind):
    c = case(kind)
    targets = targets_for(c)
    for layer in (c.cam_layer, c.mid_layer):
        _, a, g = ref_case(c, layer, class_score(targets))
        raw = np_gradcam(a, g)
        got_raw = camcore.explain(c.model, c.x, method="gradcam", layer=layer, targets=targets, normalize=False,
                                  upsample=False)
        close(got_raw, raw, rtol=1e-4, atol=1e-6)
        got = camcore.explain(c.model, c.x, method="gradcam", layer=layer, targets=targets, upsample=False)
        close(got, minmax(raw), rtol=1e-4, atol=1e-5)
        # the upsampling on its own: linear, half-pixel centres, as tf.image.resize
        up = camcore.explain(c.model, c.x, method="gradcam", layer=layer, targets=targets, normalize=False)
        close(up, tf_resize(got_raw, c.spatial), rtol=1e-5, atol=1e-6)
        full = camcore.explain(c.model, c.x, method="gradcam", layer=layer, targets=targets)
        close(full, minmax(tf_resize(raw, c.spatial)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcam_equals_cam_on_gap_dense_head(kind):
    """On a layer read by global average pooling + Dense, dy_c/dA_k = W[k, c] / N at every position, so Grad-CAM
    weights are CAM's divided by N (Grad-CAM paper, sec. 3.1): equal maps after normalisation. CAM itself is
    checked against the Dense kernel read by hand."""
    c = case(kind)
    targets = targets_for(c)
    gc = camcore.explain(c.model, c.x, method="gradcam", layer=c.cam_layer, targets=targets, upsample=False,
                         normalize=False)
    cam = camcore.explain(c.model, c.x, method="cam", layer=c.cam_layer, targets=targets, upsample=False,
                          normalize=False)
    n = np.prod(np.asarray(cam).shape[1:])
    close(cam, np.asarray(gc) * n, rtol=1e-4, atol=1e-5)
    kernel = c.model.get_layer("fc").kernel.numpy()  # (C, K)
    a = ref_case(c, c.cam_layer, class_score(targets))[1]
    w = kernel[:, targets].T  # (B, C)
    expected = np.maximum(np.einsum("bc...,bc->b...", a.astype(np.float64), w), 0.0)
    close(cam, expected, rtol=1e-4, atol=1e-5)
    close(camcore.explain(c.model, c.x, method="cam", layer=c.cam_layer, targets=targets),
          camcore.explain(c.model, c.x, method="gradcam", layer=c.cam_layer, targets=targets), atol=1e-5)


@pytest.mark.parametrize("kind", ["functional", "subclassed", "conv1d"])
def test_counterfactual_gradcam(kind):
    c = case(kind)
    targets = targets_for(c)
    _, a, g = ref_case(c, c.mid_layer, class_score(targets))
    got = camcore.explain(c.model, c.x, method="gradcam", layer=c.mid_layer, targets=targets, counterfactual=True,
                          upsample=False, normalize=False)
    close(got, np_gradcam(a, g, counterfactual=True), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["functional", "nested", "channels_first", "conv3d"])
def test_eigencam_matches_numpy_svd(kind):
    c = case(kind)
    a = ref_case(c, c.mid_layer, class_score([0] * c.x.shape[0]))[1]
    got = camcore.explain(c.model, c.x, method="eigencam", layer=c.mid_layer, upsample=False)
    close(got, minmax(np_eigencam(a)), rtol=1e-4, atol=1e-4)


def test_bare_layer_with_feature_map_outputs():
    """A keras.layers.Layer (not a Model) as the model, with (B, H, W, C) outputs: a callable target (a
    segmentation-like region score) against a hand split; a class index is refused with a clear message."""
    keras.utils.set_random_seed(0)
    block = km.ConvBlock(4, name="blk")
    x = km.images()
    block(x)
    km.randomize_batchnorm(block)
    region = np.zeros((16, 16), np.float32)
    region[3:11, 5:14] = 1.0

    def target(out):
        return tf.reduce_sum(out[..., 1] * region, axis=(1, 2))

    out, a, g = reference(lambda t: block.conv(t), lambda t: block.relu(block.bn(t, training=False)), x, target)
    snap = snapshot(block)
    _, acts, grads = KerasAdapter(block).activations_and_grads(x, ["conv"], target)
    close(acts[0], to_cf(a))
    close(grads[0], to_cf(g))
    cams = camcore.explain(block, x, method="gradcam", layer="conv", targets=target)
    close(cams, minmax(np_gradcam(to_cf(a), to_cf(g))), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"targets: a class index needs model outputs of shape \(B, num_classes\), "
                                         r"but the model returned shape \(2, 16, 16, 4\); pass a callable"):
        camcore.explain(block, x, method="gradcam", layer="conv", targets=1)
    assert_untouched(block, snap)


def test_mixed_float16_model():
    """A model under the mixed_float16 policy (float16 activations and gradients): float32 maps close to those
    of the same weights in float32. float16 keeps 11 significant bits; two conv+BN layers and the backward pass
    stay within 2% of the map's [0, 1] range."""
    ref = case("functional")
    keras.config.set_dtype_policy("mixed_float16")
    try:
        mixed = km.functional()
    finally:
        keras.config.set_dtype_policy("float32")
    mixed.model.set_weights(ref.model.get_weights())
    targets = targets_for(ref)
    _, acts, grads = KerasAdapter(mixed.model).activations_and_grads(ref.x, ["relu2"], targets)
    assert acts[0].dtype == np.float16 and grads[0].dtype == np.float16
    snap = snapshot(mixed.model)
    cams = camcore.explain(mixed.model, tf.constant(ref.x), method="gradcam", layer="relu2", targets=targets)
    assert cams.dtype == tf.float32 and tuple(cams.shape) == (2, 16, 16)
    expected = camcore.explain(ref.model, ref.x, method="gradcam", layer="relu2", targets=targets)
    assert np.abs(cams.numpy() - expected).max() < 0.02
    assert_untouched(mixed.model, snap)


def test_vision_transformer_tokens_to_grid():
    model = km.tiny_vit()
    x = km.images(h=32, w=32)
    targets = [1, 4]
    prefix = keras.Model(model.input, model.get_layer("ln").output)

    def tail(t):
        h = model.get_layer("residual")([t, model.get_layer("attn")(t, t)])
        return model.get_layer("head")(model.get_layer("take_cls")(model.get_layer("mlp")(h)))

    _, a, g = reference(prefix, tail, x, class_score(targets))
    assert a.shape == (2, 17, 12)

    def grid(t):  # drop the class token; 16 patch tokens row-major on 4x4; channels first -- by hand
        return np.transpose(t[:, 1:, :].reshape(2, 4, 4, 12), (0, 3, 1, 2))

    expected = minmax(tf_resize(np_gradcam(grid(a), grid(g)), (32, 32)))
    cams = camcore.explain(model, x, method="gradcam", layer="ln", targets=targets, reshape=camcore.tokens_to_grid)
    close(cams, expected, rtol=1e-4, atol=1e-5)


def test_channels_first_model_layout():
    c = case("channels_first")
    assert c.x.shape == (2, 3, 16, 16)
    ad = KerasAdapter(c.model)
    assert ad.channels_last is False and ad.spatial_shape(c.x) == (16, 16)
    _, acts, _ = ad.activations_and_grads(c.x, ["relu2"], [1, 2])
    assert acts[0].shape == (2, 12, 8, 8)  # already channels-first: not moved
    # data_format given explicitly agrees with the one read from the model
    explicit = camcore.explain(c.model, c.x, method="gradcam", layer="relu2", data_format="channels_first")
    close(explicit, camcore.explain(c.model, c.x, method="gradcam", layer="relu2"), rtol=0, atol=0)


@pytest.mark.parametrize("kind,expected", [("functional", "relu2"), ("sequential", "relu2"), ("nested", "backbone"),
                                           ("subclassed", "block2"), ("tf.keras", "relu2"),
                                           ("channels_first", "relu2"), ("conv1d", "relu2"), ("conv3d", "relu2")])
def test_default_layer(kind, expected):
    """The last layer (in the order calls finish) whose output is a feature map: a nested model or custom block
    finishes after its own layers."""
    c = case(kind)
    assert KerasAdapter(c.model).default_layer(c.x) == expected
    close(camcore.explain(c.model, c.x, method="gradcam"),
          camcore.explain(c.model, c.x, method="gradcam", layer=c.cam_layer), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- 3. targets
@pytest.mark.parametrize("kind", ["functional", "subclassed", "channels_first"])
def test_default_target_is_top_class(kind):
    c = case(kind)
    top = top_classes(c.model, c.x)
    _, a, g = ref_case(c, c.cam_layer, class_score(top))
    cams = camcore.explain(c.model, c.x, method="gradcam", layer=c.cam_layer, upsample=False)
    close(cams, minmax(np_gradcam(a, g)), rtol=1e-4, atol=1e-5)
    close(cams, camcore.explain(c.model, c.x, method="gradcam", layer=c.cam_layer, targets=top, upsample=False),
          rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["functional", "nested", "conv1d"])
def test_per_sample_targets_equal_each_sample_alone(kind):
    c = case(kind)
    targets = targets_for(c)
    batch = camcore.explain(c.model, c.x, method="gradcam++", layer=c.mid_layer, targets=targets)
    for i, t in enumerate(targets):
        alone = camcore.explain(c.model, c.x[i : i + 1], method="gradcam++", layer=c.mid_layer, targets=t)
        close(batch[i], alone[0], atol=1e-5)
    # targets as a tf.Tensor or a NumPy array of ints are the same targets
    close(camcore.explain(c.model, c.x, method="gradcam++", layer=c.mid_layer, targets=tf.constant(targets)), batch,
          rtol=0, atol=0)
    close(camcore.explain(c.model, c.x, method="gradcam++", layer=c.mid_layer, targets=np.array(targets)), batch,
          rtol=0, atol=0)
    # and different targets give different maps
    shifted = [(t + 1) % c.num_classes for t in targets]
    other = camcore.explain(c.model, c.x, method="gradcam++", layer=c.mid_layer, targets=shifted)
    assert np.abs(other - batch).max() > 0.05


@pytest.mark.parametrize("kind", ["functional", "subclassed", "tf.keras"])
def test_callable_target_difference_of_classes(kind):
    c = case(kind)
    b = c.x.shape[0]
    _, a, g1 = ref_case(c, c.mid_layer, class_score([1] * b))
    _, _, g0 = ref_case(c, c.mid_layer, class_score([0] * b))
    target = lambda out: out[:, 1] - out[:, 0]  # noqa: E731
    outputs, acts, grads = KerasAdapter(c.model).activations_and_grads(c.x, [c.mid_layer], target)
    close(acts[0], a)
    close(grads[0], g1 - g0, atol=1e-6)
    cams = camcore.explain(c.model, c.x, method="gradcam", layer=c.mid_layer, targets=target, upsample=False)
    close(cams, minmax(np_gradcam(a, g1 - g0)), rtol=1e-4, atol=1e-5)


def test_multi_output_model_with_callable_target():
    model = km.two_heads()
    x = km.images()
    target = lambda outs: outs[1][:, 0] + 0.5 * outs[0][:, 2]  # noqa: E731
    prefix = keras.Model(model.input, model.get_layer("conv2").output)

    def tail(a):
        pooled = model.get_layer("gap")(a)
        return [model.get_layer("cls")(pooled), model.get_layer("box")(pooled)]

    out_ref, a, g = reference(prefix, tail, x, target)
    snap = snapshot(model)
    outputs, acts, grads = KerasAdapter(model).activations_and_grads(x, ["conv2"], target)
    assert isinstance(outputs, list) and len(outputs) == 2
    close(outputs[0], out_ref[0])
    close(outputs[1], out_ref[1])
    close(acts[0], to_cf(a))
    close(grads[0], to_cf(g))
    cams = camcore.explain(model, x, method="gradcam", layer="conv2", targets=target, upsample=False)
    close(cams, minmax(np_gradcam(to_cf(a), to_cf(g))), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"targets: the model returned list, not one array of logits; pass a "
                                         r"callable"):
        camcore.explain(model, x, method="gradcam", layer="conv2", targets=1)
    assert_untouched(model, snap)


def test_class_index_out_of_range():
    c = case("functional")
    snap = snapshot(c.model)
    with pytest.raises(ValueError, match=r"targets: class index 10 is out of range for a model with 10 outputs "
                                         r"\(expected 0 <= index < 10\)"):
        camcore.explain(c.model, c.x, method="gradcam", layer="relu2", targets=[3, 10])
    with pytest.raises(ValueError, match=r"targets: class index -1 is out of range"):
        camcore.explain(c.model, c.x, method="cam", layer="relu2", targets=-1)
    with pytest.raises(ValueError, match=r"targets: class index 12 is out of range"):
        KerasAdapter(c.model).forward_masked(c.x, np.ones((2, 1, 16, 16)), targets=12)
    with pytest.raises(ValueError, match=r"targets: expected one class index per sample, 2 for a batch of 2; "
                                         r"got 3: \[1, 2, 3\]"):
        camcore.explain(c.model, c.x, method="gradcam", layer="relu2", targets=[1, 2, 3])
    with pytest.raises(ValueError, match=r"targets: the callable must return one score per sample, shape \(2,\)"):
        camcore.explain(c.model, c.x, method="gradcam", layer="relu2", targets=lambda out: tf.reduce_sum(out))
    assert_untouched(c.model, snap)


# ------------------------------------------------------------------------------------------ 4. multi-layer
@pytest.mark.parametrize("method", ["gradcam", "eigencam", "layercam"])
def test_one_forward_pass_for_several_layers(method):
    c = km.functional(counter=True)
    counter = c.model.get_layer("counter")
    before = counter.calls
    cams = camcore.explain(c.model, c.x, method=method, layer=["conv1", "relu1", "relu2"])
    assert counter.calls - before == 1
    assert cams.shape == (2, 16, 16)
    sub = case("subclassed").model
    before = sub.calls
    camcore.explain(sub, case("subclassed").x, method=method, layer=["block1/relu", "block2", "block2/conv"])
    assert sub.calls - before == 1


@pytest.mark.parametrize("kind", ["functional", "nested", "subclassed", "channels_first"])
def test_fused_layers_match_independent_fusion(kind):
    """pytorch-grad-cam's fusion: each layer's map normalised at its own size, resized, averaged, normalised."""
    c = case(kind)
    targets = targets_for(c)
    layers = [c.mid_layer, c.cam_layer]
    per_layer = []
    acts_ref, grads_ref = [], []
    for layer in layers:
        _, a, g = ref_case(c, layer, class_score(targets))
        acts_ref.append(a)
        grads_ref.append(g)
        per_layer.append(tf_resize(minmax(np_gradcam(a, g)), c.spatial))
    expected = minmax(np.mean(per_layer, axis=0))
    close(camcore.explain(c.model, c.x, method="gradcam", layer=layers, targets=targets), expected,
          rtol=1e-4, atol=1e-5)
    _, acts, grads = KerasAdapter(c.model).activations_and_grads(c.x, layers, targets)
    for got, ref in zip(acts + grads, acts_ref + grads_ref):
        close(got, ref)


def test_shared_layer_is_taken_at_its_last_call():
    model, lay = km.shared_conv()
    x = km.images()
    targets = [1, 3]
    h1 = lay["shared"](lay["conv0"](x))
    a_first = h1.numpy()
    a = lay["shared"](model.get_layer("tanh")(h1))  # the second (last) call of `shared`, by hand
    with tf.GradientTape() as tape:
        tape.watch(a)
        out = lay["fc"](model.get_layer("gap")(model.get_layer("relu")(a)))
        total = tf.reduce_sum(class_score(targets)(out))
    g = tape.gradient(total, a).numpy()
    snap = snapshot(model)
    _, acts, grads = KerasAdapter(model).activations_and_grads(x, ["shared"], targets)
    assert np.abs(to_cf(a_first) - to_cf(a.numpy())).max() > 1e-2  # the two calls are told apart
    close(acts[0], to_cf(a.numpy()))
    close(grads[0], to_cf(g))
    cams = camcore.explain(model, x, method="gradcam", layer="shared", targets=targets, upsample=False)
    close(cams, minmax(np_gradcam(to_cf(a.numpy()), to_cf(g))), rtol=1e-4, atol=1e-5)
    assert_untouched(model, snap)


# ------------------------------------------------------------------------------- 5. the model is untouched
@pytest.fixture
def always_training():
    return km.always_training()


@pytest.mark.parametrize("model_mode", ["eval", "as-is"])
def test_batchnorm_and_dropout_state_restored(always_training, model_mode):
    """A block that calls batch norm and dropout with training=True whatever the model gets: a forward pass
    updates the moving statistics and advances the dropout seed, and camcore puts them back."""
    model = always_training
    x = km.images()
    snap = snapshot(model)
    # sanity: a plain call does change the state (then put it back by hand)
    model(x, training=False)
    changed = [p for (p, v0), (_, v1) in zip(snap, snapshot(model)) if not np.array_equal(v0, v1)]
    assert any("moving_mean" in p for p in changed) and any("seed" in p for p in changed)
    for v, (_, value) in zip(model.variables, snap):
        v.assign(value)
    assert_untouched(model, snap)

    ad = KerasAdapter(model, model_mode=model_mode)
    first = {}
    for method in ALL_METHODS:
        first[method] = camcore.explain(model, x, method=method, layer="conv2", model_mode=model_mode)
        assert_untouched(model, snap)
    ad.forward_masked(x, np.ones((2, 1, 16, 16)))
    ad.forward_masked(x, np.ones((2, 8, 1, 1)), at="conv2")
    ad.default_layer(x)
    ad.activations_and_grads(x, ["conv1", "train_block", "conv2"], [0, 1])
    assert_untouched(model, snap)
    # the same state before each call: the (training-mode) dropout draws the same mask, the maps repeat
    for method in ("gradcam", "eigencam"):
        again = camcore.explain(model, x, method=method, layer="conv2", model_mode=model_mode)
        close(again, first[method], rtol=0, atol=0)


@pytest.mark.parametrize("model_mode", ["eval", "as-is"])
def test_dropout_model_is_deterministic(model_mode):
    c = case("functional")  # Dropout(0.5) before the classifier
    a = camcore.explain(c.model, c.x, method="gradcam", layer="relu1", model_mode=model_mode)
    b = camcore.explain(c.model, c.x, method="gradcam", layer="relu1", model_mode=model_mode)
    close(a, b, rtol=0, atol=0)
    # and equal to the reference computed with dropout off
    top = top_classes(c.model, c.x)
    _, ra, rg = ref_case(c, "relu1", class_score(top))
    close(a, minmax(tf_resize(np_gradcam(ra, rg), (16, 16))), rtol=1e-4, atol=1e-5)


def test_callable_target_raising_leaves_nothing_behind(always_training):
    model = always_training
    snap = snapshot(model)

    def target(out):
        raise KeyError("no such head")

    with pytest.raises(KeyError, match="no such head"):
        camcore.explain(model, km.images(), method="gradcam", layer=["conv1", "conv2"], targets=target,
                        model_mode="as-is")
    assert_untouched(model, snap)  # the batch norm ran in training mode before the raise: restored
    with pytest.raises(KeyError, match="no such head"):
        KerasAdapter(model).forward_masked(km.images(), np.ones((3, 8, 1, 1)), at="conv2", targets=target)
    assert_untouched(model, snap)


@pytest.fixture
def raising_model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    h = L.Conv2D(6, 3, padding="same", name="conv1")(inp)
    h = km.AlwaysTraining(name="train_block")(h)
    h = km.Boom(name="boom")(h)
    h = L.Conv2D(8, 3, padding="same", name="conv2")(h)
    out = L.Dense(4, name="fc")(L.GlobalAveragePooling2D(name="gap")(h))
    model = km.randomize_batchnorm(keras.Model(inp, out))
    km.Boom.armed = True
    yield model
    km.Boom.armed = False


@pytest.mark.parametrize("method", ["gradcam", "eigencam"])
@pytest.mark.parametrize("layers", [["conv1", "train_block"], ["boom"], ["conv1", "conv2"]])
def test_layer_raising_midway_leaves_nothing_behind(raising_model, method, layers):
    model = raising_model
    x = km.images()
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="boom: the model failed midway"):
        camcore.explain(model, x, method=method, layer=layers, targets=1, model_mode="as-is")
    assert_untouched(model, snap)
    with pytest.raises(RuntimeError, match="boom"):
        KerasAdapter(model).forward_masked(x, np.ones((2, 1, 16, 16)), targets=1)
    with pytest.raises(RuntimeError, match="boom"):
        KerasAdapter(model).forward_masked(x, np.ones((2, 6, 1, 1)), at="conv1", targets=1)
    with pytest.raises(RuntimeError, match="boom"):
        KerasAdapter(model).default_layer(x)
    assert_untouched(model, snap)


# ------------------------------------------------------------------------------------- 6. forward_masked
def loop_input_logits(model, x, masks_cf, channels_last=True, per_sample=False):
    """Masked logits (B, M, K) by a plain loop: ``model(x_i * mask)``, each mask moved to the model's layout by
    hand."""
    rows = []
    for i in range(x.shape[0]):
        row = []
        for mask in (masks_cf[i] if per_sample else masks_cf):
            native = np.moveaxis(mask, 0, -1) if channels_last else mask
            row.append(np.asarray(model(x[i : i + 1] * native[None], training=False))[0])
        rows.append(row)
    return np.array(rows)


def pick(logits, targets):
    """(B, M) scores of each sample's class from (B, M, K) logits."""
    return logits[np.arange(logits.shape[0]), :, targets]


def loop_layer_masks(c, layer, masks_cf, targets, per_sample=False):
    """Masked scores by the hand split: ``tail(prefix(x_i) * mask)``; ``targets``: class per sample or callable."""
    prefix, tail = hand_split(c, layer)
    rows = []
    for i in range(c.x.shape[0]):
        a = prefix(tf.constant(c.x[i : i + 1]))
        row = []
        for mask in (masks_cf[i] if per_sample else masks_cf):
            native = np.moveaxis(mask, 0, -1) if c.channels_last else mask
            out = tail(a * native[None].astype(np.float32))
            row.append(float(targets(out)[0] if callable(targets) else out[0, targets[i]]))
        rows.append(row)
    return np.array(rows)


@pytest.mark.parametrize("kind,per_sample", [("functional", False), ("functional", True), ("subclassed", True),
                                             ("channels_first", False), ("conv1d", True)])
def test_forward_masked_input_masks_match_loop(kind, per_sample):
    c = case(kind)
    b, m = c.x.shape[0], 4
    rng = np.random.default_rng(5)
    shape = (b, m, 1, *c.spatial) if per_sample else (m, 1, *c.spatial)
    masks = (rng.random(shape) > 0.4).astype(np.float32) if not per_sample else rng.random(shape).astype(np.float32)
    top = top_classes(c.model, c.x)
    logits = loop_input_logits(c.model, c.x, masks, c.channels_last, per_sample)
    snap = snapshot(c.model)
    for targets, idx in [(targets_for(c), targets_for(c)), (None, top), (2, [2] * b)]:
        expected = pick(logits, idx)
        results = []
        for bs in ((1, 3, 100) if targets is None else (100,)):  # the chunking is checked once
            got = KerasAdapter(c.model).forward_masked(c.x, masks, targets=targets, batch_size=bs)
            assert isinstance(got, np.ndarray) and got.shape == (b, m) and got.dtype == np.float32
            close(got, expected)
            results.append(got)
        for got in results[:-1]:
            close(got, results[-1], rtol=1e-6, atol=1e-6)
    # masks given as a tf.Tensor: the same
    close(KerasAdapter(c.model).forward_masked(tf.constant(c.x), tf.constant(masks), targets=None), pick(logits, top))
    assert_untouched(c.model, snap)


@pytest.mark.parametrize("kind", ["functional", "nested", "subclassed", "channels_first", "conv3d"])
def test_forward_masked_layer_channel_masks_match_hand_split(kind):
    c = case(kind)
    b = c.x.shape[0]
    layer = c.mid_layer
    _, a, _ = ref_case(c, layer, class_score([0] * b))
    channels, rank = a.shape[1], a.ndim - 2
    masks = (np.random.default_rng(2).random((4, channels) + (1,) * rank) > 0.3).astype(np.float32)
    targets = targets_for(c)
    expected = loop_layer_masks(c, layer, masks, targets)
    snap = snapshot(c.model)
    got1 = KerasAdapter(c.model).forward_masked(c.x, masks, at=layer, targets=targets, batch_size=1)
    got100 = KerasAdapter(c.model).forward_masked(c.x, masks, at=layer, targets=targets, batch_size=100)
    close(got1, expected)
    close(got100, expected)
    close(got1, got100, rtol=1e-6, atol=1e-6)
    # the layer given as an object: the same
    obj = KerasAdapter(c.model).resolve_layer(layer)[1]
    close(KerasAdapter(c.model).forward_masked(c.x, masks, at=obj, targets=targets), expected)
    # an all-ones mask is the plain forward pass
    plain = np.asarray(c.model(c.x, training=False))[np.arange(b), targets]
    ones = KerasAdapter(c.model).forward_masked(c.x, np.ones((1, channels) + (1,) * rank), at=layer,
                                                targets=targets)
    close(ones[:, 0], plain)
    # per-sample masks (B, M, C, 1...): sample i gets its own masks
    per = (np.random.default_rng(6).random((b, 3, channels) + (1,) * rank) > 0.5).astype(np.float32)
    expected_per = loop_layer_masks(c, layer, per, targets, per_sample=True)
    close(KerasAdapter(c.model).forward_masked(c.x, per, at=layer, targets=targets, batch_size=2), expected_per)
    assert_untouched(c.model, snap)


def test_forward_masked_multi_output_class_index_error():
    model = km.two_heads()
    with pytest.raises(ValueError, match=r"targets: the model returned list, not one array of logits"):
        KerasAdapter(model).forward_masked(km.images(), np.ones((2, 1, 16, 16)), targets=1)


def test_forward_masked_multi_output_callable_target():
    model = km.two_heads()
    x = km.images()
    masks = np.random.default_rng(4).random((3, 1, 16, 16)).astype(np.float32)
    target = lambda outs: outs[1][:, 0]  # noqa: E731
    expected = np.array([[float(model(x[i : i + 1] * np.moveaxis(mk, 0, -1)[None], training=False)[1][0, 0])
                          for mk in masks] for i in range(2)])
    close(KerasAdapter(model).forward_masked(x, masks, targets=target), expected)


# ----------------------------------------------------------- 6b. forward_masked: probability, progress, paths
def loop_layer_logits(prefix, tail, x, masks_cf, channels_last=True):
    """(B, M, K) logits by a plain loop over samples and masks: ``tail(prefix(x_i) * mask)``."""
    rows = []
    for i in range(x.shape[0]):
        a = prefix(tf.constant(x[i : i + 1]))
        rows.append([np.asarray(tail(a * (np.moveaxis(mk, 0, -1) if channels_last else mk)[None]))[0]
                     for mk in masks_cf])
    return np.array(rows)


@pytest.mark.parametrize("at,shape", [("input", (1, 16, 16)), ("relu2", (12, 1, 1))])
@pytest.mark.parametrize("per_sample", [False, True])
def test_forward_masked_progress(at, shape, per_sample):
    c = case("functional")
    m = 5
    masks = np.ones((2, m, *shape) if per_sample else (m, *shape), np.float32)
    seen = []
    KerasAdapter(c.model).forward_masked(c.x, masks, at=at, targets=1, batch_size=2, progress=seen.append)
    assert seen == [2, 2, 1, 2, 2, 1]  # one call per chunk, M per sample
    seen.clear()
    KerasAdapter(c.model).forward_masked(c.x, masks, at=at, targets=None, batch_size=8, progress=seen.append)
    assert seen == [m, m]


@pytest.mark.parametrize("kind", ["functional", "nested", "subclassed", "channels_first"])
def test_forward_masked_compiled_path_equals_hand_split(kind):
    """Layer masks take the compiled path (a tf.function with the layer's output replaced); input masks the full
    one; both equal the plain loops, with the graph traced once per chunk shape."""
    c = case(kind)
    b, layer = c.x.shape[0], c.mid_layer
    _, a, _ = ref_case(c, layer, class_score([0] * b))
    masks = (np.random.default_rng(8).random((5, a.shape[1], 1, 1)) > 0.4).astype(np.float32)
    targets = targets_for(c)
    expected = loop_layer_masks(c, layer, masks, targets)
    snap = snapshot(c.model)
    ad = KerasAdapter(c.model)
    for _ in range(2):  # a second call reuses the cached graphs
        info = {}
        close(ad.forward_masked(c.x, masks, at=layer, targets=targets, batch_size=2, info=info), expected)
        assert info == {"path": "compiled"}
    tails = [g for k, g in ad._graphs.items() if k[0] == "layer"]
    assert len(tails) == 1 and tails[0].experimental_get_tracing_count() == 2  # chunks of 2 and of 1
    info = {}
    input_masks = np.random.default_rng(9).random((3, 1, *c.spatial)).astype(np.float32)
    got = ad.forward_masked(c.x, input_masks, targets=targets, info=info)
    assert info == {"path": "full"}
    close(got, pick(loop_input_logits(c.model, c.x, input_masks, c.channels_last), targets))
    assert_untouched(c.model, snap)


def test_forward_masked_eager_full_path_equals_compiled():
    """The eager path (graphs off) and the compiled one give the same scores (float tolerance)."""
    c = case("functional")
    masks = (np.random.default_rng(12).random((2, 6, 12, 1, 1)) > 0.5).astype(np.float32)
    ad = KerasAdapter(c.model)
    compiled = ad.forward_masked(c.x, masks, at="relu2", targets=None, batch_size=4)
    ad.compile = False
    info = {}
    full = ad.forward_masked(c.x, masks, at="relu2", targets=None, batch_size=4, info=info)
    assert info == {"path": "full"}
    close(compiled, full, rtol=1e-5, atol=1e-6)
    close(full, loop_layer_masks(c, "relu2", masks, top_classes(c.model, c.x), per_sample=True))


def test_forward_masked_skip_connection_around_the_layer():
    """A skip connection carries conv1's output around the masked relu1: only relu1's output is masked."""
    model, lay = km.skip_net()
    x = km.images()
    masks = (np.random.default_rng(13).random((4, 6, 1, 1)) > 0.5).astype(np.float32)
    rows = []
    for i in range(2):  # by hand: the prefix gives conv1's output (the skip) and relu1's (masked)
        c1 = lay["conv1"](x[i : i + 1])
        a = lay["relu1"](c1)
        out = [lay["fc"](lay["gap"](lay["relu2"](lay["add"]([lay["conv2"](a * np.moveaxis(mk, 0, -1)[None]), c1]))))
               for mk in masks]
        rows.append(np.array([np.asarray(o)[0] for o in out]))
    logits = np.array(rows)
    for compiled in (True, False):
        ad = KerasAdapter(model)
        ad.compile = compiled
        info = {}
        got = ad.forward_masked(x, masks, at="relu1", targets=[1, 3], batch_size=3, info=info)
        assert info["path"] == ("compiled" if compiled else "full")
        close(got, pick(logits, [1, 3]))
    # the skip matters: without it (a zero mask) the scores are not those of a model without relu1's branch only
    assert np.ptp(logits[..., 1]) > 1e-3


def test_forward_masked_shared_layer_is_masked_at_its_last_call():
    model, lay = km.shared_conv()
    x = km.images()
    masks = (np.random.default_rng(14).random((3, 4, 1, 1)) > 0.3).astype(np.float32) + 0.25
    tanh, relu, gap = (model.get_layer(n) for n in ("tanh", "relu", "gap"))
    rows = []
    for i in range(2):  # by hand: the first call as it is, the second (last) call's output masked
        h1 = lay["shared"](lay["conv0"](x[i : i + 1]))
        a = lay["shared"](tanh(h1))
        rows.append([np.asarray(lay["fc"](gap(relu(a * np.moveaxis(mk, 0, -1)[None]))))[0] for mk in masks])
    logits = np.array(rows)
    first = []
    for i in range(2):  # what masking the first call would give: must differ
        h1 = lay["shared"](lay["conv0"](x[i : i + 1]))
        first.append([np.asarray(lay["fc"](gap(relu(lay["shared"](tanh(h1 * np.moveaxis(mk, 0, -1)[None]))))))[0]
                      for mk in masks])
    assert np.abs(np.array(first) - logits).max() > 1e-3
    snap = snapshot(model)
    for compiled in (True, False):
        ad = KerasAdapter(model)
        ad.compile = compiled
        info = {}
        got = ad.forward_masked(x, masks, at="shared", targets=[0, 4], batch_size=2, info=info)
        assert info["path"] == ("compiled" if compiled else "full")
        close(got, pick(logits, [0, 4]))
    assert_untouched(model, snap)


@pytest.mark.parametrize("compiled", [True, False])
def test_forward_masked_input_masks_run_no_extra_forward_pass(compiled):
    """Input masks with class indices: only the masked passes run; targets=None adds one unmasked pass."""
    model, counter = km.counted()
    x = km.images()
    masks = np.random.default_rng(15).random((5, 1, 16, 16)).astype(np.float32)
    ad = KerasAdapter(model)
    ad.compile = compiled
    logits = loop_input_logits(model, x, masks)
    for targets, idx in [([2, 0], [2, 0]), (3, [3, 3])]:
        counter.batches.clear()
        close(ad.forward_masked(x, masks, targets=targets, batch_size=2), pick(logits, idx))
        assert counter.batches == [2, 2, 1] * 2
    counter.batches.clear()
    top = top_classes(model, x)
    counter.batches.clear()
    close(ad.forward_masked(x, masks, targets=None, batch_size=2), pick(logits, top))
    assert counter.batches == [2] + [2, 2, 1] * 2  # the unmasked pass for the top classes, then the chunks
    with pytest.raises(ValueError, match=r"targets: class index 4 is out of range for a model with 4 outputs"):
        ad.forward_masked(x, masks, targets=[1, 4])


@pytest.mark.parametrize("at", ["input", "relu"])
def test_forward_masked_falls_back_to_eager_when_tracing_fails(at):
    """A model whose call has a host (NumPy) step cannot run as a tf.function: the eager passes run instead, with
    info["reason"] and a RuntimeWarning; the scores are the plain loop's."""
    model = km.host_step_net()
    x = km.images()
    if at == "input":
        masks = np.random.default_rng(16).random((3, 1, 16, 16)).astype(np.float32)
        logits = loop_input_logits(model, x, masks)
    else:
        masks = (np.random.default_rng(16).random((3, 6, 1, 1)) > 0.4).astype(np.float32)
        logits = loop_layer_logits(lambda z: model.relu(model.conv(z)),
                                   lambda a: model.fc(tf.constant(np.tanh(model.gap(a).numpy()))), x, masks)
    ad = KerasAdapter(model)
    snap = snapshot(model)
    for _ in range(2):  # the failure is remembered: the second call goes straight to the eager passes
        info = {}
        with pytest.warns(RuntimeWarning, match=r"forward_masked: ran the whole model eagerly .*tf.function"):
            got = ad.forward_masked(x, masks, at=at, targets=[1, 2], batch_size=2, info=info)
        assert info["path"] == "full"
        assert re.search(r"AttributeError: .*'SymbolicTensor' object has no attribute 'numpy'", info["reason"])
        assert "\n" not in info["reason"] and "\x1b" not in info["reason"]
        close(got, pick(logits, [1, 2]))
    assert_untouched(model, snap)


def test_forward_masked_model_error_is_not_a_fallback(raising_model):
    """A model that raises in eager mode too: its error comes out, with no warning about graphs."""
    x = km.images()
    for at, masks in [("input", np.ones((2, 1, 16, 16))), ("conv2", np.ones((2, 8, 1, 1)))]:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            with pytest.raises(RuntimeError, match="boom: the model failed midway"):
                KerasAdapter(raising_model).forward_masked(x, masks, at=at, targets=1)


# ---------------------------------------------------------------------------------------------- 7. errors
def test_unknown_layer_lists_closest_names():
    c = case("functional")
    snap = snapshot(c.model)
    with pytest.raises(ValueError, match=r"layer: no layer named 'conv_2' in the model; closest real names: "
                                         r".*'conv2'"):
        camcore.explain(c.model, c.x, method="gradcam", layer="conv_2")
    with pytest.raises(ValueError, match=r"no layer named 'backbone/conv3'.*closest real names: .*'backbone/conv2'"):
        camcore.explain(case("nested").model, c.x, method="gradcam", layer="backbone/conv3")
    with pytest.raises(ValueError, match=r"no layer named 'block2/cnv'.*'block2/conv'"):
        camcore.explain(case("subclassed").model, c.x, method="gradcam", layer="block2/cnv")
    assert_untouched(c.model, snap)


def test_unknown_layer_suggestions_are_unique_and_usable():
    model = km.two_encoders()
    ad = KerasAdapter(model)
    with pytest.raises(ValueError) as info:
        ad.resolve_layer("conv_x")
    names = [s.strip().strip("'") for s in str(info.value).split("closest real names:")[1].split(",")]
    assert len(names) == len(set(names)), names
    for name in names:
        ad.resolve_layer(name)  # every suggestion resolves


def test_ambiguous_bare_name_lists_all_paths():
    model = km.two_encoders()
    x = km.images()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"layer: 'conv' names several layers in nested models; pick one by its "
                                         r"path: 'enc_a/conv', 'enc_b/conv'"):
        camcore.explain(model, x, method="gradcam", layer="conv")
    with pytest.raises(ValueError, match=r"'conv' names several layers .*'block1/conv', 'block2/conv'"):
        camcore.explain(case("subclassed").model, x, method="gradcam", layer="conv")
    # by path each works, and gives that encoder's layer
    ad = KerasAdapter(model)
    assert ad.resolve_layer("enc_b/conv")[1] is model.get_layer("enc_b").get_layer("conv")
    assert camcore.explain(model, x, method="gradcam", layer="enc_b/conv").shape == (2, 16, 16)
    assert_untouched(model, snap)


def test_layer_object_not_in_model_or_wrong_type():
    c = case("functional")
    with pytest.raises(ValueError, match=r"layer: the Conv2D 'stranger' passed is not part of the model"):
        camcore.explain(c.model, c.x, method="gradcam", layer=L.Conv2D(3, 1, name="stranger"))
    with pytest.raises(ValueError, match=r"the Conv2D 'conv1' passed is not part of the model"):
        camcore.explain(c.model, c.x, method="gradcam", layer=case("sequential").model.get_layer("conv1"))
    with pytest.raises(TypeError, match=r"layer: expected a Keras layer name \(str\) or a keras.layers.Layer of the "
                                        r"model, got int"):
        camcore.explain(c.model, c.x, method="gradcam", layer=3)
    with pytest.raises(ValueError, match=r"layer: expected a layer or a non-empty list"):
        camcore.explain(c.model, c.x, method="gradcam", layer=[])
    # the layer object of the model works, as its name does
    close(camcore.explain(c.model, c.x, method="gradcam", layer=c.model.get_layer("relu1")),
          camcore.explain(c.model, c.x, method="gradcam", layer="relu1"), rtol=0, atol=0)


def test_bad_inputs():
    c = case("functional")
    snap = snapshot(c.model)
    with pytest.raises(TypeError, match=r"inputs: expected a tf.Tensor or a NumPy array for a Keras model, got "
                                        r"list"):
        camcore.explain(c.model, [c.x[0], c.x[1]], method="gradcam", layer="relu2")
    with pytest.raises(TypeError, match=r"inputs: expected a tf.Tensor or a NumPy array .*got list"):
        KerasAdapter(c.model).forward_masked(list(c.x), np.ones((2, 1, 16, 16)))
    with pytest.raises(TypeError, match=r"inputs: expected a floating-point array .*got dtype int64"):
        camcore.explain(c.model, c.x.astype(np.int64), method="gradcam", layer="relu2")
    with pytest.raises(TypeError, match=r"inputs: expected a floating-point array .*got dtype <dtype: 'int32'>"):
        camcore.explain(c.model, tf.constant(c.x.astype(np.int32)), method="gradcam")
    with pytest.raises(TypeError, match=r"inputs: expected a floating-point array .*got dtype uint8"):
        KerasAdapter(c.model).forward_masked(c.x.astype(np.uint8), np.ones((2, 1, 16, 16)))
    with pytest.raises(ValueError, match=r"inputs: expected a non-empty batch \(B, \*spatial, C\) with B >= 1, "
                                         r"got shape \(0, 16, 16, 3\)"):
        camcore.explain(c.model, np.zeros((0, 16, 16, 3), np.float32), method="gradcam", layer="relu2")
    with pytest.raises(ValueError, match=r"inputs: expected a non-empty batch \(B, C, \*spatial\) .*got shape "
                                         r"\(0, 3, 16, 16\)"):
        camcore.explain(case("channels_first").model, tf.zeros((0, 3, 16, 16)), method="gradcam")
    assert_untouched(c.model, snap)


def test_bfloat16_inputs_accepted():
    c = case("functional")
    x16 = tf.cast(tf.constant(c.x), tf.bfloat16)
    got = camcore.explain(c.model, x16, method="gradcam", layer="relu2")
    # the float32 layers cast the inputs to float32 first: the same map as for the rounded inputs in float32
    close(got, camcore.explain(c.model, tf.cast(x16, tf.float32), method="gradcam", layer="relu2"), atol=1e-6)


def test_bad_options():
    c = case("functional")
    with pytest.raises(ValueError, match=r"data_format: expected one of \('channels_last', 'channels_first'\) or "
                                         r"None, got 'NHWC'"):
        camcore.explain(c.model, c.x, method="gradcam", layer="relu2", data_format="NHWC")
    with pytest.raises(ValueError, match=r"model_mode: expected one of \('eval', 'as-is'\), got 'train'"):
        camcore.explain(c.model, c.x, method="gradcam", layer="relu2", model_mode="train")
    with pytest.raises(ValueError, match=r"model_mode: expected one of"):
        KerasAdapter(c.model, model_mode="training")
    with pytest.raises(TypeError, match=r"explain: unknown option\(s\) 'smooth' for method 'gradcam'"):
        camcore.explain(c.model, c.x, method="gradcam", layer="relu2", smooth=True)


def test_dense_layer_is_not_a_feature_map():
    c = case("functional")
    with pytest.raises(ValueError, match=r"layer: 'fc' outputs shape \(2, 10\), not a channels-first feature map "
                                         r"\(B, C, \*spatial\)"):
        camcore.explain(c.model, c.x, method="gradcam", layer="fc")
    with pytest.raises(ValueError, match=r"layer: 'gap' outputs shape \(2, 12\), not a channels-first feature map"):
        camcore.explain(c.model, c.x, method="eigencam", layer="gap")


def test_cam_premise_checked():
    c = case("functional")
    with pytest.raises(ValueError, match=r"layer: method='cam' needs the feature map the classifier 'fc' reads "
                                         r"after global pooling; 'relu1' has 8 channels but 'fc' expects 12"):
        camcore.explain(c.model, c.x, method="cam", layer="relu1")
    # conv2 has the right channel count, but batch norm and relu lie between it and the pooling
    with pytest.raises(ValueError, match=r"layer: method='cam' needs the layer whose global average pooling feeds "
                                         r"the classifier 'fc' directly, but the outputs differ from 'fc'\(mean of "
                                         r"'conv2'\) by up to"):
        camcore.explain(c.model, c.x, method="cam", layer="conv2")
    with pytest.raises(ValueError, match=r"targets: method='cam' explains a class"):
        camcore.explain(c.model, c.x, method="cam", layer="relu2", targets=lambda out: out[:, 0])
    # the classifier named explicitly; a layer without a kernel; a model without Dense
    close(camcore.explain(c.model, c.x, method="cam", layer="relu2", classifier="fc"),
          camcore.explain(c.model, c.x, method="cam", layer="relu2"), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"classifier: 'gap' has no \(C, num_classes\) kernel; got "
                                         r"GlobalAveragePooling2D"):
        camcore.explain(c.model, c.x, method="cam", layer="relu2", classifier="gap")
    inp = keras.Input((16, 16, 3))
    conv_head = keras.Model(inp, L.GlobalAveragePooling2D()(L.Conv2D(4, 1, name="head")(inp)))
    with pytest.raises(ValueError, match=r"classifier: the model has no keras.layers.Dense layer; name the "
                                         r"classifier with classifier=... or pass the class weights as cam_weights="):
        camcore.explain(conv_head, c.x, method="cam", layer="head", targets=1)
    # cam_weights bypass the classifier: rows picked by the targets
    w = np.random.default_rng(0).standard_normal((3, 12)).astype(np.float32)
    a = ref_case(c, "relu2", class_score([0, 0]))[1]
    got = camcore.explain(c.model, c.x, method="cam", layer="relu2", targets=[2, 0], cam_weights=w,
                          upsample=False, normalize=False)
    close(got, np.maximum(np.einsum("bchw,bc->bhw", a, w[[2, 0]]), 0), rtol=1e-4, atol=1e-5)


def test_inside_tf_function_raises():
    c = case("functional")
    snap = snapshot(c.model)

    @tf.function
    def named(x):
        return camcore.explain(c.model, x, method="gradcam", layer="relu2")

    @tf.function(autograph=False)
    def default(x):
        return camcore.explain(c.model, x, method="eigencam")

    for f in (named, default):
        with pytest.raises(RuntimeError, match=r"explain: call camcore eagerly, not inside a tf.function"):
            f(tf.constant(c.x))
    assert_untouched(c.model, snap)


class _SideBranchNet(keras.Model):
    """``side`` runs but its output is unused; ``unused`` never runs; ``pair`` returns a tuple."""

    def __init__(self):
        super().__init__()
        self.conv = L.Conv2D(6, 3, padding="same", name="conv")
        self.side = L.Conv2D(2, 1, name="side")
        self.unused = L.Conv2D(2, 1, name="unused")
        self.unused.build((None, 16, 16, 6))  # never called: built here so Keras sees no unbuilt state
        self.pair = _Pair(name="pair")
        self.gap = L.GlobalAveragePooling2D(name="gap")
        self.fc = L.Dense(3, name="fc")

    def call(self, x):
        h = self.conv(x)
        self.side(h)
        h, _ = self.pair(h)
        return self.fc(self.gap(h))


class _Pair(keras.layers.Layer):
    def call(self, x):
        return x, -x


def test_layer_not_run_not_influencing_or_not_a_tensor():
    keras.utils.set_random_seed(0)
    model = _SideBranchNet()
    x = km.images()
    model(x)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"layer: 'unused' did not run during the forward pass of the inputs"):
        camcore.explain(model, x, method="gradcam", layer=["conv", "unused"])
    with pytest.raises(ValueError, match=r"layer: 'unused' did not run"):
        camcore.explain(model, x, method="eigencam", layer="unused")
    with pytest.raises(ValueError, match=r"at: layer 'unused' did not run"):
        KerasAdapter(model).forward_masked(x, np.ones((2, 2, 1, 1)), at="unused")
    with pytest.raises(ValueError, match=r"layer: 'side' does not influence the target scores"):
        camcore.explain(model, x, method="gradcam", layer=["conv", "side"])
    with pytest.raises(TypeError, match=r"layer: 'pair' returns tuple, not a tensor"):
        camcore.explain(model, x, method="gradcam", layer="pair")
    with pytest.raises(TypeError, match=r"at: 'pair' returns tuple, not a tensor"):
        KerasAdapter(model).forward_masked(x, np.ones((2, 6, 1, 1)), at="pair")
    assert_untouched(model, snap)
    assert camcore.explain(model, x, method="eigencam", layer="side").shape == (2, 16, 16)


class _UnbuiltNet(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = L.Conv2D(4, 3, padding="same", name="conv")
        self.block = km.AlwaysTraining(name="block")
        self.gap = L.GlobalAveragePooling2D(name="gap")
        self.fc = L.Dense(3, name="fc")

    def call(self, x):
        return self.fc(self.gap(self.block(self.conv(x))))


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside Keras' build
def test_unbuilt_model_state_untouched():
    keras.utils.set_random_seed(0)
    model = _UnbuiltNet()
    camcore.explain(model, km.images(), method="gradcam", layer="conv", targets=0)
    bn = model.block.bn
    assert np.all(bn.moving_mean.numpy() == 0.0) and np.all(bn.moving_variance.numpy() == 1.0)
    for layer in all_layers(model):
        assert "call" not in layer.__dict__


def test_default_layer_with_no_feature_map():
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    model = keras.Model(inp, L.Dense(3)(L.Flatten()(inp)))
    with pytest.raises(ValueError, match=r"layer: no layer of the model outputs a feature map of the inputs' rank"):
        camcore.explain(model, km.images(), method="gradcam")
