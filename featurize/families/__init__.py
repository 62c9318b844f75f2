"""The registry of backbone families, in listing order.

To add a family: write a module here with a `Family` subclass (see `base.Family`: `build`,
`default_weights`, and whatever else differs from a Keras model whose weights are a file)
whose `backbones()` returns its specs, and add one line below.
"""

from __future__ import annotations

from .base import (FINETUNED_BASE_FILE, FINETUNED_BASE_WEIGHTS, Backbone, CropProtocol, Family,
                   WeightFile)
from .dlib import Dlib
from .keras_apps import KerasApplication
from .keras_file import KerasFile
from .vggface import VGGFace

FAMILIES: dict[str, Family] = {f.name: f for f in [
    VGGFace(),
    Dlib(),
    KerasApplication(),
    KerasFile(),
]}

__all__ = ["FAMILIES", "FINETUNED_BASE_FILE", "FINETUNED_BASE_WEIGHTS", "Backbone", "CropProtocol",
           "Family", "WeightFile"]
