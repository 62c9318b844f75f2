"""Extractors that run an exported model (ONNX Runtime, OpenVINO) on the CPU.

They take what a Keras extractor takes (uint8 images prepared by `model_input(settings)`) and
return the same float32 embeddings; Keras is not imported to run them.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from importlib import metadata

import numpy as np

from featurize.models.inputs import model_input

# OpenVINO's telemetry (the openvino_telemetry package) sends an event when `openvino` is first
# imported and several from ov.convert_model, each from a thread pool that forks a process per
# event (h5py's and logging's fork handlers then take their locks against our threads: a
# deadlock). It declines whenever CI=true is in the environment (OpenVINO's tools ask it to stay
# off in CI); that is the only switch that neither writes the user's consent file under
# ~/intel nor patches OpenVINO, so featurize imports OpenVINO with it set, and restores the
# environment at once. Conversion avoids ov.convert_model (see exports._to_openvino).
_TELEMETRY_OFF = {"CI": "true"}
_OPENVINO_LOCK = threading.Lock()  # one import at a time: each restores what it found


def cpu_threads() -> int:
    """The cores this process may run on (all of them, by default)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def import_openvino():
    """`openvino`, imported with its telemetry off: no event, no process forked, no file under
    ~/intel written. Imported by someone else first, it is theirs as they imported it."""
    with _OPENVINO_LOCK:
        if "openvino" not in sys.modules:
            with _environment(_TELEMETRY_OFF):
                import openvino  # noqa: F401
        import openvino as ov
    return ov


@contextmanager
def _environment(values: dict):
    """`values` in os.environ for the block; each variable put back as it was after it."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _ExportedExtractor:
    runtime = ""

    def __init__(self, exported, settings):
        self.settings = settings
        self.exported = exported
        self.prepare = model_input(settings)  # picklable: runs in worker processes
        self.input_shape = self.prepare.shape
        self._load(str(exported.path))
        self.dim = self._dim()

    def provenance(self) -> dict:
        dist = "onnxruntime" if self.runtime == "onnx" else self.runtime
        return {"runtime": self.runtime, f"{dist}_version": metadata.version(dist),
                "runtime_export": self.exported.path.parent.name,
                "keras_version": metadata.version("keras")}

    def _dim(self) -> int:
        probe = np.zeros((1, *self.input_shape), dtype=np.uint8)
        return int(self.embed(probe).shape[-1])


class OnnxExtractor(_ExportedExtractor):
    runtime = "onnx"

    def _load(self, path: str):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = cpu_threads()
        options.log_severity_level = 3  # errors only: no warnings about unused initialisers
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def embed(self, batch):
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(batch)})[0]
        return np.asarray(out, dtype=np.float32)


class OpenVinoExtractor(_ExportedExtractor):
    runtime = "openvino"
    # f32: on CPUs with bfloat16 units OpenVINO's default is bfloat16 (~5e-3 off Keras); the
    # bfloat16 extractor (--precision mixed on such a CPU) asks for it by name.
    inference_precision = "f32"

    def _load(self, path: str):
        ov = import_openvino()
        self.compiled = ov.Core().compile_model(path, "CPU", {
            "INFERENCE_PRECISION_HINT": self.inference_precision,
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": cpu_threads()})
        self.output = self.compiled.output(0)
        # what the plugin compiled for (it may refuse a hint the CPU cannot do natively)
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type: "bf16"
        self.compiled_precision = str(getattr(hint, "get_type_name", lambda: hint)())

    def embed(self, batch):
        request = self.compiled.create_infer_request()  # one per call: safe from any thread
        out = request.infer([np.ascontiguousarray(batch)])[self.output]
        return np.asarray(out, dtype=np.float32)


class OpenVinoBf16Extractor(OpenVinoExtractor):
    """The fp32 export compiled by OpenVINO in bfloat16 (--precision mixed on a CPU with
    native bfloat16); `.report`: its agreement with fp32 (featurize.runtimes.bf16)."""

    inference_precision = "bf16"
    report: dict = {}

    def provenance(self) -> dict:
        return {**super().provenance(), "openvino_inference_precision": self.compiled_precision,
                **{f"bf16_{k}": v for k, v in self.report.items()}}


ENGINES = {"onnx": OnnxExtractor, "openvino": OpenVinoExtractor}
