"""`--precision mixed` on a CPU with native bfloat16 (avx512_bf16 or AMX): the fp32 OpenVINO
export (the one --precision float32 uses; nothing converted again) compiled by OpenVINO with
INFERENCE_PRECISION_HINT bf16, with a report of how far its embeddings are from fp32's.

Measured on a 2-vCPU Xeon with AMX (benchmarks/runtimes.py, ResNet-50): 4x the images per
CPU-second of OpenVINO fp32, centred cosine to fp32 ~0.9996. OpenVINO's bfloat16 is not
Keras's mixed_bfloat16 (other layers stay in float32, other accumulation order), so its caches
have their own key (settings.precision_engine "openvino-bf16"); Keras-mixed caches keep theirs.
On a CPU without native bfloat16, bf16 would be emulated (slower than float32): --precision
mixed then stays Keras's mixed precision, as before, with a warning (`settle`).
"""

from __future__ import annotations

from pathlib import Path

from featurize.errors import UserError
from featurize.runtimes.agreement import recorded_report

BF16_ENGINE = "openvino-bf16"  # settings.precision_engine of an OpenVINO-bfloat16 cache
NATIVE_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bfloat16 units
NO_NATIVE = ("this CPU has no native bfloat16 (no amx_bf16 or avx512_bf16 flag), so bfloat16 "
             "would be emulated and slower than float32")


def native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU computes bfloat16 natively: its flags, else (no /proc/cpuinfo) what
    OpenVINO's CPU plugin reports."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        text = None
    if text is not None:
        for line in text.splitlines():
            if line.startswith("flags"):
                return any(flag in line.split(":", 1)[-1].split() for flag in NATIVE_FLAGS)
    try:
        from featurize.runtimes.engines import import_openvino
        caps = import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # no OpenVINO, or no CPU plugin: not known to be native
        return False
    return "BF16" in caps


def fp32_settings(settings):
    """The float32 settings whose OpenVINO export the bfloat16 extractor compiles."""
    from dataclasses import replace
    return replace(settings, precision="float32", precision_engine="")


def bf16_extractor(settings, weights, dataset=None, cache_attrs: dict | None = None):
    """OpenVINO in bfloat16 on the fp32 export, with `.report` (agreement with fp32 on
    held-out images of `dataset`: computed once per model and sample, kept beside the export;
    the cache being extended, whose attributes are `cache_attrs`, already holds it)."""
    from featurize.runtimes.engines import OpenVinoBf16Extractor
    from featurize.runtimes.exports import exported_model
    reference = fp32_settings(settings)
    exported = exported_model(reference, weights, "openvino")
    extractor = OpenVinoBf16Extractor(exported, settings)
    if extractor.compiled_precision != "bf16":
        raise UserError(f"OpenVINO compiles {settings.backbone} in "
                        f"{extractor.compiled_precision}, not bfloat16, on this CPU: OpenVINO "
                        "bfloat16 embeddings need a CPU with native bfloat16 (amx_bf16 or "
                        "avx512_bf16); use --precision float32 here.")
    extractor.report = _recorded_report(cache_attrs, settings)
    if not extractor.report and dataset is not None:
        extractor.report = _report(extractor, exported, reference, dataset)
    return extractor


def _recorded_report(cache_attrs: dict | None, settings) -> dict:
    if not cache_attrs or cache_attrs.get("settings") != settings.to_json():
        return {}
    return recorded_report(cache_attrs, "bf16")


def _report(extractor, exported, reference, dataset) -> dict:
    from featurize.runtimes.agreement import agreement, cached_report, prepared, sample
    from featurize.runtimes.engines import OpenVinoExtractor
    _, held_out_items = sample(dataset.items, calibration=0)
    identity = ["bf16", [(i.path, i.size, i.mtime_ns, i.label) for i in held_out_items]]

    def compute():
        held_out, kept = prepared(held_out_items, extractor.prepare)
        return agreement(OpenVinoExtractor(exported, reference), extractor, held_out,
                         [item.label for item in kept])
    return cached_report(exported.path.parent, "bf16", identity, compute)


