"""Atomic files and folders: the one place featurize and classify write anything a crash must
not leave half-written (caches' indexes and shards, exports, exported models, downloads, run
folders, reports, search indexes).

The recipe is always the same: write under a temporary name in the same folder (so the
rename cannot cross file systems), flush it to disk (fsync), rename it over the final name,
then fsync the folder so the new entry survives a power cut. A reader sees the old file or
the new one, never a mixture. Tests that simulate a crash or a full disk patch `replace`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path


def fsync_file(path) -> None:
    """Flush one file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where folders cannot be
    opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not sync folders
    finally:
        os.close(fd)


def fsync_tree(folder) -> None:
    """Flush every file under `folder` (before a rename publishes them all at once)."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and not path.is_symlink():
            fsync_file(path)


def replace(tmp, final) -> None:
    """Rename the finished file `tmp` over `final`, durably: its data, then the folder's
    entry. The one rename every writer goes through."""
    tmp, final = Path(tmp), Path(final)
    if tmp.is_file():
        fsync_file(tmp)
    else:
        fsync_tree(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def temporary_name(final, tag: str = "tmp") -> Path:
    """A hidden name beside `final` that no other process uses (for a file being written)."""
    final = Path(final)
    return final.with_name(f".{final.name}.{tag}-{os.getpid()}")


@contextmanager
def writing(final, tag: str = "tmp"):
    """Yields a temporary path beside `final` for a writer (h5py, np.save, a Keras or skops
    save); when the block ends normally the file replaces `final` (`replace`), and on an
    error it is removed and `final` is untouched."""
    tmp = temporary_name(final, tag)
    try:
        yield tmp
        replace(tmp, final)
    finally:
        with suppress(OSError):  # already renamed, or a read-only folder: nothing was made
            tmp.unlink(missing_ok=True)


def write_bytes(final, data: bytes) -> None:
    """`final` holds `data`, or (after a crash or an OSError) what it held before."""
    with writing(final) as tmp:
        tmp.write_bytes(data)


def write_text(final, text: str) -> None:
    """`final` holds `text` (UTF-8), or (after a crash or an OSError) what it held before."""
    with writing(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def new_folder_beside(final, tag: str = "tmp") -> Path:
    """A new empty folder beside `final` to build a folder's contents in (see `publish`)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.{tag}-", dir=final.parent))


def publish(work, final) -> None:
    """Rename the finished folder `work` to `final` (which must not exist, or be empty), after
    flushing every file in it: a crash shows no folder or the whole one. Raises OSError when
    `final` exists and is not empty (another writer won, or something is in the way)."""
    fsync_tree(work)
    os.rename(work, final)
    fsync_dir(Path(final).parent)


def discard(work) -> None:
    """Remove a temporary folder or file this process made (after a failure)."""
    work = Path(work)
    if work.is_dir() and not work.is_symlink():
        shutil.rmtree(work, ignore_errors=True)
    else:
        with suppress(OSError):
            work.unlink(missing_ok=True)
