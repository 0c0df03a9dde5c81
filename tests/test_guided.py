"""Guided backpropagation, deconvnet and Guided Grad-CAM (issue 14) on PyTorch: parity with captum on a
torchvision ResNet-18 (in-place ReLUs, batch 3, a target per sample), the same network calling its ReLUs every
functional way captum cannot see, a hand-written float64 guided backward of a small net, and the model untouched.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camcore
from model_checks import assert_untouched, snapshot

torchvision = pytest.importorskip("torchvision")
captum = pytest.importorskip("captum.attr")

TARGETS = [1, 5, 7]


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():  # captum's own "setting backward hooks" notes
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


@pytest.mark.parametrize("method,peer", [("guided-backprop", "GuidedBackprop"), ("deconvnet", "Deconvolution")])
def test_input_gradients_equal_captum(resnet, x, method, peer):
    snap = snapshot(resnet)
    got = camcore.explain(resnet, x, method=method, targets=TARGETS)
    want = quiet(getattr(captum, peer)(resnet).attribute, x.clone(), target=TARGETS)
    assert got.shape == x.shape and got.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    assert_untouched(resnet, snap)


def test_guided_gradcam_equals_captum_and_its_parts(resnet, x):
    """captum's GuidedGradCam multiplies by the raw upsampled map: camcore's with ``normalize=False``; the default
    uses the normalised map (the papers' figures), and either is guided backprop times the map of Grad-CAM."""
    raw = camcore.explain(resnet, x, method="guided-gradcam", layer="layer4", targets=TARGETS, normalize=False)
    want = quiet(captum.GuidedGradCam(resnet, resnet.layer4).attribute, x.clone(), target=TARGETS,
                 interpolate_mode="bilinear")  # camcore upsamples linearly
    torch.testing.assert_close(raw, want.detach(), rtol=1e-5, atol=1e-9)
    parts = camcore.explain(resnet, x, method=["guided-gradcam", "guided-backprop", "gradcam"], layer="layer4",
                            targets=TARGETS)
    torch.testing.assert_close(parts["guided-gradcam"], parts["guided-backprop"] * parts["gradcam"][:, None],
                               rtol=0, atol=0)
    plus = camcore.explain(resnet, x, method="gradcam++", layer="layer4", targets=TARGETS, guided=True)
    torch.testing.assert_close(plus, parts["guided-backprop"] * camcore.explain(
        resnet, x, method="gradcam++", layer="layer4", targets=TARGETS)[:, None], rtol=0, atol=0)


class FunctionalResNet(nn.Module):
    """The same ResNet-18 (its modules, shared) with every ReLU called functionally, a different way per block."""

    WAYS = [F.relu, torch.relu, lambda t: t.relu(), lambda t: t.clamp(min=0), lambda t: F.relu(t, inplace=True),
            lambda t: t.relu_(), lambda t: torch.clamp_min(t, 0), lambda t: F.hardtanh(t, 0.0, float("inf")),
            lambda t: t.clip(0)]

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        n, ways = self.net, iter(self.WAYS)
        h = n.maxpool(next(ways)(n.bn1(n.conv1(x))))
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            for block in layer:
                relu = next(ways)
                idn = h if block.downsample is None else block.downsample(h)
                out = relu(block.bn1(block.conv1(h)))
                h = relu(block.bn2(block.conv2(out)) + idn)
        return n.fc(torch.flatten(n.avgpool(h), 1))


def test_functional_relus_get_the_module_versions_guided_gradients(resnet, x):
    """captum guides ``nn.ReLU`` modules only: on this network it returns the plain gradient; camcore guides every
    way of calling a ReLU, so the functional network gets the module network's guided gradients."""
    functional = FunctionalResNet(resnet).eval()
    torch.testing.assert_close(functional(x), resnet(x), rtol=0, atol=0)
    for method in ("guided-backprop", "deconvnet"):
        torch.testing.assert_close(camcore.explain(functional, x, method=method, targets=TARGETS),
                                   camcore.explain(resnet, x, method=method, targets=TARGETS), rtol=0, atol=1e-7)
    peer = quiet(captum.GuidedBackprop(functional).attribute, x.clone(), target=TARGETS)
    plain = quiet(captum.Saliency(functional).attribute, x.clone(), target=TARGETS, abs=False)
    torch.testing.assert_close(peer, plain)  # what a peer returns here: no guidance at all


# --------------------------------------------------------------------------- a hand-written guided backward
def _mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 7), nn.ReLU6(), nn.Linear(7, 3)).eval()


