"""Featurize on a CPU with each runtime and precision, side by side in one run: Keras fp32 and
mixed (bfloat16), ONNX Runtime and OpenVINO fp32 (the same model exported once), OpenVINO
bfloat16 (--precision mixed on a CPU with native bfloat16: the fp32 export compiled in bf16)
and int8 (ONNX Runtime, calibrated on 96 LFW images).

    python benchmarks/runtimes.py --images 512     # LFW, vggface-resnet50, random weights

Three parts, one JSON (results/runtimes_cpu.json):
- model only: the same prepared LFW batches through each contender, contenders interleaved
  (round-robin, so drift in the shared machine's load hits all alike), as wall img/s and as
  images per CPU-second of this process (os.times: user + system, every thread), and each
  contender's share of the machine's peak for its arithmetic (`peaks`, assumptions there);
- agreement with fp32 on 128 held-out images (cosine and centred cosine: cosine after
  subtracting the mean fp32 embedding, mean and min; logistic-regression top-1 agreement);
- whole command: `python -m featurize DIR --precision mixed` against the default (float32) on
  the first --images LFW images, wall and CPU seconds of the child process (resource), the
  bfloat16 run once computing its agreement report and once reusing it (a fresh cache of the
  same model and sample).
Weights: random (`--weights none`): speed does not depend on them. The whole-command runs
reuse the exports the model-only part made.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import REPO, command_line, lfw_images, save
from featurize.data.images import list_dataset
from featurize.models.config import make_settings

# Peak arithmetic per cycle per core (multiply and add counted as 2 operations), assumed:
# AVX-512 FP32: 2 FMA units x 16 lanes (Intel Xeon, AMD Zen 5: CPU family 26); AMD Zen 4
# (family 25) runs 512-bit FMAs on two 256-bit units (half). AVX512_BF16 (VDPBF16PS): twice the fp32 rate; AMX: one 16x16x32 bf16
# tile product (TDPBF16PS, 16384 ops) per 16 cycles = 1024 bf16 ops/cycle, and 2048 int8
# ops/cycle (TDPBUSD); AVX512_VNNI int8: 4x the fp32 rate. One vCPU is taken as one core.
FP32_AVX512, FP32_AVX2 = 64, 32


def cpu_flags() -> tuple[set, str, float, int]:
    """(flags, vendor, clock GHz from /proc/cpuinfo's "cpu MHz", CPU family) of the first CPU.
    In a VM "cpu MHz" is the nominal clock: boost makes the shares of peak look higher."""
    flags, vendor, mhz, family = set(), "", 0.0, 0
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "cpu MHz" and not mhz:
            mhz = float(value)
        elif key == "cpu family" and not family:
            family = int(value)
    return flags, vendor, mhz / 1000, family


def peaks(cores: int, ghz: float | None = None) -> dict:
    """The machine's peak GFLOP/s (GOP/s for int8) for fp32, bf16 and int8, from its flags."""
    flags, vendor, clock, family = cpu_flags()
    ghz = ghz or clock
    fp32 = FP32_AVX512 if "avx512f" in flags else FP32_AVX2
    if vendor == "AuthenticAMD" and "avx512f" in flags and family < 26:
        fp32 //= 2  # Zen 4: 512-bit operations on 256-bit units
    bf16 = 1024 if "amx_bf16" in flags else 2 * fp32 if "avx512_bf16" in flags else fp32
    int8 = 2048 if "amx_int8" in flags else 4 * fp32 if {"avx512_vnni", "avx_vnni"} & flags \
        else 2 * fp32
    per_cycle = {"fp32": fp32, "bf16": bf16, "int8": int8}
    return {"cores": cores, "ghz": ghz, "vendor": vendor, "cpu_family": family,
            "flags": sorted(f for f in flags if "amx" in f or "bf16" in f or "vnni" in f),
            "ops_per_cycle_per_core": per_cycle,
            "peak_gops": {k: v * ghz * cores for k, v in per_cycle.items()}}


def model_gmacs(xml_path) -> float:
    """Multiply-accumulates of one image through the OpenVINO model (convolutions, matmuls)."""
    from featurize.runtimes.engines import import_openvino
    model = import_openvino().Core().read_model(str(xml_path))
    macs = 0
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind not in ("Convolution", "GroupConvolution", "MatMul"):
            continue
        out = op.get_output_partial_shape(0).get_min_shape()
        weights = op.input(1).get_partial_shape().get_min_shape()
        if kind == "MatMul":
            macs += int(np.prod(out[1:])) * int(weights[0])
        else:
            skip = 2 if kind == "GroupConvolution" else 1
            macs += int(np.prod(out[1:])) * int(np.prod(weights[skip:]))
    return macs / 1e9


def contenders(backbone, dataset, args) -> dict:
    """name -> (extractor, the arithmetic it runs) for every runtime and precision here."""
    from dataclasses import replace

    from featurize import runtimes
    from featurize.runtimes import build_extractor
    from featurize.runtimes.bf16 import BF16_ENGINE, native_bf16
    fp32, w = make_settings(backbone, args.weights, input_size=args.input_size)
    mixed, _ = make_settings(backbone, args.weights, input_size=args.input_size,
                             precision="mixed")
    int8, _ = make_settings(backbone, args.weights, input_size=args.input_size, precision="int8")
    out = {"keras_fp32": (build_extractor(fp32, w, "keras"), "fp32"),
           "keras_mixed": (build_extractor(mixed, w, "keras"), "bf16"),
           "onnx_fp32": (runtimes.build_extractor(fp32, w, "onnx"), "fp32"),
           "openvino_fp32": (runtimes.build_extractor(fp32, w, "openvino"), "fp32")}
    if native_bf16():
        bf16 = replace(mixed, precision_engine=BF16_ENGINE)
        out["openvino_bf16"] = (runtimes.build_extractor(bf16, w, None, dataset), "bf16")
    out["onnx_int8"] = (runtimes.build_extractor(int8, w, None, dataset), "int8")
    return out


def model_only(built: dict, images: np.ndarray, rounds: int, batch: int) -> dict:
    """Each contender embeds `images` once per round, in turn; wall and CPU seconds summed."""
    totals = {name: [0.0, 0.0, 0] for name in built}
    for extractor, _ in built.values():
        extractor.embed(images[:batch])  # warm-up: first-call compilation, allocation
    for _ in range(rounds):
        for name, (extractor, _) in built.items():
            cpu, wall = _cpu_seconds(), time.perf_counter()
            for i in range(0, len(images), batch):
                extractor.embed(images[i:i + batch])
            totals[name][0] += time.perf_counter() - wall
            totals[name][1] += _cpu_seconds() - cpu
            totals[name][2] += len(images)
    return {name: {"img_s": n / wall, "img_per_cpu_s": n / cpu, "cpu_s": cpu, "images": n}
            for name, (wall, cpu, n) in totals.items()}


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def held_out_agreement(built: dict, dataset) -> dict:
    """Each contender's agreement with OpenVINO fp32 (= Keras fp32 to 1e-6) on held-out LFW."""
    from featurize.runtimes.agreement import agreement, prepared as _prepared, sample
    _, items = sample(dataset.items, calibration=0)
    reference = built["openvino_fp32"][0]
    images, kept = _prepared(items, reference.prepare)
    labels = [item.label for item in kept]
    return {name: agreement(reference, extractor, images, labels)
            for name, (extractor, _) in built.items() if name != "openvino_fp32"}


def lfw_subset(root: Path, n: int, dest: Path, per_person: int = 8) -> Path:
    """A folder of symlinks to the first people of LFW with at least `per_person` images each
    (so that a head's top-1 agreement on held-out images means something), `n` images or a
    few more in all."""
    count = 0
    for person in sorted(os.listdir(root)):
        if count >= n:
            break
        if len(os.listdir(root / person)) < per_person:
            continue
        (dest / person).mkdir(parents=True)
        for name in sorted(os.listdir(root / person)):
            (dest / person / name).symlink_to(root / person / name)
            count += 1
    return dest


def whole_command(folder: Path, backbone: str, args) -> dict:
    """`python -m featurize` wall and CPU seconds, float32 (default) and mixed, interleaved."""
    env = {k: v for k, v in os.environ.items() if k != "FEATURIZE_RUNTIME"}
    env["PYTHONPATH"] = str(REPO)
    runs = [("float32", "fresh"), ("mixed", "fresh_report"), ("float32", "again"),
            ("mixed", "kept_report")]
    out = {}
    for precision, label in runs:
        cache_dir = tempfile.mkdtemp(prefix="featurize-bench-cache-")
        if label == "fresh_report":  # the model-only part kept one: this run computes it
            exports = Path(os.environ["KERAS_HOME"]) / "models" / "featurize-exports"
            for kept in exports.glob("*-openvino-*/agreement-bf16-*.json"):
                kept.unlink()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "featurize", str(folder), "--backbone",
                               backbone, "--weights", args.weights, "--precision", precision,
                               "--cache-dir", cache_dir, "--quiet"],
                              env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if proc.returncode:
            sys.exit(f"featurize failed: {proc.stderr[-2000:]}")
        out[f"{precision}_{label}"] = {"wall_s": wall, "cpu_s": cpu,
                                       "stdout_tail": proc.stdout.strip().splitlines()[-3:]}
        print(precision, label, out[f"{precision}_{label}"], flush=True)
    fp32 = [out["float32_fresh"], out["float32_again"]]
    for key in ("mixed_fresh_report", "mixed_kept_report"):
        out[key]["speedup_wall"] = np.mean([r["wall_s"] for r in fp32]) / out[key]["wall_s"]
        out[key]["speedup_cpu"] = np.mean([r["cpu_s"] for r in fp32]) / out[key]["cpu_s"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="vggface-resnet50")
    p.add_argument("--weights", default="none")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--images", type=int, default=512, help="LFW images of the whole command")
    p.add_argument("--model-images", type=int, default=64, help="images per contender per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--ghz", type=float, help="clock for the peaks (default: /proc/cpuinfo)")
    p.add_argument("--lfw", help="LFW image folder (default: the shared dataset)")
    args = p.parse_args()
    os.environ["KERAS_HOME"] = tempfile.mkdtemp(prefix="featurize-bench-")  # fresh exports
    os.environ.pop("FEATURIZE_RUNTIME", None)
    folder = lfw_subset(lfw_images(args.lfw), args.images,
                        Path(tempfile.mkdtemp(prefix="featurize-bench-lfw-")) / "lfw")
    dataset = list_dataset(folder)
    built = contenders(args.backbone, dataset, args)
    images = np.stack([built["openvino_fp32"][0].prepare(item.path)
                       for item in dataset.items[:args.model_images]])
    rates = model_only(built, images, args.rounds, args.batch_size)
    machine_peaks = peaks(len(os.sched_getaffinity(0)), args.ghz)
    gmacs = model_gmacs(built["openvino_fp32"][0].exported.path)
    fp32_rate = rates["openvino_fp32"]["img_per_cpu_s"]
    for name, row in rates.items():
        kind = built[name][1]
        row["arithmetic"] = kind
        row["per_cpu_s_vs_openvino_fp32"] = row["img_per_cpu_s"] / fp32_rate
        # one core-second at peak does peak/cores GOP; the model needs 2*gmacs GOP per image
        row["share_of_peak"] = (row["img_per_cpu_s"] * 2 * gmacs
                                / (machine_peaks["peak_gops"][kind] / machine_peaks["cores"]))
        print(name, row, flush=True)
    agreement = held_out_agreement(built, dataset)
    reports = {name: getattr(extractor, "report", None) for name, (extractor, _) in built.items()
               if getattr(extractor, "report", None)}
    del built
    result = {"backbone": args.backbone, "weights": args.weights, "input_size": args.input_size,
              "batch_size": args.batch_size, "model_gmacs_per_image": gmacs,
              "peaks": machine_peaks, "model_only": rates, "agreement_vs_fp32": agreement,
              "extractor_reports": reports,
              "whole_command": {"images": len(dataset.items),
                                "runs": whole_command(folder, args.backbone, args)}}
    result.update(_earlier())
    save("runtimes_cpu", result, command_line())


def _earlier() -> dict:
    """The end-to-end figures an earlier version of this script saved (kept, with its date)."""
    import json

    from common import RESULTS
    try:
        old = json.loads((RESULTS / "runtimes_cpu.json").read_text())
    except (OSError, ValueError):
        return {}
    if "runtimes" in old:
        return {"earlier_end_to_end": {k: old.get(k) for k in (
            "command", "date", "machine", "images", "runtimes", "dlib_resnet")}}
    return {k: old[k] for k in ("earlier_end_to_end",) if k in old}


if __name__ == "__main__":
    main()
