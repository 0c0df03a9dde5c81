"""Small Keras 3 models for the Keras adapter tests, each with its layers in execution order (``chain``), so a
test can split the network by hand into a prefix and a tail around any layer.

Every builder seeds Keras and gives the batch-norm layers non-trivial statistics and affine parameters, so a
change to them (or a map computed with the wrong statistics) shows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

L = keras.layers


@dataclass
class Case:
    """A model, inputs in its own layout, and how to split it by hand.

    ``chain``: ``(path, callable)`` in execution order, input to logits (a linear network). ``cam_layer``: the
    layer global average pooling reads (CAM's premise holds there); ``mid_layer``: an earlier feature map.
    """

    kind: str
    model: keras.Model
    x: np.ndarray
    chain: list
    cam_layer: str
    mid_layer: str
    channels_last: bool = True
    num_classes: int = 10
    extra: dict = field(default_factory=dict)

    @property
    def spatial(self):
        return self.x.shape[1:-1] if self.channels_last else self.x.shape[2:]


def randomize_batchnorm(model, seed=0):
    """Give every BatchNormalization of ``model`` (built) non-trivial gamma, beta, moving mean and variance."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, L.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                               rng.uniform(-0.1, 0.3, beta.shape).astype("float32"),
                               rng.uniform(-0.2, 0.2, mean.shape).astype("float32"),
                               rng.uniform(0.5, 1.5, var.shape).astype("float32")])
    return model


def images(b=2, h=16, w=16, c=3, seed=1, channels_last=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, h, w, c)).astype("float32")
    return x if channels_last else np.ascontiguousarray(np.moveaxis(x, -1, 1))


# ------------------------------------------------------------------------------------------- the 2-D CNN
def _features(prefix=""):
    """conv-bn-relu, conv-bn-relu (stride 2): the layers of the small 2-D CNN, fresh."""
    return [L.Conv2D(8, 3, padding="same", name=f"{prefix}conv1"), L.BatchNormalization(name=f"{prefix}bn1"),
            L.ReLU(name=f"{prefix}relu1"),
            L.Conv2D(12, 3, strides=2, padding="same", name=f"{prefix}conv2"),
            L.BatchNormalization(name=f"{prefix}bn2"), L.ReLU(name=f"{prefix}relu2")]


def _head(num_classes=10):
    return [L.GlobalAveragePooling2D(name="gap"), L.Dropout(0.5, name="drop"), L.Dense(num_classes, name="fc")]


def functional(seed=0, counter=False):
    """Input -> [Counter] -> conv1 bn1 relu1 conv2 bn2 relu2 -> gap -> dropout -> fc (10 logits)."""
    keras.utils.set_random_seed(seed)
    layers = ([Counter(name="counter")] if counter else []) + _features() + _head()
    inp = keras.Input((16, 16, 3), name="image")
    h = inp
    for layer in layers:
        h = layer(h)
    model = randomize_batchnorm(keras.Model(inp, h, name="functional_net"), seed)
    return Case("functional", model, images(), [(lay.name, lay) for lay in layers], "relu2", "relu1")


def sequential(seed=0):
    keras.utils.set_random_seed(seed)
    layers = _features() + _head()
    model = randomize_batchnorm(keras.Sequential([keras.Input((16, 16, 3))] + layers, name="sequential_net"), seed)
    return Case("sequential", model, images(), [(lay.name, lay) for lay in layers], "relu2", "relu1")


def nested(seed=0):
    """A functional ``backbone`` (the features) inside a functional model: paths ``"backbone/conv2"``..."""
    keras.utils.set_random_seed(seed)
    feats = _features()
    inp = keras.Input((16, 16, 3))
    h = inp
    for layer in feats:
        h = layer(h)
    backbone = keras.Model(inp, h, name="backbone")
    head = _head()
    outer_in = keras.Input((16, 16, 3), name="image")
    h = backbone(outer_in)
    for layer in head:
        h = layer(h)
    model = randomize_batchnorm(keras.Model(outer_in, h, name="nested_net"), seed)
    chain = [(f"backbone/{lay.name}", lay) for lay in feats] + [(lay.name, lay) for lay in head]
    return Case("nested", model, images(), chain, "backbone/relu2", "backbone/relu1", extra={"backbone": backbone})


