"""Keras 3 builders for the three keras-vggface 0.6 architectures.

Each builder returns the same graph as `keras_vggface.VGGFace(model=..., weights=None)`:
the same layers in the same order, the same weight shapes and the same layer names, with
one change forced by Keras 3, which forbids "/" in layer names: `conv1/7x7_s2/bn` is named
`conv1_7x7_s2_bn` here (`keras_layer_name` is the one place that maps the two). Layers that
keras-vggface left unnamed get the names Keras 2 gave them in a fresh session
(`activation_49`, `add_16`...), because users' code and the published files refer to them.

Weights are not loaded by the builders: `featurize.models.weights` resolves them for every
backbone.

keras-vggface 0.6's public functions (`VGGFace`, `preprocess_input`, `decode_predictions`,
`utils`) are in `featurize.vggface`, built on these.
"""

from __future__ import annotations

import re

import keras
from keras import layers

from featurize.models.specs import keras_layer_name

VGG16_CLASSES = 2622
RESNET50_CLASSES = 8631  # VGGFace2 identities, also the senet50 top


class _AutoNames:
    """Names for layers keras-vggface left unnamed, counted as Keras 2 did: `activation_1`..."""

    def __init__(self):
        self._counts: dict[str, int] = {}

    def __call__(self, prefix: str) -> str:
        self._counts[prefix] = self._counts.get(prefix, 0) + 1
        return f"{prefix}_{self._counts[prefix]}"


def _input(input_shape, input_tensor=None):
    """(the image tensor the layers start from, the model's inputs), as keras-vggface: a
    given Keras tensor is used as it is, so the model starts at its source inputs."""
    if input_tensor is None:
        img = keras.Input(shape=tuple(input_shape or (224, 224, 3)))
        return img, img
    _check_input_tensor(input_tensor)
    return input_tensor, keras.utils.get_source_inputs(input_tensor)


def _check_input_tensor(input_tensor):
    if input_tensor is not None and not keras.backend.is_keras_tensor(input_tensor):
        # Keras 2 wrapped a TensorFlow graph tensor; Keras 3 has no such graphs to join.
        raise ValueError("`input_tensor` must be a Keras tensor (keras.Input(...) or a "
                         f"layer's output), not {type(input_tensor).__name__}.")


def vggface_vgg16(include_top=True, input_shape=None, pooling=None, classes=VGG16_CLASSES,
                  input_tensor=None):
    """VGGFace (VGG16) of Parkhi et al. 2015, as keras-vggface `VGG16`."""
    names = _AutoNames()
    img, inputs = _input(input_shape, input_tensor)
    x = img
    for block, (filters, convs) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)], 1):
        for i in range(1, convs + 1):
            x = layers.Conv2D(filters, 3, activation="relu", padding="same",
                              name=f"conv{block}_{i}")(x)
        x = layers.MaxPooling2D(2, strides=2, name=f"pool{block}")(x)
    if include_top:
        x = layers.Flatten(name="flatten")(x)
        for fc, units in (("fc6", 4096), ("fc7", 4096)):
            x = layers.Dense(units, name=fc)(x)
            x = layers.Activation("relu", name=keras_layer_name(f"{fc}/relu"))(x)
        x = layers.Dense(classes, name="fc8")(x)
        x = layers.Activation("softmax", name=keras_layer_name("fc8/softmax"))(x)
    else:
        x = _global_pool(x, pooling, names)
    return keras.Model(inputs, x, name="vggface_vgg16")


def _global_pool(x, pooling, names):
    if pooling == "avg":
        return layers.GlobalAveragePooling2D(name=names("global_average_pooling2d"))(x)
    if pooling == "max":
        return layers.GlobalMaxPooling2D(name=names("global_max_pooling2d"))(x)
    _check_pooling(pooling)
    return x


def _check_pooling(pooling):
    if pooling not in (None, "avg", "max"):
        raise ValueError(f"pooling must be 'avg', 'max' or None, not {pooling!r}")


def _conv_bn(x, filters, kernel, name, names, eps, strides=1, relu=True):
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same" if kernel != 1 else "valid",
                      use_bias=False, name=keras_layer_name(name))(x)
    x = layers.BatchNormalization(axis=3, epsilon=eps, name=keras_layer_name(name + "/bn"))(x)
    return layers.Activation("relu", name=names("activation"))(x) if relu else x


