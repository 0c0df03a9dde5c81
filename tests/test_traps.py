"""One test per trap that peer libraries fall into (DESIGN.md §3), run against camcore's own code."""
from fractions import Fraction

import numpy as np
import pytest
import torch

import camcore
from camcore import maps, weights
from camcore.methods import GradientMethod


def test_gradcam_pp_divides_alpha_and_sums_activations():
    """Hand-computed eq. (19): one channel, A = [1, 3] (sum 4), G = [1/2, 1].
    alpha = 1 / (2 + 4 g) -> [1/4, 1/6];  w = 1/4 * 1/2 + 1/6 * 1 = 7/24.
    torch-cam skips the division (w = sum G^2 relu(G) = 9/8); xplique uses the mean of A (w = 5/12)."""
    a = np.array([[[1.0, 3.0]]])
    g = np.array([[[0.5, 1.0]]])
    expected = Fraction(1, 4) * Fraction(1, 2) + Fraction(1, 6) * 1
    w = weights.gradcam_pp(a, g)
    assert w.shape == (1, 1)
    assert float(w[0, 0]) == pytest.approx(float(expected), abs=1e-12)
    assert float(w[0, 0]) != pytest.approx(9 / 8) and float(w[0, 0]) != pytest.approx(5 / 12)


def test_per_sample_targets_are_not_mixed_across_the_batch(effnet, photo_batch):
    """OmniXAI's trap (a B x B gather): each sample's map must equal that sample explained alone."""
    targets = [281, 967, 417, 657]  # tabby cat, espresso, balloon, missile
    batch = camcore.explain(effnet, photo_batch, method="gradcam", layer="_conv_head", targets=targets)
    for i, t in enumerate(targets):
        alone = camcore.explain(effnet, photo_batch[i : i + 1], method="gradcam", layer="_conv_head", targets=t)
        torch.testing.assert_close(batch[i], alone[0], atol=1e-4, rtol=0)
    # and different targets for the same image give different maps
    two = camcore.explain(effnet, photo_batch[:1].repeat(2, 1, 1, 1), method="gradcam", layer="_conv_head",
                          targets=[281, 967])
    assert (two[0] - two[1]).abs().max() > 0.05


def test_eigencam_is_not_inverted_and_independent_of_channel_order(rng):
    """pytorch-grad-cam's SVD sign flips invert maps. camcore's orientation is a property of the data: it
    does not change when channels are permuted (which can flip a raw SVD's sign), and it agrees with each
    position's energy ``sum_k x_k^2``."""
    x = rng.normal(size=(3, 8, 5, 4)) + 2.0 * rng.random(size=(3, 1, 5, 4))  # a shared spatial pattern
    p = maps.principal_component(x)
    for perm in (rng.permutation(8) for _ in range(5)):
        np.testing.assert_allclose(maps.principal_component(x[:, perm]), p, atol=1e-9)
    energy = (x**2).sum(1)
    assert np.all((p * (energy - energy.mean(axis=(1, 2), keepdims=True))).sum(axis=(1, 2)) > 0)


@pytest.mark.parametrize("method", ["eigencam", "eigengradcam"])
@pytest.mark.parametrize("layer,signed", [("_conv_head", True), ("_swish", False)])
def test_eigen_maps_peak_on_the_object_at_signed_and_rectified_layers(effnet, photo_batch, method, layer, signed):
    """On the real model and photos, Eigen-CAM's and EigenGrad-CAM's maximum falls inside each photo's
    hand-measured object box (``camcore.demo.OBJECT_BOXES``), at ``_conv_head`` (a convolution before its batch norm:
    signed activations, where orienting by the channel sum put the heat on the background of three photos) and at
    ``_swish`` (after ReLU6: non-negative)."""
    from camcore.backends.pytorch import TorchAdapter
    from camcore.demo import OBJECT_BOXES, PHOTOS, TARGETS

    _, (a,), _ = TorchAdapter(effnet).activations_and_grads(photo_batch, [layer], gradients=False)
    assert bool((a < 0).any()) == signed  # the premise: signed activations at one layer, not at the other
    cams = camcore.explain(effnet, photo_batch, method=method, layer=layer,
                           targets=[TARGETS[n] for n in PHOTOS]).numpy()
    for name, cam in zip(PHOTOS, cams):
        x0, y0, x1, y1 = OBJECT_BOXES[name]
        # the maximum is on the object, to within 1% (at 7 x 7 a cell is 32 px: EigenGrad-CAM's peak on the 26 px
        # wide rocket at _conv_head is shared with the next cell, 0.996 of it); an inverted map is ~0 there
        on_object = float(cam[y0:y1, x0:x1].max())
        assert on_object >= 0.99 * float(cam.max()), f"{method} at {layer}: {name}'s maximum is off the object"


def test_constant_and_all_zero_maps_become_zeros_not_nan():
    """A constant map normalises to zeros (pytorch-grad-cam's 1e-7 guard, and min-max without one, do not)."""
    for value in (0.0, 3.5):
        out = maps.normalize(np.full((2, 7, 7), value))
        assert np.all(out == 0)

    # end to end: a non-negative net whose counterfactual Grad-CAM map is ReLU'd to all zeros
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    x = torch.rand(2, 3, 8, 8)
    out = camcore.explain(net, x, method="gradcam", layer="1", targets=0, counterfactual=True)
    assert torch.isfinite(out).all() and torch.all(out == 0)


def test_core_never_leaves_the_device():
    """Run the whole core on torch's 'meta' device, which holds no data: any host copy (.numpy(), float(),
    np.asarray) would raise. The results must be meta tensors -- i.e. on a GPU they would stay on the GPU."""
    a = torch.rand(2, 6, 5, 7, device="meta")
    g = torch.rand(2, 6, 5, 7, device="meta")
    for name, spec in camcore.METHODS.items():
        if not isinstance(spec, GradientMethod):
            continue
        w = spec.formula(a, g)
        x = maps.weigh(w, a)
        for reduced in (maps.channel_sum(x), maps.principal_component(x)):
            out = maps.normalize(maps.fuse([maps.upsample(maps.relu(reduced), (20, 28))] * 2))
            assert out.device.type == "meta" and out.shape == (2, 20, 28), name
