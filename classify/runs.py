"""Run folders: everything a trained head needs to be trusted, compared and used again.

    runs/<timestamp>-<head>/
        run.json       settings, cache path and provenance, classes, metrics, times
        split.json     the train/test paths (identical for every head on the same cache)
        metrics.json   the metrics alone
        report.txt     scikit-learn's per-class report
        report.html    the run at a glance: settings, metrics, pictures, misclassified images
        confusion.png  row-normalised confusion matrix with counts (up to 30 classes; above:
                       confused_pairs.png, the most confused pairs)
        f1.png         per-class F1 bars
        head.joblib    the fitted Pipeline (features + head)
        head.keras     the dense head's Keras model, for use outside this tool
        open_set.npz   an --open-set run's known centroids and threshold (classify/openset.py)

A run folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import joblib
import numpy as np

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
        check_destination(self.final)
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


SCORE_KINDS = ("probability", "distance", "score")


def check_destination(final: Path) -> None:
    """The run folder can be created: checked before any training, so a mistake costs nothing."""
    final = Path(final)
    if final.exists():
        raise UserError(f"run folder {final} already exists; choose another --out.")
    parent = final.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot create run folder {final}: {parent} is not a writable folder; "
                        "choose another --out or --runs-dir.")


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
        problem = _record_problem(record)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        problem = f"unreadable: {e}"
    if problem:
        raise UserError(f"{record_path} is damaged or was edited by hand ({problem}); train the "
                        "head again with python -m classify.")
    if record["head"] == "finetune":  # a fine-tuned full model: images in, probabilities out
        return record, _load_keras(run_dir / "model.keras")
    try:
        pipeline = joblib.load(run_dir / "head.joblib")
    except Exception as e:  # joblib raises many kinds for a missing or foreign file
        raise UserError(f"cannot load {run_dir / 'head.joblib'} ({type(e).__name__}); train the "
                        "head again with python -m classify.") from None
    if len(getattr(pipeline, "classes_", [])) != len(record["classes"]):
        raise UserError(f"{run_dir}: head.joblib and run.json disagree on the classes; train "
                        "the head again.")
    return record, pipeline


def _record_problem(record) -> str:
    """What is wrong with a run.json's content, or "" (the keys predict and finetune read)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    classes, provenance = record.get("classes"), record.get("provenance")
    if not isinstance(record.get("head"), str):
        return "no 'head' name"
    if not (isinstance(classes, list) and len(classes) >= 2
            and all(isinstance(c, str) for c in classes)):
        return "'classes' is not a list of at least 2 names"
    if not isinstance(record.get("cache"), str):
        return "no 'cache' path"
    if not isinstance(provenance, dict) or not isinstance(provenance.get("settings"), str):
        return "no 'provenance' with the cache's 'settings'"
    if not isinstance(provenance.get("weights_path", ""), str):
        return "'provenance.weights_path' is not a path"
    if record.get("score_kind", "probability") not in SCORE_KINDS:
        return f"'score_kind' is not one of {', '.join(SCORE_KINDS)}"
    from featurize.extractor import EmbeddingSettings
    try:
        EmbeddingSettings.from_json(provenance["settings"])
    except (ValueError, TypeError):  # broken JSON, or keys that are not the settings
        return "'provenance.settings' are not embedding settings"
    return ""


def _load_keras(path: Path):
    import keras

    # The model holds featurize's ImagePreprocessing layer: importing its module registers
    # it with Keras ("featurize>ImagePreprocessing"), which a fresh process has not done.
    from featurize.preprocessing import ImagePreprocessing
    custom = {"featurize>ImagePreprocessing": ImagePreprocessing,
              "ImagePreprocessing": ImagePreprocessing}  # a model saved before registration
    try:
        return keras.saving.load_model(path, custom_objects=custom)
    except Exception as e:  # Keras raises many kinds for a missing or foreign file
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(f"cannot load {path} ({type(e).__name__}: {first}); run the fine-tune "
                        "again.") from None


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


