"""Every method at float32's extremes, on every backend kind (issue 13 #3): the contract's small CNN with its
target layer scaled by 1e20 and its classifier by 1e21 (the issue's saturated model) is positive-homogeneous, so
its activations and gradients are its twin's times 1e20 and 1e21 and every normalised map must be the twin's --
except Grad-CAM++'s, whose ``alpha = 1 / (2 + sum(A) G)`` is not scale-free (the paper's exponential score): it
must be its float64 oracle's on the saturated model's own ``A`` and ``G``.
Before, ``w * A`` and Grad-CAM++'s ``sum(A) * G`` overflowed: NaN pixels or all-zero maps. Methods that read the
scores (CAM's premise check, the gradient-free methods) get a model whose logits stay finite (1e37 times the
twin's). One call per model computes every method from one capture, so the sweep costs a few passes per kind."""
from __future__ import annotations

import numpy as np
import pytest

import contract_models as cm
from contract_models import to_numpy
from test_core_extremes import o_gradcam_pp

pytest.importorskip("tensorflow")
pytest.importorskip("flax")

import camcore  # noqa: E402

GRADIENT = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "gradcam-elementwise", "eigengradcam",
            "eigencam"]
SCORED = ["ablationcam", "scorecam"]  # read the logits: the finite-logit model
TARGETS = [2, 0, 1]
P = cm.weights()


def scaled(a2: float, fc: float, bias: float) -> dict:
    p = dict(P)
    p["w2"], p["b2"] = P["w2"] * np.float32(a2), P["b2"] * np.float32(a2)
    p["wf"], p["bf"] = P["wf"] * np.float32(fc), P["bf"] * np.float32(bias)
    return p


SATURATED = scaled(1e20, 1e21, 1.0)  # logits ~1e41: inf; gradients finite, sum(A) * G ~1e41
LOUD = scaled(1e20, 1e17, 1e37)  # logits 1e37 times the twin's, finite

_TWINS: dict = {}


def twin(name):
    if name not in _TWINS:
        _TWINS[name] = cm.build(name, P)
    return _TWINS[name]


def explain(kind, methods, **kw):
    out = camcore.explain(kind.model, kind.x(), method=methods, layer=kind.layer, targets=TARGETS, **kw)
    return {m: to_numpy(v) for m, v in out.items()}


def gradcam_pp_oracle(p) -> np.ndarray:
    """Grad-CAM++'s normalised map from eq. (19) in float64, on the float64 oracle's ``A`` and ``G``."""
    _, a, g = cm.Oracle(p).act_grad(cm.inputs(), TARGETS)
    w, _ = o_gradcam_pp(a, g, 0.0)
    cam = np.maximum((w[:, :, None, None] * a).sum(1), 0)
    lo, hi = cam.min(axis=(1, 2), keepdims=True), cam.max(axis=(1, 2), keepdims=True)
    return (cam - lo) / (hi - lo)


def assert_twin_maps(got, want, atol=1e-5):
    for method, m in got.items():
        assert np.isfinite(m).all(), method
        np.testing.assert_allclose(m, want[method], rtol=0, atol=atol, err_msg=method)


@pytest.mark.parametrize("name", cm.KINDS)
def test_saturated_gradients_give_the_twins_maps(name):
    got, want = explain(cm.build(name, SATURATED), GRADIENT), explain(twin(name), GRADIENT)
    want["gradcam++"] = gradcam_pp_oracle(SATURATED)
    assert np.abs(want["gradcam++"] - gradcam_pp_oracle(P)).max() > 0.5  # the scale changes Grad-CAM++'s map
    assert_twin_maps(got, want)


@pytest.mark.parametrize("name", ["torch", "keras", "linen"])
def test_loud_logits_give_the_twins_maps(name):
    """CAM (classifier rows 1e17, A 1e20; where the pooled layer has a name) and Ablation-CAM (``(y - y_k) / y``:
    scale-free) give the twin's maps; Score-CAM's softmax saturates at logits of 1e37 (not the twin's map), but is
    finite."""
    loud, tw = cm.build(name, LOUD), twin(name)
    got, want = explain(loud, SCORED, progress=False), explain(tw, SCORED, progress=False)
    if name != "linen":  # linen's ReLU before the pooling is a function, not a layer
        for kind, maps in [(loud, got), (tw, want)]:
            maps["cam"] = to_numpy(camcore.explain(kind.model, kind.x(), method="cam", layer=kind.default,
                                                   targets=TARGETS))
    score = got.pop("scorecam")
    assert np.isfinite(score).all() and score.min() >= 0 and score.max() <= 1
    assert_twin_maps(got, want, atol=1e-4)


def test_saturated_under_jax_jit():
    """The range-safe forms are traceable: under ``jax.jit``, where nothing can raise, the maps are the twin's."""
    import jax

    sat, tw = cm.build("linen", SATURATED), twin("linen")
    (module, v_sat), (_, v_twin) = sat.model, tw.model

    @jax.jit
    def f(v, x):
        return camcore.explain((module, v), x, method=GRADIENT, layer="conv2", targets=TARGETS)

    x = sat.x()
    got, want = f(v_sat, x), {m: to_numpy(a) for m, a in f(v_twin, x).items()}
    want["gradcam++"] = gradcam_pp_oracle(SATURATED)
    assert_twin_maps({m: to_numpy(a) for m, a in got.items()}, want)


def test_a_nan_sample_under_jax_jit_is_nan_not_blank():
    """Eagerly a NaN pixel is a named error; under ``jax.jit`` nothing can raise, and that sample's map was all
    zeros (normalise turned NaN into 0), a blank map that looked like an answer. It is NaN now, and only that
    sample's; the others are their eager maps (docs/methods.md, "Non-finite values")."""
    import jax

    kind = twin("linen")
    module, v = kind.model
    x = np.array(kind.x())
    x[1, 3, 4, 0] = np.nan
    with pytest.raises(ValueError, match=r"layer: the activations of 'conv2' contain NaN or inf"):
        camcore.explain(kind.model, x, method="gradcam", layer="conv2", targets=TARGETS)
    jitted = to_numpy(jax.jit(lambda v, x: camcore.explain((module, v), x, method="gradcam", layer="conv2",
                                                           targets=TARGETS))(v, x))
    assert np.isnan(jitted[1]).all()
    eager = to_numpy(camcore.explain(kind.model, x[[0, 2]], method="gradcam", layer="conv2", targets=[2, 1]))
    np.testing.assert_allclose(jitted[[0, 2]], eager, rtol=0, atol=1e-5)
