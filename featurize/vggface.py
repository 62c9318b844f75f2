"""Keras 3 builders for the three keras-vggface 0.6 architectures.

Each builder returns the same graph as `keras_vggface.VGGFace(model=..., weights=None)`:
the same layers in the same order, the same weight shapes and the same layer names, with
one change forced by Keras 3, which forbids "/" in layer names: `conv1/7x7_s2/bn` is named
`conv1_7x7_s2_bn` here (`keras_layer_name` is the one place that maps the two). Layers that
keras-vggface left unnamed get the names Keras 2 gave them in a fresh session
(`activation_49`, `add_16`...), because users' code and the published files refer to them.

Weights are not loaded by the builders: `featurize.weights` resolves them for every backbone.

keras-vggface 0.6's public functions are here too, with its signatures and behaviour, so a
script written for it runs on Keras 3 by changing its import line to `featurize.vggface`:
`VGGFace` (the builders plus the published weights, from ~/.keras/models/vggface, downloaded
there once; its model's `get_layer` also takes the original "/" names, e.g. 'fc7/relu'),
`preprocess_input` and `decode_predictions` (also as `utils.preprocess_input`...).
"""

from __future__ import annotations

import re
import sys
from types import SimpleNamespace

import keras
import numpy as np
from keras import layers

