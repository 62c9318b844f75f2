"""--engine ray against the single-process run, side by side on the same LFW images.

    python benchmarks/ray_overhead.py                          # dlib-resnet, 3,023 images
    python benchmarks/ray_overhead.py --backbone mobilenet_v2 --weights none --input-size 96
    python benchmarks/ray_overhead.py --lfw /tmp/lfw --backbone vggface-resnet50 --weights none \
        --precision mixed --resize device --num-cpus 16 --gpus-per-worker 1   # one GPU actor

Both runs embed the people with at least --min-per-class images into a fresh cache, in this
process, after one read of every file (both find them in the page cache). The Ray run's time
includes starting Ray (`ray.init(num_cpus=N)`) and its actors, and shutting it down: the
whole cost a user pays. The two caches are compared row by row.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import command_line, lfw_images, people_subset, save


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="dlib-resnet")
    p.add_argument("--weights", default="default")
    p.add_argument("--input-size", type=int)
    p.add_argument("--lfw")
    p.add_argument("--min-per-class", type=int, default=20)
    p.add_argument("--num-cpus", type=int, default=2, help="ray.init(num_cpus=...)")
    p.add_argument("--gpus-per-worker", type=float, default=0,
                   help="on a GPU machine: 1 measures one GPU actor")
    p.add_argument("--precision", default="float32")
    p.add_argument("--resize", default="cpu")
    p.add_argument("--batch-size", type=int)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = people_subset(lfw_images(args.lfw), args.min_per_class, Path(tmp) / "lfw")
        n = _warm(folder)
        options = dict(backbone=args.backbone, weights=args.weights, progress=False,
                       batch_size=args.batch_size)
        if args.backbone != "dlib-resnet":  # dlib takes none of these
            options.update(input_size=args.input_size, precision=args.precision,
                           resize=args.resize)
        local = _timed(folder, Path(tmp) / "local.h5", options)
        ray_run = _timed(folder, Path(tmp) / "ray.h5",
                         {**options, "engine": "ray", "gpus_per_worker": args.gpus_per_worker},
                         num_cpus=args.num_cpus)
        difference = _compare(Path(tmp) / "local.h5", Path(tmp) / "ray.h5")
    overhead = ray_run["seconds"] / local["seconds"] - 1
    print(f"{n} images, {args.backbone}: single process {local['img_per_s']:.2f} img/s "
          f"({local['seconds']:.1f} s), --engine ray {ray_run['img_per_s']:.2f} img/s "
          f"({ray_run['seconds']:.1f} s, Ray start {ray_run['ray_start_s']:.1f} s): overhead "
          f"{overhead:+.1%}; embeddings differ by at most {difference:.2e}")
    name = f"ray_overhead_{args.backbone.replace('-', '_')}"
    save(name, {"backbone": args.backbone, "weights": args.weights,
                "input_size": args.input_size, "precision": args.precision,
                "resize": args.resize, "gpus_per_worker": args.gpus_per_worker,
                "images": n, "ray_num_cpus": args.num_cpus,
                "local": local, "ray": ray_run, "overhead": overhead,
                "max_abs_difference": difference}, command_line())


def _warm(folder: Path) -> int:
    """Read every image once, so that neither run pays for the disk."""
    n = 0
    for dirpath, _, names in os.walk(folder, followlinks=True):  # the people are links
        for name in names:
            Path(dirpath, name).read_bytes()
            n += 1
    return n


def _timed(folder: Path, out: Path, options: dict, num_cpus: int | None = None) -> dict:
    from featurize.jobs.run import featurize
    start = time.perf_counter()
    ray_start = 0.0
    if num_cpus:
        import ray
        ray.init(num_cpus=num_cpus, log_to_driver=False, include_dashboard=False,
                 configure_logging=False)
        ray_start = time.perf_counter() - start
    try:
        summary = featurize(folder, out=out, **options)
    finally:
        if num_cpus:
            ray.shutdown()
    seconds = time.perf_counter() - start
    total = summary.embedded + len(summary.failed)
    return {"seconds": seconds, "img_per_s": total / seconds, "embedded": summary.embedded,
            "failed": len(summary.failed), "ray_start_s": ray_start}


def _compare(a: Path, b: Path) -> float:
    from featurize import cache
    x, y = cache.read(a), cache.read(b)
    if x.paths != y.paths or x.failed != y.failed:
        sys.exit("the two runs differ in paths or failures")
    return float(np.abs(x.embeddings - y.embeddings).max()) if len(x.paths) else 0.0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
