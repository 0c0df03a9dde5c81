"""PyTorch models whose inputs are channels-last ``(B, *S, C)`` while their activations are channels-first: the
input layout and the activation layout are separate notions (``data_format=`` is the inputs' layout).

The real case is a Keras model converted to PyTorch through ONNX (``tf2onnx`` then ``onnx2torch``, the route
peers recommend): the pretrained EfficientNet-Lite0's Keras port, converted, must explain itself as the Keras
original does. A small hand-written pair (the same weights taking channels-last and channels-first inputs) checks
the layout handling of every path, Score-CAM's input masks included.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import camcore
from camcore.backends.pytorch import TorchAdapter
from model_checks import assert_untouched, snapshot

GRADIENT_METHODS = sorted(m for m, spec in camcore.METHODS.items()
                          if not (spec.perturbation or spec.rule or spec.guided) and m != "cam")
GUIDED = sorted(m for m, spec in camcore.METHODS.items() if spec.rule or spec.guided)
MAP_TOL = 1e-3  # the cross-framework tolerance (test_cross_framework.py), with oneDNN off as the suite sets it


class ChannelsFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(dim=(2, 3)))


class ChannelsLast(ChannelsFirst):
    """The same network taking ``(B, H, W, 3)`` inputs, as ONNX-converted Keras models do."""

    def forward(self, x):
        return super().forward(x.permute(0, 3, 1, 2))


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    first = ChannelsFirst().eval()
    last = ChannelsLast().eval()
    last.load_state_dict(first.state_dict())
    x = torch.randn(3, 3, 16, 20, generator=torch.Generator().manual_seed(1))  # non-square: H and W differ
    return first, last, x, x.permute(0, 2, 3, 1).contiguous()


@pytest.mark.parametrize("method", GRADIENT_METHODS + ["scorecam", "ablationcam"])
def test_channels_last_inputs_give_the_channels_first_twins_maps(pair, method):
    first, last, x, x_last = pair
    opts = {"progress": False} if camcore.METHODS[method].perturbation else {}
    ref = camcore.explain(first, x, method=method, layer="conv2", targets=[0, 3, 4], **opts)
    snap = snapshot(last)
    for data_format in (None, "channels_last"):  # inferred from the first convolution, or given
        got = camcore.explain(last, x_last, method=method, layer="conv2", targets=[0, 3, 4],
                              data_format=data_format, **opts)
        assert got.shape == (3, 16, 20)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert_untouched(last, snap)


@pytest.mark.parametrize("method", GUIDED)
def test_channels_last_inputs_give_the_channels_first_twins_guided_gradients(pair, method):
    """Input gradients come in the inputs' own layout: the channels-last twin's are the channels-first one's,
    permuted."""
    first, last, x, x_last = pair
    layer = None if camcore.METHODS[method].rule else "conv2"
    ref = camcore.explain(first, x, method=method, layer=layer, targets=[0, 3, 4])
    got = camcore.explain(last, x_last, method=method, layer=layer, targets=[0, 3, 4])
    assert got.shape == x_last.shape and ref.abs().max() > 0
    torch.testing.assert_close(got, ref.permute(0, 2, 3, 1), atol=1e-6, rtol=0)


def test_layout_inference_and_input_masks(pair):
    first, last, x, x_last = pair
    assert TorchAdapter(last).channels_last(x_last) and not TorchAdapter(first).channels_last(x)
    assert not TorchAdapter(last, data_format="channels_first").channels_last(x_last)
    # input masks are given channels-first (M, 1, H, W) whatever the inputs' layout
    masks = torch.rand(4, 1, 16, 20, generator=torch.Generator().manual_seed(2))
    want = TorchAdapter(first).forward_masked(x, masks, targets=[0, 3, 4])
    got = TorchAdapter(last).forward_masked(x_last, masks, targets=[0, 3, 4])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    per_sample = masks[None].expand(3, -1, -1, -1, -1)
    torch.testing.assert_close(TorchAdapter(last).forward_masked(x_last, per_sample, targets=[0, 3, 4]), want,
                               atol=1e-5, rtol=0)


def test_a_misread_layout_is_an_error_not_a_map_of_the_wrong_shape(pair):
    """Read as channels-first, (3, 16, 20, 3) inputs have 'spatial' shape (20, 3); the 8 x 10 maps must not be
    resized to it."""
    _, last, _, x_last = pair
    with pytest.raises(ValueError, match=r"upsample: the maps \(8, 10\) are larger than the inputs' spatial shape "
                                         r"\(20, 3\).*data_format='channels_last'"):
        camcore.explain(last, x_last, method="gradcam", layer="conv2", data_format="channels_first")


# --------------------------------------------------------------- a real converter chain: Keras -> ONNX -> torch
@pytest.fixture(scope="module")
def converted(effnet):
    """The pretrained EfficientNet-Lite0's Keras port, and that Keras model converted by tf2onnx + onnx2torch."""
    pytest.importorskip("keras")
    tf2onnx = pytest.importorskip("tf2onnx")
    onnx2torch = pytest.importorskip("onnx2torch")
    import tensorflow as tf

    from camcore.ports import keras_efficientnet_lite

    keras_model = keras_efficientnet_lite(effnet)
    signature = (tf.TensorSpec((None, 224, 224, 3), tf.float32, name="input"),)
    proto, _ = tf2onnx.convert.from_function(tf.function(lambda x: keras_model(x, training=False)),
                                             input_signature=signature, opset=17)
    return keras_model, onnx2torch.convert(proto).eval()


def _onnx_layers(torch_model) -> dict[str, str]:
    """The converted modules (named by their ONNX nodes) at the Keras layers compared: the head's ReLU6
    (``_swish``, rectified), the layer before it (``_conv_head`` with ``_bn1`` folded in by tf2onnx: signed), and
    block 10's residual sum."""
    names = [n for n, _ in torch_model.named_modules() if n]
    swish = [n for n in names if n.endswith("/_swish_1/Relu6")][-1]  # the blocks' own _swish come before it
    before = [n for n in names[: names.index(swish)] if "." not in n][-1]
    block = next(n for n in names if n.endswith("_blocks/10/add_1/Add"))
    return {"_swish": swish, "_bn1": before, "_blocks.10": block}


def test_keras_model_converted_through_onnx_explains_like_the_original(converted, photo_batch):
    keras_model, torch_model = converted
    x = photo_batch[:2].permute(0, 2, 3, 1).contiguous()  # the converted model takes (B, 224, 224, 3)
    with torch.no_grad():
        logits = torch_model(x).numpy()
    assert np.abs(logits - np.asarray(keras_model(x.numpy(), training=False))).max() <= 1e-4
    layers = _onnx_layers(torch_model)
    assert TorchAdapter(torch_model).channels_last(x)
    worst = {}
    for keras_layer, onnx_layer in layers.items():
        for method in GRADIENT_METHODS:
            ours = camcore.explain(torch_model, x, method=method, layer=onnx_layer, targets=[281, 967])
            assert ours.shape == (2, 224, 224)
            ref = camcore.explain(keras_model, x.numpy(), method=method, layer=keras_layer, targets=[281, 967])
            worst[method, keras_layer] = float(np.abs(ours.numpy() - ref).max())
    assert max(worst.values()) <= MAP_TOL, worst
