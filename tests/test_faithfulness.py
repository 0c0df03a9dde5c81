"""Faithfulness metrics (issue 15, part): deletion/insertion (RISE) and the Grad-CAM++ confidence measures, against
a model whose per-pixel contributions are exact -- a linear model -- with every expected value computed in float64
NumPy from its weights; the same metric on torch, Keras and JAX models holding the same weights; and on the real
EfficientNet-Lite0, Grad-CAM's deletion beats a random map's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import camcore
from camcore import faithfulness as F

H = W = 6
N = H * W


@pytest.fixture(scope="module")
def linear():
    """``logit_0 = sum_p w_p x_p + b``, ``logit_1 = 0``: class 0's probability is ``sigmoid(logit_0)``; pixel
    ``p`` contributes exactly ``w_p x_p``."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(N).astype(np.float32)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(N, 2)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.from_numpy(np.stack([w, np.zeros(N, np.float32)])))
        model[1].bias.copy_(torch.tensor([0.3, 0.0]))
    x = rng.uniform(0.5, 1.5, size=(3, 1, H, W)).astype(np.float32)
    return model, w, x


def oracle_curve(w, x, order, steps, insertion=False, base=None):
    """Class 0's probability as the first ``k / steps`` of ``order`` is removed (set to ``base``) or inserted."""
    base = np.zeros_like(x) if base is None else base
    out = []
    for k in range(steps + 1):
        taken = np.zeros(N, bool)
        taken[order[: int(np.rint(k / steps * N))]] = True
        img = np.where(taken, x, base) if insertion else np.where(taken, base, x)
        out.append(1 / (1 + np.exp(-(w @ img + 0.3))))
    return np.array(out)


