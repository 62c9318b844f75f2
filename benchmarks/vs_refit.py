"""Featurize once + a logreg head, against what users do today: the same frozen base re-run
on every epoch while a head trains (model.fit over an image generator). Same images, same
base, measured side by side in one run; both sides include building the model.

    python benchmarks/vs_refit.py --images 128 --epochs 20 --input-size 96
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from classify._train import train
from common import command_line, lfw_images, people_subset, save
from featurize.data.images import list_dataset, load_for_model
from featurize.jobs.run import featurize


def refit_every_epoch(folder, items, classes, args) -> float:
    import keras

    from featurize.models.config import make_settings
    from featurize.models.keras import build_base
    from featurize.models.preprocessing import ImagePreprocessing
    label = {c: i for i, c in enumerate(classes)}
    t = time.perf_counter()
    settings, w = make_settings(args.backbone, args.weights, input_size=args.input_size)
    base = build_base(settings, w)
    base.trainable = False
    size = settings.input_size
    inputs = keras.Input((size, size, 3), dtype="uint8")
    x = base(ImagePreprocessing(settings.preprocessing)(inputs), training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(len(classes), activation="softmax")(x))
    model.compile("adam", "sparse_categorical_crossentropy")

    class Images(keras.utils.PyDataset):  # decodes every image again each epoch, as users do
        def __len__(self):
            return int(np.ceil(len(items) / args.batch_size))

        def __getitem__(self, i):
            chunk = items[i * args.batch_size:(i + 1) * args.batch_size]
            return (np.stack([load_for_model(it.path, size) for it in chunk]),
                    np.array([label[it.label] for it in chunk]))

    model.fit(Images(), epochs=args.epochs, verbose=0)
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="vggface-resnet50")
    p.add_argument("--weights", default="none")
    p.add_argument("--input-size", type=int, default=96)
    p.add_argument("--images", type=int, default=128,
                   help="at most this many, the same number from each of the 7 people with 70 "
                        "or more images (497 at most)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lfw")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        people = people_subset(lfw_images(args.lfw), 70, Path(tmp) / "people")
        ds = list_dataset(people)
        by_class = {c: [it for it in ds.items if it.label == c] for c in ds.classes}
        items = [it for group in zip(*by_class.values()) for it in group][:args.images]
        chosen = Path(tmp) / "chosen"
        for it in items:
            (chosen / it.label).mkdir(parents=True, exist_ok=True)
            (chosen / it.key).symlink_to(it.path)
        classes = sorted({it.label for it in items})

        t = time.perf_counter()
        s = featurize(chosen, backbone=args.backbone, weights=args.weights,
                      input_size=args.input_size, batch_size=args.batch_size,
                      cache_dir=Path(tmp) / "cache", progress=False)
        r = train(s.path, "logreg", runs_dir=Path(tmp) / "runs")
        once = time.perf_counter() - t
        print(f"featurize once + logreg: {once:.1f} s", flush=True)
        refit = refit_every_epoch(chosen, list_dataset(chosen).items, classes, args)
        print(f"base re-run every epoch ({args.epochs} epochs): {refit:.1f} s")
    ratio = refit / once
    print(f"speed-up {ratio:.1f}x (goal: at least 15x)")
    save("vs_refit", {"backbone": args.backbone, "input_size": args.input_size,
                      "images": len(items), "epochs": args.epochs,
                      "featurize_once_plus_logreg_seconds": once,
                      "refit_every_epoch_seconds": refit, "speedup": ratio,
                      "logreg_accuracy": r.metrics["accuracy"]}, command_line())


if __name__ == "__main__":
    main()
