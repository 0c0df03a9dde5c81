"""The Keras and Flax ports of the pretrained EfficientNet-Lite0 compute what the torch model computes.

Real model, real photos. References come from the torch model itself (its forward pass and our own forward
hooks); the ports are fed the same batch channels-last. Each port is built once per module.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from camcore import ports
from model_checks import assert_untouched, snapshot

LOGIT_TOL = 1e-4  # max abs logit difference
ACT_TOL = 1e-4  # max abs activation difference, relative to the activations' max abs
# layers spread through the network: top-level convs/bn, whole blocks, convs inside blocks, ReLU6 calls
PROBES = ("_conv_stem", "_swish-0", "_blocks.0", "_blocks.3._swish-0", "_blocks.3._swish", "_blocks.5._expand_conv",
          "_blocks.10", "_blocks.15._project_conv", "_conv_head", "_bn1", "_swish")


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def nhwc(photo_batch):
    return np.ascontiguousarray(photo_batch.permute(0, 2, 3, 1).numpy())


@pytest.fixture(scope="module")
def torch_ref(effnet, photo_batch):
    """Torch logits ``(4, 1000)`` and the PROBES activations, channels-last; ``"m-k"`` is the k-th call of m,
    a plain name the last call."""
    modules = dict(effnet.named_modules())
    calls: dict = {}

    def record(name):
        return lambda mod, inp, out: calls.setdefault(name, []).append(out.permute(0, 2, 3, 1).numpy().copy())

    def module_and_call(probe):  # torch paths have no "-"
        name, _, k = probe.partition("-")
        return name, int(k) if k else -1

    hooks = []
    try:
        hooks.extend(modules[n].register_forward_hook(record(n)) for n in {module_and_call(p)[0] for p in PROBES})
        with torch.no_grad():
            logits = effnet(photo_batch).numpy()
    finally:
        for h in hooks:
            h.remove()
    acts = {p: calls[module_and_call(p)[0]][module_and_call(p)[1]] for p in PROBES}
    return logits, acts


@pytest.fixture(scope="module")
def keras_port(effnet):
    keras = pytest.importorskip("keras")
    before = snapshot(effnet)
    model = ports.keras_efficientnet_lite(effnet)
    return SimpleNamespace(keras=keras, model=model, torch_before=before)


@pytest.fixture(scope="module")
def flax_port(effnet):
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    before = snapshot(effnet)
    module, variables = ports.flax_efficientnet_lite(effnet)
    return SimpleNamespace(jax=jax, module=module, variables=variables, torch_before=before)


@pytest.fixture(scope="module")
def keras_run(keras_port, nhwc):
    """Keras logits, and every top-level layer's output from running the (linear) top-level graph layer by layer."""
    keras, model = keras_port.keras, keras_port.model
    outputs, x = {}, keras.ops.convert_to_tensor(nhwc)
    for layer in model.layers[1:]:
        x = outputs[layer.name] = layer(x, training=False)
    logits = keras.ops.convert_to_numpy(model(nhwc, training=False))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(x), logits, rtol=0, atol=1e-6)  # the loop is the model
    return logits, outputs


@pytest.fixture(scope="module")
def flax_run(flax_port, nhwc):
    """Flax logits and intermediates, from one (jitted) apply that captures every submodule's output."""
    jax, module, variables = flax_port.jax, flax_port.module, flax_port.variables
    capture = functools.partial(module.apply, capture_intermediates=True, mutable=["intermediates"])
    logits, state = jax.jit(capture)(variables, nhwc)
    return np.asarray(logits), state["intermediates"]


def _at(tree, flax_path: str):
    for key in flax_path.split("/"):
        tree = tree[key]
    return tree


