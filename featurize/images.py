"""Finding the images of a dataset and decoding one image into an RGB uint8 array."""

from __future__ import annotations

import io
import math
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .errors import UserError

try:  # libjpeg-turbo without Pillow's per-image overhead; optional, Pillow reads everything
    import simplejpeg
except ImportError:  # pragma: no cover - a platform without its wheel
    simplejpeg = None

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
MAX_PIXELS = 80_000_000  # bigger images are refused, not decoded (decompression bombs)
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a failure, not grey pixels


class ImageError(Exception):
    """An image that cannot be used; the message is the short reason stored in the cache."""


@dataclass(frozen=True)
class Item:
    key: str  # path relative to the dataset root, as stored in the cache
    path: str  # real path on disk
    label: str | None  # class name, None for unlabelled
    size: int
    mtime_ns: int

    @property
    def fingerprint(self) -> tuple[int, int]:
        return (self.size, self.mtime_ns)


@dataclass
class Dataset:
    root: Path
    name: str
    items: list[Item]  # sorted by key: the order never depends on timing
    classes: list[str]  # sorted class names; empty when unlabelled


def cache_key(relpath: str) -> str:
    """A printable, UTF-8-safe key for a relative path (undecodable bytes become escapes)."""
    return relpath.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _item(root: str, path: str, label: str | None) -> Item:
    try:
        st = os.stat(path)  # follows symlinks; a broken one gets fingerprint (0, 0)
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:
        size, mtime = 0, 0
    return Item(cache_key(os.path.relpath(path, root)), path, label, size, mtime)


def _walk_images(folder: str):
    for dirpath, dirnames, filenames in os.walk(folder):  # never follows directory symlinks
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if _is_image_name(name):
                yield os.path.join(dirpath, name)


def list_dataset(source) -> Dataset:
    """A folder of class folders (labelled), a flat folder (unlabelled), or a list file.

    A list file holds one `path` or `path<TAB>label` per line, relative to its own folder.
    """
    source = Path(source)
    if not source.exists():
        raise UserError(f"{source} does not exist; give a folder of images (one sub-folder per "
                        "class) or a text file listing image paths (for LFW: python -m "
                        f"featurize.datasets lfw {source}).")
    if source.is_file():
        return _list_file(source)
    root = str(source)
    items = []
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    # A symlinked class folder is fine: below it, os.walk follows no links, so no loops.
    class_dirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    for name in entries:
        full = os.path.join(root, name)
        if name not in class_dirs and _is_image_name(name):
            items.append(_item(root, full, None))
    labelled = []
    for cls in class_dirs:
        labelled += [_item(root, p, cache_key(cls)) for p in _walk_images(os.path.join(root, cls))]
    items += labelled
    if not items:
        raise UserError(f"no images found in {source} (looked for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}); point featurize at the folder "
                        "that holds the images or their class folders.")
    items.sort(key=lambda it: it.key)
    classes = sorted({it.label for it in items if it.label is not None})
    return Dataset(source.resolve(), source.resolve().name, items, classes)


def _list_file(source: Path) -> Dataset:
    root = source.resolve().parent
    items = {}
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read list file {source} ({e}); give a UTF-8 text file of "
                        "image paths, one per line.") from None
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        path, _, label = line.rstrip("\n").partition("\t")
        full = os.path.normpath(os.path.join(root, path.strip()))
        item = _item(str(root), full, label.strip() or None)
        items[item.key] = item
    if not items:
        raise UserError(f"list file {source} names no images; write one path per line.")
    ordered = sorted(items.values(), key=lambda it: it.key)
    classes = sorted({it.label for it in ordered if it.label is not None})
    return Dataset(root, source.stem, ordered, classes)


def collect(inputs) -> list[Item]:
    """Items for image files and folders given on a command line (keys: the paths given)."""
    paths = []
    for given in map(str, inputs):
        if os.path.isdir(given):
            paths += list(_walk_images(given))
        elif os.path.lexists(given):
            paths.append(given)
        else:
            raise UserError(f"{given} does not exist; give image files or folders.")
    if not paths:
        raise UserError(f"no images found in {', '.join(map(str, inputs))}.")
    return [replace(_item(".", p, None), key=p) for p in paths]


