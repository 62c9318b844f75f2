"""The exported copies of featurize's Keras models, made once and kept beside the weights.

An export lives in `KERAS_HOME/models/featurize-exports/<name>-<runtime>-<key>/`, where the
key hashes everything the exported model depends on: the embedding settings (which hold
the weights' SHA-256 or their seeded-random identity, the layer, pooling, input size, crop,
flip, preprocessing), the runtime, and the versions of featurize, Keras, its backend and the
converter. A change to any of them is a new key, so a stale export is never used; the
folder is written under a temporary name and renamed into place (atomic: a killed export
leaves no half-written model behind under the real name).
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from featurize import atomic
from featurize.errors import UserError
from featurize.models.inputs import model_input
from featurize.models.registry import spec_of
from featurize.settings import installed_version

EXPORTS_SUBDIR = "models/featurize-exports"  # under KERAS_HOME, beside the downloaded weights
MODEL_FILES = {"onnx": "model.onnx", "openvino": "model.xml", "savedmodel": "savedmodel"}
_VERSIONED = {"onnx": ("tf2onnx", "onnx"), "openvino": ("openvino",), "savedmodel": ()}
ONNX_OPSET = 17


@dataclass(frozen=True)
class Exported:
    path: Path  # the model file the runtime loads
    key: str
    runtime: str
    exported: bool  # True: made by this call (False: reused)
    seconds: float  # how long the export took (0.0 when reused)


def exports_dir() -> Path:
    from featurize.models.weights import keras_home
    return keras_home() / EXPORTS_SUBDIR


def export_identity(settings, runtime: str) -> dict:
    """Everything an export depends on (hashed into its key; written beside it)."""
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    versions = {d: installed_version(d, "none")
                for d in ("featurize-embeddings", "keras", "tensorflow", *_VERSIONED[runtime])}
    return {"settings": json.loads(settings.to_json()), "runtime": runtime,
            "keras_backend": backend, "versions": versions}


def export_key(settings, runtime: str) -> str:
    text = json.dumps(export_identity(settings, runtime), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def export_folder(settings, runtime: str) -> Path:
    name = f"{spec_of(settings).short_name}-{runtime}-{export_key(settings, runtime)}"
    return exports_dir() / name


def exported_model(settings, weights, runtime: str) -> Exported:
    """The runtime's copy of the settings' Keras model: reused when present, else exported
    (from a SavedModel of the Keras model, itself kept: the other runtime converts it too)."""
    import time
    folder = export_folder(settings, runtime)
    model_file = folder / MODEL_FILES[runtime]
    key = folder.name.rsplit("-", 1)[1]
    if model_file.is_file():
        return Exported(model_file, key, runtime, exported=False, seconds=0.0)
    start = time.perf_counter()
    saved = export_folder(settings, "savedmodel")
    if not (saved / MODEL_FILES["savedmodel"]).exists():
        _atomically(settings, "savedmodel", saved,
                    lambda work: _saved_model(settings, weights, work))
    convert = _to_onnx if runtime == "onnx" else _to_openvino
    _atomically(settings, runtime, folder, lambda work: convert(saved, work))
    return Exported(model_file, key, runtime, exported=True, seconds=time.perf_counter() - start)


def _atomically(settings, runtime: str, folder: Path, make) -> None:
    """`make(work)` writes into a new temporary folder, renamed to `folder` when complete."""
    try:
        work = atomic.new_folder_beside(folder)
    except OSError as e:
        raise UserError(f"cannot write the exported model under {folder.parent} ({e.strerror}); "
                        "make it writable (or set KERAS_HOME), or use --runtime keras.") from None
    try:
        try:
            make(work)
        except Exception as e:  # a converter's failure is ours, but Keras still works
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            what = "as a SavedModel" if runtime == "savedmodel" else f"for --runtime {runtime}"
            raise UserError(f"could not export {settings.backbone} {what} ({first}); use "
                            "--runtime keras.") from None
        (work / "export.json").write_text(json.dumps(export_identity(settings, runtime),
                                                     indent=1, sort_keys=True))
        try:
            atomic.publish(work, folder)
        except OSError:  # another process exported the same model first: theirs is the same
            if not (folder / MODEL_FILES[runtime]).exists():
                raise
    finally:
        atomic.discard(work)


def _saved_model(settings, weights, work: Path) -> None:
    """The Keras model featurize embeds with, as a TensorFlow SavedModel (uint8 images in)."""
    import numpy as np

    from featurize.models.keras import build_embedding_model, import_keras
    import_keras()
    model = build_embedding_model(settings, weights)
    # Keras exports only a model that has run (it traces that call's signature).
    model.predict_on_batch(np.zeros((1, *model_input(settings).shape), dtype=np.uint8))
    model.export(str(work / MODEL_FILES["savedmodel"]), format="tf_saved_model", verbose=False)


def _to_onnx(saved: Path, work: Path) -> None:
    """SavedModel -> ONNX with tf2onnx. From the SavedModel, not from the live Keras model:
    there every constant is frozen, where tracing the model leaves the tensors some layers
    keep (EfficientNet's and ConvNeXt's Normalization) as extra graph inputs."""
    import logging
    import warnings
    with warnings.catch_warnings():  # tf2onnx 1.17 touches np.object, with a FutureWarning
        warnings.simplefilter("ignore", FutureWarning)
        import tf2onnx
        from tf2onnx import tf_loader
        try:  # what Keras's own ONNX export applies: tf2onnx's constant folding on NumPy 2
            from keras.src.export.tf2onnx_lib import patch_tf2onnx
            patch_tf2onnx()
        except ImportError:
            pass
    with _logs_quiet(logging.getLogger("tf2onnx"), logging.getLogger("tensorflow")):
        frozen, inputs, outputs = tf_loader.from_saved_model(
            str(saved / MODEL_FILES["savedmodel"]), None, None, signatures=["serving_default"])
        tf2onnx.convert.from_graph_def(frozen, input_names=inputs, output_names=outputs,
                                       opset=ONNX_OPSET,
                                       output_path=str(work / MODEL_FILES["onnx"]))
    _check_onnx_inputs(work / MODEL_FILES["onnx"])


@contextmanager
def _logs_quiet(*loggers):
    """tf2onnx logs each step at INFO, and TensorFlow a deprecation notice for the v1 API
    tf2onnx uses: errors only while converting; the loggers' levels are restored after."""
    import logging
    saved = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, saved):
            logger.setLevel(level)


