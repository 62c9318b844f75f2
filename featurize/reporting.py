"""What featurize's and classify's reports share: thumbnails as data: URIs, PNG figures,
a colour palette, and writing a report file atomically with a one-line error naming the
option. The pages themselves are Jinja templates (classify/templates, featurize map's
page)."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

from featurize import atomic
from featurize.errors import UserError

THUMB_SIDE = 48
# An image that cannot load stands for no thumbnail: a 1x1 transparent GIF.
BLANK_GIF = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"


def thumbnail_uri(path, side: int = THUMB_SIDE, quality: int = 70) -> str | None:
    """A small JPEG of the image file as a data: URI, or None when it cannot be read (a
    missing file, a URL, not an image): thumbnails never fail a report."""
    from PIL import Image, ImageOps

    from featurize.data.images import is_url
    if is_url(str(path)) or not os.path.isfile(path):
        return None
    try:
        with Image.open(path) as im:
            im.draft("RGB", (2 * side, 2 * side))  # JPEG: decode at a reduced scale, fast
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((side, side))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=quality)
    except Exception:  # noqa: BLE001 - Pillow raises many kinds for a bad file
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def palette(n: int) -> list[str]:
    """n distinct colours: tab10/tab20 and their b/c variants (60), cycled beyond."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex
    names = ["tab10"] if n <= 10 else ["tab20", "tab20b", "tab20c"]
    colours = [to_hex(colormaps[m](k)) for m in names for k in range(colormaps[m].N)]
    return [colours[k % len(colours)] for k in range(n)]


def write_text_atomic(path: Path, text: str, option: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), option)


def write_atomic(path: Path, write, option: str) -> None:
    """`write(tmp)` a temporary file beside `path`, then rename it into place; a failure is
    one line naming `option` (nothing half-written is left)."""
    try:
        with atomic.writing(path) as tmp:
            write(tmp)
    except OSError as e:
        raise UserError(f"cannot write {option} {path} ({e.strerror or e}); choose a writable "
                        "file.") from None
