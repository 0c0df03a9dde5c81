"""The pretrained EfficientNet-Lite0 on PyTorch, Keras and Flax: same logits, same maps for every method.

The Keras and Flax models are camcore's own ports of the PyTorch weights (``camcore.backends.ports``); the
comparison goes through the reusable helper in ``crossframework.py``.
"""
import numpy as np
import pytest

import camcore
from crossframework import explain_everywhere, flax_port, keras_port, max_map_difference, torch_port

LAYERS = ["_conv_head", "_blocks.10"]
MAP_TOL = 1e-3  # max abs difference of normalised maps
LOGIT_TOL = 1e-4


def _port_or_skip(make, module, effnet):
    pytest.importorskip(module)
    return make(effnet)


@pytest.fixture(scope="module")
def ports(effnet):
    return [torch_port(effnet), _port_or_skip(keras_port, "keras", effnet), _port_or_skip(flax_port, "flax", effnet)]


@pytest.fixture(scope="module")
def nchw(photo_batch):
    return photo_batch.numpy()


def test_logits_agree_on_real_photos(ports, nchw):
    ref = ports[0].logits(ports[0].inputs(nchw))
    for port in ports[1:]:
        got = port.logits(port.inputs(nchw))
        assert got.shape == ref.shape == (4, 1000)
        assert np.max(np.abs(got - ref)) <= LOGIT_TOL, port.framework
        assert (got.argmax(1) == ref.argmax(1)).all(), port.framework


GRADIENT_FREE = {m for m, spec in camcore.METHODS.items() if spec.perturbation}


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("method", sorted(set(camcore.METHODS) - {"cam"} - GRADIENT_FREE))
def test_every_method_gives_the_same_maps_on_every_framework(ports, nchw, method, layer):
    maps = explain_everywhere(ports, nchw, method=method, layer=layer, targets=[281, 967, 0, 812])
    assert all(m.shape == (4, 224, 224) for m in maps.values())
    diffs = max_map_difference(maps)
    assert max(diffs.values()) <= MAP_TOL, diffs


def test_cam_and_top_class_targets_agree(ports, nchw):
    # CAM reads the ported classifier (Keras Dense kernel, Flax Dense) and checks its premise on each framework
    maps = explain_everywhere(ports, nchw, method="cam", layer="_swish")
    assert max(max_map_difference(maps).values()) <= MAP_TOL


def test_fused_layers_and_options_agree(ports, nchw):
    maps = explain_everywhere(ports, nchw, method="layercam", layer=LAYERS, eigen_smooth=True,
                              counterfactual=True, targets=3)
    assert max(max_map_difference(maps).values()) <= MAP_TOL


# the gradient-free methods, with few channels (top_k) where each costs full forward passes
GRADIENT_FREE_CASES = [
    ("ablationcam", "_conv_head", {}),  # all 1280 channels: only the layers after _conv_head run per channel
    ("ablationcam", "_blocks.10", {}),
    ("scorecam", "_conv_head", {"top_k": 12}),
    ("scorecam", "_blocks.10", {"top_k": 8, "weighting": "channel-softmax"}),
    ("sscam", "_conv_head", {"top_k": 3, "num_samples": 2}),
    ("iscam", "_conv_head", {"top_k": 3, "num_samples": 3}),
]


@pytest.mark.parametrize("method,layer,options", GRADIENT_FREE_CASES, ids=lambda v: str(v))
def test_gradient_free_methods_give_the_same_maps_on_every_framework(ports, nchw, method, layer, options):
    assert {m for m, _, _ in GRADIENT_FREE_CASES} == GRADIENT_FREE  # every gradient-free method is covered
    infos: dict = {}
    maps = explain_everywhere(ports, nchw[:2], method=method, layer=layer, targets=[281, 967], progress=False,
                              infos=infos, **options)
    assert all(m.shape == (2, 224, 224) and np.isfinite(m).all() for m in maps.values())
    diffs = max_map_difference(maps)
    assert max(diffs.values()) <= MAP_TOL, diffs
    # the fast path ran on every framework: no fallback to whole-model passes (the port's layer names, e.g. the
    # root-level "_conv_stem" and the shared ReLU6's calls, must be valid TensorFlow graph scopes)
    assert not [info["reason"] for info in infos.values() if "reason" in info], infos
    if method == "ablationcam":
        assert {k: info["path"] for k, info in infos.items()} == {"torch": "tail", "keras": "compiled",
                                                                   "flax": "compiled"}