def _check_onnx_inputs(path: Path) -> None:
    """An ONNX model must load (tf2onnx leaves some nested TensorFlow calls unconverted, as in
    ConvNeXt) and run on the images alone (no constant left as an input)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        inputs = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]
                                      ).get_inputs()
    except Exception as e:  # onnxruntime raises its own exception types
        raise ValueError(f"ONNX Runtime cannot load tf2onnx's model: {str(e)[-150:]}") from None
    if len(inputs) != 1:
        raise ValueError(f"tf2onnx left {len(inputs) - 1} of the model's constants as inputs")


def _to_openvino(saved: Path, work: Path) -> None:
    """SavedModel -> OpenVINO IR with OpenVINO's TensorFlow frontend (Core.read_model), weights
    kept in float32 (save_model compresses them to float16 by default, which is not the same
    model). Not ov.convert_model: that sends telemetry events from forked processes, which
    may deadlock the caller's threads (see engines.import_openvino); the frontend gives the
    same model, and the CPU plugin optimises it when it is compiled."""
    from featurize.runtimes.engines import import_openvino
    ov = import_openvino()
    model = ov.Core().read_model(str(saved / MODEL_FILES["savedmodel"]))
    ov.save_model(model, str(work / MODEL_FILES["openvino"]), compress_to_fp16=False)
