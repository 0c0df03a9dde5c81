"""Parity of ``camcore.metrics`` with torch-cam's metrics (``torchcam.metrics``, torch-cam 0.5.0) and Quantus
(``quantus`` 0.6.0) on the real EfficientNet-Lite0, real photos and camcore's real Grad-CAM maps. Every expected
value is the peer's own computation; where a definition differs, the difference is converted (stated per test) or,
where it cannot be, the closest agreeing quantity is compared. How the peers differ from camcore:

torch-cam
- ``ClassificationMetric``: the drop is a fraction, ``max(0, Y - O) / (Y + 1e-7)`` (camcore: ``100 max(0, Y - O)
  / Y``, in %); its increase is ``Y < O``, camcore's. It computes its map itself from the scores it is given: with
  ``logits_fn=softmax`` (its documented use) Grad-CAM of the softmax probability, not of the logit (camcore's int
  targets; a callable target gives camcore the same map), normalised at the layer's resolution as ``(c - min) /
  (max - min + 1e-8)`` and THEN resized (bilinear, half-pixel centres); ``camcore.explain`` resizes, then
  normalises exactly. Where the peak is inside the map the two differ by a per-sample factor (average drop of the
  cat: 66.72% on torch-cam's map, 67.50% on ``explain``'s).
- ``DeletionInsertionMetric``: ``ceil(N / steps)`` pixels a step, the last step the rest (camcore: ``rint(k N /
  steps)``; equal when ``steps`` divides ``N``), AUC by ``torch.trapezoid`` over the fractions (camcore's); it
  inserts into its deletion baseline, zeros by default (camcore's ``insertion_auc``: into the blurred image).

Quantus (its default ``normalise_by_max`` divides by the largest ``|value|`` of the whole batch, and
``abs=True`` for MPRT: no effect on non-negative maps' argmax, mass ratios, ranks)
- ``PointingGame``: a mask and no tolerance; a hit when any maximal pixel is in the mask: camcore's ``tolerance=0``
  on the box's mask, ``tolerance=t`` on the box dilated by ``t`` (Euclidean). A constant map hits (every pixel is
  maximal; camcore: points nowhere, a miss; a batch of maps that are all one value is refused); an empty mask is
  meant to give NaN, but NaN written into its bool array reads True, a hit (camcore: never hit).
- ``RelevanceMassAccuracy``: camcore's ``energy_pointing_game``; an all-zero map gives NaN (0/0; camcore 0).
- ``PixelFlipping``: the map is broadcast over the channels and every channel value is a feature, sorted by
  NumPy's unstable ``argsort`` (camcore: pixels, ties by position); ``features_in_step`` must divide ``H * W``, so
  its steps remove whole pixels only when ``3 N / steps`` divides ``N`` (not at 224 x 224); the curve has no
  unperturbed point (camcore's ``k = 0``); baseline ``"black"`` is the image's minimum over all channels and
  ``"mean"`` the mean of the already perturbed image, recomputed at each step (neither is camcore's ``"zeros"`` or
  per-channel ``"mean"``; a number is used as is); ``return_auc_per_sample`` calls ``np.trapz``, gone in NumPy 2
  (AttributeError here), and integrates with ``dx=1``, not over ``[0, 1]``.
- ``ROAD``: per percentage ``p``, whether the model's top-1 class on the imputed image is the label ``y`` (0/1,
  averaged over the samples into ``{p: accuracy}``; camcore: the target's probability, or a callable target's
  score, per sample), MoRF only (camcore: also LeRF and combined); it removes ``int(N p / 100)`` pixels (camcore:
  ``N - ceil((N - 1)(100 - p) / 100)``, pytorch-grad-cam's percentile threshold; at 224 x 224 equal for p = 25,
  50, 75, not at 10: 5017 vs 5018) ranked by NumPy's unstable ``argsort`` (ties in no set order; camcore: by
  position); default percentages ``range(1, 100, 2)`` (camcore: 10, 20, ..., 90); its imputation's noise comes
  from the unseeded global ``np.random.randn`` (camcore: seeded per sample and percentage). It broadcasts a
  ``(B, 1, H, W)`` map over the channels and sorts the ``C N`` values, but imputes pixels: on an RGB image any
  index past ``N`` raises IndexError (its own tests use 1-channel MNIST), so a map alone crashes it; and with
  a ``(B, C, H, W)`` map its ``p`` % is of ``C N``. Only the first batch (``batch_size``, 64) enters its scores.
- ``RegionPerturbation``: one patch per step (patches ranked by their attribution sum, padded by edge values),
  recording ``y - y_k``; patch size 1 would need a forward pass per pixel: not compared (PixelFlipping is the
  pixel-wise curve).
- ``MPRT``: randomises by ``reset_parameters()`` (PyTorch's initialisation; batch norms to weight 1, bias 0 and
  fresh running statistics) of every module that has it, in reverse ``named_modules`` order, re-seeding torch
  with ``seed + 1`` before each; camcore re-draws the named layers' parameters as N(0, rms^2) from NumPy. The
  randomised models differ, so only the similarity is compared, on the pairs of maps Quantus scores: its default
  ``correlation_spearman`` is camcore's ``spearman`` (a constant map: NaN vs 0). Its ``ssim`` is scikit-image's
  default (7-sample uniform window, sample covariance, the pair's range) on the flattened maps, 1-D (camcore: 2-D,
  Gaussian sigma 1.5): not compared. Its first entry, ``"original"``, re-explains the unchanged model.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from model_checks import assert_untouched, snapshot

import camcore
from camcore import faithfulness, maps, metrics
from camcore.imputation import linear_imputation
from camcore.demo import OBJECT_BOXES, PHOTOS, TARGETS, to_tensor

torchcam_methods = pytest.importorskip("torchcam.methods")
torchcam_metrics = pytest.importorskip("torchcam.metrics")
quantus = pytest.importorskip("quantus")
ndimage = pytest.importorskip("scipy.ndimage")

NAMES = PHOTOS[:2]  # chelsea (tabby cat), coffee (espresso)
CLASSES = [TARGETS[n] for n in NAMES]
LAYER = "_conv_head"


@pytest.fixture(scope="module", autouse=True)
def untouched(effnet):
    """The peers get the shared model: it must come back exactly as it was (weights, modes, no hooks, no .grad)."""
    snap = snapshot(effnet)
    yield
    assert_untouched(effnet, snap)


@pytest.fixture(scope="module")
def gradcam(effnet, photo_batch):
    """camcore's Grad-CAM (of the logits) of the two photos, float64 ``(2, 224, 224)``."""
    return camcore.explain(effnet, photo_batch[:2], method="gradcam", layer=LAYER, targets=CLASSES).double().numpy()


