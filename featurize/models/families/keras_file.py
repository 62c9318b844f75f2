"""A user's own Keras 3 model saved as a `.keras` file: the path is the backbone's name, the
file carries the architecture and the weights, and fixes the input size."""

from __future__ import annotations

import os
from pathlib import Path

from featurize.errors import UserError
from featurize.models.families.base import Family
from featurize.models.specs import FINETUNED_BASE_FILE, Backbone


class KerasFile(Family):
    name = "file"
    weights_source = "the .keras file itself"

    def from_name(self, name: str) -> Backbone | None:
        return self.from_path(name) if name.endswith(".keras") else None

    def from_path(self, path: str) -> Backbone:
        """A spec read from the archive's config (no Keras import)."""
        import json
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
            raise UserError(f"{path} is not a readable Keras 3 model (.keras with an input "
                            "layer); save your base with model.save('base.keras').") from None
        blocks = tuple(dict.fromkeys(n.split("_")[0] + "_" for n in names[1:] if "_" in n))
        return Backbone(name=full, family=self, builder=full, input_size=size,
                        preprocessing="none", embedding_dim=0, blocks=blocks)

    def short_name(self, spec: Backbone) -> str:
        return Path(spec.name).stem

    def build(self, spec, include_top, input_size, imagenet):
        import keras
        return keras.saving.load_model(spec.builder, compile=False, safe_mode=True)

    def resolve(self, spec: Backbone, weights: str, include_top: bool, download: bool):
        from featurize.models.weights import Weights, file_sha256
        if weights != "default":
            raise UserError(f"a .keras backbone carries its weights; drop --weights {weights}.")
        return Weights("file", spec.builder, file_sha256(Path(spec.builder)))

    def load_weights(self, model, spec, weights) -> None:
        """The weights came with the model from the file."""

    def check_input_size(self, spec: Backbone, input_size: int) -> None:
        if input_size != spec.input_size:
            raise UserError(f"--input-size {input_size}: the model {spec.name} takes "
                            f"{spec.input_size}x{spec.input_size} images; drop --input-size.")

    def save_finetuned_base(self, base, path_of) -> None:
        base.save(path_of(FINETUNED_BASE_FILE))  # the architecture is the user's: keep it whole

    def finetuned_source(self, settings, run_dir: Path) -> tuple[str, str]:
        return str(run_dir / FINETUNED_BASE_FILE), "default"
