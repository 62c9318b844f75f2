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

from ..errors import UserError
from .engines import OnnxExtractor

CALIBRATION_IMAGES = 96  # enough for stable min/max ranges; each one is embedded once more
HELD_OUT_IMAGES = 128  # images not calibrated on, embedded with fp32 and int8 to compare
CALIBRATION_BATCH = 16
SAMPLE_SEED = 0


def sample(items: list, calibration: int = CALIBRATION_IMAGES, held_out: int = HELD_OUT_IMAGES):
    """A seeded sample of the dataset's items: (calibration items, held-out items), disjoint,
    the same for the same dataset listing."""
    calibration = min(calibration, max(1, len(items) // 2))  # a small dataset keeps half back
    order = np.random.default_rng(SAMPLE_SEED).permutation(len(items))
    chosen = [items[i] for i in order[:calibration + held_out]]
    return chosen[:calibration], chosen[calibration:]


def _prepared(items, prepare) -> tuple[np.ndarray, list]:
    """The images that decode, prepared like the pipeline prepares them, and their items."""
    from ..images import ImageError
    arrays, kept = [], []
    for item in items:
        try:
            arrays.append(prepare(item.path))
            kept.append(item)
        except (ImageError, OSError):
            continue
    return np.stack(arrays) if arrays else np.zeros((0, *prepare.shape), np.uint8), kept


def int8_extractor(settings, weights, dataset, cache_path=None):
    """An ONNX Runtime extractor of the int8 model calibrated on `dataset`'s images (made
    once per dataset sample and kept), with `.report` (agreement with fp32). A cache that
    already holds int8 rows goes on with the model that made them (new files would change
    the sample)."""
    from dataclasses import replace

    from .exports import export_folder, exported_model
    recorded = _recorded_in(cache_path, settings)
    if recorded is not None:
        return recorded
    fp32_settings = replace(settings, precision="float32")
    calibration_items, held_out_items = sample(dataset.items)
    calibration, used = _prepared(calibration_items, settings.model_input)
    if not len(calibration):
        raise UserError(f"--precision int8 calibrates on the dataset's images, and none of the "
                        f"{len(calibration_items)} sampled from {dataset.root} could be read.")
    fp32 = exported_model(fp32_settings, weights, "onnx")
    identity = json.dumps([fp32.path.parent.name, [(i.key, i.size) for i in used]])
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    folder = export_folder(fp32_settings, "onnx").with_name(
        f"{settings.spec.short_name}-onnx-int8-{key}")
    if not (folder / "model.onnx").is_file():
        from .exports import _atomically
        _atomically(settings, "onnx", folder,
                    lambda work: _quantise(fp32.path, calibration, work / "model.onnx"))
    extractor = Int8Extractor(replace(fp32, path=folder / "model.onnx", key=key), settings)
    identity = ["int8", [(i.path, i.size, i.mtime_ns, i.label) for i in held_out_items]]

    def compute():
        held_out, kept = _prepared(held_out_items, settings.model_input)
        return agreement(OnnxExtractor(fp32, fp32_settings), extractor, held_out,
                         [item.label for item in kept])
    extractor.report = {**cached_report(folder, "int8", identity, compute),
                        "calibration_images": len(used)}
    return extractor


REPORT_VERSION = 2  # 2: with the centred cosine
_REPORT_KEYS = ("held_out_images", "mean_cosine", "min_cosine", "mean_centred_cosine",
                "min_centred_cosine", "max_relative_difference", "logreg_top1_agreement")


def cached_report(folder, name: str, identity, compute) -> dict:
    """`compute()`'s agreement report, kept in `folder` (beside the model it measures) under
    a hash of `identity` (the held-out images): a fresh cache of the same model and sample
    reads it instead of embedding the sample twice again."""
    import os
    identity = json.dumps([REPORT_VERSION, identity])
    path = folder / f"agreement-{name}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if (isinstance(data, dict) and data.get("held_out_images") is not None
            and all(k in _REPORT_KEYS and isinstance(v, (int, float)) for k, v in data.items())):
        return data  # data from disk: only the names and number types a report has
    report = compute()
    work = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        work.write_text(json.dumps(report, sort_keys=True))
        os.replace(work, path)
    except OSError:  # a read-only export folder: computed again next time
        try:
            work.unlink(missing_ok=True)
        except OSError:
            pass
    return report


class Int8Extractor(OnnxExtractor):
    """The quantised model on ONNX Runtime; its provenance carries the agreement report."""

    report: dict = {}

    def provenance(self) -> dict:
        return {**super().provenance(), **{f"int8_{k}": v for k, v in self.report.items()}}


def _recorded_in(cache_path, settings):
    """The int8 extractor of an existing cache of these settings, if its model is present."""
    from pathlib import Path

    from .. import cache
    if cache_path is None or not Path(cache_path).is_file():
        return None
    try:
        attrs = cache.read_attrs(cache_path)
    except UserError:
        return None  # a damaged cache: featurize's own checks say so
    if attrs.get("settings") != settings.to_json():
        return None
    try:
        return recorded_extractor(settings, attrs)
    except UserError:
        return None  # its model is gone: calibrate again


def recorded_extractor(settings, attrs: dict):
    """The int8 model a cache was made with (for new images: predict, verify)."""
    from .exports import Exported, exports_dir
    folder = exports_dir() / str(attrs.get("runtime_export", "?"))
    if not (folder / "model.onnx").is_file():
        raise UserError(f"the int8 model this cache was made with ({folder}) is not present; "
                        "run featurize with --precision int8 on the dataset again to remake it.")
    exported = Exported(folder / "model.onnx", folder.name.rsplit("-", 1)[1], "onnx", False, 0.0)
    extractor = Int8Extractor(exported, settings)
    extractor.report = {k[5:]: v for k, v in attrs.items() if k.startswith("int8_")}
    return extractor


def _quantise(fp32_path, calibration: np.ndarray, out_path) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([calibration[i:i + CALIBRATION_BATCH]
                                 for i in range(0, len(calibration), CALIBRATION_BATCH)])

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {_input_name(fp32_path): batch}

    import logging

    from .exports import _logs_quiet
    with _logs_quiet(logging.getLogger()):  # it advises pre-processing on the root logger
        quantize_static(str(fp32_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)


def _input_name(path) -> str:
    import onnx
    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {init.name for init in graph.initializer}
    return next(i.name for i in graph.input if i.name not in constants)


def agreement(fp32, int8, images: np.ndarray, labels: list) -> dict:
    """How the int8 embeddings of held-out images compare with fp32's: cosine (mean, min), and
    when the images are labelled, how often a logistic-regression head trained on each (on
    one half) predicts the same class for the other half."""
    if not len(images):
        return {"held_out_images": 0}
    a = np.concatenate([fp32.embed(images[i:i + 32]) for i in range(0, len(images), 32)])
    b = np.concatenate([int8.embed(images[i:i + 32]) for i in range(0, len(images), 32)])
    cosine = _cosine(a, b)
    centre = a.mean(axis=0)  # the mean fp32 embedding: what every row shares
    centred = _cosine(a - centre, b - centre)
    report = {"held_out_images": len(images), "mean_cosine": float(cosine.mean()),
              "min_cosine": float(cosine.min()), "mean_centred_cosine": float(centred.mean()),
              "min_centred_cosine": float(centred.min()),
              "max_relative_difference": float(np.abs(a - b).max() / np.abs(a).max())}
    top1 = _head_agreement(a, b, labels)
    if top1 is not None:
        report["logreg_top1_agreement"] = top1
    return report


def _cosine(a, b) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, 1) / np.maximum(norms, 1e-12)


def _head_agreement(a, b, labels) -> float | None:
    """Fraction of the second half where heads trained on fp32 and on int8 agree."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import normalize
    if any(label is None for label in labels) or len(labels) < 4:
        return None
    half = len(labels) // 2
    train = labels[:half]
    if len(set(train)) < 2:
        return None
    predictions = []
    for x in (a, b):
        x = normalize(x)  # as classify does by default
        head = LogisticRegression(max_iter=1000).fit(x[:half], train)
        predictions.append(head.predict(x[half:]))
    return float(np.mean(predictions[0] == predictions[1]))


def agreement_text(report: dict) -> str:
    """cosine and centred cosine (mean, min), head top-1 agreement, of an agreement report."""
    text = (f"cosine mean {float(report['mean_cosine']):.5f}, min "
            f"{float(report['min_cosine']):.5f}")
    if "mean_centred_cosine" in report:
        text += (f"; centred cosine mean {float(report['mean_centred_cosine']):.5f}, min "
                 f"{float(report['min_centred_cosine']):.5f}")
    if "logreg_top1_agreement" in report:
        text += (f"; logistic-regression top-1 agreement "
                 f"{float(report['logreg_top1_agreement']):.1%}")
    return text


def report_lines(attrs: dict) -> list[str]:
    """The agreement report a cache's attributes hold: int8's or OpenVINO bfloat16's (empty
    for other precisions)."""
    from .bf16 import recorded_report, report_line
    lines = [report_line(attrs)] if "bf16_mean_cosine" in attrs else []
    if "int8_mean_cosine" in attrs:
        lines.append(f"int8 vs fp32 on {int(attrs['int8_held_out_images'])} held-out images "
                     f"(calibrated on {int(attrs['int8_calibration_images'])}): "
                     + agreement_text(recorded_report(attrs, "int8")))
    return lines