def _squeeze_excite(x, stage, block, names, ratio=16):
    channels = x.shape[-1]
    se = layers.GlobalAveragePooling2D(name=names("global_average_pooling2d"))(x)
    se = layers.Reshape((1, 1, channels), name=names("reshape"))(se)
    se = layers.Conv2D(channels // ratio, 1, use_bias=True,
                       name=f"conv{stage}_{block}_1x1_down")(se)
    se = layers.Activation("relu", name=names("activation"))(se)
    se = layers.Conv2D(channels, 1, use_bias=True, name=f"conv{stage}_{block}_1x1_up")(se)
    se = layers.Activation("sigmoid", name=names("activation"))(se)
    return layers.Multiply(name=names("multiply"))([x, se])


def _bottleneck(x, filters, stage, block, names, eps, se, strides=1):
    """A ResNet bottleneck; block 1 of a stage has the projection shortcut."""
    f1, f2, f3 = filters
    prefix = f"conv{stage}_{block}"
    y = _conv_bn(x, f1, 1, f"{prefix}_1x1_reduce", names, eps, strides=strides)
    y = _conv_bn(y, f2, 3, f"{prefix}_3x3", names, eps)
    y = _conv_bn(y, f3, 1, f"{prefix}_1x1_increase", names, eps, relu=False)
    if se:
        y = _squeeze_excite(y, stage, block, names)
    if block == 1:
        x = _conv_bn(x, f3, 1, f"{prefix}_1x1_proj", names, eps, strides=strides, relu=False)
    y = layers.Add(name=names("add"))([y, x])
    return layers.Activation("relu", name=names("activation"))(y)


def _resnet(include_top, input_shape, pooling, classes, se, name, input_tensor=None):
    eps = 1e-4 if se else 1e-3  # keras-vggface sets 1e-4 for SENet only
    names = _AutoNames()
    img, inputs = _input(input_shape, input_tensor)
    x = _conv_bn(img, 64, 7, "conv1/7x7_s2", names, eps, strides=2)
    x = layers.MaxPooling2D(3, strides=2, name=names("max_pooling2d"))(x)
    stages = [(2, 3, (64, 64, 256)), (3, 4, (128, 128, 512)),
              (4, 6, (256, 256, 1024)), (5, 3, (512, 512, 2048))]
    for stage, blocks, filters in stages:
        for block in range(1, blocks + 1):
            strides = 2 if block == 1 and stage > 2 else 1
            x = _bottleneck(x, filters, stage, block, names, eps, se, strides=strides)
    # The original pools 7x7 (the whole map at 224x224). Below 224 the map is smaller and
    # the original cannot be built at all; pooling the whole map keeps the meaning. A map of
    # unknown size (input_shape (None, None, 3)) gets the original's 7x7.
    window = min([7, *(side for side in x.shape[1:3] if side is not None)])
    x = layers.AveragePooling2D(window, name="avg_pool")(x)
    if include_top:
        x = layers.Flatten(name=names("flatten"))(x)
        x = layers.Dense(classes, activation="softmax", name="classifier")(x)
    else:
        x = _global_pool(x, pooling, names)
    return keras.Model(inputs, x, name=name)


def vggface_resnet50(include_top=True, input_shape=None, pooling=None, classes=RESNET50_CLASSES,
                     input_tensor=None):
    """VGGFace2 ResNet-50 of Cao et al. 2018, as keras-vggface `RESNET50`."""
    return _resnet(include_top, input_shape, pooling, classes, se=False, name="vggface_resnet50",
                   input_tensor=input_tensor)


def vggface_senet50(include_top=True, input_shape=None, pooling=None, classes=RESNET50_CLASSES,
                    input_tensor=None):
    """VGGFace2 SE-ResNet-50 of Cao et al. 2018, as keras-vggface `SENET50`."""
    return _resnet(include_top, input_shape, pooling, classes, se=True, name="vggface_senet50",
                   input_tensor=input_tensor)


def vggface_h5_name(name: str) -> str:
    """Inverse of `keras_layer_name` for the names keras-vggface wrote with "/"."""
    name = re.sub(r"^conv1_7x7_s2", "conv1/7x7_s2", name)
    name = re.sub(r"_bn$", "/bn", name)
    return re.sub(r"^(fc\d)_(relu|softmax)$", r"\1/\2", name)
