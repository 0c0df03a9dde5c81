"""The model-randomisation sanity check (issue 15, part; Adebayo et al. 2018): the similarity measures against
scipy and scikit-image, the randomised copies on every backend kind (only the named layers change, the model never),
and the paper's qualitative result on the real EfficientNet-Lite0: Grad-CAM's maps decorrelate as the top layers
are randomised, guided backpropagation's stay far more similar."""
from __future__ import annotations

import numpy as np
import pytest

import contract_models as cm
from camcore import metrics


def test_spearman_and_ssim_equal_scipy_and_skimage():
    stats = pytest.importorskip("scipy.stats")
    skm = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    a = rng.uniform(size=(3, 20, 24))
    b = np.clip(a + rng.normal(0, 0.2, size=a.shape), 0, 1)
    b[2] = np.round(b[2] * 4) / 4  # ties
    want = [stats.spearmanr(a[i].ravel(), b[i].ravel()).statistic for i in range(3)]
    np.testing.assert_allclose(metrics.spearman(a, b), want, rtol=1e-10)
    want = [skm.structural_similarity(a[i], b[i], data_range=1.0, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False) for i in range(3)]
    np.testing.assert_allclose(metrics.ssim(a, b), want, rtol=1e-6)
    np.testing.assert_allclose(metrics.ssim(a, a), 1.0)
    assert metrics.spearman(a, np.zeros_like(a)).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"maps: expected two batches of maps"):
        metrics.spearman(a, b[:2])


@pytest.mark.parametrize("name", ["torch", "keras", "linen", "nnx"])
def test_randomized_copies_change_only_the_named_layers(name):
    """``Engine.randomized``: a copy whose named layers are re-drawn (N(0, rms^2)), the others identical, the
    model untouched; the same seed gives the same copy."""
    from camcore.backends import adapter_for

    kind = cm.build(name, cm.weights())
    engine = adapter_for(kind.model)
    assert engine.parameter_layers() == ["conv1", "conv2", "fc"]
    snap = kind.snapshot()
    x = kind.x()
    before = cm.to_numpy(engine.capture(x, ["conv2"], None, gradients=False).acts[0])
    twin = engine.randomized(["fc"], seed=3)
    other = adapter_for(twin)
    cap = other.capture(x, ["conv2"], None, gradients=False)
    after = cm.to_numpy(cap.outputs)
    np.testing.assert_array_equal(cm.to_numpy(cap.acts[0]), before)  # below the randomised layer: the same
    assert not np.allclose(after, cm.to_numpy(engine.capture(x, [], None, gradients=False).outputs))
    again = adapter_for(engine.randomized(["fc"], seed=3)).capture(x, [], None, gradients=False).outputs
    np.testing.assert_array_equal(cm.to_numpy(again), after)
    kind.assert_untouched(snap)


def test_the_pair_of_functions_has_nothing_to_randomize():
    kind = cm.build("pair", cm.weights())
    with pytest.raises(ValueError, match=r"layers: the model has no layer with trainable parameters"):
        metrics.randomization_check(kind.model, kind.x(), method="gradcam")


def test_gradcam_decorrelates_and_guided_backprop_does_not(effnet, photo_batch):
    """Adebayo et al.'s result on the real model (cascading, from the classifier down): Grad-CAM's maps lose their
    rank correlation at once; guided backpropagation's barely change."""
    from model_checks import assert_untouched, snapshot

    x, targets = photo_batch[:2], [281, 967]
    groups = ["_fc", "_conv_head", "_blocks.15"]
    snap = snapshot(effnet)
    cam = metrics.randomization_check(effnet, x, method="gradcam", layer="_conv_head", layers=groups,
                                      targets=targets)
    gb = metrics.randomization_check(effnet, x, method="guided-backprop", layers=groups, targets=targets)
    assert_untouched(effnet, snap)
    assert cam["layers"] == [["_fc"], ["_conv_head"], ["_blocks.15"]] and cam["spearman"].shape == (3, 2)
    assert np.all(np.abs(cam["spearman"]).mean(axis=1) < 0.5), cam["spearman"]
    assert np.all(gb["spearman"].mean(axis=1) > 0.9) and np.all(gb["ssim"].mean(axis=1) > 0.9), gb
    single = metrics.randomization_check(effnet, x, method="gradcam", layer="_conv_head", layers=["_blocks.15"],
                                         targets=targets, cascade=False)
    assert single["spearman"].shape == (1, 2) and np.all(np.abs(single["spearman"]) < 0.5)  # the map needs it


def test_model_based_metrics_show_progress_bars(capsys):
    """``progress=True``: a bar over the randomised models, and over the images scored by the faithfulness
    metrics (tqdm on stderr); ``progress=False``: nothing. The contract CNN's 8 x 8 maps are smaller than SSIM's
    window: the check gives Spearman alone."""
    from camcore import metrics

    kind = cm.build("torch", cm.weights())
    cams = np.random.default_rng(0).uniform(size=(cm.B, cm.H, cm.W))
    runs = {"image": lambda p: metrics.road_curve(kind.model, kind.x(), cams, percentiles=[50], progress=p),
            "model": lambda p: metrics.randomization_check(kind.model, kind.x(), method="gradcam", layer="conv2",
                                                           progress=p)}
    for unit, run in runs.items():
        run(False)
        assert capsys.readouterr().err == ""
        out = run(True)
        err = capsys.readouterr().err
        assert "camcore" in err and unit in err, err
    assert out["ssim"] is None and out["spearman"].shape[1] == cm.B
