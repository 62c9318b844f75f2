"""Finding the images of a dataset and decoding one image into an RGB uint8 array."""

from __future__ import annotations

import io
import math
import os
import re
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from featurize.errors import UserError

try:  # libjpeg-turbo without Pillow's per-image overhead; optional, Pillow reads everything
    import simplejpeg
except ImportError:  # pragma: no cover - a platform without its wheel
    simplejpeg = None

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
MAX_PIXELS = 80_000_000  # bigger images are refused, not decoded (decompression bombs)
# No file of an image within MAX_PIXELS needs more (16-bit RGBA stored uncompressed): a bigger
# file is refused before it is read, so a huge file named .jpg cannot exhaust memory.
MAX_FILE_BYTES = 8 * MAX_PIXELS
# The first bytes of the formats of IMAGE_EXTENSIONS, as Pillow's own plugins test them
# (JPEG, PNG, GIF, BMP, TIFF and BigTIFF; WebP is checked in _looks_like_image).
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM",
          b"MM\x00\x2a", b"II\x2a\x00", b"MM\x2a\x00", b"II\x00\x2a", b"MM\x00\x2b", b"II\x2b\x00")
_HEADER_BYTES = 16  # what Pillow's Image.open reads to identify a format


class ImageError(Exception):
    """An image that cannot be used; the message is the short reason stored in the cache."""


@dataclass(frozen=True)
class Item:
    key: str  # path relative to the dataset root, as stored in the cache
    path: str  # real path on disk
    label: str | None  # class name, None for unlabelled
    size: int
    mtime_ns: int
    digest: str = ""  # content hash, set only for --check content (cache.State.todo)

    @property
    def fingerprint(self) -> tuple[int, int]:
        return (self.size, self.mtime_ns)


@dataclass
class Dataset:
    root: Path
    name: str
    items: list[Item]  # sorted by key: the order never depends on timing
    classes: list[str]  # sorted class names; empty when unlabelled
    notes: list[str] = field(default_factory=list)  # what was left out and why, for warnings


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


def _walk_images(folder: str, notes: list[str] | None = None):
    def unreadable(error: OSError):  # os.walk skips such a folder without a word
        if notes is not None:
            notes.append(f"cannot read folder {error.filename} ({error.strerror}); its images "
                         "are left out.")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable):  # follows no
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # directory links
        for name in sorted(filenames):
            if _is_image_name(name):
                yield os.path.join(dirpath, name)


_SOURCE_HELP = ("give a folder of images (one sub-folder per class) or a text file listing "
                "image paths, one per line, optionally TAB label")


def list_dataset(source) -> Dataset:
    """A folder of class folders (labelled), a flat folder (unlabelled), or a list file.

    A list file holds one `path` or `path<TAB>label` per line, relative to its own folder.
    """
    source = Path(source)
    mode = _source_mode(source)
    if stat.S_ISREG(mode):
        if _is_image_name(source.name):
            raise UserError(f"{source} is one image, not a dataset; {_SOURCE_HELP} (for "
                            f"instance its folder, {source.parent}).")
        return _list_file(source)
    if not stat.S_ISDIR(mode):  # reading a FIFO would wait forever, /dev/zero never ends
        raise UserError(f"{source} is {_special_kind(mode)}, not a folder or a list file; "
                        f"{_SOURCE_HELP}.")
    root, notes = str(source), []
    try:
        entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    except OSError as e:
        raise UserError(f"cannot read folder {source} ({e.strerror}); check its permissions or "
                        f"{_SOURCE_HELP}.") from None
    folders = {e for e in entries if os.path.isdir(os.path.join(root, e))}
    items = [_item(root, os.path.join(root, e), None)
             for e in entries if e not in folders and _is_image_name(e)]
    for cls in _class_folders(root, sorted(folders), notes):
        items += [_item(root, p, cache_key(cls))
                  for p in _walk_images(os.path.join(root, cls), notes)]
    if not items:
        raise UserError(f"no images found in {source} (looked for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}); point featurize at the folder "
                        "that holds the images or their class folders.")
    items.sort(key=lambda it: it.key)
    classes = sorted({it.label for it in items if it.label is not None})
    return Dataset(source.resolve(), source.resolve().name, items, classes, notes)


def _source_mode(source: Path) -> int:
    try:
        return os.stat(source).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{source} does not exist; give a folder of images (one sub-folder per "
                        "class) or a text file listing image paths (for LFW: python -m "
                        f"featurize.datasets lfw {source}).") from None
    except OSError as e:
        raise UserError(f"cannot open {source} ({e.strerror}); {_SOURCE_HELP}.") from None


