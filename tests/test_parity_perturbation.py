"""Parity of camcore's gradient-free methods with pytorch-grad-cam (``pytorch_grad_cam``, grad-cam 1.5.7) and
torch-cam (``torchcam`` 0.5.0).

Expected values come from the peers themselves, or from plain loops written here from a peer's own rule where that
rule differs from camcore's (then camcore is checked against its own definition in ``test_perturbation.py``, and
the size of the difference is stated below). Maps are compared at the layer's resolution where possible.

How the peers differ from camcore (measured on the models below; torch 2.14 CPU):

- pytorch-grad-cam ``AblationCAM`` ablates a channel with ``min(output) - 1e7`` unless the layer's minimum over the
  ablation batch is exactly 0 (a deviation from the paper, which zeroes the channel): given an ``AblationLayer``
  that zeroes (:class:`ZeroAblation`), its weights equal camcore's to 3.1e-7 (EfficientNet ``_blocks.0._bn2``,
  all 16 channels; weights up to 0.16) and 2.2e-7 (32 channels of ``_conv_head``), its raw maps to 1.5e-6 of
  their maximum; on a ReLU layer (``_blocks.0._swish``) its default layer zeroes too and agrees (2.1e-7, maps
  1.5e-7). Its default on ``_blocks.0._bn2`` (negative values) gives weights off by up to 1.07 and a map off by
  0.95 of its maximum; on a small net, see ``DEFAULT_DEVIATION``. It replaces the target module by the ablation
  layer (so the whole prefix runs again per batch, and a module called more than once cannot be a target) and
  computes ``(y - y_k) / y`` in float32; its final maps are ``(x - min) / (1e-7 + max - min)`` at the layer's
  resolution, resized with ``cv2.resize`` and normalised again (camcore: its own linear upsampling, then exact
  min-max): within 1e-4.
- pytorch-grad-cam ``ScoreCAM``: upsampling with ``UpsamplingBilinear2d`` (``align_corners=True``; camcore and the
  Score-CAM authors use half-pixel centres), ``(U - min) / (max - min + 1e-8)``, and ``softmax`` over the channels
  of the logits (camcore ``weighting="channel-softmax"``). Where the layer has the input's resolution (no
  upsampling) the raw maps agree to 9e-8 of their maximum; at a layer of half the input's resolution they differ
  by 9.0e-4 (``conv2``) / 4.0e-4 (``act2``) of it, and pytorch-grad-cam equals a loop with ``align_corners=True``
  masks. (camcore's default ``weighting="probability"``, the Score-CAM authors' rule, gives maps 7-8% away at
  ``conv1``/``act1`` and 47% at ``conv2``/``act2``: the rules differ, not the implementations.)
- torch-cam ``ScoreCAM``/``SSCAM``/``ISCAM``: ``softmax`` over channels of ``y(X * M_k) - y(X_b)`` (the baseline
  cancels: camcore ``weighting="channel-softmax"``), masks min-max normalised (``+1e-8``) at the layer's
  resolution BEFORE upsampling (camcore after): equal where layer and input resolutions agree (ScoreCAM to 1.2e-7
  of the map's maximum, SSCAM fed camcore's noise likewise); at half resolution ScoreCAM differs by 4.3e-3
  (``conv2``) / 1.8e-3 (``act2``). ISCAM's coefficients differ: see
  :func:`test_torchcam_iscam_cumulative_coefficients` (maps 1.4e-3 to 1.4e-2 apart).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camcore
from camcore.backends.pytorch import TorchAdapter

pgc = pytest.importorskip("pytorch_grad_cam")
torchcam_methods = pytest.importorskip("torchcam.methods")
from pytorch_grad_cam.ablation_layer import AblationLayer  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

RTOL = 1e-5  # raw maps without upsampling, relative to the map's maximum
MAP_TOL = 1e-4  # final maps in [0, 1] (pytorch-grad-cam's cv2 pipeline), as in test_parity_pytorch_grad_cam.py
# pytorch-grad-cam's and camcore's Ablation-CAM scores come from differently batched float32 passes (the whole
# model vs camcore's vmapped tail): y_k differ by a few ulp, so w_k = (y - y_k) / y by ~1e-7 and the raw map by
# max|dw| * sum_k |A_k| (measured: weights 3.1e-7, maps 1.5e-6 of their maximum at _blocks.0._bn2).
W_ATOL = 2e-6
ABLATION_RTOL = 1e-4


# ----------------------------------------------------------------------------------------------- helpers
class Net(nn.Module):
    """conv-relu (input resolution), conv-relu (stride 2), global average pooling, linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.act2(self.conv2(self.act1(self.conv1(x))))), 1))


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return Net().eval(), torch.randn(2, 3, 12, 12, generator=g), [1, 3]


