"""Parity of ``camcore.explain`` with pytorch-grad-cam (``pytorch_grad_cam``, grad-cam 1.5.7), the reference
implementation, on the real pretrained EfficientNet-Lite0 and the four real photos, with per-sample targets.

Every expected map comes from pytorch-grad-cam itself or from an independent float64 formula on activations and
gradients captured here with a forward hook and ``torch.autograd.grad`` -- never from camcore's own output.

pytorch-grad-cam calls ``model.eval()`` and ``loss.backward()`` (parameter gradients), so it gets a deep copy of
the shared ``effnet`` fixture. Its normalisation is ``(x - min) / (1e-7 + max - min)`` and it resizes with
``cv2.resize`` (linear, half-pixel centres); camcore's is exact min-max and its own separable interpolation.

Tolerance ``TOL = 1e-4`` (absolute, maps in [0, 1]). Measured worst cases (torch 2.14 CPU, 2 threads):
XGrad-CAM at ``_conv_head`` 3.8e-5 (channels whose activations sum to ~0.03 get weights up to 0.6, so float32
summation order -- pgc divides before summing, camcore after -- shows), Eigen-CAM 1.5e-5 (float32 SVD in two
libraries), Grad-CAM++ at ``_blocks.10`` 1.2e-5, everything else <= 2e-6. ``TOL`` leaves a 2.5x margin over
the worst and is still 100x below the smallest real deviation tested here (Grad-CAM++ ``eps=0``: >= 0.017).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import camcore

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.image import scale_cam_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

TOL = 1e-4
# camcore's float32 Grad-CAM++ vs a float64 evaluation of eq. (19): at ``_blocks.10`` the denominator
# 2 + sum(A) G comes as close as 2e-4 to its pole (alpha ~ -5e3), which amplifies float32 rounding of
# sum(A) G ~1e4-fold; measured 4.3e-4 there (sample 2), <= 4e-6 elsewhere.
PAPER_TOL = 1e-3
LAYERS = ("_conv_head", "_blocks.10")  # 1280 x 7 x 7 (last conv) and 112 x 14 x 14 (mid network)
FIXED_CLASSES = {1: 281, 3: 404}  # "tabby cat" for the coffee photo, "airliner" for the rocket; others: top class
SIZE = (224, 224)

PGC_CLASSES = {
    "gradcam": pgc.GradCAM,
    "gradcam++": pgc.GradCAMPlusPlus,
    "xgradcam": pgc.XGradCAM,
    "hirescam": pgc.HiResCAM,
    "gradcam-elementwise": pgc.GradCAMElementWise,
    "layercam": pgc.LayerCAM,
    "eigencam": pgc.EigenCAM,
    "eigengradcam": pgc.EigenGradCAM,
}
# pytorch-grad-cam's hard-coded epsilons, passed to camcore to get the same formula
PGC_EPS = {"gradcam++": {"eps": 1e-6}, "xgradcam": {"eps": 1e-7}}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def pgc_model(effnet):
    """A private copy for pytorch-grad-cam (it sets eval mode and accumulates parameter gradients)."""
    return copy.deepcopy(effnet)


@pytest.fixture(scope="module")
def targets(pgc_model, photo_batch):
    """One class per sample: the top class for photos 0 and 2, a fixed (non-top) class for photos 1 and 3."""
    with torch.no_grad():
        top = pgc_model(photo_batch).argmax(1).tolist()
    out = [FIXED_CLASSES.get(i, t) for i, t in enumerate(top)]
    assert out[1] != top[1] and out[3] != top[3]  # really different targets per sample
    return out


def run_pgc(model, method, layers, x, targets, **kwargs) -> np.ndarray:
    modules = dict(model.named_modules())
    cam = PGC_CLASSES[method](model, [modules[name] for name in layers])
    try:  # no ``with``: BaseCAM.__exit__ swallows IndexError
        return cam(x, None if targets is None else [ClassifierOutputTarget(t) for t in targets], **kwargs)
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)


def run_camcore(model, method, layer, x, targets, **options) -> np.ndarray:
    out = camcore.explain(model, x, method=method, layer=layer, targets=targets, **options)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (x.shape[0], *SIZE)
    return out.numpy()


def capture(model, x, layer, targets):
    """Activations ``A`` and gradients ``G = d(sum_b y_b^{c_b}) / dA`` at ``layer``, float64 numpy, computed here
    with a forward hook and ``torch.autograd.grad`` (no parameter gradients)."""
    store = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        with torch.enable_grad():
            logits = model(x)
            score = logits[torch.arange(x.shape[0]), torch.as_tensor(targets)].sum()
            (g,) = torch.autograd.grad(score, store["a"])
    finally:
        handle.remove()
    return store["a"].detach().double().numpy(), g.double().numpy()


def reference_map(raw) -> np.ndarray:
    """``normalize(upsample(normalize(relu(raw))))`` of ``(B, h, w)`` raw maps with pytorch-grad-cam's cv2
    utilities: its single-layer pipeline. (The outer normalisation matters: linear upsampling lowers an interior
    maximum, so ``upsample(normalize(x))`` alone does not reach 1.)"""
    return scale_cam_image(scale_cam_image(np.maximum(raw, 0), SIZE))


def per_sample_max(d) -> np.ndarray:
    return np.abs(d).reshape(d.shape[0], -1).max(axis=1)


def principal_projection(weighted, orient):
    """``(B, C, h, w)`` -> ``(B, h, w)`` projections on the first principal component (float64 SVD), with the sign
    whose covariance with the ``(B, h, w)`` map ``orient`` is >= 0, and that covariance's correlation
    coefficient."""
    projs, corrs = [], []
    for sample, ref in zip(weighted, orient):
        c = sample.shape[0]
        pts = sample.reshape(c, -1).T
        pts = pts - pts.mean(axis=0)
        _, _, vt = np.linalg.svd(pts, full_matrices=False)
        p = pts @ vt[0]
        ref = ref.reshape(-1) - ref.mean()
        corr = float(p @ ref / (np.linalg.norm(p) * np.linalg.norm(ref)))
        projs.append((p if corr >= 0 else -p).reshape(sample.shape[1:]))
        corrs.append(abs(corr))
    return np.stack(projs), np.array(corrs)


# ------------------------------------------------------------------------------------- channel / element CAMs
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "hirescam", "gradcam-elementwise",
                                    "layercam"])
def test_matches_pytorch_grad_cam(effnet, pgc_model, photo_batch, targets, method, layer):
    ours = run_camcore(effnet, method, layer, photo_batch, targets, **PGC_EPS.get(method, {}))
    theirs = run_pgc(pgc_model, method, [layer], photo_batch, targets)
    diff = per_sample_max(ours - theirs)
    assert diff.max() <= TOL, f"{method} at {layer}: max |camcore - pgc| per sample {diff}"
    assert all(np.ptp(m) > 0.5 for m in ours)  # real, non-degenerate maps


def test_top_class_default_matches_pytorch_grad_cam(effnet, pgc_model, photo_batch):
    """``targets=None`` (camcore) and ``targets=None`` (pgc) both explain each sample's top class."""
    ours = camcore.explain(effnet, photo_batch, method="gradcam", layer="_conv_head").numpy()
    theirs = run_pgc(pgc_model, "gradcam", ["_conv_head"], photo_batch, None)
    assert per_sample_max(ours - theirs).max() <= TOL