def _special_kind(mode: int) -> str:
    kinds = [(stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "a special file")


def _class_folders(root: str, folders: list[str], notes: list[str]) -> list[str]:
    """The class folders of `root`, leaving out (with a note) each symbolic link to a folder
    that overlaps the dataset or an earlier linked class folder: following `all -> .` would
    list every image a second time under another class (test images leak into training), and
    `up -> ..` would pull in the whole parent tree. A link to a folder elsewhere is fine."""
    real_root = os.path.realpath(root)
    linked = {}  # real path of a followed link -> its class folder
    kept = []
    for name in folders:
        full = os.path.join(root, name)
        if os.path.islink(full):
            target = os.path.realpath(full)
            why = _link_overlap(target, real_root, linked)
            if why:
                notes.append(f"skipped class folder {name}: a symbolic link to {target}, {why}; "
                             "following it would list the same images twice.")
                continue
            linked[target] = name
        kept.append(name)
    return kept


def _link_overlap(target: str, real_root: str, linked: dict) -> str | None:
    """Why a class folder linking to `target` would list images twice, or None."""
    def within(path, folder):
        return os.path.commonpath([path, folder]) == folder

    if within(target, real_root):
        return "the dataset itself" if target == real_root else "which is inside the dataset"
    if within(real_root, target):
        return "which holds the dataset"
    for other, name in linked.items():
        if within(target, other) or within(other, target):
            return f"which overlaps class folder {name} (a link to {other})"
    return None


def _list_file(source: Path) -> Dataset:
    root = source.resolve().parent
    try:  # utf-8-sig: Windows editors start a text file with a byte-order mark
        lines = source.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read list file {source} ({e}); give a UTF-8 text file of "
                        "image paths, one per line.") from None
    remote = url_fingerprints([p for line in lines
                               if is_url(p := line.partition("\t")[0].strip())])
    items, line_of, repeats, entries, any_file, clash = {}, {}, 0, 0, False, None
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        entries += 1
        path, _, label = line.partition("\t")
        if is_url(path.strip()):  # key and path: the URL itself
            url, found = path.strip(), remote.get(path.strip())
            item = Item(url, url, label.strip() or None, *(found or (0, 0)))
            any_file = any_file or found is not None
        else:
            full = os.path.normpath(os.path.join(root, path.strip()))
            item = _item(str(root), full, label.strip() or None)
            any_file = any_file or os.path.isfile(full)
        if item.key not in items:
            items[item.key], line_of[item.key] = item, number
        elif items[item.key].label != item.label:
            clash = clash or (f"list file {source}: lines {line_of[item.key]} and {number} both "
                              f"list {item.key}, with labels {items[item.key].label!r} and "
                              f"{item.label!r}; keep one line per image.")
        else:
            repeats += 1
    if not items:
        raise UserError(f"list file {source} names no images; write one path per line.")
    if not any_file:  # first: a file that is no list at all (an LFW pairs file) says so
        raise UserError(f"{source}: none of its {entries} lines is an existing image path; a "
                        "list file holds one image path per line, optionally TAB label, "
                        "relative to the list file's folder.")
    if clash:
        raise UserError(clash)
    notes = [f"list file {source}: {repeats} repeated line(s) (same path, same label) were "
             "taken once."] if repeats else []
    ordered = sorted(items.values(), key=lambda it: it.key)
    classes = sorted({it.label for it in ordered if it.label is not None})
    return Dataset(root, source.stem, ordered, classes, notes)


def collect(inputs) -> list[Item]:
    """Items for image files and folders given on a command line (keys: the paths given).
    A file is taken as given (reading it tells whether it is an image); a folder must hold
    images."""
    paths = []
    for given in map(str, inputs):
        if os.path.isdir(given):
            found = list(_walk_images(given))
            if not found:
                raise UserError(f"no images in folder {given} (looked for "
                                f"{', '.join(sorted(IMAGE_EXTENSIONS))}); give image files or "
                                "folders that hold them.")
            paths += found
        elif os.path.lexists(given):
            paths.append(given)
        else:
            raise UserError(f"{given} does not exist; give image files or folders.")
    if not paths:
        raise UserError("no images given; name image files or folders that hold them.")
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
    """The bytes of an image file. What cannot be an image is refused before it is read:
    a special file, a file whose first bytes are no supported format's, a file over
    MAX_FILE_BYTES."""
    if is_url(path):
        return _read_url(path)
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
            if not _looks_like_image(f.read(_HEADER_BYTES)):
                raise ImageError("not an image")
            if st.st_size > MAX_FILE_BYTES:
                raise ImageError(_too_large(st.st_size))
            f.seek(0)
            data = f.read(st.st_size + 1)  # one byte more: a file that grew since stat
            if len(data) > st.st_size:
                data += f.read(MAX_FILE_BYTES + 1 - len(data))
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as e:
        raise ImageError(f"cannot read: {e.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(_too_large(len(data)))
    return data


# --- fsspec URLs (s3://bucket/key, gs://..., any protocol fsspec has a package for) --------------

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str) -> bool:
    """Whether a list file's path is an fsspec URL (`s3://bucket/a.jpg`) rather than a file."""
    return bool(_URL.match(path))