def layer_output(model, x, layer):
    store = []
    h = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: store.append(o.detach().clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return store[-1]


def raw_map(model, x, method, layer, targets, **options):
    return camcore.explain(model, x, method=method, layer=layer, targets=targets, normalize=False, upsample=False,
                           progress=False, **options).double().numpy()


def combine(w, a):
    """ReLU(sum_k w_k A_k) in float64 (what both peers compute before normalising)."""
    return np.maximum((np.asarray(w, np.float64)[:, :, None, None] * np.asarray(a, np.float64)).sum(1), 0)


def rel_err(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def softmax_rows(s):
    s = np.asarray(s, np.float64)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def masked_logits(model, x1, masks, target):
    """Logit of ``target`` for one sample times each mask, one forward pass per mask."""
    with torch.no_grad():
        return [float(model(x1 * m[None])[0, target]) for m in masks]


# --------------------------------------------------------------------------- pytorch-grad-cam AblationCAM
class ZeroAblation(AblationLayer):
    """pytorch-grad-cam's ablation layer, ablating with 0 as the paper (Desai & Ramaswamy 2020, eq. 2) does;
    ``channels``: ablate only these (the others get pytorch-grad-cam's weight 0), to bound the run time."""

    def __init__(self, channels=None):
        super().__init__()
        self.channels = channels

    def activations_to_be_ablated(self, activations, ratio_channels_to_ablate=1.0):
        if self.channels is None:
            return super().activations_to_be_ablated(activations, ratio_channels_to_ablate)
        self.indices = np.int32(self.channels)
        return self.indices

    def __call__(self, x):
        out = self.activations
        for i in range(out.size(0)):
            out[i, self.indices[i], :] = 0
        return out


def pgc_ablation_weights(model, layer, x, targets, ablation_layer):
    """pytorch-grad-cam's ``AblationCAM.get_cam_weights`` (B, C), on a private copy of the model (it swaps the
    layer for the ablation layer while it runs)."""
    model = copy.deepcopy(model)
    module = dict(model.named_modules())[layer]
    cam = pgc.AblationCAM(model, [module], ablation_layer=ablation_layer, batch_size=32)
    try:
        acts = layer_output(model, x, layer).numpy()
        return cam.get_cam_weights(x, module, [ClassifierOutputTarget(t) for t in targets], acts, None), acts
    finally:
        cam.activations_and_grads.release()


def camcore_ablation_weights(model, x, layer, targets):
    """camcore's Ablation-CAM weights, from :func:`camcore.perturbation.ablation_weights` on the adapter's capture
    of the layer, with the activations and target logits checked against ones taken here."""
    a = layer_output(model, x, layer)
    with torch.no_grad():
        y = model(x)[torch.arange(x.shape[0]), torch.as_tensor(targets)]
    engine = TorchAdapter(model)
    cap = engine.capture(x, [layer], list(targets), gradients=False)
    torch.testing.assert_close(cap.acts[0], a, rtol=0, atol=0)
    return camcore.perturbation.ablation_weights(engine, cap, 0, a, a.numpy(), y, list(targets),
                                                 progress=False).numpy()


def photo(name, size):
    from camcore.demo import load_photo, to_tensor

    return to_tensor([load_photo(name, size=size)], size=size)


def test_pgc_ablationcam_zero_ablation_effnet_full_layer(effnet):
    """``_blocks.0._bn2`` (16 channels, negative values): every channel, weights and maps. (The cat photo at
    112 x 112: every ablation runs nearly the whole model, in both libraries.)"""
    x, targets, layer = photo("chelsea", 112), [281], "_blocks.0._bn2"
    w, acts = pgc_ablation_weights(effnet, layer, x, targets, ZeroAblation())
    assert acts.min() < 0  # pytorch-grad-cam's default layer would ablate with min - 1e7 here
    np.testing.assert_allclose(camcore_ablation_weights(effnet, x, layer, targets), w, rtol=0, atol=W_ATOL)
    want = combine(w, acts)  # pytorch-grad-cam's get_cam_image: sum_k w_k A_k; then ReLU
    assert rel_err(raw_map(effnet, x, "ablationcam", layer, targets), want) <= ABLATION_RTOL


def test_pgc_ablationcam_zero_ablation_effnet_conv_head(effnet, photo_batch):
    """``_conv_head`` (1280 channels, 7 x 7): the weights of 32 channels (pytorch-grad-cam runs the whole model per
    ablation: all 1280 would take minutes on CPU); camcore computes all of them."""
    x, targets, layer = photo_batch[:1], [281], "_conv_head"
    channels = list(range(0, 1280, 40))
    w, acts = pgc_ablation_weights(effnet, layer, x, targets, ZeroAblation(channels))
    assert acts.min() < 0
    assert not np.delete(w, channels, axis=1).any()  # pytorch-grad-cam ablated exactly these channels
    # Ablating a channel whose batch-norm + ReLU6 output is clipped either way leaves the score unchanged: 17 of
    # the 32 weights are 0 (exactly on CPUs whose kernels give a batch of 32 the same bits as a batch of 1, a few
    # ulp elsewhere). The other 15 are real (10 of them above 2e-4), so the comparison is not 0 against 0.
    assert (np.abs(w[:, channels]) > 100 * W_ATOL).sum() >= 8
    got = camcore_ablation_weights(effnet, x, layer, targets)
    assert got.shape == (1, 1280)
    np.testing.assert_allclose(got[:, channels], w[:, channels], rtol=0, atol=W_ATOL)


# camcore's tail path trips its own output check here and falls back to full passes, with a warning (same scores):
# see test_perturbation.py::test_effnet_tail_check_accepts_float32_rounding
@pytest.mark.filterwarnings("ignore:forward_masked:RuntimeWarning")
def test_pgc_ablationcam_default_layer_agrees_on_a_relu_layer(effnet):
    """``_blocks.0._swish`` (ReLU6, 32 channels, minimum exactly 0): pytorch-grad-cam's default ablation layer
    zeroes the channel, so it agrees with camcore without help. (The coffee photo at 112 x 112.)"""
    x, targets, layer = photo("coffee", 112), [504], "_blocks.0._swish"
    w, acts = pgc_ablation_weights(effnet, layer, x, targets, AblationLayer())
    assert acts.min() == 0
    np.testing.assert_allclose(camcore_ablation_weights(effnet, x, layer, targets), w, rtol=0, atol=W_ATOL)
    assert rel_err(raw_map(effnet, x, "ablationcam", layer, targets), combine(w, acts)) <= ABLATION_RTOL


def test_pgc_ablationcam_whole_pipeline(small):
    """pytorch-grad-cam's final maps (normalise at the layer's 6 x 6, ``cv2.resize`` to 12 x 12, normalise again)
    against camcore's (upsample, then min-max)."""
    model, x, targets = small
    theirs = copy.deepcopy(model)
    cam = pgc.AblationCAM(theirs, [theirs.conv2], ablation_layer=ZeroAblation())
    try:
        want = cam(x, [ClassifierOutputTarget(t) for t in targets])
    finally:
        cam.activations_and_grads.release()
    got = camcore.explain(model, x, method="ablationcam", layer="conv2", targets=targets, progress=False).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=MAP_TOL)


DEFAULT_DEVIATION = 0.5  # measured 1.0 of the map's maximum (its weights reach 5e7: the -1e7 propagates linearly)


def test_pgc_ablationcam_default_layer_deviates_on_negative_activations():
    """On a layer with negative activations followed by a linear layer, pytorch-grad-cam's default ablates with
    ``min - 1e7``: another map than the paper's (camcore's), which its layer ablating with 0 reproduces. (Followed
    by a ReLU, ``min - 1e7`` and 0 both give 0 after it, and the default agrees.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, stride=2, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    x, targets = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(2)), [0, 2]
    a = layer_output(model, x, "0").numpy()
    assert a.min() < 0
    got = raw_map(model, x, "ablationcam", "0", targets)
    w_zero, _ = pgc_ablation_weights(model, "0", x, targets, ZeroAblation())
    w_default, _ = pgc_ablation_weights(model, "0", x, targets, AblationLayer())
    assert rel_err(got, combine(w_zero, a)) <= ABLATION_RTOL
    assert rel_err(got, combine(w_default, a)) > DEFAULT_DEVIATION


# ----------------------------------------------------------------------------- pytorch-grad-cam ScoreCAM
def pgc_score_weights(model, layer, x, targets):
    model = copy.deepcopy(model)
    module = dict(model.named_modules())[layer]
    cam = pgc.ScoreCAM(model, [module])
    try:
        acts = layer_output(model, x, layer).numpy()
        return cam.get_cam_weights(x, module, [ClassifierOutputTarget(t) for t in targets], acts, None), acts
    finally:
        cam.activations_and_grads.release()


@pytest.mark.parametrize("layer", ["conv1", "act1"])
def test_pgc_scorecam_at_input_resolution(small, layer):
    model, x, targets = small
    w, acts = pgc_score_weights(model, layer, x, targets)
    assert acts.shape[2:] == x.shape[2:]  # no upsampling: align_corners does not matter
    got = raw_map(model, x, "scorecam", layer, targets, weighting="channel-softmax")
    assert rel_err(got, combine(w, acts)) <= RTOL
    # its whole pipeline (cv2.resize to the same size is the identity) against camcore's
    theirs = copy.deepcopy(model)
    cam = pgc.ScoreCAM(theirs, [getattr(theirs, layer)])
    try:
        final = cam(x, [ClassifierOutputTarget(t) for t in targets])
    finally:
        cam.activations_and_grads.release()
    mine = camcore.explain(model, x, method="scorecam", layer=layer, targets=targets, weighting="channel-softmax",
                           progress=False).numpy()
    np.testing.assert_allclose(mine, final, rtol=0, atol=MAP_TOL)


def test_pgc_scorecam_upsamples_with_align_corners(small):
    """At a layer of half the input's resolution pytorch-grad-cam equals a loop with ``align_corners=True`` masks
    (and ``+1e-8``), not camcore's half-pixel masks; the maps differ by ~1e-3 of their maximum."""
    model, x, targets = small
    for layer in ("conv2", "act2"):
        w, acts = pgc_score_weights(model, layer, x, targets)
        a = torch.from_numpy(acts)
        up = F.interpolate(a, size=x.shape[2:], mode="bilinear", align_corners=True)
        flat = up.flatten(2)
        masks = (up - flat.amin(2)[..., None, None]) / (flat.amax(2) - flat.amin(2) + 1e-8)[..., None, None]
        ref = softmax_rows([masked_logits(model, x[i : i + 1], masks[i][:, None], t) for i, t in enumerate(targets)])
        np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-7)
        got = raw_map(model, x, "scorecam", layer, targets, weighting="channel-softmax")
        assert 1e-4 < rel_err(got, combine(w, acts)) < 1e-2


