"""The records that describe a backbone: `Backbone` (one spec per backbone), its weight
files and its face-crop protocol, and the published files' names. Plain data: nothing here
imports Keras, and nothing here knows how to build a network (its family does).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

VGGFACE_RELEASE = "https://github.com/rcmalli/keras-vggface/releases/download/v2.0/"
VGGFACE_CACHE_SUBDIR = "models/vggface"  # under KERAS_HOME (~/.keras), as keras-vggface uses
# Identity names of the same release, by the number of classes of the top (decode_predictions).
VGGFACE_LABEL_FILES = {2622: "rcmalli_vggface_labels_v1.npy", 8631: "rcmalli_vggface_labels_v2.npy"}
FINETUNED_BASE_WEIGHTS = "finetuned_base.weights.h5"  # Keras 3 weights of a fine-tuned base
FINETUNED_BASE_FILE = "finetuned_base.keras"  # for a base given as a .keras file


@dataclass(frozen=True)
class WeightFile:
    filename: str
    url: str
    sha256: str | None = None  # upstream publishes none for keras-vggface; checked when set


@dataclass(frozen=True)
class CropProtocol:
    """How a face model's training crops were cut from a detected face (`--align dlib`): the
    detector's box grown by `enlarge` of its side on each side in total (0.3: 30% larger),
    the crop resized so its shorter side is `shorter_side`, then the centre `crop` x `crop`.
    `level_eyes`: also rotate so the two eyes (of the 5 landmarks) are level."""

    enlarge: float
    shorter_side: int
    crop: int
    level_eyes: bool = True
    source: str = ""  # where the protocol is published


@dataclass(frozen=True)
class Backbone:
    name: str
    # a featurize.models.families.base.Family: what knows how to build, load and embed with it
    family: Any
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
    # Face models: the crop their training images had (`--align dlib` cuts it), and the
    # `--align` preset recommended for them ("none": images are used as they are).
    crop_protocol: CropProtocol | None = None
    align: str = "none"

    @property
    def short_name(self) -> str:
        """A name safe for files and Keras models (a .keras backbone's path -> its stem)."""
        return self.family.short_name(self)

    @property
    def weights_source(self) -> str:
        return self.family.weights_source

    def build(self, include_top: bool = False, input_size: int | None = None,
              imagenet: bool = False):
        """The architecture with random weights (`featurize.weights` loads the weights), or for
        a Keras application with its ImageNet weights through Keras's own download."""
        return self.family.build(self, include_top, input_size or self.input_size, imagenet)


def builder_of(spec: Backbone):
    """The function `spec.builder` ("module:function") names (imported only now)."""
    module, func = spec.builder.split(":")
    return getattr(importlib.import_module(module), func)


def keras_layer_name(name: str) -> str:
    """The Keras 3 name of a keras-vggface layer ("/" is not allowed in Keras 3)."""
    return name.replace("/", "_")




def is_top_layer(spec: Backbone, layer: str | None) -> bool:
    """Whether `layer` exists only with the classifier top (it needs include_top)."""
    return bool(layer) and keras_layer_name(layer) in {keras_layer_name(n) for n in spec.top_layers}