def _url_fs(url: str):
    """(fsspec filesystem, path within it) for a URL; a UserError naming the package to
    install when its protocol's is missing. S3 endpoints and credentials come from the usual
    places (AWS_ENDPOINT_URL, AWS_* variables, ~/.aws) or fsspec's configuration."""
    protocol = url.split("://", 1)[0].lower()
    try:
        import fsspec
        return fsspec.core.url_to_fs(url)
    except ImportError as e:  # fsspec's message names the package ("Install s3fs to ...")
        fix = ("the s3fs package: pip install s3fs (or 'featurize-embeddings[s3]')"
               if protocol in ("s3", "s3a") else f"a package fsspec names: {e}")
        raise UserError(f"{url}: reading {protocol}:// URLs needs {fix}.") from None
    except ValueError as e:  # a protocol fsspec does not know
        raise UserError(f"{url}: unknown URL protocol {protocol!r} ({e}); list local paths "
                        "or URLs fsspec can open (s3://...).") from None


def source_path(root, key: str) -> str:
    """Where the image of a cache row is: its key itself for a URL, else under the root."""
    return key if is_url(key) else os.path.join(root, key)


def fingerprints(root, keys: list[str]) -> dict[str, tuple[int, int]]:
    """(size, mtime ns) of each row's image that still exists: os.stat for files, one listing
    per folder for URLs."""
    found = url_fingerprints([k for k in keys if is_url(k)])
    for key in keys:
        if not is_url(key):
            try:
                st = os.stat(os.path.join(root, key))
            except OSError:
                continue
            found[key] = (st.st_size, st.st_mtime_ns)
    return found


def url_fingerprints(urls: list[str]) -> dict[str, tuple[int, int]]:
    """(size, mtime in ns) of each URL that exists, by one listing of each folder (a HEAD
    request per object would cost a round trip per image)."""
    by_folder: dict = {}
    for url in dict.fromkeys(urls):
        fs, path = _url_fs(url)
        by_folder.setdefault((id(fs), fs._parent(path)), (fs, []))[1].append((url, path))
    found = {}
    for (_, folder), (fs, members) in by_folder.items():
        try:
            listing = {fs._strip_protocol(info["name"]): info
                       for info in fs.ls(folder, detail=True)}
        except FileNotFoundError:
            listing = {}
        except Exception as e:  # no such bucket, no permission, no connection
            raise UserError(f"cannot list {members[0][0].rsplit('/', 1)[0]}/ "
                            f"({type(e).__name__}: {str(e)[:160]}); check the URLs, the "
                            "credentials and the endpoint (AWS_ENDPOINT_URL for S3).") from None
        for url, path in members:
            info = listing.get(fs._strip_protocol(path))
            if info is not None and info.get("type", "file") == "file":
                found[url] = (int(info.get("size") or 0), _mtime_ns(info))
    return found


def _mtime_ns(info: dict) -> int:
    """An object's modification time in ns from an fsspec info dict (the key differs by
    protocol); 0 when it has none. ETags are no number, so size + mtime is the fingerprint."""
    import datetime
    for name in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        value = info.get(name)
        if isinstance(value, str):
            try:
                value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(value, datetime.datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=datetime.timezone.utc)
            whole = int(value.replace(microsecond=0).timestamp())
            return whole * 10**9 + value.microsecond * 1000
        if isinstance(value, (int, float)) and value:
            return int(round(value * 1e9)) if value < 1e12 else int(value)
    return 0


def _read_url(url: str) -> bytes:
    """`_read` for a URL, with the same refusals (empty, too large, no image signature)."""
    fs, path = _url_fs(url)
    try:
        with fs.open(path, "rb") as f:
            size = f.size
            if not size:
                raise ImageError("empty file")
            if size > MAX_FILE_BYTES:
                raise ImageError(_too_large(size))
            data = f.read(size)  # one request; the size cap bounds what a non-image costs
    except FileNotFoundError:
        raise ImageError("missing") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as e:
        raise ImageError(f"cannot read: {str(e)[:80]}") from None
    if not _looks_like_image(data[:_HEADER_BYTES]):
        raise ImageError("not an image")
    return data


def _looks_like_image(head: bytes) -> bool:
    return head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _too_large(size: int) -> str:
    return f"too large ({size / 1e6:,.0f} MB file, limit {MAX_FILE_BYTES / 1e6:,.0f} MB)"


