"""The cache file's schema and its readers: naming, checks, `read`, `read_attrs`.

Schema 2 (sharded; see featurize/cache/__init__.py for the layout) and schema 1 (one file, all
rows inside; made by earlier versions, still read, migrated by the next featurize run) are
read here; writing is in shards.py (shard files) and index.py (the index file).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from featurize.errors import UserError
from featurize.models.registry import spec_of

SCHEMA_VERSION = 2  # what this version writes; it also reads 1
READABLE = (1, 2)
DEFAULT_DIR = Path("data/cache")
SETTINGS_ATTRS = ("backbone", "weights", "weights_file", "layer", "pooling", "input_size", "crop",
                  "flip", "preprocessing", "precision", "jitter", "resize", "align")
REQUIRED = ("embeddings", "paths", "labels", "classes", "sizes", "mtimes", "failed/paths",
            "failed/reasons", "failed/sizes", "failed/mtimes")  # every reader relies on these
INDEX_REQUIRED = ("shards/names", "shards/runs")  # schema 2: where the rows live
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
    parts = [name, spec_of(settings).short_name]
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
    # Row-info columns (name -> (N,) int8), {} for caches made before they existed: "face",
    # how each row's face was found (featurize.models.align.FACE_CODES: 0 HOG, 1 HOG upsampled,
    # 2 CNN, 3 none found: the fixed central box; -1 not recorded).
    row_info: dict = field(default_factory=dict)

    @property
    def face_found(self) -> np.ndarray | None:
        """How each row's face was found (codes above), or None if not recorded."""
        return self.row_info.get("face")

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
        from featurize.settings import EmbeddingSettings
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
    try:
        problem = _schema_problem(f, path, option)
        if problem:
            raise UserError(problem)
        if int(f.attrs["schema_version"]) >= 2:
            check_index_names(f, path)
    except BaseException:
        f.close()
        raise
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
    if int(version) not in READABLE:
        fix = ("upgrade this package" if int(version) > SCHEMA_VERSION
               else "re-run featurize to rebuild it")
        return (f"{path} has cache schema {int(version)}, this version reads "
                f"{' and '.join(map(str, READABLE))}; {fix}.")
    required = REQUIRED + (INDEX_REQUIRED if int(version) >= 2 else ())
    missing = [name for name in required if not isinstance(f.get(name), h5py.Dataset)]
    if missing:
        return (f"{path} lacks {', '.join(missing)} of the cache schema (damaged, or written by "
                "another program); move it aside and run featurize again to rebuild it.")
    return None


def _strings(ds, start: int = 0, stop: int | None = None) -> list[str]:
    if not len(ds):
        return []
    if h5py.check_string_dtype(ds.dtype) is None:  # not a string dataset: let h5py say
        values = ds[start:stop]
        return [s.decode("utf-8") if isinstance(s, bytes) else s for s in values]
    return ds.asstr()[start:stop].tolist()


