"""`python -m classify finetune --run RUN`: fine-tune base + trained head, the safe way.

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

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from featurize.errors import UserError

from . import report, runs

SAFE_LR = 1e-5
FINETUNED_BASE_WEIGHTS = "finetuned_base.weights.h5"  # Keras 3 weights of the base
FINETUNED_BASE_FILE = "finetuned_base.keras"  # for a base given as a .keras file
RISKY_LR = 1e-3


def _parser():
    p = argparse.ArgumentParser(prog="python -m classify finetune",
                                description="Fine-tune the backbone of a run together with its head.")
    p.add_argument("--run", required=True, help="a dense or logreg run folder")
    p.add_argument("--unfreeze", type=int, default=1, help="top blocks of the base to train")
    p.add_argument("--lr", type=float, default=SAFE_LR, help="Adam learning rate (%(default)s)")
    p.add_argument("--epochs", type=int, default=10, help="at most this many epochs")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--refeaturize", action="store_true",
                   help="also write a new cache embedded with the fine-tuned base")
    p.add_argument("--out", help="new run folder (default: runs/<timestamp>-finetune)")
    p.add_argument("--seed", type=int, default=0)
    return p


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
            coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
        dense = keras.layers.Dense(len(coef), activation="softmax", name="classes")
        dense.build((None, dim))
        dense.set_weights([coef.T.astype("float32"), intercept.astype("float32")])
        return [dense]
    raise UserError(f"finetune needs a dense or logreg run, not {name}; train one with "
                    "python -m classify --head logreg (or dense).")


def assemble(record, pipeline):
    """(full model, bare base, settings, weights) for a run."""
    import keras

    from featurize.extractor import (EmbeddingSettings, build_base, image_input, pool_features,
                                     weights_for)

    attrs = record["provenance"]
    settings = EmbeddingSettings.from_json(attrs["settings"])
    if settings.spec.family == "dlib":
        raise UserError("dlib-resnet is not a Keras model and cannot be fine-tuned; use a "
                        "Keras backbone.")
    if settings.flip:
        raise UserError("runs on --flip caches cannot be fine-tuned (the mirror average is "
                        "not a single image); featurize without --flip first.")
    weights = weights_for(settings, attrs.get("weights_path", ""))
    base = build_base(settings, weights)
    images, x = image_input(settings)
    x = base(x, training=False)  # and `unfreeze` keeps every BatchNorm non-trainable
    x = pool_features(x, settings.pooling, name="pool")
    for layer in feature_layers(pipeline):
        x = layer(x)
    for layer in head_layers(pipeline.named_steps["head"], int(x.shape[-1])):
        x = layer(x)
    return keras.Model(images, x, name="finetuned"), base, settings


def unfreeze(base, spec, n: int) -> list[str]:
    """Make the top `n` blocks of `base` trainable (but their BatchNorm), the rest frozen."""
    import keras
    blocks = spec.blocks
    if n < 0 or n > len(blocks):
        raise UserError(f"--unfreeze {n}: {spec.name} has {len(blocks)} blocks "
                        f"({', '.join(b.rstrip('_') for b in blocks) or 'none named'}).")
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


# --- data --------------------------------------------------------------------------------------

def image_dataset(paths, labels, root, settings, batch_size, augment, seed, shuffle):
    """A backend-agnostic keras.utils.PyDataset reading images with featurize's decoder."""
    import keras

    prepare = settings.model_input

    class Images(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=4, use_multiprocessing=False)
            self.rng = np.random.default_rng(seed)
            self.order = np.arange(len(paths))

        def __len__(self):
            return int(np.ceil(len(paths) / batch_size))

        def on_epoch_end(self):
            if shuffle:
                self.rng.shuffle(self.order)

        def __getitem__(self, i):
            idx = self.order[i * batch_size:(i + 1) * batch_size]
            rng = np.random.default_rng((seed, i, int(self.rng.integers(1 << 30))))
            arrays = [prepare(str(Path(root) / paths[j])) for j in idx]
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


