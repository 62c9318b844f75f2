"""From a cache to the arrays a head trains on: class selection, features, fixed splits."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import PCA
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler

from featurize import cache as cache_io
from featurize.errors import UserError


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


def select(c, min_per_class: int = 1, max_per_class: int | None = None, min_needed: int = 2,
           cv: int | None = None, exclude=()) -> Selection:
    """Labelled rows of classes with at least `min_per_class` images (as scikit-learn's
    fetch_lfw_people(min_faces_per_person=...)), at most `max_per_class` each (first by path).

    `min_needed` is what the evaluation needs per class (2 for a held-out split, K for
    K-fold: pass `cv` to name it in messages); classes below it are dropped with a note.
    `exclude`: class indices left out whatever their size (open-set unknowns).
    """
    if not c.labelled:
        raise UserError(f"cache {c.path} has no labels (it was made from a flat folder or an "
                        "unlabelled list); featurize a folder with one sub-folder per class.")
    need = f"--cv {cv}" if cv else "a held-out split"
    labelled = np.flatnonzero(c.labels >= 0)
    counts = np.bincount(c.labels[labelled], minlength=len(c.classes))
    wanted = counts >= max(min_per_class, 1)
    wanted[np.asarray(exclude, dtype=np.int64)] = False
    keep = wanted & (counts >= min_needed)
    notes = []
    short = int((wanted & ~keep).sum())
    if short:
        notes.append(f"dropped {short} classes with fewer than {min_needed} images "
                     "(too few for the split)")
    kept = np.flatnonzero(keep)
    if len(kept) < 2:
        _too_few_classes(c, counts[wanted], len(kept), min_per_class, min_needed, need)
    rows = []
    for cls in kept:
        members = labelled[c.labels[labelled] == cls]  # already sorted by path
        rows.extend(members[:max_per_class] if max_per_class else members)
    rows = np.array(sorted(rows), dtype=np.int64)
    remap = -np.ones(len(c.classes), dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    return Selection(c.embeddings[rows], remap[c.labels[rows]], [c.paths[i] for i in rows],
                     [c.classes[i] for i in kept], notes)


@dataclass
class Unknowns:
    """The unknown probes of an open-set run: images of people never trained on; and the
    background: the other people left out of training (none of them among the probes),
    which the rejection threshold may be learnt from (`background_people`: a label each)."""
    X: np.ndarray
    paths: list[str]
    n_identities: int
    background: np.ndarray
    background_people: np.ndarray


UNKNOWN_CLASS = "unknown"  # classify.openset.UNKNOWN (no scikit-learn import here)


def open_set_selection(c, o) -> tuple[Selection, Unknowns]:
    """The known people (as `select`, for a held-out split) and the unknown probes of
    `--open-set` (`o`: TrainOptions). The unknowns are the labelled people that the
    selection leaves out (fewer images than --min-per-class, or than the split needs);
    when it leaves out no one, a seeded `unknown_fraction` of the people. Their rows, person
    after person in a seeded order, are cut at `max_unknown` images; the people after the
    cut are the background."""
    if not c.labelled:
        select(c)  # raises its one-line message for an unlabelled cache
    counts = np.bincount(c.labels[c.labels >= 0], minlength=len(c.classes))
    rng = np.random.default_rng(o.seed)
    pool = np.flatnonzero((counts > 0) & (counts < max(o.min_per_class, 2)))
    if len(pool) == 0:  # --min-per-class excludes no one: hold out a share of the people
        people = np.flatnonzero(counts > 0)
        n_out = max(1, round(o.unknown_fraction * len(people)))
        if len(people) - n_out < 2:
            raise UserError(f"--open-set needs at least 3 people in {c.path} (2 known and 1 "
                            f"unknown), and --unknown-fraction {o.unknown_fraction} of its "
                            f"{len(people)} leaves {len(people) - n_out} known; lower "
                            "--unknown-fraction or add people.")
        pool = np.sort(rng.choice(people, n_out, replace=False))
    sel = select(c, o.min_per_class, o.max_per_class, exclude=pool)
    if UNKNOWN_CLASS in sel.classes:  # classify.openset.UNKNOWN: the answer for a stranger
        raise UserError(f"{c.path} has a class named {UNKNOWN_CLASS!r}, which an --open-set "
                        "run answers for people it does not know; rename that class folder "
                        "and run featurize again.")
    by_person = {int(k): np.flatnonzero(c.labels == k) for k in pool}
    ordered = np.concatenate([by_person[int(k)] for k in rng.permutation(pool)])
    rows = np.sort(ordered[:o.max_unknown])
    probes = np.unique(c.labels[rows])
    background = np.sort(ordered[~np.isin(c.labels[ordered], probes)])
    sel.notes.append(f"open set: {len(probes)} people ({len(rows)} images) held out as "
                     f"unknowns, {len(background)} images of other people as background")
    return sel, Unknowns(c.embeddings[rows], [c.paths[i] for i in rows], len(probes),
                         c.embeddings[background], c.labels[background])


def _too_few_classes(c, counts, n_kept, min_per_class, min_needed, need):
    """The UserError for a selection of fewer than 2 classes, blaming the option that did it."""
    if len(counts) >= 2:  # --min-per-class left enough classes: the split's need dropped them
        ordered = np.sort(counts)  # the second largest is the most that keeps 2 classes
        raise UserError(f"{need} needs at least {min_needed} images per class, but the smallest "
                        f"class of {c.path} has {ordered[0]} (only {n_kept} class(es) have "
                        f"{min_needed} or more); "
                        + (f"lower --cv to at most {ordered[-2]}."
                           if need.startswith("--cv") and ordered[-2] >= 2
                           else "add images: a classifier needs at least 2 classes."))
    raise UserError(f"only {n_kept} class(es) left in {c.path} after selection "
                    f"(--min-per-class {min_per_class}); lower --min-per-class or add "
                    "images: a classifier needs at least 2 classes.")


def check_pca(pca, n_train: int, dim: int) -> None:
    """scikit-learn's PCA limit: at most min(training rows, embedding dimension) components."""
    if pca and pca > min(n_train, dim):
        raise UserError(f"--pca {pca} is more than the {min(n_train, dim)} components PCA can "
                        f"find here ({n_train} training images, embedding dimension {dim}); "
                        f"use --pca {min(n_train, dim)} or less.")


def splits(y: np.ndarray, test_size: float = 0.25, cv: int | None = None, seed: int = 0):
    """Train/test index pairs. They depend only on the labels, their order (rows are sorted
    by path) and the seed, never on the head: every head is judged on the same images.
    The options are checked by `options.TrainOptions`."""
    if cv:
        return list(StratifiedKFold(cv, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    n_classes = len(np.unique(y))
    n_test = math.ceil(test_size * len(y))  # as StratifiedShuffleSplit counts them
    if n_test < n_classes:
        raise UserError(f"--test-size {test_size} gives fewer test images than the {n_classes} "
                        f"classes ({n_test}); raise --test-size or --min-per-class.")
    if len(y) - n_test < n_classes:
        raise UserError(f"--test-size {test_size} leaves fewer training images than the "
                        f"{n_classes} classes ({len(y) - n_test}); lower --test-size.")
    return list(StratifiedShuffleSplit(1, test_size=test_size, random_state=seed).split(
        np.zeros(len(y)), y))


def default_normalize(backbone: str) -> bool:
    from featurize.models.registry import get_backbone
    try:
        return get_backbone(backbone).family.face
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