# --------------------------------------------------------------------------- Grad-CAM++: eps = 0 is eq. (19)
def _gradcam_pp_reference(a, g, eps):
    """Grad-CAM++ eq. (19) in float64: alpha = G^2 / (2 G^2 + sum(A) G^3 + eps), 0 where G == 0 or the
    denominator is 0; weights sum(alpha * relu(G)); map sum_k w_k A_k."""
    s = a.sum(axis=(2, 3), keepdims=True)
    num, den = g**2, 2 * g**2 + s * g**3 + eps
    alpha = np.where((g != 0) & (den != 0), num / np.where(den != 0, den, 1.0), 0.0)
    w = (alpha * np.maximum(g, 0)).sum(axis=(2, 3))
    return (w[:, :, None, None] * a).sum(axis=1)


@pytest.mark.parametrize("layer", LAYERS)
def test_gradcam_pp_default_eps_is_the_paper_and_differs_from_pgc(effnet, pgc_model, photo_batch, targets,
                                                                  layer):
    """Documented deviation: pytorch-grad-cam adds 1e-6 to eq. (19)'s denominator ``2 G^2 + sum(A) G^3``, which
    is of order G^2: where |G| is ~1e-3 or smaller that eps dominates and shrinks alpha. camcore's default
    ``eps=0`` is the paper's formula. Measured max |camcore(eps=0) - pgc| per sample: 0.017-0.024 at
    ``_conv_head`` (median |G| ~ 1e-3), 0.44-0.93 at ``_blocks.10`` (median |G| ~ 1e-4)."""
    a, g = capture(pgc_model, photo_batch, layer, targets)
    paper = reference_map(_gradcam_pp_reference(a, g, 0.0))
    with_eps = reference_map(_gradcam_pp_reference(a, g, 1e-6))

    ours = run_camcore(effnet, "gradcam++", layer, photo_batch, targets)  # default eps=0
    theirs = run_pgc(pgc_model, "gradcam++", [layer], photo_batch, targets)

    # camcore's default is eq. (19) exactly (float32 vs this float64 reference: see PAPER_TOL)
    assert per_sample_max(ours - paper).max() <= PAPER_TOL
    assert per_sample_max(theirs - with_eps).max() <= TOL  # pgc is eq. (19) + 1e-6
    deviation = per_sample_max(ours - theirs)
    assert deviation.min() > 0.01, f"expected eps to matter at {layer}; measured {deviation}"
    # the whole deviation is the eps term: pgc - camcore == ref(eps=1e-6) - ref(eps=0)
    assert per_sample_max((theirs - ours) - (with_eps - paper)).max() <= PAPER_TOL
    small = np.median(np.abs(g[g != 0]))
    assert small**2 < 1e-5  # small gradients: G^2 is within 10x of pgc's eps, or below it


