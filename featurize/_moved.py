"""Old module paths, kept importable for one release with a DeprecationWarning.

The modules moved into layers (featurize.data, .models, .runtimes, .cache, .engines, .jobs).
`import featurize.extractor` (or `from featurize.run import featurize`) still works: it
gives a module whose names are looked up in the new modules listed here, and warns once
where the names live now. Only names under featurize and classify that no real module
provides reach this finder, so it changes nothing else about importing.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old module -> the modules its names live in now (searched in this order)
MOVED = {
    "featurize.extractor": ("featurize.models.config", "featurize.settings",
                            "featurize.models.keras", "featurize.runtimes"),
    "featurize.images": ("featurize.data.images",),
    "featurize.download": ("featurize.data.download",),
    "featurize.preprocessing": ("featurize.models.preprocessing",),
    "featurize.weights": ("featurize.models.weights", "featurize.models.specs"),
    "featurize.backbones": ("featurize.models.registry", "featurize.models.specs"),
    "featurize.families": ("featurize.models.families", "featurize.models.registry",
                           "featurize.models.specs"),
    "featurize.families.base": ("featurize.models.families.base", "featurize.models.specs"),
    "featurize.dlib_backbone": ("featurize.models.dlib_backbone",),
    "featurize.align": ("featurize.models.align",),
    "featurize.pipeline": ("featurize.engines.pipeline",),
    "featurize.ray_engine": ("featurize.engines.ray_data",),
    "featurize.run": ("featurize.jobs.run",),
    "featurize.export": ("featurize.jobs.export",),
    "featurize.compact": ("featurize.cache",),
    "featurize.map": ("featurize.jobs.map",),
    "featurize.verify": ("featurize.jobs.verify",),
    "featurize.doctor": ("featurize.jobs.doctor",),
    "classify.runs": ("classify._runs",),
    "classify.heads": ("classify._heads",),
    "classify.options": ("classify._options",),
    "classify.data": ("classify._data",),
    "classify.openset": ("classify._openset",),
    "classify.report": ("classify._report",),
    "classify.html": ("classify._html",),
    "classify.api": ("classify",),
}


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name in MOVED:
            return importlib.util.spec_from_loader(name, self, is_package=False)
        return None

    def create_module(self, spec):
        return None  # a plain module

    def exec_module(self, module):
        name = module.__name__
        targets = MOVED[name]
        warnings.warn(f"{name} is deprecated; import from {' or '.join(targets)} (or the "
                      "package's public names) instead.", DeprecationWarning, stacklevel=3)

        def __getattr__(attr):
            for target in targets:
                value = getattr(importlib.import_module(target), attr, _MISSING)
                if value is not _MISSING:
                    return value
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        module.__getattr__ = __getattr__


_MISSING = object()
_FINDER = _Finder()


def install() -> None:
    """Put the finder last on sys.meta_path (once): it answers only for the old names."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_FINDER)