def oracle(model, x, targets, rule):
    """Guided backprop / deconvnet of the MLP in float64, from the rules: at a unit ``clamp(z, 0, hi)`` the
    incoming gradient ``g`` becomes ``max(g, 0) * 1[0 < z < hi]`` (guided) or ``max(g, 0) * 1[z < hi]``."""
    w = [np.asarray(m.weight.detach(), np.float64) for m in model if isinstance(m, nn.Linear)]
    b = [np.asarray(m.bias.detach(), np.float64) for m in model if isinstance(m, nn.Linear)]
    x = np.asarray(x, np.float64)
    z1 = x @ w[0].T + b[0]
    z2 = np.maximum(z1, 0) @ w[1].T + b[1]
    g = np.eye(3)[targets] @ w[2]  # d y_c / d relu6(z2)
    for z, hi, wk in ((z2, 6.0, w[1]), (z1, np.inf, w[0])):
        mask = (z < hi) & (z > 0) if rule == "guided" else z < hi
        g = (np.maximum(g, 0) * mask) @ wk
    return g


@pytest.mark.parametrize("method,rule", [("guided-backprop", "guided"), ("deconvnet", "deconvnet")])
def test_guided_backward_equals_a_hand_written_one(method, rule):
    model = _mlp()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2)) * 12  # some units beyond 6: ReLU6's bound
    targets = [0, 2, 1, 1, 0]
    with torch.no_grad():
        assert (model[:3](x) > 6).any() and (model[:3](x) < 0).any()
    got = camcore.explain(model, x, method=method, targets=targets)
    np.testing.assert_allclose(got.numpy(), oracle(model, x, targets, rule), rtol=1e-5, atol=1e-6)


def test_no_relu_warns_that_guidance_does_not_apply():
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 6)
    with pytest.warns(RuntimeWarning, match=r"guided: the model ran no ReLU-like unit .* plain input gradients"):
        got = camcore.explain(model, x, method="guided-backprop", targets=[0, 1])
    xg = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(model(xg)[[0, 1], [0, 1]].sum(), xg)
    torch.testing.assert_close(got, plain)


def test_the_mode_and_the_model_are_restored_when_the_model_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            F.relu(self.fc(x), inplace=False)  # a guided unit ran: the mode must still come off
            raise RuntimeError("boom")

    model = Boom().train()
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        camcore.explain(model, torch.randn(2, 4), method="guided-backprop", targets=0)
    assert_untouched(model, snap)
    assert model.training and not torch.overrides._get_current_function_mode_stack()
    assert torch.equal(F.relu(torch.tensor([-1.0, 2.0])), torch.tensor([0.0, 2.0]))


def test_guided_options_are_checked(resnet, x):
    with pytest.raises(ValueError, match=r"layer: 'guided-backprop' is a gradient with respect to the inputs and "
                                         r"takes no layer"):
        camcore.explain(resnet, x, method="guided-backprop", layer="layer4")
    with pytest.raises(ValueError, match=r"guided: 'gradcam' guided .* needs upsample=True"):
        camcore.explain(resnet, x, method="gradcam", layer="layer4", guided=True, upsample=False)
    with pytest.raises(TypeError, match=r"guided: expected True or False, got 'yes'"):
        camcore.explain(resnet, x, method="gradcam", layer="layer4", guided="yes")
    with pytest.raises(ValueError, match=r"targets: class index 10 is out of range"):
        camcore.explain(resnet, x, method="guided-backprop", targets=10)


def test_guided_image_is_the_papers_display_normalisation():
    g = np.random.default_rng(0).standard_normal((3, 5, 4)).astype(np.float32) * 1e-3
    from camcore.viz import guided_image

    want = np.clip(0.5 + 0.1 * (g - g.mean()) / g.std(), 0, 1).transpose(1, 2, 0)
    np.testing.assert_allclose(guided_image(g), want, rtol=0, atol=1e-6)  # (3, H, W): channels first, read so
    np.testing.assert_allclose(guided_image(torch.from_numpy(g.transpose(1, 2, 0))), want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(guided_image(np.zeros((4, 4, 3))), np.full((4, 4, 3), 0.5, np.float32))
    with pytest.raises(ValueError, match=r"grad: expected one sample \(C, H, W\) or \(H, W, C\), got shape"):
        guided_image(g[None])


def test_a_callable_target_and_class_targets_give_the_same_guided_gradients(resnet, x):
    """One backward pass for the batch whatever the target: a callable picking each sample's class equals the
    class list."""
    picked = torch.tensor(TARGETS)
    by_callable = camcore.explain(resnet, x, method=["guided-backprop", "guided-gradcam"], layer="layer4",
                                  targets=lambda out: out[torch.arange(out.shape[0]), picked])
    by_list = camcore.explain(resnet, x, method=["guided-backprop", "guided-gradcam"], layer="layer4",
                              targets=TARGETS)
    for m in by_list:
        torch.testing.assert_close(by_callable[m], by_list[m], rtol=0, atol=0)
