"""Open-set identification: answer "unknown" for a face of someone the run never saw.

The score of an image is its cosine similarity to the nearest known person: the largest
cosine between the L2-normalised embedding and each known class's centroid (the mean of
that class's L2-normalised training embeddings, normalised again). It does not depend on
the head, so every head gets the same rejection: the head names the person, the score says
whether that person is known at all. Below the run's threshold the answer is `unknown`.

The threshold is learnt from data the evaluation never sees, as the (1 - target FAR)
quantile of the scores of pseudo-unknown faces, each person weighing the same (a person with
500 images would otherwise set it alone). The pseudo-unknowns are:
- the background, when the cache has enough of it: people the run neither trains on nor
  uses as unknown probes (with --min-per-class 20 on LFW, the ~4,500 people with fewer
  images beyond the 2,000 unknown probes), scored as an unknown is, against every centroid;
- otherwise the training people themselves, by leave-one-identity-out: each in turn plays
  an unknown, scored against the centroids of all the other known people. It needs many
  known people: for a target FAR of 0.01 on LFW (benchmarks/openset_lfw.py) it gives a FAR
  of 0.0115 with 62 known people but 0.0287 with 12, where the background gives 0.0102
  and 0.0142.

The figures (`metrics.json` under `open_set`) follow the standard open-set curve:
DIR(t) = share of known probes whose top-1 is right and whose score >= t, FAR(t) = share of
unknown probes whose score >= t.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn import metrics

from classify import _data as data
from featurize.errors import UserError

UNKNOWN = data.UNKNOWN_CLASS  # the prediction of a rejected image
SCORE = "centroid_cosine"
FILE = "open_set.npz"  # the centroids and threshold, in the run folder
FAR_POINTS = (0.1, 0.01, 0.001)
MIN_ABOVE = 5  # pseudo-unknowns a background must put above the threshold to be used
FROM_BACKGROUND = "background people (left out of training, not among the probes)"
FROM_TRAINING = "leave-one-identity-out on the training images"


def unit(X) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def centroids(X, y, n_classes: int) -> np.ndarray:
    """(n_classes, D) unit class means of the unit rows; y holds indices 0..n_classes-1."""
    rows = unit(X)
    sums = np.zeros((n_classes, rows.shape[1]), dtype=np.float64)
    np.add.at(sums, np.asarray(y), rows)
    return unit(sums)


def leave_one_identity_out(X, y, class_centroids) -> np.ndarray:
    """Each row's score against the centroids of every class but its own: how an unknown
    person scores against a gallery that lacks them."""
    similarities = unit(X) @ class_centroids.T
    similarities[np.arange(len(similarities)), np.asarray(y)] = -np.inf
    return similarities.max(axis=1)


def threshold_for_far(scores, target_far: float, groups=None) -> float:
    """The (1 - target_far) quantile of unknown scores: about `target_far` of them reach it.
    With `groups` (a person per score) each group weighs the same in total."""
    scores = np.asarray(scores, dtype=np.float64)
    if groups is None:
        return float(np.quantile(scores, 1.0 - target_far))
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    order = np.argsort(scores, kind="stable")
    # the weighted inverted-CDF quantile (numpy's `weights=` needs numpy 2)
    cumulative = np.cumsum((1.0 / counts[inverse])[order])
    at = np.searchsorted(cumulative, (1.0 - target_far) * cumulative[-1])
    return float(scores[order][min(at, len(order) - 1)])


@dataclass(frozen=True)
class Rejector:
    """What an open-set run keeps to say `unknown`: the known people's centroids (rows in
    the run's `classes` order, over the cache's raw embeddings) and the threshold."""

    centroids: np.ndarray
    threshold: float
    target_far: float
    source: str = FROM_TRAINING  # what the threshold was learnt from

    @classmethod
    def fit(cls, X, y, n_classes: int, target_far: float, background=None,
            background_people=None) -> Rejector:
        """Centroids from training rows (y: class indices); the threshold from the
        background (rows of other people, a label each) when it has at least MIN_ABOVE /
        target_far rows, else by leave-one-identity-out on the training rows."""
        if n_classes < 2:  # data.open_set_selection keeps at least 2: a bug, not a mistake
            raise ValueError("a rejection threshold needs at least 2 known classes")
        known = centroids(X, y, n_classes)
        if background is not None and len(background) * target_far >= MIN_ABOVE:
            pseudo = (unit(background) @ known.T).max(axis=1)  # as an unknown is scored
            threshold = threshold_for_far(pseudo, target_far, groups=background_people)
            return cls(known, threshold, target_far, FROM_BACKGROUND)
        pseudo = leave_one_identity_out(X, y, known)
        return cls(known, threshold_for_far(pseudo, target_far, groups=y), target_far)

    def scores(self, X) -> np.ndarray:
        """(N,) cosine similarity of each embedding to its nearest known centroid."""
        return (unit(X) @ self.centroids.T).max(axis=1)

    def known(self, X) -> np.ndarray:
        """(N,) True where the image is close enough to a known person to be named."""
        return self.scores(X) >= self.threshold

    def summary(self) -> dict:
        """What run.json records (the centroids are in FILE)."""
        return {"score": SCORE, "threshold": self.threshold, "target_far": self.target_far,
                "threshold_from": self.source, "file": FILE}

    def save(self, path) -> None:
        with open(path, "wb") as f:  # a file object: numpy adds no ".npz" to the name
            np.savez(f, centroids=self.centroids, threshold=self.threshold,
                     target_far=self.target_far, source=self.source)


def load(run_dir, record: dict) -> Rejector | None:
    """The rejector of a saved run, or None: a run trained without --open-set (or by an
    older version) predicts as before. (A fine-tuned run has none: its backbone changed, so
    the centroids of the old embeddings no longer apply; Run.load does not ask.)"""
    if "open_set" not in record:
        return None
    path = Path(run_dir) / FILE
    try:
        with np.load(path) as f:
            rejector = Rejector(np.asarray(f["centroids"], dtype=np.float32),
                                float(f["threshold"]), float(f["target_far"]), str(f["source"]))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}); the run's open-set "
                        "rejection is missing or damaged: train the head again with "
                        "--open-set.") from None
    if rejector.centroids.ndim != 2 or len(rejector.centroids) != len(record["classes"]):
        raise UserError(f"{path} and run.json disagree on the classes; train the head again "
                        "with --open-set.")
    return rejector


def curve(known_scores, known_correct, unknown_scores):
    """(FAR, DIR, thresholds) at every distinct score, from scikit-learn's ROC curve of
    correctly identified known probes against unknown probes: its false-positive rate is
    FAR, and its true-positive rate times the share of correct top-1 answers is DIR (a
    wrong top-1 is never a detection-and-identification, whatever its score)."""
    known_scores = np.asarray(known_scores, dtype=np.float64)
    correct = np.asarray(known_correct, dtype=bool)
    unknown_scores = np.asarray(unknown_scores, dtype=np.float64)
    if not correct.any():  # nothing identified: DIR is 0 at every threshold
        far = np.array([0.0, 1.0])
        return far, np.zeros(2), np.array([np.inf, unknown_scores.min(initial=0.0)])
    labels = np.r_[np.zeros(len(unknown_scores)), np.ones(correct.sum())]
    far, tpr, thresholds = metrics.roc_curve(labels, np.r_[unknown_scores, known_scores[correct]],
                                             drop_intermediate=False)
    return far, tpr * correct.mean(), thresholds


def rates(known_scores, known_correct, unknown_scores, threshold: float) -> tuple[float, float]:
    """(DIR, FAR) at one threshold."""
    accepted = np.asarray(known_scores) >= threshold
    return (float(np.mean(accepted & np.asarray(known_correct, dtype=bool))),
            float(np.mean(np.asarray(unknown_scores) >= threshold)))


def figures(known_scores, known_correct, unknown_scores, threshold: float) -> dict:
    """dir_at_far (the best DIR with FAR at most 0.1, 0.01, 0.001), auc_open (the area
    under DIR against FAR, FAR from 0 to 1, by the trapezoidal rule: at most the closed-set
    accuracy), and DIR and FAR at `threshold`."""
    far, dir_, _ = curve(known_scores, known_correct, unknown_scores)
    at_far = {str(f): float(dir_[far <= f].max()) for f in FAR_POINTS}
    dir_t, far_t = rates(known_scores, known_correct, unknown_scores, threshold)
    return {"dir_at_far": at_far, "auc_open": float(metrics.auc(far, dir_)),
            "threshold": float(threshold), "dir": dir_t, "far": far_t}


def evaluate(model, sel, fold, unknowns, target_far: float) -> tuple[Rejector, dict]:
    """An open-set run's rejector (from its training rows) and its `open_set` figures on
    the known test probes (`sel`'s rows of `fold`'s test part, named by `model`) and the
    unknown probes (`unknowns`, a `data.Unknowns`)."""
    train_idx, test_idx = fold
    rejector = Rejector.fit(sel.X[train_idx], sel.y[train_idx], len(sel.classes), target_far,
                            unknowns.background, unknowns.background_people)
    correct = model.predict(sel.X[test_idx]) == sel.y[test_idx]
    out = figures(rejector.scores(sel.X[test_idx]), correct, rejector.scores(unknowns.X),
                  rejector.threshold)
    out.update({"target_far": target_far, "score": SCORE, "threshold_from": rejector.source,
                "n_background_images": len(unknowns.background),
                "n_known_probes": len(test_idx), "n_unknown_probes": len(unknowns.X),
                "n_known_identities": len(sel.classes),
                "n_unknown_identities": unknowns.n_identities})
    return rejector, out


def format_figures(m: dict) -> str:
    """One line for the command line's summary."""
    at = ", ".join(f"{f} {v:.4f}" for f, v in m["dir_at_far"].items())
    return (f"open set: {m['n_known_identities']} known people ({m['n_known_probes']} probes), "
            f"{m['n_unknown_identities']} unknown ({m['n_unknown_probes']} probes); DIR at FAR "
            f"{at}; auc_open {m['auc_open']:.4f}; learnt threshold {m['threshold']:.4f}: "
            f"DIR {m['dir']:.4f}, FAR {m['far']:.4f} (threshold from {m['threshold_from']})")
