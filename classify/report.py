"""Metrics, the per-class report and the confusion-matrix picture (scikit-learn, matplotlib)."""

from __future__ import annotations

import numpy as np
from sklearn import metrics

MAX_REPORT_CLASSES = 30  # the per-class report is printed up to this many classes
MAX_CONFUSION_CLASSES = 50  # the confusion picture is drawn up to this many


def evaluate(y_true, y_pred, scores=None, n_classes: int | None = None) -> dict:
    out = {"accuracy": metrics.accuracy_score(y_true, y_pred),
           "balanced_accuracy": metrics.balanced_accuracy_score(y_true, y_pred),
           "macro_f1": metrics.f1_score(y_true, y_pred, average="macro", zero_division=0)}
    n_classes = n_classes or (scores.shape[1] if scores is not None else 0)
    if scores is not None and n_classes > 5:
        out["top5_accuracy"] = metrics.top_k_accuracy_score(y_true, scores, k=5,
                                                            labels=np.arange(n_classes))
    return {k: float(v) for k, v in out.items()}


def summarize_folds(folds: list[dict]) -> dict:
    """Mean and standard deviation of each metric over cross-validation folds."""
    keys = folds[0].keys()
    return {**{k: float(np.mean([f[k] for f in folds])) for k in keys},
            **{f"{k}_std": float(np.std([f[k] for f in folds])) for k in keys}}


def class_report(y_true, y_pred, classes) -> str:
    return metrics.classification_report(y_true, y_pred, labels=np.arange(len(classes)),
                                         target_names=classes, zero_division=0)


def confusion_png(y_true, y_pred, classes, path) -> bool:
    if len(classes) > MAX_CONFUSION_CLASSES:
        return False
    from matplotlib.figure import Figure  # no pyplot: the process's backend is not ours
    size = max(5, 0.25 * len(classes) + 3)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    metrics.ConfusionMatrixDisplay.from_predictions(
        y_true, y_pred, labels=np.arange(len(classes)), display_labels=classes, ax=ax,
        xticks_rotation="vertical", colorbar=False, include_values=len(classes) <= 15)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def format_metrics(m: dict) -> str:
    parts = []
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy"):
        if key in m:
            std = f" ± {m[key + '_std']:.4f}" if key + "_std" in m else ""
            parts.append(f"{key} {m[key]:.4f}{std}")
    return ", ".join(parts)
