"""dlib's ResNet face descriptor (the model behind `face_recognition`) as a backbone.

Per image: HOG face detection (the face nearest the centre; upsampled once if none is found;
else a fixed central box, and the row is marked so in the cache), 5-point landmarks, an
aligned 150x150 chip, and the 128-D descriptor. dlib holds the GIL, so the whole chain runs
in worker processes, one model copy each (dlib is not thread-safe either: never call
`describe` from several threads). Needs `pip install -e .[dlib]`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

# Used when no face is found: the median HOG box on LFW's 250x250 deep-funneled images, as
# fractions (left, top, right, bottom). LFW faces are centred, so this box holds the face.
FALLBACK_BOX = (0.268, 0.320, 0.700, 0.748)
FIXED_BOX_CODE = 3  # featurize.align.FACE_CODES: no face found, FALLBACK_BOX used
CNN_CODE = 2  # found by dlib's CNN detector, where HOG found nothing (--align dlib)


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
def _finders():
    """The HOG face detector and the 5-point landmark model (one copy per process)."""
    frm = _models_package()  # first: a missing dlib is its one-line message
    import dlib
    return (dlib.get_frontal_face_detector(),
            dlib.shape_predictor(frm.pose_predictor_five_point_model_location()))


@functools.lru_cache(maxsize=1)
def _net():
    frm = _models_package()
    import dlib
    return dlib.face_recognition_model_v1(frm.face_recognition_model_location())


@functools.lru_cache(maxsize=1)
def _cnn():
    frm = _models_package()
    import dlib
    return dlib.cnn_face_detection_model_v1(frm.cnn_face_detector_model_location())


def _detect(rgb: np.ndarray, cnn: bool = False):
    """The most central HOG detection (upsampled once if none; then, with `cnn`, dlib's CNN
    detector), and how it was found: (rectangle, code) with the codes of
    featurize.align.FACE_CODES; (None, 3) if none."""
    detector, _ = _finders()
    for code, upsample in ((0, 0), (1, 1)):
        faces = detector(rgb, upsample)
        if faces:
            return _central(faces, rgb), code
    if cnn:  # ~0.5 s an image on a CPU core: only where HOG finds nothing
        for upsample in (0, 1):
            faces = [d.rect for d in _cnn()(rgb, upsample)]
            if faces:
                return _central(faces, rgb), CNN_CODE
    return None, FIXED_BOX_CODE


def _central(faces, rgb):
    h, w = rgb.shape[:2]
    return min(faces, key=lambda r: ((r.left() + r.right()) / 2 - w / 2) ** 2
               + ((r.top() + r.bottom()) / 2 - h / 2) ** 2)


def fixed_box(h: int, w: int):
    import dlib
    fl, ft, fr, fb = FALLBACK_BOX
    return dlib.rectangle(int(fl * w), int(ft * h), int(fr * w), int(fb * h))


def _shape(rgb: np.ndarray, cnn: bool = False):
    """The face's box, its 5 landmarks, and how it was found."""
    _, predictor = _finders()
    box, code = _detect(rgb, cnn)
    if box is None:
        box = fixed_box(*rgb.shape[:2])
    return box, predictor(rgb, box), code


def find_face(rgb: np.ndarray, landmarks: bool = True, cnn: bool = False):
    """(box (left, top, right, bottom), code, eyes) for featurize.align: eyes are the centres
    of the eye on the image's left and on its right, from the 5 landmarks (None without
    `landmarks` or when no face was found: the fixed box is not turned)."""
    if not landmarks:
        box, code = _detect(rgb, cnn)
        box = box if box is not None else fixed_box(*rgb.shape[:2])
        return (box.left(), box.top(), box.right(), box.bottom()), code, None
    box, shape, code = _shape(rgb, cnn)
    eyes = None
    if code != FIXED_BOX_CODE:
        p = np.array([(shape.part(i).x, shape.part(i).y) for i in range(4)], float) + 0.5
        eyes = tuple(sorted([tuple(p[0:2].mean(0)), tuple(p[2:4].mean(0))]))
    return (box.left(), box.top(), box.right(), box.bottom()), code, eyes


def face_chip(rgb: np.ndarray) -> tuple[np.ndarray, int]:
    """The aligned 150x150 chip of the most central face, and how the face was found (HOG,
    else the fixed box: benchmarks/lfw_gap.py measured the CNN detector there, 68 landmarks,
    other paddings and face choices; none does better on LFW)."""
    import dlib
    _, shape, code = _shape(rgb)
    return dlib.get_face_chip(rgb, shape, size=150, padding=0.25), code


def describe(path: str, jitter: int = 0) -> np.ndarray:
    """One image file -> its 128-D descriptor (runs in a worker process)."""
    return describe_with_info(path, jitter)[0]


def describe_with_info(path: str, jitter: int = 0) -> tuple[np.ndarray, dict]:
    """One image file -> its 128-D descriptor and how its face was found."""
    from .images import read_rgb
    return _describe(read_rgb(path), jitter)


def describe_rgb(rgb: np.ndarray, jitter: int = 0) -> np.ndarray:
    """One RGB uint8 image (in memory) -> its 128-D descriptor."""
    return _describe(rgb, jitter)[0]


def _describe(rgb: np.ndarray, jitter: int) -> tuple[np.ndarray, dict]:
    chip, code = face_chip(rgb)
    descriptor = _net().compute_face_descriptor(chip, jitter)
    return np.asarray(descriptor, dtype=np.float32), {"face": code}


@dataclass(frozen=True)
class Describe:
    """`prepare` of the dlib extractor: file -> descriptor, picklable for worker processes;
    `with_info` also says how the face was found (the cache's "face" row-info column)."""

    jitter: int = 0
    row_info = {"face": "int8"}

    def __call__(self, path: str) -> np.ndarray:
        return describe(path, self.jitter)

    def with_info(self, path: str) -> tuple[np.ndarray, dict]:
        return describe_with_info(path, self.jitter)


class DlibExtractor:
    """prepare() does everything per image in a worker process; embed() only stacks."""

    parallel = "process"
    dim = 128

    def __init__(self, settings, weights):
        _models_package()
        self.settings = settings
        self.prepare = Describe(settings.jitter)

    @staticmethod
    def provenance() -> dict:
        import dlib
        return {"dlib_version": dlib.__version__}

    @staticmethod
    def embed(batch):
        return np.asarray(batch, dtype=np.float32)
