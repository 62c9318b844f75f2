"""From a cache to the arrays a head trains on: class selection, features, fixed splits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import PCA
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler

from featurize import cache as cache_io
from featurize.errors import UserError

FACE_FAMILIES = ("vggface", "dlib")


@dataclass
class Selection:
    X: np.ndarray
    y: np.ndarray  # indices into `classes`
    paths: list[str]
    classes: list[str]
    notes: list[str]  # what was dropped and why, for the report


def find_cache(path=None):
    """`--cache PATH`, or the newest cache under data/cache/."""
    if path:
        return path
    newest = cache_io.newest()
    if newest is None:
        raise UserError(f"no cache found under {cache_io.DEFAULT_DIR}/; make one with "
                        "python -m featurize FOLDER, or pass --cache PATH.")
    return newest


def select(c, min_per_class: int = 1, max_per_class: int | None = None, min_needed: int = 2) -> Selection:
    """Labelled rows of classes with at least `min_per_class` images (as scikit-learn's
    fetch_lfw_people(min_faces_per_person=...)), at most `max_per_class` each (first by path).

    `min_needed` is what the evaluation needs per class (2 for a held-out split, K for K-fold);
    classes below it are dropped with a note.
    """
    if not c.labelled:
        raise UserError(f"cache {c.path} has no labels (it was made from a flat folder or an "
                        "unlabelled list); featurize a folder with one sub-folder per class.")
    labelled = np.flatnonzero(c.labels >= 0)
    counts = np.bincount(c.labels[labelled], minlength=len(c.classes))
    keep = counts >= max(min_per_class, 1)
    notes = []
    short = np.flatnonzero(keep & (counts < min_needed))
    if len(short):
        notes.append(f"dropped {len(short)} classes with fewer than {min_needed} images "
                     "(too few for the split)")
        keep[short] = False
    rows = []
    for cls in np.flatnonzero(keep):
        members = labelled[c.labels[labelled] == cls]  # already sorted by path
        rows.extend(members[:max_per_class] if max_per_class else members)
    rows = np.array(sorted(rows), dtype=np.int64)
    kept = np.flatnonzero(keep)
    if len(kept) < 2:
        raise UserError(f"only {len(kept)} class(es) left in {c.path} after selection "
                        f"(--min-per-class {min_per_class}); lower --min-per-class or add "
                        "images: a classifier needs at least 2 classes.")
    remap = -np.ones(len(c.classes), dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    return Selection(c.embeddings[rows], remap[c.labels[rows]], [c.paths[i] for i in rows],
                     [c.classes[i] for i in kept], notes)


def splits(y: np.ndarray, test_size: float = 0.25, cv: int | None = None, seed: int = 0):
    """Train/test index pairs. They depend only on the labels, their order (rows are sorted
    by path) and the seed, never on the head: every head is judged on the same images."""
    if cv:
        return list(StratifiedKFold(cv, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    if not 0 < test_size < 1:
        raise UserError(f"--test-size must be a fraction between 0 and 1, not {test_size}.")
    n_classes = len(np.unique(y))
    if round(test_size * len(y)) < n_classes:
        raise UserError(f"--test-size {test_size} gives fewer test images than the {n_classes} "
                        "classes; raise --test-size or --min-per-class.")
    return list(StratifiedShuffleSplit(1, test_size=test_size, random_state=seed).split(
        np.zeros(len(y)), y))


def default_normalize(backbone: str) -> bool:
    from featurize.backbones import get_backbone
    try:
        return get_backbone(backbone).family in FACE_FAMILIES
    except UserError:
        return False


def pipeline(estimator, normalize: bool, standardize: bool, pca: int | None, seed: int) -> Pipeline:
    steps = []
    if normalize:
        steps.append(("l2", Normalizer()))
    if standardize:
        steps.append(("standardize", StandardScaler()))
    if pca:
        steps.append(("pca", PCA(pca, random_state=seed)))
    steps.append(("head", estimator))
    return Pipeline(steps)
