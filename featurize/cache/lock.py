"""One writer per cache: an flock on `<cache>.lock`."""

from __future__ import annotations

import fcntl
import glob
import os
import socket
from contextlib import contextmanager
from pathlib import Path

from featurize.cache.schema import _check_file_target
from featurize.cache.shards import shards_dir
from featurize.errors import UserError


@contextmanager
def lock(path: Path, option: str = "--out"):
    """One writer per cache: an flock on `<cache>.lock`, which holds "host pid" for the
    message a second run gets. The kernel drops an flock when its process ends, however it
    ends, so a lock left by a dead run is simply free: no guessing from process ids."""
    path = Path(path)
    _check_file_target(path, option)
    lock_path = Path(str(path) + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder {lock_path.parent} ({e.strerror}); choose a "
                        "writable --out or cache folder.") from None
    fd = _acquire(lock_path, path)
    try:
        _remove_leftovers(path)
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # while holding it: a waiting run then retries
        os.close(fd)


def _acquire(lock_path: Path, path: Path) -> int:
    """An open descriptor of `lock_path`, flocked, with our "host pid" written in it."""
    for _ in range(100):  # each retry: a run released the lock between our open and flock
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)  # not inherited by exec
        except OSError as e:
            raise UserError(f"cannot create {lock_path} ({e.strerror}); choose a writable --out "
                            "or cache folder.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = os.pread(fd, 256, 0).decode(errors="replace").strip()
            os.close(fd)
            if isinstance(e, BlockingIOError):
                raise UserError(f"{path} is being written by another featurize run "
                                f"({owner or 'just starting'}); wait for it to finish (its "
                                "lock ends with its process, even if it is killed).") from None
            raise UserError(f"cannot lock {lock_path} ({e.strerror}); choose --out on a local "
                            "disk.") from None
        if _same_file(fd, lock_path):  # else its owner unlinked it on release: open the new one
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{socket.gethostname()} {os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
    raise UserError(f"could not take {lock_path}: other featurize runs keep taking it; try again.")


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _remove_leftovers(path: Path):
    """Temporary files of runs and workers killed while writing; under the lock no other
    writer exists (Ray workers write only while their driver holds it)."""
    pattern = glob.escape(f".{path.name}.tmp-") + "*"
    for tmp in [*path.parent.glob(pattern), *shards_dir(path).glob(".*.tmp-*")]:
        if tmp.is_symlink() or tmp.is_file():  # a folder of that name is none of ours
            tmp.unlink(missing_ok=True)