class Run:
    """A trained head (or fine-tuned model) with its record, in memory and maybe on disk.

    `record` is run.json's content; `pipeline` the fitted scikit-learn Pipeline (features and
    head), or the Keras model of a fine-tuned run (images in, probabilities out); `path` the
    run folder, None until saved. `predict` and `predict_proba` take an (N, D) array of
    embeddings from the run's cache settings, or image files and folders, which are embedded
    exactly as the cache was (a fine-tuned run takes images only).
    """

    def __init__(self, record: dict, pipeline, path=None, *, write=None, split=None,
                 warnings=(), report_text: str = "", rejector=None):
        self.record, self.pipeline = record, pipeline
        self.rejector = rejector  # an --open-set run's classify.openset.Rejector, else None
        self.path = Path(path) if path is not None else None
        self.warnings = list(warnings)  # for stderr: the run may mislead
        self.report_text = report_text
        self.refeaturized = None  # the cache a fine-tune with refeaturize wrote
        self._write = write  # (RunWriter) -> None: the run's files; None: copy them from path
        self._split = split
        self._extractor = None

    def __repr__(self) -> str:
        where = self.path or "not saved"
        return f"<Run {self.head} on {len(self.classes)} classes, {where}>"

    @property
    def head(self) -> str:
        return self.record["head"]

    @property
    def classes(self) -> list[str]:
        return self.record["classes"]

    @property
    def metrics(self) -> dict:
        return self.record["metrics"]

    @property
    def run_dir(self):  # the older name of `path`
        return self.path

    @property
    def cache(self) -> Path:
        return Path(self.record["cache"])

    @property
    def notes(self) -> list[str]:
        return [n for n in self.record.get("notes", []) if n not in self.warnings]

    @property
    def n_images(self) -> int:
        return self.record["n_images"]

    @property
    def train_seconds(self) -> float:
        return self.record["train_seconds"]

    @property
    def predict_seconds(self) -> float:
        return self.record.get("predict_seconds", float("nan"))

    @property
    def split(self) -> dict:
        """split.json's content: the train/test paths of each fold."""
        if self._split is None:
            where = self.path / "split.json" if self.path else "the run"
            try:
                self._split = json.loads((self.path / "split.json").read_text())
            except (OSError, ValueError, TypeError):
                raise UserError(f"{where} is missing or damaged; train the head again with "
                                "python -m classify.") from None
        return self._split

    def save(self, directory) -> Path:
        """Write the run folder (the files `python -m classify` writes) to `directory`,
        which must not exist; it becomes `path` if the run was not saved yet."""
        writer = RunWriter(Path(directory))
        try:
            (self._write or self._copy_files)(writer)
            saved = writer.commit()
        except BaseException:
            writer.abort()
            raise
        if self.path is None:
            self.path = saved
        return saved

    def _copy_files(self, writer: RunWriter) -> None:
        for item in sorted(self.path.iterdir()):
            if item.is_file():
                shutil.copy2(item, writer.path(item.name))

    @classmethod
    def load(cls, directory) -> "Run":
        """A run folder made by `python -m classify`, `classify.train(save_to=...)` or a
        fine-tune; a hand-edited or partial one is a UserError."""
        record, pipeline = load(directory)
        report = Path(directory) / "report.txt"
        text = report.read_text() if report.is_file() else ""
        from .openset import load as load_rejector
        return cls(record, pipeline, directory, report_text=text,
                   rejector=load_rejector(directory, record))

    def predict_proba(self, paths_or_X) -> np.ndarray:
        """(N, C) scores, columns in `classes` order: probabilities for every head that has
        them (ridge: its decision values). Closed-set: an --open-set run's unknowns are
        told by `open_set_score` below `threshold` (what `predict` does)."""
        from . import heads
        X = self._embeddings(paths_or_X)
        if self.head == "finetune":
            return X  # the whole model gave its probabilities
        scores = heads.scores(self.pipeline, X)
        order = np.argsort(self.pipeline.classes_)  # columns by class index (training keeps all)
        return scores[:, order]

    def predict(self, paths_or_X) -> list[str]:
        """The predicted class name of each row or image; for an --open-set run, "unknown"
        where `open_set_score` is below `threshold` (as `python -m classify predict`)."""
        X = self._embeddings(paths_or_X)
        if self.head == "finetune":
            return [self.classes[j] for j in X.argmax(axis=1)]
        names = [self.classes[int(k)] for k in self.pipeline.predict(X)]
        if self.rejector is None:
            return names
        from .openset import UNKNOWN
        return [n if known else UNKNOWN for n, known in zip(names, self.rejector.known(X))]

    @property
    def threshold(self) -> float | None:
        """An --open-set run's rejection threshold on `open_set_score`, else None."""
        return None if self.rejector is None else self.rejector.threshold

    def open_set_score(self, paths_or_X) -> np.ndarray:
        """(N,) an --open-set run's score of each row or image: the cosine similarity to
        the nearest known person's centroid (classify/openset.py)."""
        if self.rejector is None:
            raise UserError("this run has no open-set rejection; train it with --open-set.")
        return self.rejector.scores(self._embeddings(paths_or_X))

    def _embeddings(self, paths_or_X) -> np.ndarray:
        """Embeddings given as an array, or of images (a fine-tuned run: its probabilities)."""
        if _are_paths(paths_or_X):
            inputs = [paths_or_X] if isinstance(paths_or_X, (str, os.PathLike)) else paths_or_X
            return self._embed_images(inputs)
        if self.head == "finetune":
            raise UserError("a fine-tuned run predicts from images, not embeddings (its "
                            "backbone changed); pass image paths.")
        try:
            X = np.asarray(paths_or_X, dtype=np.float32)
        except (TypeError, ValueError):
            X = None
        want = getattr(self.pipeline, "n_features_in_", None)
        if X is None or X.ndim != 2 or (want is not None and X.shape[1] != want):
            raise UserError(f"give image paths or an (N, {want}) array of embeddings from the "
                            "run's cache settings, not "
                            f"{'a ' + str(X.shape) + ' array' if X is not None else type(paths_or_X).__name__}.")
        return X

    def _embed_images(self, inputs) -> np.ndarray:
        from featurize.images import collect
        from featurize.pipeline import batches

        from .predict import extractor_for_run
        items = collect(inputs)
        if self._extractor is None:  # built once: loading a backbone takes seconds
            self._extractor = extractor_for_run(self.record, self.pipeline)
        rows, failed = [], []
        for batch in batches(items, self._extractor):
            failed += batch.failed
            if batch.items:
                rows.append(np.asarray(batch.embeddings))
        if failed:
            shown = "; ".join(f"{item.key} ({reason})" for item, reason in failed[:3])
            raise UserError(f"{len(failed)} of {len(items)} images cannot be used: {shown}; "
                            "remove them (classify.predict reports them one by one).")
        return np.concatenate(rows)


def _are_paths(value) -> bool:
    """A path, or a non-empty list of paths (rather than an array of numbers)."""
    if isinstance(value, (str, os.PathLike)):
        return True
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(v, (str, os.PathLike)) for v in value))
