"""keras-vggface's VGG16, ResNet50 and SENet50 (Keras 3 ports in `featurize.vggface`), with
the weights of the keras-vggface v2.0 release (Keras 2 .h5 files, downloaded once)."""

from __future__ import annotations

from featurize.errors import UserError
from featurize.models.families.base import Family
from featurize.models.specs import (
    VGGFACE_CACHE_SUBDIR,
    VGGFACE_RELEASE,
    Backbone,
    CropProtocol,
    WeightFile,
    builder_of,
    keras_layer_name,
)

_RESNET_STAGES = ("conv1_", "conv2_", "conv3_", "conv4_", "conv5_")

# VGGFace2 (resnet50, senet50): Cao et al., "VGGFace2: a dataset for recognising faces across
# pose and age", FG 2018, and the models' README (github.com/ox-vgg/vgg_face2): the face
# detector's box extended by a factor 0.3, the shorter side resized to 256, the centre
# 224x224 crop (the random crop of training, centred at test time).
VGGFACE2_CROP = CropProtocol(0.3, 256, 224, source="Cao et al. 2018 (VGGFace2), ox-vgg/vgg_face2")
# VGGFace (vgg16): Parkhi, Vedaldi and Zisserman, "Deep Face Recognition", BMVC 2015, sec. 4.3:
# training images rescaled so that the smaller side is 256, 224x224 patches cropped from them
# (centred at test time), from the face detector's box. The paper gives no number for the
# margin around the box, so the VGGFace2 margin (0.3) is used: a loosely cropped face, as
# both datasets' images are.
VGGFACE1_CROP = CropProtocol(0.3, 256, 224, source="Parkhi et al. 2015 (VGGFace), sec. 4.3")


class VGGFace(Family):
    name = "vggface"
    weights_source = "keras-vggface v2.0 release (~/.keras/models/vggface)"
    face = True

    def backbones(self) -> list[Backbone]:
        return [
            self._spec("vgg16", "vggface1", 512, "pool5",
                       ("conv1_", "conv2_", "conv3_", "conv4_", "conv5_"),
                       ("flatten", "fc6", "fc6/relu", "fc7", "fc7/relu", "fc8", "fc8/softmax")),
            # activation_49 / activation_81: the last ReLU before `avg_pool`, named as in Keras 2.
            self._spec("resnet50", "vggface2", 2048, "activation_49", _RESNET_STAGES,
                       ("flatten_1", "classifier")),
            self._spec("senet50", "vggface2", 2048, "activation_81", _RESNET_STAGES,
                       ("flatten_1", "classifier")),
        ]

    def _spec(self, arch, scheme, dim, feature_layer, blocks, top_layers) -> Backbone:
        return Backbone(
            crop_protocol=VGGFACE1_CROP if scheme == "vggface1" else VGGFACE2_CROP, align="dlib",
            name=f"vggface-{arch}", family=self, builder=f"featurize.models.vggface:vggface_{arch}",
            input_size=224, preprocessing=scheme, embedding_dim=dim, feature_layer=feature_layer,
            notop_weights=WeightFile(f"rcmalli_vggface_tf_notop_{arch}.h5",
                                     f"{VGGFACE_RELEASE}rcmalli_vggface_tf_notop_{arch}.h5"),
            top_weights=WeightFile(f"rcmalli_vggface_tf_{arch}.h5",
                                   f"{VGGFACE_RELEASE}rcmalli_vggface_tf_{arch}.h5"),
            blocks=blocks, top_layers=top_layers)

    def layer_name(self, name: str) -> str:
        return keras_layer_name(name)

    def build(self, spec: Backbone, include_top: bool, input_size: int, imagenet: bool):
        builder = builder_of(spec)
        # the top's dense layers fix the input size; keras-vggface's builders choose it then
        return builder(include_top=include_top,
                       input_shape=None if include_top else (input_size, input_size, 3))

    def default_weights(self, spec: Backbone, include_top: bool, download: bool):
        from featurize.models.weights import (
            NO_DOWNLOAD,
            Weights,
            download_weights,
            file_sha256,
            keras_home,
        )
        wf = spec.top_weights if include_top else spec.notop_weights
        path = keras_home() / VGGFACE_CACHE_SUBDIR / wf.filename
        if not path.is_file():
            if not download:
                raise UserError(f"weights {path} are not present; run featurize once with "
                                f"network access, or download {wf.url} to that path, "
                                f"{NO_DOWNLOAD}.")
            download_weights(wf)
        return Weights("file", str(path), file_sha256(path))

    def load_weights(self, model, spec: Backbone, weights) -> None:
        if weights.kind == "file" and not weights.path.endswith(".weights.h5"):
            from featurize.models.weights import load_keras2_h5
            load_keras2_h5(model, weights.path, keras_layer_name)  # the release's Keras 2 files
            return
        super().load_weights(model, spec, weights)
