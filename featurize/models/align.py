"""`--align` presets: find the face, then cut the crop the backbone was trained on.

    none  images are used as they are (resized, or centre-cropped with --crop): the default
    dlib  dlib's HOG face detector (upsampled once if it finds nothing, then dlib's CNN
          detector) and its 5-point landmarks; the eyes are levelled, then the backbone's
          `CropProtocol` is applied to the detector's box (VGGFace2: box grown by 0.3,
          shorter side to 256, centre 224). No face found: a fixed central box (the same
          crop every time), and the row is marked so in the cache
          (`Cache.row_info["face"]`, codes in FACE_CODES).

The preset is part of the cache key (a cache made without --align keeps its key) and of the
provenance. The detector runs in the decoding workers, in processes (dlib holds the GIL and
is not thread-safe), through the same pipeline as every other backbone; predict re-aligns
new images the same way because the cache's settings carry the preset. Needs dlib:
`pip install -e .[dlib]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from featurize.errors import UserError

ALIGNS = ("none", "dlib")
# How the face of a row was found ("face" row-info column, int8); -1: not recorded (a row
# made before the column existed, or by a backbone that detects nothing).
FACE_CODES = {0: "hog", 1: "hog-upsampled", 2: "cnn", 3: "fixed-box"}
FACE_FIXED_BOX = 3
ROW_INFO = {"face": "int8"}  # the row-info columns an aligning extractor writes


def check_align(align, spec) -> None:
    """`--align` for backbone `spec`: a known preset that makes sense for it (a UserError)."""
    if align is None:
        return
    if align not in ALIGNS:
        raise UserError(f"--align must be {' or '.join(ALIGNS)}, not {align!r}.")
    if align == "none":
        return
    if spec.crop_protocol is None:
        raise UserError(f"--align {align} cuts the face crop a face model was trained on; "
                        f"{spec.name} is not a face model (none of its own: use "
                        "vggface-vgg16, vggface-resnet50 or vggface-senet50), so drop --align.")
    require_dlib()


def require_dlib() -> None:
    """dlib imports and the model files --align dlib reads are there (a UserError if not)."""
    from featurize.models.dlib_backbone import check_installed
    check_installed("--align dlib", kinds=("five_point", "cnn"))


@dataclass(frozen=True)
class AlignedInput:
    """How an image file becomes the model's (size, size, 3) uint8 face crop: the face found
    by dlib, cut by `protocol`. Picklable (runs in worker processes); used where the
    pipeline uses `ModelInput` (`model_input(settings)`)."""

    size: int
    protocol: object  # a families.base.CropProtocol
    crop = None  # the ModelInput fields the model's input layer reads: no crop or resize there
    source = None
    row_info = ROW_INFO
    parallel = "process"  # dlib is not thread-safe and holds the GIL (featurize.engines.pipeline)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, 3)

    def __call__(self, path: str) -> np.ndarray:
        return self.with_info(path)[0]

    def with_info(self, path: str) -> tuple[np.ndarray, dict]:
        """The crop, and how the face was found ({"face": code})."""
        from featurize.data.images import read_rgb
        return self.pixels_with_info(read_rgb(path))

    def pixels(self, rgb: np.ndarray) -> np.ndarray:
        return self.pixels_with_info(rgb)[0]

    def pixels_with_info(self, rgb: np.ndarray) -> tuple[np.ndarray, dict]:
        from featurize.models.dlib_backbone import find_face
        box, code, eyes = find_face(rgb, landmarks=self.protocol.level_eyes, cnn=True)
        matrix = crop_matrix(box, eyes, self.protocol)
        return warp(rgb, matrix, self.protocol.crop, self.size), {"face": code}


def crop_matrix(box, eyes, protocol) -> np.ndarray:
    """The 2x3 affine map from crop pixels (protocol.crop x protocol.crop) to image pixels:
    the box's centre at the crop's centre, its side grown by `enlarge` mapped to
    `shorter_side` pixels, turned by the eyes' angle when they are given (levelled)."""
    left, top, right, bottom = box
    side = max(right - left, bottom - top)  # dlib's boxes are square; a fixed box may not be
    scale = side * (1 + protocol.enlarge) / protocol.shorter_side  # image px per crop px
    angle = 0.0
    if eyes is not None:
        (lx, ly), (rx, ry) = eyes  # the eye on the image's left, then on its right
        angle = math.atan2(ry - ly, rx - lx)
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    cx, cy = (left + right) / 2, (top + bottom) / 2
    half = protocol.crop / 2
    # image = centre + R(angle) * scale * (crop - half): pixel centres at +0.5
    return np.array([[cos, -sin, cx - cos * half + sin * half],
                     [sin, cos, cy - sin * half - cos * half]])


def warp(rgb: np.ndarray, matrix: np.ndarray, crop: int, size: int) -> np.ndarray:
    """Cut the crop at about the image's own resolution (bilinear), then resize it to `size`
    with Pillow's antialiased filter (a large face shrunk to 224 must not alias). Outside the
    image: black, as zero padding."""
    from PIL import Image
    scale = math.hypot(matrix[0, 0], matrix[1, 0])
    native = max(size, min(4 * crop, round(crop * scale)))  # crop side in image pixels
    k = crop / native
    inverse = (matrix[:, :2] * k).ravel().tolist()
    coeffs = [inverse[0], inverse[1], float(matrix[0, 2]), inverse[2], inverse[3],
              float(matrix[1, 2])]
    image = Image.fromarray(rgb).transform((native, native), Image.AFFINE, coeffs,
                                            resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    if native != size:
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def to_crop(points, matrix: np.ndarray, crop: int, size: int) -> np.ndarray:
    """Image points -> their place in the model's (size x size) crop (for checks and tests)."""
    a = np.vstack([matrix, [0, 0, 1]])
    inside = np.linalg.solve(a, np.c_[np.asarray(points, float), np.ones(len(points))].T)[:2].T
    return inside * size / crop
