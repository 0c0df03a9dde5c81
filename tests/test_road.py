"""ROAD (issue 15, part): the noisy linear imputation against the paper's equation solved densely in float64 and
against pytorch-grad-cam's sparse direct solve (Rong et al.'s code), on every array namespace; ``road_curve`` and
``road`` against pytorch-grad-cam's ``ROADMostRelevantFirst`` / ``ROADLeastRelevantFirst`` / ``ROADCombined`` on the
real EfficientNet-Lite0 (the same scores on torch, Keras and Flax: ``test_faithfulness.py``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import camcore
from camcore import faithfulness as F
from camcore.imputation import linear_imputation, noisy_linear_imputation

STENCIL = {(dy, dx): (1 / 12 if dy and dx else 1 / 6) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx}


def dense_oracle(img, removed):
    """Rong et al.'s imputation from its equation: for every removed pixel ``i``, ``sum_j w_ij (x_i - x_j) = 0``
    over its neighbours ``j`` in the image, written out pixel by pixel and solved densely (float64)."""
    c, h, w = img.shape
    idx = {p: k for k, p in enumerate(zip(*np.nonzero(removed)))}
    a = np.zeros((len(idx), len(idx)))
    b = np.zeros((len(idx), c))
    for (y, x), k in idx.items():
        for (dy, dx), wt in STENCIL.items():
            q = (y + dy, x + dx)
            if not (0 <= q[0] < h and 0 <= q[1] < w):
                continue
            a[k, k] += wt
            if q in idx:
                a[k, idx[q]] -= wt
            else:
                b[k] += wt * img[:, q[0], q[1]]
    out = img.astype(np.float64).copy()
    if idx:
        sol = np.linalg.solve(a, b)
        for (y, x), k in idx.items():
            out[:, y, x] = sol[k]
    return out


def blob_masks(rng, n, h, w, fractions):
    """Removed sets like a CAM's: the top ``fraction`` of a smooth random field, one per fraction."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.random((h, w)), 4)
    return np.stack([field >= np.quantile(field, 1 - f) for f in fractions])


@pytest.mark.parametrize("shape", [(2, 9, 11), (1, 16, 16), (3, 7, 4), (1, 1, 5)])
def test_imputation_solves_the_papers_equation(shape, rng):
    """Random and blob-shaped removed sets (odd sizes, a one-row image, a single kept pixel) in float64 to a tight
    tolerance: the dense oracle's values on the removed pixels, the kept pixels unchanged bit for bit."""
    c, h, w = shape
    img = rng.normal(size=(4, c, h, w))
    removed = np.stack([rng.random((h, w)) < 0.5, rng.random((h, w)) < 0.9,
                        np.ones((h, w), bool), np.zeros((h, w), bool)])
    removed[2].flat[rng.integers(h * w)] = False  # one kept pixel: a system of a constant solution
    got = linear_imputation(img, removed, tol=1e-12, max_iter=500)
    for i in range(4):
        np.testing.assert_allclose(got[i], dense_oracle(img[i], removed[i]), rtol=0, atol=1e-9)
        np.testing.assert_array_equal(got[i][:, ~removed[i]], img[i][:, ~removed[i]])


@pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")
def test_imputation_equals_pytorch_grad_cams_sparse_solve(rng):
    """pytorch-grad-cam's ``NoisyLinearImputer`` (noise 0) solves the same system with SciPy's sparse LU: at the
    default ``tol=1e-4`` in float32 the values agree to 1e-3 of the image's range, with torch tensors in and out."""
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from scipy.ndimage import gaussian_filter

    img = gaussian_filter(rng.normal(size=(3, 64, 80)), (0, 2, 2)).astype(np.float32) * 5
    removed = blob_masks(rng, 1, 64, 80, (0.1, 0.5, 0.9))
    got = linear_imputation(torch.from_numpy(np.stack([img] * 3)), torch.from_numpy(removed), tol=1e-4)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    for i in range(3):
        want = NoisyLinearImputer(noise=0)(torch.from_numpy(img), torch.from_numpy(np.float32(~removed[i])))
        np.testing.assert_allclose(got[i].numpy(), want.numpy(), rtol=0, atol=1e-3 * np.ptp(img))


def test_imputation_is_array_api_code(rng):
    """The strict Array-API namespace gives NumPy's result, in its own arrays (JAX: the Flax model's ROAD below)."""
    xp = pytest.importorskip("array_api_strict")
    img = rng.normal(size=(2, 3, 13, 10)).astype(np.float32)
    removed = blob_masks(rng, 1, 13, 10, (0.3, 0.8))
    want = linear_imputation(img, removed)
    got = noisy_linear_imputation(xp.asarray(img), xp.asarray(removed), noise=0.0)
    assert type(got).__module__.split(".")[0] == "array_api_strict"
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


