"""The registry of backbones: one spec per backbone, so nothing about one is written twice.

Families register themselves (`register_family`, called by `featurize.models.families` when
the models package is imported); each family lists its backbones. A spec says where the
architecture and its weights come from, the input size, the preprocessing and the default
embedding; its family knows how to build it, load its weights and make its extractor. Specs
name builders as "module:function" strings, so listing backbones and checking the cache
never imports Keras (a cache hit must be fast).
"""

from __future__ import annotations

import difflib

from featurize.errors import UserError

DEFAULT_BACKBONE = "vggface-resnet50"
FAMILIES: dict = {}  # family name -> Family, in listing order
BACKBONES: dict = {}  # backbone name -> Backbone, in listing order


def register_family(family) -> None:
    """Add a `featurize.models.families.base.Family` and its backbones to the registry. A
    family or backbone name already registered is a ValueError (nothing is replaced)."""
    if not family.name or family.name in FAMILIES:
        raise ValueError(f"family: a backbone family named {family.name!r} is already "
                         "registered; give the new family another name.")
    specs = list(family.backbones())
    taken = [spec.name for spec in specs if spec.name in BACKBONES]
    if taken or len({s.name for s in specs}) != len(specs):
        raise ValueError(f"family: backbone names {taken or [s.name for s in specs]} are "
                         "already registered; give the new backbones other names.")
    FAMILIES[family.name] = family
    for spec in specs:
        BACKBONES[spec.name] = spec


def get_backbone(name: str):
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


def spec_of(settings):
    """The spec of an `EmbeddingSettings`' backbone."""
    return get_backbone(settings.backbone)


def keras_file_backbone(path: str):
    """A spec for a user's `.keras` model, read from the archive's config (no Keras import)."""
    return FAMILIES["file"].from_path(path)
