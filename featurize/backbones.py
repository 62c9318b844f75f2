"""The registry of backbones: one spec per backbone, so nothing about one is written twice.

A spec says where the architecture and its weights come from, the input size, the
preprocessing and the default embedding; its family (`featurize.families`) knows how to
build it, load its weights and make its extractor. Specs name builders as "module:function"
strings so that listing backbones and checking the cache never imports Keras (a cache hit
must be fast).
"""

from __future__ import annotations

import difflib

from .errors import UserError
from .families import FAMILIES, Backbone, WeightFile
from .families.vggface import (VGGFACE_CACHE_SUBDIR, VGGFACE_LABEL_FILES, VGGFACE_RELEASE,
                               keras_layer_name)

__all__ = ["BACKBONES", "DEFAULT_BACKBONE", "VGGFACE_CACHE_SUBDIR", "VGGFACE_LABEL_FILES",
           "VGGFACE_RELEASE", "Backbone", "WeightFile", "get_backbone", "keras_file_backbone",
           "keras_layer_name"]

BACKBONES: dict[str, Backbone] = {}
for _family in FAMILIES.values():
    for _spec in _family.backbones():
        BACKBONES.setdefault(_spec.name, _spec)

DEFAULT_BACKBONE = "vggface-resnet50"


def get_backbone(name: str) -> Backbone:
    """The spec for `name`; case and underscores are ignored (`mobilenet_v2` works).

    A path to a `.keras` model is a backbone too: it gets raw 0-255 pixels (put any scaling
    inside the model) and its output, pooled if spatial, is the embedding.
    """
    for family in FAMILIES.values():
        spec = family.from_name(name)
        if spec is not None:
            return spec
    key = name.lower().replace("_", "")
    for spec in BACKBONES.values():
        if spec.name.replace("_", "") == key:
            return spec
    close = difflib.get_close_matches(name.lower(), BACKBONES, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UserError(f"unknown backbone {name!r}.{hint} Known: {', '.join(BACKBONES)} "
                    "(python -m featurize --list-backbones).")


def keras_file_backbone(path: str) -> Backbone:
    """A spec for a user's `.keras` model, read from the archive's config (no Keras import)."""
    return FAMILIES["file"].from_path(path)