def read_range(ds, start: int, stop: int, out=None, offset: int = 0) -> list[int]:
    """Rows start..stop of `ds` into out[offset:] (None: only check them); the rows of `ds` in
    chunks that fail their checksum (zeros in `out`). Memory stays flat without `out`."""
    if out is None and stop - start > _MERGE_BLOCK:
        return [r for s in range(start, stop, _MERGE_BLOCK)
                for r in read_range(ds, s, min(s + _MERGE_BLOCK, stop))]
    if _read_into(ds, start, stop, out, offset):
        return []
    chunk = ds.chunks[0] if ds.chunks else max(stop - start, 1)
    bad, s = [], start
    while s < stop:  # find the damaged chunks
        e = min((s // chunk + 1) * chunk, stop)
        if not _read_into(ds, s, e, out, offset + s - start):
            bad.extend(range(s, e))
            if out is not None:
                out[offset + s - start:offset + e - start] = 0
        s = e
    return bad


def _read_into(ds, start: int, stop: int, out, offset: int) -> bool:
    if stop <= start:
        return True
    try:  # HDF5's "filter returned failure during read" (an OSError) is a checksum mismatch
        if out is None:
            ds[start:stop]
        else:
            ds.read_direct(out, np.s_[start:stop], np.s_[offset:offset + stop - start])
    except OSError:
        return False
    return True


def _read_checked(ds) -> tuple[np.ndarray, list[int]]:
    """A whole dataset and the rows that fail their checksum (zeros)."""
    out = np.empty(ds.shape, ds.dtype)
    return out, read_range(ds, 0, ds.shape[0] if ds.shape else 0, out)


def damaged_rows(ds) -> list[int]:
    """Rows of `ds` in chunks that fail their checksum, read without keeping them."""
    if not ds.fletcher32:
        return []  # a cache written before the checksums: nothing to check against
    return read_range(ds, 0, ds.shape[0])


def is_sharded(attrs: dict) -> bool:
    return int(attrs.get("schema_version", 1)) >= 2


@dataclass
class _Rows:
    """The per-row data of a cache, read from its shards (schema 2) or from itself (1)."""

    embeddings: np.ndarray
    paths: list[str]
    sizes: np.ndarray
    mtimes: np.ndarray
    damaged: list[int]
    info: dict = field(default_factory=dict)  # row-info columns, name -> (N,) int8


def shard_table(f, path=None) -> tuple[list[str], np.ndarray]:
    """An index's shard files (relative to its folder) and its runs: (shard, start, stop)
    rows, in the cache's row order. With `path` (the index's), every name is checked
    (`shard_file`)."""
    names = _strings(f["shards/names"])
    for name in names if path is not None else ():
        shard_file(path, name)
    return names, f["shards/runs"][()].reshape(-1, 3)


# --- names an index gives: data, checked before any file is opened or removed --------------

_SHARD_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.h5")  # part-..., merged-..., work-...
_SHARD_FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.shards")


def damaged(path, what) -> UserError:
    """The one-line error of a cache whose content cannot be trusted."""
    return UserError(f"cache {path} is damaged ({what}); move it aside and run featurize "
                     "again.")


def shard_file(path, name: str, remove: bool = False) -> Path | None:
    """The file that the name `name`, read from the index at `path`, stands for; anything but a
    shard file's name is a damaged index (a UserError), so no file elsewhere is ever read,
    written or removed. A name is `FOLDER.shards/FILE.h5` (or `FILE.h5`), relative to the
    index's folder: plain names (no separator, no `..`, not absolute, not hidden) that resolve
    inside that folder. `remove`: the file to delete, or None where it is not in this
    cache's own shards folder (`CACHE.h5.shards/`; a copied cache's other folder is kept)."""
    index = Path(path)
    parts = name.split("/") if isinstance(name, str) else []
    plain = (0 < len(parts) <= 2 and ".." not in name and "\\" not in name and "\0" not in name
             and _SHARD_FILE.fullmatch(parts[-1]) is not None
             and (len(parts) == 1 or _SHARD_FOLDER.fullmatch(parts[0]) is not None))
    if not plain:
        raise damaged(path, f"its index names {name!r} as a shard file, which is not a plain "
                            f"file name inside {shards_folder_name(index)}/: nothing was read "
                            "or removed")
    folder = index.parent / parts[0] if len(parts) == 2 else index.parent
    file = folder / parts[-1]
    if os.path.realpath(file) != os.path.join(os.path.realpath(folder), parts[-1]):
        raise damaged(path, f"its shard {name!r} is a link out of {folder}: nothing was read "
                            "or removed")
    if remove and (len(parts) != 2 or parts[0] != shards_folder_name(index)):
        return None
    return file


def shards_folder_name(path) -> str:
    return Path(path).name + ".shards"


def check_index_names(f: h5py.File, path) -> None:
    """Every file name an index gives (shards/names, shards/retired, the sources of its
    virtual datasets) passes `shard_file`: checked when the index is opened, before any
    of them is read."""
    names = set(_strings(f["shards/names"])) if "shards/names" in f else set()
    if "shards/retired" in f:
        names.update(_strings(f["shards/retired"]))
    f.visititems(lambda _, obj: names.update(_virtual_files(obj)))
    for name in sorted(names):
        shard_file(path, name)


def _virtual_files(obj) -> set[str]:
    if not isinstance(obj, h5py.Dataset) or not obj.is_virtual:
        return set()
    plist = obj.id.get_create_plist()
    return {plist.get_virtual_filename(i) for i in range(plist.get_virtual_count())}


def _read_shards(f, path: Path) -> _Rows:
    """Every live row, run by run, straight into one array per dataset."""
    names, runs = shard_table(f)
    n, dim = f["embeddings"].shape
    rows = _Rows(np.empty((n, dim), np.float32), [], np.empty(n, np.int64),
                 np.empty(n, np.int64), [])
    handles: dict[int, h5py.File] = {}
    try:
        offset = 0
        for s, start, stop in runs.tolist():
            if s not in handles:
                handles[s] = open_shard(path, names[s])
            h = handles[s]
            for name, out in (("embeddings", rows.embeddings), ("sizes", rows.sizes),
                              ("mtimes", rows.mtimes)):
                bad = read_range(h[name], start, stop, out, offset)
                rows.damaged.extend(offset + r - start for r in bad)
            rows.paths.extend(_strings(h["paths"], start, stop))
            for column in h["info"] if "info" in h else ():
                if column not in rows.info:  # rows of shards without it: -1, not recorded
                    rows.info[column] = np.full(n, -1, np.int8)
                rows.info[column][offset:offset + stop - start] = h["info"][column][start:stop]
            offset += stop - start
    finally:
        for h in handles.values():
            h.close()
    return rows


def check_shards(f: h5py.File, path) -> None:
    """Every shard the index lists is there: a virtual dataset reads a missing source as its
    fill values (NaN embeddings, empty paths, zero sizes) without an error, so a reader that
    slices `embeddings` directly checks this first."""
    if "shards" in f:
        for name in _strings(f["shards/names"]):
            if not shard_file(path, name).is_file():
                open_shard(path, name).close()  # raises its one-line message


def open_shard(path: Path, name: str) -> h5py.File:
    """A shard file the index at `path` lists; missing or unreadable is a UserError."""
    shard = shard_file(path, name)
    try:
        return h5py.File(shard, "r")
    except (OSError, FileNotFoundError):
        what = "is missing" if not shard.exists() else "cannot be read"
        raise UserError(f"cache {path}: its shard {shard} {what}; a cache is its file plus its "
                        f"shards folder, moved or copied together (run featurize again to "
                        "re-embed the rows it held).") from None


def _read_single(f) -> _Rows:
    emb, bad_emb = _read_checked(f["embeddings"])
    sizes, bad_sizes = _read_checked(f["sizes"])
    mtimes, bad_mtimes = _read_checked(f["mtimes"])
    damaged = sorted(set(bad_emb) | set(bad_sizes) | set(bad_mtimes))
    return _Rows(np.asarray(emb, np.float32), _strings(f["paths"]), sizes, mtimes, damaged)


def read(path, option: str = "--cache", strict: bool = True) -> Cache:
    """Read and check a whole cache; a damaged one is a UserError, never a wrong result.

    With strict=False (featurize verify) rows that fail their checksum come back as zeros,
    listed in `damaged`, and rows with NaN or Inf are returned as they are.
    """
    with _open(path, option) as f:
        attrs = _attrs(f)
        try:
            rows = _read_shards(f, Path(path)) if is_sharded(attrs) else _read_single(f)
            labels, bad_labels = _read_checked(f["labels"])
            classes = _strings(f["classes"])
            failed = dict(zip(_strings(f["failed/paths"]), _strings(f["failed/reasons"])))
        except OSError as e:
            raise damaged(path, e) from None
    emb, labels = rows.embeddings, np.asarray(labels, dtype=np.int64)
    bad_rows = sorted(set(rows.damaged) | set(bad_labels))
    labels[bad_labels] = -1
    n, paths = len(emb), rows.paths
    if emb.ndim != 2 or len(paths) != n or len(labels) != n or len(rows.sizes) != n:
        raise UserError(f"cache {path} is inconsistent ({n} embeddings, {len(paths)} paths, "
                        f"{len(labels)} labels); move it aside and run featurize again.")
    if n and (labels.max() >= len(classes) or labels.min() < -1):
        raise UserError(f"cache {path} has labels outside its {len(classes)} classes; move it "
                        "aside and run featurize again.")
    if strict and bad_rows:
        raise UserError(damage_message(path, len(bad_rows), paths[bad_rows[0]],
                                       attrs.get("dataset_root", "its dataset")))
    if strict and n and (bad := _nonfinite_rows(emb)):
        raise UserError(f"cache {path} has {bad} rows with NaN or Inf; check it with "
                        f"python -m featurize verify {path}, then re-run featurize.")
    return Cache(Path(path), emb, paths, labels, classes, attrs, failed, bad_rows, rows.sizes,
                 rows.mtimes, row_info=rows.info)


def _nonfinite_rows(emb: np.ndarray) -> int:
    """Rows holding a NaN or an Inf: a row's float64 sum is then NaN or Inf (float32 values
    cannot overflow it), found in one pass without an N x D temporary."""
    return int((~np.isfinite(emb.sum(axis=1, dtype=np.float64))).sum())


def damage_message(path, count: int, first: str, root: str) -> str:
    return (f"cache {path}: {count} row(s) fail their checksum (the file was damaged on disk; "
            f"first: {first}); run featurize on {root} again with the same options: it embeds "
            f"those images again (python -m featurize verify {path} lists them).")


def _attrs(f) -> dict:
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def read_attrs(path, option: str = "--cache") -> dict:
    with _open(path, option) as f:
        return _attrs(f)


