"""Train, evaluate, save and use classifier heads on a featurize cache.

The Python API (see classify.api): `classify.train(cache, head, params, save_to=None) -> Run`,
`Run.predict`, `Run.predict_proba`, `Run.save`, `Run.load`, `classify.verify(...) ->
Verification`, `classify.finetune(run) -> Run`, `classify.predict(images, run)` (the
command line's top-k dicts), `classify.search(images_or_X, cache, k)` and `Gallery` (gallery
search), and the options dataclasses `TrainOptions` and
`FinetuneOptions`. They are imported on first use: `import classify` loads neither
scikit-learn nor Keras.
"""

import importlib
import sys
import types

_API = ("train", "predict", "verify", "finetune", "Run", "Verification", "TrainOptions",
        "FinetuneOptions", "runs_table", "search", "Gallery", "SearchOptions")
__all__ = list(_API)


def __getattr__(name):
    if name in _API:
        value = getattr(importlib.import_module(".api", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))


class _Package(types.ModuleType):
    """`classify.train` is the API function although classify/train.py exists (and likewise
    predict, verify, finetune): importing such a submodule would make the package attribute
    the module; that assignment is ignored here, and `from classify.train import ...` still
    finds the module through sys.modules."""

    def __setattr__(self, name, value):
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
