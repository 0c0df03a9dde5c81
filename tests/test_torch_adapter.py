"""The PyTorch adapter and ``camcore.explain`` on real torch / torchvision modules (no mocks).

Every reference value here is computed independently of camcore: our own forward hooks, ``torch.autograd.grad``
on a full forward pass with gradients, our own Grad-CAM formula, ``torch.nn.functional.interpolate`` for the
upsampling, and plain Python loops for masked forward passes.

Cases every backend shares (int/list/None/callable targets, masked scores and their batching, probability,
mask/batch-size/input-dtype errors, unknown layer names, the model left alone) are checked once for all
kinds against a NumPy oracle in ``test_contract.py``; this file keeps the rest.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import camcore
from camcore.backends.pytorch import TorchAdapter
from model_checks import assert_no_hooks, assert_untouched, snapshot

ALL_METHODS = [m for m, s in camcore.METHODS.items() if not (s.rule or s.guided)]  # the maps (B, *S)


# ----------------------------------------------------------------------------------------------- models
class SmallNet(nn.Module):
    """conv-bn-relu, conv-bn-relu (stride 2), global average pooling, dropout, linear: the CAM layout."""

    def __init__(self, num_classes=10, cin=3, inplace=False):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(cin, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=inplace),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=inplace),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.drop(torch.flatten(self.pool(self.features(x)), 1)))


class SegNet(nn.Module):
    """A segmentation-like model: (B, 3, H, W) -> (B, K, H, W) logits."""

    def __init__(self, k=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2, padding=1),
                                  nn.Tanh())
        self.head = nn.Conv2d(12, k, 1)

    def forward(self, x):
        return F.interpolate(self.head(self.body(x)), size=x.shape[2:], mode="bilinear", align_corners=False)


def small_net(seed=0, **kw):
    torch.manual_seed(seed)
    model = SmallNet(**kw)
    # non-trivial batch-norm statistics and affine parameters, so a change to them would show
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.3)
    return model.eval()


def images(b=3, c=3, h=16, w=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g)


# ---------------------------------------------------------------------------------------------- helpers






def capture_act_grad(model, layer, x, score_fn, clone_output=False):
    """Independent reference: a full forward pass with gradients, the layer's output captured by our own hook,
    ``d(score_fn(outputs).sum())/dA`` by ``torch.autograd.grad``. With ``clone_output`` the hook returns a
    clone, so in-place ops after the layer cannot modify the captured tensor."""
    module = dict(model.named_modules())[layer]
    store = {}

    def hook(m, args, out):
        store["a"] = out
        return out.clone() if clone_output else None

    h = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            out = model(x)
            a = store["a"]
            (g,) = torch.autograd.grad(score_fn(out).sum(), a)
    finally:
        h.remove()
    model.zero_grad(set_to_none=True)
    return out.detach(), a.detach().clone(), g.detach()


def class_score(targets):
    def f(out):
        return out[torch.arange(out.shape[0]), torch.as_tensor(targets)]
    return f


def minmax(cam):
    axes = tuple(range(1, cam.ndim))
    lo = cam.amin(dim=axes, keepdim=True)
    span = cam.amax(dim=axes, keepdim=True) - lo
    return torch.where(span > 0, (cam - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(cam))


_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}


def reference_gradcam(a, g, size, counterfactual=False, normalize=True):
    """Grad-CAM written out: spatial mean of the gradients, weighted channel sum, relu, F.interpolate, min-max."""
    a, g = a.float(), g.float()
    axes = tuple(range(2, a.ndim))
    w = g.mean(dim=axes)
    raw = (w.reshape(*w.shape, *([1] * len(axes))) * a).sum(1)
    cam = torch.relu(-raw if counterfactual else raw)
    if tuple(cam.shape[1:]) != tuple(size):
        cam = F.interpolate(cam[:, None], size=tuple(size), mode=_MODE[len(size)], align_corners=False)[:, 0]
    return minmax(cam) if normalize else cam


def close(actual, expected, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------ 1. the model is untouched
def _mixed(model):
    model.train()
    model.features[1].eval()  # one BN frozen, the other in training mode
    model.drop.eval()
    return model


MODES = {"eval": lambda m: m.eval(), "train": lambda m: m.train(), "mixed": _mixed}


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("mode", list(MODES))
def test_model_untouched(method, mode):
    model = MODES[mode](small_net())
    model.features[0].weight.requires_grad_(False)  # a partly frozen model keeps its flags too
    x = images()
    snap = snapshot(model)
    cams = camcore.explain(model, x, method=method, layer="features.5")
    assert cams.shape == (3, 16, 16) and cams.dtype == torch.float32
    assert_untouched(model, snap)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_model_untouched_under_no_grad(method):
    model = small_net()
    x = images()
    with torch.no_grad():
        snap = snapshot(model)
        assert snap["grad_mode"] is False
        camcore.explain(model, x, method=method, layer="features.5")
        assert not torch.is_grad_enabled()
        assert_untouched(model, snap)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("method", ["gradcam", "eigencam", "cam", "layercam"])
@pytest.mark.parametrize("mode", ["train", "mixed"])
def test_as_is_mode_restores_batchnorm_buffers(method, mode):
    model = MODES[mode](small_net())
    if method == "cam":  # CAM's premise (logits = fc(GAP(A))) does not hold with dropout on
        model.drop.eval()
    x = images()
    snap = snapshot(model)
    # the session really runs batch norm in training mode (batch statistics), unlike the default "eval"
    as_is = camcore.explain(model, x, method=method, layer="features.5", model_mode="as-is", normalize=False)
    assert_untouched(model, snap)
    model_eval = copy.deepcopy(model).eval()
    if method != "cam":  # dropout is on in "as-is" mode, and the maps use batch statistics
        evalled = camcore.explain(model_eval, x, method=method, layer="features.5", normalize=False)
        assert not torch.allclose(as_is, evalled)
    # and a second call sees the same buffers as the first
    assert_untouched(model, snap)


def test_as_is_mode_matches_independent_train_mode_computation():
    """model_mode="as-is" on a train-mode model (BN with batch statistics, dropout off so it is deterministic)."""
    model = small_net().train()
    model.drop.eval()
    x = images()
    ref_model = copy.deepcopy(model)
    _, a, g = capture_act_grad(ref_model, "features.3", x, class_score([3, 7, 1]))
    snap = snapshot(model)
    _, acts, grads = TorchAdapter(model, model_mode="as-is").activations_and_grads(x, ["features.3"], [3, 7, 1])
    close(acts[0], a)
    close(grads[0], g)
    assert_untouched(model, snap)


def test_forward_masked_and_default_layer_leave_model_untouched():
    model = small_net().train()
    x = images()
    snap = snapshot(model)
    ad = TorchAdapter(model, model_mode="as-is")
    ad.forward_masked(x, torch.ones(2, 1, 16, 16))
    ad.forward_masked(x, torch.ones(2, 16, 1, 1), at="features.3")
    ad.default_layer(x)
    camcore.explain(model, x, method="gradcam", model_mode="as-is")
    assert_untouched(model, snap)


# ------------------------------------------------------------------- 4. gradients vs an independent computation
def test_activations_and_grads_match_autograd_per_sample_targets():
    model = small_net()
    x = images()
    for layer in ["features.3", "features.4", "features.5"]:
        out_ref, a, g = capture_act_grad(model, layer, x, class_score([3, 7, 1]))
        outputs, acts, grads = TorchAdapter(model).activations_and_grads(x, [layer], [3, 7, 1])
        close(outputs, out_ref)
        close(acts[0], a)
        close(grads[0], g)
        assert not acts[0].requires_grad and not grads[0].requires_grad


def test_activations_and_grads_match_autograd_callable_target():
    torch.manual_seed(3)
    model = SegNet().eval()
    x = images(b=2, h=20, w=20)
    mask = torch.zeros(20, 20)
    mask[4:12, 6:15] = 1.0
    k = 2

    def target(out):
        return (out[:, k] * mask).sum(dim=(1, 2))

    _, a, g = capture_act_grad(model, "body.2", x, target)
    _, acts, grads = TorchAdapter(model).activations_and_grads(x, ["body.2"], target)
    close(acts[0], a)
    close(grads[0], g)
    cams = camcore.explain(model, x, method="gradcam", layer="body.2", targets=target)
    close(cams, reference_gradcam(a, g, (20, 20)))


@pytest.mark.parametrize("layer", ["features.3", "features.5"])
def test_gradcam_matches_independent_formula(layer):
    model = small_net()
    x = images()
    _, a, g = capture_act_grad(model, layer, x, class_score([3, 7, 1]))
    cams = camcore.explain(model, x, method="gradcam", layer=layer, targets=[3, 7, 1])
    assert cams.shape == (3, 16, 16) and cams.dtype == torch.float32
    close(cams, reference_gradcam(a, g, (16, 16)))
    raw = camcore.explain(model, x, method="gradcam", layer=layer, targets=[3, 7, 1], normalize=False,
                          upsample=False)
    close(raw, reference_gradcam(a, g, (8, 8), normalize=False))


# ------------------------------------------------------------------------------ 5. one forward pass
@pytest.mark.parametrize("layers", [["features.3"], ["features.2", "features.5"], ["features.5", "features.0"]])
@pytest.mark.parametrize("method", ["gradcam", "eigencam"])
def test_one_forward_pass_for_all_layers(layers, method):
    model = small_net()
    calls = []
    h = model.register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        cams = camcore.explain(model, images(), method=method, layer=layers)
    finally:
        h.remove()
    assert len(calls) == 1
    assert cams.shape == (3, 16, 16)
    assert_no_hooks(model)


def test_fused_layers_match_independent_fusion():
    model = small_net()
    x = images()
    per_layer = []
    for layer in ["features.2", "features.5"]:  # pytorch-grad-cam's order: normalise at the layer's size, resize
        _, a, g = capture_act_grad(model, layer, x, class_score([3, 7, 1]))
        cam = reference_gradcam(a, g, a.shape[2:], normalize=True)
        per_layer.append(F.interpolate(cam[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0])
    expected = minmax(torch.stack(per_layer).mean(0))
    cams = camcore.explain(model, x, method="gradcam", layer=["features.2", "features.5"], targets=[3, 7, 1])
    close(cams, expected)


# ------------------------------------------------------------------------------ 6. in-place ReLU safety
@pytest.fixture(scope="module")
def densenet():
    torch.manual_seed(0)
    return torchvision.models.densenet121(weights=None).eval()


@pytest.mark.parametrize("layer", ["features.norm5", "features.denseblock4", "features.denseblock4.denselayer16.norm1"])
def test_densenet_inplace_relu_after_layer(densenet, layer):
    x = images(b=2, h=64, w=64)
    targets = [5, 900]
    snap = snapshot(densenet)
    _, a, g = capture_act_grad(densenet, layer, x, class_score(targets), clone_output=True)
    outputs, acts, grads = TorchAdapter(densenet).activations_and_grads(x, [layer], targets)
    assert_untouched(densenet, snap)
    assert acts[0].shape == a.shape
    close(acts[0], a)
    close(grads[0], g, rtol=1e-4, atol=1e-6)
    if layer == "features.norm5":  # the in-place relu would have zeroed the negative activations
        assert (acts[0] < 0).any()
    cams = camcore.explain(densenet, x, method="gradcam", layer=layer, targets=targets)
    close(cams, reference_gradcam(a, g, (64, 64)), rtol=1e-4, atol=1e-4)
    assert_untouched(densenet, snap)


def test_tiny_model_with_inplace_relu_after_target_conv():
    model = small_net(inplace=True)
    x = images()
    _, a, g = capture_act_grad(model, "features.3", x, class_score([3, 7, 1]), clone_output=True)
    assert (a < 0).any()  # the reference kept the pre-relu values
    _, acts, grads = TorchAdapter(model).activations_and_grads(x, ["features.3", "features.4"], [3, 7, 1])
    close(acts[0], a)
    close(grads[0], g)
    _, a4, g4 = capture_act_grad(model, "features.4", x, class_score([3, 7, 1]), clone_output=True)
    assert (acts[1] < 0).any()  # BN output before the in-place relu
    close(acts[1], a4)
    close(grads[1], g4)
    cams = camcore.explain(model, x, method="gradcam", layer="features.4", targets=[3, 7, 1])
    close(cams, reference_gradcam(a4, g4, (16, 16)))


# ------------------------------------------------------------------------------ 7. vision transformer
def test_vision_transformer_tokens_to_grid():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=10).eval()
    with torch.no_grad():  # torchvision zero-initialises the head: every gradient would be 0
        nn.init.normal_(vit.heads.head.weight)
        nn.init.normal_(vit.heads.head.bias)
    x = images(b=3, h=32, w=32)
    layer = "encoder.layers.encoder_layer_1.ln_1"
    snap = snapshot(vit)
    cams = camcore.explain(vit, x, method="gradcam", layer=layer, reshape=camcore.tokens_to_grid)
    assert cams.shape == (3, 32, 32) and cams.dtype == torch.float32
    assert_untouched(vit, snap)

    with torch.no_grad():
        top = vit(x).argmax(1).tolist()
    _, a, g = capture_act_grad(vit, layer, x, class_score(top))
    assert a.shape == (3, 17, 16)

    def grid(t):  # drop the class token; 16 patch tokens, row-major on 4x4; channels first
        return t[:, 1:, :].reshape(3, 4, 4, 16).permute(0, 3, 1, 2)

    # the multi-head attention of encoder_layer_0 takes its fused fast path when camcore runs it under no_grad
    close(cams, reference_gradcam(grid(a), grid(g), (32, 32)), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ 8. dtypes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model(dtype):
    model32 = small_net()
    x32 = images()
    model = copy.deepcopy(model32).to(dtype)
    x = x32.to(dtype)
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError as e:  # pragma: no cover - depends on the CPU kernels of this torch build
        pytest.skip(f"{dtype} convolution/batch-norm not supported on this CPU: {e}")
    snap = snapshot(model)
    cams = camcore.explain(model, x, method="gradcam", layer="features.5", targets=[3, 7, 1])
    assert_untouched(model, snap)
    assert cams.dtype == torch.float32 and cams.shape == (3, 16, 16)
    assert torch.isfinite(cams).all()
    ref = camcore.explain(model32, x32, method="gradcam", layer="features.5", targets=[3, 7, 1])
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%), float16 11 bits; rounding of the inputs,
    # weights, and every intermediate of two conv+BN layers, the backward pass and the weights compounds to a few
    # percent of the map's range. Maps are min-max normalised to [0, 1], so an absolute tolerance of 0.1 (10% of
    # the range) is loose enough for bfloat16 yet still catches a wrong map (different maps differ by O(1)).
    tol = 0.1 if dtype == torch.bfloat16 else 0.02
    assert (cams - ref).abs().max() < tol
    assert (cams - ref).abs().mean() < tol / 4


# ------------------------------------------------------------------------------ 9. 1-D and 3-D
class Net1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(2, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 12, 3, stride=3,
                                                                                              padding=1), nn.ReLU())
        self.fc = nn.Linear(12, 6)

    def forward(self, x):
        return self.fc(self.features(x).mean(-1))


class Net3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 6, 3, stride=2,
                                                                                              padding=1), nn.ReLU())
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3, 4)))


@pytest.mark.parametrize("kind", ["1d", "3d"])
def test_1d_and_3d_models(kind):
    torch.manual_seed(0)
    if kind == "1d":
        model, x, targets = Net1d().eval(), torch.randn(3, 2, 40), [0, 5, 2]
    else:
        model, x, targets = Net3d().eval(), torch.randn(2, 1, 8, 12, 10), [4, 1]
    size = tuple(x.shape[2:])
    for layer in ["features.2", "features.3"]:
        _, a, g = capture_act_grad(model, layer, x, class_score(targets))
        cams = camcore.explain(model, x, method="gradcam", layer=layer, targets=targets)
        assert cams.shape == (x.shape[0], *size) and cams.dtype == torch.float32
        close(cams, reference_gradcam(a, g, size))
    # the default layer is the last feature map of the inputs' rank (the container "features" returns the very
    # tensor of its last child "features.3", and finishes after it)
    assert TorchAdapter(model).default_layer(x) in ("features", "features.3")
    # CAM works on the channels-first layer read by global pooling + linear in any rank
    _, a, _ = capture_act_grad(model, "features.3", x, class_score(targets))
    w = model.fc.weight.detach()[targets]
    raw = torch.relu((w.reshape(*w.shape, *([1] * (a.ndim - 2))) * a).sum(1))
    expected = minmax(F.interpolate(raw[:, None], size=size, mode=_MODE[len(size)], align_corners=False)[:, 0])
    close(camcore.explain(model, x, method="cam", layer="features.3", targets=targets), expected)


# ------------------------------------------------------------------------------ 10. forward_masked
def loop_masked(model, x, masks, targets, per_sample=False, layer=None):
    """The masked scores by a plain loop: one forward pass per sample and mask."""
    rows = []
    with torch.no_grad():
        for b in range(x.shape[0]):
            sample_masks = masks[b] if per_sample else masks
            row = []
            for mask in sample_masks:
                if layer is None:
                    out = model(x[b : b + 1] * mask)
                else:
                    h = dict(model.named_modules())[layer].register_forward_hook(lambda m, a, o, mk=mask: o * mk)
                    try:
                        out = model(x[b : b + 1])
                    finally:
                        h.remove()
                row.append(float(out[0, targets[b]]))
            rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


def test_forward_masked_callable_target_and_module_layer():
    model = small_net()
    x = images()
    masks = torch.rand(4, 16, 1, 1, generator=torch.Generator().manual_seed(2))

    def target(out):
        return out[:, 2] - out[:, 5]

    expected2 = loop_masked(model, x, masks, [2, 2, 2], layer="features.3")
    expected5 = loop_masked(model, x, masks, [5, 5, 5], layer="features.3")
    got = TorchAdapter(model).forward_masked(x, masks, at=model.features[3], targets=target, batch_size=3)
    close(got, expected2 - expected5)


# ------------------------------------------------------------------------------ 11. default layer
def test_default_layer_efficientnet(effnet, photo_batch):
    x = photo_batch[:2]
    order = []
    names = {m: n for n, m in effnet.named_modules() if n}
    pooled = {}

    def hook(module, args, out):
        order.append((names[module], tuple(out.shape) if isinstance(out, torch.Tensor) else None))

    hooks = [m.register_forward_hook(hook) for m in names]
    hooks.append(effnet._avg_pooling.register_forward_pre_hook(lambda m, args: pooled.__setitem__("x", args[0])))
    try:
        with torch.no_grad():
            effnet(x[:1])
    finally:
        for h in hooks:
            h.remove()
    feature_maps = [n for n, s in order if s is not None and len(s) == 4 and s[2] * s[3] > 1]
    expected = feature_maps[-1]
    assert dict(order)[expected] == (1, 1280, 7, 7)
    assert TorchAdapter(effnet).default_layer(x) == expected

    snap = snapshot(effnet)
    _, acts, _ = TorchAdapter(effnet).activations_and_grads(x[:1], [expected], gradients=False)
    close(acts[0], pooled["x"], rtol=0, atol=0)  # the default layer is what global pooling reads
    by_default = camcore.explain(effnet, x, method="gradcam")
    close(by_default, camcore.explain(effnet, x, method="gradcam", layer=expected), rtol=0, atol=0)
    assert_untouched(effnet, snap)


def test_efficientnet_gradcam_matches_independent(effnet, photo_batch):
    x = photo_batch[:2]
    snap = snapshot(effnet)
    with torch.no_grad():
        top = effnet(x).argmax(1).tolist()
    _, a, g = capture_act_grad(effnet, "_conv_head", x, class_score(top))
    cams = camcore.explain(effnet, x, method="gradcam", layer="_conv_head")
    close(cams, reference_gradcam(a, g, (224, 224)), rtol=1e-4, atol=1e-4)
    assert_untouched(effnet, snap)


# ------------------------------------------------------------------------------ 12. counterfactual
@pytest.mark.parametrize("layer", ["features.3", "features.5"])
def test_counterfactual_gradcam(layer):
    model = small_net()
    x = images()
    _, a, g = capture_act_grad(model, layer, x, class_score([3, 7, 1]))
    cams = camcore.explain(model, x, method="gradcam", layer=layer, targets=[3, 7, 1], counterfactual=True)
    close(cams, reference_gradcam(a, g, (16, 16), counterfactual=True))
    raw = camcore.explain(model, x, method="gradcam", layer=layer, targets=[3, 7, 1], counterfactual=True,
                          normalize=False, upsample=False)
    close(raw, reference_gradcam(a, g, (8, 8), counterfactual=True, normalize=False))
    # explaining -y^c with a callable target gives the same map
    neg = camcore.explain(model, x, method="gradcam", layer=layer, targets=lambda out: -class_score([3, 7, 1])(out))
    close(cams, neg)


# ------------------------------------------------------------------------------ regressions (bugs fixed)
def test_buffers_updated_in_eval_mode_are_restored():
    """Regression: buffers must be the same after every call, also those that change in eval mode -- a
    quantization observer (``torch.ao.quantization.MinMaxObserver``, as in QAT-prepared models). The adapter once
    restored buffers only when some module was in training mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), torch.ao.quantization.MinMaxObserver(), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    snap = snapshot(model)
    camcore.explain(model, images(), method="gradcam", layer="0")
    assert_untouched(model, snap)


