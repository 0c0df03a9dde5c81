"""Errors of ``camcore.explain`` / the PyTorch adapter on real torch modules: each names the argument and states
what was expected and what was received; and a model that raises midway leaves nothing behind.

Cases every backend shares (int/list/None/callable targets, masked scores and their batching, probability,
mask/batch-size/input-dtype errors, unknown layer names, the model left alone) are checked once for all
kinds against a NumPy oracle in ``test_contract.py``; this file keeps the rest.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import camcore
from camcore.backends.pytorch import TorchAdapter
from model_checks import assert_untouched, snapshot


class SmallNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom: the model failed midway")


class RaisingNet(SmallNet):
    """Raises in a module that runs after the layers one explains."""

    def __init__(self):
        super().__init__()
        self.boom = Boom()

    def forward(self, x):
        return self.fc(self.boom(self.features(x)).mean(dim=(2, 3)))


class SideBranch(SmallNet):
    """``side`` runs but its output is unused; ``unused`` never runs; ``dead`` feeds a saturated relu."""

    def __init__(self):
        super().__init__()
        self.side = nn.Conv2d(16, 4, 1)
        self.unused = nn.Conv2d(16, 4, 1)
        self.dead = nn.Conv2d(3, 4, 3, padding=1)
        self.kill = nn.Conv2d(4, 4, 1)
        with torch.no_grad():
            self.kill.bias.fill_(-1e4)  # relu(kill(.)) == 0 everywhere: zero gradient to `dead`

    def forward(self, x):
        f = self.features(x)
        self.side(f)
        z = torch.relu(self.kill(self.dead(x))).mean(dim=(2, 3)).sum(1, keepdim=True)
        return self.fc(f.mean(dim=(2, 3))) + z


def small(cls=SmallNet, mode="eval"):
    torch.manual_seed(0)
    model = cls()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.train() if mode == "train" else model.eval()


def images(b=3, h=16, w=16):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(1))






# ------------------------------------------------------------------------------ 2. a model that raises
@pytest.mark.parametrize("method", list(camcore.METHODS))
@pytest.mark.parametrize("mode,model_mode", [("eval", "eval"), ("train", "eval"), ("train", "as-is")])
@pytest.mark.parametrize("grad", [True, False])
def test_model_raising_midway_leaves_nothing_behind(method, mode, model_mode, grad):
    model = small(RaisingNet, mode)
    model.features[0].bias.requires_grad_(False)
    x = images()
    with torch.set_grad_enabled(grad):
        snap = snapshot(model)
        with pytest.raises(RuntimeError, match="boom: the model failed midway"):
            camcore.explain(model, x, method=method, model_mode=model_mode,
                            layer=None if camcore.METHODS[method].rule else ["features.3", "features.5"])
        assert_untouched(model, snap)  # BN ran in training mode before the raise ("as-is"): stats restored
        with pytest.raises(RuntimeError, match="boom"):
            TorchAdapter(model, model_mode=model_mode).forward_masked(x, torch.ones(2, 1, 16, 16), targets=1)
        assert_untouched(model, snap)
    assert torch.is_grad_enabled()


def test_callable_target_raising_leaves_nothing_behind():
    model = small(mode="train")
    snap = snapshot(model)

    def target(out):
        raise KeyError("no such head")

    with pytest.raises(KeyError, match="no such head"):
        camcore.explain(model, images(), method="gradcam", layer="features.3", targets=target, model_mode="as-is")
    assert_untouched(model, snap)


# ------------------------------------------------------------------------------ 3. errors
def test_layer_of_wrong_type_or_foreign_module():
    model = small()
    with pytest.raises(TypeError, match=r"layer: expected a module path \(str\) or a torch.nn.Module.*got int"):
        camcore.explain(model, images(), method="gradcam", layer=3)
    with pytest.raises(ValueError, match=r"layer: the Conv2d module passed is not part of the model"):
        camcore.explain(model, images(), method="gradcam", layer=nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match=r"layer: expected a layer or a non-empty list"):
        camcore.explain(model, images(), method="gradcam", layer=[])


@pytest.mark.parametrize("method", ["gradcam", "cam", "layercam"])
def test_targets_count_not_matching_batch(method):
    model = small()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"targets: expected one class index per sample, 3 for a batch of 3; "
                                         r"got 2: \[1, 2\]"):
        camcore.explain(model, images(), method=method, layer="features.5", targets=[1, 2])
    with pytest.raises(ValueError, match=r"targets: expected one class index per sample, 3 .*got 4"):
        TorchAdapter(model).forward_masked(images(), torch.ones(2, 1, 16, 16), targets=[1, 2, 3, 4])
    assert_untouched(model, snap)


def test_targets_of_wrong_type():
    with pytest.raises(TypeError, match=r"targets: expected one int class index per sample, got 1.5"):
        camcore.explain(small(), images(), method="gradcam", layer="features.5", targets=[1, 1.5, 2])
    with pytest.raises(TypeError, match=r"targets: .*got the bool True"):
        camcore.explain(small(), images(), method="gradcam", layer="features.5", targets=True)


@pytest.mark.parametrize("method", ["gradcam", "cam", "hirescam"])
def test_class_index_out_of_range(method):
    model = small()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"targets: class index 10 is out of range for a model with 10 outputs "
                                         r"\(expected 0 <= index < 10\)"):
        camcore.explain(model, images(), method=method, layer="features.5", targets=[3, 10, 1])
    with pytest.raises(ValueError, match=r"targets: class index -1 is out of range"):
        camcore.explain(model, images(), method=method, layer="features.5", targets=-1)
    with pytest.raises(ValueError, match=r"targets: class index 12 is out of range"):
        TorchAdapter(model).forward_masked(images(), torch.ones(2, 1, 16, 16), targets=12)
    assert_untouched(model, snap)


def test_callable_target_with_wrong_shape():
    with pytest.raises(ValueError, match=r"targets: the callable must return one score per sample, shape \(3,\); "
                                         r"it returned Tensor of shape \(\)"):
        camcore.explain(small(), images(), method="gradcam", layer="features.5", targets=lambda out: out.sum())


def test_class_index_with_map_outputs_asks_for_callable():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 1)).eval()
    with pytest.raises(ValueError, match=r"targets: a class index needs model outputs of shape \(B, num_classes\), "
                                         r"but the model returned shape \(3, 5, 16, 16\); pass a callable"):
        camcore.explain(model, images(), method="gradcam", layer="0", targets=1)


def test_unknown_method_suggests_close_names():
    with pytest.raises(ValueError, match=r"method: unknown method 'gradcm'; expected one of .*gradcam.*"
                                         r"Did you mean 'gradcam'"):
        camcore.explain(small(), images(), method="gradcm", layer="features.5")
    with pytest.raises(ValueError, match=r"method: unknown method 'eigencma'.*Did you mean .*'eigencam'"):
        camcore.explain(small(), images(), method="eigencma", layer="features.5")


def test_unknown_option():
    with pytest.raises(TypeError, match=r"explain: unknown option\(s\) 'smooth' for method 'gradcam'; "
                                        r"expected any of .*counterfactual.*eigen_smooth"):
        camcore.explain(small(), images(), method="gradcam", layer="features.5", smooth=True)
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'eps' for method 'gradcam'"):
        camcore.explain(small(), images(), method="gradcam", layer="features.5", eps=1e-6)
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'classifier' for method 'gradcam'; expected any of "
                                        r"counterfactual, data_format"):  # CAM's options are CAM's only
        camcore.explain(small(), images(), method="gradcam", layer="features.5", classifier="fc")
    with pytest.raises(ValueError, match=r"model_mode: expected one of \('eval', 'as-is'\), got 'train'"):
        camcore.explain(small(), images(), method="gradcam", layer="features.5", model_mode="train")


@pytest.mark.parametrize("frozen", [False, True])
def test_layer_that_does_not_influence_the_target(frozen):
    model = small(SideBranch)
    if frozen:  # no parameter requires grad: the scores then carry no graph to the unused branch at all
        model.requires_grad_(False)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"layer: (the target scores do not depend on layer 'side'|'side' does "
                                         r"not influence the target scores)"):
        camcore.explain(model, images(), method="gradcam", layer="side")
    with pytest.raises(ValueError, match=r"layer: 'side' does not influence the target scores"):
        camcore.explain(model, images(), method="gradcam", layer=["features.5", "side"])
    assert_untouched(model, snap)


def test_layer_with_zero_gradients():
    model = small(SideBranch)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"layer: the target scores have zero gradient w.r.t. 'dead' for "
                                         r"sample\(s\) \[0, 1, 2\]"):
        camcore.explain(model, images(), method="gradcam", layer="dead")
    assert_untouched(model, snap)
    # a gradient-free method still explains it
    assert camcore.explain(model, images(), method="eigencam", layer="dead").shape == (3, 16, 16)


@pytest.mark.parametrize("method", ["gradcam", "eigencam"])
def test_layer_that_does_not_run(method):
    model = small(SideBranch, "train")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"layer: 'unused' did not run during the forward pass"):
        camcore.explain(model, images(), method=method, layer=["features.5", "unused"], model_mode="as-is")
    assert_untouched(model, snap)


def test_layer_returning_a_tuple():
    class WithLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 4, 3, padding=1)
            self.lstm = nn.LSTM(4, 4, batch_first=True)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            out, _ = self.lstm(self.conv(x).transpose(1, 2))
            return self.fc(out[:, -1])

    model = WithLSTM().eval()
    snap = snapshot(model)
    with pytest.raises(TypeError, match=r"layer: 'lstm' returns tuple, not a tensor"):
        camcore.explain(model, torch.randn(2, 2, 10), method="gradcam", layer="lstm")
    assert_untouched(model, snap)


def test_layer_that_is_not_a_feature_map():
    with pytest.raises(ValueError, match=r"layer: 'fc' outputs shape \(3, 10\), not a channels-first feature map"):
        camcore.explain(small(), images(), method="gradcam", layer="fc")


def test_cam_at_conv_head_of_efficientnet_explains(effnet, photo_batch):
    snap = snapshot(effnet)
    with pytest.raises(ValueError, match=r"layer: method='cam' needs the layer whose global average pooling feeds "
                                         r"the classifier '_fc' directly, but the outputs differ from "
                                         r"'_fc'\(mean of '_conv_head'\) by up to"):
        camcore.explain(effnet, photo_batch[:1], method="cam", layer="_conv_head")
    assert_untouched(effnet, snap)


def test_cam_at_wrong_layer_of_small_net():
    with pytest.raises(ValueError, match=r"layer: method='cam' needs the feature map the classifier 'fc' reads after "
                                         r"global pooling; 'features.0' has 8 channels but 'fc' expects 16"):
        camcore.explain(small(), images(), method="cam", layer="features.0")
    with pytest.raises(ValueError, match=r"method='cam' needs the layer whose global average pooling feeds the "
                                         r"classifier 'fc'.*'features.3'"):
        camcore.explain(small(), images(), method="cam", layer="features.3")
    with pytest.raises(ValueError, match=r"targets: method='cam' explains a class"):
        camcore.explain(small(), images(), method="cam", layer="features.5", targets=lambda o: o[:, 0])
    # the right layer works
    assert camcore.explain(small(), images(), method="cam", layer="features.5").shape == (3, 16, 16)


@pytest.mark.parametrize("method", ["eigencam"])
def test_counterfactual_needs_gradients(method):
    with pytest.raises(ValueError, match=r"counterfactual: 'eigencam' uses no gradient, so it has no counterfactual "
                                         r"map; use a gradient method such as 'gradcam'"):
        camcore.explain(small(), images(), method=method, layer="features.5", counterfactual=True)


def test_model_of_wrong_type():
    with pytest.raises(TypeError, match=r"model: expected a torch.nn.Module, a Keras 3 model, .*; got builtins.function"):
        camcore.explain(lambda x: x, images(), method="gradcam", layer="features.5")


@pytest.mark.parametrize("method", ["gradcam", "scorecam"])
def test_channels_last_image_to_a_channels_first_model_names_shape_and_layout(effnet, photo_batch, method):
    """The model's own error comes back with the inputs' shape and the hint to permute or pass data_format (its
    type kept, the original as __cause__), instead of a bare conv-weight mismatch from deep inside the model."""
    x = torch.zeros(2, 224, 225, 4)  # channels-last, and 4 channels: no layout makes it the model's input
    snap = snapshot(effnet)
    with pytest.raises(RuntimeError, match=r"model: the forward pass of inputs of shape \(2, 224, 225, 4\) raised "
                                           r"RuntimeError: .*look channels-last.*x\.permute\(0, 3, 1, 2\).*"
                                           r"data_format='channels_last'") as caught:
        camcore.explain(effnet, x, method=method, layer="_conv_head",
                        **({"progress": False} if method == "scorecam" else {}))
    assert isinstance(caught.value.__cause__, RuntimeError) and "weight of size" in str(caught.value.__cause__)
    assert_untouched(effnet, snap)
    # a model error on inputs that do not look channels-last carries no layout hint; the type is kept
    with pytest.raises(RuntimeError, match=r"inputs of shape \(3, 3, 16, 16\) raised RuntimeError: boom") as caught:
        camcore.explain(small(RaisingNet), images(), method="gradcam", layer="features.3")
    assert "channels-last" not in str(caught.value)


# ------------------------------------------------------------------------------ grad modes
def test_explain_inside_inference_mode():
    """Regression: under ``torch.inference_mode()`` explain once raised "the target scores do not depend on
    layer" (``torch.set_grad_enabled(True)`` cannot leave inference mode). It must either work (as it does under
    ``torch.no_grad()``) or say that inference mode is the problem."""
    model = small()
    x = images()
    expected = camcore.explain(model, x, method="gradcam", layer="features.5")
    snap = snapshot(model)
    with torch.inference_mode():
        try:
            got = camcore.explain(model, x, method="gradcam", layer="features.5")
        except (ValueError, RuntimeError) as e:
            assert "inference" in str(e), f"misleading error under torch.inference_mode(): {e}"
        else:
            torch.testing.assert_close(got, expected)
    assert_untouched(model, snap)


def test_inputs_requiring_grad_are_left_alone():
    model = small()
    x = images().requires_grad_(True)
    ref = camcore.explain(model, x.detach(), method="gradcam", layer="features.3")
    got = camcore.explain(model, x, method="gradcam", layer="features.3")
    torch.testing.assert_close(got, ref)
    assert x.grad is None and not got.requires_grad


def test_copy_of_model_gives_same_maps():
    """Sanity for the reference comparisons elsewhere: a deepcopy explains identically."""
    model = small()
    x = images()
    a = camcore.explain(model, x, method="gradcam++", layer="features.3")
    b = camcore.explain(copy.deepcopy(model), x, method="gradcam++", layer="features.3")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