# ---------------------------------------------------------------------------------------------------- torch-cam
@pytest.fixture(scope="module")
def torchcam_view(effnet, photo_batch):
    """camcore's Grad-CAM of the softmax probability (what torch-cam's extractor computes under
    ``logits_fn=softmax``) at the layer's resolution, normalised and resized the torch-cam way (its
    ``_CAM._normalize``, then bilinear, half-pixel centres: camcore's ``maps.upsample``)."""
    x = photo_batch[:2]
    raw = camcore.explain(effnet, x, method="gradcam", layer=LAYER, upsample=False, normalize=False,
                          targets=lambda out: out.softmax(1)[torch.arange(out.shape[0]), CLASSES])
    low = raw - raw.amin((1, 2), keepdim=True)
    return x, maps.upsample(low / (low.amax((1, 2), keepdim=True) + 1e-8), tuple(x.shape[2:]))


def test_average_drop_and_increase_equal_torchcams_classification_metric(effnet, torchcam_view):
    """torch-cam's drop is a fraction (camcore: %), its map its own Grad-CAM of the probability: given that map
    (``torchcam_view``), camcore's average drop / 100 and increase in confidence equal torch-cam's per photo. rtol
    1e-5: both maps are equal (0 difference measured at 7 x 7); the scores come from differently batched float32
    passes (camcore scores image and masked image in one batch, torch-cam one each): 2.3e-6 measured."""
    x, cams = torchcam_view
    drops, increases = [], []
    with torchcam_methods.GradCAM(effnet, LAYER) as extractor:
        for i, c in enumerate(CLASSES):  # one update per photo: torch-cam only keeps sums
            metric = torchcam_metrics.ClassificationMetric(extractor, functools.partial(torch.softmax, dim=-1))
            metric.update(x[i : i + 1], c)
            drops.append(metric.summary()["avg_drop"])
            increases.append(metric.summary()["conf_increase"])
    np.testing.assert_allclose(metrics.average_drop(effnet, x, cams, targets=CLASSES) / 100, drops, rtol=1e-5,
                               atol=1e-7)  # atol: the coffee's drop is 0 in both
    np.testing.assert_array_equal(metrics.increase_in_confidence(effnet, x, cams, targets=CLASSES), increases)
    assert drops[0] > 0.5 and increases[1] == 1  # a real drop and a real increase were compared