def test_deletion_and_insertion_curves_equal_the_linear_oracle(linear):
    model, w, x = linear
    contrib = w[None] * x.reshape(3, N)
    cams = contrib.reshape(3, H, W)
    got = F.deletion_curve(model, torch.from_numpy(x), cams, targets=0, steps=12)
    order = np.argsort(-contrib, axis=1, kind="stable")
    want = np.stack([oracle_curve(w, x[i].ravel(), order[i], 12) for i in range(3)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    mean = np.broadcast_to(x.reshape(3, N).mean(1, keepdims=True), (3, N))
    got = F.deletion_curve(model, torch.from_numpy(x), cams, targets=0, steps=12, insertion=True, baseline="mean")
    want = np.stack([oracle_curve(w, x[i].ravel(), order[i], 12, True, mean[i]) for i in range(3)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    auc = F.deletion_auc(model, torch.from_numpy(x), cams, targets=0, steps=12)
    np.testing.assert_allclose(auc, np.trapezoid(F.deletion_curve(model, torch.from_numpy(x), cams, targets=0,
                                                                  steps=12), dx=1 / 12, axis=1), rtol=1e-12)


def test_deleting_in_the_order_of_the_true_contributions_beats_any_other(linear):
    """The exact contributions as a map: its deletion AUC is below that of every other ordering tried (the
    reversed one, random ones, the raw pixel values), and its insertion AUC above."""
    model, w, x = linear
    xt = torch.from_numpy(x)
    truth = (w[None] * x.reshape(3, N)).reshape(3, H, W)
    rng = np.random.default_rng(1)
    others = [-truth, x[:, 0], *(rng.standard_normal((3, H, W)) for _ in range(5))]
    d0 = F.deletion_auc(model, xt, truth, targets=0, steps=N)
    i0 = F.insertion_auc(model, xt, truth, targets=0, steps=N, baseline="zeros")
    for other in others:
        assert np.all(d0 <= F.deletion_auc(model, xt, other, targets=0, steps=N) + 1e-12)
        assert np.all(i0 >= F.insertion_auc(model, xt, other, targets=0, steps=N, baseline="zeros") - 1e-12)


def test_average_drop_and_increase_in_confidence_equal_their_definition(linear):
    model, w, x = linear
    cams = np.random.default_rng(2).uniform(size=(3, H, W))
    y = 1 / (1 + np.exp(-(x.reshape(3, N) @ w + 0.3)))
    o = 1 / (1 + np.exp(-((x[:, 0] * cams).reshape(3, N) @ w + 0.3)))
    xt = torch.from_numpy(x)
    np.testing.assert_allclose(F.average_drop(model, xt, cams, targets=0), 100 * np.maximum(0, y - o) / y,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(F.increase_in_confidence(model, xt, cams, targets=0), o > y)
    drops = {"a": np.array([1.0, 5.0, 2.0]), "b": np.array([3.0, 5.0, 1.0])}
    assert {k: v.tolist() for k, v in F.win(drops).items()} == {"a": [True, True, False], "b": [False, True, True]}


def test_bad_arguments_are_named(linear):
    model, w, x = linear
    xt = torch.from_numpy(x)
    with pytest.raises(ValueError, match=r"cams: expected maps of shape \(3, 6, 6\)"):
        F.deletion_auc(model, xt, np.ones((3, 5, 5)))
    with pytest.raises(ValueError, match=r"baseline: expected one of \('zeros', 'mean', 'blur'\)"):
        F.deletion_auc(model, xt, np.ones((3, H, W)), baseline="noise")
    with pytest.raises(ValueError, match=r"steps: expected a positive int, got 0"):
        F.deletion_auc(model, xt, np.ones((3, H, W)), steps=0)
    with pytest.raises(ValueError, match=r"cams: expected normalised maps in \[0, 1\]"):
        F.average_drop(model, xt, np.full((3, H, W), 2.0))
    with pytest.raises(ValueError, match=r"targets: class index 5 is out of range"):
        F.deletion_auc(model, xt, np.ones((3, H, W)), targets=5)


def test_the_same_metric_on_every_backend():
    """The contract CNN on torch, Keras and Flax with one set of weights: the same deletion curve (zeros and blur
    baselines), average drop and ROAD curves (noise included: drawn on the host), the maps given once."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("flax")
    import contract_models as cm

    p = cm.weights()
    cams = np.random.default_rng(3).uniform(size=(cm.B, cm.H, cm.W))
    got = {}
    for name in ("torch", "keras", "linen"):
        kind = cm.build(name, p)
        got[name] = (F.deletion_curve(kind.model, kind.x(), cams, targets=[2, 0, 1], steps=4),
                     F.deletion_curve(kind.model, kind.x(), cams, targets=[2, 0, 1], steps=4, baseline="blur",
                                      insertion=True),
                     F.average_drop(kind.model, kind.x(), cams, targets=[2, 0, 1]),
                     *(F.road_curve(kind.model, kind.x(), cams, targets=[2, 0, 1], order=o, percentiles=[25, 75])
                       for o in ("morf", "lerf")))
    for name in ("keras", "linen"):
        for a, b in zip(got[name], got["torch"]):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_gradcam_deletes_faster_than_a_random_map_on_the_real_model(effnet, photo_batch):
    cams = camcore.explain(effnet, photo_batch, method="gradcam", layer="_conv_head", targets=[281, 967, 0, 812])
    random = np.random.default_rng(4).uniform(size=cams.shape)
    d_cam = F.deletion_auc(effnet, photo_batch, cams, targets=[281, 967, 0, 812], steps=10, progress=False)
    d_rnd = F.deletion_auc(effnet, photo_batch, random, targets=[281, 967, 0, 812], steps=10, progress=False)
    assert d_cam.mean() < d_rnd.mean(), (d_cam, d_rnd)


def test_confidence_measures_equal_pytorch_grad_cams(effnet, photo_batch):
    """pytorch-grad-cam's ``DropInConfidence`` is ``max(0, Y - O)`` of softmax probabilities, not divided by ``Y``
    nor in % (the Grad-CAM++ paper's Average Drop, which camcore computes): equal after that factor; its
    ``IncreaseInConfidence`` is camcore's."""
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    x, targets = photo_batch[:2], [281, 967]
    gradcam = camcore.explain(effnet, x, method="gradcam", layer="_conv_head", targets=targets)
    noise = torch.rand(gradcam.shape, generator=torch.Generator().manual_seed(5))  # maps that lose confidence
    peer_targets = [ClassifierOutputSoftmaxTarget(t) for t in targets]
    with torch.no_grad():
        y = effnet(x).softmax(1)[[0, 1], targets].numpy().astype(np.float64)
    for cams in (gradcam, noise):
        with torch.no_grad():
            peer_drop = DropInConfidence()(x, cams.numpy(), peer_targets, effnet)
            peer_increase = IncreaseInConfidence()(x, cams.numpy(), peer_targets, effnet)
        np.testing.assert_allclose(F.average_drop(effnet, x, cams, targets=targets), 100 * peer_drop / y,
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(F.increase_in_confidence(effnet, x, cams, targets=targets), peer_increase > 0)
    assert (np.asarray(peer_drop) > 1e-3).any()  # the noise maps: a real drop was compared


def test_the_blur_baseline_is_scipys_gaussian_filter():
    """RISE's blurred baseline: a Gaussian of sigma 5 truncated at 10 pixels, edges replicated -- scipy's
    ``gaussian_filter(mode="nearest", truncate=2)`` over the spatial axes, on channels-first and -last inputs."""
    ndimage = pytest.importorskip("scipy.ndimage")
    x = np.random.default_rng(6).uniform(size=(2, 3, 17, 23))
    want = ndimage.gaussian_filter(x, sigma=(0, 0, 5, 5), mode="nearest", truncate=2.0)
    np.testing.assert_allclose(F._baseline(x, "blur", last=False), want, rtol=0, atol=1e-12)
    last = np.moveaxis(x, 1, -1)
    np.testing.assert_allclose(F._baseline(torch.from_numpy(last), "blur", last=True).numpy(),
                               np.moveaxis(want, 1, -1), rtol=0, atol=1e-12)
