"""What every backbone family shares: the backbone spec, and the `Family` base class.

A family (VGGFace, Keras application, dlib, a user's .keras file) is one object that knows
how to build its architecture, resolve and load its weights, and make its extractor. The
rest of the package asks the family instead of switching on a name, so a new family is one
new module here and one line in `featurize.families.FAMILIES`. Nothing here imports Keras.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

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
    family: Family  # the object that knows how to build, load and embed with this backbone
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


class Family:
    """The behaviour of one backbone family; the defaults are those of a Keras model whose
    weights come from a file. Subclasses override what differs."""

    name = ""  # stored nowhere: caches and runs store the backbone's name, not this
    weights_source = ""
    face = False  # a face model: classify L2-normalises its embeddings by default
    per_image = False  # the extractor does all its work per image (no layer/pool/size options)
    thread_safe = True  # False: calls into its extractor are serialised in the process

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    def backbones(self) -> list[Backbone]:
        """The named backbones of the family, for the registry (in listing order)."""
        return []

    def from_name(self, name: str) -> Backbone | None:
        """A backbone the registry does not list but this family recognises (a path)."""
        return None

    def short_name(self, spec: Backbone) -> str:
        return spec.name

    def layer_name(self, name: str) -> str:
        """The Keras 3 name of a layer as users and the published files spell it."""
        return name

    def build(self, spec: Backbone, include_top: bool, input_size: int, imagenet: bool):
        """The architecture from `spec.builder` ("module:function")."""
        return builder_of(spec)(include_top=include_top, input_shape=(input_size, input_size, 3))

    # --- weights -----------------------------------------------------------------------------

    def resolve(self, spec: Backbone, weights: str, include_top: bool, download: bool):
        """`--weights` ("default", "none" or a path) as a `Weights`, without building anything."""
        from ..weights import Weights, local_file
        if weights == "none":
            return Weights("random")
        if weights != "default":
            return local_file(weights)
        return self.default_weights(spec, include_top, download)

    def default_weights(self, spec: Backbone, include_top: bool, download: bool):
        """`--weights default`: a family with published weights says where they are."""
        raise UserError(f"{spec.name} has no published weights; pass --weights PATH (a weight "
                        "file) or --weights none (seeded random weights).")

    def load_weights(self, model, spec: Backbone, weights) -> None:
        """Put file `weights` into a freshly built model (other kinds need nothing)."""
        if weights.kind != "file":
            return
        try:
            model.load_weights(weights.path)
        except Exception as e:  # Keras raises ValueError/KeyError/OSError for a wrong file
            raise UserError(f"weights file {weights.path} does not fit {spec.name}: "
                            f"{str(e).splitlines()[0][:200]}") from None

    # --- options and the extractor -----------------------------------------------------------

    def check_options(self, spec: Backbone, config) -> None:
        """Reject `EmbedderConfig` options the family cannot honour (before anything runs)."""
        if config.jitter:
            raise UserError("--jitter is for the dlib-resnet backbone only.")

    def check_input_size(self, spec: Backbone, input_size: int) -> None:
        """An --input-size within the architecture's range is fine for a built architecture."""

    def make_extractor(self, settings, weights):
        from ..extractor import KerasExtractor, import_keras
        import_keras()
        return KerasExtractor(settings, weights)

    def prepare_pixels(self, settings, pixels):
        """What the extractor's `prepare` makes of in-memory RGB pixels."""
        from ..images import fit
        model_input = settings.model_input
        if hasattr(model_input, "pixels"):  # --align: featurize.align.AlignedInput
            return model_input.pixels(pixels)
        if model_input.source is not None:
            return fit(pixels, model_input.source)
        return fit(pixels, model_input.size, model_input.crop)

    # --- fine-tuning -------------------------------------------------------------------------

    def check_finetune(self, spec: Backbone) -> None:
        """Raise a UserError if the family's backbones cannot be fine-tuned."""

    def save_finetuned_base(self, base, path_of) -> None:
        """Write a fine-tuned base into a run; `path_of(file name)` is where a file goes."""
        base.save_weights(path_of(FINETUNED_BASE_WEIGHTS))

    def finetuned_source(self, settings, run_dir: Path) -> tuple[str, str]:
        """(backbone, weights) that featurize a dataset with the base saved in `run_dir`."""
        return settings.backbone, str(run_dir / FINETUNED_BASE_WEIGHTS)
