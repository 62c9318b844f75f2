"""What the CPU does to each image file before a model sees it, from the settings: a
`ModelInput` (resize, centre crop), or with --align the face crop of the backbone's
protocol (`featurize.models.align.AlignedInput`)."""

from __future__ import annotations

from featurize.data.images import ModelInput
from featurize.models.registry import spec_of
from featurize.settings import EmbeddingSettings


def model_input(settings: EmbeddingSettings):
    """The picklable per-image function (file -> fixed-shape uint8 array) of the settings."""
    if settings.align != "none":
        from featurize.models.align import AlignedInput
        return AlignedInput(settings.input_size, spec_of(settings).crop_protocol)
    return ModelInput(settings.input_size, settings.crop or None, settings.device_source)
