"""Extractors that run an exported model (ONNX Runtime, OpenVINO) on the CPU.

They take what a Keras extractor takes (uint8 images prepared by `settings.model_input`) and
return the same float32 embeddings; Keras is not imported to run them.
"""

from __future__ import annotations

import os
from importlib import metadata

import numpy as np


def cpu_threads() -> int:
    """The cores this process may run on (all of them, by default)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _ExportedExtractor:
    runtime = ""

    def __init__(self, exported, settings):
        self.settings = settings
        self.exported = exported
        self.prepare = settings.model_input  # picklable: runs in worker processes
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

    def _load(self, path: str):
        import openvino as ov
        # f32: on CPUs with bfloat16 units OpenVINO's default is bfloat16 (~5e-3 off Keras).
        self.compiled = ov.Core().compile_model(path, "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": cpu_threads()})
        self.output = self.compiled.output(0)

    def embed(self, batch):
        request = self.compiled.create_infer_request()  # one per call: safe from any thread
        out = request.infer([np.ascontiguousarray(batch)])[self.output]
        return np.asarray(out, dtype=np.float32)


ENGINES = {"onnx": OnnxExtractor, "openvino": OpenVinoExtractor}
