"""keras-vggface 0.6's API on Keras 3: a script written for it runs by changing its import
line to `featurize.vggface`.

`VGGFace` (the VGGFace / VGGFace2 architectures with the published weights, from
~/.keras/models/vggface, downloaded there once; its model's `get_layer` also takes the
original "/" names, e.g. 'fc7/relu'), `preprocess_input` and `decode_predictions` (also as
`utils.preprocess_input`...), and the architecture builders `vggface_vgg16`,
`vggface_resnet50` and `vggface_senet50` (`featurize.models.vggface`).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import keras
import numpy as np

from featurize.models.specs import (
    VGGFACE_CACHE_SUBDIR,
    VGGFACE_LABEL_FILES,
    VGGFACE_RELEASE,
    keras_layer_name,
)
from featurize.models.vggface import (
    RESNET50_CLASSES,
    VGG16_CLASSES,
    _check_input_tensor,
    _check_pooling,
    vggface_h5_name,
    vggface_resnet50,
    vggface_senet50,
    vggface_vgg16,
)

__all__ = ["VGGFace", "VGGFaceModel", "decode_predictions", "keras_layer_name",
           "preprocess_input", "utils", "vggface_h5_name", "vggface_resnet50",
           "vggface_senet50", "vggface_vgg16"]


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
    from featurize.errors import UserError
    from featurize.models.weights import load_keras2_h5
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
    from featurize.data.download import fetch
    from featurize.models.registry import get_backbone
    from featurize.models.weights import keras_home

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
    from featurize.models.preprocessing import VGGFACE_BGR_MEANS

    schemes = {1: "vggface1", 2: "vggface2"}
    if version not in schemes:  # keras-vggface raises NotImplementedError here: scripts catch it
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
    from featurize.data.download import fetch
    from featurize.models.weights import keras_home

    filename = VGGFACE_LABEL_FILES[classes]
    path = fetch(VGGFACE_RELEASE + filename, keras_home() / VGGFACE_CACHE_SUBDIR / filename)
    return np.load(path, allow_pickle=False)  # a plain string array; never unpickle a download


# `from keras_vggface import utils` becomes `from featurize.vggface import utils`: this module
# has both halves of keras-vggface (vggface.py and utils.py) under one name.
utils = sys.modules[__name__]
