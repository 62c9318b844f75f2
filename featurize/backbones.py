"""The registry of backbones: one spec per backbone, so nothing about one is written twice.

A spec says where the architecture and its weights come from, the input size, the
preprocessing and the default embedding. It names builders as "module:function" strings so
that listing backbones and checking the cache never imports Keras (a cache hit must be fast).
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

VGGFACE_RELEASE = "https://github.com/rcmalli/keras-vggface/releases/download/v2.0/"
VGGFACE_CACHE_SUBDIR = "models/vggface"  # under KERAS_HOME (~/.keras), as keras-vggface uses
# Identity names of the same release, by the number of classes of the top (decode_predictions).
VGGFACE_LABEL_FILES = {2622: "rcmalli_vggface_labels_v1.npy", 8631: "rcmalli_vggface_labels_v2.npy"}


def keras_layer_name(name: str) -> str:
    """The Keras 3 name of a keras-vggface layer ("/" is not allowed in Keras 3)."""
    return name.replace("/", "_")


@dataclass(frozen=True)
class WeightFile:
    filename: str
    url: str
    sha256: str | None = None  # upstream publishes none for keras-vggface; checked when set


@dataclass(frozen=True)
class Backbone:
    name: str
    family: str  # "vggface", "keras", "dlib" or "file" (a user's own .keras model)
    builder: str  # "module:function"; for dlib, the extractor class
    input_size: int
    preprocessing: str  # an ImagePreprocessing scheme, or "dlib-5pt-chip"
    embedding_dim: int  # with the default layer and pooling
    feature_layer: str | None = None  # last conv block; None: the no-top model's output
    default_pool: str = "avg"
    notop_weights: WeightFile | None = None
    top_weights: WeightFile | None = None
    blocks: tuple[str, ...] = ()  # layer-name prefixes of the blocks, bottom to top
    top_layers: tuple[str, ...] = ()  # layers that exist only with the classifier top
    # The smallest input side the architecture accepts (5 stride-2 stages: 32; Keras's own
    # limits for the Inception family and Xception).
    min_input_size: int = 32

    @property
    def short_name(self) -> str:
        """A name safe for files and Keras models (a .keras backbone's path -> its stem)."""
        return Path(self.name).stem if self.family == "file" else self.name

    @property
    def weights_source(self) -> str:
        if self.family == "vggface":
            return "keras-vggface v2.0 release (~/.keras/models/vggface)"
        if self.family == "keras":
            return "ImageNet, through keras.applications"
        if self.family == "file":
            return "the .keras file itself"
        return "dlib model from the face-recognition-models package"

    def build(self, include_top: bool = False, input_size: int | None = None,
              imagenet: bool = False):
        """The architecture with random weights (`featurize.weights` loads the weights), or for
        a Keras application with its ImageNet weights through Keras's own download."""
        if self.family == "file":
            import keras
            return keras.saving.load_model(self.builder, compile=False)
        module, func = self.builder.split(":")
        builder = getattr(importlib.import_module(module), func)
        size = input_size or self.input_size
        if self.family == "vggface":
            return builder(include_top=include_top,
                           input_shape=None if include_top else (size, size, 3))
        kwargs = {"input_shape": (size, size, 3)} if not include_top else {}
        return builder(include_top=include_top, weights="imagenet" if imagenet else None, **kwargs)


def _vggface(arch, size, scheme, dim, feature_layer, blocks, top_layers):
    return Backbone(
        name=f"vggface-{arch}", family="vggface", builder=f"featurize.vggface:vggface_{arch}",
        input_size=size, preprocessing=scheme, embedding_dim=dim, feature_layer=feature_layer,
        notop_weights=WeightFile(f"rcmalli_vggface_tf_notop_{arch}.h5",
                                 f"{VGGFACE_RELEASE}rcmalli_vggface_tf_notop_{arch}.h5"),
        top_weights=WeightFile(f"rcmalli_vggface_tf_{arch}.h5",
                               f"{VGGFACE_RELEASE}rcmalli_vggface_tf_{arch}.h5"),
        blocks=blocks, top_layers=top_layers)


_RESNET_STAGES = ("conv1_", "conv2_", "conv3_", "conv4_", "conv5_")

BACKBONES: dict[str, Backbone] = {
    b.name: b for b in [
        _vggface("vgg16", 224, "vggface1", 512, "pool5",
                 ("conv1_", "conv2_", "conv3_", "conv4_", "conv5_"),
                 ("flatten", "fc6", "fc6/relu", "fc7", "fc7/relu", "fc8", "fc8/softmax")),
        # activation_49 / activation_81: the last ReLU before `avg_pool`, named as in Keras 2.
        _vggface("resnet50", 224, "vggface2", 2048, "activation_49", _RESNET_STAGES,
                 ("flatten_1", "classifier")),
        _vggface("senet50", 224, "vggface2", 2048, "activation_81", _RESNET_STAGES,
                 ("flatten_1", "classifier")),
        Backbone(name="dlib-resnet", family="dlib", builder="featurize.dlib_backbone:DlibExtractor",
                 input_size=150, preprocessing="dlib-5pt-chip", embedding_dim=128,
                 default_pool="none"),
    ]
}

# keras.applications: name -> (module, builder, input size, embedding size with avg pooling).
_KERAS_APPS = {
    "convnextbase": ("convnext", "ConvNeXtBase", 224, 1024),
    "convnextlarge": ("convnext", "ConvNeXtLarge", 224, 1536),
    "convnextsmall": ("convnext", "ConvNeXtSmall", 224, 768),
    "convnexttiny": ("convnext", "ConvNeXtTiny", 224, 768),
    "convnextxlarge": ("convnext", "ConvNeXtXLarge", 224, 2048),
    "densenet121": ("densenet", "DenseNet121", 224, 1024),
    "densenet169": ("densenet", "DenseNet169", 224, 1664),
    "densenet201": ("densenet", "DenseNet201", 224, 1920),
    "efficientnetb0": ("efficientnet", "EfficientNetB0", 224, 1280),
    "efficientnetb1": ("efficientnet", "EfficientNetB1", 240, 1280),
    "efficientnetb2": ("efficientnet", "EfficientNetB2", 260, 1408),
    "efficientnetb3": ("efficientnet", "EfficientNetB3", 300, 1536),
    "efficientnetb4": ("efficientnet", "EfficientNetB4", 380, 1792),
    "efficientnetb5": ("efficientnet", "EfficientNetB5", 456, 2048),
    "efficientnetb6": ("efficientnet", "EfficientNetB6", 528, 2304),
    "efficientnetb7": ("efficientnet", "EfficientNetB7", 600, 2560),
    "efficientnetv2b0": ("efficientnet_v2", "EfficientNetV2B0", 224, 1280),
    "efficientnetv2b1": ("efficientnet_v2", "EfficientNetV2B1", 240, 1280),
    "efficientnetv2b2": ("efficientnet_v2", "EfficientNetV2B2", 260, 1408),
    "efficientnetv2b3": ("efficientnet_v2", "EfficientNetV2B3", 300, 1536),
    "efficientnetv2l": ("efficientnet_v2", "EfficientNetV2L", 480, 1280),
    "efficientnetv2m": ("efficientnet_v2", "EfficientNetV2M", 480, 1280),
    "efficientnetv2s": ("efficientnet_v2", "EfficientNetV2S", 384, 1280),
    "inceptionresnetv2": ("inception_resnet_v2", "InceptionResNetV2", 299, 1536),
    "inceptionv3": ("inception_v3", "InceptionV3", 299, 2048),
    "mobilenet": ("mobilenet", "MobileNet", 224, 1024),
    "mobilenetv2": ("mobilenet_v2", "MobileNetV2", 224, 1280),
    "nasnetlarge": ("nasnet", "NASNetLarge", 331, 4032),
    "nasnetmobile": ("nasnet", "NASNetMobile", 224, 1056),
    "resnet50": ("resnet50", "ResNet50", 224, 2048),
    "resnet101": ("resnet", "ResNet101", 224, 2048),
    "resnet152": ("resnet", "ResNet152", 224, 2048),
    "resnet50v2": ("resnet_v2", "ResNet50V2", 224, 2048),
    "resnet101v2": ("resnet_v2", "ResNet101V2", 224, 2048),
    "resnet152v2": ("resnet_v2", "ResNet152V2", 224, 2048),
    "vgg16": ("vgg16", "VGG16", 224, 512),
    "vgg19": ("vgg19", "VGG19", 224, 512),
    "xception": ("xception", "Xception", 299, 2048),
}
# Blocks for fine-tuning where the application names them plainly.
_KERAS_BLOCKS = {
    "vgg16": tuple(f"block{i}_" for i in range(1, 6)),
    "vgg19": tuple(f"block{i}_" for i in range(1, 6)),
    **{n: tuple(f"conv{i}_" for i in range(1, 6))
       for n in ("resnet50", "resnet101", "resnet152", "resnet50v2", "resnet101v2", "resnet152v2")},
    "mobilenetv2": tuple(f"block_{i}_" for i in range(1, 17)) + ("Conv_1",),
    **{f"efficientnetb{i}": ("stem_",) + tuple(f"block{j}" for j in range(1, 8)) + ("top_",)
       for i in range(8)},
    **{f"efficientnetv2{v}": ("stem_",) + tuple(f"block{j}" for j in range(1, 7 + (v in "ml")))
       + ("top_",) for v in ("b0", "b1", "b2", "b3", "s", "m", "l")},
    **{n: tuple(f"conv{i}_" for i in range(1, 6)) for n in ("densenet121", "densenet169", "densenet201")},
    "xception": tuple(f"block{i}_" for i in range(1, 15)),
}

_KERAS_MIN_SIZES = {"inceptionv3": 75, "inceptionresnetv2": 75, "xception": 71}

for _name, (_module, _func, _size, _dim) in _KERAS_APPS.items():
    BACKBONES.setdefault(_name, Backbone(
        name=_name, family="keras", builder=f"keras.applications.{_module}:{_func}",
        input_size=_size, preprocessing=f"keras.applications.{_module}", embedding_dim=_dim,
        blocks=_KERAS_BLOCKS.get(_name, ()), min_input_size=_KERAS_MIN_SIZES.get(_name, 32)))

DEFAULT_BACKBONE = "vggface-resnet50"


def get_backbone(name: str) -> Backbone:
    """The spec for `name`; case and underscores are ignored (`mobilenet_v2` works).

    A path to a `.keras` model is a backbone too: it gets raw 0-255 pixels (put any scaling
    inside the model) and its output, pooled if spatial, is the embedding.
    """
    if name.endswith(".keras"):
        return keras_file_backbone(name)
    key = name.lower().replace("_", "")
    for spec in BACKBONES.values():
        if spec.name.replace("_", "") == key:
            return spec
    close = difflib.get_close_matches(name.lower(), BACKBONES, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UserError(f"unknown backbone {name!r}.{hint} Known: {', '.join(BACKBONES)} "
                    "(python -m featurize --list-backbones).")


def keras_file_backbone(path: str) -> Backbone:
    """A spec for a user's `.keras` model, read from the archive's config (no Keras import)."""
    import json
    import os
    import zipfile
    full = os.path.abspath(path)
    try:
        with zipfile.ZipFile(full) as archive:
            config = json.loads(archive.read("config.json"))
        layers = config["config"]["layers"]
        shape = layers[0]["config"]["batch_shape"]
        size = int(shape[1])
        names = [layer["config"]["name"] for layer in layers]
    except (OSError, KeyError, ValueError, IndexError, TypeError, zipfile.BadZipFile):
        raise UserError(f"{path} is not a readable Keras 3 model (.keras with an input layer); "
                        "save your base with model.save('base.keras').") from None
    blocks = tuple(dict.fromkeys(n.split("_")[0] + "_" for n in names[1:] if "_" in n))
    return Backbone(name=full, family="file", builder=full, input_size=size,
                    preprocessing="none", embedding_dim=0, blocks=blocks)
