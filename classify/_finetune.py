"""Fine-tune base + trained head, the safe way (`python -m classify finetune --run RUN`).

The full model is the cache's backbone (same weights, layer, pooling, preprocessing, input
size) with the run's features and head on top, initialised from the fitted head, so before
any training it reproduces the run's predictions from images (checked). Then the top
`--unfreeze` blocks of the base train at a small learning rate, with every BatchNorm layer
frozen in inference mode (its statistics never move), on the run's training split
only: the validation slice for early stopping comes out of it, the test images are touched
only to report before/after metrics. If no epoch lowers the validation loss below where it
started, the original weights are kept: fine-tuning is applied only when it pays.
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from classify import _report as report, _runs as runs
from classify._options import SAFE_LR, FinetuneOptions, defaults  # noqa: F401 (SAFE_LR: its old home)
from classify._runs import Run
from featurize.data.images import ImageError, prepare_image
from featurize.errors import UserError
from featurize.models.inputs import model_input
from featurize.models.registry import spec_of
from featurize.models.specs import FINETUNED_BASE_FILE, FINETUNED_BASE_WEIGHTS  # noqa: F401

# --- the full model ----------------------------------------------------------------------------

def feature_layers(pipeline):
    """The run's feature transforms as Keras layers with the fitted values."""
    import keras
    out = []
    for name, step in pipeline.steps[:-1]:
        if name == "l2":
            out.append(keras.layers.UnitNormalization(axis=-1, name="l2"))
        elif name == "standardize":
            out.append(keras.layers.Normalization(mean=step.mean_, variance=step.scale_ ** 2,
                                                  name="standardize"))
        elif name == "pca":
            dense = keras.layers.Dense(step.n_components_, name="pca")
            dense.build((None, step.components_.shape[1]))
            dense.set_weights([step.components_.T.astype("float32"),
                               (-step.mean_ @ step.components_.T).astype("float32")])
            dense.trainable = False
            out.append(dense)
        else:
            raise UserError(f"cannot rebuild feature step {name!r} in Keras.")
    return out


def head_layers(head, dim: int):
    """The fitted head as Keras layers: the dense head itself, or logreg as a softmax Dense."""
    import keras
    name = type(head).__name__
    if name == "DenseHead":
        return [head.model_.get_layer(n) for n in ("standardize", "hidden", "dropout", "classes")]
    if name == "LogisticRegression":
        coef, intercept = head.coef_, head.intercept_
        if coef.shape[0] == 1:  # binary: softmax([-z/2, z/2]) is sigmoid(z)
            coef = np.concatenate([-coef / 2, coef / 2])
            intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
        dense = keras.layers.Dense(len(coef), activation="softmax", name="classes")
        dense.build((None, dim))
        dense.set_weights([coef.T.astype("float32"), intercept.astype("float32")])
        return [dense]
    raise UserError(f"finetune needs a dense or logreg run, not {name}; train one with "
                    "python -m classify --head logreg (or dense).")


@dataclass(frozen=True)
class Assembled:
    """The full model of a fine-tune (`model`: images in, probabilities out), its backbone
    (`base`, whose top blocks train) and the cache's embedding settings it was built with."""

    model: object
    base: object
    settings: object  # featurize.settings.EmbeddingSettings


@dataclass(frozen=True)
class TestScores:
    """The test images' labels and the model's scores after and before fine-tuning."""

    y: np.ndarray
    after: np.ndarray
    before: np.ndarray


def assemble(record, pipeline):
    """(full model, bare base, settings, weights) for a run."""
    import keras

    from featurize.models.config import weights_for
    from featurize.models.keras import build_base, image_input, pool_features
    from featurize.settings import EmbeddingSettings

    attrs = record["provenance"]
    settings = EmbeddingSettings.from_json(attrs["settings"])  # checked by _check_run
    weights = weights_for(settings, attrs.get("weights_path", ""))
    base = build_base(settings, weights)
    images, x = image_input(settings)
    x = base(x, training=False)  # and `unfreeze` keeps every BatchNorm non-trainable
    x = pool_features(x, settings.pooling, name="pool")
    for layer in feature_layers(pipeline):
        x = layer(x)
    for layer in head_layers(pipeline.named_steps["head"], int(x.shape[-1])):
        x = layer(x)
    return Assembled(keras.Model(images, x, name="finetuned"), base, settings)


