"""The Python API of classify: `train`, `predict`, `verify`, `finetune`, and the `Run` and
`Verification` they return. The command lines are thin layers over these functions.

    import classify
    run = classify.train("data/cache/lfw.h5", "logreg", {"C": 10}, min_per_class=20)
    run.metrics, run.predict(X_new), run.predict(["photo.jpg"])
    run.save("runs/logreg-c10")                        # or classify.train(..., save_to=DIR)
    same = classify.Run.load("runs/logreg-c10")
    tuned = classify.finetune(same, epochs=3)          # a Run too; nothing written unless saved
    v = classify.verify("data/cache/lfw.h5", "data/lfw/pairsDevTest.txt")
    hits = classify.search(["photo.jpg"], "data/cache/lfw.h5", k=10)   # gallery search
    gallery = classify.Gallery("data/cache/lfw.h5")  # reused: gallery.nearest(X)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from classify._options import DEFAULT_HEAD, FinetuneOptions, TrainOptions
from classify._runs import (
    Run,
    table as runs_table,  # noqa: F401 - `python -m classify runs`
)
from classify._search import Gallery, SearchOptions

__all__ = ["train", "predict", "verify", "finetune", "Run", "Verification", "TrainOptions",
           "FinetuneOptions", "search", "Gallery", "SearchOptions"]


def train(cache=None, head: str = DEFAULT_HEAD, params=None, *, save_to=None,
          options: TrainOptions | None = None, **settings) -> Run:
    """Train and evaluate a head on a cache (a path, a `featurize.cache.Cache`, or None for
    the newest under data/cache/): a Run. `params` is a dict of the head's hyper-parameters,
    checked by scikit-learn's own validation; `settings` are the other TrainOptions fields
    (min_per_class, max_per_class, test_size, cv, seed, normalize, standardize, pca,
    open_set, unknown_fraction, max_unknown, target_far), or pass `options` whole. With
    open_set=True whole people are held out as unknowns: `metrics["open_set"]` has DIR/FAR,
    and the Run's `predict` answers "unknown" below its `threshold` (classify/openset.py).
    Nothing is written unless `save_to` names a new run folder."""
    if options is None:
        options = TrainOptions(head, params if params is not None else {}, **settings)
    elif settings or params is not None or head != DEFAULT_HEAD:
        raise TypeError("pass either options=TrainOptions(...) or head, params and settings, "
                        "not both")
    from classify._train import fit_run
    return fit_run(cache, options, save_to)


def finetune(run, *, save_to=None, options: FinetuneOptions | None = None, log=print,
             **settings) -> Run:
    """Fine-tune the backbone of a dense or logreg run together with its head: a new Run
    whose `pipeline` is the whole Keras model. `run` is a Run (saved or not: its split is
    kept in memory) or a run folder; `settings` are the FinetuneOptions fields
    (unfreeze_blocks, lr, epochs, batch_size, val_fraction, augment, refeaturize, seed).
    Nothing is written unless `save_to` names a new run folder (refeaturize needs one)."""
    if options is None:
        options = FinetuneOptions(**settings)  # checked before the run is even read
    elif settings:
        raise TypeError("pass either options=FinetuneOptions(...) or its fields, not both")
    if not isinstance(run, Run):
        run = Run.load(run)
    from classify._finetune import finetune_run
    return finetune_run(run, options, save_to, log)


def search(queries, cache, k: int = 10, **settings) -> list[dict]:
    """The k gallery rows of a cache (its path, or a `featurize.cache.Cache` read from it)
    nearest to each query by cosine distance: image files and folders (embedded exactly as
    the cache's images were) or an (N, D) array of embeddings. One dict per query: `query`
    and `neighbours` (`row`, `path`, `label`, `distance`), or an `error` for an image that
    cannot be used. `settings`: the other SearchOptions fields (method "auto", "exact" or
    "approximate"; exact_max_rows, above which "auto" uses the approximate index stored
    beside the cache; nprobe, its lists scanned per query; batch_size, workers). To search
    one gallery many times, keep a `Gallery(cache, k=...)` and call its `search` (or
    `nearest(X)` for arrays)."""
    return Gallery(cache, SearchOptions(k=k, **settings)).search(queries)


def predict(inputs, run, top_k: int = 5, batch_size: int = 32, workers=None) -> list[dict]:
    """Top-k classes of image files and folders with a Run or a run folder: one dict per
    image, or an `error` for an image that cannot be used (the command line's output). For
    arrays of labels or scores, use `Run.predict` and `Run.predict_proba`."""
    from classify._predict import predict as predict_images
    return predict_images(inputs, run, top_k, batch_size, workers)


@dataclass(frozen=True)
class Verification:
    """LFW pair verification figures: `accuracy` (mean over folds, each with a threshold from
    the other folds or from `train_pairs`), its `accuracy_std`, `fold_accuracies`,
    `thresholds`, `roc_auc`, `pairs` used and `skipped`; with `train_pairs`, the `threshold`
    chosen on them and `accuracy_all` on every pair at once."""

    accuracy: float
    accuracy_std: float
    roc_auc: float
    fold_accuracies: list[float]
    thresholds: list[float]
    pairs: int
    skipped: int
    metric: str
    cache: str
    pairs_file: str
    train_pairs: str | None = None
    threshold: float | None = None
    accuracy_all: float | None = None
    roc_png: str | None = None
    out: str | None = None
    record: dict = field(default_factory=dict, repr=False, compare=False)

    def as_dict(self) -> dict:
        """The JSON document of `python -m classify verify --json`."""
        return dict(self.record)


def verify(cache=None, pairs=None, train_pairs=None, metric: str = "cosine",
           skip_missing: bool = False, roc=None, out=None) -> Verification:
    """Verification on LFW pair files (View 2 pairs.txt: the 10-fold protocol; View 1
    pairsDevTest.txt with train_pairs=pairsDevTrain.txt: the threshold from the latter).
    `cache` as for `train`; `roc` a picture file to draw the ROC and DET curves into; `out`
    a new folder for verification.json, roc.png and report.html (nothing written without)."""
    from classify._verify import verify as verify_pairs
    from featurize.errors import UserError
    if pairs is None:
        raise UserError("verify needs a pairs file (--pairs): LFW's pairs.txt or "
                        "pairsDevTest.txt.")
    d = verify_pairs(cache, pairs, train_pairs, metric, skip_missing, roc, out)
    known = Verification.__dataclass_fields__
    return Verification(**{k: v for k, v in d.items() if k in known}, record=d)
