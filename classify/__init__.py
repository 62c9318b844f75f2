"""Train, evaluate, save and use classifier heads on a featurize cache.

The Python API (classify/_api.py): `classify.train(cache, head, params, save_to=None) -> Run`,
`Run.predict`, `Run.predict_proba`, `Run.save`, `Run.load`, `classify.verify(...) ->
Verification`, `classify.finetune(run) -> Run`, `classify.predict(images, run)` (the
command line's top-k dicts), `classify.search(images_or_X, cache, k)` and `Gallery` (gallery
search), and the options dataclasses `TrainOptions` and
`FinetuneOptions`, and `register_head` (a head of your own). They are plain attributes of the
package, imported on first use: `import classify` loads neither scikit-learn nor Keras. The
implementation modules are private (`classify/_train.py`...); the command line is
`classify.cli`.
"""

import importlib

import featurize._moved

# public name -> the private module that defines it
_EXPORTS = {name: "_api" for name in ("train", "predict", "verify", "finetune", "Run",
                                      "Verification", "TrainOptions", "FinetuneOptions",
                                      "runs_table", "search", "Gallery", "SearchOptions")}
_EXPORTS.update(register_head="_heads", HeadSpec="_heads")
_EXPORTS.update(serve="_serve", create_app="_serve", ServeOptions="_serve")
__all__ = sorted(_EXPORTS)
featurize._moved.install()  # old module paths (classify.runs...) warn and still work


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
