"""`python -m featurize --doctor`: what a run with these options would use here, and why.

Nothing is embedded or downloaded: the backend and its devices, the runtime, precision, batch
size and decoding workers come from the same functions a run calls, so the answer is the one
a run gets.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import metadata

from featurize.errors import UserError


@dataclass(frozen=True)
class Finding:
    name: str
    value: str
    why: str

    def line(self) -> str:
        return f"{self.name + ':':<12} {self.value}  ({self.why})"


def doctor(options) -> list[Finding]:
    """The findings for a `featurize.jobs.run.FeaturizeOptions`, in the order a run meets them."""
    from featurize.models.keras import accelerator, import_keras
    backend, why = _backend()
    import_keras()
    on_accelerator = accelerator()
    config, run = options.embedding, options.run
    found = [Finding("backend", backend, why),
             Finding("devices", ", ".join(_devices()) or "none", _device_why(on_accelerator))]
    found += _settings_findings(config, run)
    found.append(_batch_size(run.batch_size, on_accelerator))
    found.append(_workers(run.workers, run.engine))
    return found


def _backend() -> tuple[str, str]:
    """Keras's backend and where that choice came from (the order Keras itself reads). The
    source is looked at before Keras is imported: Keras writes keras.json on its first import."""
    source = _backend_source()
    import keras
    return keras.backend.backend(), source


def _backend_source() -> str:
    if os.environ.get("KERAS_BACKEND"):
        return f"KERAS_BACKEND={os.environ['KERAS_BACKEND']}"
    config = os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")),
                          "keras.json")
    try:
        with open(config) as f:
            if json.load(f).get("backend"):
                return f"set in {config}"
    except (OSError, ValueError):
        pass
    return "Keras's default; set KERAS_BACKEND=jax for the GPU install"


def _devices() -> list[str]:
    import keras
    try:
        return [str(d) for d in keras.distribution.list_devices()]
    except (NotImplementedError, AttributeError):  # torch: no distribution API
        from featurize.models.keras import accelerator
        return ["cuda:0" if accelerator() else "cpu:0"]


def _device_why(on_accelerator: bool) -> str:
    if on_accelerator:
        return "a GPU/TPU: Keras runs the model there"
    import keras
    return (f"no GPU visible to {keras.backend.backend()}: for a GPU, pip install -e "
            "'.[gpu]' and run with KERAS_BACKEND=jax")


def _settings_findings(config, run) -> list[Finding]:
    from featurize.runtimes import (
        CPU_PREFERENCE,
        ENV_RUNTIME,
        choose,
        describe_precision,
        installed,
        settle,
    )
    try:
        settings, weights = config.settings(download=False)
    except UserError as e:
        return [Finding("backbone", config.backbone, "--backbone"),
                Finding("weights", "not available", str(e))]
    settings = settle(settings, run.runtime)  # mixed on a bfloat16 CPU: OpenVINO's bfloat16
    runtime = choose(settings, run.runtime)
    if run.runtime:
        why = "asked for with --runtime"
    elif os.environ.get(ENV_RUNTIME):
        why = f"{ENV_RUNTIME}={os.environ[ENV_RUNTIME]}"
    elif settings.precision == "int8":
        why = "int8 runs on ONNX Runtime"
    elif runtime == "keras":
        why = _why_keras(settings)
    else:
        others = [r for r in CPU_PREFERENCE if installed(r)]
        why = f"the fastest faithful runtime installed for a CPU (installed: {', '.join(others)})"
    pooling = f", {settings.pooling} pooling" if settings.pooling != "none" else ""
    return [Finding("backbone", settings.backbone, f"{settings.input_size} px input{pooling}"),
            Finding("weights", weights.path or weights.kind, f"--weights {config.weights}"),
            Finding("runtime", runtime, why),
            Finding("precision", describe_precision(settings), _precision_why(settings.precision))]


def _why_keras(settings) -> str:
    from featurize.runtimes import CPU_PREFERENCE, EXTRA_HINT, exportable, installed
    if settings.preprocessing.startswith("dlib"):
        return "dlib's network runs in dlib itself"
    if not exportable(settings):
        return "these settings run only on Keras"
    from featurize.models.keras import accelerator
    if accelerator():
        return "Keras runs on the GPU"
    if not any(installed(r) for r in CPU_PREFERENCE):
        return f"neither OpenVINO nor ONNX Runtime is installed ({EXTRA_HINT.format('openvino')})"
    return "the default for these settings"


def _precision_why(precision: str) -> str:
    return {"float32": "the faithful default", "mixed": "bfloat16 compute, asked for",
            "int8": "quantised on a CPU, asked for"}.get(precision, "asked for")


def _batch_size(batch_size, on_accelerator: bool) -> Finding:
    if batch_size:
        return Finding("batch size", str(batch_size), "--batch-size")
    return Finding("batch size", "256" if on_accelerator else "32",
                   "the default on a GPU" if on_accelerator else "the default on a CPU")


def _workers(workers, engine: str) -> Finding:
    from featurize.engines.pipeline import default_workers
    if engine == "ray":
        return Finding("workers", "Ray tasks", "--engine ray: Ray Data decodes on every CPU")
    if workers:
        return Finding("workers", str(workers), "--workers")
    return Finding("workers", str(default_workers()),
                   f"the CPU count ({os.cpu_count()}), at most 16")


def versions() -> Finding:
    names = ("featurize-embeddings", "keras", "tensorflow", "tensorflow-cpu", "jax",
             "openvino", "onnxruntime", "dlib-bin")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return Finding("versions", ", ".join(found), "installed")


def report(options) -> str:
    return "\n".join(f.line() for f in [*doctor(options), versions()])
