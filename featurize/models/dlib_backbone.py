"""dlib's ResNet face descriptor (the model behind `face_recognition`) as a backbone.

Per image: HOG face detection (the face nearest the centre; upsampled once if none is found;
else a fixed central box, and the row is marked so in the cache), 5-point landmarks, an
aligned 150x150 chip, and the 128-D descriptor. dlib holds the GIL, so the whole chain runs
in worker processes, one model copy each (dlib is not thread-safe either: never call
`describe` from several threads). Needs `pip install -e .[dlib]`.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featurize.errors import UserError

# Used when no face is found: the median HOG box on LFW's 250x250 deep-funneled images, as
# fractions (left, top, right, bottom). LFW faces are centred, so this box holds the face.
FALLBACK_BOX = (0.268, 0.320, 0.700, 0.748)
FIXED_BOX_CODE = 3  # featurize.models.align.FACE_CODES: no face found, FALLBACK_BOX used
CNN_CODE = 2  # found by dlib's CNN detector, where HOG found nothing (--align dlib)


INSTALL = "pip install -e '.[dlib]' (dlib-bin, face-recognition-models)"
# The files of the face-recognition-models package, read from its folder: its __init__ is
# never run, because it imports pkg_resources, which setuptools 81+ no longer has and a
# Python 3.12+ virtualenv does not install at all.
MODEL_FILES = {
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
    "five_point": "shape_predictor_5_face_landmarks.dat",
    "cnn": "mmod_human_face_detector.dat",
}


def require_dlib(what: str = "the dlib-resnet backbone"):
    """The dlib module, or a one-line UserError quoting why it does not import."""
    try:
        import dlib
    except ImportError as e:
        raise UserError(f"{what} needs dlib, which does not import ({e}): {INSTALL}.") from None
    return dlib


def models_dir(what: str = "the dlib-resnet backbone") -> Path:
    """The `models` folder of the face-recognition-models package, found without importing
    the package (importlib's spec gives its folder; nothing of it is executed)."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError) as e:
        spec, why = None, f" ({e})"
    else:
        why = ""
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / "models").is_dir():
            return Path(folder) / "models"
    where = (f" at {folders[0]} has no models folder" if folders else
             " is not installed" if spec is None else f" at {spec.origin} is not a package")
    raise UserError(f"{what} needs dlib's model files: the face-recognition-models package"
                    f"{where}{why}; {INSTALL}.")


def model_file(kind: str, what: str = "the dlib-resnet backbone") -> str:
    """The path of one model file (MODEL_FILES), checked to exist."""
    path = models_dir(what) / MODEL_FILES[kind]
    if not path.is_file():
        raise UserError(f"{what} needs {path}, which is missing; reinstall the models: "
                        "pip install --force-reinstall face-recognition-models.")
    return str(path)


def check_installed(what: str = "the dlib-resnet backbone",
                    kinds=("five_point", "recognition")) -> None:
    """Check that dlib imports and the model files `kinds` are there (UserError if not)."""
    require_dlib(what)
    for kind in kinds:
        model_file(kind, what)


def model_path() -> Path:
    require_dlib()
    return Path(model_file("recognition"))


@functools.lru_cache(maxsize=1)
def _finders():
    """The HOG face detector and the 5-point landmark model (one copy per process)."""
    dlib = require_dlib()  # first: a missing dlib is its one-line message
    return (dlib.get_frontal_face_detector(), dlib.shape_predictor(model_file("five_point")))


@functools.lru_cache(maxsize=1)
def _net():
    dlib = require_dlib()
    return dlib.face_recognition_model_v1(model_file("recognition"))


@functools.lru_cache(maxsize=1)
def _cnn():
    dlib = require_dlib()
    return dlib.cnn_face_detection_model_v1(model_file("cnn"))


def _detect(rgb: np.ndarray, cnn: bool = False):
    """The most central HOG detection (upsampled once if none; then, with `cnn`, dlib's CNN
    detector), and how it was found: (rectangle, code) with the codes of
    featurize.models.align.FACE_CODES; (None, 3) if none."""
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
    """(box (left, top, right, bottom), code, eyes) for featurize.models.align: eyes are the centres
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


# --jitter N: the chip and N jittered copies of it go through the network in one batched
# call, and their descriptors are averaged. Copy i of a chip depends only on (the chip's
# pixels, i): the same image gives the same embedding in every run, process and worker count,
# and jitter N's passes are the first N+1 of jitter M > N. The jitter is dlib's kind (its
# `jitter_image`: a slight rotation, zoom and shift, mirrored half the time), drawn from a
# hash instead of a random generator that runs on from image to image.
SEEDED = "seeded"  # EmbeddingSettings.jitter_scheme of --jitter N
LEGACY = ""  # caches made before: dlib's own jitter (its random state runs across images)
JITTER_SHIFT = 0.02  # of the chip's inner box, each way
JITTER_ZOOM = (0.97, 1.0)  # the inner box is divided by this
JITTER_DEGREES = 3.0
INNER_MARGIN = 3  # pixels: the jitter moves a box this much smaller than the chip


def chip_digest(chip: np.ndarray) -> bytes:
    """What seeds an image's jitter: a hash of its chip's pixels (not of its path)."""
    chip = np.ascontiguousarray(chip, dtype=np.uint8)
    return hashlib.sha256(repr(chip.shape).encode() + chip.tobytes()).digest()


def jitter_draw(digest: bytes, i: int) -> dict:
    """The jitter of pass `i` (>= 1) of the chip with `chip_digest` `digest`: uniform
    numbers from SHA-512 of (digest, i), so no random generator's version can change them."""
    words = np.frombuffer(hashlib.sha512(digest + int(i).to_bytes(8, "little")).digest(), "<u8")
    u = words[:5].astype(np.float64) / 2.0 ** 64
    return {"dx": (2 * u[0] - 1) * JITTER_SHIFT, "dy": (2 * u[1] - 1) * JITTER_SHIFT,
            "zoom": JITTER_ZOOM[0] + (JITTER_ZOOM[1] - JITTER_ZOOM[0]) * u[2],
            "degrees": (2 * u[3] - 1) * JITTER_DEGREES, "mirror": bool(u[4] >= 0.5)}


