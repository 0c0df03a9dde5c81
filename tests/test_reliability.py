"""Issue 13's cases, each with the fix at its depth (the core or the engine): numerical extremes and bad options
get a finite map or a clear error naming the argument. (The thread stress tests live in test_explainer.py.)"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import camcore
from camcore import maps as M
from camcore import weights as W


def small(k=5):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, k)).eval()


def images(b=2):
    return torch.randn(b, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("key,value", [("counterfactual", "no"), ("eigen_smooth", 1), ("normalize", "yes"),
                                       ("upsample", None)])
def test_flags_must_be_bools(key, value):
    """``counterfactual="no"`` was taken as True."""
    with pytest.raises(TypeError, match=rf"{key}: expected True or False, got {value!r}"):
        camcore.explain(small(), images(), method="gradcam", layer="0", **{key: value})


@pytest.mark.parametrize("value", [-1e-7, float("nan"), float("inf"), "a", None, True])
def test_eps_must_be_a_finite_float_at_least_zero(value):
    with pytest.raises(ValueError, match=r"eps: expected a finite float >= 0"):
        camcore.Explainer(small(), method="gradcam++", eps=value)


@pytest.mark.parametrize("info", [[], "x"])
def test_info_must_be_a_dict(info):
    with pytest.raises(TypeError, match=r"info: expected None or a dict for camcore to fill"):
        camcore.explain(small(), images(), method="scorecam", layer="0", info=info)
    with pytest.raises(TypeError, match=r"info: expected None or a dict for camcore to fill"):
        camcore.Explainer(small(), method="gradcam", layer="0")(images(), info=info)


def test_reshape_must_be_callable():
    with pytest.raises(TypeError, match=r"reshape: expected None or a callable"):
        camcore.explain(small(), images(), method="gradcam", layer="0", reshape=123)


@pytest.mark.parametrize("targets", [7, -1, [0, 5]])
def test_every_method_range_checks_class_targets(targets):
    """Eigen-CAM uses no target, but a class index the model does not have is still an error, as elsewhere."""
    with pytest.raises(ValueError, match=r"targets: class index -?\d+ is out of range for a model with 5 outputs"):
        camcore.explain(small(), images(), method="eigencam", layer="0", targets=targets)


def test_upsample_to_a_non_positive_size():
    """``upsample(m, (-1,))`` returned shape ``(1, 0)``; a zero size divided by zero."""
    for size in [(-1,), (0,), (2.5,)]:
        with pytest.raises(ValueError, match=r"upsample: size must be positive ints"):
            M.upsample(np.ones((1, 4), np.float32), size)


def test_cam_rows_are_range_checked():
    """``weights.cam(W, [-1])`` returned the last row."""
    wm = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(W.cam(wm, np.array([2, 0])), wm[[2, 0]])
    for idx in ([-1], [3]):
        with pytest.raises(ValueError, match=r"target_index: expected class indices in \[0, 3\)"):
            W.cam(wm, np.array(idx))


def test_eigencam_near_float32_max_through_explain():
    """The issue's hang: Eigen-CAM of a layer whose finite activations reach 2.5e38 with both signs (centring and
    the energy overflowed; the core's principal component is checked against its oracle in
    test_core_oracles.py); here through explain, on the convolution's own output."""
    model, x = small(), images()
    with torch.no_grad():
        scale = 2.5e38 / model[0](x).abs().max()
        model[0].weight.mul_(scale)
        model[0].bias.mul_(scale)
        a = model[0](x)
    assert torch.isfinite(a).all() and a.amax() > 1e38 and a.amin() < -1e38
    maps = camcore.explain(model, x, method="eigencam", layer="0")
    assert torch.isfinite(maps).all() and (maps.amax(dim=(1, 2)) == 1).all()


