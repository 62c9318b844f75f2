"""The embedding cache: its HDF5 schema, written and read only through this module.

One file per (dataset, embedding settings). Layout (schema version 1):

    embeddings      (N, D) float32, chunked      one row per image, rows sorted by `paths`
    paths           (N,)   UTF-8                 relative to the dataset root
    labels          (N,)   int32                 index into `classes`, -1 when unlabelled
    classes         (C,)   UTF-8                 sorted class (folder) names
    sizes, mtimes   (N,)   int64                 file size and mtime (ns) when embedded
    failed/paths, failed/reasons, failed/sizes, failed/mtimes   images that could not be used
    attrs: schema_version, settings (JSON), settings_key, backbone, weights, weights_file,
           layer, pooling, input_size, crop, flip, preprocessing, precision, jitter, resize,
           dataset_root, dataset_name, embedding_dim, keras_version, backend, updated

Guarantees: the file is only ever replaced whole (written beside it, then renamed), so a
reader or a crash sees either the old or the new version. Progress of a run is journalled in
`<file>.parts/` (each part renamed into place when complete), so a killed run loses at most
one part and the next run resumes from the journal. `<file>.lock` keeps two runs apart.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .errors import UserError

SCHEMA_VERSION = 1
DEFAULT_DIR = Path("data/cache")
SETTINGS_ATTRS = ("backbone", "weights", "weights_file", "layer", "pooling", "input_size", "crop",
                  "flip", "preprocessing", "precision", "jitter", "resize")
_STR = h5py.string_dtype("utf-8")
_CARRIED = ("keras_version", "backend", "dlib_version")
_MERGE_BLOCK = 1024  # rows copied at a time: memory stays flat however big the cache


def default_path(dataset_name: str, settings, cache_dir=DEFAULT_DIR) -> Path:
    """`<dataset>__<backbone>[__<layer>]__<pooling>__<key>.h5`: the key covers every setting."""
    parts = [dataset_name, settings.spec.short_name]
    if settings.layer:
        parts.append(settings.layer)
    parts += [settings.pooling, settings.key()]
    name = "__".join(re.sub(r"[^A-Za-z0-9._-]+", "-", p) for p in parts)
    return Path(cache_dir) / f"{name}.h5"


def newest(cache_dir=DEFAULT_DIR) -> Path | None:
    files = [p for p in Path(cache_dir).glob("*.h5") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


# --- reading ---------------------------------------------------------------------------------

@dataclass
class Cache:
    """A cache file read into memory (for classify, verify and predict)."""

    path: Path
    embeddings: np.ndarray
    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    attrs: dict
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def settings(self):
        from .extractor import EmbeddingSettings
        return EmbeddingSettings.from_json(self.attrs["settings"])

    @property
    def labelled(self) -> bool:
        return bool(self.classes) and bool((self.labels >= 0).any())


def _open(path) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"cache {path} does not exist; make one with: python -m featurize FOLDER")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise UserError(f"{path} is not a readable HDF5 file (corrupt or truncated?); delete it "
                        "and run featurize again.") from None
    version = f.attrs.get("schema_version")
    if version is None or "embeddings" not in f:
        f.close()
        raise UserError(f"{path} is not a featurize cache (no schema_version/embeddings); "
                        "point --cache at a file made by python -m featurize.")
    if int(version) != SCHEMA_VERSION:
        f.close()
        newer = int(version) > SCHEMA_VERSION
        raise UserError(f"{path} has cache schema {int(version)}, this version reads "
                        f"{SCHEMA_VERSION}; {'upgrade this package' if newer else 're-run featurize to rebuild it'}.")
    return f


def _strings(ds) -> list[str]:
    return [s.decode("utf-8") if isinstance(s, bytes) else s for s in ds[()]] if len(ds) else []


def read(path) -> Cache:
    """Read and check a whole cache; a damaged one is a UserError, never a wrong result."""
    with _open(path) as f:
        try:
            emb = np.asarray(f["embeddings"][()], dtype=np.float32)
            paths = _strings(f["paths"])
            labels = np.asarray(f["labels"][()], dtype=np.int64)
            classes = _strings(f["classes"])
            failed = dict(zip(_strings(f["failed/paths"]), _strings(f["failed/reasons"])))
            attrs = _attrs(f)
        except (KeyError, OSError) as e:
            raise UserError(f"cache {path} is damaged ({e}); delete it and run featurize "
                            "again.") from None
    n = len(emb)
    if emb.ndim != 2 or len(paths) != n or len(labels) != n:
        raise UserError(f"cache {path} is inconsistent ({n} embeddings, {len(paths)} paths, "
                        f"{len(labels)} labels); delete it and run featurize again.")
    if n and (labels.max() >= len(classes) or labels.min() < -1):
        raise UserError(f"cache {path} has labels outside its {len(classes)} classes; delete it "
                        "and run featurize again.")
    if n and not np.isfinite(emb).all():
        bad = int((~np.isfinite(emb)).any(axis=1).sum())
        raise UserError(f"cache {path} has {bad} rows with NaN or Inf; check it with "
                        f"python -m featurize verify {path}, then re-run featurize.")
    return Cache(Path(path), emb, paths, labels, classes, attrs, failed)


def _attrs(f) -> dict:
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def read_attrs(path) -> dict:
    with _open(path) as f:
        return _attrs(f)


# --- the state a run starts from -------------------------------------------------------------

@dataclass
class _Source:
    """Rows available for the next commit: from the cache itself or a journal part."""

    path: Path
    keys: list[str]
    fingerprints: list[tuple[int, int]]
    failed: dict[str, tuple[str, tuple[int, int]]]


def _read_source(path: Path) -> _Source:
    with h5py.File(path, "r") as f:
        keys = _strings(f["paths"])
        fps = list(zip(f["sizes"][()].tolist(), f["mtimes"][()].tolist())) if keys else []
        fk = _strings(f["failed/paths"])
        freasons = _strings(f["failed/reasons"])
        ffps = list(zip(f["failed/sizes"][()].tolist(), f["failed/mtimes"][()].tolist())) if fk else []
    return _Source(path, keys, fps, {k: (r, fp) for k, r, fp in zip(fk, freasons, ffps)})


class State:
    """What is already embedded for a cache path: the cache file plus any journal parts."""

    def __init__(self, path: Path, settings):
        self.path = Path(path)
        self.settings = settings
        self.sources: list[_Source] = []
        self.attrs: dict = {}
        if self.path.exists():
            self.attrs = read_attrs(self.path)
            if self.attrs.get("settings_key") != settings.key():
                raise UserError(_settings_mismatch(self.path, self.attrs, settings))
            self.sources.append(_read_source(self.path))
        for part in sorted(parts_dir(self.path).glob("part-*.h5")):
            try:
                with h5py.File(part, "r") as f:
                    mine = f.attrs.get("settings_key") == settings.key()
                if mine:
                    self.sources.append(_read_source(part))
            except OSError:
                part.unlink()  # a part is renamed into place only once complete; never here
        # Later sources win: a journal part is newer than the cache it continues.
        self.rows: dict[str, tuple[int, int, int]] = {}  # key -> (source, row, fingerprint)
        self.failed: dict[str, tuple[str, tuple[int, int]]] = {}
        for s, src in enumerate(self.sources):
            for r, (key, fp) in enumerate(zip(src.keys, src.fingerprints)):
                self.rows[key] = (s, r, fp)
                self.failed.pop(key, None)
            for key, value in src.failed.items():
                self.failed[key] = value
                self.rows.pop(key, None)

    def todo(self, items) -> list:
        """Items that are new or changed since they were embedded (or failed)."""
        out = []
        for it in items:
            done = self.rows.get(it.key)
            if done is not None and done[2] == it.fingerprint:
                continue
            failed = self.failed.get(it.key)
            if failed is not None and failed[1] == it.fingerprint:
                continue
            out.append(it)
        return out

    def up_to_date(self, dataset) -> bool:
        """Nothing to embed and nothing to drop or relabel: the file can stay as it is."""
        if not self.path.exists() or len(self.sources) != 1:
            return False
        wanted = {it.key for it in dataset.items}
        return (wanted == set(self.rows) | set(self.failed) and not self.todo(dataset.items)
                and self.attrs.get("labels_digest") == _labels_digest(dataset))


def _settings_mismatch(path, attrs, settings) -> str:
    diff = [f"{k}={attrs.get(k)!r} (asked {getattr(settings, k)!r})" for k in SETTINGS_ATTRS
            if str(attrs.get(k)) != str(getattr(settings, k))]
    return (f"{path} holds embeddings made with other settings ({'; '.join(diff) or 'unknown'}); "
            "drop --out to get a file of its own, or delete that file.")


def _labels_digest(dataset) -> str:
    import hashlib
    text = json.dumps([dataset.classes, [(it.key, it.label) for it in dataset.items]])
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


# --- writing ---------------------------------------------------------------------------------

def parts_dir(path: Path) -> Path:
    return Path(str(path) + ".parts")


def _write_failed(f, failed: list[tuple[str, str, tuple[int, int]]]):
    g = f.create_group("failed")
    g.create_dataset("paths", data=[k for k, _, _ in failed], dtype=_STR)
    g.create_dataset("reasons", data=[r for _, r, _ in failed], dtype=_STR)
    g.create_dataset("sizes", data=np.array([fp[0] for _, _, fp in failed], dtype=np.int64))
    g.create_dataset("mtimes", data=np.array([fp[1] for _, _, fp in failed], dtype=np.int64))


def _fsync_replace(tmp: Path, final: Path):
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)


class Journal:
    """Appends finished batches to `<cache>.parts/` as small, atomically renamed files."""

    def __init__(self, path: Path, settings, flush_rows=1024, flush_seconds=30.0):
        self.dir = parts_dir(path)
        self.settings = settings
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self._reset()
        existing = [int(p.stem.split("-")[1]) for p in self.dir.glob("part-*.h5")]
        self.next_part = max(existing, default=0) + 1

    def _reset(self):
        self.keys, self.fps, self.rows, self.failed = [], [], [], []
        self.since = time.monotonic()

    def add(self, items, embeddings):
        for it, row in zip(items, embeddings):
            self.keys.append(it.key)
            self.fps.append(it.fingerprint)
            self.rows.append(np.asarray(row, dtype=np.float32))
        if len(self.keys) >= self.flush_rows or time.monotonic() - self.since > self.flush_seconds:
            self.flush()

    def fail(self, item, reason: str):
        self.failed.append((item.key, reason, item.fingerprint))

    def flush(self):
        if not self.keys and not self.failed:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"part-{self.next_part:06d}.h5"
        tmp = final.with_suffix(".tmp")
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs["settings_key"] = self.settings.key()
                dim = len(self.rows[0]) if self.rows else 0
                f.create_dataset("embeddings", data=np.stack(self.rows) if self.rows
                                 else np.zeros((0, dim), np.float32))
                f.create_dataset("paths", data=self.keys, dtype=_STR)
                f.create_dataset("sizes", data=np.array([fp[0] for fp in self.fps], np.int64))
                f.create_dataset("mtimes", data=np.array([fp[1] for fp in self.fps], np.int64))
                _write_failed(f, self.failed)
            _fsync_replace(tmp, final)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"cannot write to {self.dir} ({e.strerror or e}); free some space or "
                            "choose another --out. Earlier progress is kept.") from None
        self.next_part += 1
        self._reset()


def commit(path: Path, settings, dataset, provenance: dict, dim: int | None = None) -> dict:
    """Merge the cache and its journal into a new file for `dataset`, then swap it in.

    Rows of files that are gone or changed are dropped; rows are sorted by path, so the
    result never depends on the order or timing of the work that produced it.
    """
    path = Path(path)
    state = State(path, settings)
    if path.exists():  # a run that embedded nothing keeps the versions that made the rows
        old = read_attrs(path)
        provenance = {**{k: old[k] for k in _CARRIED if k in old}, **provenance}
    current = {it.key: it for it in dataset.items}
    rows = sorted((k, v) for k, v in state.rows.items()
                  if k in current and current[k].fingerprint == v[2])
    failed = sorted((k, r, fp) for k, (r, fp) in state.failed.items()
                    if k in current and current[k].fingerprint == fp)
    class_index = {c: i for i, c in enumerate(dataset.classes)}
    handles = [h5py.File(src.path, "r") for src in state.sources]
    if dim is None:
        dims = [h["embeddings"].shape[1] for h in handles if h["embeddings"].shape[0]]
        dim = dims[0] if dims else 0
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w") as f:
            n = len(rows)
            emb = f.create_dataset("embeddings", shape=(n, dim), dtype=np.float32,
                                   chunks=(min(n, 256), dim) if n and dim else None)
            for start in range(0, n, _MERGE_BLOCK):
                block = rows[start:start + _MERGE_BLOCK]
                out = np.empty((len(block), dim), np.float32)
                by_source: dict[int, list[tuple[int, int]]] = {}
                for i, (_, (s, r, _)) in enumerate(block):
                    by_source.setdefault(s, []).append((r, i))
                for s, pairs in by_source.items():
                    pairs.sort()
                    src_rows = [r for r, _ in pairs]
                    out[[i for _, i in pairs]] = handles[s]["embeddings"][src_rows]
                emb[start:start + len(block)] = out
            f.create_dataset("paths", data=[k for k, _ in rows], dtype=_STR)
            f.create_dataset("labels", data=np.array(
                [class_index.get(current[k].label, -1) for k, _ in rows], dtype=np.int32))
            f.create_dataset("classes", data=list(dataset.classes), dtype=_STR)
            f.create_dataset("sizes", data=np.array([v[2][0] for _, v in rows], np.int64))
            f.create_dataset("mtimes", data=np.array([v[2][1] for _, v in rows], np.int64))
            _write_failed(f, failed)
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["settings"] = settings.to_json()
            f.attrs["settings_key"] = settings.key()
            for k in SETTINGS_ATTRS:
                f.attrs[k] = getattr(settings, k)
            f.attrs["dataset_root"] = str(dataset.root)
            f.attrs["dataset_name"] = dataset.name
            f.attrs["labels_digest"] = _labels_digest(dataset)
            f.attrs["embedding_dim"] = dim
            f.attrs["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            for k, v in provenance.items():
                f.attrs[k] = v
        for h in handles:
            h.close()
        _fsync_replace(tmp, path)
    except OSError as e:
        for h in handles:
            h.close()
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write cache {path} ({e.strerror or e}); free some space or "
                        "choose another --out. The previous cache and the progress journal "
                        "are intact.") from None
    pdir = parts_dir(path)
    if pdir.exists():
        for part in pdir.iterdir():
            part.unlink()
        pdir.rmdir()
    return {"rows": len(rows), "failed": len(failed)}


# --- locking ---------------------------------------------------------------------------------

@contextmanager
def lock(path: Path):
    """One writer per cache. A lock left by a dead process (same host) is taken over."""
    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _stale(lock_path):
                lock_path.unlink(missing_ok=True)
                continue
            owner = lock_path.read_text(errors="replace").strip() if lock_path.exists() else "?"
            raise UserError(f"{path} is being written by another featurize run ({owner}); wait "
                            f"for it to finish, or delete {lock_path} if that process is gone.") from None
        except OSError as e:
            raise UserError(f"cannot create {lock_path} ({e.strerror}); choose a writable --out "
                            "or cache folder.") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(me)
        break
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)


def _stale(lock_path: Path) -> bool:
    try:
        host, pid = lock_path.read_text().split()
        pid = int(pid)
    except (OSError, ValueError):
        return True  # unreadable or half-written: its writer died while writing it
    if host != socket.gethostname():
        return False  # cannot tell for another machine: be safe
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
