"""dlib's ResNet face descriptor (`featurize.models.dlib_backbone`): not a Keras model; it aligns a
150x150 face chip per image itself, in worker processes."""

from __future__ import annotations

from featurize.errors import UserError
from featurize.models.families.base import Family
from featurize.models.specs import Backbone


class Dlib(Family):
    name = "dlib"
    weights_source = "dlib model from the face-recognition-models package"
    face = True
    per_image = True
    thread_safe = False  # dlib is not thread-safe, and its models are shared in a process

    def backbones(self) -> list[Backbone]:
        return [Backbone(name="dlib-resnet", family=self,
                         builder="featurize.models.dlib_backbone:DlibExtractor", input_size=150,
                         preprocessing="dlib-5pt-chip", embedding_dim=128, default_pool="none",
                         align="dlib")]

    def build(self, spec, include_top, input_size, imagenet):
        raise UserError(f"{spec.name} is not a Keras model; use a Keras backbone.")

    def default_weights(self, spec: Backbone, include_top: bool, download: bool):
        from featurize.models.dlib_backbone import model_path
        from featurize.models.weights import Weights, file_sha256
        path = model_path()
        return Weights("dlib", str(path), file_sha256(path))

    def check_options(self, spec: Backbone, config) -> None:
        if (config.layer or config.pool or config.input_size or config.flip or config.crop
                or config.resize == "device" or config.source_size):
            raise UserError("dlib-resnet takes no --layer/--pool/--input-size/--flip/--crop/"
                            "--resize: it aligns a 150x150 face chip itself (use --jitter N "
                            "to average).")
        if config.align == "none":
            raise UserError("dlib-resnet always aligns its face chip itself (--align dlib is "
                            "built in); drop --align none.")

    def make_extractor(self, settings, weights):
        from featurize.models.dlib_backbone import DlibExtractor
        return DlibExtractor(settings, weights)

    def prepare_pixels(self, settings, pixels):
        from featurize.models.dlib_backbone import describe_rgb, jitter_scheme
        return describe_rgb(pixels, settings.jitter, jitter_scheme(settings))

    def check_finetune(self, spec: Backbone) -> None:
        raise UserError("dlib-resnet is not a Keras model and cannot be fine-tuned; use a "
                        "Keras backbone.")
