"""The embedding cache: its HDF5 schema, written and read only through this module.

One file per (dataset, embedding settings). Layout (schema version 1):

    embeddings      (N, D) float32, chunked      one row per image, rows sorted by `paths`
    paths           (N,)   UTF-8                 relative to the dataset root
    labels          (N,)   int32                 index into `classes`, -1 when unlabelled
    classes         (C,)   UTF-8                 sorted class (folder) names
    sizes, mtimes   (N,)   int64                 file size and mtime (ns) when embedded
    digests         (N,)   UTF-8                 BLAKE2b-128 of the file (hex) when embedded with
                                                 --check content, "" otherwise (absent in caches
                                                 made before it existed)
    failed/paths, failed/reasons, failed/sizes, failed/mtimes   images that could not be used
    attrs: schema_version, settings (JSON), settings_key, backbone, weights, weights_file,
           layer, pooling, input_size, crop, flip, preprocessing, precision, jitter, resize,
           dataset_root, dataset_name, embedding_dim, keras_version, backend, updated,
           complete (bool: False when the run that wrote it was interrupted) and pending (int:
           images of the dataset neither embedded nor failed); a cache without them (older)
           reads as complete, 0 pending

Numeric datasets carry HDF5 fletcher32 checksums (so they are chunked): bit rot on disk is
a clear error when read, `featurize verify` names the damaged rows, and the next featurize run
re-embeds them. Caches written before the checksums still read.

Guarantees: the file is only ever replaced whole (written beside it, then renamed), so a
reader or a crash sees either the old or the new version. Progress of a run is journalled in
`<file>.parts/` (each part renamed into place when complete), so a killed run loses at most
one part and the next run resumes from the journal. `<file>.lock` keeps two runs apart: it is
an flock, which the kernel releases when its process ends, however it ends.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import re
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import h5py
import numpy as np

from .errors import UserError

SCHEMA_VERSION = 1
DEFAULT_DIR = Path("data/cache")
SETTINGS_ATTRS = ("backbone", "weights", "weights_file", "layer", "pooling", "input_size", "crop",
                  "flip", "preprocessing", "precision", "jitter", "resize")
REQUIRED = ("embeddings", "paths", "labels", "classes", "sizes", "mtimes", "failed/paths",
            "failed/reasons", "failed/sizes", "failed/mtimes")  # every reader relies on these
CHECKS = ("mtime", "content")  # --check: what tells that a file changed since it was embedded
_STR = h5py.string_dtype("utf-8")
_CARRIED = ("keras_version", "backend", "dlib_version")
_MERGE_BLOCK = 1024  # rows copied at a time: memory stays flat however big the cache
_CHUNK_BYTES = 1 << 18  # per checksummed chunk of embeddings: damage is located this finely
_HASH_BLOCK = 1 << 20


def default_path(dataset_name: str, settings, cache_dir=DEFAULT_DIR, root=None) -> Path:
    """`<dataset>-<root hash>__<backbone>[__<layer>]__<pooling>__<key>.h5`: the key covers every
    setting, the hash of the dataset's root keeps /A/photos and /B/photos apart. Without
    `root`: the name earlier versions used."""
    name = dataset_name if root is None else f"{dataset_name}-{_root_hash(root)}"
    parts = [name, settings.spec.short_name]
    if settings.layer:
        parts.append(settings.layer)
    parts += [settings.pooling, settings.key()]
    name = "__".join(re.sub(r"[^A-Za-z0-9._-]+", "-", p) for p in parts)
    return Path(cache_dir) / f"{name}.h5"


def path_for(dataset, settings, cache_dir=DEFAULT_DIR) -> Path:
    """The default cache file of `dataset`. A cache an earlier version made under the name
    without the root hash, for this same root, stays in use: nothing is embedded again."""
    path = default_path(dataset.name, settings, cache_dir, root=dataset.root)
    legacy = default_path(dataset.name, settings, cache_dir)
    if not path.exists() and legacy.is_file() and _root_of(legacy) == str(dataset.root):
        return legacy
    return path


def _root_hash(root) -> str:
    return hashlib.sha256(os.fsencode(str(root))).hexdigest()[:8]


def _root_of(path: Path) -> str | None:
    try:
        with h5py.File(path, "r") as f:
            root = f.attrs.get("dataset_root")
    except OSError:
        return None
    return root.decode() if isinstance(root, bytes) else root


def newest(cache_dir=DEFAULT_DIR) -> Path | None:
    files = [p for p in Path(cache_dir).glob("*.h5") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def file_digest(path) -> str:
    """BLAKE2b-128 of a file's content (hex), streamed; "" when it cannot be read (the image
    is then embedded again, and its decoding says what is wrong)."""
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                h.update(block)
    except OSError:
        return ""
    return h.hexdigest()


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
    damaged: list[int] = field(default_factory=list)  # rows failing their checksum (zeros here)
    sizes: np.ndarray | None = None
    mtimes: np.ndarray | None = None
    summary: object = None  # the featurize run's Summary, when featurize.embed_folder made it

    @property
    def X(self) -> np.ndarray:  # noqa: N802 - scikit-learn's name
        """The embeddings, (N, D) float32, one row per path."""
        return self.embeddings

    @property
    def y(self) -> np.ndarray:
        """The label of each row: an index into `classes`, -1 when unlabelled."""
        return self.labels

    def to_pandas(self):
        """A DataFrame: path, label (class name, missing when unlabelled) and embedding (one
        float32 array per row), in the cache's order."""
        try:
            import pandas as pd
        except ImportError:
            raise UserError("Cache.to_pandas needs pandas: pip install pandas (or use .X, .y, "
                            ".paths and .classes).") from None
        names = [self.classes[i] if i >= 0 else None for i in self.labels.tolist()]
        return pd.DataFrame({"path": self.paths, "label": names,
                             "embedding": list(self.embeddings)})

    @property
    def settings(self):
        from .extractor import EmbeddingSettings
        return EmbeddingSettings.from_json(self.attrs["settings"])

    @property
    def labelled(self) -> bool:
        return bool(self.classes) and bool((self.labels >= 0).any())

    @property
    def complete(self) -> bool:
        """False when the featurize run that wrote it was interrupted (older caches: True)."""
        return bool(self.attrs.get("complete", True))

    @property
    def pending(self) -> int:
        """Images of the dataset neither embedded nor failed when it was written."""
        return int(self.attrs.get("pending", 0))