def _saturable(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("method", ["gradcam", "hirescam", "xgradcam", "layercam", "gradcam-elementwise",
                                    "eigengradcam", "eigencam"])
def test_a_saturated_model_gives_the_maps_of_its_unscaled_twin(seed, method):
    """The issue's saturated model: its convolution scaled by 1e20 and its classifier by 1e21. ReLU, pooling and
    the linear layers are positive-homogeneous, so activations and gradients are the twin's times 1e20 and 1e21
    and every method's normalised map is the twin's; ``w * A`` overflowed to inf before (HiResCAM and XGrad-CAM
    gave NaN pixels, the others all-zero maps)."""
    twin, model = _saturable(seed), _saturable(seed)
    with torch.no_grad():
        for p in model[0].parameters():
            p.mul_(1e20)
        for p in model[4].parameters():
            p.mul_(1e21)
    x = images()
    want = camcore.explain(twin, x, method=method, layer="1", targets=[0, 1])
    got = camcore.explain(model, x, method=method, layer="1", targets=[0, 1])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    try:  # the raw maps carry their scale: finite and proportional to the twin's, or a clear overflow error
        raw = camcore.explain(model, x, method=method, layer="1", targets=[0, 1], normalize=False)
    except ValueError as err:
        assert re.match(rf"{method}: the raw map of sample\(s\) \[[\d, ]+\] overflows float32", str(err)), err
    else:
        assert torch.isfinite(raw).all()
        torch.testing.assert_close(camcore.maps.normalize(raw), want, atol=1e-5, rtol=0)


def test_non_finite_cam_weights_are_an_error():
    """``cam_weights`` full of NaN gave an all-zero map."""
    with pytest.raises(ValueError, match=r"cam: the channel weights at '1' contain NaN or inf"):
        camcore.explain(small(), images(), method="cam", layer="1", targets=[0, 1],
                        cam_weights=np.full((5, 4), np.nan, np.float32))


def test_a_target_callable_returning_numpy_is_named():
    """torch raised ``AttributeError: ... no attribute 'requires_grad'``; Keras said "does not influence the
    target". A gradient method needs the score in the model's framework; a gradient-free one takes NumPy."""
    model, x = small(), images()
    with pytest.raises(TypeError, match=r"targets: the callable must return a torch array .* returned "
                                        r"numpy.ndarray"):
        camcore.explain(model, x, method="gradcam", layer="1", targets=lambda out: out[:, 0].detach().numpy())
    ok = camcore.explain(model, x, method="scorecam", layer="1", progress=False,
                         targets=lambda out: out[:, 0])
    assert torch.isfinite(ok).all()


def test_tuple_outputs_and_gradient_free_top_class_are_named():
    """A model returning a tuple, a gradient-free method and ``targets=None``: ``TypeError: tuple is not a
    supported array type`` before; now the message gradient methods give."""

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small()

        def forward(self, x):
            out = self.net(x)
            return out, out

    for method in ("scorecam", "ablationcam"):
        with pytest.raises(ValueError, match=r"targets: the model returned tuple, not one array of logits; pass "
                                             r"a callable"):
            camcore.explain(Pair(), images(), method=method, layer="net.1", progress=False)


def test_bfloat16_ablationcam_and_cam():
    """Issue 13 #4 and #5: Ablation-CAM on a bfloat16 model raised ``TypeError: Got unsupported ScalarType
    BFloat16`` (the target scores went to NumPy as they were); CAM's premise check refused a bfloat16
    EfficientNet at the right layer (its logits differ from the float32 check by ~0.03). Both now give the float32
    model's maps, to bfloat16's precision."""
    import copy

    from camcore.demo import load_model, load_photo, to_tensor

    model, x = small(), images()
    want = camcore.explain(model, x, method="ablationcam", layer="1", targets=[0, 1], progress=False)
    got = camcore.explain(copy.deepcopy(model).to(torch.bfloat16), x.to(torch.bfloat16), method="ablationcam",
                          layer="1", targets=[0, 1], progress=False)
    torch.testing.assert_close(got, want, atol=0.05, rtol=0)
    effnet, photos = load_model(), to_tensor([load_photo("chelsea"), load_photo("coffee")])
    want = camcore.explain(effnet, photos, method="cam", layer="_swish", targets=[281, 967])
    got = camcore.explain(effnet.to(torch.bfloat16), photos.to(torch.bfloat16), method="cam", layer="_swish",
                          targets=[281, 967])
    torch.testing.assert_close(got, want, atol=0.05, rtol=0)


def test_empty_maps_are_named():
    """``fuse([])`` raised IndexError; ``normalize`` of a map with no position a raw NumPy reduction error."""
    with pytest.raises(ValueError, match=r"fuse: expected one map per layer, got none"):
        M.fuse([])
    for shape in [(1, 0), (2, 3, 0), (4,)]:
        with pytest.raises(ValueError, match=r"normalize: expected maps \(B, \*S\) with at least one position"):
            M.normalize(np.ones(shape, np.float32))
    np.testing.assert_array_equal(M.normalize(np.array([[1.0, 3.0]], np.float32)), [[0.0, 1.0]])


def test_float16_ablationcam_keeps_its_fx_tail():
    """Issue 13 #4: the tail's check compared float16 outputs to 1e-4 ("the traced graph does not reproduce the
    model's outputs") and Ablation-CAM fell back to 1,280 full passes of the pretrained EfficientNet. The
    tolerance follows the dtype now: no warning, the tail path, and the tail's scores are the full passes'."""
    import copy
    import warnings

    from camcore.backends.pytorch import TorchAdapter
    from camcore.demo import load_model, load_photo, to_tensor

    model = copy.deepcopy(load_model()).half()
    x = to_tensor([load_photo("chelsea")]).half()
    info = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        maps = camcore.explain(model, x, method="ablationcam", layer="_conv_head", targets=[281], progress=False,
                               info=info)
        masks = (torch.rand(16, 1280, 1, 1, generator=torch.Generator().manual_seed(0)) > 0.5).half()
        tail_info = {}
        tail = TorchAdapter(model).forward_masked(x, masks, at="_conv_head", targets=[281], info=tail_info)
    assert info["path"] == tail_info["path"] == "tail" and torch.isfinite(maps).all()
    full = TorchAdapter(model, compile=False).forward_masked(x, masks, at="_conv_head", targets=[281])
    torch.testing.assert_close(tail, full, atol=0.05, rtol=0.01)


# ------------------------------------------------------------------------------ raw framework errors, by kind
def _kind(name):
    import contract_models as cm

    return cm.build(name, cm.weights())


@pytest.mark.parametrize("name", ["torch", "keras", "linen", "nnx"])
def test_an_unbatched_input_names_the_inputs_and_the_batch_axis(name):
    """One example without its batch axis raised the framework's own error: torch ``IndexError: Dimension out of
    range``, Keras' input-spec error, Flax ``ScopeParamShapeError``, nnx a ``dot_general`` TypeError."""
    kind = _kind(name)
    x = kind.x()[0]
    with pytest.raises(Exception, match=rf"model: the forward pass of inputs of shape {re.escape(str(tuple(x.shape)))} "
                                        r"raised .*; camcore passes the inputs to the model as given, one batch "
                                        r"\(B, .*\(one example needs its batch axis: x\[None\]\)"):
        camcore.explain(kind.model, x, method="gradcam", layer="conv2")


def test_float64_inputs_to_a_float32_torch_model_say_which_dtype():
    """``Input type (double) and bias type (float) should be the same``, raw, before."""
    with pytest.raises(RuntimeError, match=r"the inputs are torch.float64 and the model's parameters torch.float32: "
                                           r"pass inputs.to\(torch.float32\)"):
        camcore.explain(small(), images().double(), method="gradcam", layer="0")


def test_flax_variables_without_params_are_named():
    """``(module, variables["params"])`` raised Flax's ``ScopeCollectionNotFound`` from inside the model."""
    module, variables = _kind("linen").model
    with pytest.raises(ValueError, match=r"model: the linen variables have no 'params' collection \(their keys: "
                                         r"'conv1', 'conv2', 'fc'\)"):
        camcore.explain((module, variables["params"]), np.zeros((1, 8, 8, 3), np.float32), method="gradcam")


@pytest.mark.parametrize("name", ["torch", "keras", "linen", "nnx"])
def test_an_empty_layer_name_is_an_unknown_layer(name):
    """Flax said ``expected a Flax module path (str ...), got str`` for ``layer=""``."""
    kind = _kind(name)
    with pytest.raises(ValueError, match=r"layer: no layer named '' in the model; closest real names: .*'fc'"):
        camcore.explain(kind.model, kind.x(), method="gradcam", layer="")


def test_a_jax_target_callable_returning_numpy_is_named():
    """JAX raised ``TracerArrayConversionError`` from inside the gradient's trace."""
    kind = _kind("linen")
    with pytest.raises(TypeError, match=r"targets: the callable must return a jax array computed from the outputs "
                                        r"with jax.numpy"):
        camcore.explain(kind.model, kind.x(), method="gradcam", layer="conv2",
                        targets=lambda out: np.asarray(out)[:, 0])


@pytest.mark.parametrize("name", ["keras", "linen", "nnx"])
def test_channels_first_on_a_channels_last_model_is_refused(name):
    """Issue 13 #6: ``data_format="channels_first"`` on a channels-last Keras or Flax model was accepted and gave
    maps of shape ``(B, H, C)`` for ``(B, H, W, C)`` inputs. (A pair of functions says its own layout: allowed,
    tests/test_jax_adapter.py.)"""
    kind = _kind(name)
    with pytest.raises(ValueError, match=r"data_format: 'channels_first' given, but the model's layer 'conv1' "):
        camcore.explain(kind.model, kind.x(), method="gradcam", layer="conv2", data_format="channels_first")


def test_gradient_free_methods_under_jax_jit_say_so():
    """Under ``jax.jit`` Score-CAM and Ablation-CAM raised ``TracerArrayConversionError`` before camcore's own
    message; they choose masks from values, so they run eagerly, and say so."""
    import jax

    module, v = _kind("linen").model
    for method in ("scorecam", "ablationcam"):
        with pytest.raises(ValueError, match=rf"method: '{method}' chooses its masks from the activations' values, "
                                             r"so it runs eagerly; call explain outside jax.jit"):
            jax.jit(lambda v, x: camcore.explain((module, v), x, method=method, layer="conv2", targets=[0, 1, 2]))(
                v, _kind("linen").x())