def _decode_plain_jpeg(data: bytes, draft_size: int | None) -> np.ndarray | None:
    """simplejpeg's decode where it is exactly Pillow's: a YCbCr or grey JPEG with no
    orientation metadata (Exif or XMP) that Pillow would not draft-scale; else None (use
    Pillow). Its strict mode refuses any JPEG libjpeg warns about, truncated ones included."""
    if simplejpeg is None or not data.startswith(_MAGIC[0]) or _has_orientation_metadata(data):
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray") or w * h > MAX_PIXELS:
            return None
        if draft_size and min(w // draft_size, h // draft_size) >= 2:
            return None
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB")
    except (ValueError, OSError):  # Pillow decides what is wrong with it, and says so
        return None
    if not _progression_complete(data):
        raise ImageError("corrupt: truncated")
    return pixels


def _has_orientation_metadata(data: bytes) -> bool:
    """Whether an APP1 Exif segment, or an XMP one that mentions an orientation (Pillow applies
    XMP's tiff:Orientation when Exif has none), comes before the image data (a marker walk)."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xDA:  # start of scan: no more metadata
            return False
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        start, end = i + 4, i + 2 + length
        if marker == 0xE1 and (data.startswith(b"Exif", start) or (
                data.startswith(b"http://ns.adobe.com/xap/1.0/", start)
                and data.find(b"Orientation", start, end) >= 0)):
            return True
        i += 2 + length
    return True  # unparseable: let Pillow look


def _check_jpeg_scan(data: bytes) -> None:
    """ImageError("corrupt: truncated") when a JPEG's scan data ends early: libjpeg only warns,
    and Pillow fills the rest with grey. Decoding in grey at 1/8 scale still reads every bit
    of scan data, for a fraction of a full decode. An end-of-image marker is appended so that
    a complete scan missing only that marker (which Pillow decodes in full) is no failure;
    where the marker is present, libjpeg stops there and ignores the copy."""
    if simplejpeg is None:
        return
    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
        simplejpeg.decode_jpeg(data + b"\xff\xd9", min_height=1, min_width=1,
                               colorspace="CMYK" if colorspace in ("CMYK", "YCCK") else "GRAY")
    except ValueError as e:  # libjpeg: "premature end of data segment" (or "of JPEG file")
        if "premature end" in str(e).lower():
            raise ImageError("corrupt: truncated") from None
        return  # any other warning or error: Pillow decides, and says what is wrong
    if not _progression_complete(data):
        raise ImageError("corrupt: truncated")


_PROGRESSIVE_SOF = {0xC2, 0xC6, 0xCA, 0xCE}
_ALL_COEFFICIENTS = frozenset(range(64))
# the next marker after scan data: not a stuffed 0xFF00, a restart marker or a fill byte
_NEXT_MARKER = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")


def _progression_complete(data: bytes) -> bool:
    """Whether a progressive JPEG's scans bring every coefficient of every component to full
    precision (a scan with Al=0); True for other JPEGs and for what cannot be parsed (Pillow
    decides). A progressive file cut between two scans and closed by an end-of-image marker
    decodes without any warning, blurred: its later scans are simply missing."""
    components, done, i = None, {}, 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:  # end of image
            break
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            if marker not in _PROGRESSIVE_SOF or i + 10 > len(data):
                return True
            components = set(data[i + 10:i + 10 + 3 * data[i + 9]:3])
        elif marker == 0xDA:  # start of scan: Ns, (Cs, Td/Ta) * Ns, Ss, Se, Ah/Al
            ns = data[i + 4]
            if i + 8 + 2 * ns > len(data):  # the file ends inside this scan's header
                break
            ss, se, approximation = data[i + 5 + 2 * ns:i + 8 + 2 * ns]
            if approximation & 0x0F == 0:
                for c in data[i + 5:i + 5 + 2 * ns:2]:
                    done.setdefault(c, set()).update(range(ss, se + 1))
            found = _NEXT_MARKER.search(data, i + 2 + length)
            if found is None:
                break
            i = found.start()
            continue
        i += 2 + length
    return components is None or all(_ALL_COEFFICIENTS <= done.get(c, set()) for c in components)


def open_rgb(path: str, draft_size: int | None = None, data: bytes | None = None) -> Image.Image:
    """Decode one image with Pillow to RGB, EXIF orientation applied; ImageError with a
    short reason."""
    if data is None:
        data = _read(path)
    if data.startswith(_MAGIC[0]):
        _check_jpeg_scan(data)
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
        if _looks_like_image(data[:_HEADER_BYTES]):
            raise ImageError("corrupt: unreadable header") from None
        raise ImageError("not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"corrupt: {str(e)[:80]}") from None


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


def prepare_image(prepare, path: str):
    """`prepare(path)` with the pipeline's bad-image handling: (array, None), or (None, the
    reason) for an image that cannot be decoded. Every reader of image files for a model
    (featurize, predict, fine-tuning, `featurize verify`) goes through here."""
    try:
        return prepare(path), None
    except ImageError as e:
        return None, str(e)
    except MemoryError:
        return None, "out of memory while decoding"
