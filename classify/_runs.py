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
        head.skops     the fitted Pipeline (features + head), in skops's format: data, not code
        head.keras     the dense head's Keras model (not inside head.skops)
        open_set.npz   an --open-set run's known centroids and threshold (classify/_openset.py)
    a fine-tuned run has model.keras (the whole model) and the fine-tuned base's weights instead
    of head.skops and head.keras.

A run folder is written under a temporary name and renamed when complete.

Run folders are shared, so loading one runs none of its content: head.skops may hold only
the types a pipeline of this tool has (`heads.SKOPS_TYPES` beyond skops's own trusted ones,
checked before anything is built), Keras files load in safe mode, and every file it reads
must lie inside the folder (no link out of it); no name in run.json becomes a path. Runs
saved by older versions have head.joblib, a pickle, which can run any code when loaded: it
is refused unless the caller trusts it (`trust_pickle`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from featurize import atomic
from featurize.errors import UserError
from featurize.models.inputs import model_input
from featurize.models.keras import Extractor, KerasExtractor
from featurize.settings import EmbeddingSettings

DEFAULT_DIR = Path("runs")
RUN_VERSION = 1
PIPELINE_FILE = "head.skops"
KERAS_HEAD_FILE = "head.keras"
FINETUNED_FILE = "model.keras"
PICKLE_FILE = "head.joblib"  # runs saved before head.skops
TRUST_PICKLE_HELP = ("load a run saved by an older version (head.joblib, a pickle: it can run "
                     "any code), only if you trust whoever made it")


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
        """The fitted pipeline as head.skops, and the dense head's Keras model as head.keras."""
        import skops.io

        from classify import _heads as heads
        path = self.path(PIPELINE_FILE)
        skops.io.dump(heads.without_keras(pipeline), path)
        unexpected = set(skops.io.get_untrusted_types(file=path)) - set(heads.SKOPS_TYPES)
        if unexpected:  # `load` would refuse the run: a bug, found before the run is kept
            raise RuntimeError(f"the pipeline holds types heads.SKOPS_TYPES lacks: "
                               f"{', '.join(sorted(unexpected))}")
        model = heads.keras_model(pipeline)
        if model is not None:
            model.save(self.path(KERAS_HEAD_FILE))

    def commit(self) -> Path:
        atomic.publish(self.tmp, self.final)
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


def load(run_dir, trust_pickle: bool = False) -> tuple[dict, object]:
    """The run's record and its fitted pipeline (a Keras model for a fine-tuned run); a
    hand-edited, partial or foreign run is an error, and nothing in it runs. A run saved by
    an older version (head.joblib, a pickle) loads only with `trust_pickle`."""
    run_dir = Path(run_dir)
    record_path = run_dir / "run.json"
    if not record_path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no run.json); pass a folder made by "
                        "python -m classify.")
    try:
        record = json.loads(member(run_dir, "run.json").read_text())
        problem = _record_problem(record)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        problem = f"unreadable: {e}"
    if problem:
        raise UserError(f"{record_path} is damaged or was edited by hand ({problem}); train the "
                        "head again with python -m classify.")
    if is_finetuned(record):  # a fine-tuned full model: images in, probabilities out
        return record, _load_keras(member(run_dir, FINETUNED_FILE))
    if (run_dir / PIPELINE_FILE).exists() or not (run_dir / PICKLE_FILE).exists():
        pipeline = _load_skops(run_dir)
    else:
        pipeline = _load_pickle(member(run_dir, PICKLE_FILE), trust_pickle)
    if len(getattr(pipeline, "classes_", [])) != len(record["classes"]):
        raise UserError(f"{run_dir}: the fitted head and run.json disagree on the classes; "
                        "train the head again.")
    return record, pipeline


def member(run_dir: Path, name: str) -> Path:
    """The file `name` of a run folder, checked: a plain name whose file (links followed)
    lies inside the folder."""
    path = Path(run_dir) / name
    if not name or Path(name).name != name or name in (".", ".."):
        raise UserError(f"{run_dir}: {name!r} is not a file name of a run folder; train the "
                        "head again with python -m classify.")
    try:
        inside = path.resolve().is_relative_to(Path(run_dir).resolve())
    except (OSError, RuntimeError):  # a link loop
        inside = False
    if not inside:
        raise UserError(f"{path} points outside its run folder; a run folder's files must lie "
                        "in it: copy the real file there, or train the head again.")
    return path


