"""report.html of a run, a fine-tune and a verification, and the page comparing runs.

Each page is one self-contained file (Jinja2 templates in classify/templates/): its pictures
are inlined as data: URIs (the PNGs also lie beside it in the run folder), thumbnails are
small JPEGs, and nothing is fetched when it is viewed. Writing a run's report never fails
the run: any error becomes a note, and thumbnails are capped (MAX_THUMBNAILS).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import time
import urllib.parse
from pathlib import Path

import numpy as np

from featurize.errors import UserError
from featurize.reporting import palette, png_uri, thumbnail_uri, write_text_atomic

MAX_THUMBNAILS = 48  # per gallery: a few ms each, so the report costs a run well under 1 s
HARDEST_PAIRS = 12
GALLERY_SIDE = 110
PAIR_SIDE = 80


@functools.lru_cache(maxsize=1)
def _environment():
    import jinja2
    return jinja2.Environment(loader=jinja2.PackageLoader("classify", "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined)


def render(template: str, **context) -> str:
    return _environment().get_template(template).render(**context)


def _figure(path, alt: str) -> dict:
    return {"uri": png_uri(path), "alt": alt}


def _thumbnail(root: str, key: str, side: int) -> str | None:
    from featurize.data.images import source_path
    return thumbnail_uri(source_path(root, key), side)


def gallery(root, paths, y_true, y_pred, scores, classes, limit=MAX_THUMBNAILS,
            kind: str = "score") -> dict:
    """The misclassified test images, the worst first, as thumbnails; images that cannot be
    shown (missing, a URL, not an image) are left out with a note. `kind`: what the scores
    are (the run's score_kind: probability, or a head's decision value)."""
    from classify._report import worst_errors
    errors = worst_errors(y_true, y_pred, scores)
    items, skipped = [], []
    for row, score in errors[:limit]:
        uri = _thumbnail(root, paths[row], GALLERY_SIDE)
        if uri is None:
            skipped.append(paths[row])
            continue
        items.append({"uri": uri, "path": paths[row], "true": classes[y_true[row]],
                      "predicted": classes[y_pred[row]], "score": score})
    notes = []
    if skipped:
        notes.append(f"{len(skipped)} of the images could not be shown (missing under {root}, "
                     f"a URL, or unreadable), e.g. {skipped[0]}.")
    return {"cards": items, "total": len(errors), "notes": notes, "kind": kind}


def _settings(record: dict) -> list[tuple[str, str]]:
    keys = ("head", "params", "features", "selection", "evaluation", "created", "n_images",
            "train_seconds", "predict_seconds", "cache", "finetuned_from", "epochs_run",
            "seconds_per_epoch", "paid", "trained_layers")
    rows = [(k, _short(record[k])) for k in keys if record.get(k) not in (None, "", [])]
    return rows + [("classes", f"{len(record['classes'])}: {', '.join(record['classes'][:40])}"
                    + (" ..." if len(record["classes"]) > 40 else ""))]


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) < 300 else text[:300] + " ..."


def _provenance(record: dict) -> list[tuple[str, str]]:
    return [(k, _short(v)) for k, v in sorted(record.get("provenance", {}).items())]


def _pictures(writer, prefix: str, y_true, y_pred, classes) -> dict:
    """The confusion picture (matrix, or the most confused pairs for many classes) and the
    per-class F1 bars, written into the run folder; their inlined copies for the page."""
    from classify import _report as report
    name = f"{prefix}confusion.png"
    drawn = report.confusion_png(y_true, y_pred, classes, writer.path(name))
    if not drawn:
        name = f"{prefix}confused_pairs.png"
        report.confused_pairs_png(y_true, y_pred, classes, writer.path(name))
    f1_name = f"{prefix}f1.png"
    report.f1_png(y_true, y_pred, classes, writer.path(f1_name))
    return {"confusion": [_figure(writer.path(name), "confusion")],
            "f1": [_figure(writer.path(f1_name), "per-class F1")], "files": [name, f1_name],
            "matrix": drawn}


def _safely(write, record: dict) -> None:
    """Run a report writer; a failure is a note in the run, never a failed run."""
    try:
        write()
    except Exception as e:  # noqa: BLE001 - the run's own files matter more than its report
        record["notes"] = [*record.get("notes", []),
                           f"report.html could not be written ({type(e).__name__}: {e})"]


def write_run_report(writer, record: dict, split: dict, fitted) -> None:
    """A trained run's pictures and report.html; sets record['confusion_png'] and
    record['report_html']. Never raises."""
    record["confusion_png"] = False
    record.pop("report_html", None)  # set once the page is written
    _safely(functools.partial(_run_report, writer, record, split, fitted), record)


def _run_report(writer, record, split, fitted) -> None:
    classes, y_true, y_pred = record["classes"], fitted.y_true, fitted.y_pred
    pics = _pictures(writer, "", y_true, y_pred, classes)
    record["confusion_png"] = pics["matrix"]
    paths = [p for fold in split["folds"] for p in fold["test"]]  # the order of y_true
    root = record.get("provenance", {}).get("dataset_root", "")
    cv = record.get("folds") and len(record["folds"]) > 1
    page = render("run.html", title=f"{record['head']} run: {_headline(record['metrics'])}",
                  subtitle=_subtitle(record), notes=record.get("notes", []),
                  metrics=record["metrics"], folds=record["folds"] if cv else None,
                  confusion=pics["confusion"], f1=pics["f1"], before=None,
                  gallery=gallery(root, paths, y_true, y_pred, fitted.scores, classes,
                                  kind=record.get("score_kind", "score")),
                  settings=_settings(record), provenance=_provenance(record))
    writer.text("report.html", page)
    record["report_html"] = "report.html"


def write_finetune_report(writer, record: dict, split: dict, test) -> None:
    """A fine-tuned run's report: before and after side by side. `test`: the test images'
    labels and scores after and before (classify._finetune.TestScores). Never raises."""
    record["confusion_png"] = False
    record.pop("report_html", None)  # the source run's, copied with its record
    _safely(functools.partial(_finetune_report, writer, record, split, test), record)


def _finetune_report(writer, record, split, test) -> None:
    from classify._report import evaluate
    classes, y_true = record["classes"], test.y
    after_scores, before_scores = test.after, test.before
    paths = list(split["folds"][0]["test"])
    root = record.get("provenance", {}).get("dataset_root", "")
    sides = {}
    for side, scores in (("before", before_scores), ("after", after_scores)):
        pred = np.asarray(scores).argmax(axis=1)
        pics = _pictures(writer, f"{side}_" if side == "before" else "", y_true, pred, classes)
        sides[side] = {**pics, "metrics": evaluate(y_true, pred, scores, len(classes)),
                       "gallery": gallery(root, paths, y_true, pred, scores, classes,
                                          kind="probability")}
    record["confusion_png"] = sides["after"]["matrix"]
    page = render("run.html", title=f"fine-tune: {_headline(record['metrics_before'])} → "
                  f"{_headline(record['metrics'])}", subtitle=_subtitle(record),
                  notes=record.get("notes", []), metrics=record["metrics"], folds=None,
                  before=sides["before"], after=sides["after"], confusion=None, f1=None,
                  gallery=None, settings=_settings(record), provenance=_provenance(record))
    writer.text("report.html", page)
    record["report_html"] = "report.html"


def _headline(m: dict) -> str:
    return f"accuracy {m['accuracy']:.4f}, macro F1 {m['macro_f1']:.4f}"


def _subtitle(record: dict) -> str:
    backbone = record.get("provenance", {}).get("backbone", "?")
    return (f"{backbone} embeddings, {len(record['classes'])} classes, {record['n_images']} "
            f"images; cache {Path(record['cache']).name}; {record.get('created', '')}")


def _pair_cards(root: str, pairs, distances, order, threshold: float):
    """Thumbnails of the pairs in `order` (the hardest first), each marked when the threshold
    decides it wrongly; and notes on pairs that cannot be shown."""
    cards, skipped = [], 0
    for k in order[:HARDEST_PAIRS]:
        p = pairs[k]
        a, b = _thumbnail(root, p.a, PAIR_SIDE), _thumbnail(root, p.b, PAIR_SIDE)
        if a is None or b is None:
            skipped += 1
            continue
        wrong = (distances[k] > threshold) if p.same else (distances[k] <= threshold)
        cards.append({"a": p.a, "b": p.b, "a_uri": a, "b_uri": b,
                      "distance": float(distances[k]), "wrong": bool(wrong)})
    notes = [f"{skipped} pairs could not be shown: an image is missing under {root}, a URL, "
             "or unreadable."] if skipped else []
    return cards, notes


def verify_page(result: dict, d, kept, root: str, curves_png, threshold: float) -> str:
    """report.html of a verification: figures, ROC + DET, the hardest pairs of each kind."""
    same = np.array([p.same for p in kept])
    hardest = []
    for is_same, title, explain, wrong in (
            (True, "Hardest matched pairs", "Same person, largest distances first.", "rejected"),
            (False, "Hardest mismatched pairs", "Different people, smallest distances first.",
             "accepted")):
        idx = np.flatnonzero(same == is_same)
        order = idx[np.argsort(-d[idx] if is_same else d[idx], kind="stable")]
        cards, notes = _pair_cards(root, kept, d, order, threshold)
        hardest.append({"title": title, "explain": explain, "pairs": cards, "notes": notes,
                        "wrong": wrong})
    figures = [("pairs used (skipped)", f"{result['pairs']} ({result['skipped']})"),
               ("accuracy over folds", f"{result['accuracy']:.4f} ± {result['accuracy_std']:.4f}"
                f" ({len(result['fold_accuracies'])} folds)"),
               ("ROC AUC", f"{result['roc_auc']:.4f}")]
    if result.get("threshold") is not None:
        figures.append((f"threshold chosen on {Path(result['train_pairs']).name}",
                        f"{result['threshold']:.4f}: accuracy {result['accuracy_all']:.4f}"))
    else:
        figures.append(("fold thresholds (each chosen on the other folds)",
                        f"{np.mean(result['thresholds']):.4f} mean"))
    settings = [(k, _short(result[k])) for k in ("cache", "pairs_file", "train_pairs", "metric")
                if result.get(k)]
    return render("verify.html", title=f"verification: accuracy {result['accuracy']:.4f}, "
                  f"ROC AUC {result['roc_auc']:.4f}", subtitle=f"{Path(result['pairs_file']).name}"
                  f" on {Path(result['cache']).name}", figures=figures,
                  curves=[_figure(curves_png, "ROC and DET curves")], hardest=hardest,
                  settings=settings, threshold=threshold)


def collect_runs(base) -> tuple[list[dict], list[str]]:
    """Every run under `base` (newest first) for the comparison page, and notes on the
    folders that could not be read."""
    rows, notes = [], []
    for run_json in sorted(Path(base).glob("*/run.json")):
        try:
            r = json.loads(run_json.read_text())
            m = r["metrics"]
            rows.append({"name": run_json.parent.name, "created": r.get("created", ""),
                         "head": r["head"], "backbone": r["provenance"].get("backbone", "?"),
                         "classes": len(r["classes"]), "images": r.get("n_images", ""),
                         "acc": float(m["accuracy"]), "f1": float(m.get("macro_f1", "nan")),
                         "seconds": float(r["train_seconds"]), "cache": Path(r["cache"]).name,
                         "dir": run_json.parent})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            notes.append(f"{run_json} is damaged; left out.")
    rows.sort(key=lambda r: (r["created"], r["name"]), reverse=True)
    return rows, notes


def runs_chart(rows: list[dict]) -> bytes:
    """Accuracy against training time (log scale): colour per head, marker per backbone."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    heads = sorted({r["head"] for r in rows})
    backbones = sorted({r["backbone"] for r in rows})
    colours, markers = palette(len(heads)), "osD^vP*Xh<>"
    fig = Figure(figsize=(9, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for r in rows:
        ax.scatter(max(r["seconds"], 1e-3), r["acc"], s=60, alpha=0.85,
                   c=colours[heads.index(r["head"])],
                   marker=markers[backbones.index(r["backbone"]) % len(markers)])
    for k, h in enumerate(heads):
        ax.scatter([], [], c=colours[k], marker="s", label=f"head {h}")
    for k, b in enumerate(backbones):
        ax.scatter([], [], c="grey", marker=markers[k % len(markers)], label=f"backbone {b}")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short ranges
    ax.margins(x=0.15, y=0.1)
    ax.set_xlabel("training time per fit (s, log scale)")
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_title(f"{len(rows)} runs: accuracy against training time", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def check_html_out(out) -> Path:
    """--html names a new or existing .html file in an existing folder: checked first."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--html {out} is a folder; give a file name such as {out / 'runs.html'}.")
    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--html {out}: the page's name must end in .html (e.g. runs.html).")
    if not out.parent.is_dir():
        raise UserError(f"--html {out}: folder {out.parent} does not exist; create it or choose "
                        "another --html.")
    return out


def runs_page(base, out) -> dict:
    """The page comparing every run under `base`, written to `out` (a .html file)."""
    out = check_html_out(out)
    rows, notes = collect_runs(base)
    if not rows:
        raise UserError(f"no runs under {base}/ to compare; train one with python -m classify "
                        "--head logreg, or pass --runs-dir.")
    chart = "data:image/png;base64," + base64.b64encode(runs_chart(rows)).decode("ascii")
    shown = [{**r, "accuracy": f"{r['acc']:.4f}", "macro_f1": f"{r['f1']:.4f}",
              "train_s": f"{r['seconds']:.2f}", "report": _link(r["dir"], out)} for r in rows]
    page = render("runs.html", title=f"{len(rows)} runs under {base}",
                  subtitle=f"written {time.strftime('%Y-%m-%d %H:%M:%S')}; each run's name links "
                  "to its report.html", chart=chart, runs=shown, notes=notes)
    write_text_atomic(out, page, "--html")
    return {"runs": len(rows), "html": str(out)}


def _link(run_dir: Path, out: Path) -> str | None:
    report = run_dir / "report.html"
    if not report.is_file():
        return None
    relative = Path(os.path.relpath(report.resolve(), out.resolve().parent)).as_posix()
    return urllib.parse.quote(relative)  # a folder named "a #1?" is still one link


