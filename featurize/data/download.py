"""The one way files are fetched (weights, label files, datasets) and hashed."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from featurize import atomic
from featurize.errors import UserError

TIMEOUT_S = 60


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def network_timeout(seconds: float = TIMEOUT_S):
    """Keras's own download of the ImageNet weights (keras.applications) has no timeout: a
    stalled link would hang forever. Bound every socket read meanwhile, and restore the
    previous setting. `fetch` needs no such thing: its reads have their own timeout."""
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
    """Download `url` to `target` unless it is already there (with the right SHA-256, if one
    is known). Written beside the target and renamed when complete and checked, so a broken
    download never looks like a file; every read has a timeout of its own (no process-wide
    socket setting). A failure is a UserError that says where to put the file by hand."""
    target = Path(target)
    if target.is_file() and (sha256 is None or sha256_of(target) == sha256):
        return target
    tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _download(url, tmp)
        got = sha256_of(tmp)
        if sha256 and got != sha256:
            raise ValueError(f"checksum mismatch: SHA-256 {got}, expected {sha256}")
        atomic.replace(tmp, target)
    except (OSError, ValueError, http.client.HTTPException) as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not download {url} ({cause(e)}); download it yourself to "
                        f"{target}{hint}.") from None
    return target


def _download(url: str, path: Path) -> None:
    from tqdm import tqdm
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(path, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=path.name.split(".part-")[0][1:],
                  disable=total is not None and total < (1 << 20), leave=False) as bar:
            while block := response.read(1 << 20):
                out.write(block)
                bar.update(len(block))