def _fix(option: str) -> str:
    if option == "--out":
        return "choose another --out (featurize only replaces cache files it made)"
    return f"point {option} at a file made by python -m featurize"


def _check_file_target(path: Path, option: str):
    """A directory or a device where a cache file is expected: a UserError naming `option`."""
    if path.is_dir():
        raise UserError(f"{path} is a directory; give {option} a file path, such as "
                        f"{path / 'cache.h5'}.")
    if path.exists() and not path.is_file():
        raise UserError(f"{path} is not a regular file; give {option} the path of a cache file.")


def _open(path, option: str = "--cache") -> h5py.File:
    """Open a cache for reading, checked against the schema; `option` is what the user
    names it with (--cache, --out...), for the messages."""
    path = Path(path)
    _check_file_target(path, option)
    if not path.exists():
        raise UserError(f"cache {path} does not exist; make one with: python -m featurize FOLDER")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise UserError(_unopenable(path, option)) from None
    problem = _schema_problem(f, path, option)
    if problem:
        f.close()
        raise UserError(problem)
    return f


def _unopenable(path: Path, option: str) -> str:
    if not os.access(path, os.R_OK):
        return f"cannot read {path} (permission denied); make it readable, or {_fix(option)}."
    if not h5py.is_hdf5(path):
        return f"{path} is not a readable HDF5 file, so not a featurize cache; {_fix(option)}."
    return (f"{path} is not a readable HDF5 file (truncated or damaged?); move it aside and run "
            f"featurize again, or {_fix(option)}.")


def _schema_problem(f, path: Path, option: str) -> str | None:
    version = f.attrs.get("schema_version")
    if version is None or "embeddings" not in f:
        return (f"{path} is an HDF5 file but not a featurize cache (no schema_version or "
                f"embeddings); {_fix(option)}.")
    if int(version) != SCHEMA_VERSION:
        fix = ("upgrade this package" if int(version) > SCHEMA_VERSION
               else "re-run featurize to rebuild it")
        return (f"{path} has cache schema {int(version)}, this version reads {SCHEMA_VERSION}; "
                f"{fix}.")
    missing = [name for name in REQUIRED if not isinstance(f.get(name), h5py.Dataset)]
    if missing:
        return (f"{path} lacks {', '.join(missing)} of the cache schema (damaged, or written by "
                "another program); move it aside and run featurize again to rebuild it.")
    return None