from .backbones import VGGFACE_CACHE_SUBDIR, VGGFACE_LABEL_FILES, VGGFACE_RELEASE, keras_layer_name

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
            x = layers.Conv2D(filters, 3, activation="relu", padding="same", name=f"conv{block}_{i}")(x)
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
    se = layers.Conv2D(channels // ratio, 1, use_bias=True, name=f"conv{stage}_{block}_1x1_down")(se)
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


# --- keras-vggface 0.6's public API --------------------------------------------------------

# model= -> (our backbone, the classes of its published top).
_MODELS = {"vgg16": ("vggface-vgg16", VGG16_CLASSES),
           "resnet50": ("vggface-resnet50", RESNET50_CLASSES),
           "senet50": ("vggface-senet50", RESNET50_CLASSES)}
_BUILDERS = {"vgg16": vggface_vgg16, "resnet50": vggface_resnet50, "senet50": vggface_senet50}
MIN_INPUT_SIZE = 48  # keras-vggface's limit for input_shape


def VGGFace(include_top=True, model="vgg16", weights="vggface", input_tensor=None,  # noqa: N802
            input_shape=None, pooling=None, classes=None):
    """keras-vggface's `VGGFace`: the VGGFace (vgg16) or VGGFace2 (resnet50, senet50) model,
    with the published weights (weights="vggface") or random ones (weights=None).

    The same arguments, checks, layer names and outputs as keras-vggface 0.6 (its "/" names,
    which Keras 3 forbids, are `_` names here, and `get_layer` takes both: `VGGFaceModel`);
    the weight files are the ones it downloads to ~/.keras/models/vggface (KERAS_HOME), used
    where they already are. Two differences: an unknown `model` is a ValueError (the original
    returned None), and the architectures are built channels-last only.
    """
    if weights not in {"vggface", None}:
        raise ValueError("The `weights` argument should be either `None` (random "
                         "initialization) or `vggface` (pre-training on VGGFace datasets).")
    if model not in _MODELS:
        raise ValueError(f"The `model` argument should be one of {', '.join(_MODELS)}, "
                         f"not {model!r}.")
    backbone, published_classes = _MODELS[model]
    classes = published_classes if classes is None else classes
    if weights == "vggface" and include_top and classes != published_classes:
        raise ValueError("If using `weights` as vggface original with `include_top` as true, "
                         f"`classes` should be {published_classes}")
    if keras.config.image_data_format() != "channels_last":
        raise ValueError("featurize.vggface builds channels-last models only; call "
                         "keras.config.set_image_data_format('channels_last') first.")
    shape = _checked_input_shape(input_shape, include_top)
    _check_input_tensor(input_tensor)
    if not include_top:  # the top ignores it, as in the original
        _check_pooling(pooling)
    # Found or downloaded before building: a missing file fails at once, and cheaply.
    path = _published_weights(backbone, include_top) if weights == "vggface" else None
    net = _BUILDERS[model](include_top=include_top, input_shape=shape, pooling=pooling,
                           classes=classes, input_tensor=input_tensor)
    if path is not None:
        _load_published(_own_layers(net, input_tensor), path)
    # The same layers, as a model whose get_layer also takes keras-vggface's "/" names.
    return VGGFaceModel(net.inputs, net.outputs, name=net.name)


@keras.saving.register_keras_serializable(package="featurize")
class VGGFaceModel(keras.Model):
    """The functional model `VGGFace` returns: a plain Keras model (fit, save, load...) whose
    `get_layer` also accepts keras-vggface's names, which Keras 3 forbids ("/" in them):
    `get_layer('fc7/relu')` is the layer `fc7_relu`. `keras.saving.load_model` gives it
    back when `featurize.vggface` is imported (its class is registered there)."""

    def get_layer(self, name=None, index=None):
        if isinstance(name, str) and "/" in name:
            ours = keras_layer_name(name)
            if not any(layer.name == ours for layer in self.layers):
                raise ValueError(f"No such layer: {name} (Keras 3 name {ours}) in "
                                 f"{self.name}; layer names are listed by model.summary().")
            name = ours
        return super().get_layer(name=name, index=index)


def _load_published(net, path) -> None:
    """The release's Keras 2 file into `net`; a file that does not fit is named, with what
    a Python caller can do about it."""
    from .errors import UserError
    from .weights import load_keras2_h5
    try:
        load_keras2_h5(net, path, keras_layer_name)
    except UserError as e:
        reason = str(e).split(";")[0].rstrip(".")
        raise UserError(f"{reason}. Delete {path} so that VGGFace downloads it again, or "
                        "call VGGFace(..., weights=None) for random weights.") from None


def _checked_input_shape(input_shape, include_top):
    """keras-vggface's rules: three dimensions, sides of at least 48, a fixed size with the
    top; without one, 224x224 with the top and any size without."""
    if input_shape is None:
        return (224, 224, 3) if include_top else (None, None, 3)
    shape = tuple(input_shape)
    if len(shape) != 3:
        raise ValueError("`input_shape` must be a tuple of three integers.")
    if any(side is not None and side < MIN_INPUT_SIZE for side in shape[:2]):
        raise ValueError(f"Input size must be at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}; "
                         f"got `input_shape={shape}`")
    if include_top and None in shape:
        raise ValueError("If `include_top` is True, you should specify a static "
                         f"`input_shape`. Got `input_shape={shape}`")
    return shape


def _published_weights(backbone, include_top) -> str:
    """The release's file, found or downloaded where keras-vggface keeps it (the place and
    the URL featurize's own resolution uses, so the CLI and this share one copy). A failed
    download says what a Python caller can do: VGGFace takes no weight path."""
    from .backbones import get_backbone
    from .download import fetch
    from .weights import keras_home

    spec = get_backbone(backbone)
    wf = spec.top_weights if include_top else spec.notop_weights
    path = keras_home() / VGGFACE_CACHE_SUBDIR / wf.filename
    if not path.is_file():
        fetch(wf.url, path, wf.sha256, hint=", or call VGGFace(..., weights=None) for random "
                                            "weights")
    return str(path)


def _own_layers(net, input_tensor):
    """`net` without the layers in front of a given `input_tensor` (the caller's own layers,
    which the weight file does not know)."""
    if input_tensor is None:
        return net
    upstream = keras.Model(keras.utils.get_source_inputs(input_tensor), input_tensor).layers
    theirs = {id(layer) for layer in upstream}
    return SimpleNamespace(name=net.name, layers=[layer for layer in net.layers
                                                     if id(layer) not in theirs])


def preprocess_input(x, data_format=None, version=1):
    """keras-vggface's `preprocess_input`: RGB -> BGR and the training set's BGR channel
    means subtracted; version 1 for vgg16 (VGGFace), 2 for resnet50 and senet50 (VGGFace2).

    Numpy in, a new numpy array out (`x` is not changed); float input keeps its dtype, integer
    input (which the original rejected) becomes float32. The models of `featurize` apply the
    same computation inside themselves (`ImagePreprocessing`), so the cache sees raw pixels.
    """
    from .preprocessing import VGGFACE_BGR_MEANS

    schemes = {1: "vggface1", 2: "vggface2"}
    if version not in schemes:
        raise NotImplementedError(f"preprocess_input: version must be 1 (vgg16) or 2 "
                                  f"(resnet50, senet50), not {version!r}.")
    data_format = data_format or keras.config.image_data_format()
    out = np.array(x, copy=True)
    if not np.issubdtype(out.dtype, np.floating):
        out = out.astype(np.float32)
    means = np.asarray(VGGFACE_BGR_MEANS[schemes[version]], dtype=out.dtype)
    if data_format == "channels_last":
        return out[..., ::-1] - means
    if data_format == "channels_first" and out.ndim == 4:
        return out[:, ::-1] - means.reshape(1, 3, 1, 1)
    raise ValueError(f"preprocess_input: data_format must be 'channels_last' or (for a batch "
                     f"of shape (N, 3, H, W)) 'channels_first', not {data_format!r} with "
                     f"an array of shape {out.shape}.")


def decode_predictions(preds, top=5):
    """keras-vggface's `decode_predictions`: for each row of `preds` (N, 2622) or (N, 8631),
    the `top` identities as [name, score], best first.

    The names come from the release's label file (v1 for 2622 classes, v2 for 8631),
    downloaded once to ~/.keras/models/vggface. They are exactly the original's strings: on
    Python 3 it returned `str()` of the UTF-8 bytes (e.g. "b' A.J._Buckley'"), and scripts
    compare or slice those, so they are kept.
    """
    preds = np.asarray(preds)
    if preds.ndim != 2 or preds.shape[1] not in VGGFACE_LABEL_FILES:
        raise ValueError("`decode_predictions` expects a batch of predictions (i.e. a 2D array "
                         "of shape (samples, 2622)) for V1 or (samples, 8631) for V2. Found "
                         f"array with shape: {preds.shape}")
    labels = _identity_labels(preds.shape[1])
    results = []
    for row in preds:
        best = row.argsort()[-top:][::-1]
        ranked = [[str(str(labels[i]).encode("utf8")), row[i]] for i in best]
        ranked.sort(key=lambda pair: pair[1], reverse=True)
        results.append(ranked)
    return results


def _identity_labels(classes: int) -> np.ndarray:
    from .download import fetch
    from .weights import keras_home

    filename = VGGFACE_LABEL_FILES[classes]
    path = fetch(VGGFACE_RELEASE + filename, keras_home() / VGGFACE_CACHE_SUBDIR / filename)
    return np.load(path, allow_pickle=False)  # a plain string array; never unpickle a download


# `from keras_vggface import utils` becomes `from featurize.vggface import utils`: this module
# has both halves of keras-vggface (vggface.py and utils.py) under one name.
utils = sys.modules[__name__]
