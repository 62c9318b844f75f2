"""keras.applications backbones, with Keras's own ImageNet weights (its download)."""

from __future__ import annotations

from featurize.models.families.base import Family
from featurize.models.specs import Backbone, builder_of

# name -> (module, builder, input size, embedding size with avg pooling).
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
    **{n: tuple(f"conv{i}_" for i in range(1, 6))
       for n in ("densenet121", "densenet169", "densenet201")},
    "xception": tuple(f"block{i}_" for i in range(1, 15)),
}
_KERAS_MIN_SIZES = {"inceptionv3": 75, "inceptionresnetv2": 75, "xception": 71}


class KerasApplication(Family):
    name = "keras"
    weights_source = "ImageNet, through keras.applications"

    def backbones(self) -> list[Backbone]:
        return [Backbone(name=name, family=self, builder=f"keras.applications.{module}:{func}",
                         input_size=size, preprocessing=f"keras.applications.{module}",
                         embedding_dim=dim, blocks=_KERAS_BLOCKS.get(name, ()),
                         min_input_size=_KERAS_MIN_SIZES.get(name, 32))
                for name, (module, func, size, dim) in _KERAS_APPS.items()]

    def build(self, spec: Backbone, include_top: bool, input_size: int, imagenet: bool):
        builder = builder_of(spec)
        kwargs = {"input_shape": (input_size, input_size, 3)} if not include_top else {}
        return builder(include_top=include_top, weights="imagenet" if imagenet else None, **kwargs)

    def default_weights(self, spec: Backbone, include_top: bool, download: bool):
        from featurize.models.weights import Weights
        return Weights("imagenet")  # Keras downloads them when the model is built