def unfreeze(base, spec, n: int) -> list[str]:
    """Make the top `n` blocks of `base` trainable (but their BatchNorm), the rest frozen."""
    import keras
    blocks = spec.blocks  # `n` is within them: see check_unfreeze
    top = blocks[len(blocks) - n:] if n else ()
    base.trainable = True
    trained = []
    for layer in base.layers:
        # BatchNorm stays frozen: a non-trainable BN always runs in inference mode, whereas
        # `base(x, training=False)` is overridden by fit()'s training=True in Keras 3.
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = not is_bn and any(layer.name.startswith(prefix) for prefix in top)
        if layer.trainable and layer.weights:
            trained.append(layer.name)
    if n and not trained:
        raise UserError(f"no layer of {spec.name} matches blocks {', '.join(top)}.")
    return trained


def check_unfreeze(spec, n: int) -> None:
    """--unfreeze N (at least 0, see FinetuneOptions) is within the backbone's blocks."""
    blocks = spec.blocks
    if n > len(blocks):
        raise UserError(f"--unfreeze {n}: {spec.name} has {len(blocks)} blocks "
                        f"({', '.join(b.rstrip('_') for b in blocks) or 'none named'}); "
                        f"use --unfreeze {len(blocks)} or less.")


# --- data --------------------------------------------------------------------------------------

def image_dataset(paths, labels, root, settings, batch_size, augment, seed, shuffle):
    """A backend-agnostic keras.utils.PyDataset reading images with featurize's decoder."""
    import keras

    prepare = model_input(settings)

    class Images(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=4, use_multiprocessing=False)
            self.rng = np.random.default_rng(seed)
            self.order = np.arange(len(paths))
            # (path, reason) of an image that failed: Keras re-raises what __getitem__
            # raises as a backend error (TensorFlow's UnknownError), without the file's name.
            self.failure = None

        def __len__(self):
            return int(np.ceil(len(paths) / batch_size))

        def on_epoch_end(self):
            if shuffle:
                self.rng.shuffle(self.order)

        def __getitem__(self, i):
            idx = self.order[i * batch_size:(i + 1) * batch_size]
            rng = np.random.default_rng((seed, i, int(self.rng.integers(1 << 30))))
            arrays = []
            for j in idx:
                array, reason = prepare_image(prepare, str(Path(root) / paths[j]))
                if reason is not None:
                    self.failure = (paths[j], reason)
                    raise ImageError(reason)
                arrays.append(array)
            if augment:
                arrays = [_augment(a, rng) for a in arrays]
            return np.stack(arrays), np.asarray(labels)[idx]

    return Images()


def _augment(arr, rng):
    """Light augmentation: horizontal flip, shift up to 8%, scale 0.9-1.1."""
    from PIL import Image
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    h, w = arr.shape[:2]
    scale = rng.uniform(0.9, 1.1)
    dx, dy = rng.uniform(-0.08, 0.08, 2) * (w, h)
    cx, cy = w / 2, h / 2
    # inverse affine map (output -> input) of a scale about the centre plus a shift
    coeffs = (1 / scale, 0, cx - (cx + dx) / scale, 0, 1 / scale, cy - (cy + dy) / scale)
    im = Image.fromarray(np.ascontiguousarray(arr)).transform(
        (w, h), Image.AFFINE, coeffs, resample=Image.BILINEAR)
    return np.asarray(im)


@contextmanager
def image_errors(*datasets):
    """An image that fails to decode while Keras iterates a dataset: one clear error naming
    it, instead of the backend's traceback."""
    try:
        yield
    except Exception:
        failure = next((ds.failure for ds in datasets if ds.failure), None)
        if failure is None:
            raise
        raise UserError(f"image {failure[0]} of the run's split cannot be read ({failure[1]}); "
                        "put the original back, or re-run python -m featurize and train a new "
                        "run.") from None