def test_default_layer_as_is_with_batchnorm1d_head():
    """Regression: ``layer=None`` once probed with ``inputs[:1]``, which a train-mode ``BatchNorm1d`` refuses
    ("Expected more than 1 value per channel when training") under ``model_mode="as-is"``; it probes the whole
    batch now."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm1d(4)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.bn(self.conv(x).mean(dim=(2, 3))))

    torch.manual_seed(0)
    model = Net().train()
    x = images()
    named = camcore.explain(model, x, method="gradcam", layer="conv", model_mode="as-is")
    snap = snapshot(model)
    by_default = camcore.explain(model, x, method="gradcam", model_mode="as-is")
    close(by_default, named)
    assert_untouched(model, snap)


def test_forward_masked_per_sample_masks_at_token_layer():
    """Regression: per-sample masks were once recognised by the rank of the *inputs*, not of the layer ``at``. Per-sample masks ``(B, M, N, 1)`` at a ViT token layer
    ``(B, N, D)`` (documented: ``(B, M, *shape)`` with ``shape`` broadcasting against one sample at ``at``) are
    taken as B shared masks and the call dies in broadcasting."""
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=10).eval()
    with torch.no_grad():
        nn.init.normal_(vit.heads.head.weight)
    x = images(b=2, h=32, w=32)
    layer = "encoder.layers.encoder_layer_1.ln_1"
    masks = (torch.rand(2, 3, 17, 1, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    expected = loop_masked(vit, x, masks, [1, 2], per_sample=True, layer=layer)
    got = TorchAdapter(vit).forward_masked(x, masks, at=layer, targets=[1, 2])
    close(got, expected)


def test_ablation_cam_of_a_loaded_torch_export_program_runs_only_the_tail(tmp_path):
    """A ``.pt2`` program, loaded and unflattened (what ``camcore explain model.pt2`` explains): torch.fx cannot
    trace its forward, so the tail is cut from the program's own graph; same maps as the original module."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    x = torch.randn(2, 3, 16, 16)
    program = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    torch.export.save(program, tmp_path / "net.pt2")
    loaded = torch.export.unflatten(torch.export.load(tmp_path / "net.pt2"))
    ref = camcore.explain(net, x, method="ablationcam", layer="2", targets=[1, 3], progress=False)
    info = {}
    got = camcore.explain(loaded, x, method="ablationcam", layer="2", targets=[1, 3], progress=False, info=info)
    assert info["path"] == "tail" and "reason" not in info
    assert torch.allclose(got, ref, atol=1e-6)