def _keras_activation(keras_port, outputs: dict, name: str) -> np.ndarray:
    """A layer's output: top-level from ``outputs``; inside a block model, that block's sub-model applied to the
    block's input (the output of the top-level layer before the block)."""
    keras, model = keras_port.keras, keras_port.model
    if name not in outputs:
        block_name = ".".join(name.split(".")[:2])  # "_blocks.5._expand_conv" -> "_blocks.5"
        block = model.get_layer(block_name)
        names = [layer.name for layer in model.layers]
        block_input = outputs[names[names.index(block_name) - 1]]
        return keras.ops.convert_to_numpy(keras.Model(block.inputs, block.get_layer(name).output)(block_input))
    return keras.ops.convert_to_numpy(outputs[name])


def _relative_diff(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / np.abs(want).max())


def _keras_layers(model, keras):
    """All layers, descending into nested models."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _keras_layers(layer, keras)


# ---------------------------------------------------------------------------------------------- logits
def test_keras_logits_match_torch(torch_ref, keras_run):
    want, got = torch_ref[0], keras_run[0]
    diff = float(np.abs(got - want).max())
    print(f"Keras port: max |logit diff| = {diff:.2e}")
    assert got.shape == want.shape == (4, 1000)
    assert diff <= LOGIT_TOL
    assert (got.argmax(1) == want.argmax(1)).all()


def test_flax_logits_match_torch(torch_ref, flax_run):
    want, got = torch_ref[0], flax_run[0]
    diff = float(np.abs(got - want).max())
    print(f"Flax port: max |logit diff| = {diff:.2e}")
    assert got.shape == want.shape == (4, 1000)
    assert diff <= LOGIT_TOL
    assert (got.argmax(1) == want.argmax(1)).all()


def test_flax_apply_defaults_to_inference(flax_port, nhwc):
    """``module.apply(variables, x)`` needs no rngs and no mutable collections; ``train=True`` runs with them."""
    jax, module, variables = flax_port.jax, flax_port.module, flax_port.variables
    x = jax.ShapeDtypeStruct(nhwc.shape, nhwc.dtype)
    assert jax.eval_shape(module.apply, variables, x).shape == (4, 1000)
    logits, state = jax.eval_shape(functools.partial(module.apply, train=True, mutable=["batch_stats"],
                                                     rngs={"dropout": jax.random.key(0)}), variables, x)
    assert logits.shape == (4, 1000)
    assert jax.tree_util.tree_structure(state["batch_stats"]) == jax.tree_util.tree_structure(variables["batch_stats"])


# ----------------------------------------------------------------------------------------- activations
@pytest.mark.parametrize("name", PROBES)
def test_keras_activations_match_torch(name, torch_ref, keras_port, keras_run):
    diff = _relative_diff(_keras_activation(keras_port, keras_run[1], name), torch_ref[1][name])
    print(f"Keras {name}: max relative diff {diff:.1e}")
    assert diff <= ACT_TOL


@pytest.mark.parametrize("name", PROBES)
def test_flax_activations_match_torch(name, torch_ref, flax_run):
    got = np.asarray(_at(flax_run[1], ports.flax_path(name))["__call__"][0])
    diff = _relative_diff(got, torch_ref[1][name])
    print(f"Flax {name}: max relative diff {diff:.1e}")
    assert diff <= ACT_TOL


# --------------------------------------------------------------------------------------------- naming
def test_keras_weighted_layers_are_named_by_torch_path(effnet, keras_port):
    keras, model = keras_port.keras, keras_port.model
    torch_modules = dict(effnet.named_modules())
    layers = list(_keras_layers(model, keras))
    weighted = [layer for layer in layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
                                                                keras.layers.BatchNormalization, keras.layers.Dense))]
    torch_weighted = [n for n, m in effnet.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d,
                                                                             torch.nn.Linear))]
    assert len(weighted) == len(torch_weighted) == 99  # stem, head: 5; block 0: 4; blocks 1-15: 6 each
    assert sorted(layer.name for layer in weighted) == sorted(torch_weighted)
    assert len({layer.name for layer in layers}) == len(layers), "layer names are not unique"
    for layer in weighted:  # the name points at the module whose weights the layer holds
        torch_first = next(torch_modules[layer.name].parameters()).detach().numpy()
        keras_first = layer.get_weights()[0]
        assert sorted(keras_first.shape) == sorted(torch_first.shape), layer.name
        assert np.array_equal(np.sort(keras_first, axis=None), np.sort(torch_first, axis=None)), layer.name
    blocks = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    assert [b.name for b in blocks] == [f"_blocks.{i}" for i in range(len(effnet._blocks))]
    assert all(layer.name.startswith(b.name + ".") for b in blocks for layer in b.layers)


def test_flax_path_resolves_every_torch_layer(effnet, flax_port):
    """Every torch conv/bn/linear is at ``flax_path(name)`` in the variables, holding its weights; the variables
    have exactly the structure the module itself creates."""
    jax, params, stats = flax_port.jax, flax_port.variables["params"], flax_port.variables["batch_stats"]
    for name, m in effnet.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            np.testing.assert_array_equal(_at(params, ports.flax_path(name))["scale"], m.weight.detach().numpy())
            np.testing.assert_array_equal(_at(stats, ports.flax_path(name))["var"], m.running_var.numpy())
        elif isinstance(m, torch.nn.Conv2d):
            kernel = np.asarray(_at(params, ports.flax_path(name))["kernel"])
            np.testing.assert_array_equal(kernel.transpose(3, 2, 0, 1), m.weight.detach().numpy())
        elif isinstance(m, torch.nn.Linear):
            np.testing.assert_array_equal(_at(params, ports.flax_path(name))["kernel"], m.weight.detach().numpy().T)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32)
    created = jax.eval_shape(flax_port.module.init, jax.random.key(0), x)
    shapes = jax.tree_util.tree_map(lambda a: a.shape, dict(flax_port.variables))
    assert jax.tree_util.tree_map(lambda a: a.shape, dict(created)) == shapes


def test_flax_path_rule_on_examples(flax_run, flax_port):
    assert ports.flax_path("_blocks.10._project_conv") == "_blocks.10/_project_conv"
    # resolved in the module's own intermediates and variables, not compared with a copy of the rule
    assert _at(flax_run[1], ports.flax_path("_blocks.10"))["__call__"][0].shape == (4, 14, 14, 112)
    assert _at(flax_run[1], ports.flax_path("_blocks.11._depthwise_conv"))["__call__"][0].shape == (4, 7, 7, 672)
    assert _at(flax_port.variables["params"], ports.flax_path("_blocks.3._bn0"))["scale"].shape == (144,)
    assert _at(flax_port.variables["params"], ports.flax_path("_fc"))["kernel"].shape == (1280, 1000)


# --------------------------------------------------------------------------------- the torch model, copies
def test_conversion_leaves_torch_model_unchanged(effnet, keras_port, flax_port):
    assert_untouched(effnet, keras_port.torch_before)
    assert_untouched(effnet, flax_port.torch_before)
    assert not effnet.training


def test_ports_are_independent_copies(effnet, keras_port, flax_port):
    fc_bias = keras_port.model.get_layer("_fc").bias
    torch_bias = effnet._fc.bias.detach().clone()
    keras_bias = np.array(fc_bias.numpy())
    flax_bias = np.array(flax_port.variables["params"]["_fc"]["bias"])
    try:
        fc_bias.assign(keras_bias + 1.0)  # Keras -> torch
        assert torch.equal(effnet._fc.bias, torch_bias)
        with torch.no_grad():  # torch -> Keras, Flax
            effnet._fc.bias.add_(1.0)
        fc_bias.assign(keras_bias)
        assert np.array_equal(fc_bias.numpy(), keras_bias)
        assert np.array_equal(np.asarray(flax_port.variables["params"]["_fc"]["bias"]), flax_bias)
    finally:
        fc_bias.assign(keras_bias)
        with torch.no_grad():
            effnet._fc.bias.copy_(torch_bias)
