"""Input preprocessing as a Keras layer at the front of every model.

Putting it inside the model is what makes double preprocessing impossible: the pipeline,
predict and fine-tune all feed raw RGB uint8 pixels, and the saved `.keras` model carries
its own preprocessing.
"""

from __future__ import annotations

import importlib

import keras
from keras import ops

# keras-vggface `utils.preprocess_input`: RGB -> BGR, then subtract the BGR channel means.
VGGFACE_BGR_MEANS = {
    "vggface1": (93.5940, 104.7624, 129.1863),  # vgg16 (VGGFace)
    "vggface2": (91.4953, 103.8827, 131.0912),  # resnet50 / senet50 (VGGFace2)
}


@keras.saving.register_keras_serializable(package="featurize")
class ImagePreprocessing(keras.layers.Layer):
    """Raw RGB pixels (0-255, any dtype) -> what the backbone was trained on.

    scheme: "vggface1", "vggface2", "none", or "keras.applications.<module>" for a Keras
    application's own `preprocess_input`.
    """

    def __init__(self, scheme: str, **kwargs):
        super().__init__(**kwargs)
        if scheme not in VGGFACE_BGR_MEANS and scheme != "none" and not scheme.startswith(
                "keras.applications."):
            raise ValueError(f"unknown preprocessing scheme {scheme!r}")
        self.scheme = scheme

    def call(self, x):
        x = ops.cast(x, "float32")
        if self.scheme in VGGFACE_BGR_MEANS:
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(VGGFACE_BGR_MEANS[self.scheme])
        if self.scheme == "none":
            return x
        module = importlib.import_module(self.scheme)
        return module.preprocess_input(x)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "scheme": self.scheme}