def _load_skops(run_dir: Path):
    """head.skops (and head.keras for a dense head): only the types a run's pipeline has,
    checked before anything is built."""
    import skops.io

    from classify import _heads as heads
    path = member(run_dir, PIPELINE_FILE)
    again = "train the head again with python -m classify"
    try:
        if not path.is_file():
            raise FileNotFoundError(path)
        unexpected = sorted(set(skops.io.get_untrusted_types(file=path))
                            - set(heads.SKOPS_TYPES))
        if not unexpected:
            pipeline = skops.io.load(path, trusted=list(heads.SKOPS_TYPES))
    except Exception as e:  # skops raises many kinds for a missing, damaged or foreign file
        raise UserError(f"cannot load {path} ({type(e).__name__}); {again}.") from None
    if unexpected:
        shown = ", ".join(unexpected[:3]) + (", ..." if len(unexpected) > 3 else "")
        raise UserError(f"{path} holds types a run never has ({shown}), so it was not loaded: "
                        f"it was altered or not made by this tool; {again}.")
    problem = heads.pipeline_problem(pipeline)
    if problem:
        raise UserError(f"{path} holds {problem}, not a run's pipeline; {again}.")
    if heads.needs_keras(pipeline):
        heads.attach_keras(pipeline, _load_keras(member(run_dir, KERAS_HEAD_FILE),
                                                 again="train the head again", compile=False))
    return pipeline


def _load_pickle(path: Path, trust: bool):
    """A run saved by an older version: its pipeline pickled with joblib, which runs any
    code the file holds, so loaded only when the caller trusts it."""
    if not trust:
        raise UserError(f"{path} is a pickle (a run saved by an older version) and loading it "
                        "could run any code inside; if you trust whoever made this run, pass "
                        "--trust-pickle (Python: Run.load(path, trust_pickle=True)), else train "
                        "the head again.")
    import joblib
    try:
        return joblib.load(path)
    except Exception as e:  # joblib raises many kinds for a missing or foreign file
        raise UserError(f"cannot load {path} ({type(e).__name__}); train the head again with "
                        "python -m classify.") from None


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
    from featurize.settings import EmbeddingSettings
    try:
        EmbeddingSettings.from_json(provenance["settings"])
    except (ValueError, TypeError):  # broken JSON, or keys that are not the settings
        return "'provenance.settings' are not embedding settings"
    return ""


def _load_keras(path: Path, again: str = "run the fine-tune again", compile: bool = True):
    """A Keras file of a run, in safe mode: a Lambda layer's code is refused, not run."""
    import keras

    # The model holds featurize's ImagePreprocessing layer: importing its module registers
    # it with Keras ("featurize>ImagePreprocessing"), which a fresh process has not done.
    from featurize.models.preprocessing import ImagePreprocessing
    custom = {"featurize>ImagePreprocessing": ImagePreprocessing,
              "ImagePreprocessing": ImagePreprocessing}  # a model saved before registration
    try:
        if not path.is_file():  # a folder would be read as another format
            raise FileNotFoundError(f"no file {path.name}")
        return keras.saving.load_model(path, custom_objects=custom, compile=compile,
                                       safe_mode=True)
    except Exception as e:  # Keras raises many kinds for a missing or foreign file
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(f"cannot load {path} ({type(e).__name__}: {first}); {again}.") from None


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
    header = (f"{'run':<34} {'head':<9} {'backbone':<18} {'classes':>7} {'acc':>7} "
              f"{'macroF1':>7} {'train s':>8}  cache")
    lines = [header]
    for _, name, head, cache_name, backbone, n, acc, f1, secs in rows:
        lines.append(f"{name:<34} {head:<9} {backbone:<18} {n:>7} {acc:>7.4f} {f1:>7.4f} "
                     f"{secs:>8.2f}  {cache_name}")
    return "\n".join(lines)


FINETUNED = "finetune"  # run.json's "head" of a fine-tuned run (its whole Keras model)


