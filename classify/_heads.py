"""The registry of heads: scikit-learn estimators, plus a small Keras `dense` head.

Every head follows scikit-learn's estimator API (fit / predict / score, get_params), so any
of them drops into the same Pipeline, split, report and run folder.
"""

from __future__ import annotations

import ast
import copy
import functools
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils import check_array
from sklearn.utils._param_validation import Interval, InvalidParameterError, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featurize.errors import UserError


def _unit(X):
    X = np.asarray(X, dtype=np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


class CosineCentroid(ClassifierMixin, BaseEstimator):
    """Nearest class mean by cosine similarity; `class_distances` gives cosine distances."""

    _parameter_constraints = {"temperature": [Interval(Real, 0, None, closed="neither")]}

    def __init__(self, temperature: float = 0.05):
        self.temperature = temperature

    def fit(self, X, y):
        self._validate_params()
        # dense, finite, 2-D, non-empty, as many labels as rows; sets n_features_in_
        X, y = validate_data(self, X, y)
        check_classification_targets(y)
        self.classes_, yi = np.unique(y, return_inverse=True)
        unit = _unit(X)
        self.centroids_ = _unit(np.stack([unit[yi == k].mean(axis=0)
                                          for k in range(len(self.classes_))]))
        return self

    def _similarities(self, X):
        """(n, n_classes) cosine similarities to the class means."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        return _unit(X) @ self.centroids_.T

    def decision_function(self, X):
        s = self._similarities(X)
        # scikit-learn's convention for two classes: one column, positive for classes_[1]
        return s[:, 1] - s[:, 0] if len(self.classes_) == 2 else s

    def predict_proba(self, X):
        z = self._similarities(X) / self.temperature
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict(self, X):
        similarities = self._similarities(X)  # checks that it is fitted first
        return self.classes_[similarities.argmax(axis=1)]

    def class_distances(self, X):
        return 1.0 - self._similarities(X)


class CosineKNN(KNeighborsClassifier):
    """k nearest neighbours by cosine distance, with per-class nearest distances."""

    # Only the two parameters it exposes (the metric and the algorithm are fixed).
    _parameter_constraints = {"n_neighbors": [Interval(Integral, 1, None, closed="left")],
                              "weights": [StrOptions({"uniform", "distance"})]}

    def __init__(self, n_neighbors=5, weights="distance"):
        super().__init__(n_neighbors=n_neighbors, weights=weights, metric="cosine",
                         algorithm="brute")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False  # class_distances works on dense unit rows
        return tags

    def fit(self, X, y):
        check_array(X, accept_sparse=False)  # a clear error for sparse input, before fitting
        super().fit(X, y)
        labels = np.asarray(y)
        if labels.ndim == 2 and labels.shape[1] == 1:  # a column vector (fit warned)
            labels = labels[:, 0]
        self.train_ = (_unit(X), labels)
        return self

    def class_distances(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        train, labels = self.train_
        d = 1.0 - _unit(X) @ train.T
        return np.stack([d[:, labels == c].min(axis=1) for c in self.classes_], axis=1)


class DenseHead(ClassifierMixin, BaseEstimator):
    """One hidden layer, dropout, Adam, early stopping on a validation slice (Keras).

    Deterministic from `seed` alone: the initializers, the dropout and the order of the
    training rows are seeded from it, and no global random generator (Python's, NumPy's,
    the backend's) is read or reseeded.
    """

    _parameter_constraints = {
        "hidden": [Interval(Integral, 1, None, closed="left")],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "epochs": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "patience": [Interval(Integral, 0, None, closed="left")],
        "seed": [Interval(Integral, 0, 2**32 - 1, closed="both")],  # numpy's seed range
    }

    def __init__(self, hidden=256, dropout=0.3, learning_rate=1e-3, epochs=200, batch_size=64,
                 validation_fraction=0.1, patience=5, seed=0):
        self.hidden, self.dropout, self.learning_rate = hidden, dropout, learning_rate
        self.epochs, self.batch_size = epochs, batch_size
        self.validation_fraction, self.patience, self.seed = validation_fraction, patience, seed

    def _seeds(self) -> list[int]:
        """Independent seeds for the two layers' initializers, the dropout, the row order."""
        return [int(s) for s in np.random.SeedSequence(self.seed).generate_state(4)]

    def build(self, X, n_classes: int):
        import keras
        hidden_seed, classes_seed, dropout_seed, _ = self._seeds()
        inputs = keras.Input((X.shape[1],), name="embedding")
        # Standardise inside the head: unit-norm embeddings have tiny entries, which makes
        # Adam crawl (about 150 epochs instead of about 30 on LFW).
        scale = keras.layers.Normalization(name="standardize")
        scale.adapt(X)
        x = scale(inputs)
        # Seeded initializers and dropout: unseeded ones draw from Python's global generator.
        init = keras.initializers.GlorotUniform
        x = keras.layers.Dense(self.hidden, activation="relu", name="hidden",
                               kernel_initializer=init(seed=hidden_seed))(x)
        x = keras.layers.Dropout(self.dropout, name="dropout", seed=dropout_seed)(x)
        out = keras.layers.Dense(n_classes, activation="softmax", name="classes",
                                 kernel_initializer=init(seed=classes_seed))(x)
        model = keras.Model(inputs, out, name="dense_head")
        model.compile(keras.optimizers.Adam(self.learning_rate),
                      "sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    def fit(self, X, y):
        self._validate_params()
        import keras
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, yi = np.unique(y, return_inverse=True)
        Xt, Xv, yt, yv = self._validation_split(X, yi)
        self.model_ = self.build(Xt, len(self.classes_))
        # min_delta: the validation loss creeps down for 100+ epochs after accuracy is flat.
        stop = keras.callbacks.EarlyStopping("val_loss" if len(yv) else "loss",
                                             patience=self.patience, min_delta=1e-3,
                                             restore_best_weights=True)
        rows = _shuffled_rows()(Xt, yt, self.batch_size, self._seeds()[3])
        history = self.model_.fit(rows, steps_per_epoch=rows.steps, shuffle=False,
                                  validation_data=(Xv, yv) if len(yv) else None,
                                  validation_batch_size=self.batch_size,
                                  epochs=self.epochs, callbacks=[stop], verbose=0)
        self.epochs_run_ = len(history.history["loss"])
        return self

    def _validation_split(self, X, y):
        """(X_train, X_val, y_train, y_val); no validation slice with fewer than 2 rows
        (early stopping then watches the training loss)."""
        from sklearn.model_selection import train_test_split
        if len(y) < 2:
            return X, X[:0], y, y[:0]
        return train_test_split(X, y, test_size=self.validation_fraction,
                                random_state=self.seed,
                                stratify=_stratify(y, self.validation_fraction))

    def predict_proba(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32)
        from keras import ops
        # Calling the model, not model.predict: that sets up a data pipeline and traces a
        # function per batch shape, about 0.1 s whatever the number of rows.
        return np.concatenate([ops.convert_to_numpy(self.model_(X[i:i + 1024], training=False))
                               for i in range(0, len(X), 1024)])

    def predict(self, X):
        proba = self.predict_proba(X)  # checks that it is fitted first
        return self.classes_[proba.argmax(axis=1)]

    # Pickled (joblib, and runs saved before skops), the Keras model travels as the bytes of
    # a .keras archive. A run folder keeps it beside the pipeline instead (`without_keras`).
    def __getstate__(self):
        state = self.__dict__.copy()
        if "model_" in state:
            state["model_"] = keras_bytes(state["model_"])
        return state

    def __setstate__(self, state):
        if isinstance(state.get("model_"), bytes):
            state["model_"] = keras_from_bytes(state["model_"])
        self.__dict__.update(state)


@functools.cache
def _shuffled_rows():
    """The class of `fit`'s training data (made on first use: it needs Keras)."""
    import keras

    class ShuffledRows(keras.utils.PyDataset):
        """The training rows in a new order each epoch, from a seed alone. Endless: batch
        i is batch i % steps of epoch i // steps, so the order never depends on when Keras
        (or its prefetching thread) asks for a batch; Keras's own shuffling would use
        Python's or the backend's global generator."""

        def __init__(self, X, y, batch_size: int, seed: int):
            super().__init__()
            self.X, self.y, self.batch_size, self.seed = X, y, batch_size, seed
            self.steps = -(-len(y) // batch_size)  # batches per epoch

        @property
        def num_batches(self):
            return None

        def __getitem__(self, index):
            epoch, step = divmod(index, self.steps)
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.y))
            rows = order[step * self.batch_size:(step + 1) * self.batch_size]
            return self.X[rows], self.y[rows]

    return ShuffledRows


def _stratify(y, fraction: float):
    """`y` when a stratified validation slice of `fraction` is possible: every class twice,
    and at least one row per class on each side (scikit-learn's conditions); else None."""
    counts = np.bincount(y)
    n_classes, n_val = int((counts > 0).sum()), int(np.ceil(fraction * len(y)))
    possible = counts[counts > 0].min() >= 2 and min(n_val, len(y) - n_val) >= n_classes
    return y if possible else None


def keras_bytes(model) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.keras")
        model.save(path)
        with open(path, "rb") as f:
            return f.read()


def keras_from_bytes(data: bytes):
    import keras
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.keras")
        with open(path, "wb") as f:
            f.write(data)
        return keras.saving.load_model(path, safe_mode=True)  # no Lambda layer's code runs


# --- what a run folder may hold ----------------------------------------------------------------

# The types of a saved pipeline beyond those skops trusts by itself (scikit-learn's
# estimators, NumPy arrays, Python's builtins), by exact qualified name: this module's heads
# and the svm head's calibration parts. A file with any other type is refused unread.
SKOPS_TYPES = tuple(sorted(
    [f"{cls.__module__}.{cls.__qualname__}" for cls in (CosineCentroid, CosineKNN, DenseHead)]
    + ["sklearn.calibration._CalibratedClassifier", "sklearn.calibration._SigmoidCalibration"]))
FEATURE_STEPS = {"l2": Normalizer, "standardize": StandardScaler, "pca": PCA}  # data.pipeline
HEAD_TYPES = (LogisticRegression, CalibratedClassifierCV, CosineKNN, CosineCentroid,
              RidgeClassifier, DenseHead)


def pipeline_problem(pipeline) -> str:
    """What makes a loaded object other than a pipeline `data.pipeline` makes, or ""."""
    if type(pipeline) is not Pipeline:
        return f"a {type(pipeline).__name__}, not a Pipeline"
    steps = pipeline.__dict__.get("steps")
    if not (isinstance(steps, list) and steps
            and all(isinstance(s, tuple) and len(s) == 2 for s in steps)):
        return "a Pipeline without steps"
    for name, step in steps[:-1]:
        if not isinstance(name, str) or type(step) is not FEATURE_STEPS.get(name):
            return f"an unexpected feature step {name!r} ({type(step).__name__})"
    name, head = steps[-1]
    if name != "head" or type(head) not in HEAD_TYPES:
        return f"an unexpected head step {name!r} ({type(head).__name__})"
    return ""


def keras_model(pipeline):
    """The Keras model of a fitted pipeline's head (the dense head's), or None."""
    head = pipeline.steps[-1][1]
    return head.__dict__.get("model_") if isinstance(head, DenseHead) else None


def without_keras(pipeline):
    """A shallow copy of a fitted pipeline whose dense head lacks its Keras model (which a run
    folder keeps as a .keras file beside it); the pipeline itself if it has none."""
    if keras_model(pipeline) is None:
        return pipeline
    name, head = pipeline.steps[-1]
    bare = DenseHead.__new__(DenseHead)
    bare.__dict__.update({k: v for k, v in head.__dict__.items() if k != "model_"})
    stripped = copy.copy(pipeline)
    stripped.steps = [*pipeline.steps[:-1], (name, bare)]
    return stripped


def needs_keras(pipeline) -> bool:
    """A loaded pipeline's head needs its Keras model reattached (`attach_keras`)."""
    return isinstance(pipeline.steps[-1][1], DenseHead)


def attach_keras(pipeline, model) -> None:
    pipeline.steps[-1][1].model_ = model


@dataclass(frozen=True)
class Head:
    name: str
    description: str
    make: Callable[..., BaseEstimator]  # keyword parameters -> unfitted estimator
    scores: str  # what `scores()` returns: "probability" or "distance"


HEADS: dict[str, Head] = {}  # (the default head is classify._options.DEFAULT_HEAD)


def register_head(head: Head) -> None:
    """Add a head to those `classify.train` and `--head` accept. A name already registered is
    a ValueError: a head is never replaced. (A saved run of your head loads only if its
    estimator's types are ones `Run.load` trusts; see the security docs.)"""
    if not isinstance(head, Head):
        raise TypeError(f"head must be a classify.HeadSpec, not {type(head).__name__}")
    if not head.name or head.name in HEADS:
        raise ValueError(f"head: a head named {head.name!r} is already registered; give "
                         "yours another name.")
    HEADS[head.name] = head


for _head in [
    Head("logreg", "multinomial logistic regression (default)",
         # tol 1e-3: 7x fewer lbfgs iterations on 2048-D embeddings, the same accuracy
         lambda **p: LogisticRegression(**{"C": 10.0, "max_iter": 2000, "tol": 1e-3, **p}),
         "probability"),
    Head("svm", "linear SVM with probability calibration",
         # the three calibration folds train in parallel (threads, see classify.train)
         lambda **p: CalibratedClassifierCV(LinearSVC(**{"C": 1.0, **p}), cv=3, n_jobs=-1),
         "probability"),
    Head("knn", "k nearest neighbours, cosine", lambda **p: CosineKNN(**p), "distance"),
    Head("centroid", "nearest class mean, cosine", lambda **p: CosineCentroid(**p), "distance"),
    Head("ridge", "ridge regression classifier", lambda **p: RidgeClassifier(**p), "score"),
    Head("dense", "small Keras MLP on the embeddings, early stopping",
         lambda **p: DenseHead(**p), "probability"),
]:
    register_head(_head)
HeadSpec = Head  # the public name (classify.HeadSpec)




def get_head(name: str) -> Head:
    if name not in HEADS:
        raise UserError(f"unknown head {name!r}; choose one of {', '.join(HEADS)} "
                        "(python -m classify --list-heads).")
    return HEADS[name]


def parse_params(head: Head, pairs: list[str]) -> dict:
    """`key=value` strings -> keyword parameters, checked against the head's own."""
    params = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"--param {pair!r} must look like key=value (e.g. C=10).")
        try:
            params[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[key] = value
    return check_params(head, params)


def check_params(head: Head, params: dict) -> dict:
    """Keyword parameters (from --param or a Python dict), checked against the head's own
    by scikit-learn's validation; the same errors either way."""
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise UserError(f"the parameters of head {head.name} must be a dict of names to values "
                        f"(e.g. {{'C': 10}}), not {params!r}.")
    params = dict(params)
    valid = set(tunable(head.make()).get_params(deep=False))
    unknown = sorted(set(params) - valid)
    if unknown:
        raise UserError(f"head {head.name} has no parameter {', '.join(unknown)}; valid: "
                        f"{', '.join(sorted(valid))}.")
    try:
        # scikit-learn's own constraints (types and ranges), checked before any data is read
        tunable(head.make(**params))._validate_params()
    except InvalidParameterError as e:
        raise UserError(f"bad --param for head {head.name}: {e} Change that --param.") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"bad --param for head {head.name}: {e}; change that --param.") from None
    return params


def tunable(estimator):
    """The estimator whose parameters --param sets (the SVM inside its calibration)."""
    return estimator.estimator if isinstance(estimator, CalibratedClassifierCV) else estimator


def check_training_rows(head: Head, params: dict, n_rows: int) -> None:
    """Limits that depend on the data, checked before fitting: k nearest neighbours need
    at least k training images."""
    k = getattr(tunable(head.make(**params)), "n_neighbors", None)
    if k is not None and k > n_rows:
        raise UserError(f"head {head.name} with --param n_neighbors={k} needs at least {k} "
                        f"training images, and the training split has {n_rows}; pass --param "
                        f"n_neighbors={n_rows} or less.")


def features(pipeline, X):
    """The pipeline's feature steps (normalise, standardise, PCA) applied to X: what its
    head sees. A pipeline may have none (a head alone: `pipeline[:-1]` cannot transform)."""
    for _, step in pipeline.steps[:-1]:
        X = step.transform(X)
    return X


def scores(estimator, X) -> np.ndarray:
    """Per-class scores, higher is better: probabilities, or decision values."""
    if hasattr(estimator, "predict_proba"):
        return estimator.predict_proba(X)
    return estimator.decision_function(X)


def describe_heads() -> str:
    return "\n".join(f"{h.name:<10} {h.description}" for h in HEADS.values())

