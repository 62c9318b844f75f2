"""Train a head on a cache, evaluate it on the fixed split, and save the run."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np

# scikit-learn's parallel parts here (the SVM's calibration folds) release the GIL: threads
# run them on every core without starting worker processes (9.0 s instead of 10.2 s).
from joblib import parallel_config

from classify import (
    _data as data,
    _heads as heads,
    _openset as openset,
    _report as report,
    _runs as runs,
)
from classify._options import DEFAULT_HEAD, TrainOptions
from classify._runs import Run
from featurize import cache as cache_io
from featurize.errors import UserError


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


def read_cache(cache):
    """(Cache, path) for a Cache already read (notebooks, benchmarks), a path, or None (the
    newest cache under data/cache/)."""
    if isinstance(cache, cache_io.Cache):
        return cache, Path(cache.path)
    path = Path(data.find_cache(cache))
    return cache_io.read(path), path


def fit_run(cache, options: TrainOptions, save_to=None) -> Run:
    """Train and evaluate `options.head` on a cache: a Run, written to `save_to` if given
    (no file at all otherwise). `options` was checked when made; the destination is
    checked before the cache is read, so a mistake costs nothing."""
    o = options
    if save_to is not None:
        runs.check_destination(Path(save_to))
    c, path = read_cache(cache)
    if o.open_set:  # whole people held out as unknowns (classify/openset.py)
        sel, unknowns = data.open_set_selection(c, o)
    else:
        sel, unknowns = data.select(c, o.min_per_class, o.max_per_class, min_needed=o.cv or 2,
                                    cv=o.cv), None
    warnings = [w for w in [incomplete_warning(c)] if w]
    normalize = data.default_normalize(c.attrs.get("backbone", "")) if o.normalize is None \
        else o.normalize
    folds = data.splits(sel.y, o.test_size, o.cv, o.seed)
    n_train = min(len(tr) for tr, _ in folds)
    heads.check_training_rows(o.spec, o.params, n_train)
    data.check_pca(o.pca, n_train, sel.X.shape[1])
    fresh = functools.partial(_fresh_pipeline, o, normalize)
    model, fitted = _evaluate(fresh, sel, folds, o.head, o.params)
    if o.cv:  # the saved head is fitted on all selected images; folds only measured it
        model = _fit(fresh(), sel.X, sel.y, o.head, o.params)
    rejector = None
    if unknowns is not None:  # its threshold from the training rows, judged on unseen people
        rejector, fitted.metrics["open_set"] = openset.evaluate(model, sel, folds[0],
                                                                   unknowns, o.target_far)
    record = _record(o, normalize, (path, c.attrs), sel, fitted, warnings)
    split = {"seed": o.seed, "test_size": None if o.cv else o.test_size, "cv": o.cv,
             "folds": [{"train": [sel.paths[i] for i in tr], "test": [sel.paths[i] for i in te]}
                       for tr, te in folds]}
    if rejector is not None:
        record["open_set"] = {**rejector.summary(), "unknown_fraction": o.unknown_fraction,
                              "max_unknown": o.max_unknown}
        split["unknown"] = unknowns.paths
    text = report.class_report(fitted.y_true, fitted.y_pred, sel.classes)
    write = functools.partial(_write_run, record=record, split=split, text=text, model=model,
                              fitted=fitted, rejector=rejector)
    run = Run(record, model, write=write, split=split, warnings=warnings, report_text=text,
              rejector=rejector)
    if save_to is not None:
        run.save(save_to)
    return run


def train(cache=None, head=DEFAULT_HEAD, params=(), out=None, runs_dir=runs.DEFAULT_DIR,
          **options) -> Run:
    """Train as `python -m classify` does: always writes the run folder, `out` or
    `runs_dir/<timestamp>-<head>`. `params` is a dict or `key=value` strings, `options`
    the other TrainOptions fields. (`classify.train` is the in-memory API.)"""
    opts = TrainOptions(head, params, **options)  # every option checked, before anything
    return fit_run(cache, opts, runs.new_dir(head, out, runs_dir))


def _fresh_pipeline(o: TrainOptions, normalize: bool):
    return data.pipeline(o.spec.make(**o.params), normalize, o.standardize, o.pca, o.seed)


def _record(o: TrainOptions, normalize: bool, cache, sel, fitted: report.Fitted,
            warnings) -> dict:
    """run.json's content. `cache`: (path, root attributes)."""
    path, attrs = cache
    return {
        "version": runs.RUN_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "head": o.head, "params": o.params,
        "features": {"normalize": normalize, "standardize": o.standardize, "pca": o.pca},
        "selection": {"min_per_class": o.min_per_class, "max_per_class": o.max_per_class},
        "evaluation": {"test_size": None if o.cv else o.test_size, "cv": o.cv, "seed": o.seed},
        "cache": str(path.resolve()), "provenance": provenance(attrs),
        "classes": sel.classes, "n_images": len(sel.y), "metrics": fitted.metrics,
        "folds": fitted.folds if o.cv else None, "train_seconds": fitted.train_s,
        "predict_seconds": fitted.predict_s, "notes": sel.notes + warnings,
        "score_kind": o.spec.scores,
    }


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
    test_scores = []  # for the report's gallery: the worst errors first
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
        test_scores.append(scores)
    metrics = fold_metrics[0] if len(folds) == 1 else report.summarize_folds(fold_metrics)
    return model, report.Fitted(metrics, fold_metrics, train_s / len(folds),
                                predict_s / len(folds), np.concatenate(y_true),
                                np.concatenate(y_pred), np.concatenate(test_scores))


def _write_run(writer: runs.RunWriter, record, split, text, model, fitted,
               rejector=None) -> None:
    """A trained run's files (Run.save commits or aborts the writer)."""
    from classify._html import write_run_report  # the pictures and report.html; never fails the run
    write_run_report(writer, record, split, fitted)
    writer.json("run.json", record)
    writer.json("metrics.json", record["metrics"])
    writer.json("split.json", split)
    writer.text("report.txt", text)
    writer.model(model)
    if rejector is not None:
        rejector.save(writer.path(openset.FILE))
