"""Train time and accuracy of every head on one cache, the same split for all.

    python benchmarks/heads.py --cache data/cache/FILE.h5 --min-per-class 20
    python benchmarks/heads.py --cache DLIB_LFW_CACHE --lift 2048 --name heads_lifted_2048d

--lift D maps the embeddings through a fixed random ReLU layer to D dimensions: real class
structure at the shape of a bigger backbone's embeddings (ResNet-50: 2,048), for timing heads
where such a backbone's weights cannot be had.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile

import numpy as np

from classify._heads import HEADS
from classify._train import train
from common import command_line, save
from featurize import cache as cache_io


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", required=True)
    p.add_argument("--min-per-class", type=int, default=20)
    p.add_argument("--heads", default=",".join(HEADS))
    p.add_argument("--name", default="heads")
    p.add_argument("--lift", type=int, help="random ReLU lift to this many dimensions")
    args = p.parse_args()
    c = cache_io.read(args.cache)
    attrs = dict(c.attrs)
    if args.lift:
        rng = np.random.default_rng(0)
        w = rng.normal(0, c.embeddings.shape[1] ** -0.5, (c.embeddings.shape[1], args.lift))
        c = dataclasses.replace(c, embeddings=np.maximum(c.embeddings @ w, 0).astype(np.float32))
        attrs["embedding_dim"] = args.lift
    rows = []
    with tempfile.TemporaryDirectory() as runs_dir:
        for head in args.heads.split(","):
            r = train(c, head, min_per_class=args.min_per_class, runs_dir=runs_dir)
            rows.append({"head": head, "classes": len(r.classes), "images": r.n_images,
                         "dim": int(attrs["embedding_dim"]), "train_seconds": r.train_seconds,
                         "predict_seconds": r.predict_seconds, **r.metrics})
            print(f"{head:<9} {len(r.classes):>4} classes {r.n_images:>6} images "
                  f"dim {attrs['embedding_dim']:>5}  acc {r.metrics['accuracy']:.4f}  "
                  f"macroF1 {r.metrics['macro_f1']:.4f}  train {r.train_seconds:6.2f} s", flush=True)
    save(args.name, {"cache": str(args.cache), "backbone": attrs["backbone"], "lift": args.lift,
                     "min_per_class": args.min_per_class, "rows": rows}, command_line())


if __name__ == "__main__":
    main()