def _validation_split(train_paths, train_y, fraction, seed):
    from sklearn.model_selection import StratifiedShuffleSplit
    n_classes = len(np.unique(train_y))
    n_val = int(round(fraction * len(train_y)))
    if n_val < n_classes or len(train_y) - n_val < n_classes:
        raise UserError(f"not enough training images ({len(train_y)}) for a validation slice of "
                        f"{fraction:.0%} with {n_classes} classes; raise --val-fraction or use "
                        "a run with more images per class.")
    try:
        fit, val = next(StratifiedShuffleSplit(1, test_size=n_val, random_state=seed).split(
            np.zeros(len(train_y)), train_y))
    except ValueError as e:
        raise UserError(f"cannot cut a stratified validation slice: {e}") from None
    return fit, val


# --- the stage ---------------------------------------------------------------------------------

def finetune(run_dir, unfreeze_blocks=1, lr=SAFE_LR, epochs=10, batch_size=16, val_fraction=0.1,
             augment=True, refeaturize=False, out=None, seed=0, log=print) -> dict:
    import keras

    from featurize import cache as cache_io
    record, pipeline = runs.load(run_dir)
    if record["head"] not in ("dense", "logreg"):
        raise UserError(f"finetune needs a dense or logreg run; {run_dir} is {record['head']}.")
    if not Path(record["cache"]).is_file():
        raise UserError(f"the run's cache {record['cache']} is missing; re-create it with "
                        "python -m featurize, or train a new run.")
    if lr > RISKY_LR and unfreeze_blocks:
        log(f"warning: --lr {lr} with unfrozen layers: large updates wreck the pretrained "
            "weights (accuracy can fall to chance after one epoch); 1e-5 is the safe default.")
    split = json.loads((Path(run_dir) / "split.json").read_text())
    if len(split["folds"]) != 1:
        raise UserError(f"{run_dir} was evaluated by cross-validation; fine-tune a run with a "
                        "held-out split (python -m classify without --cv).")
    c = cache_io.read(record["cache"])
    index = {p: i for i, p in enumerate(c.paths)}
    class_of = {name: k for k, name in enumerate(record["classes"])}
    fold = split["folds"][0]
    missing = [p for p in fold["train"] + fold["test"] if p not in index]
    if missing:
        raise UserError(f"{len(missing)} images of the run's split are no longer in "
                        f"{record['cache']} (e.g. {missing[0]}); train a new run.")

    def labels(paths):
        return np.array([class_of[c.classes[c.labels[index[p]]]] for p in paths])

    train_paths, test_paths = fold["train"], fold["test"]
    train_y, test_y = labels(train_paths), labels(test_paths)
    fit_idx, val_idx = _validation_split(train_paths, train_y, val_fraction, seed)
    root = c.attrs["dataset_root"]

    model, base, settings = assemble(record, pipeline)
    # Before training, the assembled model must give the head's predictions from images.
    test_ds = image_dataset(test_paths, test_y, root, settings, batch_size, False, seed, False)
    before_scores = model.predict(test_ds, verbose=0)
    head_scores = pipeline.predict_proba(c.embeddings[[index[p] for p in test_paths]])
    gap = float(np.abs(before_scores - head_scores).max())
    # A wrong model is off by far more; GPUs' TF32 convolutions move probabilities ~2e-3.
    if gap > 1e-2:
        raise UserError(f"the assembled model does not reproduce the run's predictions (max "
                        f"difference {gap:.2e}); the cache may be out of date: re-run featurize "
                        "and train the head again.")
    before = report.evaluate(test_y, before_scores.argmax(1), before_scores, len(record["classes"]))

    trained_layers = unfreeze(base, settings.spec, unfreeze_blocks)
    frozen_before = {w.path: keras.ops.convert_to_numpy(w) for w in base.weights if not _in(w, trained_layers)}
    model.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    fit_ds = image_dataset([train_paths[i] for i in fit_idx], train_y[fit_idx], root, settings,
                           batch_size, augment, seed, True)
    val_ds = image_dataset([train_paths[i] for i in val_idx], train_y[val_idx], root, settings,
                           batch_size, False, seed, False)
    callbacks = [keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.2, patience=2),
                 keras.callbacks.EarlyStopping(monitor="val_loss", patience=4,
                                               restore_best_weights=True)]
    start_weights = model.get_weights()
    val_before = float(model.evaluate(val_ds, verbose=0)[0])
    t0 = time.perf_counter()
    history = model.fit(fit_ds, validation_data=val_ds, epochs=epochs, callbacks=callbacks,
                        verbose=0)
    seconds = time.perf_counter() - t0
    epochs_run = len(history.history["loss"])
    val_after = float(model.evaluate(val_ds, verbose=0)[0])
    # Early stopping restores the best epoch, never the start: keep the start if no epoch paid.
    paid = val_after < val_before
    if not paid:
        model.set_weights(start_weights)
        log(f"fine-tuning did not lower the validation loss ({val_before:.4f} -> {val_after:.4f}); "
            "the saved model keeps the original weights.")
    after_scores = model.predict(test_ds, verbose=0)
    after = report.evaluate(test_y, after_scores.argmax(1), after_scores, len(record["classes"]))
    unchanged = all(np.array_equal(keras.ops.convert_to_numpy(w), frozen_before[w.path])
                    for w in base.weights if w.path in frozen_before)

    writer = runs.RunWriter(runs.new_dir("finetune", out, Path(run_dir).parent))
    try:
        model.save(writer.path("model.keras"))
        if settings.spec.family == "file":
            base.save(writer.path(FINETUNED_BASE_FILE))
        else:
            base.save_weights(writer.path(FINETUNED_BASE_WEIGHTS))
        shutil.copy(Path(run_dir) / "split.json", writer.path("split.json"))
        y_pred = after_scores.argmax(1)
        writer.text("report.txt", report.class_report(test_y, y_pred, record["classes"]))
        report.confusion_png(test_y, y_pred, record["classes"], writer.path("confusion.png"))
        new = {**record, "head": "finetune", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "finetuned_from": str(Path(run_dir).resolve()),
               "params": {"unfreeze": unfreeze_blocks, "lr": lr, "epochs": epochs,
                          "epochs_run": epochs_run, "batch_size": batch_size,
                          "augment": augment, "val_fraction": val_fraction, "seed": seed},
               "trained_layers": trained_layers, "metrics": after, "metrics_before": before,
               "train_seconds": seconds, "seconds_per_epoch": seconds / max(epochs_run, 1),
               "frozen_layers_unchanged": unchanged, "score_kind": "probability",
               "validation_loss_before": val_before, "validation_loss_after": val_after,
               "paid": paid}
        writer.json("run.json", new)
        writer.json("metrics.json", {"before": before, "after": after})
        new_dir = writer.commit()
    except BaseException:
        writer.abort()
        raise
    result = {"run_dir": new_dir, "before": before, "after": after, "epochs_run": epochs_run,
              "paid": paid, "validation_loss": (val_before, val_after),
              "seconds_per_epoch": seconds / max(epochs_run, 1), "trained_layers": trained_layers,
              "frozen_layers_unchanged": unchanged}
    if refeaturize:
        from featurize.run import featurize
        file_base = settings.spec.family == "file"
        s = featurize(root,
                      backbone=str(new_dir / FINETUNED_BASE_FILE) if file_base else settings.backbone,
                      weights="default" if file_base else str(new_dir / FINETUNED_BASE_WEIGHTS),
                      layer=settings.layer or None,
                      pool=None if settings.pooling == "none" else settings.pooling,
                      input_size=settings.input_size, crop=settings.crop or None,
                      precision=settings.precision, progress=False,
                      resize="device" if settings.model_input.source else "cpu",
                      source_size=settings.model_input.source,
                      cache_dir=Path(record["cache"]).parent)
        result["cache"] = s.path
    return result


def _in(weight, layer_names) -> bool:
    return weight.path.split("/")[0] in layer_names


def main(argv) -> int:
    args = _parser().parse_args(argv)
    r = finetune(args.run, args.unfreeze, args.lr, args.epochs, args.batch_size,
                 args.val_fraction, args.augment, args.refeaturize, args.out, args.seed)
    print(f"trained {len(r['trained_layers'])} layers for {r['epochs_run']} epochs "
          f"({r['seconds_per_epoch']:.1f} s per epoch); validation loss "
          f"{r['validation_loss'][0]:.4f} -> {r['validation_loss'][1]:.4f}"
          + ("" if r["paid"] else ": did not pay, original weights kept"))
    print(f"before: {report.format_metrics(r['before'])}")
    print(f"after:  {report.format_metrics(r['after'])}")
    if "cache" in r:
        print(f"new cache with the fine-tuned base: {r['cache']}")
    print(f"run: {r['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