def transform_chip(chip: np.ndarray, dx=0.0, dy=0.0, zoom=1.0, degrees=0.0, mirror=False,
                   margin: int = INNER_MARGIN) -> np.ndarray:
    """The chip resampled (bilinear, same size) from its inner box (`margin` pixels in),
    shifted by (dx, dy) of that box's side, its side divided by `zoom`, turned by `degrees`;
    then mirrored left to right if `mirror`."""
    import dlib
    n = chip.shape[0]
    inner = n - 2 * margin
    side = inner / zoom
    cx, cy = (n - 1) / 2 + dx * inner, (n - 1) / 2 + dy * inner
    half = (side - 1) / 2
    rect = dlib.drectangle(cx - half, cy - half, cx + half, cy + half)
    details = dlib.chip_details(rect, dlib.chip_dims(n, chip.shape[1]), np.deg2rad(degrees))
    out = dlib.extract_image_chip(np.ascontiguousarray(chip), details)
    return np.ascontiguousarray(out[:, ::-1]) if mirror else out


def jittered_chips(chip: np.ndarray, jitter: int, first: int = 1) -> list[np.ndarray]:
    """Passes `first`..`jitter` of the chip (pass 0 is the chip itself)."""
    digest = chip_digest(chip)
    return [transform_chip(chip, **jitter_draw(digest, i)) for i in range(first, jitter + 1)]


def pass_descriptors(chips: list[np.ndarray]) -> np.ndarray:
    """(len(chips), 128) float64 descriptors, in one batched network call."""
    return np.asarray(_net().compute_face_descriptor(list(chips), 0), dtype=np.float64)


def chip_descriptor(chip: np.ndarray, jitter: int = 0, scheme: str = SEEDED) -> np.ndarray:
    """The 128-D float32 descriptor of an aligned chip: with `jitter` N (seeded scheme), the
    mean of the chip's and its N jittered copies' descriptors."""
    if jitter and scheme == SEEDED:
        chips = [chip] + jittered_chips(chip, jitter)
        return pass_descriptors(chips).mean(axis=0).astype(np.float32)
    if scheme not in (SEEDED, LEGACY):
        raise UserError(f"unknown jitter scheme {scheme!r} (known: {SEEDED!r}, dlib's "
                        "legacy ''); is this cache from a newer featurize?")
    return np.asarray(_net().compute_face_descriptor(chip, jitter), dtype=np.float32)


def describe(path: str, jitter: int = 0, scheme: str = SEEDED) -> np.ndarray:
    """One image file -> its 128-D descriptor (runs in a worker process)."""
    return describe_with_info(path, jitter, scheme)[0]


def describe_with_info(path: str, jitter: int = 0, scheme: str = SEEDED) -> tuple[np.ndarray, dict]:
    """One image file -> its 128-D descriptor and how its face was found."""
    from featurize.data.images import read_rgb
    return _describe(read_rgb(path), jitter, scheme)


def describe_rgb(rgb: np.ndarray, jitter: int = 0, scheme: str = SEEDED) -> np.ndarray:
    """One RGB uint8 image (in memory) -> its 128-D descriptor."""
    return _describe(rgb, jitter, scheme)[0]


def _describe(rgb: np.ndarray, jitter: int, scheme: str = SEEDED) -> tuple[np.ndarray, dict]:
    chip, code = face_chip(rgb)
    return chip_descriptor(chip, jitter, scheme), {"face": code}


@dataclass(frozen=True)
class Describe:
    """`prepare` of the dlib extractor: file -> descriptor, picklable for worker processes;
    `with_info` also says how the face was found (the cache's "face" row-info column)."""

    jitter: int = 0
    scheme: str = SEEDED
    row_info = {"face": "int8"}

    def __call__(self, path: str) -> np.ndarray:
        return describe(path, self.jitter, self.scheme)

    def with_info(self, path: str) -> tuple[np.ndarray, dict]:
        return describe_with_info(path, self.jitter, self.scheme)


def jitter_scheme(settings) -> str:
    """The jitter scheme of `settings` (LEGACY for settings recorded before it existed)."""
    return getattr(settings, "jitter_scheme", LEGACY)


class DlibExtractor:
    """prepare() does everything per image in a worker process; embed() only stacks."""

    parallel = "process"
    dim = 128

    def __init__(self, settings, weights):
        check_installed()
        self.settings = settings
        self.prepare = Describe(settings.jitter, jitter_scheme(settings))

    def provenance(self) -> dict:
        """dlib's version, and with --jitter the scheme and the --tta preset it amounts to."""
        import dlib
        out = {"dlib_version": dlib.__version__}
        if self.settings.jitter:
            from featurize.settings import tta_of
            out.update(jitter_scheme=jitter_scheme(self.settings) or "dlib-unseeded",
                       tta=tta_of(self.settings.jitter, jitter_scheme(self.settings)))
        return out

    @staticmethod
    def embed(batch):
        return np.asarray(batch, dtype=np.float32)
