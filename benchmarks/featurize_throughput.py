"""End-to-end featurize throughput beside its two ceilings, measured in one run on the same files:
the model on pre-decoded arrays, and decoding alone (one worker and all workers).

    python benchmarks/featurize_throughput.py --backbone vggface-resnet50 --weights none --images 256
    KERAS_BACKEND=jax python benchmarks/featurize_throughput.py --images 13233 --batch-size 256 \\
        --precision mixed        # on a GPU machine

Compilation (the first batch) is timed separately and excluded from the rates.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import command_line, lfw_images, save

from featurize.extractor import build_extractor, make_settings
from featurize.images import list_dataset
from featurize.pipeline import batches, default_workers, executor


def rate(n, seconds):
    return n / seconds if seconds else float("inf")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="vggface-resnet50")
    p.add_argument("--weights", default="none")
    p.add_argument("--input-size", type=int)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--precision", default="float32", choices=["float32", "mixed"])
    p.add_argument("--lfw")
    args = p.parse_args()
    items = list_dataset(lfw_images(args.lfw)).items[:args.images]
    n = len(items)
    settings, w = make_settings(args.backbone, args.weights, input_size=args.input_size,
                                precision=args.precision)
    t = time.perf_counter()
    ext = build_extractor(settings, w)
    build_s = time.perf_counter() - t

    t = time.perf_counter()
    one = [ext.prepare(it.path) for it in items[: max(1, n // 4)]]
    decode_one = rate(len(one), time.perf_counter() - t)
    t = time.perf_counter()
    with executor(ext, args.workers) as pool:
        arrays = list(pool.map(ext.prepare, [it.path for it in items]))
    decode_all = rate(n, time.perf_counter() - t)

    stacked = np.stack(arrays)
    pad = (-n) % args.batch_size
    if pad and stacked.ndim == 4:
        stacked = np.concatenate([stacked, np.zeros((pad,) + stacked.shape[1:], stacked.dtype)])
    t = time.perf_counter()
    ext.embed(stacked[: args.batch_size])  # compile / warm up
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for start in range(0, len(stacked), args.batch_size):
        ext.embed(stacked[start:start + args.batch_size])
    model = rate(n, time.perf_counter() - t)

    t = time.perf_counter()
    done = sum(len(b.items) for b in batches(items, ext, args.batch_size, args.workers))
    end_to_end = rate(done, time.perf_counter() - t)
    ceiling = min(model, decode_all)
    result = {"backbone": args.backbone, "precision": args.precision, "images": n,
              "batch_size": args.batch_size, "workers": args.workers,
              "input_size": settings.input_size, "build_seconds": build_s,
              "compile_seconds": compile_s, "decode_one_worker_img_s": decode_one,
              "decode_all_workers_img_s": decode_all, "model_img_s": model,
              "end_to_end_img_s": end_to_end, "ratio_to_ceiling": end_to_end / ceiling,
              "ratio_to_model": end_to_end / model}
    for k, v in result.items():
        print(f"{k:<26} {v:.3f}" if isinstance(v, float) else f"{k:<26} {v}")
    name = f"throughput_{args.backbone.replace('-', '_')}_{args.precision}"
    save(name, result, command_line())


if __name__ == "__main__":
    main()
