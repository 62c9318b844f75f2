"""Where a Keras backbone runs: Keras itself, or an exported copy of the same model run by
ONNX Runtime or OpenVINO (faster on a CPU).

Keras stays the source of truth: the exported model is the exact Keras model featurize
builds (preprocessing, crop/resize layers, the cut at --layer, pooling, flip), exported once
into `~/.keras/models/featurize-exports/` and reused (`featurize.runtimes.exports`). An fp32
runtime gives the same embeddings as Keras (to ~1e-6 relative, tested), so it shares Keras's
cache key; the runtime is recorded in the cache's provenance. Nothing here imports Keras,
ONNX Runtime or OpenVINO until an extractor is built.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

from featurize.errors import UserError
from featurize.models.config import family_extractor, weights_for
from featurize.models.registry import get_backbone, spec_of

RUNTIMES = ("keras", "onnx", "openvino")
# The default on a CPU, fastest first: measured with benchmarks/runtimes.py (OpenVINO 1.41x
# TensorFlow on ResNet-50 end to end, ONNX Runtime 1.25x; 0.98x and 0.93x on VGG16).
CPU_PREFERENCE = ("openvino", "onnx")
ENV_RUNTIME = "FEATURIZE_RUNTIME"  # the default runtime of a machine (or a test suite)
# What each exported runtime needs installed, and the extra that installs it.
REQUIRES = {"onnx": ("onnxruntime", "tf2onnx", "onnx"), "openvino": ("openvino",)}
EXTRA_HINT = "pip install 'featurize-embeddings[{}]'"


def requested(runtime: str | None) -> str | None:
    """The runtime asked for: the option, else the FEATURIZE_RUNTIME environment variable (a
    machine's or a test suite's default), else None (choose)."""
    return runtime if runtime is not None else (os.environ.get(ENV_RUNTIME) or None)


def check_runtime(runtime: str | None, option: str = "--runtime") -> str | None:
    """A valid --runtime, installed (None: choose when the extractor is built), checked
    without importing it: before any file is written."""
    if runtime is not None and runtime not in RUNTIMES:
        raise UserError(f"{option} must be {' or '.join(RUNTIMES)}, not {runtime!r}.")
    if runtime in REQUIRES:
        require(runtime)
    return runtime


def installed(runtime: str) -> bool:
    """Whether what `runtime` needs is importable (found, not imported)."""
    return all(importlib.util.find_spec(m) is not None for m in REQUIRES.get(runtime, ()))


def require(runtime: str) -> None:
    """A one-line UserError naming the extra when `runtime` is asked for but not installed."""
    if not installed(runtime):
        missing = [m for m in REQUIRES[runtime] if importlib.util.find_spec(m) is None]
        raise UserError(f"--runtime {runtime} needs {', '.join(missing)}: "
                        f"{EXTRA_HINT.format(runtime)} (or use --runtime keras).")


def exportable(settings) -> bool:
    """Whether the settings describe one Keras model an exported runtime can run: not dlib
    (not a Keras model), not --precision mixed (bfloat16 is Keras's), not --resize device
    (its antialiased resize has no ONNX/OpenVINO operator, and is for accelerators)."""
    return _exportable(spec_of(settings), settings.precision, settings.device_source is None)


def _exportable(spec, precision: str, cpu_resize: bool) -> bool:
    return not spec.family.per_image and precision in ("float32", "int8") and cpu_resize


def check_options(config, runtime: str | None) -> None:
    """Reject a runtime the embedding options (an `EmbedderConfig`) cannot run on, before
    anything is listed or written (also when every image is already cached)."""
    runtime = check_runtime(runtime)
    cpu_resize = config.resize == "cpu" and config.source_size is None
    if config.precision == "int8":
        if runtime not in (None, "onnx") or not _exportable(get_backbone(config.backbone),
                                                             "int8", cpu_resize):
            raise UserError(INT8_HELP)
        require("onnx")
    elif config.precision == "mixed" and runtime == "openvino" and _exportable(
            get_backbone(config.backbone), "float32", cpu_resize):
        require("openvino")  # bfloat16 on OpenVINO (`settle`)
    elif runtime not in (None, "keras") and not _exportable(get_backbone(config.backbone),
                                                            config.precision, cpu_resize):
        raise UserError(_keras_only(runtime, config.backbone))


INT8_HELP = ("--precision int8 runs a Keras backbone's model quantised on ONNX Runtime, with "
             "--resize cpu: use --runtime onnx (or leave it out).")


def _keras_only(runtime: str, backbone: str) -> str:
    return (f"--runtime {runtime} runs a Keras backbone at --precision float32 with --resize "
            f"cpu; {backbone} with these options runs on Keras: use --runtime keras.")


def choose(settings, runtime: str | None = None) -> str:
    """The runtime asked for (checked: installed, able to run these settings), or the default:
    the fastest faithful one installed for the device (Keras on a GPU/TPU; on a CPU
    OpenVINO, else ONNX Runtime, else Keras). FEATURIZE_RUNTIME, where set, is the default
    (Keras for what only Keras runs; int8 runs on ONNX Runtime whatever it says)."""
    runtime = check_runtime(runtime)
    if settings.precision == "mixed":
        return _mixed_runtime(settings, runtime)
    preferred = check_runtime(requested(None), ENV_RUNTIME)
    if runtime is None and preferred is not None and settings.precision != "int8":
        return preferred if preferred == "keras" or exportable(settings) else "keras"
    if settings.precision == "int8":
        if runtime not in (None, "onnx") or not exportable(settings):
            raise UserError(INT8_HELP)
        require("onnx")
        return "onnx"
    if runtime == "keras":
        return runtime
    if runtime is not None:
        if not exportable(settings):
            raise UserError(_keras_only(runtime, settings.backbone))
        require(runtime)
        return runtime
    if not exportable(settings) or _on_accelerator():
        return "keras"
    return next((r for r in CPU_PREFERENCE if installed(r)), "keras")


def _mixed_runtime(settings, runtime: str | None) -> str:
    """--precision mixed runs where `settle` put it: OpenVINO in bfloat16, or Keras."""
    from featurize.runtimes.bf16 import BF16_ENGINE
    if settings.precision_engine == BF16_ENGINE:
        if runtime not in (None, "openvino"):
            raise UserError(f"these bfloat16 embeddings are OpenVINO's: use --runtime openvino "
                            f"(or leave it out), not --runtime {runtime}.")
        require("openvino")
        return "openvino"
    if runtime not in (None, "keras"):
        raise UserError(_keras_only(runtime, settings.backbone))
    return "keras"


def settle(settings, runtime: str | None = None):
    """The settings a run embeds with. --precision mixed on a CPU with native bfloat16, where
    OpenVINO would run float32 (the default there, or --runtime openvino), runs the OpenVINO
    export in bfloat16: its own cache key (precision_engine). Otherwise it stays Keras's mixed
    precision (a GPU, --runtime keras, what OpenVINO cannot run); on a CPU without native
    bfloat16 with a warning that it is emulated (--runtime openvino: a UserError)."""
    from dataclasses import replace

    from featurize.runtimes.bf16 import BF16_ENGINE, NO_NATIVE, native_bf16
    if settings.precision != "mixed" or settings.precision_engine:
        return settings
    asked = check_runtime(runtime)
    if requested(asked) not in (None, "openvino"):
        return settings  # Keras's mixed precision (or a UserError from `choose`)
    if not _exportable(spec_of(settings), "float32", settings.device_source is None):
        if asked == "openvino":
            raise UserError(_keras_only("openvino", settings.backbone))
        return settings
    if asked is None and (not installed("openvino") or _on_accelerator()):
        return settings  # Keras's mixed precision on a GPU, as before
    require("openvino")
    if not native_bf16():
        if asked == "openvino":
            raise UserError(f"--runtime openvino --precision mixed: {NO_NATIVE}; use "
                            "--precision float32 (or --runtime keras for Keras's mixed).")
        warnings.warn(f"--precision mixed: {NO_NATIVE}; it runs on Keras (mixed_bfloat16); "
                      "--precision float32 is faster here.", RuntimeWarning, stacklevel=2)
        return settings
    return replace(settings, precision_engine=BF16_ENGINE)


def describe_precision(settings) -> str:
    """The precision as a run's header line says it."""
    if settings.precision_engine:
        return "mixed: bfloat16 on OpenVINO (this CPU has native bfloat16)"
    return settings.precision


def _on_accelerator() -> bool:
    from featurize.models.keras import accelerator, import_keras
    import_keras()
    return accelerator()


def build_extractor(settings, weights=None, runtime: str | None = None, dataset=None,
                    cache_attrs: dict | None = None):
    """The extractor for `settings` on the chosen runtime (see `choose`): the one way
    featurize, the API, Ray, predict, search, verify and the estimators get an extractor.

    `weights` are the resolved weights (None: those a cache was made with, found from
    `cache_attrs`, the attributes of the cache being extended or embedded into). When the
    default runtime cannot export this model, the next one is used (with a warning); a
    runtime asked for by name is that runtime or a UserError. --precision int8 goes on with
    the quantised model of the cache (`cache_attrs`), else is calibrated on a sample of
    `dataset` (a `featurize.data.images.Dataset`)."""
    chosen = choose(settings, runtime)
    if settings.precision == "int8":
        return _int8_extractor(settings, weights, dataset, cache_attrs)
    if weights is None:
        weights = weights_for(settings, (cache_attrs or {}).get("weights_path", ""))
    if settings.precision_engine:
        from featurize.runtimes.bf16 import bf16_extractor
        return bf16_extractor(settings, weights, dataset, cache_attrs)
    runtime = requested(runtime)
    candidates = [chosen]
    if runtime is None and chosen != "keras":  # the default: the next one if it cannot export
        candidates += [r for r in CPU_PREFERENCE if r != chosen and installed(r)]
    for candidate in candidates:
        try:
            return _exported_extractor(settings, weights, candidate)
        except UserError as e:
            if runtime is not None or chosen == "keras":
                raise
            warnings.warn(f"the default runtime {candidate} cannot be used: {e} (trying the "
                          "next one)", RuntimeWarning, stacklevel=2)
    return family_extractor(settings, weights)


def _int8_extractor(settings, weights, dataset, cache_attrs):
    from featurize.runtimes.int8 import int8_extractor, recorded_extractor
    if dataset is None and cache_attrs and cache_attrs.get("settings") == settings.to_json():
        return recorded_extractor(settings, cache_attrs)  # new images of an int8 cache
    if dataset is None:
        raise UserError("precision int8 is calibrated on a dataset's own images: use "
                        "featurize.embed_folder(folder, precision='int8') or the command "
                        "line, not an Embedder.")
    if weights is None:
        weights = weights_for(settings, (cache_attrs or {}).get("weights_path", ""))
    return int8_extractor(settings, weights, dataset, cache_attrs)


def _exported_extractor(settings, weights, runtime: str):
    from featurize.runtimes.engines import ENGINES
    from featurize.runtimes.exports import exported_model
    if runtime == "keras":
            return family_extractor(settings, weights)
    return ENGINES[runtime](exported_model(settings, weights, runtime), settings)


__all__ = ["RUNTIMES", "build_extractor", "check_runtime", "choose", "describe_precision",
           "installed", "require", "settle"]