# ------------------------------------------------------------------------------------------------- torch-cam
def torchcam_map(cls, model, layer, x, targets, **kwargs):
    """torch-cam's raw map ReLU(sum_k w_k A_k) at the layer's resolution (``normalized=False``)."""
    with cls(model, layer, input_shape=tuple(x.shape[1:]), **kwargs) as extractor:
        for key, value in getattr(cls, "_test_overrides", {}).items():
            setattr(extractor, key, value)
        with torch.no_grad():
            model(x)
        return extractor(class_idx=list(targets), normalized=False)[0].double().numpy()


@pytest.mark.parametrize("layer", ["conv1", "act1"])
@pytest.mark.parametrize("batch_size", [5, 32])
def test_torchcam_scorecam_at_input_resolution(small, layer, batch_size):
    model, x, targets = small
    want = torchcam_map(torchcam_methods.ScoreCAM, model, layer, x, targets, batch_size=batch_size)
    got = raw_map(model, x, "scorecam", layer, targets, weighting="channel-softmax", batch_size=batch_size)
    assert rel_err(got, want) <= RTOL


def test_torchcam_scorecam_normalises_before_upsampling(small):
    """Below the input's resolution torch-cam normalises the channel, then upsamples (camcore: upsample, then
    normalise): the masks differ where a channel's extremes are not on the border; the maps by ~1e-3."""
    model, x, targets = small
    for layer in ("conv2", "act2"):
        want = torchcam_map(torchcam_methods.ScoreCAM, model, layer, x, targets)
        got = raw_map(model, x, "scorecam", layer, targets, weighting="channel-softmax")
        assert 1e-4 < rel_err(got, want) < 2e-2


