"""Run folders: everything a trained head needs to be trusted, compared and used again.

    runs/<timestamp>-<head>/
        run.json       settings, cache path and provenance, classes, metrics, times
        split.json     the train/test paths (identical for every head on the same cache)
        metrics.json   the metrics alone
        report.txt     scikit-learn's per-class report
        confusion.png  confusion matrix (up to 50 classes)
        head.joblib    the fitted Pipeline (features + head)
        head.keras     the dense head's Keras model, for use outside this tool

A run folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import joblib

from featurize.errors import UserError

DEFAULT_DIR = Path("runs")
RUN_VERSION = 1


def new_dir(head: str, out=None, base=DEFAULT_DIR) -> Path:
    if out:
        return Path(out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(base) / f"{stamp}-{head}"
    n = 2
    while path.exists():
        path = Path(base) / f"{stamp}-{head}-{n}"
        n += 1
    return path


class RunWriter:
    """Collects a run's files in a hidden folder; `commit()` renames it into place."""

    def __init__(self, final: Path):
        self.final = Path(final)
        if self.final.exists():
            raise UserError(f"run folder {self.final} already exists; choose another --out.")
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = self.final.parent / f".{self.final.name}.tmp-{os.getpid()}"
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
        except OSError as e:
            raise UserError(f"cannot create run folder {self.final} ({e.strerror}); choose a "
                            "writable --out.") from None

    def path(self, name: str) -> Path:
        return self.tmp / name

    def json(self, name: str, data) -> None:
        self.path(name).write_text(json.dumps(data, indent=2, default=str))

    def text(self, name: str, text: str) -> None:
        self.path(name).write_text(text)

    def model(self, pipeline) -> None:
        joblib.dump(pipeline, self.path("head.joblib"))
        head = pipeline.named_steps["head"]
        if hasattr(head, "model_"):
            head.model_.save(self.path("head.keras"))

    def commit(self) -> Path:
        os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def load(run_dir) -> tuple[dict, object]:
    """The run's record and its fitted pipeline (a Keras model for a fine-tuned run); a
    hand-edited or partial run is an error."""
    run_dir = Path(run_dir)
    record_path = run_dir / "run.json"
    if not record_path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no run.json); pass a folder made by "
                        "python -m classify.")
    try:
        record = json.loads(record_path.read_text())
        classes, head = record["classes"], record["head"]
        assert isinstance(classes, list) and len(classes) >= 2 and isinstance(head, str)
    except (ValueError, KeyError, AssertionError, TypeError):
        raise UserError(f"{record_path} is damaged or was edited by hand; train the head "
                        "again with python -m classify.") from None
    if head == "finetune":  # a fine-tuned full model: images in, probabilities out
        try:
            import keras
            return record, keras.saving.load_model(run_dir / "model.keras")
        except Exception as e:  # Keras raises many kinds for a missing or foreign file
            raise UserError(f"cannot load {run_dir / 'model.keras'} ({type(e).__name__}); run "
                            "the fine-tune again.") from None
    try:
        pipeline = joblib.load(run_dir / "head.joblib")
    except Exception as e:  # joblib raises many kinds for a missing or foreign file
        raise UserError(f"cannot load {run_dir / 'head.joblib'} ({type(e).__name__}); train the "
                        "head again with python -m classify.") from None
    if len(getattr(pipeline, "classes_", [])) != len(classes):
        raise UserError(f"{run_dir}: head.joblib and run.json disagree on the classes; train "
                        "the head again.")
    return record, pipeline


def table(base=DEFAULT_DIR) -> str:
    """All runs under `base`, newest first."""
    rows = []
    for run_json in Path(base).glob("*/run.json"):
        try:
            r = json.loads(run_json.read_text())
            m = r["metrics"]
            rows.append((r.get("created", ""), run_json.parent.name, r["head"],
                         Path(r["cache"]).name, r["provenance"].get("backbone", "?"),
                         len(r["classes"]), m.get("accuracy", float("nan")),
                         m.get("macro_f1", float("nan")), r["train_seconds"]))
        except (ValueError, KeyError, TypeError):
            rows.append(("", run_json.parent.name, "(damaged run.json)", "", "", 0, float("nan"),
                         float("nan"), float("nan")))
    if not rows:
        return f"no runs under {base}/; train one with python -m classify --head logreg"
    rows.sort(reverse=True)
    header = f"{'run':<34} {'head':<9} {'backbone':<18} {'classes':>7} {'acc':>7} {'macroF1':>7} {'train s':>8}  cache"
    lines = [header]
    for _, name, head, cache_name, backbone, n, acc, f1, secs in rows:
        lines.append(f"{name:<34} {head:<9} {backbone:<18} {n:>7} {acc:>7.4f} {f1:>7.4f} "
                     f"{secs:>8.2f}  {cache_name}")
    return "\n".join(lines)