def test_noise_is_seeded_per_image_and_only_on_removed_pixels(rng):
    img = rng.normal(size=(3, 3, 40, 40)).astype(np.float32)
    removed = rng.random((3, 40, 40)) < 0.6
    clean = linear_imputation(img, removed)
    noisy = noisy_linear_imputation(img, removed, noise=0.05, seed=[(7, i) for i in range(3)])
    diff = (noisy - clean).transpose(1, 0, 2, 3)  # (C, R, H, W)
    assert np.all(diff[:, ~removed] == 0) and np.all(diff[:, removed] != 0)
    assert abs(diff[:, removed].std() - 0.05) < 0.003
    alone = noisy_linear_imputation(img[1:2], removed[1:2], noise=0.05, seed=[(7, 1)])  # batching-independent
    np.testing.assert_allclose(alone[0], noisy[1], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def road_case(effnet, photo_batch):
    """Two photos, their Grad-CAM maps made tie-free (pytorch-grad-cam thresholds at a percentile, camcore ranks:
    the same pixels when the values are distinct), the targets' probabilities."""
    x, targets = photo_batch[:2], [281, 967]
    cams = camcore.explain(effnet, x, method="gradcam", layer="_conv_head", targets=targets).numpy()
    cams = cams + np.random.default_rng(8).uniform(0, 1e-6, cams.shape)
    with torch.no_grad():
        y = effnet(x).softmax(1)[[0, 1], targets].numpy().astype(np.float64)
    return x, targets, cams, y


@pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")  # NumPy on torch tensors, in the peer
def test_road_equals_pytorch_grad_cams(effnet, road_case):
    """pytorch-grad-cam's ``ROADMostRelevantFirst(q)`` removes the pixels at or above the map's ``q``-th
    percentile, so ``q = 100 - p`` is camcore's ``p`` % removed; ``ROADLeastRelevantFirst(q)`` removes those at
    or below the ``(100 - q)``-th; both return the score's change from the image. With their imputer's noise set
    to 0 (its ``torch.randn`` cannot be seeded alike): equal to 1e-3."""
    from pytorch_grad_cam.metrics.perturbation_confidence import (PerturbationConfidenceMetric,
                                                                   RemoveLeastRelevantFirst, RemoveMostRelevantFirst)
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    x, targets, cams, y = road_case
    peer_targets = [ClassifierOutputSoftmaxTarget(t) for t in targets]
    percentiles = [30, 70]
    curves = {}
    for order, remove in (("morf", RemoveMostRelevantFirst), ("lerf", RemoveLeastRelevantFirst)):
        peer = np.stack([PerturbationConfidenceMetric(remove(100 - p, NoisyLinearImputer(noise=0)))(
            x, cams.astype(np.float32), peer_targets, effnet) for p in percentiles], axis=1)
        curves[order] = F.road_curve(effnet, x, cams, targets=targets, order=order, percentiles=percentiles,
                                     noise=0)
        np.testing.assert_allclose(curves[order] - y[:, None], peer, rtol=0, atol=1e-3)
        assert np.ptp(peer) > 0.05  # the scores move: a real comparison
    combined = F.road(effnet, x, cams, targets=targets, order="combined", percentiles=percentiles, noise=0)
    np.testing.assert_allclose(combined, ((curves["lerf"] - curves["morf"]) / 2).mean(1), rtol=0, atol=1e-12)


def test_road_noise_is_seeded_and_independent_of_the_chunking(effnet, road_case):
    x, targets, cams, _ = road_case
    a = F.road_curve(effnet, x, cams, targets=targets, percentiles=[50], batch_size=1)
    b = F.road_curve(effnet, x, cams, targets=targets, percentiles=[50], batch_size=2)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)  # the noise does not depend on the chunking
    clean = F.road_curve(effnet, x, cams, targets=targets, percentiles=[50], noise=0)
    assert np.abs(a - clean).max() > 1e-4  # the noise is there (it moves the cat's score by about 0.09)


def test_road_with_a_callable_target_and_bad_arguments(effnet, road_case):
    x, targets, cams, _ = road_case
    logit = F.road_curve(effnet, x, cams, targets=lambda out: out[:, 281], percentiles=[30], noise=0)
    with torch.no_grad():
        imputed = linear_imputation(x, torch.from_numpy(cams >= np.quantile(cams.reshape(2, -1), 0.7, axis=1)
                                                        [:, None, None]))
        np.testing.assert_allclose(logit[:, 0], effnet(imputed)[:, 281].numpy(), rtol=0, atol=1e-3)
    for bad, match in [(dict(percentiles=[0, 50]), r"percentiles: expected numbers strictly between 0 and 100"),
                       (dict(percentiles=[]), r"percentiles: expected a non-empty sequence"),
                       (dict(order="mrf"), r"order: expected 'morf' or 'lerf', got 'mrf'")]:
        with pytest.raises(ValueError, match=match):
            F.road_curve(effnet, x, cams, targets=targets, **bad)
    with pytest.raises(ValueError, match=r"order: expected one of \('morf', 'lerf', 'combined'\)"):
        F.road(effnet, x, cams, order="both")
    with pytest.raises(ValueError, match=r"cams: expected maps of shape \(2, 224, 224\)"):
        F.road(effnet, x, cams[:, :100])
