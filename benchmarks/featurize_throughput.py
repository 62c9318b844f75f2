"""End-to-end featurize throughput beside its two ceilings, measured in one run on the same files:
the model on pre-decoded batches, and decoding into batch buffers with no model (Pillow alone,
the fast JPEG path, and the fast path with the resize left to the model).

    python benchmarks/featurize_throughput.py --backbone vggface-resnet50 --weights none --images 256
    KERAS_BACKEND=jax python benchmarks/featurize_throughput.py --images 13233 --precision mixed \\
        --resize device cpu      # on a GPU machine

Compilation (the first batch) is timed separately and excluded from the rates, which are
sustained rates after the first batch; the whole-call rates (worker start included) are
saved beside them. One JSON per
resize mode: results/throughput_<backbone>_<precision>_<resize>_<cpu|gpu>.json.
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from common import command_line, lfw_images, save
from featurize.data.images import ModelInput, fit, image_size, list_dataset, open_rgb
from featurize.engines.pipeline import batches, default_workers
from featurize.models.config import make_settings
from featurize.models.keras import accelerator, default_batch_size
from featurize.models.registry import spec_of
from featurize.runtimes import build_extractor


class PillowInput(ModelInput):
    """The same preparation with Pillow's decoder only: the baseline for the fast path."""

    def __call__(self, path):
        return fit(np.asarray(open_rgb(path, self.size)), self.size, self.crop)


class NoModel:
    """Decoding alone, through the real pipeline: its ceiling."""

    def __init__(self, prepare):
        self.prepare, self.input_shape = prepare, prepare.shape

    def embed(self, batch):
        return np.zeros((len(batch), 1), np.float32)


def rate(n, seconds):
    return n / seconds if seconds else float("inf")


def run_pipeline(items, extractor, batch_size, workers):
    """(sustained img/s after the first batch, img/s over the whole call): the first batch
    carries the workers' start, which a real run overlaps with compiling the model."""
    t = time.perf_counter()
    done, first, t_first = 0, 0, None
    for b in batches(items, extractor, batch_size, workers):
        done += len(b.items) + len(b.failed)
        if t_first is None:
            first, t_first = done, time.perf_counter()
    end = time.perf_counter()
    sustained = rate(done - first, end - t_first) if done > first else rate(done, end - t)
    return sustained, rate(done, end - t)


class GpuUtilisation:
    """Mean GPU utilisation (NVML) while the block runs; None without an NVIDIA GPU."""

    def __enter__(self):
        self.samples, self.stop = [], threading.Event()
        try:
            import pynvml
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            return self

        def sample():
            while not self.stop.wait(0.05):
                self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()

    @property
    def mean(self):
        return float(np.mean(self.samples)) if self.samples else None


