"""Run a frozen pretrained backbone once per image and cache the embeddings to HDF5.

The Python API (see featurize.api):

    import featurize
    embedder = featurize.Embedder("vggface-vgg16")
    X = embedder(["a.jpg", "b.jpg"])                 # (2, 512) float32, like the cache's rows
    cache = featurize.embed_folder("data/lfw", embedder)
    cache = featurize.open_cache("data/cache/FILE.h5")  # .X .y .paths .classes .to_pandas()
    report = featurize.verify_cache(cache.path, sample=20)  # python -m featurize verify
    featurize.compact_cache(cache.path)                 # python -m featurize compact
    featurize.export_cache(cache.path, "out", "parquet")  # python -m featurize export
    featurize.fetch_lfw("data/lfw")                     # python -m featurize.datasets lfw

Names are imported on first use, so `import featurize` stays cheap (no Keras, no TensorFlow).

The package is layered; each layer imports only from the ones before it:
settings/errors/atomic -> data -> models -> runtimes -> cache -> engines -> jobs -> api, cli,
estimators (tests/test_layers.py checks it). Old module paths (featurize.extractor,
featurize.run...) still import, with a DeprecationWarning (featurize._moved).
"""

from __future__ import annotations

import importlib

from featurize import _moved

_moved.install()

# public name -> the submodule that defines it
_EXPORTS = {
    "Embedder": "api",
    "embed_folder": "api",
    "open_cache": "api",
    "compact_cache": "api",
    "export_cache": "api",
    "EmbedderConfig": "models.config",
    "EmbeddingSettings": "settings",
    "FeaturizeOptions": "jobs.run",
    "RunOptions": "jobs.run",
    "Summary": "jobs.run",
    "Cache": "cache",
    "UserError": "errors",
    "EmbeddingTransformer": "estimators",
    "verify_cache": "jobs.verify",
    "fetch_lfw": "data.datasets",
    "build_extractor": "runtimes",
    "register_family": "models.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'featurize' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
