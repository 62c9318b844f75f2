"""The fine-tune stage end to end on real LFW: cache -> logreg run -> fine-tune -> metrics
before/after and seconds per epoch (with --weights none only the plumbing is meaningful).

    python benchmarks/finetune_lfw.py --backbone vggface-resnet50 --weights none --input-size 112
    KERAS_BACKEND=jax python benchmarks/finetune_lfw.py --backbone vggface-vgg16 --min-per-class 20 \\
        --input-size 224 --epochs 2 --batch-size 64     # seconds per epoch on a GPU machine
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from classify._finetune import finetune
from classify._train import train
from common import command_line, lfw_images, people_subset, save
from featurize.jobs.run import featurize


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="vggface-resnet50")
    p.add_argument("--weights", default="none")
    p.add_argument("--input-size", type=int, default=112)
    p.add_argument("--min-per-class", type=int, default=70)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--unfreeze", type=int, default=1)
    p.add_argument("--lfw")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = people_subset(lfw_images(args.lfw), args.min_per_class,
                               Path(tmp) / f"lfw_min{args.min_per_class}")
        s = featurize(folder, backbone=args.backbone, weights=args.weights,
                      input_size=args.input_size, progress=True)
        run = train(s.path, "logreg", runs_dir=Path(tmp) / "runs")
        r = finetune(run.run_dir, unfreeze_blocks=args.unfreeze, epochs=args.epochs,
                     batch_size=args.batch_size)
        images = run.n_images
    print(f"{args.backbone} ({args.weights}) {images} images: {r['seconds_per_epoch']:.1f} s per "
          f"epoch over {r['epochs_run']} epochs; accuracy {r['before']['accuracy']:.4f} -> "
          f"{r['after']['accuracy']:.4f}")
    save(f"finetune_{args.backbone.replace('-', '_')}", {
        "backbone": args.backbone, "weights": args.weights, "input_size": args.input_size,
        "images": images, "train_images": round(images * 0.75), "epochs_run": r["epochs_run"],
        "seconds_per_epoch": r["seconds_per_epoch"], "before": r["before"], "after": r["after"],
        "trained_layers": len(r["trained_layers"]),
        "frozen_layers_unchanged": r["frozen_layers_unchanged"]}, command_line())


if __name__ == "__main__":
    main()
