"""Parity of ``camcore.explain`` with tf-keras-vis (``tf_keras_vis``, 0.8.7), the Keras reference implementation,
on the real pretrained EfficientNet-Lite0 ported to Keras 3 and the four real photos, with per-sample targets.

Every expected map comes from tf-keras-vis itself or from an independent float64 formula on activations and
gradients captured here (a ``keras.Model`` cut at the layer and our own ``tf.GradientTape``) -- never from
camcore's own output.

What tf-keras-vis computes, read from its source, and how each difference is handled here:

- **Layers.** It cuts the model with ``keras.Model(model.inputs, model.outputs + [layer.output])``, so it can only
  reach layers of the top-level graph. The port's MBConv blocks are nested functional models, and under Keras 3
  a nested model's ``.output`` (and that of any layer inside it) belongs to the nested model's own graph:
  ``"_blocks.10"`` fails with "not connected to `inputs`" (tested below). The inner layer compared here is
  therefore the stem's ReLU6 ``"_swish-0"`` (32 x 112 x 112, the first activation of the network); the other is
  the last conv ``"_conv_head"`` (1280 x 7 x 7). Its default ``seek_penultimate_conv_layer=True`` replaces a
  layer that is not a convolution by the nearest convolution before it (tested below), so it is called with
  ``False``.
- **Normalisation.** Per sample, like camcore, but ``(x - min) / (max - min + 1e-7)`` (``K.epsilon()``), and
  camcore divides exactly. The raw Grad-CAM maps at ``"_swish-0"`` span only 2.7e-5 .. 5.1e-4, where that
  epsilon shifts the normalised map by up to 3.7e-3 (tested below). So the parity tests take tf-keras-vis's maps
  with ``normalize_cam=False`` and normalise them here exactly as camcore does (``minmax``).
- **Upsampling.** ``scipy.ndimage.zoom(cam, (1, 224/h, 224/w), order=1)``: linear with *corner-aligned* grids
  (output pixel ``i`` samples input position ``i (h-1)/(224-1)``), then the normalisation. camcore interpolates
  linearly with *half-pixel* centres (position ``(i + 0.5) h/224 - 0.5``, clamped; as OpenCV, torch and
  pytorch-grad-cam). The two differ by up to 0.44 on these maps. At input resolution the tests show that the
  resize is the only difference: tf-keras-vis's map equals a corner-aligned NumPy resize of camcore's
  layer-resolution map, and camcore's equals a half-pixel NumPy resize of the same map.
- **Grad-CAM++.** tf-keras-vis follows the authors' reference code, not eq. (19): it divides each channel's
  alphas by their spatial sum, and it multiplies the derivatives by ``exp(score)``. See
  ``test_gradcam_pp_is_the_paper_and_tf_keras_vis_normalises_alpha``.
- **Targets.** tf-keras-vis has no default target: ``targets=None`` (camcore: each sample's top class) is
  compared with ``CategoricalScore`` of the top classes computed here.

Tolerance ``TOL = 1e-4`` (absolute, maps in [0, 1]). Measured worst cases (TF 2.21 CPU, Keras 3.15), max over the
four samples, after the same exact normalisation:

==========  ==========  =====================  =====================  =======================
method      layer       layer res., targets    layer res., top class  input res. (corner grid)
==========  ==========  =====================  =====================  =======================
Grad-CAM    _conv_head  3.5e-7                 1.5e-7                 3.7e-7
Grad-CAM    _swish-0    6.2e-6                 1.2e-5                 5.7e-6
LayerCAM    _conv_head  1.2e-7                 6.0e-8                 9.3e-8
LayerCAM    _swish-0    6.8e-8                 6.0e-8                 5.3e-8
==========  ==========  =====================  =====================  =======================

``input res.``: tf-keras-vis vs the corner-aligned resize of camcore's layer-resolution map (camcore vs the
half-pixel resize of the same map: <= 2.1e-7). Grad-CAM++: camcore vs eq. (19) in float64 1.1e-7 at
``_conv_head``, 5.9e-6 at ``_swish-0``; tf-keras-vis deviates from it by design (see its test).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

with warnings.catch_warnings():  # tf-keras-vis imports the deprecated ``scipy.ndimage.interpolation``
    warnings.simplefilter("ignore", DeprecationWarning)
    tkv = pytest.importorskip("tf_keras_vis")
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")

    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
    from tf_keras_vis.layercam import Layercam
    from tf_keras_vis.utils.scores import CategoricalScore

import camcore  # noqa: E402

TOL = 1e-4
TARGETS = [281, 967, 0, 812]  # tabby / espresso / tench / space shuttle; only 967 is a top class (coffee photo)
LAYERS = ("_conv_head", "_swish-0")  # 1280 x 7 x 7 (last conv) and 32 x 112 x 112 (stem ReLU6, top-level)
SIZE = (224, 224)
TKV_CLASSES = {"gradcam": Gradcam, "layercam": Layercam, "gradcam++": GradcamPlusPlus}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def kmodel(effnet):
    """The pretrained EfficientNet-Lite0 ported to a Keras functional model (built once for this module)."""
    from camcore.ports import keras_efficientnet_lite

    return keras_efficientnet_lite(effnet)


@pytest.fixture(scope="module")
def images(photos):
    """The four photos, ImageNet-normalised, channels-last ``(4, 224, 224, 3)`` float32."""
    from camcore.demo import MEAN, STD

    return ((np.stack(photos) - MEAN) / STD).astype(np.float32)


@pytest.fixture(scope="module")
def logits(kmodel, images):
    return np.asarray(kmodel(images, training=False), dtype=np.float64)


@pytest.fixture(scope="module")
def top(logits):
    out = logits.argmax(1).tolist()
    assert sum(t != c for t, c in zip(out, TARGETS)) == 3  # really per-sample, mostly non-top targets
    return out


# ------------------------------------------------------------------------------------------------- helpers
def run_tkv(model, method, x, targets, layer, **kwargs) -> np.ndarray:
    """tf-keras-vis's map; ``model_modifier=None, clone=False``: it uses the model as it is (our logits are
    already linear, so ``ReplaceToLinear`` is not needed)."""
    cam = TKV_CLASSES[method](model, model_modifier=None, clone=False)
    kwargs.setdefault("seek_penultimate_conv_layer", False)
    return np.asarray(cam(CategoricalScore(list(targets)), x, penultimate_layer=layer, **kwargs))


def run_camcore(model, method, x, targets, layer, **options) -> np.ndarray:
    out = camcore.explain(model, x, method=method, layer=layer, targets=targets, **options)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32  # NumPy in, NumPy out
    return out


def capture(model, x, layer, targets):
    """Activations ``A`` and gradients ``G = d(sum_b y_b^{c_b}) / dA`` at a top-level ``layer``, float64,
    channels-first ``(B, C, h, w)``: the model cut at the layer by hand, and our own tape."""
    cut = keras.Model(model.input, [model.get_layer(layer).output, model.output])
    with tf.GradientTape() as tape:
        a, y = cut(tf.convert_to_tensor(x), training=False)
        score = tf.reduce_sum(tf.gather(y, targets, axis=1, batch_dims=1))
    g = tape.gradient(score, a)
    return (np.moveaxis(a.numpy(), -1, 1).astype(np.float64), np.moveaxis(g.numpy(), -1, 1).astype(np.float64),
            y.numpy().astype(np.float64))


def minmax(maps) -> np.ndarray:
    """Exact per-sample min-max normalisation of ``(B, h, w)`` maps, float64; a constant map becomes 0 (camcore's
    definition, written out here)."""
    m = np.asarray(maps, dtype=np.float64)
    lo = m.min(axis=(1, 2), keepdims=True)
    span = m.max(axis=(1, 2), keepdims=True) - lo
    return np.where(span > 0, (m - lo) / np.where(span > 0, span, 1.0), 0.0)


def resize(maps, size, *, corners: bool) -> np.ndarray:
    """Separable linear resize of ``(B, h, w)`` maps, float64. ``corners=True``: the first and last pixel centres of
    input and output coincide (``scipy.ndimage.zoom(order=1)``'s grid); ``False``: half-pixel centres, positions
    clamped to the border (OpenCV's ``INTER_LINEAR``, ``align_corners=False``)."""
    out = np.asarray(maps, dtype=np.float64)
    for axis, n_out in zip((1, 2), size):
        n_in = out.shape[axis]
        i = np.arange(n_out, dtype=np.float64)
        pos = i * (n_in - 1) / (n_out - 1) if corners else np.clip((i + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.minimum(np.floor(pos).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        shape = [1, 1, 1]
        shape[axis] = n_out
        t = (pos - lo).reshape(shape)
        out = np.take(out, lo, axis=axis) * (1 - t) + np.take(out, hi, axis=axis) * t
    return out


def per_sample_max(d) -> np.ndarray:
    return np.abs(d).reshape(d.shape[0], -1).max(axis=1)


def _targets(kind, top):
    """``(camcore's targets, tf-keras-vis's class per sample)``."""
    return (TARGETS, TARGETS) if kind == "per-sample" else (None, top)


# --------------------------------------------------------------------------------- at the layer's resolution
@pytest.mark.parametrize("kind", ["per-sample", "top-class"])
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_matches_tf_keras_vis_at_layer_resolution(kmodel, images, top, method, layer, kind):
    """``upsample=False`` vs ``expand_cam=False``; tf-keras-vis's raw map normalised exactly here (module doc).
    ``top-class``: camcore's ``targets=None`` vs tf-keras-vis's ``CategoricalScore(top classes)``."""
    ours_targets, their_classes = _targets(kind, top)
    ours = run_camcore(kmodel, method, images, ours_targets, layer, upsample=False)
    theirs = run_tkv(kmodel, method, images, their_classes, layer, expand_cam=False, normalize_cam=False)
    assert ours.shape == theirs.shape == {"_conv_head": (4, 7, 7), "_swish-0": (4, 112, 112)}[layer]
    diff = per_sample_max(ours - minmax(theirs))
    assert diff.max() <= TOL, f"{method} at {layer}: max |camcore - tf-keras-vis| per sample {diff}"
    # real, non-constant maps; one exception: Grad-CAM's top-class ("tiger cat") map of chelsea at the stem is
    # negative everywhere, so after the ReLU both libraries return zeros (checked by ``diff`` above)
    assert sum(np.ptp(m) == 1 for m in ours) >= 3


@pytest.mark.parametrize("layer", LAYERS)
def test_tf_keras_vis_normalisation_epsilon(kmodel, images, layer):
    """tf-keras-vis divides by ``max - min + 1e-7``: relative to camcore's exact division the normalised map
    shrinks by ``1e-7 / span``. Harmless where raw maps span ~0.04-1.5 (``_conv_head``), but Grad-CAM at the
    stem spans 2.7e-5 (chelsea) .. 5.1e-4: measured 3.7e-3 there, hence ``minmax`` in the parity tests."""
    raw = run_camcore(kmodel, "gradcam", images, TARGETS, layer, upsample=False, normalize=False)
    span = np.ptp(raw.reshape(4, -1), axis=1)
    ours = run_camcore(kmodel, "gradcam", images, TARGETS, layer, upsample=False)
    theirs = run_tkv(kmodel, "gradcam", images, TARGETS, layer, expand_cam=False)  # its own normalisation
    diff = per_sample_max(ours - theirs)
    bound = 1e-7 / span  # |(x-lo)/s - (x-lo)/(s+e)| <= e/(s+e) < e/s
    assert (diff <= bound + 1e-5).all(), f"{layer}: {diff} vs the epsilon's bound {bound}"
    if layer == "_swish-0":
        assert diff.max() > 10 * TOL  # the epsilon really matters here


# ----------------------------------------------------------------------------------- at the input resolution
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_input_resolution_differs_only_by_the_resize(kmodel, images, method, layer):
    """Both libraries resize the layer-resolution map linearly and then normalise; they sample it on different
    grids (module doc). tf-keras-vis's 224 x 224 map must be the corner-aligned resize of camcore's own
    layer-resolution map, camcore's the half-pixel resize of it. The direct difference, measured 0.17-0.35
    (Grad-CAM / LayerCAM at ``_conv_head``: one 7x7 cell is 32 px, and the grids disagree by up to half a cell
    near the borders) and 0.08-0.44 (``_swish-0``), is the interpolation convention, not the CAM."""
    layer_map = run_camcore(kmodel, method, images, TARGETS, layer, upsample=False, normalize=False)
    ours = run_camcore(kmodel, method, images, TARGETS, layer)
    theirs = minmax(run_tkv(kmodel, method, images, TARGETS, layer, normalize_cam=False))
    assert ours.shape == theirs.shape == (4, *SIZE)

    corner = per_sample_max(theirs - minmax(resize(layer_map, SIZE, corners=True)))
    assert corner.max() <= TOL, f"tf-keras-vis is not the corner-aligned resize: {corner}"
    half = per_sample_max(ours - minmax(resize(layer_map, SIZE, corners=False)))
    assert half.max() <= TOL, f"camcore is not the half-pixel resize: {half}"
    direct = per_sample_max(ours - theirs)
    assert direct.min() > 0.05, f"expected the two grids to give visibly different maps; measured {direct}"


# ------------------------------------------------------------------------------------------------ Grad-CAM++
def _gradcam_pp_reference(a, g, *, normalise_alpha: bool):
    """Grad-CAM++ eq. (19) in float64, before the final ReLU: alpha = G^2 / (2 G^2 + sum(A) G^3), 0 where G == 0
    or the denominator is 0; weights sum(alpha * relu(G)); map sum_k w_k A_k. ``normalise_alpha``: divide each
    channel's alphas by their spatial sum first (0-sums left as they are), as the authors' reference code and
    tf-keras-vis do."""
    s = a.sum(axis=(2, 3), keepdims=True)
    num, den = g**2, 2 * g**2 + s * g**3
    alpha = np.where((g != 0) & (den != 0), num / np.where(den != 0, den, 1.0), 0.0)
    if normalise_alpha:
        total = alpha.sum(axis=(2, 3), keepdims=True)
        alpha = alpha / np.where(total == 0, 1.0, total)
    w = (alpha * np.maximum(g, 0)).sum(axis=(2, 3))
    return (w[:, :, None, None] * a).sum(axis=1)


# tf-keras-vis vs its own formula (alphas normalised) in float64: <= 9.9e-8 at ``_conv_head``, but 4e-4 .. 1.4e-2
# at ``_swish-0``. There eq. (19)'s denominators 2 + sum(A) G come as close as 3.5e-6 to the pole (alphas up to
# 2.8e5, of either sign), so a channel's alpha sum, which the normalisation divides by, is dominated by a few
# huge alphas and is ill-conditioned: perturbing A and G by one float32 rounding (2^-24 relative) moves the
# float64 formula by up to 1.5e-3 (tested), and tf-keras-vis evaluates it in float32 (exp(y) G^3, a float32 sum of
# 12544 activations). Eq. (19) itself, which never divides by that sum, moves by < 1e-7 under the same
# perturbation; camcore is within 5.9e-6 of it.
TKV_FORMULA_TOL = {"_conv_head": TOL, "_swish-0": 0.05}


@pytest.mark.parametrize("layer", LAYERS)
def test_gradcam_pp_is_the_paper_and_tf_keras_vis_normalises_alpha(kmodel, images, layer):
    """Documented deviation. tf-keras-vis's ``GradcamPlusPlus`` (like the authors' reference code) departs from
    eq. (19) twice: (1) it divides each channel's alphas by their spatial sum, which changes the channel
    weights and so the map: measured max |camcore - tf-keras-vis| per sample 0.097-0.26 at ``_conv_head`` and
    0.78-1.0 at ``_swish-0``; (2) it multiplies the derivatives by ``exp(y^c)`` (the paper's exponential score):
    this cancels in alpha and only scales each sample's map by ``exp(y^c)``, which per-sample normalisation
    removes -- but its ``normalize_cam=False`` maps are not comparable between samples (here scaled by 0.74 ..
    1.3e5), and a logit above ~88 overflows float32. camcore's default is eq. (19) itself."""
    a, g, y = capture(kmodel, images, layer, TARGETS)
    paper = _gradcam_pp_reference(a, g, normalise_alpha=False)
    authors = _gradcam_pp_reference(a, g, normalise_alpha=True)

    ours = run_camcore(kmodel, "gradcam++", images, TARGETS, layer, upsample=False)  # default eps=0
    theirs_raw = run_tkv(kmodel, "gradcam++", images, TARGETS, layer, expand_cam=False, normalize_cam=False)
    theirs = minmax(theirs_raw)

    assert per_sample_max(ours - minmax(np.maximum(paper, 0))).max() <= TOL  # camcore is eq. (19)
    assert per_sample_max(theirs - minmax(np.maximum(authors, 0))).max() <= TKV_FORMULA_TOL[layer]
    deviation = per_sample_max(ours - theirs)
    assert deviation.min() > 0.05, f"expected alpha's normalisation to matter at {layer}; measured {deviation}"
    # the exp(score) factor: tf-keras-vis's raw peak is exp(y^c) times the formula's
    scale = np.exp(y[np.arange(4), TARGETS])
    ratio = theirs_raw.reshape(4, -1).max(1) / (scale * np.maximum(authors, 0).reshape(4, -1).max(1))
    assert np.allclose(ratio, 1, atol=1e-3 if layer == "_conv_head" else 0.05), ratio
    assert np.ptp(scale) > 1e4  # so the raw maps' scales really differ between samples

    # conditioning (see TKV_FORMULA_TOL): one float32 rounding of A and G, the paper's formula vs the authors'
    rng = np.random.default_rng(0)
    a2, g2 = (v * (1 + 2.0**-24 * rng.uniform(-1, 1, v.shape)) for v in (a, g))
    moved = {name: per_sample_max(minmax(np.maximum(_gradcam_pp_reference(a2, g2, normalise_alpha=norm), 0))
                                  - minmax(np.maximum(ref, 0))).max()
             for name, norm, ref in (("paper", False, paper), ("authors", True, authors))}
    assert moved["paper"] < 1e-6, moved
    if layer == "_swish-0":
        assert moved["authors"] > TOL, moved  # ill-conditioned: float32 alone can exceed TOL


# ---------------------------------------------------------------------------- what tf-keras-vis can reach
def test_tf_keras_vis_seeks_a_conv_layer_by_default(kmodel, images):
    """With its default ``seek_penultimate_conv_layer=True``, asking tf-keras-vis for ``"_swish"`` (the ReLU6
    after ``_conv_head`` and ``_bn1``) silently explains ``"_conv_head"``; camcore explains the layer it is
    given. Measured max |camcore("_swish") - tf-keras-vis("_swish", seek)| per sample 0.26-0.94."""
    theirs = minmax(run_tkv(kmodel, "gradcam", images, TARGETS, "_swish", expand_cam=False, normalize_cam=False,
                            seek_penultimate_conv_layer=True))
    at_head = run_camcore(kmodel, "gradcam", images, TARGETS, "_conv_head", upsample=False)
    at_swish = run_camcore(kmodel, "gradcam", images, TARGETS, "_swish", upsample=False)
    assert per_sample_max(theirs - at_head).max() <= TOL
    assert per_sample_max(theirs - at_swish).max() > 0.05


@pytest.mark.parametrize("layer", ["_blocks.10", "_blocks.10._project_conv"])
def test_nested_layers_are_out_of_tf_keras_vis_reach(kmodel, images, layer):
    """Documented limitation of tf-keras-vis 0.8.7 under Keras 3: a block of the port (a nested functional
    model) or a layer inside it cannot be cut out (its ``.output`` is a tensor of the nested graph); camcore
    intercepts the layer's call and explains it."""
    with pytest.raises(ValueError, match="not connected"):
        run_tkv(kmodel, "gradcam", images, TARGETS, layer, expand_cam=False)
    ours = run_camcore(kmodel, "gradcam", images, TARGETS, layer, upsample=False)
    assert ours.shape == (4, 14, 14) and all(np.ptp(m) == 1 for m in ours)


# ------------------------------------------------------------------------------------------------ Score-CAM
def run_tkv_scorecam(model, x, targets, layer, **kwargs) -> np.ndarray:
    """tf-keras-vis's raw Score-CAM map at the layer's resolution ``(B, h, w)``."""
    from tf_keras_vis.scorecam import Scorecam

    cam = Scorecam(model, model_modifier=None, clone=False)
    return np.asarray(cam(CategoricalScore(list(targets)), x, penultimate_layer=layer,
                          seek_penultimate_conv_layer=False, expand_cam=False, normalize_cam=False, **kwargs),
                      dtype=np.float64)


def rel_max(d, ref) -> float:
    return float(np.abs(d).max() / np.abs(ref).max())


@pytest.mark.parametrize("top_k", [None, 3])
def test_scorecam_matches_tf_keras_vis_at_input_resolution(top_k):
    """tf-keras-vis's ``Scorecam`` weighs channel ``k`` by the target's softmax probability on ``X * M_k``: the
    Score-CAM authors' rule and camcore's default ``weighting="probability"`` (docs/methods.md). At a layer of the
    input's resolution nothing is resized, so the only difference is its ``+1e-7`` in the masks' normaliser.
    ``max_N`` (Faster Score-CAM) keeps the channels of largest standard deviation, camcore's ``top_k`` those of
    largest variance: the same channels for one sample (for a batch, tf-keras-vis scores the union of every
    sample's channels on every sample, so it is compared on one). Measured: 1.6e-7 (all channels) and 1.1e-7
    (``top_k=3``) of the map's maximum."""
    from keras_models import functional

    case = functional()
    x, targets = (case.x, [1, 3]) if top_k is None else (case.x[:1], [4])
    ours = camcore.explain(case.model, x, method="scorecam", layer="relu1", targets=targets, top_k=top_k,
                           normalize=False, upsample=False, progress=False)
    theirs = run_tkv_scorecam(case.model, x, targets, "relu1", **({} if top_k is None else {"max_N": top_k}))
    assert ours.shape == theirs.shape == (len(targets), 16, 16)
    assert (theirs.reshape(len(targets), -1).max(1) > 0).all()  # real maps, not zeros
    assert rel_max(ours - theirs, theirs) <= 1e-5


def test_scorecam_differs_from_tf_keras_vis_only_by_the_mask_grid(kmodel, images):
    """Documented deviation, on the real port at ``_conv_head`` (7 x 7, Faster Score-CAM with 6 channels, one
    photo): tf-keras-vis upsamples the activations into masks with ``scipy.ndimage.zoom(order=1)`` on a
    *corner-aligned* grid, camcore (like the Score-CAM authors' ``F.interpolate(align_corners=False)``) with
    half-pixel centres. Plain loops of forward passes reproduce each: tf-keras-vis with corner-aligned masks
    (measured 7.9e-7 of the map's maximum), camcore with half-pixel ones (1.2e-6). The direct difference, measured 0.20
    of the map's maximum (0.17 after normalisation), is that grid alone."""
    x, target, k = images[:1], [281], 6
    theirs = run_tkv_scorecam(kmodel, x, target, "_conv_head", max_N=k)
    ours = camcore.explain(kmodel, x, method="scorecam", layer="_conv_head", targets=target, top_k=k,
                           normalize=False, upsample=False, progress=False)

    cut = keras.Model(kmodel.input, kmodel.get_layer("_conv_head").output)
    a = np.moveaxis(np.asarray(cut(x, training=False)), -1, 1)[0].astype(np.float64)  # (1280, 7, 7)
    chosen = np.argsort(-a.reshape(len(a), -1).std(1))[:k]

    def reference(corners: bool, eps: float):
        masks = resize(a[chosen], SIZE, corners=corners)
        lo, hi = masks.min((1, 2), keepdims=True), masks.max((1, 2), keepdims=True)
        masks = (masks - lo) / (hi - lo + eps)
        probs = np.asarray(tf.nn.softmax(kmodel((x * masks[..., None]).astype(np.float32), training=False)))
        return np.maximum(np.tensordot(probs[:, target[0]], a[chosen], axes=1), 0)[None]

    corner, half = reference(corners=True, eps=1e-7), reference(corners=False, eps=0.0)
    assert rel_max(theirs - corner, corner) <= 1e-5
    assert rel_max(ours - half, half) <= 1e-5
    assert rel_max(ours - theirs, theirs) > 0.1  # the grids give other masks, so other weights
