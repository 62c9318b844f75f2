"""The one way files are fetched (Keras's `get_file`) and hashed."""

from __future__ import annotations

import hashlib
import socket
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

TIMEOUT_S = 60


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def network_timeout(seconds: float = TIMEOUT_S):
    """Keras downloads (get_file, applications' weights) have no timeout: a stalled link
    would hang forever. Bound every socket read meanwhile."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def cause(error: BaseException) -> str:
    """The whole message of an error and of what caused it, on one line: a download error's
    reason (DNS, proxy, certificate, checksum) is often in the last part."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = " ".join(str(error).split())
        if text and not any(text in earlier for earlier in parts):
            parts.append(text)
        error = error.__cause__ or error.__context__
    return ": ".join(parts) or "no reason given"


def fetch(url: str, target: Path, sha256: str | None = None, hint: str = "") -> Path:
    """Download `url` to `target` unless it is already there, checking its SHA-256 if known.

    A failure is a UserError that says where to put the file by hand.
    """
    from keras.utils import get_file

    target = Path(target)
    # get_file quietly falls back to /tmp/.keras when the folder does not exist yet.
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with network_timeout():
            return Path(get_file(target.name, url, file_hash=sha256, hash_algorithm="sha256",
                                 cache_dir=str(target.parent), cache_subdir="."))
    except Exception as e:  # get_file raises plain Exception for network and checksum errors
        if sha256 and target.is_file() and sha256_of(target) != sha256:
            target.unlink()  # get_file leaves a corrupt download behind
        raise UserError(f"could not download {url} ({cause(e)}); download it yourself to "
                        f"{target}{hint}.") from None
