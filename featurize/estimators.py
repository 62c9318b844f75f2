"""scikit-learn estimators over image files: `EmbeddingTransformer` turns paths into embeddings.

    from sklearn.pipeline import make_pipeline
    from sklearn.linear_model import LogisticRegression
    model = make_pipeline(EmbeddingTransformer("dlib-resnet"), LogisticRegression())
    model.fit(train_paths, train_labels).predict(test_paths)

Keras is imported (and the model built) only when an image has to be embedded: the first
`transform` that finds a path missing from `cache`.
"""

from __future__ import annotations

import json
import os
from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from featurize.data.images import Item
from featurize.engines.pipeline import batches
from featurize.errors import UserError
from featurize.models.align import ALIGNS
from featurize.models.config import make_settings
from featurize.runtimes import RUNTIMES, build_extractor, settle
from featurize.settings import MAX_JITTER, PRECISIONS, TTA_PRESETS

MAX_BATCH_SIZE = 8192  # as featurize's --batch-size
MAX_WORKERS = 256  # as featurize's --workers
_SHOWN = 5  # failed images named in an error message


class EmbeddingTransformer(TransformerMixin, BaseEstimator):
    """Image file paths in, an (N, D) float32 array of their embeddings out, in that order.

    The numbers are the ones `python -m featurize` stores for the same options (same
    extractor, same preprocessing). With `cache` (a cache file made by featurize with the
    same settings) the rows of files it holds, unchanged since (same size and mtime), are
    taken from it instead of being computed again; the cache is only read, never written.
    A file that cannot be embedded is an error naming it.

    Parameters are those of `featurize.Embedder` and `python -m featurize` (`--backbone`,
    `--weights`, `--layer`, `--pool`, `--input-size`, `--crop`, `--flip`, `--precision`,
    `--align`, `--tta`, `--jitter`, `--runtime`, `--batch-size`, `--workers`: decoding
    threads or processes); `runtime` None runs where the cache's rows were made (or the
    fastest faithful runtime installed, without a cache).
    `fit` checks them and resolves the weights (downloading them once) but builds no model:
    that happens on the first `transform` that needs one. The model is not pickled: a copy
    builds it again. Under GridSearchCV every fold's clone does, so give it a `cache` of the
    images (made by `python -m featurize`): a full cache hit builds nothing.

    scikit-learn's `check_estimator` is not meaningful here: its checks feed numeric arrays,
    and this transformer's input is a list of image files. tests/test_estimators.py runs
    the checks of the estimator API itself (parameters, cloning, tags, repr) instead.
    """

    _parameter_constraints = {
        "backbone": [str, os.PathLike],
        "weights": [str, os.PathLike],
        "layer": [str, None],
        "pool": [StrOptions({"avg", "max"}), None],
        "input_size": [Interval(Integral, 1, None, closed="left"), None],
        "batch_size": [Interval(Integral, 1, MAX_BATCH_SIZE, closed="both")],
        "cache": [str, os.PathLike, None],
        "workers": [Interval(Integral, 1, MAX_WORKERS, closed="both"), None],
        "crop": [Interval(Real, 0, 1, closed="right"), None],
        "flip": ["boolean"],
        "precision": [StrOptions(set(PRECISIONS) - {"int8"})],
        "align": [StrOptions(set(ALIGNS)), None],
        "tta": [StrOptions(set(TTA_PRESETS)), None],
        "jitter": [Interval(Integral, 0, MAX_JITTER, closed="both")],
        "runtime": [StrOptions(set(RUNTIMES)), None],
    }

    def __init__(self, backbone="vggface-resnet50", weights="default", layer=None, pool=None,
                 input_size=None, batch_size=32, cache=None, workers=None, crop=None,
                 flip=False, precision="float32", align=None, tta=None, jitter=0,
                 runtime=None):
        self.backbone, self.weights, self.layer, self.pool = backbone, weights, layer, pool
        self.input_size, self.batch_size, self.cache = input_size, batch_size, cache
        self.workers, self.crop, self.flip, self.precision = workers, crop, flip, precision
        self.align, self.tta, self.jitter, self.runtime = align, tta, jitter, runtime

    def fit(self, X=None, y=None):
        """Check the parameters, resolve the weights and check `cache` against them."""
        self._validate_params()
        settings, weights = make_settings(
            backbone=os.fspath(self.backbone), weights=os.fspath(self.weights),
            layer=self.layer, pool=self.pool, input_size=self.input_size, crop=self.crop,
            flip=self.flip, precision=self.precision, align=self.align, tta=self.tta,
            jitter=self.jitter)
        settings = settle(settings, self.runtime)  # mixed: bfloat16 on OpenVINO, as featurize
        if getattr(self, "settings_", None) != settings:
            self.__dict__.pop("_extractor", None)  # made for other settings
        self.settings_, self.weights_ = settings, weights
        if self.cache is not None:
            _check_cache_settings(self.cache, settings)
        return self

    def transform(self, X) -> np.ndarray:
        """The (len(X), D) float32 embeddings of the image files X, in X's order."""
        check_is_fitted(self)
        paths = _as_paths(X)
        _check_exist(paths)
        rows = _cached_rows(self.cache, self.settings_, paths) if self.cache is not None else {}
        todo = list(dict.fromkeys(p for p in paths if p not in rows))  # each file once
        if todo:
            rows.update(self._embed(todo))
        return np.stack([rows[p] for p in paths]).astype(np.float32, copy=False)

    def _embed(self, paths: list[str]) -> dict[str, np.ndarray]:
        extractor = self._get_extractor()
        items = [Item(p, p, None, *_fingerprint(p)) for p in paths]
        rows, failed = {}, []
        for batch in batches(items, extractor, self.batch_size, self.workers):
            rows.update((item.key, row.copy()) for item, row in zip(batch.items, batch.embeddings))
            failed += [(item.key, reason) for item, reason in batch.failed]
        if failed:
            shown = "; ".join(f"{path}: {reason}" for path, reason in failed[:_SHOWN])
            more = f" and {len(failed) - _SHOWN} more" if len(failed) > _SHOWN else ""
            raise UserError(f"{len(failed)} of {len(paths)} image(s) could not be embedded "
                            f"({shown}{more}); remove them from X or replace those files.")
        return rows

    def _get_extractor(self):
        extractor = self.__dict__.get("_extractor")
        if extractor is None:
            runtime = self.runtime or _cache_runtime(self.cache)
            extractor = self._extractor = build_extractor(self.settings_, self.weights_, runtime)
        return extractor

    # The Keras model is not pickled: a copy (a saved pipeline, a worker of GridSearchCV's
    # n_jobs) builds it again on its first transform.
    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_extractor", None)
        return state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.one_d_array = True  # a sequence of paths
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.transformer_tags.preserves_dtype = []  # float32 embeddings, whatever came in
        return tags