def model_rate(ext, batch_size, n, seed=0):
    """embed() on pre-decoded batches (uint8 from the host, copied to the accelerator while the
    previous batch is computed, as the pipeline does)."""
    rng = np.random.default_rng(seed)
    ring = [rng.integers(0, 256, (batch_size, *ext.input_shape), dtype=np.uint8) for _ in range(4)]
    t = time.perf_counter()
    ext.embed(ring[0])  # compile / warm up
    compile_s = time.perf_counter() - t
    steps = max(1, -(-n // batch_size))
    upload = ext.to_device if getattr(ext, "overlap_upload", False) else (lambda b: b)
    with ThreadPoolExecutor(1) as uploader:
        t = time.perf_counter()
        pending = uploader.submit(upload, ring[0])
        for k in range(steps):
            data = pending.result()
            if k + 1 < steps:
                pending = uploader.submit(upload, ring[(k + 1) % len(ring)])
            ext.embed(data)
        return rate(steps * batch_size, time.perf_counter() - t), compile_s


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="vggface-resnet50")
    p.add_argument("--weights", default="none")
    p.add_argument("--input-size", type=int)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--precision", default="float32", choices=["float32", "mixed"])
    p.add_argument("--resize", nargs="+", default=["cpu"], choices=["cpu", "device"])
    p.add_argument("--lfw")
    args = p.parse_args()
    items = list_dataset(lfw_images(args.lfw)).items[:args.images]
    n, workers = len(items), args.workers
    batch_size = args.batch_size or default_batch_size()
    settings, w = make_settings(args.backbone, args.weights, input_size=args.input_size)
    if spec_of(settings).family.per_image:  # all its work is per image, in the workers
        return dlib_rate(items, settings, w, workers)
    source, size = image_size(items[0].path), settings.input_size

    decoders = {"pillow": PillowInput(size), "fast": ModelInput(size),
                "fast_no_resize": ModelInput(size, source=source)}
    decode = {}
    for name, prepare in decoders.items():
        one = one_worker_rate(prepare, items)
        sustained, wall = run_pipeline(items, NoModel(prepare), batch_size, workers)
        decode[name] = {"one_worker_img_s": one, "all_workers_img_s": sustained,
                        "all_workers_wall_img_s": wall}
        print(f"decode {name:<15} 1 worker {one:9.1f} img/s   {workers} workers "
              f"{sustained:9.1f} img/s ({wall:.1f} with their start)", flush=True)

    for mode in args.resize:
        settings, w = make_settings(args.backbone, args.weights, input_size=args.input_size,
                                    precision=args.precision,
                                    source_size=source if mode == "device" else None)
        t = time.perf_counter()
        ext = build_extractor(settings, w, "keras")
        build_s = time.perf_counter() - t
        model, compile_s = model_rate(ext, batch_size, n)
        with GpuUtilisation() as gpu:
            end_to_end, end_to_end_wall = run_pipeline(items, ext, batch_size, workers)
        dec = decode["fast_no_resize" if mode == "device" else "fast"]["all_workers_img_s"]
        result = {"backbone": args.backbone, "precision": args.precision, "resize": mode,
                  "images": n, "source_size": list(source), "batch_size": batch_size,
                  "workers": workers, "input_size": settings.input_size,
                  "accelerator": accelerator(), "build_seconds": build_s,
                  "compile_seconds": compile_s, "decode": decode,
                  "decode_one_worker_img_s": decode["fast"]["one_worker_img_s"],
                  "decode_all_workers_img_s": dec, "model_img_s": model,
                  "end_to_end_img_s": end_to_end, "end_to_end_wall_img_s": end_to_end_wall,
                  "overlap_upload": getattr(ext, "overlap_upload", False), "ratio_to_ceiling": end_to_end / min(model, dec),
                  "ratio_to_model": end_to_end / model, "gpu_utilisation_pct": gpu.mean}
        print(f"--- resize {mode}")
        for k, v in result.items():
            if k != "decode":
                print(f"{k:<26} {v:.3f}" if isinstance(v, float) else f"{k:<26} {v}")
        name = (f"throughput_{args.backbone.replace('-', '_')}_{args.precision}_{mode}_"
                f"{'gpu' if accelerator() else 'cpu'}")
        save(name, result, command_line())


def dlib_rate(items, settings, w, workers):
    ext = build_extractor(settings, w, "keras")
    n = len(items)
    one = one_worker_rate(ext.prepare, items)
    sustained, wall = run_pipeline(items, ext, 32, workers)
    result = {"backbone": settings.backbone, "precision": "float32", "images": n,
              "workers": workers, "decode_one_worker_img_s": one, "end_to_end_img_s": sustained,
              "end_to_end_wall_img_s": wall}
    print(result)
    save("throughput_dlib_resnet", result, command_line())


def one_worker_rate(prepare, items):
    """prepare() in this process alone, on an eighth of the images."""
    some = items[:max(1, len(items) // 8)]
    t = time.perf_counter()
    for it in some:
        prepare(it.path)
    return rate(len(some), time.perf_counter() - t)


if __name__ == "__main__":
    main()
