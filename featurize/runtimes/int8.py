"""`--precision int8`: the ONNX model quantised after training (ONNX Runtime's static
quantisation: uint8 activations, int8 per-channel weights, QDQ format), calibrated on a sample
of the user's own images, with a report of how far its embeddings are from fp32's.

int8 is not faithful (about 1e-2 relative; cosine ~0.9999 to fp32): it is its own cache key
(precision "int8"), never a default, and the cache records how it was made (calibration
sample size, the agreement on held-out images). ONNX Runtime was chosen over OpenVINO's NNCF:
the issue measured both on this CPU (41.3 vs 42.5 img/s on ResNet-50, cosine 0.99988 vs
0.99986) and ONNX Runtime needs no further package (NNCF is a large extra dependency).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from featurize.errors import UserError
from featurize.models.inputs import model_input
from featurize.models.registry import spec_of
from featurize.runtimes.agreement import agreement, cached_report, prepared, sample
from featurize.runtimes.engines import OnnxExtractor

CALIBRATION_BATCH = 16


def int8_extractor(settings, weights, dataset, cache_attrs: dict | None = None):
    """An ONNX Runtime extractor of the int8 model calibrated on `dataset`'s images (made
    once per dataset sample and kept), with `.report` (agreement with fp32). A cache that
    already holds int8 rows goes on with the model that made them (new files would change
    the sample): `cache_attrs`, the attributes of the cache being extended."""
    from dataclasses import replace

    from featurize.runtimes.exports import export_folder, exported_model
    recorded = _recorded_in(cache_attrs, settings)
    if recorded is not None:
        return recorded
    fp32_settings = replace(settings, precision="float32")
    calibration_items, held_out_items = sample(dataset.items)
    calibration, used = prepared(calibration_items, model_input(settings))
    if not len(calibration):
        raise UserError(f"--precision int8 calibrates on the dataset's images, and none of the "
                        f"{len(calibration_items)} sampled from {dataset.root} could be read.")
    fp32 = exported_model(fp32_settings, weights, "onnx")
    identity = json.dumps([fp32.path.parent.name, [(i.key, i.size) for i in used]])
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    folder = export_folder(fp32_settings, "onnx").with_name(
        f"{spec_of(settings).short_name}-onnx-int8-{key}")
    if not (folder / "model.onnx").is_file():
        from featurize.runtimes.exports import _atomically
        _atomically(settings, "onnx", folder,
                    lambda work: _quantise(fp32.path, calibration, work / "model.onnx"))
    extractor = Int8Extractor(replace(fp32, path=folder / "model.onnx", key=key), settings)
    identity = ["int8", [(i.path, i.size, i.mtime_ns, i.label) for i in held_out_items]]

    def compute():
        held_out, kept = prepared(held_out_items, model_input(settings))
        return agreement(OnnxExtractor(fp32, fp32_settings), extractor, held_out,
                         [item.label for item in kept])
    extractor.report = {**cached_report(folder, "int8", identity, compute),
                        "calibration_images": len(used)}
    return extractor


class Int8Extractor(OnnxExtractor):
    """The quantised model on ONNX Runtime; its provenance carries the agreement report."""

    report: dict = {}

    def provenance(self) -> dict:
        return {**super().provenance(), **{f"int8_{k}": v for k, v in self.report.items()}}


def _recorded_in(cache_attrs: dict | None, settings):
    """The int8 extractor of an existing cache of these settings (its attributes), if its
    model is present."""
    if not cache_attrs or cache_attrs.get("settings") != settings.to_json():
        return None
    try:
        return recorded_extractor(settings, cache_attrs)
    except UserError:
        return None  # its model is gone: calibrate again


def recorded_extractor(settings, attrs: dict):
    """The int8 model a cache was made with (for new images: predict, verify)."""
    from featurize.runtimes.exports import Exported, exports_dir
    folder = exports_dir() / str(attrs.get("runtime_export", "?"))
    if not (folder / "model.onnx").is_file():
        raise UserError(f"the int8 model this cache was made with ({folder}) is not present; "
                        "run featurize with --precision int8 on the dataset again to remake it.")
    exported = Exported(folder / "model.onnx", folder.name.rsplit("-", 1)[1], "onnx", False, 0.0)
    extractor = Int8Extractor(exported, settings)
    extractor.report = {k[5:]: v for k, v in attrs.items() if k.startswith("int8_")}
    return extractor


def _quantise(fp32_path, calibration: np.ndarray, out_path) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([calibration[i:i + CALIBRATION_BATCH]
                                 for i in range(0, len(calibration), CALIBRATION_BATCH)])

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {_input_name(fp32_path): batch}

    import logging

    from featurize.runtimes.exports import _logs_quiet
    with _logs_quiet(logging.getLogger()):  # it advises pre-processing on the root logger
        quantize_static(str(fp32_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)


def _input_name(path) -> str:
    import onnx
    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {init.name for init in graph.initializer}
    return next(i.name for i in graph.input if i.name not in constants)