def test_deletion_and_insertion_auc_equal_torchcams(effnet, torchcam_view):
    """torch-cam's ``DeletionInsertionMetric``: 4 steps divide 224 x 224 (the same pixel counts); insertion into its
    default zeros baseline (camcore's default is the blur). atol 1e-6: the AUC of float32 probabilities scored in
    different batches (5e-8 measured)."""
    x, cams = torchcam_view
    with torchcam_methods.GradCAM(effnet, LAYER) as extractor:
        metric = torchcam_metrics.DeletionInsertionMetric(extractor, functools.partial(torch.softmax, dim=-1),
                                                          steps=4)
        metric.update(x[:1], CLASSES[0])
    peer = metric.summary()
    options = {"targets": CLASSES[:1], "steps": 4, "progress": False}
    np.testing.assert_allclose(metrics.deletion_auc(effnet, x[:1], cams[:1], **options), [peer["deletion_auc"]],
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(metrics.insertion_auc(effnet, x[:1], cams[:1], baseline="zeros", **options),
                               [peer["insertion_auc"]], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ Quantus
def masks(boxes, tolerance=0.0):
    """``(B, 1, 224, 224)`` masks of the pixels within ``tolerance`` (Euclidean, scipy) of each end-exclusive box."""
    out = np.zeros((len(boxes), 1, 224, 224))
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        outside = np.ones((224, 224), bool)
        outside[y0:y1, x0:x1] = False
        out[i, 0] = ndimage.distance_transform_edt(outside) <= tolerance
    return out


def test_pointing_games_equal_quantus(gradcam, photo_batch):
    """Quantus' ``PointingGame`` on the box's mask is ``pointing_game(tolerance=0)``, on the box dilated by 15 px
    ``tolerance=15``; its ``RelevanceMassAccuracy`` is ``energy_pointing_game`` (float64 sums over the same
    pixels: 1e-12). Boxes: the objects', 1-pixel boxes 10 px right of each map's peak (a miss at 0, a hit at 15),
    and a far corner. A constant map differs (module docstring)."""
    x, y = photo_batch[:2].numpy(), np.array(CLASSES)
    peak = np.stack(np.unravel_index(gradcam.reshape(2, -1).argmax(1), (224, 224)), 1)  # (row, column)
    near = [(c + 10, r, c + 11, r + 1) for r, c in peak]
    for boxes in ([OBJECT_BOXES[n] for n in NAMES], near, [(200, 200, 224, 224)] * 2):
        for tolerance in (0, 15):
            peer = quantus.PointingGame(disable_warnings=True)(model=None, x_batch=x, y_batch=y,
                                                               a_batch=gradcam[:, None],
                                                               s_batch=masks(boxes, tolerance))
            np.testing.assert_array_equal(metrics.pointing_game(gradcam, boxes, tolerance=tolerance), peer)
        peer = quantus.RelevanceMassAccuracy(disable_warnings=True)(model=None, x_batch=x, y_batch=y,
                                                                    a_batch=gradcam[:, None], s_batch=masks(boxes))
        np.testing.assert_allclose(metrics.energy_pointing_game(gradcam, boxes), peer, rtol=1e-12, atol=1e-15)
    assert not metrics.pointing_game(gradcam, near, tolerance=0).any()
    assert metrics.pointing_game(gradcam, near, tolerance=15).all()


def test_deletion_curve_equals_quantus_pixel_flipping(effnet, photos):
    """Quantus' ``PixelFlipping`` with ``perturb_baseline=0.0`` (camcore's ``"zeros"``) is the deletion curve
    without its ``k = 0`` point, when its steps remove whole pixels: 3 steps of ``N`` channel values (``N / 3``
    pixels) at 144 x 144 (224 x 224 is not a multiple of 3). The map is replaced by its ranks in camcore's order
    (ties by position): the same curve for camcore, and no ties for Quantus' unstable sort. rtol 3e-5: the same
    images scored in differently batched float32 passes (Quantus one step at a time, camcore all at once):
    probabilities 7e-6 apart, relatively (measured)."""
    x = to_tensor(photos[:2], size=144)
    cams = camcore.explain(effnet, x, method="gradcam", layer=LAYER, targets=CLASSES).double().numpy()
    n = cams[0].size
    rank = np.empty((2, n))
    np.put_along_axis(rank, np.argsort(-cams.reshape(2, -1), axis=1, kind="stable"), np.arange(n)[None], axis=1)
    ranked = (1 - rank / n).reshape(cams.shape)
    peer = quantus.PixelFlipping(features_in_step=n, perturb_baseline=0.0, disable_warnings=True)(
        model=effnet, x_batch=x.numpy(), y_batch=np.array(CLASSES), a_batch=ranked[:, None], softmax=True)
    got = metrics.deletion_curve(effnet, x, ranked, targets=CLASSES, steps=3, progress=False)
    np.testing.assert_allclose(got[:, 1:], peer, rtol=3e-5, atol=0)


def test_road_equals_quantus_road_and_its_noisy_linear_imputation(effnet, photo_batch):
    """Quantus' ``ROAD`` and its ``noisy_linear_imputation`` on the cat, labelled with the model's top class (285,
    Egyptian cat: the unperturbed accuracy is 1) and explained by camcore's Grad-CAM of it, made tie-free (noise
    below 1e-6, as ``test_road.py``). At p = 25, 50, 75 both remove as many pixels (asserted from both formulas)
    and, the map's values being distinct and in camcore's order after Quantus' ``normalise_by_max`` (asserted;
    ``abs`` is off by default), the same pixels. Quantus is given the map as channel 0 of a ``(1, 3, H, W)``
    attribution whose other channels (-1) rank below every pixel, with percentages ``p / 3`` (its count is of
    ``a_size = 3 H W`` then): the map alone crashes it (module docstring). Noise 0 on both."""
    from quantus.functions.perturb_func import noisy_linear_imputation as quantus_imputation

    x, n = photo_batch[:1], 224 * 224
    with torch.no_grad():
        label = int(effnet(x).argmax(1)[0])
    assert label == 285
    cam = camcore.explain(effnet, x, method="gradcam", layer=LAYER, targets=[label]).double().numpy()
    cam = cam + np.random.default_rng(8).uniform(0, 1e-6, cam.shape)
    percent = [25, 50, 75]
    counts = faithfulness._removed_counts(percent, n)  # camcore's formula
    attribution = np.concatenate([cam[:, None], np.full((1, 2, 224, 224), -1.0)], axis=1)
    a_size, peer_percent = attribution[0].size, [p / 3 for p in percent]  # Quantus' a_size: a_batch[0, :, :].size
    assert [int(a_size * q / 100) for q in peer_percent] == [int(n * p / 100) for p in percent] == counts.tolist()
    seen = quantus.functions.normalise_func.normalise_by_max(attribution).reshape(-1)  # what Quantus sorts
    order = np.argsort(-cam.reshape(-1), kind="stable")
    assert np.unique(seen[:n]).size == n and seen[n:].max() < seen[:n].min()
    np.testing.assert_array_equal(np.argsort(-seen, kind="stable")[:n], order)

    # (a) Both solve Rong et al.'s 8-neighbour system for the removed pixels, Quantus with SciPy's sparse LU
    # (float64), camcore by multigrid-preconditioned CG to its default tol=1e-4 in float32: within 1e-3 of the
    # image's range (6.7e-5 measured).
    image = x[0].numpy()
    for k in counts:
        removed = np.zeros(n, bool)
        removed[order[:k]] = True
        got = linear_imputation(x.numpy(), removed.reshape(1, 224, 224))[0]
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, quantus_imputation(image, order[:k], noise=0), rtol=0,
                                   atol=1e-3 * np.ptp(image))

    # (b) Quantus' booleans, per percentage, are camcore's curve of a callable target that is 1.0 where the
    # outputs' argmax is the label: exactly (the two imputations move the logits by 1.1e-3 at most, the top-2
    # margins are 0.73 at least: measured).
    peer = quantus.ROAD(percentages=peer_percent, noise=0, disable_warnings=True)(
        model=effnet, x_batch=x.numpy(), y_batch=np.array([label]), a_batch=attribution)
    assert list(peer) == peer_percent
    got = metrics.road_curve(effnet, x, cam, targets=lambda out: (out.argmax(1) == label).double(),
                             percentiles=percent, noise=0, progress=False)
    np.testing.assert_array_equal(got[0], list(peer.values()))
    np.testing.assert_array_equal(got[0], [1, 1, 0])  # kept at 25 and 50 %, lost at 75 %: a real comparison


def test_spearman_equals_quantus_mprt_on_its_pairs_of_maps(effnet, photo_batch):
    """Quantus' MPRT (its own randomisation, ``skip_layers``: the fully randomised model only) with camcore's
    Grad-CAM as its ``explain_func``: its Spearman scores equal ``metrics.spearman`` of the maps it compared (the
    first call's maps against its re-explanation of the model, then against the randomised model's). Both rank
    with average ties and correlate the ranks: 1e-12."""
    x, seen = photo_batch[1:2], []  # the coffee photo

    def explain(model, inputs, targets):
        out = camcore.explain(model, torch.from_numpy(inputs), method="gradcam", layer=LAYER,
                              targets=[int(t) for t in targets]).numpy()
        seen.append(out)
        return out

    peer = quantus.MPRT(skip_layers=True, disable_warnings=True)(
        model=effnet, x_batch=x.numpy(), y_batch=np.array(CLASSES[1:]), a_batch=None, explain_func=explain)
    assert list(peer) == ["original", "_conv_stem"] and len(seen) == 3  # randomised down to the first layer
    for scores, maps_ in zip(peer.values(), seen[1:]):
        np.testing.assert_allclose(metrics.spearman(seen[0], maps_), scores, rtol=1e-12, atol=1e-12)
    assert abs(peer["_conv_stem"][0]) < 0.5  # the randomised model's maps are a real comparison
