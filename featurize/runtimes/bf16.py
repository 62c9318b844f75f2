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

from ..errors import UserError

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
        from .engines import import_openvino
        caps = import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # no OpenVINO, or no CPU plugin: not known to be native
        return False
    return "BF16" in caps


def fp32_settings(settings):
    """The float32 settings whose OpenVINO export the bfloat16 extractor compiles."""
    from dataclasses import replace
    return replace(settings, precision="float32", precision_engine="")


def bf16_extractor(settings, weights, dataset=None, cache_path=None):
    """OpenVINO in bfloat16 on the fp32 export, with `.report` (agreement with fp32 on
    held-out images of `dataset`: computed once per model and sample, kept beside the export;
    a cache of these settings at `cache_path` already holds it)."""
    from .engines import OpenVinoBf16Extractor
    from .exports import exported_model
    reference = fp32_settings(settings)
    exported = exported_model(reference, weights, "openvino")
    extractor = OpenVinoBf16Extractor(exported, settings)
    if extractor.compiled_precision != "bf16":
        raise UserError(f"OpenVINO compiles {settings.backbone} in "
                        f"{extractor.compiled_precision}, not bfloat16, on this CPU: OpenVINO "
                        "bfloat16 embeddings need a CPU with native bfloat16 (amx_bf16 or "
                        "avx512_bf16); use --precision float32 here.")
    extractor.report = _recorded_report(cache_path, settings)
    if not extractor.report and dataset is not None:
        extractor.report = _report(extractor, exported, reference, dataset)
    return extractor


def _recorded_report(cache_path, settings) -> dict:
    from .. import cache
    if cache_path is None or not Path(cache_path).is_file():
        return {}
    try:
        attrs = cache.read_attrs(cache_path)
    except UserError:
        return {}  # a damaged cache: featurize's own checks say so
    if attrs.get("settings") != settings.to_json():
        return {}
    return recorded_report(attrs, "bf16")


def recorded_report(attrs: dict, prefix: str) -> dict:
    """The agreement report a cache's attributes hold (`<prefix>_<name>` keys)."""
    return {k[len(prefix) + 1:]: v for k, v in attrs.items() if k.startswith(f"{prefix}_")}


def _report(extractor, exported, reference, dataset) -> dict:
    from .engines import OpenVinoExtractor
    from .int8 import _prepared, agreement, cached_report, sample
    _, held_out_items = sample(dataset.items, calibration=0)
    identity = ["bf16", [(i.path, i.size, i.mtime_ns, i.label) for i in held_out_items]]

    def compute():
        held_out, kept = _prepared(held_out_items, extractor.prepare)
        return agreement(OpenVinoExtractor(exported, reference), extractor, held_out,
                         [item.label for item in kept])
    return cached_report(exported.path.parent, "bf16", identity, compute)


def report_line(attrs: dict) -> str | None:
    """One line: how the bfloat16 embeddings of a cache compare with fp32's."""
    if "bf16_mean_cosine" not in attrs:
        return None
    from .int8 import agreement_text
    return (f"bf16 (OpenVINO) vs fp32 on {int(attrs['bf16_held_out_images'])} held-out images: "
            + agreement_text(recorded_report(attrs, "bf16")))
