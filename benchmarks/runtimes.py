"""Featurize on a CPU with each runtime, side by side in one run: Keras/TensorFlow, ONNX
Runtime and OpenVINO (fp32, the same model exported once) and int8 (ONNX Runtime, calibrated
on 96 LFW images, its agreement with fp32 on 128 held-out ones), as img/s and as a ratio to
Keras; the export time apart; and dlib-resnet's rate with 1 and 2 worker processes.

    python benchmarks/runtimes.py --images 256     # LFW, 224 px, vggface-resnet50 and -vgg16

End to end: the real pipeline (decoding workers, fixed-shape batches) over the same LFW
files; the first batch (warm-up) is excluded from the sustained rate, as in
featurize_throughput.py. Weights: random (`--weights none`): speed does not depend on them.
Exports go to a fresh temporary KERAS_HOME, so their time is measured, not reused.
One JSON: results/runtimes_cpu.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from common import command_line, lfw_images, save

from featurize.extractor import make_settings
from featurize.images import list_dataset
from featurize.pipeline import default_workers


def end_to_end(items, extractor, batch_size, workers) -> dict:
    from featurize_throughput import run_pipeline
    sustained, whole = run_pipeline(items, extractor, batch_size, workers)
    return {"img_s": sustained, "whole_call_img_s": whole}


def runtime_rates(backbone, dataset, items, args) -> dict:
    """Keras, each fp32 runtime and int8 (calibrated on LFW, held-out report) end to end."""
    from featurize import runtimes
    from featurize.runtimes.exports import exported_model
    settings, w = make_settings(backbone, args.weights, input_size=args.input_size)
    out = {}
    for runtime in ("keras", "onnx", "openvino", "int8"):
        row = {}
        start = time.perf_counter()
        if runtime == "int8":  # export: the fp32 ONNX model is there; calibrate and compare
            int8_settings, _ = make_settings(backbone, args.weights, input_size=args.input_size,
                                             precision="int8")
            extractor = runtimes.build_extractor(int8_settings, w, None, dataset)
            row["export_s"] = time.perf_counter() - start
            row["report"] = extractor.report
        else:
            if runtime != "keras":  # onnx's includes the SavedModel that openvino reuses
                row["export_s"] = exported_model(settings, w, runtime).seconds
            extractor = runtimes.build_extractor(settings, w, runtime)
        row.update(end_to_end(items, extractor, args.batch_size, args.workers))
        out[runtime] = row
        print(backbone, runtime, row, flush=True)
        del extractor
    for row in out.values():
        row["ratio_to_keras"] = row["img_s"] / out["keras"]["img_s"]
    return out


def dlib_rates(items) -> dict:
    from featurize.extractor import build_extractor
    settings, w = make_settings("dlib-resnet")
    extractor = build_extractor(settings, w)
    out = {}
    for workers in (1, 2):
        out[f"workers_{workers}"] = end_to_end(items, extractor, 32, workers)
        print("dlib-resnet", workers, out[f"workers_{workers}"], flush=True)
    out["img_s_per_core"] = out["workers_1"]["img_s"]
    out["scaling_2_workers"] = out["workers_2"]["img_s"] / out["workers_1"]["img_s"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", default=["vggface-resnet50", "vggface-vgg16"])
    p.add_argument("--weights", default="none")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--no-dlib", action="store_true", help="skip dlib-resnet")
    p.add_argument("--lfw", help="LFW image folder (default: the shared dataset)")
    args = p.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.environ["KERAS_HOME"] = tempfile.mkdtemp(prefix="featurize-bench-")  # fresh exports
    dataset = list_dataset(lfw_images(args.lfw))
    items = dataset.items[:args.images]  # sorted by key: the same files every run
    result = {"images": len(items), "input_size": args.input_size, "batch_size": args.batch_size,
              "workers": args.workers, "weights": args.weights,
              "cpu_threads": len(os.sched_getaffinity(0)),
              "runtimes": {b: runtime_rates(b, dataset, items, args) for b in args.backbones}}
    if not args.no_dlib:
        result["dlib_resnet"] = dlib_rates(items)
    save("runtimes_cpu", result, command_line())


if __name__ == "__main__":
    main()
