"""Train a head on a cache, evaluate it on the fixed split, and save the run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
# scikit-learn's parallel parts here (the SVM's calibration folds) release the GIL: threads
# run them on every core without starting worker processes (9.0 s instead of 10.2 s).
from joblib import parallel_config

from featurize import cache as cache_io

from . import data, heads, report, runs


@dataclass
class Result:
    run_dir: Path
    cache: Path
    metrics: dict
    classes: list[str]
    n_images: int
    train_seconds: float
    predict_seconds: float
    notes: list[str] = field(default_factory=list)
    report_text: str = ""


def provenance(attrs: dict) -> dict:
    """The cache attributes a run keeps, so it can be compared and re-featurized later."""
    skip = {"labels_digest"}
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in attrs.items() if k not in skip}


def train(cache=None, head="logreg", params=(), min_per_class=1, max_per_class=None,
          test_size=0.25, cv=None, seed=0, normalize=None, standardize=False, pca=None,
          out=None, runs_dir=runs.DEFAULT_DIR) -> Result:
    spec = heads.get_head(head)
    kwargs = heads.parse_params(spec, list(params))
    if isinstance(cache, cache_io.Cache):  # already read (benchmarks, notebooks)
        c, path = cache, Path(cache.path)
    else:
        path = Path(data.find_cache(cache))
        c = cache_io.read(path)
    sel = data.select(c, min_per_class, max_per_class, min_needed=cv or 2)
    if normalize is None:
        normalize = data.default_normalize(c.attrs.get("backbone", ""))

    def fresh():
        return data.pipeline(spec.make(**kwargs), normalize, standardize, pca, seed)

    folds = data.splits(sel.y, test_size, cv, seed)
    fold_metrics, train_s, predict_s = [], 0.0, 0.0
    y_true, y_pred = [], []
    model = None
    for train_idx, test_idx in folds:
        model = fresh()
        t0 = time.perf_counter()
        with parallel_config(backend="threading"):  # see the import
            model.fit(sel.X[train_idx], sel.y[train_idx])
        t1 = time.perf_counter()
        pred = model.predict(sel.X[test_idx])
        scores = heads.scores(model, sel.X[test_idx])
        t2 = time.perf_counter()
        train_s += t1 - t0
        predict_s += t2 - t1
        fold_metrics.append(report.evaluate(sel.y[test_idx], pred, scores, len(sel.classes)))
        y_true.append(sel.y[test_idx])
        y_pred.append(pred)
    train_s, predict_s = train_s / len(folds), predict_s / len(folds)
    metrics = fold_metrics[0] if len(folds) == 1 else report.summarize_folds(fold_metrics)
    if cv:  # the saved head is fitted on all selected images; folds only measured it
        with parallel_config(backend="threading"):
            model = fresh().fit(sel.X, sel.y)
    y_true, y_pred = np.concatenate(y_true), np.concatenate(y_pred)
    text = report.class_report(y_true, y_pred, sel.classes)

    writer = runs.RunWriter(runs.new_dir(head, out, runs_dir))
    try:
        has_png = report.confusion_png(y_true, y_pred, sel.classes, writer.path("confusion.png"))
        record = {
            "version": runs.RUN_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "head": head, "params": kwargs,
            "features": {"normalize": normalize, "standardize": standardize, "pca": pca},
            "selection": {"min_per_class": min_per_class, "max_per_class": max_per_class},
            "evaluation": {"test_size": None if cv else test_size, "cv": cv, "seed": seed},
            "cache": str(path.resolve()), "provenance": provenance(c.attrs),
            "classes": sel.classes, "n_images": len(sel.y), "metrics": metrics,
            "folds": fold_metrics if cv else None, "train_seconds": train_s,
            "predict_seconds": predict_s, "notes": sel.notes, "confusion_png": has_png,
            "score_kind": spec.scores,
        }
        writer.json("run.json", record)
        writer.json("metrics.json", metrics)
        writer.json("split.json", {"seed": seed, "test_size": None if cv else test_size, "cv": cv,
                                   "folds": [{"train": [sel.paths[i] for i in tr],
                                              "test": [sel.paths[i] for i in te]}
                                             for tr, te in folds]})
        writer.text("report.txt", text)
        writer.model(model)
        run_dir = writer.commit()
    except BaseException:
        writer.abort()
        raise
    return Result(run_dir, path, metrics, sel.classes, len(sel.y), train_s, predict_s,
                  sel.notes, text)
