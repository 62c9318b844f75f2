"""The `Family` base class: what every backbone family shares.

A family (VGGFace, Keras application, dlib, a user's .keras file) is one object that knows
how to build its architecture, resolve and load its weights, and make its extractor. The
rest of the package asks the family instead of switching on a name, so a new family is one
new module here and one line in `featurize.models.families`. Nothing here imports Keras.
"""

from __future__ import annotations

from pathlib import Path

from featurize.errors import UserError
from featurize.models.inputs import model_input
from featurize.models.specs import FINETUNED_BASE_WEIGHTS, Backbone, builder_of


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
        from featurize.models.weights import Weights, local_file
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
        from featurize.models.keras import KerasExtractor, import_keras
        import_keras()
        return KerasExtractor(settings, weights)

    def prepare_pixels(self, settings, pixels):
        """What the extractor's `prepare` makes of in-memory RGB pixels."""
        from featurize.data.images import fit
        prepare = model_input(settings)
        if hasattr(prepare, "pixels"):  # --align: featurize.models.align.AlignedInput
            return prepare.pixels(pixels)
        if prepare.source is not None:
            return fit(pixels, prepare.source)
        return fit(pixels, prepare.size, prepare.crop)

    # --- fine-tuning -------------------------------------------------------------------------

    def check_finetune(self, spec: Backbone) -> None:
        """Raise a UserError if the family's backbones cannot be fine-tuned."""

    def save_finetuned_base(self, base, path_of) -> None:
        """Write a fine-tuned base into a run; `path_of(file name)` is where a file goes."""
        base.save_weights(path_of(FINETUNED_BASE_WEIGHTS))

    def finetuned_source(self, settings, run_dir: Path) -> tuple[str, str]:
        """(backbone, weights) that featurize a dataset with the base saved in `run_dir`."""
        return settings.backbone, str(run_dir / FINETUNED_BASE_WEIGHTS)