class CamcoreNoise:
    """Stands in for torch-cam's ``SSCAM._distrib``: its ``n``-th ``sample((B, C, H, W))`` returns camcore's noise of
    draw ``n`` (``default_rng((seed, sample, channel, n)).normal(0, std, (1, H, W))`` per sample and channel)."""

    def __init__(self, std, seed):
        self.std, self.seed, self.draw = std, seed, 0

    def sample(self, size):
        b, c, *space = size
        noise = np.stack([np.stack([np.random.default_rng((self.seed, i, k, self.draw)).normal(0.0, self.std,
                                                                                              (1, *space))[0]
                                    for k in range(c)]) for i in range(b)])
        self.draw += 1
        return torch.from_numpy(noise.astype(np.float32))


@pytest.mark.parametrize("layer", ["conv1", "act1"])
def test_torchcam_sscam_with_camcore_noise(small, layer):
    model, x, targets = small
    n, std, seed = 3, 0.6, 4

    class SSCAM(torchcam_methods.SSCAM):
        _test_overrides = {"_distrib": CamcoreNoise(std, seed)}

    want = torchcam_map(SSCAM, model, layer, x, targets, num_samples=n, std=std, batch_size=7)
    assert SSCAM._test_overrides["_distrib"].draw == n  # one (B, C, H, W) draw per sample n
    got = raw_map(model, x, "sscam", layer, targets, weighting="channel-softmax", num_samples=n, std=std, seed=seed)
    assert rel_err(got, want) <= RTOL