def _strings(ds) -> list[str]:
    return [s.decode("utf-8") if isinstance(s, bytes) else s for s in ds[()]] if len(ds) else []


def _read_into(ds, start: int, stop: int, out) -> bool:
    try:
        block = ds[start:stop]
    except OSError:  # HDF5's "filter returned failure during read": a checksum mismatch
        return False
    if out is not None:
        out[start:stop] = block
    return True


def _scan(ds, keep: bool = True) -> tuple[np.ndarray | None, list[int]]:
    """Read `ds` block by block: (its data, or None if not `keep`; the rows of chunks that fail
    their checksum, zeros in the data). Memory stays flat when not keeping the data."""
    n = ds.shape[0] if ds.shape else 0
    out = np.zeros(ds.shape, ds.dtype) if keep else None
    chunk = ds.chunks[0] if ds.chunks else max(n, 1)
    block = max(chunk, _MERGE_BLOCK // chunk * chunk)
    bad = []
    for start in range(0, n, block):
        stop = min(start + block, n)
        if _read_into(ds, start, stop, out):
            continue
        for s in range(start, stop, chunk):  # find the damaged chunks of the block
            if not _read_into(ds, s, min(s + chunk, stop), out):
                bad.extend(range(s, min(s + chunk, stop)))
    return out, bad


def _read_checked(ds) -> tuple[np.ndarray, list[int]]:
    """A whole dataset and the rows that fail their checksum (zeros), fast when none do."""
    try:
        return ds[()], []
    except OSError:
        return _scan(ds)


def _damaged_rows(ds) -> list[int]:
    """Rows of `ds` in chunks that fail their checksum, read without keeping them."""
    if not ds.fletcher32:
        return []  # a cache written before the checksums: nothing to check against
    return _scan(ds, keep=False)[1]


def read(path, option: str = "--cache", strict: bool = True) -> Cache:
    """Read and check a whole cache; a damaged one is a UserError, never a wrong result.

    With strict=False (featurize verify) rows that fail their checksum come back as zeros,
    listed in `damaged`, and rows with NaN or Inf are returned as they are.
    """
    with _open(path, option) as f:
        try:
            emb, bad_emb = _read_checked(f["embeddings"])
            labels, bad_labels = _read_checked(f["labels"])
            sizes, bad_sizes = _read_checked(f["sizes"])
            mtimes, bad_mtimes = _read_checked(f["mtimes"])
            paths = _strings(f["paths"])
            classes = _strings(f["classes"])
            failed = dict(zip(_strings(f["failed/paths"]), _strings(f["failed/reasons"])))
            attrs = _attrs(f)
        except OSError as e:
            raise UserError(f"cache {path} is damaged ({e}); move it aside and run featurize "
                            "again.") from None
    emb, labels = np.asarray(emb, dtype=np.float32), np.asarray(labels, dtype=np.int64)
    damaged = sorted(set(bad_emb) | set(bad_labels) | set(bad_sizes) | set(bad_mtimes))
    labels[bad_labels] = -1
    n = len(emb)
    if emb.ndim != 2 or len(paths) != n or len(labels) != n or len(sizes) != n:
        raise UserError(f"cache {path} is inconsistent ({n} embeddings, {len(paths)} paths, "
                        f"{len(labels)} labels); move it aside and run featurize again.")
    if n and (labels.max() >= len(classes) or labels.min() < -1):
        raise UserError(f"cache {path} has labels outside its {len(classes)} classes; move it "
                        "aside and run featurize again.")
    if strict and damaged:
        raise UserError(damage_message(path, len(damaged), paths[damaged[0]],
                                       attrs.get("dataset_root", "its dataset")))
    if strict and n and not np.isfinite(emb).all():
        bad = int((~np.isfinite(emb)).any(axis=1).sum())
        raise UserError(f"cache {path} has {bad} rows with NaN or Inf; check it with "
                        f"python -m featurize verify {path}, then re-run featurize.")
    return Cache(Path(path), emb, paths, labels, classes, attrs, failed, damaged, sizes, mtimes)


def damage_message(path, count: int, first: str, root: str) -> str:
    return (f"cache {path}: {count} row(s) fail their checksum (the file was damaged on disk; "
            f"first: {first}); run featurize on {root} again with the same options: it embeds "
            f"those images again (python -m featurize verify {path} lists them).")


def _attrs(f) -> dict:
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def read_attrs(path, option: str = "--cache") -> dict:
    with _open(path, option) as f:
        return _attrs(f)


# --- the state a run starts from -------------------------------------------------------------

@dataclass
class _Source:
    """Rows available for the next commit: from the cache itself or a journal part."""

    path: Path
    rows: list[tuple[str, int, tuple[int, int], str]]  # key, row, fingerprint, digest
    failed: dict[str, tuple[str, tuple[int, int]]]
    dropped: int = 0  # rows left out because they fail their checksum: embedded again
    damaged: bool = False  # something fails its checksum: the file must be rewritten


def _read_source(path: Path) -> _Source:
    """The rows of a cache or journal part that can be trusted: rows whose embedding or
    fingerprint fails its checksum are left out, so they are embedded again."""
    with h5py.File(path, "r") as f:
        keys = _strings(f["paths"])
        sizes, bad_sizes = _read_checked(f["sizes"])
        mtimes, bad_mtimes = _read_checked(f["mtimes"])
        digests = _strings(f["digests"]) if "digests" in f else []
        if len(digests) != len(keys):  # made before --check content: no digest to compare
            digests = [""] * len(keys)
        bad = set(bad_sizes) | set(bad_mtimes) | set(_damaged_rows(f["embeddings"]))
        bad_labels = "labels" in f and bool(_read_checked(f["labels"])[1])  # parts have none
        fk, freasons = _strings(f["failed/paths"]), _strings(f["failed/reasons"])
        fsizes, bad_fs = _read_checked(f["failed/sizes"])
        fmtimes, bad_fm = _read_checked(f["failed/mtimes"])
    rows = [(k, i, (int(sizes[i]), int(mtimes[i])), digests[i])
            for i, k in enumerate(keys) if i not in bad]
    bad_failed = set(bad_fs) | set(bad_fm)
    failed = {k: (r, (int(s), int(m)))
              for j, (k, r, s, m) in enumerate(zip(fk, freasons, fsizes, fmtimes))
              if j not in bad_failed}
    return _Source(path, rows, failed, len(bad), bool(bad or bad_failed or bad_labels))


class State:
    """What is already embedded for a cache path: the cache file plus any journal parts.

    check="content" also compares a hash of each file's content with the one recorded when
    it was embedded (rows recorded without one are embedded again).
    """

    def __init__(self, path: Path, settings, option: str = "--out", check: str = "mtime"):
        if check not in CHECKS:
            raise UserError(f"--check must be {' or '.join(CHECKS)}, not {check!r}.")
        self.path, self.settings, self.check = Path(path), settings, check
        self.sources: list[_Source] = []
        self.attrs: dict = {}
        self._digests: dict[str, str] = {}
        _check_file_target(self.path, option)
        if self.path.exists():
            self.attrs = read_attrs(self.path, option)
            if self.attrs.get("settings_key") != settings.key():
                raise UserError(_settings_mismatch(self.path, self.attrs, settings))
            self.sources.append(self._main_source())
        for part in sorted(parts_dir(self.path).glob("part-*.h5")):
            try:
                with h5py.File(part, "r") as f:
                    mine = f.attrs.get("settings_key") == settings.key()
                if mine:
                    self.sources.append(_read_source(part))
            except (OSError, KeyError):
                part.unlink()  # a part is renamed into place only once complete; never here
        # Later sources win: a journal part is newer than the cache it continues.
        # key -> (source, row, fingerprint, digest)
        self.rows: dict[str, tuple[int, int, tuple[int, int], str]] = {}
        self.failed: dict[str, tuple[str, tuple[int, int]]] = {}
        for s, src in enumerate(self.sources):
            for key, r, fp, digest in src.rows:
                self.rows[key] = (s, r, fp, digest)
                self.failed.pop(key, None)
            for key, value in src.failed.items():
                self.failed[key] = value
                self.rows.pop(key, None)

    @property
    def damaged_rows(self) -> int:
        """Rows that failed their checksum (bit rot); they are embedded again."""
        return sum(src.dropped for src in self.sources)

    def _main_source(self) -> _Source:
        try:
            return _read_source(self.path)
        except OSError as e:  # paths or reasons unreadable: nothing in it can be matched
            raise UserError(f"cache {self.path} is damaged beyond repair ({e}); move it aside "
                            "and run featurize again.") from None

    def digest(self, item) -> str:
        if item.key not in self._digests:
            self._digests[item.key] = file_digest(item.path)
        return self._digests[item.key]

    def _reusable(self, item) -> bool:
        done = self.rows.get(item.key)
        if done is None or done[2] != item.fingerprint:
            return False
        return self.check != "content" or (done[3] != "" and done[3] == self.digest(item))

    def todo(self, items) -> list:
        """Items that are new or changed since they were embedded (or failed); with
        check="content" they carry the digest of their content, to be recorded."""
        out = []
        for it in items:
            if self._reusable(it):
                continue
            failed = self.failed.get(it.key)
            if failed is not None and failed[1] == it.fingerprint:
                continue
            # Hashed before decoding: a change after this point shows in the next run.
            out.append(replace(it, digest=self.digest(it)) if self.check == "content" else it)
        return out

    def up_to_date(self, dataset) -> bool:
        """Nothing to embed and nothing to drop, relabel or repair: the file can stay as it is."""
        if not self.path.exists() or len(self.sources) != 1 or self.sources[0].damaged:
            return False
        wanted = {it.key for it in dataset.items}
        return (wanted == set(self.rows) | set(self.failed) and not self.todo(dataset.items)
                and self.attrs.get("labels_digest") == _labels_digest(dataset)
                and bool(self.attrs.get("complete", True)))


def _settings_mismatch(path, attrs, settings) -> str:
    diff = [f"{k}={attrs.get(k)!r} (asked {getattr(settings, k)!r})" for k in SETTINGS_ATTRS
            if str(attrs.get(k)) != str(getattr(settings, k))]
    return (f"{path} holds embeddings made with other settings ({'; '.join(diff) or 'unknown'}); "
            "drop --out to get a file of its own, or choose another --out.")


def _labels_digest(dataset) -> str:
    text = json.dumps([dataset.classes, [(it.key, it.label) for it in dataset.items]])
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


# --- writing ---------------------------------------------------------------------------------

def parts_dir(path: Path) -> Path:
    return Path(str(path) + ".parts")


def _numbers(group, name: str, values, dtype):
    """A checksummed 1-D dataset (fletcher32 needs chunks; 0 rows need a growable shape)."""
    data = np.asarray(values, dtype=dtype)
    group.create_dataset(name, data=data, chunks=(max(1, min(len(data), 1 << 15)),),
                         maxshape=(None,), fletcher32=True)


def _embeddings(f, n: int, dim: int):
    """The checksummed (n, dim) embeddings dataset, in chunks of about _CHUNK_BYTES."""
    rows = max(1, min(n, 256, _CHUNK_BYTES // (4 * max(dim, 1))))
    return f.create_dataset("embeddings", shape=(n, dim), dtype=np.float32,
                            chunks=(rows, max(dim, 1)), maxshape=(None, dim or None),
                            fletcher32=True)


def _write_failed(f, failed: list[tuple[str, str, tuple[int, int]]]):
    g = f.create_group("failed")
    g.create_dataset("paths", data=[k for k, _, _ in failed], dtype=_STR)
    g.create_dataset("reasons", data=[r for _, r, _ in failed], dtype=_STR)
    _numbers(g, "sizes", [fp[0] for _, _, fp in failed], np.int64)
    _numbers(g, "mtimes", [fp[1] for _, _, fp in failed], np.int64)


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
        self.keys, self.fps, self.digests, self.rows, self.failed = [], [], [], [], []
        self.since = time.monotonic()

    def add(self, items, embeddings):
        for it, row in zip(items, embeddings):
            self.keys.append(it.key)
            self.fps.append(it.fingerprint)
            self.digests.append(getattr(it, "digest", ""))
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
                emb = _embeddings(f, len(self.rows), dim)
                if self.rows:
                    emb[...] = np.stack(self.rows)
                f.create_dataset("paths", data=self.keys, dtype=_STR)
                f.create_dataset("digests", data=self.digests, dtype=_STR)
                _numbers(f, "sizes", [fp[0] for fp in self.fps], np.int64)
                _numbers(f, "mtimes", [fp[1] for fp in self.fps], np.int64)
                _write_failed(f, self.failed)
            _fsync_replace(tmp, final)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"cannot write to {self.dir} ({e.strerror or e}); free some space or "
                            "choose another --out. Earlier progress is kept.") from None
        self.next_part += 1
        self._reset()


def commit(path: Path, settings, dataset, provenance: dict, dim: int | None = None,
           complete: bool = True) -> dict:
    """Merge the cache and its journal into a new file for `dataset`, then swap it in.

    Rows of files that are gone or changed are dropped; rows are sorted by path, so the
    result never depends on the order or timing of the work that produced it. `complete`
    False (an interrupted run) is recorded, with the number of images still pending.
    """
    path = Path(path)
    state = State(path, settings)
    if path.exists():  # a run that embedded nothing keeps the versions that made the rows
        old = read_attrs(path, "--out")
        provenance = {**{k: old[k] for k in _CARRIED if k in old}, **provenance}
    current = {it.key: it for it in dataset.items}
    rows = sorted((k, v) for k, v in state.rows.items()
                  if k in current and current[k].fingerprint == v[2])
    failed = sorted((k, r, fp) for k, (r, fp) in state.failed.items()
                    if k in current and current[k].fingerprint == fp)
    attrs = {**_dataset_attrs(settings, dataset), **provenance, "complete": bool(complete),
             "pending": len(current) - len(rows) - len(failed)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    handles = [h5py.File(src.path, "r") for src in state.sources]
    try:
        with h5py.File(tmp, "w") as f:
            _write_rows(f, rows, handles, dim, current, dataset.classes)
            _write_failed(f, failed)
            for k, v in attrs.items():
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


def _dataset_attrs(settings, dataset) -> dict:
    attrs = {"schema_version": SCHEMA_VERSION, "settings": settings.to_json(),
             "settings_key": settings.key()}
    attrs.update({k: getattr(settings, k) for k in SETTINGS_ATTRS})
    attrs.update(dataset_root=str(dataset.root), dataset_name=dataset.name,
                 labels_digest=_labels_digest(dataset),
                 updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return attrs


def _write_rows(f, rows, handles, dim, current, classes):
    """The per-row datasets, embeddings copied block by block from their sources."""
    if dim is None:
        dims = [h["embeddings"].shape[1] for h in handles if h["embeddings"].shape[0]]
        dim = dims[0] if dims else 0
    n = len(rows)
    emb = _embeddings(f, n, dim)
    for start in range(0, n, _MERGE_BLOCK):
        block = rows[start:start + _MERGE_BLOCK]
        out = np.empty((len(block), dim), np.float32)
        by_source: dict[int, list[tuple[int, int]]] = {}
        for i, (_, (s, r, _, _)) in enumerate(block):
            by_source.setdefault(s, []).append((r, i))
        for s, pairs in by_source.items():
            pairs.sort()
            out[[i for _, i in pairs]] = handles[s]["embeddings"][[r for r, _ in pairs]]
        emb[start:start + len(block)] = out
    class_index = {c: i for i, c in enumerate(classes)}
    f.create_dataset("paths", data=[k for k, _ in rows], dtype=_STR)
    _numbers(f, "labels", [class_index.get(current[k].label, -1) for k, _ in rows], np.int32)
    f.create_dataset("classes", data=list(classes), dtype=_STR)
    _numbers(f, "sizes", [v[2][0] for _, v in rows], np.int64)
    _numbers(f, "mtimes", [v[2][1] for _, v in rows], np.int64)
    f.create_dataset("digests", data=[v[3] for _, v in rows], dtype=_STR)
    f.attrs["embedding_dim"] = dim


# --- locking ---------------------------------------------------------------------------------

@contextmanager
def lock(path: Path):
    """One writer per cache: an flock on `<cache>.lock`, which holds "host pid" for the
    message a second run gets. The kernel drops an flock when its process ends, however it
    ends, so a lock left by a dead run is simply free: no guessing from process ids."""
    path = Path(path)
    _check_file_target(path, "--out")
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
    """Temporary files of runs killed while writing; under the lock no other writer exists."""
    pattern = glob.escape(f".{path.name}.tmp-") + "*"
    for tmp in path.parent.glob(pattern):
        tmp.unlink(missing_ok=True)
    pdir = parts_dir(path)
    for tmp in pdir.glob("*.tmp"):
        tmp.unlink(missing_ok=True)
    if pdir.is_dir() and not any(pdir.iterdir()):
        pdir.rmdir()