def _as_paths(X) -> list[str]:
    """X as a list of path strings: a list, tuple, 1-D array or one-column frame of paths."""
    if isinstance(X, (str, bytes, os.PathLike)):
        raise UserError(f"X must be a list of image paths, not one path ({X!r}); pass [path].")
    try:
        array = np.asarray(X, dtype=object)
    except (TypeError, ValueError) as e:
        raise UserError(f"X must be a list of image paths ({e}).") from None
    if array.ndim == 2 and array.shape[1] == 1:  # one column of a DataFrame or a 2-D array
        array = array[:, 0]
    if array.ndim != 1:
        raise UserError(f"X must be a list of image paths, not an array of shape "
                        f"{array.shape}; give one path per image.")
    if len(array) == 0:
        raise UserError("X has no image paths; give at least one.")
    bad = next((p for p in array if not isinstance(p, (str, os.PathLike))), None)
    if bad is not None:
        raise UserError(f"X must hold image paths (str or pathlib.Path), not {bad!r} of type "
                        f"{type(bad).__name__}.")
    return [os.fspath(p) for p in array]


def _check_exist(paths: list[str]) -> None:
    """Missing files are named before any model is built or image decoded."""
    missing = [p for p in dict.fromkeys(paths) if not os.path.isfile(p)]
    if missing:
        more = f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
        raise UserError(f"{len(missing)} image file(s) of X do not exist or are not files: "
                        f"{', '.join(missing[:_SHOWN])}{more}; fix those paths.")


def _fingerprint(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _cache_runtime(path) -> str | None:
    """The runtime that made the cache at `path` (its rows and ours then come from the same
    engine), where installed; None (the default featurize chooses) without a cache."""
    from featurize import cache, runtimes
    if path is None:
        return None
    recorded = cache.read_attrs(path, option="cache").get("runtime")
    return recorded if recorded in runtimes.REQUIRES and runtimes.installed(recorded) else "keras"


def _check_cache_settings(path, settings) -> dict:
    """The cache's attributes, after checking it was made with `settings`."""
    from featurize import cache
    attrs = cache.read_attrs(path, option="cache")
    if attrs.get("settings_key") != settings.key():
        ours = json.loads(settings.to_json())
        theirs = json.loads(attrs.get("settings", "{}"))
        diff = ", ".join(f"{k}={theirs.get(k)!r} (here {v!r})"
                         for k, v in sorted(ours.items()) if theirs.get(k) != v)
        raise UserError(f"cache {path} was made with other embedding settings ({diff}); give "
                        "a cache made with these parameters, or cache=None.")
    return attrs


def _cached_rows(path, settings, paths: list[str]) -> dict[str, np.ndarray]:
    """{path: embedding} for the paths whose file the cache holds as it is now (same
    absolute path, size and mtime)."""
    from featurize import cache
    _check_cache_settings(path, settings)  # it may have been replaced since fit
    c = cache.read(path, option="cache")
    root = c.attrs["dataset_root"]
    row_of = {os.path.normpath(os.path.join(root, key)): row for row, key in enumerate(c.paths)}
    found = {}
    for p in dict.fromkeys(paths):
        row = row_of.get(os.path.abspath(p))
        if row is None:
            row = row_of.get(os.path.realpath(p))  # through a symbolic link
        if row is not None and _fingerprint(p) == (int(c.sizes[row]), int(c.mtimes[row])):
            found[p] = c.embeddings[row]
    return found
