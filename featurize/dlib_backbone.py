"""dlib's ResNet face descriptor (the model behind `face_recognition`) as a backbone.

Per image: HOG face detection (the face nearest the centre; upsampled once if none is found),
5-point landmarks, an aligned 150x150 chip, and the 128-D descriptor. dlib holds the GIL, so
the whole chain runs in worker processes, one model copy each (dlib is not thread-safe either:
never call `describe` from several threads). Needs `pip install -e .[dlib]`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from .errors import UserError

# Used when no face is found: the median HOG box on LFW's 250x250 deep-funneled images, as
# fractions (left, top, right, bottom). LFW faces are centred, so this box holds the face.
FALLBACK_BOX = (0.268, 0.320, 0.700, 0.748)


def _models_package():
    try:
        import dlib  # noqa: F401
        import face_recognition_models
    except ImportError:
        raise UserError("the dlib-resnet backbone needs dlib and its models: "
                        "pip install -e '.[dlib]' (dlib-bin, face-recognition-models).") from None
    return face_recognition_models


def model_path() -> Path:
    return Path(_models_package().face_recognition_model_location())


@functools.lru_cache(maxsize=1)
def _models():
    import dlib
    frm = _models_package()
    return (dlib.get_frontal_face_detector(),
            dlib.shape_predictor(frm.pose_predictor_five_point_model_location()),
            dlib.face_recognition_model_v1(frm.face_recognition_model_location()))


def face_chip(rgb: np.ndarray) -> tuple[np.ndarray, bool]:
    """The aligned 150x150 chip of the most central face, and whether a face was detected."""
    import dlib
    detector, predictor, _ = _models()
    h, w = rgb.shape[:2]
    faces = detector(rgb, 0) or detector(rgb, 1)
    if faces:
        box = min(faces, key=lambda r: ((r.left() + r.right()) / 2 - w / 2) ** 2
                  + ((r.top() + r.bottom()) / 2 - h / 2) ** 2)
    else:
        fl, ft, fr, fb = FALLBACK_BOX
        box = dlib.rectangle(int(fl * w), int(ft * h), int(fr * w), int(fb * h))
    return dlib.get_face_chip(rgb, predictor(rgb, box), size=150, padding=0.25), bool(faces)


def describe(path: str, jitter: int = 0) -> np.ndarray:
    """One image file -> its 128-D descriptor (runs in a worker process)."""
    from .images import read_rgb
    return describe_rgb(read_rgb(path), jitter)


def describe_rgb(rgb: np.ndarray, jitter: int = 0) -> np.ndarray:
    """One RGB uint8 image (in memory) -> its 128-D descriptor."""
    chip, _ = face_chip(rgb)
    _, _, net = _models()
    return np.asarray(net.compute_face_descriptor(chip, jitter), dtype=np.float32)


class DlibExtractor:
    """prepare() does everything per image in a worker process; embed() only stacks."""

    parallel = "process"
    dim = 128

    def __init__(self, settings, weights):
        _models_package()
        self.settings = settings
        self.prepare = functools.partial(describe, jitter=settings.jitter)

    @staticmethod
    def provenance() -> dict:
        import dlib
        return {"dlib_version": dlib.__version__}

    @staticmethod
    def embed(batch):
        return np.asarray(batch, dtype=np.float32)