# ----------------------------------------------------------------------- Eigen-CAM family: arbitrary SVD sign
def _weighted(method, a, g):
    """The tensor each Eigen method projects, and the map camcore orients it by (docs/methods.md): Eigen-CAM by
    each position's energy, EigenGrad-CAM by Grad-CAM's map, Grad-CAM + eigen_smooth by its own map."""
    gradcam_map = np.einsum("bc,bchw->bhw", g.mean(axis=(2, 3)), a)
    if method == "eigencam":
        return a, (a**2).sum(axis=1)
    if method == "eigengradcam":
        return g * a, gradcam_map
    return g.mean(axis=(2, 3))[:, :, None, None] * a, gradcam_map  # gradcam + eigen_smooth


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("method", ["eigencam", "eigengradcam", "gradcam+eigen_smooth"])
def test_eigen_methods_match_pgc_up_to_the_svd_sign(effnet, pgc_model, photo_batch, targets, method, layer):
    """pytorch-grad-cam's projection keeps LAPACK's arbitrary SVD sign; camcore picks the sign whose projection
    has non-negative covariance with its orientation map. Per sample, pgc's map must equal camcore's, or the map
    of the negated projection; camcore's must be the map of the oriented projection (all computed here from
    hooked activations with a float64 SVD)."""
    name, opts = ("gradcam", {"eigen_smooth": True}) if method == "gradcam+eigen_smooth" else (method, {})
    a, g = capture(pgc_model, photo_batch, layer, targets)
    proj, corr = principal_projection(*_weighted(method, a, g))
    assert corr.min() > 1e-2, f"sign nearly undetermined: |corr(projection, orientation map)| = {corr}"
    expected = reference_map(proj)  # covariance with the orientation map >= 0
    flipped = reference_map(-proj)
    assert per_sample_max(expected - flipped).min() > 100 * TOL  # the two signs give distinguishable maps

    ours = run_camcore(effnet, name, layer, photo_batch, targets, **opts)
    theirs = run_pgc(pgc_model, name, [layer], photo_batch, targets, **opts)

    assert per_sample_max(ours - expected).max() <= TOL, "camcore's sign is not the non-negative-covariance one"
    same = per_sample_max(theirs - ours)
    other = per_sample_max(theirs - flipped)
    assert np.minimum(same, other).max() <= TOL, f"pgc matches neither sign: {same} / {other}"


# ------------------------------------------------------------------------------------ multi-layer fusion
@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_fused_layers_match_pgc(effnet, pgc_model, photo_batch, targets, method):
    """pytorch-grad-cam's ``aggregate_multi_layers``: per layer relu, min-max normalise AT THE LAYER'S RESOLUTION,
    resize, then average and normalise: ``N(mean_i U(N(x_i)))``; ``maps.fuse`` follows that order."""
    layers = ["_blocks.10", "_conv_head"]
    ours = run_camcore(effnet, method, layers, photo_batch, targets)
    theirs = run_pgc(pgc_model, method, layers, photo_batch, targets)
    diff = per_sample_max(ours - theirs)
    assert diff.max() <= TOL, (
        f"fused {method}: max |camcore - pgc| per sample {diff}; normalising after upsampling instead of before "
        f"changes each layer's weight in the mean (upsampling lowers an interior maximum)")
