"""Ports of the bundled pretrained model, so the same real network exists on every framework.

The project's real test model is the PyTorch EfficientNet-Lite0 of ``camcore.demo.load_model()``. This module
rebuilds it, weights copied, as a Keras 3 model and as a Flax linen module, so cross-framework tests and the
Keras/JAX quickstarts run on the same real network and can be compared number for number with PyTorch.

- ``keras_efficientnet_lite(torch_model) -> keras.Model``
- ``flax_efficientnet_lite(torch_model) -> (module, variables)``
- ``flax_path(torch_name) -> str``: where a torch layer lives in the Flax port.

Both ports take channels-last images ``(B, 224, 224, 3)`` (the torch model's "same" padding is static, computed
for its 224x224 input) and return logits ``(B, 1000)``. They run in inference mode by default; in training mode
batch norm uses batch statistics and dropout and drop-connect are active, as in torch. The torch model is only
read: never changed, never run. Frameworks are imported inside the functions only.

Naming. A layer is named after the torch module it ports, by the module's full dotted path (``"_conv_stem"``,
``"_blocks.3._expand_conv"``, ``"_bn1"``, ``"_fc"``). A module called several times (the shared ReLU6 ``_swish``
modules) gets one layer per call: the last call has the plain path (what a torch forward hook sees last),
earlier calls ``"<path>-0"``, ``"<path>-1"``, ... by call index.

- Keras: layer names are the torch paths. Each MBConv block is a nested functional ``keras.Model`` named
  ``"_blocks.<i>"`` whose layers keep their full paths (``"_blocks.<i>._project_conv"``); the explicit padding
  of a conv is a ``ZeroPadding2D`` named ``"<conv path>.pad"``, the skip connection an ``Add`` named
  ``"_blocks.<i>.add"``, drop-connect a ``Dropout`` named ``"_blocks.<i>.drop_connect"``.
- Flax: each block is a submodule; see ``flax_path`` (``"_blocks.10._project_conv"`` ->
  ``"_blocks.10/_project_conv"``). The conv padding is part of ``nn.Conv``; the ReLU6 calls are parameterless
  submodules named as above, so ``capture_intermediates`` records them too.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import numpy as np

__all__ = ["keras_efficientnet_lite", "flax_efficientnet_lite", "flax_path"]


# ------------------------------------------------------------------------- the torch model, as plain data
class _Conv(NamedTuple):
    name: str  # torch path
    features: int
    kernel_size: tuple  # (kh, kw)
    strides: tuple  # (sh, sw)
    padding: tuple  # ((top, bottom), (left, right)): torch's static "same" padding plus the conv's own
    groups: int  # 1, or the channel count for a depthwise conv
    use_bias: bool


class _BN(NamedTuple):
    name: str
    epsilon: float
    momentum: float  # Keras/Flax convention: weight of the old running average (1 - torch momentum)


class _Block(NamedTuple):
    name: str  # "_blocks.<i>"
    expand: Optional[_Conv]  # 1x1 expansion conv, None when expand_ratio == 1
    bn0: Optional[_BN]
    depthwise: _Conv
    bn1: _BN
    project: _Conv
    bn2: _BN
    skip: bool  # x + inputs
    drop_rate: float  # drop-connect rate of the skip branch (training only)
    swish: tuple  # layer names of the ReLU6 calls, in call order


class _Net(NamedTuple):
    image_size: int
    stem: _Conv
    bn0: _BN
    blocks: tuple
    head: _Conv
    bn1: _BN
    swish: tuple  # the top-level ReLU6 calls: after bn0, after bn1
    dropout: float
    fc: str
    classes: int
    fc_bias: bool


def _call_names(path: str, calls: int) -> tuple:
    """Layer names for ``calls`` calls of one module: ``path-0, path-1, ..., path`` (the last is plain)."""
    return tuple(f"{path}-{k}" for k in range(calls - 1)) + (path,)


def _conv(name: str, conv) -> _Conv:
    """A torch (static-same-padding) conv as a ``_Conv``."""
    if type(conv).__name__ == "Conv2dDynamicSamePadding":
        raise NotImplementedError(f"{name}: dynamic 'same' padding (model built without image_size)")
    if tuple(conv.dilation) != (1, 1) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise NotImplementedError(f"{name}: only zero-padded, undilated convs are ported")
    if conv.groups > 1 and not conv.groups == conv.in_channels == conv.out_channels:
        raise NotImplementedError(f"{name}: grouped convs other than depthwise are not ported")
    static = getattr(conv, "static_padding", None)
    left, right, top, bottom = getattr(static, "padding", (0, 0, 0, 0))  # ZeroPad2d: (l, r, t, b); Identity
    ph, pw = conv.padding
    return _Conv(name, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
                 ((top + ph, bottom + ph), (left + pw, right + pw)), conv.groups, conv.bias is not None)


def _bn(name: str, bn) -> _BN:
    if not (bn.affine and bn.track_running_stats):
        raise NotImplementedError(f"{name}: batch norm without affine parameters or running statistics")
    return _BN(name, float(bn.eps), 1.0 - (bn.momentum if bn.momentum is not None else 0.01))


def _layout(model) -> _Net:
    """Read the torch EfficientNet(-Lite) into plain data; raise ``NotImplementedError`` for what is not ported
    (squeeze-excitation, swish, local pooling, dynamic padding)."""
    import torch

    gp = model._global_params
    if gp.local_pooling:
        raise NotImplementedError("local_pooling models are not ported")
    if not isinstance(model._swish, torch.nn.ReLU6):
        raise NotImplementedError(f"activation {type(model._swish).__name__}: only ReLU6 (the Lite models) is ported")
    blocks = []
    for i, block in enumerate(model._blocks):
        p, args = f"_blocks.{i}", block._block_args
        if block.has_se:
            raise NotImplementedError(f"{p}: squeeze-and-excitation blocks are not ported (Lite models have none)")
        if not isinstance(block._swish, torch.nn.ReLU6):
            raise NotImplementedError(f"{p}: only ReLU6 activations are ported")
        expand = args.expand_ratio != 1
        # MBConvBlock.forward's own test; a stride kept as a list ([1]) is not == 1, so such blocks have no skip.
        skip = bool(block.id_skip and args.stride == 1 and args.input_filters == args.output_filters)
        rate = gp.drop_connect_rate * i / len(model._blocks) if gp.drop_connect_rate else 0.0
        blocks.append(_Block(
            p,
            _conv(f"{p}._expand_conv", block._expand_conv) if expand else None,
            _bn(f"{p}._bn0", block._bn0) if expand else None,
            _conv(f"{p}._depthwise_conv", block._depthwise_conv), _bn(f"{p}._bn1", block._bn1),
            _conv(f"{p}._project_conv", block._project_conv), _bn(f"{p}._bn2", block._bn2),
            skip, float(rate) if skip else 0.0, _call_names(f"{p}._swish", 2 if expand else 1)))
    return _Net(int(gp.image_size), _conv("_conv_stem", model._conv_stem), _bn("_bn0", model._bn0), tuple(blocks),
                _conv("_conv_head", model._conv_head), _bn("_bn1", model._bn1), _call_names("_swish", 2),
                float(model._dropout.p), "_fc", model._fc.out_features, model._fc.bias is not None)


def _array(t) -> np.ndarray:
    """A float32 NumPy copy of a torch tensor (never a view of the torch memory)."""
    return np.array(t.detach().cpu().float().numpy(), dtype=np.float32, copy=True)


def _conv_kernel(conv) -> np.ndarray:
    """Torch ``(O, I/groups, kh, kw)`` -> ``(kh, kw, I/groups, O)`` (Keras Conv2D and Flax layout)."""
    return _array(conv.weight).transpose(2, 3, 1, 0)


# ----------------------------------------------------------------------------------------------- Keras
def keras_efficientnet_lite(torch_model):
    """The torch EfficientNet-Lite as a Keras 3 functional model: ``(B, 224, 224, 3)`` -> logits ``(B, 1000)``.

    Layers are named by torch module path (module docstring); blocks are nested models ``"_blocks.<i>"``.
    """
    import keras

    net = _layout(torch_model)
    modules = dict(torch_model.named_modules())
    inputs = keras.Input((net.image_size, net.image_size, 3), name="input")
    x = _keras_conv_bn(keras, modules, net.stem, net.bn0, inputs, relu6=net.swish[0])
    for block in net.blocks:
        x = _keras_block(keras, modules, block, tuple(x.shape[1:]))(x)
    x = _keras_conv_bn(keras, modules, net.head, net.bn1, x, relu6=net.swish[1])
    x = keras.layers.GlobalAveragePooling2D(data_format="channels_last", name="_avg_pooling")(x)
    x = keras.layers.Dropout(net.dropout, name="_dropout")(x)
    fc = modules[net.fc]
    dense = keras.layers.Dense(net.classes, use_bias=net.fc_bias, name=net.fc)
    x = dense(x)
    dense.set_weights([_array(fc.weight).T] + ([_array(fc.bias)] if net.fc_bias else []))
    return keras.Model(inputs, x, name="efficientnet_lite")


def _keras_block(keras, modules: dict, b: _Block, input_shape: tuple):
    """One MBConv block as a nested functional model ``(B, H, W, C) -> (B, H', W', C')`` named ``b.name``."""
    inputs = keras.Input(input_shape, name=f"{b.name}.input")
    x, swish = inputs, iter(b.swish)
    if b.expand is not None:
        x = _keras_conv_bn(keras, modules, b.expand, b.bn0, x, relu6=next(swish))
    x = _keras_conv_bn(keras, modules, b.depthwise, b.bn1, x, relu6=next(swish))
    x = _keras_conv_bn(keras, modules, b.project, b.bn2, x)
    if b.skip:
        if b.drop_rate:  # torch drop_connect: one keep/drop draw per sample
            x = keras.layers.Dropout(b.drop_rate, noise_shape=(None, 1, 1, 1), name=f"{b.name}.drop_connect")(x)
        x = keras.layers.Add(name=f"{b.name}.add")([x, inputs])
    return keras.Model(inputs, x, name=b.name)


def _keras_conv_bn(keras, modules: dict, c: _Conv, b: _BN, x, relu6: Optional[str] = None):
    """conv -> batch norm (-> a ReLU6 layer named ``relu6``), torch weights copied."""
    x = _keras_bn(keras, modules, b, _keras_conv(keras, modules, c, x))
    return keras.layers.ReLU(max_value=6.0, name=relu6)(x) if relu6 else x


def _keras_conv(keras, modules: dict, c: _Conv, x):
    """``ZeroPadding2D`` (when torch pads) + a ``"valid"`` ``Conv2D``/``DepthwiseConv2D`` with the torch weights."""
    if any(sum(c.padding, ())):
        x = keras.layers.ZeroPadding2D(c.padding, data_format="channels_last", name=f"{c.name}.pad")(x)
    kernel = _conv_kernel(modules[c.name])  # (kh, kw, I/groups, O)
    common = dict(strides=c.strides, padding="valid", use_bias=c.use_bias, data_format="channels_last", name=c.name)
    if c.groups > 1:
        layer = keras.layers.DepthwiseConv2D(c.kernel_size, **common)
        kernel = kernel.transpose(0, 1, 3, 2)  # (kh, kw, C, 1)
    else:
        layer = keras.layers.Conv2D(c.features, c.kernel_size, **common)
    y = layer(x)
    layer.set_weights([kernel] + ([_array(modules[c.name].bias)] if c.use_bias else []))
    return y


def _keras_bn(keras, modules: dict, b: _BN, x):
    bn = modules[b.name]
    layer = keras.layers.BatchNormalization(axis=-1, momentum=b.momentum, epsilon=b.epsilon, name=b.name)
    y = layer(x)
    layer.set_weights([_array(bn.weight), _array(bn.bias), _array(bn.running_mean), _array(bn.running_var)])
    return y


# ------------------------------------------------------------------------------------------------ Flax
def flax_path(torch_name: str) -> str:
    """The Flax linen path (``"/"``-separated module names) of a torch module of the port.

    Rule: the torch dotted path with every ``"."`` turned into ``"/"``, except before a ``ModuleList`` index, which
    stays in its list's name: ``"_blocks.10._project_conv"`` -> ``"_blocks.10/_project_conv"``, ``"_blocks.3"``
    -> ``"_blocks.3"``, ``"_conv_head"`` -> ``"_conv_head"``, ``"_blocks.3._swish-0"`` -> ``"_blocks.3/_swish-0"``.
    Look it up in ``variables["params"]`` / ``["batch_stats"]`` or in the ``"intermediates"`` of
    ``module.apply(..., capture_intermediates=True, mutable=["intermediates"])`` by splitting on ``"/"``.
    """
    parts: list = []
    for part in torch_name.split("."):
        if part.isdigit() and parts:
            parts[-1] += "." + part
        else:
            parts.append(part)
    return "/".join(parts)


def flax_efficientnet_lite(torch_model):
    """The torch EfficientNet-Lite as a Flax linen module and its variables.

    Returns ``(module, variables)`` with ``variables = {"params": ..., "batch_stats": ...}``;
    ``module.apply(variables, x)`` maps ``(B, 224, 224, 3)`` to logits ``(B, 1000)`` in inference mode
    (running batch-norm statistics). ``train=True`` uses batch statistics (pass ``mutable=["batch_stats"]``) and
    dropout/drop-connect (pass ``rngs={"dropout": key}``). Submodule paths: ``flax_path``.
    """
    import jax
    import jax.numpy as jnp
    import torch

    module = _flax_model_class()(_layout(torch_model))
    params: dict = {}
    stats: dict = {}
    for name, m in torch_model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            _put(params, name, {"scale": _array(m.weight), "bias": _array(m.bias)})
            _put(stats, name, {"mean": _array(m.running_mean), "var": _array(m.running_var)})
        elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            kernel = _conv_kernel(m) if isinstance(m, torch.nn.Conv2d) else _array(m.weight).T  # Dense: (in, out)
            _put(params, name, {"kernel": kernel, **({} if m.bias is None else {"bias": _array(m.bias)})})
    variables = jax.tree_util.tree_map(jnp.asarray, {"params": params, "batch_stats": stats})
    return module, variables


def _put(tree: dict, torch_name: str, leaves: dict) -> None:
    """Store ``leaves`` at ``flax_path(torch_name)`` in the nested dict ``tree``."""
    *outer, last = flax_path(torch_name).split("/")
    for key in outer:
        tree = tree.setdefault(key, {})
    tree[last] = leaves


def _leaf(torch_name: str) -> str:
    """The submodule name inside its parent Flax module."""
    return flax_path(torch_name).rsplit("/", 1)[-1]


@functools.lru_cache(maxsize=None)
def _flax_model_class():
    """The linen model class (defined on first use, so that importing this module imports no framework)."""
    import flax.linen as nn
    import jax.numpy as jnp

    class ReLU6(nn.Module):
        """One call of a torch ``ReLU6`` module (parameterless; a module so that it has a path)."""

        def __call__(self, x):
            return jnp.clip(x, 0.0, 6.0)

    def conv(c: _Conv):
        return nn.Conv(c.features, c.kernel_size, c.strides, padding=c.padding, feature_group_count=c.groups,
                       use_bias=c.use_bias, name=_leaf(c.name))

    def bn(b: _BN, train: bool):
        return nn.BatchNorm(use_running_average=not train, momentum=b.momentum, epsilon=b.epsilon, name=_leaf(b.name))

    class MBConvBlock(nn.Module):
        """An MBConv block ``(B, H, W, C) -> (B, H', W', C')``."""
        spec: _Block

        @nn.compact
        def __call__(self, inputs, train: bool = False):
            b, swish = self.spec, iter(self.spec.swish)
            x = inputs
            if b.expand is not None:
                x = ReLU6(name=_leaf(next(swish)))(bn(b.bn0, train)(conv(b.expand)(x)))
            x = ReLU6(name=_leaf(next(swish)))(bn(b.bn1, train)(conv(b.depthwise)(x)))
            x = bn(b.bn2, train)(conv(b.project)(x))
            if b.skip:
                if b.drop_rate:  # torch drop_connect: one keep/drop draw per sample
                    x = nn.Dropout(b.drop_rate, broadcast_dims=(1, 2, 3), deterministic=not train,
                                   name="drop_connect")(x)
                x = x + inputs
            return x

    class EfficientNetLite(nn.Module):
        """EfficientNet-Lite, channels-last: ``(B, 224, 224, 3)`` -> logits ``(B, classes)``."""
        spec: _Net

        @nn.compact
        def __call__(self, x, train: bool = False):
            net = self.spec
            x = ReLU6(name=_leaf(net.swish[0]))(bn(net.bn0, train)(conv(net.stem)(x)))
            for block in net.blocks:
                x = MBConvBlock(block, name=_leaf(block.name))(x, train)
            x = ReLU6(name=_leaf(net.swish[1]))(bn(net.bn1, train)(conv(net.head)(x)))
            x = jnp.mean(x, axis=(1, 2))  # _avg_pooling
            x = nn.Dropout(net.dropout, deterministic=not train, name="_dropout")(x)
            return nn.Dense(net.classes, use_bias=net.fc_bias, name=_leaf(net.fc))(x)

    return EfficientNetLite