def is_finetuned(record: dict) -> bool:
    """Whether a run record is a fine-tuned run's (the one place that reads the tag)."""
    return record.get("head") == FINETUNED


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
        self.rejector = rejector  # an --open-set run's classify._openset.Rejector, else None
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
                self._split = json.loads(member(self.path, "split.json").read_text())
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
        """The loaded run's files; a run loaded from a pickle gets head.skops instead."""
        for item in sorted(self.path.iterdir()):
            if item.is_file() and item.name != PICKLE_FILE:
                shutil.copy2(item, writer.path(item.name))
        if not writer.path(PIPELINE_FILE).is_file():
            writer.model(self.pipeline)

    @classmethod
    def load(cls, directory, trust_pickle: bool = False) -> Run:
        """A run folder made by `python -m classify`, `classify.train(save_to=...)` or a
        fine-tune; a hand-edited, partial or foreign one is a UserError, and nothing in it
        runs. A run saved by an older version (head.joblib, a pickle, which can run any code)
        loads only with `trust_pickle=True`: do that only for runs you trust; `save` then
        writes it in the safe format."""
        record, pipeline = load(directory, trust_pickle)
        report = member(Path(directory), "report.txt")
        text = report.read_text() if report.is_file() else ""
        from classify._openset import FILE, load as load_rejector
        member(Path(directory), FILE)  # read if the run is an --open-set one
        if is_finetuned(record):
            return FinetunedRun(record, pipeline, directory, report_text=text)
        return cls(record, pipeline, directory, report_text=text,
                   rejector=load_rejector(directory, record))

    def predict_proba(self, paths_or_X) -> np.ndarray:
        """(N, C) scores, columns in `classes` order: probabilities for every head that has
        them (ridge: its decision values). Closed-set: an --open-set run's unknowns are
        told by `open_set_score` below `threshold` (what `predict` does)."""
        from classify import _heads as heads
        X = self._embeddings(paths_or_X)
        scores = heads.scores(self.pipeline, X)
        order = np.argsort(self.pipeline.classes_)  # columns by class index (training keeps all)
        return scores[:, order]

    def predict(self, paths_or_X) -> list[str]:
        """The predicted class name of each row or image; for an --open-set run, "unknown"
        where `open_set_score` is below `threshold` (as `python -m classify predict`)."""
        X = self._embeddings(paths_or_X)
        names = [self.classes[int(k)] for k in self.pipeline.predict(X)]
        if self.rejector is None:
            return names
        from classify._openset import UNKNOWN
        return [n if known else UNKNOWN for n, known in zip(names, self.rejector.known(X))]

    @property
    def threshold(self) -> float | None:
        """An --open-set run's rejection threshold on `open_set_score`, else None."""
        return None if self.rejector is None else self.rejector.threshold

    def open_set_score(self, paths_or_X) -> np.ndarray:
        """(N,) an --open-set run's score of each row or image: the cosine similarity to
        the nearest known person's centroid (classify/_openset.py)."""
        if self.rejector is None:
            raise UserError("this run has no open-set rejection; train it with --open-set.")
        return self.rejector.scores(self._embeddings(paths_or_X))

    def _embeddings(self, paths_or_X) -> np.ndarray:
        """Embeddings given as an array, or of images (a fine-tuned run: its probabilities)."""
        if _are_paths(paths_or_X):
            inputs = [paths_or_X] if isinstance(paths_or_X, (str, os.PathLike)) else paths_or_X
            return self._embed_images(inputs)
        return self._array(paths_or_X)

    def _array(self, paths_or_X) -> np.ndarray:
        """An (N, D) array of embeddings, checked against the head's input."""
        try:
            X = np.asarray(paths_or_X, dtype=np.float32)
        except (TypeError, ValueError):
            X = None
        want = getattr(self.pipeline, "n_features_in_", None)
        if X is None or X.ndim != 2 or (want is not None and X.shape[1] != want):
            got = f"a {X.shape} array" if X is not None else type(paths_or_X).__name__
            raise UserError(f"give image paths or an (N, {want}) array of embeddings from the "
                            f"run's cache settings, not {got}.")
        return X

    def _embed_images(self, inputs) -> np.ndarray:
        from featurize.data.images import collect
        from featurize.engines.pipeline import batches

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


class FinetunedRun(Run):
    """A fine-tuned run: `pipeline` is the whole Keras model (images in, probabilities out),
    so it predicts from images only; it has no open-set rejection (its backbone changed)."""

    def predict_proba(self, paths_or_X) -> np.ndarray:
        return self._embeddings(paths_or_X)  # the whole model gave its probabilities

    def predict(self, paths_or_X) -> list[str]:
        return [self.classes[j] for j in self._embeddings(paths_or_X).argmax(axis=1)]

    def _array(self, paths_or_X) -> np.ndarray:
        raise UserError("a fine-tuned run predicts from images, not embeddings (its "
                        "backbone changed); pass image paths.")

    def _copy_files(self, writer: RunWriter) -> None:
        for item in sorted(self.path.iterdir()):
            if item.is_file():
                shutil.copy2(item, writer.path(item.name))


def extractor_for_run(record: dict, model) -> Extractor:
    """What turns a run's input images into what its head takes: exactly the cache's
    backbone settings, or for a fine-tuned run the whole model (probabilities out)."""
    if is_finetuned(record):
        return _WholeModel(model, EmbeddingSettings.from_json(record["provenance"]["settings"]))
    from featurize.runtimes import build_extractor  # the same runtime featurize chooses
    attrs = record["provenance"]
    return build_extractor(EmbeddingSettings.from_json(attrs["settings"]), cache_attrs=attrs)


class _WholeModel:
    """A fine-tuned model behind the extractor interface (`featurize.models.keras.Extractor`)."""

    provenance = staticmethod(KerasExtractor.provenance)

    def __init__(self, model, settings):
        self.model = model
        self.prepare = model_input(settings)
        self.input_shape = self.prepare.shape
        self.dim = int(model.output.shape[-1])  # the number of classes

    def embed(self, batch):
        return np.asarray(self.model.predict_on_batch(batch))