def read_rgb(path: str, draft_size: int | None = None) -> np.ndarray:
    """Decode one image to an RGB uint8 array, EXIF orientation applied; ImageError with a
    short reason. Plain JPEGs take the fast path, with the same pixels as Pillow's."""
    data = _read(path)
    pixels = _decode_plain_jpeg(data, draft_size)
    if pixels is not None:
        return pixels
    return np.asarray(open_rgb(path, draft_size, data))


def _read(path: str) -> bytes:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError("missing or broken symlink") from None
    except OSError as e:
        raise ImageError(f"cannot stat: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("not a regular file")
    if st.st_size == 0:
        raise ImageError("empty file")
    try:
        with open(path, "rb") as f:
            return f.read()
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as e:
        raise ImageError(f"cannot read: {e.strerror}") from None


def _decode_plain_jpeg(data: bytes, draft_size: int | None) -> np.ndarray | None:
    """simplejpeg's decode where it is exactly Pillow's: a YCbCr or grey JPEG with no EXIF
    (no orientation to apply) that Pillow would not draft-scale; else None (use Pillow)."""
    if simplejpeg is None or not data.startswith(b"\xff\xd8\xff") or _has_exif(data):
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray") or w * h > MAX_PIXELS:
            return None
        if draft_size and min(w // draft_size, h // draft_size) >= 2:
            return None
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except (ValueError, OSError):  # Pillow decides what is wrong with it, and says so
        return None


def _has_exif(data: bytes) -> bool:
    """Whether an APP1 Exif segment comes before the image data (marker walk, no decode)."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xDA:  # start of scan: no more metadata
            return False
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xE1 and data[i + 4:i + 10].startswith(b"Exif"):
            return True
        i += 2 + length
    return True  # unparseable: let Pillow look


def open_rgb(path: str, draft_size: int | None = None, data: bytes | None = None) -> Image.Image:
    """Decode one image with Pillow to RGB, EXIF orientation applied; ImageError with a
    short reason."""
    if data is None:
        data = _read(path)
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"too large ({w}x{h} pixels, limit {MAX_PIXELS})")
            if draft_size and im.format == "JPEG":
                im.draft("RGB", (draft_size, draft_size))  # decode at reduced scale: faster
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # a broken EXIF block must not lose the pixels
                pass
            return _to_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError("too large (decompression bomb)") from None
    except Image.UnidentifiedImageError:
        if data.startswith(_SIGNATURES):
            raise ImageError("corrupt: unreadable header") from None
        raise ImageError("not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"corrupt: {str(e)[:80]}") from None


_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def fit(pixels: np.ndarray, size, crop: float | None = None) -> np.ndarray:
    """Centre-crop a fraction `crop`, then resize with Pillow's bilinear filter to `size`
    (a side, or (height, width)); untouched if already that size."""
    h, w = (size, size) if isinstance(size, int) else size
    if not crop and pixels.shape[:2] == (h, w):
        return pixels
    im = Image.fromarray(pixels)
    if crop:
        top, left, ch, cw = crop_box(pixels.shape[0], pixels.shape[1], crop)
        im = im.crop((left, top, left + cw, top + ch))
    if im.size != (w, h):
        im = im.resize((w, h), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def crop_box(h: int, w: int, crop: float) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the centred `crop` fraction; the model's crop uses it too."""
    ch, cw = max(1, round(h * crop)), max(1, round(w * crop))
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def load_for_model(path: str, size: int, crop: float | None = None) -> np.ndarray:
    """The (size, size, 3) uint8 array a Keras backbone is fed for one image file."""
    draft = math.ceil(size / crop) if crop else size
    return fit(read_rgb(path, draft_size=draft), size, crop)


@dataclass(frozen=True)
class ModelInput:
    """How an image file becomes the fixed-shape uint8 array a model is fed; picklable, so
    worker processes can run it.

    With `source` (height, width) set, cropping and resizing happen in the model on the
    accelerator: here images are only decoded (and, if their size differs, brought to
    `source` first), which is most of what a CPU saves on a GPU machine.
    """

    size: int
    crop: float | None = None
    source: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*(self.source or (self.size, self.size)), 3)

    def __call__(self, path: str) -> np.ndarray:
        if self.source is None:
            return load_for_model(path, self.size, self.crop)
        return fit(read_rgb(path, draft_size=max(self.source)), self.source)


def image_size(path: str) -> tuple[int, int]:
    """(height, width) of an image as the model sees it (EXIF orientation applied)."""
    return read_rgb(path).shape[:2]
