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
from featurize.errors import UserError

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
    warnings: list[str] = field(default_factory=list)  # for stderr: the run may mislead


def provenance(attrs: dict) -> dict:
    """The cache attributes a run keeps, so it can be compared and re-featurized later."""
    skip = {"labels_digest"}
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in attrs.items() if k not in skip}


def incomplete_warning(c) -> str:
    """The warning for a cache of an interrupted featurize run (its root attributes
    `complete` and `pending`; caches written before they existed are complete), or ""."""
    if bool(c.attrs.get("complete", True)):
        return ""
    return (f"cache {c.path} is incomplete: {int(c.attrs.get('pending', 0))} images were not "
            "embedded (featurize was interrupted); run featurize again to finish it")


def train(cache=None, head="logreg", params=(), min_per_class=1, max_per_class=None,
          test_size=0.25, cv=None, seed=0, normalize=None, standardize=False, pca=None,
          out=None, runs_dir=runs.DEFAULT_DIR) -> Result:
    # Every option is checked before the cache is read and long before a file is written.
    spec = heads.get_head(head)
    kwargs = heads.parse_params(spec, list(params))
    data.check_options(min_per_class, max_per_class, test_size, cv, seed, pca)
    run_dir = runs.new_dir(head, out, runs_dir)
    runs.check_destination(run_dir)
    if isinstance(cache, cache_io.Cache):  # already read (benchmarks, notebooks)
        c, path = cache, Path(cache.path)
    else:
        path = Path(data.find_cache(cache))
        c = cache_io.read(path)
    sel = data.select(c, min_per_class, max_per_class, min_needed=cv or 2, cv=cv)
    warnings = [w for w in [incomplete_warning(c)] if w]
    if normalize is None:
        normalize = data.default_normalize(c.attrs.get("backbone", ""))
    folds = data.splits(sel.y, test_size, cv, seed)
    n_train = min(len(tr) for tr, _ in folds)
    heads.check_training_rows(spec, kwargs, n_train)
    data.check_pca(pca, n_train, sel.X.shape[1])

    def fresh():
        return data.pipeline(spec.make(**kwargs), normalize, standardize, pca, seed)

    model, fitted = _evaluate(fresh, sel, folds, head, kwargs)
    if cv:  # the saved head is fitted on all selected images; folds only measured it
        model = _fit(fresh(), sel.X, sel.y, head, kwargs)
    record = {
        "version": runs.RUN_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "head": head, "params": kwargs,
        "features": {"normalize": normalize, "standardize": standardize, "pca": pca},
        "selection": {"min_per_class": min_per_class, "max_per_class": max_per_class},
        "evaluation": {"test_size": None if cv else test_size, "cv": cv, "seed": seed},
        "cache": str(path.resolve()), "provenance": provenance(c.attrs),
        "classes": sel.classes, "n_images": len(sel.y), "metrics": fitted["metrics"],
        "folds": fitted["folds"] if cv else None, "train_seconds": fitted["train_s"],
        "predict_seconds": fitted["predict_s"], "notes": sel.notes + warnings,
        "score_kind": spec.scores,
    }
    split = {"seed": seed, "test_size": None if cv else test_size, "cv": cv,
             "folds": [{"train": [sel.paths[i] for i in tr], "test": [sel.paths[i] for i in te]}
                       for tr, te in folds]}
    text = report.class_report(fitted["y_true"], fitted["y_pred"], sel.classes)
    run_dir = _write_run(run_dir, record, split, text, model, fitted)
    return Result(run_dir, path, fitted["metrics"], sel.classes, len(sel.y), fitted["train_s"],
                  fitted["predict_s"], sel.notes, text, warnings)


def _fit(model, X, y, head: str, params: dict):
    try:
        with parallel_config(backend="threading"):  # see the import
            return model.fit(X, y)
    except ValueError as e:
        if not params:  # not a user's mistake: a bug to report whole
            raise
        # parameters valid alone but not together (logreg penalty='l1' with solver='lbfgs')
        raise UserError(f"head {head} cannot train with --param "
                        f"{', '.join(f'{k}={v!r}' for k, v in params.items())}: {e}") from None


def _evaluate(fresh, sel, folds, head: str, params: dict):
    """Fit and score a fresh pipeline per fold: (the last model, the figures)."""
    fold_metrics, train_s, predict_s, y_true, y_pred, model = [], 0.0, 0.0, [], [], None
    for train_idx, test_idx in folds:
        t0 = time.perf_counter()
        model = _fit(fresh(), sel.X[train_idx], sel.y[train_idx], head, params)
        t1 = time.perf_counter()
        pred = model.predict(sel.X[test_idx])
        scores = heads.scores(model, sel.X[test_idx])
        predict_s += time.perf_counter() - t1
        train_s += t1 - t0
        fold_metrics.append(report.evaluate(sel.y[test_idx], pred, scores, len(sel.classes)))
        y_true.append(sel.y[test_idx])
        y_pred.append(pred)
    metrics = fold_metrics[0] if len(folds) == 1 else report.summarize_folds(fold_metrics)
    return model, {"metrics": metrics, "folds": fold_metrics, "train_s": train_s / len(folds),
                   "predict_s": predict_s / len(folds), "y_true": np.concatenate(y_true),
                   "y_pred": np.concatenate(y_pred)}


def _write_run(run_dir, record, split, text, model, fitted) -> Path:
    writer = runs.RunWriter(run_dir)
    try:
        record["confusion_png"] = report.confusion_png(
            fitted["y_true"], fitted["y_pred"], record["classes"], writer.path("confusion.png"))
        writer.json("run.json", record)
        writer.json("metrics.json", record["metrics"])
        writer.json("split.json", split)
        writer.text("report.txt", text)
        writer.model(model)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise
