"""Face verification on LFW pair files, with the standard threshold protocol.

View 2 `pairs.txt`: first line `10 300`, then 10 folds of 300 matched lines `name i j` and
300 mismatched lines `name1 i name2 j`. View 1 `pairsDevTrain.txt`/`pairsDevTest.txt`: first
line the number N of matched pairs, then N matched and N mismatched lines.

For each fold, the distance threshold that maximises accuracy on the other folds is applied
to the held-out fold; the report gives the mean and standard deviation over folds. With a
separate training file (View 1: threshold on pairsDevTrain, accuracy on pairsDevTest), the
threshold comes from that file. A single View 1 file alone is cut into 10 folds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from featurize.errors import UserError

N_FOLDS_VIEW1 = 10


@dataclass
class Pair:
    a: str  # cache paths, e.g. "Name/Name_0001.jpg"
    b: str
    same: bool
    fold: int


def image_path(name: str, number: str, where: str) -> str:
    try:
        return f"{name}/{name}_{int(number):04d}.jpg"
    except ValueError:
        raise UserError(f"{where}: {number!r} is not an image number; pair lines are "
                        "'name i j' or 'name1 i name2 j'.") from None


def parse_pairs(path) -> list[Pair]:
    path = Path(path)
    try:
        lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read pairs file {path} ({e}); give an LFW pairs file.") from None
    if not lines:
        raise UserError(f"pairs file {path} is empty; give an LFW pairs file.")
    try:
        header = [int(t) for t in lines[0]]
    except ValueError:
        header = []
    if len(header) == 2:
        folds, per = header
    elif len(header) == 1:
        folds, per = 1, header[0]
    if len(header) not in (1, 2) or folds < 1 or per < 1:
        raise UserError(f"{path}:1: expected '10 300' (View 2) or a pair count (View 1), got "
                        f"{' '.join(lines[0])!r}.")
    body = lines[1:]
    if len(body) != folds * 2 * per:
        raise UserError(f"{path}: the header promises {folds * 2 * per} pairs but the file has "
                        f"{len(body)} lines; is the file complete?")
    pairs = []
    for n, tokens in enumerate(body):
        fold, within = divmod(n, 2 * per)
        where = f"{path}:{n + 2}"
        if within < per:
            if len(tokens) != 3:
                raise UserError(f"{where}: a matched pair is 'name i j', got {' '.join(tokens)!r}.")
            name, i, j = tokens
            pairs.append(Pair(image_path(name, i, where), image_path(name, j, where), True, fold))
        else:
            if len(tokens) != 4:
                raise UserError(f"{where}: a mismatched pair is 'name1 i name2 j', got "
                                f"{' '.join(tokens)!r}.")
            n1, i, n2, j = tokens
            pairs.append(Pair(image_path(n1, i, where), image_path(n2, j, where), False, fold))
    if folds == 1:  # a View 1 file: interleave matched and mismatched pairs into 10 folds
        for k, p in enumerate(q for q in pairs if q.same):
            p.fold = k % N_FOLDS_VIEW1
        for k, p in enumerate(q for q in pairs if not q.same):
            p.fold = k % N_FOLDS_VIEW1
    return pairs


def distances(c, pairs: list[Pair], metric: str = "cosine", skip_missing: bool = False):
    """Distances of the pairs whose images are in cache `c` (and the pairs kept)."""
    index = {p: i for i, p in enumerate(c.paths)}
    missing = sorted({p for pair in pairs for p in (pair.a, pair.b) if p not in index})
    if missing and not skip_missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        shown = ", ".join(missing[:5]) + more
        raise UserError(f"{len(missing)} images of the pairs are not in {c.path}: {shown}; "
                        "featurize the whole dataset, or pass --skip-missing.")
    kept = [p for p in pairs if p.a in index and p.b in index]
    if not kept:
        raise UserError(f"no pair has both images in {c.path}; is it the cache of LFW?")
    a = c.embeddings[[index[p.a] for p in kept]]
    b = c.embeddings[[index[p.b] for p in kept]]
    if metric == "cosine":
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return 1.0 - (a * b).sum(axis=1), kept
    return np.linalg.norm(a - b, axis=1), kept


def best_threshold(d: np.ndarray, same: np.ndarray) -> float:
    """The threshold t (same when distance <= t) with the best accuracy on (d, same)."""
    order = np.argsort(d, kind="stable")
    ds, s = d[order], same[order].astype(bool)
    # correct(i): the i smallest distances called "same", the rest "different".
    correct = (np.concatenate([[0], np.cumsum(s)])
               + ((~s).sum() - np.concatenate([[0], np.cumsum(~s)])))
    valid = np.ones(len(ds) + 1, dtype=bool)
    valid[1:-1] = ds[1:] > ds[:-1]  # only cut between distinct distances
    i = int(np.flatnonzero(valid)[np.argmax(correct[valid])])
    if i == 0:
        return float(ds[0] - 1e-6)
    if i == len(ds):
        return float(ds[-1] + 1e-6)
    return float((ds[i - 1] + ds[i]) / 2)


def accuracy(d, same, threshold) -> float:
    return float(((d <= threshold) == same.astype(bool)).mean())


def evaluate(d, pairs: list[Pair], train=None) -> dict:
    """Fold accuracies with thresholds from the other folds (or from `train` = (d, same))."""
    same = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    accs, thresholds = [], []
    for k in np.unique(folds):
        held = folds == k
        if train is not None:
            t = best_threshold(*train)
        else:
            t = best_threshold(d[~held], same[~held])
        thresholds.append(t)
        accs.append(accuracy(d[held], same[held], t))
    out = {"accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
           "fold_accuracies": accs, "thresholds": thresholds,
           "roc_auc": float(roc_auc_score(same, -d)), "pairs": int(len(d))}
    if train is not None:
        t = best_threshold(*train)
        out.update(threshold=t, accuracy_all=accuracy(d, same, t))
    return out


def curves_figure(d, same, threshold: float, label: str = ""):
    """ROC and DET curves on a log-scale false-positive axis, the threshold's operating point
    marked, the ROC AUC to 4 decimals: a matplotlib Figure (no pyplot)."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve
    same = np.asarray(same, dtype=bool)
    fpr, tpr, _ = roc_curve(same, -d)
    auc = roc_auc_score(same, -d)
    floor = 0.5 / max(int((~same).sum()), 1)  # below one false accept: the log axis's end
    op_fpr, op_tpr = float((d[~same] <= threshold).mean()), float((d[same] <= threshold).mean())
    fig = Figure(figsize=(10, 4.6))
    roc, det = fig.subplots(1, 2)
    roc.plot(np.maximum(fpr, floor), tpr, color="#1f77b4",
             label=f"{label or 'pairs'} (AUC {auc:.4f})")
    det.plot(np.maximum(fpr, floor), np.maximum(1 - tpr, floor), color="#1f77b4")
    mark = f"threshold {threshold:.4f}: FPR {op_fpr:.4f}, TPR {op_tpr:.4f}"
    roc.plot(max(op_fpr, floor), op_tpr, "o", color="#d62728", label=mark)
    det.plot(max(op_fpr, floor), max(1 - op_tpr, floor), "o", color="#d62728", label=mark)
    for ax in (roc, det):
        ax.set_xscale("log")
        ax.set_xlim(floor * 0.8, 1.02)
        ax.set_xlabel("false positive rate (mismatched pairs accepted, log scale)")
        ax.grid(True, which="both", alpha=0.3)
    roc.set_ylim(0, 1.01)
    roc.set_ylabel("true positive rate (matched pairs accepted)")
    roc.set_title(f"ROC, AUC {auc:.4f}", fontsize=10)
    roc.legend(loc="lower right", fontsize=8)
    det.set_yscale("log")
    det.set_ylim(floor * 0.8, 1.02)
    det.set_ylabel("false negative rate (matched pairs rejected, log scale)")
    det.set_title("DET", fontsize=10)
    det.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def roc_png(d, same, path, label="", threshold=None) -> None:
    """The ROC + DET picture, written beside `path` and renamed: a failure leaves no file.
    `threshold`: the operating point to mark (default: the best on these pairs)."""
    path = Path(path)
    if threshold is None:
        threshold = best_threshold(d, np.asarray(same))
    fig = curves_figure(d, same, threshold, label)
    from featurize.reporting import write_atomic
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format=path.suffix[1:].lower()),
                 "--roc")


def check_roc_path(roc_path) -> None:
    """--roc names a picture in an existing folder: checked before any computing."""
    if not roc_path:
        return
    from matplotlib.backend_bases import FigureCanvasBase
    path, kinds = Path(roc_path), FigureCanvasBase.get_supported_filetypes()
    if path.is_dir():
        raise UserError(f"--roc {path} is a folder; give a file name such as {path / 'roc.png'}.")
    if path.suffix[1:].lower() not in kinds:
        raise UserError(f"--roc {path}: the picture's name must end in one of "
                        f"{', '.join('.' + k for k in sorted(kinds))} (e.g. roc.png).")
    if not path.parent.is_dir():
        raise UserError(f"--roc {path}: folder {path.parent} does not exist; create it or "
                        "choose another --roc.")


def check_pairs(pairs: list[Pair], where, protocol: bool) -> np.ndarray:
    """`same` of the pairs kept; both kinds are needed (else any threshold, accuracy and ROC
    AUC are meaningless), and the 10-fold `protocol` needs two folds at least."""
    same = np.array([p.same for p in pairs])
    if same.all() or not same.any():
        kind = "matched" if same.all() else "mismatched"
        raise UserError(f"only {kind} pairs are left of {where} ({len(pairs)}, the others "
                        "skipped by --skip-missing); accuracy and ROC AUC would be meaningless. "
                        "Featurize the missing images.")
    folds = len({p.fold for p in pairs})
    if protocol and folds < 2:
        raise UserError(f"{where} gives {folds} fold: the 10-fold protocol picks each fold's "
                        "threshold on the other folds, so it needs at least 2; give a file "
                        "with more pairs, or pass --train-pairs.")
    return same


def verify(cache_path, pairs_file, train_pairs=None, metric="cosine", skip_missing=False,
           roc_path=None, out=None) -> dict:
    """The protocol's figures as a JSON-ready dict (`classify.verify` wraps them in a
    Verification). `cache_path`: a cache file, a Cache already read, or None (the newest).
    `out`: a new folder for verification.json, roc.png (ROC + DET) and report.html."""
    from classify import _runs as runs
    from classify._train import read_cache
    if metric not in ("cosine", "euclidean"):
        raise UserError(f"--metric must be cosine or euclidean, not {metric!r}.")
    check_roc_path(roc_path)
    if out is not None:
        runs.check_destination(Path(out))
    c, cache_path = read_cache(cache_path)
    pairs = parse_pairs(pairs_file)
    train = None
    if train_pairs:
        td, tkept = distances(c, parse_pairs(train_pairs), metric, skip_missing)
        train = (td, check_pairs(tkept, train_pairs, protocol=False))
    d, kept = distances(c, pairs, metric, skip_missing)
    same = check_pairs(kept, pairs_file, protocol=train is None)
    result = evaluate(d, kept, train)
    result.update(metric=metric, skipped=len(pairs) - len(kept), cache=str(cache_path),
                  pairs_file=str(pairs_file), train_pairs=str(train_pairs) if train_pairs else None)
    # Last: a failed verification writes nothing. The marked threshold: the one chosen on
    # the training pairs, else the mean of the folds' own.
    threshold = result.get("threshold", float(np.mean(result["thresholds"])))
    if roc_path:
        roc_png(d, same, roc_path, c.attrs.get("backbone", ""), threshold)
        result["roc_png"] = str(roc_path)
    if out is not None:
        result["out"] = str(write_folder(Path(out), result, (d, same, kept), threshold, c))
    return result


def write_folder(out: Path, result: dict, pairs, threshold: float, c) -> Path:
    """verification.json, roc.png and report.html in a new folder `out`, written under a
    temporary name and renamed when complete."""
    from classify import _html as html, _runs as runs
    d, same, kept = pairs
    writer = runs.RunWriter(out)
    try:
        roc_png(d, same, writer.path("roc.png"), c.attrs.get("backbone", ""), threshold)
        try:
            page = html.verify_page(result, d, kept, c.attrs.get("dataset_root", ""),
                                    writer.path("roc.png"), threshold)
            writer.text("report.html", page)
        except Exception as e:  # noqa: BLE001 - the figures matter more than their page
            result["notes"] = [f"report.html could not be written ({type(e).__name__}: {e})"]
        writer.json("verification.json", result)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise
