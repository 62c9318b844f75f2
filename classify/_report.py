"""Metrics, the per-class report and the run's pictures (scikit-learn, matplotlib).

Pictures are drawn on `matplotlib.figure.Figure` objects, never through pyplot: the process's
backend and pyplot's global figures belong to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn import metrics

MAX_REPORT_CLASSES = 30  # the per-class report is printed up to this many classes
# Up to this many classes the confusion matrix is drawn with a count in every cell; above it
# the cells are too small to read, so the most confused pairs are drawn instead.
MAX_CONFUSION_CLASSES = 30
TOP_CONFUSED_PAIRS = 20
MAX_F1_BARS = 100  # 62 classes (LFW >= 20 images) all shown
F1_COLUMN = 40  # more bars than this: two columns



@dataclass
class Fitted:
    """What evaluating a head on its folds gives: the `metrics` (of the one split, or
    summarised over the folds), each fold's, the mean seconds to train and to predict a
    fold, and the test rows' true and predicted classes and scores (for the report)."""

    metrics: dict
    folds: list
    train_s: float
    predict_s: float
    y_true: np.ndarray
    y_pred: np.ndarray
    scores: np.ndarray | None = None

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


def _headline(y_true, y_pred) -> str:
    acc = metrics.accuracy_score(y_true, y_pred)
    f1 = metrics.f1_score(y_true, y_pred, average="macro", zero_division=0)
    return f"{len(y_true)} test images: accuracy {acc:.4f}, macro F1 {f1:.4f}"


def _save(fig, path) -> None:
    fig.savefig(path, dpi=100)


def confusion_png(y_true, y_pred, classes, path) -> bool:
    """The row-normalised confusion matrix with each cell's count, a colour bar and a title
    with accuracy and macro F1; False (nothing written) above MAX_CONFUSION_CLASSES."""
    n = len(classes)
    if n > MAX_CONFUSION_CLASSES:
        return False
    from matplotlib.figure import Figure
    cm = metrics.confusion_matrix(y_true, y_pred, labels=np.arange(n))
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    size = max(5.0, 0.32 * n + 3)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    image = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    font = max(5, min(10, 160 // n))
    for i, j in zip(*np.nonzero(cm)):
        ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=font,
                color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(np.arange(n), classes, rotation=90, fontsize=font + 1)
    ax.set_yticks(np.arange(n), classes, fontsize=font + 1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(_headline(y_true, y_pred), fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


def confused_pairs(y_true, y_pred, classes, top: int = TOP_CONFUSED_PAIRS) -> list[dict]:
    """The `top` (true, predicted) pairs of different classes with the most test images."""
    n = len(classes)
    cm = metrics.confusion_matrix(y_true, y_pred, labels=np.arange(n))
    support = cm.sum(axis=1)
    np.fill_diagonal(cm, 0)
    order = np.argsort(-cm, axis=None, kind="stable")[:top]
    pairs = []
    for i, j in zip(*np.unravel_index(order, cm.shape)):
        if cm[i, j] == 0:
            break
        pairs.append({"true": classes[i], "predicted": classes[j], "count": int(cm[i, j]),
                      "fraction": float(cm[i, j] / support[i])})
    return pairs


def confused_pairs_png(y_true, y_pred, classes, path, top: int = TOP_CONFUSED_PAIRS) -> bool:
    """For many classes: the most confused pairs as bars (count, and the share of the true
    class's test images), titled with accuracy and macro F1."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    pairs = confused_pairs(y_true, y_pred, classes, top)
    fig = Figure(figsize=(8, max(2.5, 0.3 * len(pairs) + 1.2)))
    ax = fig.subplots()
    if pairs:
        labels = [f"{p['true']} → {p['predicted']}" for p in pairs][::-1]
        counts = [p["count"] for p in pairs][::-1]
        ax.barh(np.arange(len(pairs)), counts, color="#4c72b0")
        ax.set_yticks(np.arange(len(pairs)), labels, fontsize=8)
        for k, p in enumerate(pairs[::-1]):
            ax.text(p["count"], k, f" {p['count']} ({p['fraction']:.0%} of {p['true']})",
                    va="center", fontsize=7)
        ax.set_xlim(0, max(counts) * 1.45)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # counts of images
        ax.set_xlabel("test images (true → predicted)")
    else:
        ax.text(0.5, 0.5, "no test image was misclassified", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title(f"{len(classes)} classes, the {len(pairs)} most confused pairs\n"
                 + _headline(y_true, y_pred), fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


def f1_png(y_true, y_pred, classes, path, most: int = MAX_F1_BARS) -> None:
    """Per-class F1 as horizontal bars, worst at the top, with each class's test count; the
    `most` worst classes when there are more. Above F1_COLUMN classes the bars go into two
    columns (worst first, top to bottom, then the second column), so labels stay readable."""
    from matplotlib.figure import Figure
    _, _, f1, support = metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(len(classes)), zero_division=0)
    macro = float(f1.mean())
    worst_first = np.argsort(f1, kind="stable")[:most]
    columns = np.array_split(worst_first, 2 if len(worst_first) > F1_COLUMN else 1)
    rows = len(columns[0])
    fig = Figure(figsize=(6.5 * len(columns), max(2.5, 0.2 * rows + 1.4)))
    axes = np.atleast_1d(fig.subplots(1, len(columns)))
    for ax, column in zip(axes, columns):
        order = column[::-1]  # barh draws bottom-up: the worst ends on top
        ax.barh(np.arange(len(order)), f1[order], color="#55a868")
        ax.set_yticks(np.arange(len(order)),
                      [f"{classes[k]} ({support[k]})" for k in order], fontsize=7)
        ax.set_ylim(-0.6, rows - 0.4)
        ax.set_xlim(0, 1)
        ax.axvline(macro, color="black", linestyle="--", linewidth=1)
        ax.set_xlabel(f"F1 (dashed: macro F1 {macro:.4f}); (test images)", fontsize=8)
    shown = "" if len(worst_first) == len(classes) else \
        f", the {len(worst_first)} worst of {len(classes)} classes"
    fig.suptitle(f"per-class F1, worst first{shown}", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def worst_errors(y_true, y_pred, scores=None) -> list[tuple[int, float | None]]:
    """(row, score of the predicted class) of the misclassified rows, the worst first: the
    largest margin of the predicted class's score over the true class's."""
    wrong = np.flatnonzero(np.asarray(y_true) != np.asarray(y_pred))
    if scores is None or len(wrong) == 0:
        return [(int(i), None) for i in wrong]
    s = np.asarray(scores, dtype=float)
    if s.ndim == 1:  # a binary decision function: the score of class 1
        s = np.stack([-s, s], axis=1)
    pred_score = s[wrong, np.asarray(y_pred)[wrong]]
    margin = pred_score - s[wrong, np.asarray(y_true)[wrong]]
    order = np.argsort(-margin, kind="stable")
    return [(int(wrong[k]), float(pred_score[k])) for k in order]


def format_metrics(m: dict) -> str:
    parts = []
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy"):
        if key in m:
            std = f" ± {m[key + '_std']:.4f}" if key + "_std" in m else ""
            parts.append(f"{key} {m[key]:.4f}{std}")
    return ", ".join(parts)