def test_torchcam_iscam_cumulative_coefficients(small):
    """IS-CAM's integration path differs: torch-cam scales the masked input by the cumulative coefficient
    ``c_i = sum_{p<=i} p/N`` (``1/N, 3/N, 6/N, ..., (N+1)/2``: it leaves the straight path from the black image to
    ``X * M_k`` and exceeds 1 from ``i = 4`` for ``N = 10``); camcore by ``i/N`` (``1/N .. 1``), the paper's
    integration of ``softmax(f(X * (i/N) M_k))`` along that path. Each equals a loop with its own coefficients
    (camcore's loop: also ``test_perturbation.py::test_iscam_matches_reference``); with channel-softmax weights the
    maps differ by 1.4e-3 (``act1``, N=5) to 1.4e-2 (``act2``, N=10) of their maximum on the small net."""
    model, x, targets = small
    n, layer = 5, "act1"
    a = layer_output(model, x, layer)
    flat = a.flatten(2)
    span = flat.amax(2) - flat.amin(2)
    masks = (a - flat.amin(2)[..., None, None]) / (span + 1e-8)[..., None, None]  # input resolution: no upsampling

    def loop(coefficients):
        scores = [[np.mean([masked_logits(model, x[i : i + 1] * c, masks[i][k : k + 1][None], t)[0]
                            for c in coefficients]) for k in range(a.shape[1])] for i, t in enumerate(targets)]
        return combine(softmax_rows(scores), a.numpy())

    cumulative = np.cumsum(np.arange(1, n + 1) / n)
    assert cumulative[-1] == pytest.approx((n + 1) / 2)
    want_torchcam = loop(cumulative.astype(np.float32))
    want_camcore = loop((np.arange(1, n + 1) / n).astype(np.float32))
    theirs = torchcam_map(torchcam_methods.ISCAM, model, layer, x, targets, num_samples=n, batch_size=8)
    ours = raw_map(model, x, "iscam", layer, targets, weighting="channel-softmax", num_samples=n)
    assert rel_err(theirs, want_torchcam) <= RTOL
    assert rel_err(ours, want_camcore) <= RTOL
    assert rel_err(ours, theirs) > 5e-4

