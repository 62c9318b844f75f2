"""The registry of heads: scikit-learn estimators, plus a small Keras `dense` head.

Every head follows scikit-learn's estimator API (fit / predict / score, get_params), so any
of them drops into the same Pipeline, split, report and run folder.
"""

from __future__ import annotations

import ast
import os
import tempfile
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Callable

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import LinearSVC
from sklearn.utils._param_validation import InvalidParameterError, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

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
        y = np.asarray(y)
        self.classes_ = np.unique(y)
        self.centroids_ = _unit(np.stack([_unit(X)[y == c].mean(axis=0) for c in self.classes_]))
        return self

    def decision_function(self, X):
        check_is_fitted(self, "centroids_")
        return _unit(X) @ self.centroids_.T

    def predict_proba(self, X):
        z = self.decision_function(X) / self.temperature
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict(self, X):
        return self.classes_[self.decision_function(X).argmax(axis=1)]

    def class_distances(self, X):
        return 1.0 - self.decision_function(X)


class CosineKNN(KNeighborsClassifier):
    """k nearest neighbours by cosine distance, with per-class nearest distances."""

    # Only the two parameters it exposes (the metric and the algorithm are fixed).
    _parameter_constraints = {"n_neighbors": [Interval(Integral, 1, None, closed="left")],
                              "weights": [StrOptions({"uniform", "distance"})]}

    def __init__(self, n_neighbors=5, weights="distance"):
        super().__init__(n_neighbors=n_neighbors, weights=weights, metric="cosine",
                         algorithm="brute")

    def fit(self, X, y):
        self.train_ = (_unit(X), np.asarray(y))
        return super().fit(X, y)

    def class_distances(self, X):
        train, labels = self.train_
        d = 1.0 - _unit(X) @ train.T
        return np.stack([d[:, labels == c].min(axis=1) for c in self.classes_], axis=1)


class DenseHead(ClassifierMixin, BaseEstimator):
    """One hidden layer, dropout, Adam, early stopping on a validation slice (Keras)."""

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

    def build(self, X, n_classes: int):
        import keras
        keras.utils.set_random_seed(self.seed)
        inputs = keras.Input((X.shape[1],), name="embedding")
        # Standardise inside the head: unit-norm embeddings have tiny entries, which makes
        # Adam crawl (about 150 epochs instead of about 30 on LFW).
        scale = keras.layers.Normalization(name="standardize")
        scale.adapt(X)
        x = scale(inputs)
        x = keras.layers.Dense(self.hidden, activation="relu", name="hidden")(x)
        x = keras.layers.Dropout(self.dropout, name="dropout")(x)
        out = keras.layers.Dense(n_classes, activation="softmax", name="classes")(x)
        model = keras.Model(inputs, out, name="dense_head")
        model.compile(keras.optimizers.Adam(self.learning_rate),
                      "sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    def fit(self, X, y):
        self._validate_params()
        import keras
        from sklearn.model_selection import train_test_split
        X = np.asarray(X, np.float32)
        self.classes_, yi = np.unique(y, return_inverse=True)
        Xt, Xv, yt, yv = train_test_split(X, yi, test_size=self.validation_fraction,
                                          random_state=self.seed,
                                          stratify=_stratify(yi, self.validation_fraction))
        self.model_ = self.build(Xt, len(self.classes_))
        # min_delta: the validation loss creeps down for 100+ epochs after accuracy is flat.
        stop = keras.callbacks.EarlyStopping(patience=self.patience, min_delta=1e-3,
                                             restore_best_weights=True)
        history = self.model_.fit(Xt, yt, validation_data=(Xv, yv), epochs=self.epochs,
                                  batch_size=self.batch_size, callbacks=[stop], verbose=0)
        self.epochs_run_ = len(history.history["loss"])
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "model_")
        return np.asarray(self.model_.predict(np.asarray(X, np.float32), verbose=0,
                                              batch_size=1024))

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    # The Keras model travels inside the joblib file as the bytes of a .keras archive.
    def __getstate__(self):
        state = self.__dict__.copy()
        if "model_" in state:
            state["model_"] = keras_bytes(state["model_"])
        return state

    def __setstate__(self, state):
        if isinstance(state.get("model_"), bytes):
            state["model_"] = keras_from_bytes(state["model_"])
        self.__dict__.update(state)


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
        return keras.saving.load_model(path)


@dataclass(frozen=True)
class Head:
    name: str
    description: str
    make: Callable[..., BaseEstimator]  # keyword parameters -> unfitted estimator
    scores: str  # what `scores()` returns: "probability" or "distance"


HEADS = {h.name: h for h in [
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
]}
DEFAULT_HEAD = "logreg"


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

