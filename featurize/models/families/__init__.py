"""The backbone families, registered in listing order when `featurize.models` is imported.

To add a family: write a module here with a `Family` subclass (see `base.Family`: `build`,
`default_weights`, and whatever else differs from a Keras model whose weights are a file)
whose `backbones()` returns its specs, and register it below (or call
`featurize.models.registry.register_family` from your own package).
"""

from __future__ import annotations

from featurize.models.families.base import Family
from featurize.models.families.dlib import Dlib
from featurize.models.families.keras_apps import KerasApplication
from featurize.models.families.keras_file import KerasFile
from featurize.models.families.vggface import VGGFace
from featurize.models.registry import FAMILIES, register_family

for _family in (VGGFace(), Dlib(), KerasApplication(), KerasFile()):
    if _family.name not in FAMILIES:  # a reload of this module registers nothing twice
        register_family(_family)

__all__ = ["FAMILIES", "Family", "register_family"]