def check_images(root, paths) -> None:
    """Every image of the split is still a file under the dataset root, before any training."""
    missing = [p for p in paths if not (Path(root) / p).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        shown = ", ".join(missing[:3]) + more
        raise UserError(f"{len(missing)} images of the run's split are missing from {root}: "
                        f"{shown}; put them back, or re-run python -m featurize {root} and train "
                        "a new run.")


def _validation_split(train_paths, train_y, fraction, seed):
    from sklearn.model_selection import StratifiedShuffleSplit
    n_classes = len(np.unique(train_y))
    n_val = int(round(fraction * len(train_y)))
    if n_val < n_classes or len(train_y) - n_val < n_classes:
        change = "raise" if n_val < n_classes else "lower"
        raise UserError(f"not enough training images ({len(train_y)}) for a validation slice of "
                        f"{fraction:.0%} with {n_classes} classes; {change} --val-fraction or "
                        "use a run with more images per class.")
    try:
        fit, val = next(StratifiedShuffleSplit(1, test_size=n_val, random_state=seed).split(
            np.zeros(len(train_y)), train_y))
    except ValueError as e:
        raise UserError(f"cannot cut a stratified validation slice: {e}") from None
    return fit, val


# --- the stage ---------------------------------------------------------------------------------

def _check_run(run: Run, unfreeze_blocks):
    """The run can be fine-tuned (settings only, nothing built yet): its embedding settings."""
    from featurize.settings import EmbeddingSettings
    record = run.record
    if record["head"] not in ("dense", "logreg"):
        raise UserError(f"finetune needs a dense or logreg run; {run.path or 'the run'} is "
                        f"{record['head']}.")
    settings = EmbeddingSettings.from_json(record["provenance"]["settings"])
    spec_of(settings).family.check_finetune(spec_of(settings))
    if settings.flip:
        raise UserError("runs on --flip caches cannot be fine-tuned (the mirror average is "
                        "not a single image); featurize without --flip first.")
    check_unfreeze(spec_of(settings), unfreeze_blocks)
    if not Path(record["cache"]).is_file():
        raise UserError(f"the run's cache {record['cache']} is missing; re-create it with "
                        "python -m featurize, or train a new run.")
    return settings


def _split(run: Run, val_fraction, seed) -> dict:
    """The run's images and labels: training (less a validation slice) and test."""
    from featurize import cache as cache_io
    record, where = run.record, run.path or "the run"
    try:
        folds = run.split["folds"]
        fold = folds[0]
        train_paths, test_paths = list(fold["train"]), list(fold["test"])
    except (KeyError, IndexError, TypeError):
        raise UserError(f"the split of {where} is damaged; train the head again with "
                        "python -m classify.") from None
    if len(folds) != 1:
        raise UserError(f"{where} was evaluated by cross-validation; fine-tune a run with a "
                        "held-out split (python -m classify without --cv).")
    c = cache_io.read(record["cache"])
    index = {p: i for i, p in enumerate(c.paths)}
    missing = [p for p in train_paths + test_paths if p not in index]
    if missing:
        raise UserError(f"{len(missing)} images of the run's split are no longer in "
                        f"{record['cache']} (e.g. {missing[0]}); train a new run.")
    root = c.attrs["dataset_root"]
    check_images(root, train_paths + test_paths)
    class_of = {name: k for k, name in enumerate(record["classes"])}

    def labels(paths):
        return np.array([class_of[c.classes[c.labels[index[p]]]] for p in paths])

    train_y = labels(train_paths)
    fit_idx, val_idx = _validation_split(train_paths, train_y, val_fraction, seed)
    return {"root": root, "test_paths": test_paths, "test_y": labels(test_paths),
            "test_embeddings": c.embeddings[[index[p] for p in test_paths]],
            "fit_paths": [train_paths[i] for i in fit_idx], "fit_y": train_y[fit_idx],
            "val_paths": [train_paths[i] for i in val_idx], "val_y": train_y[val_idx]}


def finetune_run(run: Run, options: FinetuneOptions, save_to=None, log=print) -> Run:
    """Fine-tune `run` (a dense or logreg Run): a new Run whose `pipeline` is the whole Keras
    model, written to `save_to` if given. Every mistake is found before the model is built
    or a file written."""
    o = options
    _check_run(run, o.unfreeze_blocks)
    if save_to is not None:
        runs.check_destination(Path(save_to))
    elif o.refeaturize:
        raise UserError("refeaturize embeds the dataset with the saved fine-tuned base: give "
                        "the new run a folder (save_to, or --out).")
    if o.risky:
        log(f"warning: --lr {o.lr} with unfrozen layers: large updates wreck the pretrained "
            "weights (accuracy can fall to chance after one epoch); 1e-5 is the safe default.")
    d = _split(run, o.val_fraction, o.seed)
    built = assemble(run.record, run.pipeline)
    model, base, settings = built.model, built.base, built.settings
    test_ds = image_dataset(d["test_paths"], d["test_y"], d["root"], settings, o.batch_size,
                            False, o.seed, False)
    # Before training, the assembled model must give the head's predictions from images.
    with image_errors(test_ds):
        before_scores = model.predict(test_ds, verbose=0)
    gap = float(np.abs(before_scores - run.pipeline.predict_proba(d["test_embeddings"])).max())
    # A wrong model is off by far more; GPUs' TF32 convolutions move probabilities ~2e-3.
    if gap > 1e-2:
        raise UserError(f"the assembled model does not reproduce the run's predictions (max "
                        f"difference {gap:.2e}); the cache may be out of date: re-run featurize "
                        "and train the head again.")
    n_classes = len(run.classes)
    before = report.evaluate(d["test_y"], before_scores.argmax(1), before_scores, n_classes)
    trained = _train(model, base, settings, d, o, log)
    with image_errors(test_ds):
        after_scores = model.predict(test_ds, verbose=0)
    after = report.evaluate(d["test_y"], after_scores.argmax(1), after_scores, n_classes)
    params = {"unfreeze": o.unfreeze_blocks, "lr": o.lr, "epochs": o.epochs,
              "epochs_run": trained["epochs_run"], "batch_size": o.batch_size,
              "augment": o.augment, "val_fraction": o.val_fraction, "seed": o.seed}
    tuned = _new_run(run, built, TestScores(d["test_y"], after_scores, before_scores),
                     {**trained, "params": params, "metrics": after, "metrics_before": before})
    if save_to is not None:
        tuned.save(save_to)
    if o.refeaturize:
        tuned.refeaturized = _refeaturize(settings, d["root"], tuned.path, run.record["cache"])
    return tuned


def finetune(run_dir, out=None, log=print, trust_pickle: bool = False, **options) -> dict:
    """Fine-tune a run folder as `python -m classify finetune` does (`options`: the
    FinetuneOptions fields), into `out` or a new folder beside the run: what happened, as a
    dict. `trust_pickle`: as `Run.load`'s. (`classify.finetune` is the API, returning a Run.)"""
    opts = FinetuneOptions(**options)  # checked before the run is even read
    run = Run.load(run_dir, trust_pickle=trust_pickle)
    tuned = finetune_run(run, opts, runs.new_dir("finetune", out, Path(run_dir).parent), log)
    return summary(tuned)


def summary(tuned: Run) -> dict:
    """A fine-tuned run's facts, as the command line prints them."""
    r = tuned.record
    result = {"run_dir": tuned.path, "before": r["metrics_before"], "after": r["metrics"],
              "epochs_run": r["epochs_run"], "paid": r["paid"],
              "validation_loss": (r["validation_loss_before"], r["validation_loss_after"]),
              "seconds_per_epoch": r["seconds_per_epoch"],
              "trained_layers": r["trained_layers"],
              "frozen_layers_unchanged": r["frozen_layers_unchanged"]}
    if tuned.refeaturized is not None:
        result["cache"] = tuned.refeaturized
    return result


def _train(model, base, settings, d, options, log) -> dict:
    """Train the unfrozen blocks and the head; keep the start if no epoch lowered the
    validation loss. What happened, for run.json."""
    import keras
    o = options
    trained_layers = unfreeze(base, spec_of(settings), o.unfreeze_blocks)
    frozen_before = {w.path: keras.ops.convert_to_numpy(w) for w in base.weights
                     if not _in(w, trained_layers)}
    model.compile(keras.optimizers.Adam(o.lr), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    fit_ds = image_dataset(d["fit_paths"], d["fit_y"], d["root"], settings, o.batch_size,
                           o.augment, o.seed, True)
    val_ds = image_dataset(d["val_paths"], d["val_y"], d["root"], settings, o.batch_size, False,
                           o.seed, False)
    callbacks = [keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.2, patience=2),
                 keras.callbacks.EarlyStopping(monitor="val_loss", patience=4,
                                               restore_best_weights=True)]
    start_weights = model.get_weights()
    with image_errors(fit_ds, val_ds):
        val_before = float(model.evaluate(val_ds, verbose=0)[0])
        t0 = time.perf_counter()
        history = model.fit(fit_ds, validation_data=val_ds, epochs=o.epochs, callbacks=callbacks,
                            verbose=0)
        seconds = time.perf_counter() - t0
        val_after = float(model.evaluate(val_ds, verbose=0)[0])
    epochs_run = len(history.history["loss"])
    # Early stopping restores the best epoch, never the start: keep the start if no epoch paid.
    paid = val_after < val_before
    if not paid:
        model.set_weights(start_weights)
        log(f"fine-tuning did not lower the validation loss ({val_before:.4f} -> {val_after:.4f}); "
            "the fine-tuned model keeps the original weights.")
    unchanged = all(np.array_equal(keras.ops.convert_to_numpy(w), frozen_before[w.path])
                    for w in base.weights if w.path in frozen_before)
    return {"trained_layers": trained_layers, "epochs_run": epochs_run, "train_seconds": seconds,
            "seconds_per_epoch": seconds / max(epochs_run, 1), "paid": paid,
            "frozen_layers_unchanged": unchanged, "validation_loss_before": val_before,
            "validation_loss_after": val_after}


def _new_run(run: Run, built: Assembled, test: TestScores, facts) -> Run:
    """The fine-tuned Run (not saved): the source record with `facts` added."""
    record = {**run.record, "head": runs.FINETUNED, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "finetuned_from": str(run.path.resolve()) if run.path else None,
              "score_kind": "probability", **facts}
    text = report.class_report(test.y, test.after.argmax(1), record["classes"])
    write = functools.partial(_write, built=built, split=run.split, test=test, record=record,
                              text=text)
    return runs.FinetunedRun(record, built.model, write=write, split=run.split,
                             report_text=text)


def _write(writer: runs.RunWriter, built: Assembled, split, test: TestScores, record,
           text) -> None:
    """A fine-tuned run's files: model, base weights, split, report, run.json."""
    built.model.save(writer.path("model.keras"))
    spec_of(built.settings).family.save_finetuned_base(built.base, writer.path)
    writer.json("split.json", split)
    writer.text("report.txt", text)
    from classify._html import write_finetune_report  # before and after; never fails the run
    write_finetune_report(writer, record, split, test)
    writer.json("run.json", record)
    writer.json("metrics.json", {"before": record["metrics_before"], "after": record["metrics"]})


def _refeaturize(settings, root, new_dir, cache_path):
    """A new cache of the dataset embedded with the fine-tuned base: its path."""
    from featurize.jobs.run import featurize
    backbone, weights = spec_of(settings).family.finetuned_source(settings, new_dir)
    s = featurize(root, backbone=backbone, weights=weights,
                  layer=settings.layer or None,
                  pool=None if settings.pooling == "none" else settings.pooling,
                  input_size=settings.input_size, crop=settings.crop or None,
                  precision=settings.precision, progress=False,
                  resize="device" if settings.device_source else "cpu",
                  source_size=settings.device_source,
                  cache_dir=Path(cache_path).parent, runtime=_mixed_runtime(settings))
    return s.path


def _mixed_runtime(settings) -> str | None:
    """--precision mixed goes on where the cache was made: OpenVINO bfloat16 or Keras."""
    if settings.precision != "mixed":
        return None  # fp32 and int8: featurize's choice (the same embeddings, or calibrated)
    return "openvino" if settings.precision_engine else "keras"


def _in(weight, layer_names) -> bool:
    return weight.path.split("/")[0] in layer_names