class ConvBlock(keras.layers.Layer):
    """A custom layer holding sublayers as attributes: conv -> bn -> relu."""

    def __init__(self, filters, strides=1, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(filters, 3, strides=strides, padding="same", name="conv")
        self.bn = L.BatchNormalization(name="bn")
        self.relu = L.ReLU(name="relu")

    def call(self, x, training=None):
        return self.relu(self.bn(self.conv(x), training=training))


class SubclassedNet(keras.Model):
    """A subclassed model: two ConvBlocks, pooling, dropout, dense; counts its own calls."""

    def __init__(self, num_classes=10, **kwargs):
        super().__init__(**kwargs)
        self.block1 = ConvBlock(8, name="block1")
        self.block2 = ConvBlock(12, strides=2, name="block2")
        self.gap = L.GlobalAveragePooling2D(name="gap")
        self.drop = L.Dropout(0.5, name="drop")
        self.fc = L.Dense(num_classes, name="fc")
        self.calls = 0

    def call(self, x, training=None):
        self.calls += 1
        h = self.block2(self.block1(x, training=training), training=training)
        return self.fc(self.drop(self.gap(h), training=training))


def subclassed(seed=0):
    keras.utils.set_random_seed(seed)
    model = SubclassedNet(name="subclassed_net")
    x = images()
    model(x)  # build
    randomize_batchnorm(model, seed)
    chain = []
    for block in (model.block1, model.block2):
        chain += [(f"{block.name}/{sub.name}", sub) for sub in (block.conv, block.bn, block.relu)]
    chain += [(lay.name, lay) for lay in (model.gap, model.drop, model.fc)]
    return Case("subclassed", model, x, chain, "block2/relu", "block1/relu")


def tf_keras(seed=0):
    """Built only with ``tf.keras.*`` (with Keras 3 installed this is Keras 3 itself)."""
    keras.utils.set_random_seed(seed)
    tfk = tf.keras
    layers = [tfk.layers.Conv2D(8, 3, padding="same", name="conv1"), tfk.layers.ReLU(name="relu1"),
              tfk.layers.Conv2D(12, 3, strides=2, padding="same", name="conv2"),
              tfk.layers.BatchNormalization(name="bn2"), tfk.layers.ReLU(name="relu2"),
              tfk.layers.GlobalAveragePooling2D(name="gap"), tfk.layers.Dense(10, name="fc")]
    inp = tfk.Input((16, 16, 3))
    h = inp
    for layer in layers:
        h = layer(h)
    model = randomize_batchnorm(tfk.Model(inp, h, name="tf_keras_net"), seed)
    return Case("tf.keras", model, images(), [(lay.name, lay) for lay in layers], "relu2", "relu1")


def channels_first(seed=0):
    """``data_format="channels_first"`` throughout; inputs (B, 3, 16, 16). TensorFlow's CPU kernels have no NCHW
    Conv2D, but they do have NCHW depthwise convolution, so the convolutions are depthwise with a multiplier."""
    keras.utils.set_random_seed(seed)
    cf = "channels_first"
    layers = [L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", data_format=cf, name="dw1"),
              L.BatchNormalization(axis=1, name="bn1"), L.ReLU(name="relu1"),
              L.DepthwiseConv2D(3, depth_multiplier=2, strides=2, padding="same", data_format=cf, name="dw2"),
              L.ReLU(name="relu2"), L.GlobalAveragePooling2D(data_format=cf, name="gap"),
              L.Dense(10, name="fc")]
    inp = keras.Input((3, 16, 16))
    h = inp
    for layer in layers:
        h = layer(h)
    model = randomize_batchnorm(keras.Model(inp, h, name="channels_first_net"), seed)
    return Case("channels_first", model, images(channels_last=False), [(lay.name, lay) for lay in layers],
                "relu2", "relu1", channels_last=False)


def conv1d(seed=0):
    keras.utils.set_random_seed(seed)
    layers = [L.Conv1D(8, 5, padding="same", name="conv1"), L.ReLU(name="relu1"),
              L.Conv1D(12, 3, strides=2, padding="same", name="conv2"), L.ReLU(name="relu2"),
              L.GlobalAveragePooling1D(name="gap"), L.Dense(6, name="fc")]
    inp = keras.Input((40, 2))
    h = inp
    for layer in layers:
        h = layer(h)
    x = np.random.default_rng(2).standard_normal((3, 40, 2)).astype("float32")
    return Case("conv1d", keras.Model(inp, h), x, [(lay.name, lay) for lay in layers], "relu2", "relu1",
                num_classes=6)


def conv3d(seed=0):
    keras.utils.set_random_seed(seed)
    layers = [L.Conv3D(4, 3, padding="same", name="conv1"), L.ReLU(name="relu1"),
              L.Conv3D(6, 3, strides=2, padding="same", name="conv2"), L.ReLU(name="relu2"),
              L.GlobalAveragePooling3D(name="gap"), L.Dense(5, name="fc")]
    inp = keras.Input((6, 10, 8, 1))
    h = inp
    for layer in layers:
        h = layer(h)
    x = np.random.default_rng(3).standard_normal((2, 6, 10, 8, 1)).astype("float32")
    return Case("conv3d", keras.Model(inp, h), x, [(lay.name, lay) for lay in layers], "relu2", "relu1",
                num_classes=5)


BUILDERS = {"functional": functional, "sequential": sequential, "nested": nested, "subclassed": subclassed,
            "tf.keras": tf_keras, "channels_first": channels_first, "conv1d": conv1d, "conv3d": conv3d}


# ------------------------------------------------------------------------------------ special-purpose layers
class Counter(keras.layers.Layer):
    """Identity that counts its eager calls (one per forward pass of the model that holds it)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def call(self, x):
        if tf.executing_eagerly():
            self.calls += 1
        return x


class Boom(keras.layers.Layer):
    """Identity until armed; then raises during ``call``."""

    armed = False

    def call(self, x):
        if Boom.armed:
            raise RuntimeError("boom: the model failed midway")
        return x


class AlwaysTraining(keras.layers.Layer):
    """Calls its batch norm and dropout with ``training=True`` whatever the model is called with, so a forward
    pass updates moving statistics and advances the dropout seed: only the adapter's restore keeps them."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = L.BatchNormalization(momentum=0.5, name="bn")
        self.drop = L.Dropout(0.3, name="drop")

    def call(self, x):
        return self.drop(self.bn(x, training=True), training=True)


def always_training(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((16, 16, 3))
    h = L.Conv2D(6, 3, padding="same", name="conv1")(inp)
    h = AlwaysTraining(name="train_block")(h)
    h = L.ReLU(name="relu")(h)
    h = L.Conv2D(8, 3, padding="same", name="conv2")(h)
    h = L.GlobalAveragePooling2D(name="gap")(h)
    out = L.Dense(4, name="fc")(h)
    return randomize_batchnorm(keras.Model(inp, out, name="always_training_net"), seed)


def shared_conv(seed=0):
    """``shared`` (one Conv2D object) is applied twice in one forward pass."""
    keras.utils.set_random_seed(seed)
    conv0, shared, fc = L.Conv2D(4, 3, padding="same", name="conv0"), L.Conv2D(4, 3, padding="same", name="shared"), \
        L.Dense(5, name="fc")
    inp = keras.Input((16, 16, 3))
    h1 = shared(conv0(inp))
    h2 = shared(L.Activation("tanh", name="tanh")(h1))
    out = fc(L.GlobalAveragePooling2D(name="gap")(L.ReLU(name="relu")(h2)))
    return keras.Model(inp, out), {"conv0": conv0, "shared": shared, "fc": fc}


def two_encoders(seed=0):
    """Two nested functional models, each with a layer named ``conv``: the bare name is ambiguous."""
    keras.utils.set_random_seed(seed)

    def encoder(name):
        i = keras.Input((16, 16, 3))
        return keras.Model(i, L.ReLU(name="act")(L.Conv2D(4, 3, padding="same", name="conv")(i)), name=name)

    inp = keras.Input((16, 16, 3))
    h = L.Concatenate(name="cat")([encoder("enc_a")(inp), encoder("enc_b")(inp)])
    return keras.Model(inp, L.Dense(5, name="fc")(L.GlobalAveragePooling2D(name="gap")(h)))


def two_heads(seed=0):
    """A multi-output model: ``[logits (B, 4), box (B, 2)]``."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((16, 16, 3))
    h = L.Conv2D(6, 3, padding="same", name="conv1")(inp)
    h = L.ReLU(name="relu1")(h)
    h = L.Conv2D(8, 3, strides=2, padding="same", name="conv2")(h)
    pooled = L.GlobalAveragePooling2D(name="gap")(h)
    return keras.Model(inp, [L.Dense(4, name="cls")(pooled), L.Dense(2, name="box")(pooled)])


class ClassToken(keras.layers.Layer):
    """Prepends a learned class token to (B, N, D) tokens."""

    def build(self, shape):
        self.token = self.add_weight(shape=(1, 1, shape[-1]), initializer="random_normal", name="token")

    def call(self, x):
        return tf.concat([tf.repeat(self.token, tf.shape(x)[0], axis=0), x], axis=1)


def tiny_vit(seed=0):
    """A ViT-like model on (B, 32, 32, 3): 8x8 patches -> 16 tokens of width 12, a class token, layer norm ``ln``
    (B, 17, 12), self-attention with a residual, a token MLP, the class token's features -> 10 logits."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((32, 32, 3))
    h = L.Conv2D(12, 8, strides=8, name="patch")(inp)
    h = L.Reshape((16, 12), name="tokens")(h)
    h = ClassToken(name="cls_token")(h)
    h = L.LayerNormalization(name="ln")(h)
    h = L.Add(name="residual")([h, L.MultiHeadAttention(2, 6, name="attn")(h, h)])
    h = L.Dense(12, activation="gelu", name="mlp")(h)
    h = L.Lambda(lambda t: t[:, 0], name="take_cls")(h)
    return keras.Model(inp, L.Dense(10, name="head")(h))


class RunCounter(keras.layers.Layer):
    """Identity that records the batch size of every forward pass that runs it, eager or inside a ``tf.function``
    graph (a ``tf.py_function`` runs at each execution, not only while tracing)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.batches: list[int] = []

    def _record(self, n):
        self.batches.append(int(n))
        return n

    def call(self, x):
        n = tf.py_function(self._record, [tf.shape(x)[0]], tf.int32)
        with tf.control_dependencies([n]):
            return tf.identity(x)


def counted(seed=0):
    """Input -> RunCounter -> conv -> relu -> gap -> fc (4 logits); ``counter.batches`` lists every forward pass."""
    keras.utils.set_random_seed(seed)
    counter = RunCounter(name="counter")
    inp = keras.Input((16, 16, 3))
    h = L.ReLU(name="relu")(L.Conv2D(6, 3, padding="same", name="conv")(counter(inp)))
    return keras.Model(inp, L.Dense(4, name="fc")(L.GlobalAveragePooling2D(name="gap")(h))), counter


def skip_net(seed=0):
    """A skip connection around the target ``relu1``: conv1 -> relu1 -> conv2, then ``add([conv2, conv1])`` ->
    relu -> gap -> fc (5 logits). Masking ``relu1`` leaves the skip branch (conv1's output) as it is."""
    keras.utils.set_random_seed(seed)
    lay = {"conv1": L.Conv2D(6, 3, padding="same", name="conv1"), "relu1": L.ReLU(name="relu1"),
           "conv2": L.Conv2D(6, 3, padding="same", name="conv2"), "add": L.Add(name="add"),
           "relu2": L.ReLU(name="relu2"), "gap": L.GlobalAveragePooling2D(name="gap"), "fc": L.Dense(5, name="fc")}
    inp = keras.Input((16, 16, 3))
    c1 = lay["conv1"](inp)
    h = lay["add"]([lay["conv2"](lay["relu1"](c1)), c1])
    return keras.Model(inp, lay["fc"](lay["gap"](lay["relu2"](h)))), lay


class HostStepNet(keras.Model):
    """A subclassed model with a host (NumPy) step in ``call``: it runs eagerly, but not as a ``tf.function``
    (a graph tensor has no ``.numpy()``)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(6, 3, padding="same", name="conv")
        self.relu = L.ReLU(name="relu")
        self.gap = L.GlobalAveragePooling2D(name="gap")
        self.fc = L.Dense(4, name="fc")

    def call(self, x):
        h = self.relu(self.conv(x))
        pooled = np.tanh(self.gap(h).numpy())  # on the host
        return self.fc(tf.constant(pooled))


def host_step_net(seed=0):
    keras.utils.set_random_seed(seed)
    model = HostStepNet(name="host_step_net")
    model(images())  # build
    return model
