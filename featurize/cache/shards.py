"""Shard files: immutable HDF5 files of embedded rows, each written once and renamed into place.

A shard holds `embeddings` (n, D), `paths`, `sizes`, `mtimes`, `digests` (rows sorted by path),
`info/<name>` (row-info columns, when the extractor declares some) and `failed/*` (images
that could not be used), with attrs `settings_key` and `seq` (when it was written, in ns:
later shards win over earlier ones for the same path). A run journals its
progress as shards; Ray workers write theirs directly. The index (index.py) lists the live rows
of each shard; a complete shard it does not list yet is progress to fold in at the next commit.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from featurize import atomic
from featurize.cache.schema import (
    _CHUNK_BYTES,
    _MERGE_BLOCK,
    _STR,
    _read_checked,
    _strings,
    damaged_rows,
    read_range,
)
from featurize.errors import UserError

_names = itertools.count()


def shards_dir(path) -> Path:
    """Where the shards of the cache at `path` are written: `<cache>.shards/`."""
    return Path(str(path) + ".shards")


@dataclass
class ShardRows:
    """What one shard holds, in memory, in any order (write_shard sorts it by path)."""

    keys: list[str] = field(default_factory=list)
    fingerprints: list[tuple[int, int]] = field(default_factory=list)  # (size, mtime ns)
    digests: list[str] = field(default_factory=list)  # "" unless --check content
    embeddings: np.ndarray | None = None  # (n, D) float32
    failed: list[tuple[str, str, tuple[int, int]]] = field(default_factory=list)  # key, why, fp
    # Row-info columns the extractor declares (name -> one int8 code per row), e.g. "face":
    # how the face was found (featurize.models.align.FACE_CODES). Written as `info/<name>`.
    info: dict[str, list[int]] = field(default_factory=dict)


def numbers(group, name: str, values, dtype):
    """A checksummed 1-D dataset (fletcher32 needs chunks; 0 rows need a growable shape)."""
    data = np.asarray(values, dtype=dtype)
    group.create_dataset(name, data=data, chunks=(max(1, min(len(data), 1 << 15)),),
                         maxshape=(None,), fletcher32=True)


def embeddings_dataset(f, n: int, dim: int):
    """The checksummed (n, dim) embeddings dataset, in chunks of about _CHUNK_BYTES."""
    rows = max(1, min(n, 256, _CHUNK_BYTES // (4 * max(dim, 1))))
    return f.create_dataset("embeddings", shape=(n, dim), dtype=np.float32,
                            chunks=(rows, max(dim, 1)), maxshape=(None, dim or None),
                            fletcher32=True)


def write_failed(f, failed: list[tuple[str, str, tuple[int, int]]]):
    g = f.create_group("failed")
    g.create_dataset("paths", data=[k for k, _, _ in failed], dtype=_STR)
    g.create_dataset("reasons", data=[r for _, r, _ in failed], dtype=_STR)
    numbers(g, "sizes", [fp[0] for _, _, fp in failed], np.int64)
    numbers(g, "mtimes", [fp[1] for _, _, fp in failed], np.int64)


def write_shard(cache_path, name: str, settings, rows: ShardRows) -> Path:
    """Write `rows` as the shard `<cache>.shards/<name>.h5`, atomically (a temporary file
    renamed into place); writing the same name again replaces it whole."""
    order = sorted(range(len(rows.keys)), key=rows.keys.__getitem__)
    emb = rows.embeddings if rows.embeddings is not None else np.zeros((0, 0), np.float32)
    emb = np.asarray(emb, np.float32)
    emb = emb[order] if order else np.zeros((0, emb.shape[1] if emb.ndim == 2 else 0), np.float32)

    def fill(f):
        out = embeddings_dataset(f, len(order), emb.shape[1] if emb.ndim == 2 else 0)
        if order:
            out[...] = emb
        f.create_dataset("paths", data=[rows.keys[i] for i in order], dtype=_STR)
        f.create_dataset("digests", data=[(rows.digests or [""] * len(order))[i]
                                          for i in order], dtype=_STR)
        numbers(f, "sizes", [rows.fingerprints[i][0] for i in order], np.int64)
        numbers(f, "mtimes", [rows.fingerprints[i][1] for i in order], np.int64)
        write_failed(f, sorted(rows.failed))
        write_info(f, {name: [codes[i] for i in order] for name, codes in rows.info.items()})
    return _write_file(cache_path, name, settings, fill)


def write_info(f, info: dict):
    """The row-info columns (int8 codes, checksummed) under `info/`."""
    if info:
        g = f.create_group("info")
        for name, codes in info.items():
            numbers(g, name, codes, np.int8)


def read_info(f) -> dict[str, np.ndarray]:
    """A shard's row-info columns (none in shards written before they existed)."""
    g = f.get("info")
    return {name: g[name][()] for name in g} if g is not None else {}


def _write_file(cache_path, name: str, settings, fill) -> Path:
    folder = shards_dir(cache_path)
    final = folder / f"{name}.h5"
    tmp = folder / f".{name}.tmp-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with h5py.File(tmp, "w") as f:
            f.attrs["settings_key"] = settings.key()
            f.attrs["seq"] = time.time_ns()
            fill(f)
        atomic.replace(tmp, final)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write to {folder} ({e.strerror or e}); free some space or "
                        "choose another --out. Earlier progress is kept.") from None
    except BaseException:  # Ctrl-C or SIGTERM mid-write: no half file left behind
        tmp.unlink(missing_ok=True)
        raise
    return final


def new_name(prefix: str) -> str:
    """A shard name no other writer uses: prefix, time, process and a counter."""
    return f"{prefix}-{time.time_ns():020d}-{os.getpid()}-{next(_names)}"


def write_merged(cache_path, settings, members, dim: int) -> tuple[Path, int]:
    """One shard of the given rows of other shards, sorted by path, copied block by block
    (memory stays flat). `members`: (source, positions) pairs, a source being a `Source`.
    Returns the new file and its row count."""
    rows = sorted((src.keys[i], k, i) for k, (src, positions) in enumerate(members)
                  for i in positions)

    def fill(f):
        handles = [h5py.File(src.path, "r") for src, _ in members]
        try:
            out = embeddings_dataset(f, len(rows), dim)
            for start in range(0, len(rows), _MERGE_BLOCK):
                out[start:start + _MERGE_BLOCK] = _gather(rows[start:start + _MERGE_BLOCK],
                                                          members, handles, dim)
        finally:
            for h in handles:
                h.close()
        f.create_dataset("paths", data=[key for key, _, _ in rows], dtype=_STR)
        digests = [src.digest_list() for src, _ in members]
        f.create_dataset("digests", data=[digests[k][i] for _, k, i in rows], dtype=_STR)
        numbers(f, "sizes", [members[k][0].sizes[i] for _, k, i in rows], np.int64)
        numbers(f, "mtimes", [members[k][0].mtimes[i] for _, k, i in rows], np.int64)
        write_failed(f, [])
        write_info(f, _merged_info(rows, members))
    return _write_file(cache_path, new_name("merged"), settings, fill), len(rows)


def _merged_info(rows, members) -> dict:
    """The row-info columns of merged rows; -1 for rows of shards without the column."""
    columns = []
    for src, _ in members:
        with h5py.File(src.path, "r") as f:
            columns.append(read_info(f))
    names = sorted({name for c in columns for name in c})
    return {name: [int(columns[k][name][members[k][0].rows[i]]) if name in columns[k] else -1
                   for _, k, i in rows] for name in names}


def _gather(block, members, handles, dim: int) -> np.ndarray:
    """The embeddings of `block` ((key, member, position) rows), read per source file."""
    out = np.empty((len(block), dim), np.float32)
    by_member: dict[int, list[tuple[int, int]]] = {}
    for j, (_, k, i) in enumerate(block):
        by_member.setdefault(k, []).append((members[k][0].rows[i], j))
    for k, pairs in by_member.items():
        pairs.sort()  # h5py reads increasing row lists only
        out[[j for _, j in pairs]] = handles[k]["embeddings"][[r for r, _ in pairs]]
    return out


# --- reading a shard as a source of rows for the next commit ---------------------------------

@dataclass
class Source:
    """The trusted rows of one shard (or of a schema-1 cache file): rows failing their checksum
    are left out, so they are embedded again. Positions index keys/rows/sizes/..."""

    path: Path
    name: str  # as the index lists it: relative to the index's folder
    keys: list[str]
    rows: list[int]  # row in the file
    sizes: list[int]
    mtimes: list[int]
    digests: list[str] | None  # None until digest_list() reads them
    failed: dict[str, tuple[str, tuple[int, int]]]
    seq: int = 0
    file_rows: int = 0  # rows in the file, live or not
    dim: int = 0
    dropped: int = 0  # rows left out because they fail their checksum
    damaged: bool = False  # something fails its checksum, or the file is gone
    listed: bool = False  # in the index (else: progress not committed yet)
    info_names: tuple[str, ...] = ()  # its row-info columns

    def digest_list(self) -> list[str]:
        """The content digest of each row ("" where none was recorded), read once."""
        if self.digests is None:
            self.digests = [""] * len(self.keys)
            if self.keys:
                with h5py.File(self.path, "r") as f:
                    if "digests" in f and f["digests"].shape[0] == self.file_rows:
                        every = _strings(f["digests"])  # made before --check content: none
                        self.digests = [every[r] for r in self.rows]
        return self.digests


def read_source(path: Path, name: str, live=None, scan: bool = True,
                failures: bool = True) -> Source:
    """The rows of a shard; `live`: the (start, stop) runs the index keeps (None: all rows);
    `scan`: also check the embeddings' checksums (reads them all). Digests are read when
    first needed (`Source.digest_list`)."""
    with h5py.File(path, "r") as f:
        n, dim = f["embeddings"].shape
        keep = np.zeros(n, bool)
        for start, stop in (live if live is not None else [(0, n)]):
            keep[start:stop] = True
        sizes, bad_sizes = _read_checked(f["sizes"])
        mtimes, bad_mtimes = _read_checked(f["mtimes"])
        bad = set(bad_sizes) | set(bad_mtimes)
        if scan:
            bad |= set(_scan_live(f["embeddings"], live, n))
        keep[list(bad)] = False
        keys = _strings(f["paths"])
        failed, bad_failed = _read_failed(f) if failures else ({}, False)
        seq = int(f.attrs.get("seq", 0))
        info_names = tuple(sorted(f["info"])) if "info" in f else ()
    if keep.all():  # the common case, without a per-row copy
        rows, sizes, mtimes = range(n), sizes.tolist(), mtimes.tolist()
    else:
        rows = np.flatnonzero(keep).tolist()
        keys, sizes, mtimes = [keys[r] for r in rows], sizes[rows].tolist(), mtimes[rows].tolist()
    return Source(path, name, keys, list(rows), sizes, mtimes, None, failed, seq, n, dim,
                  len(bad), bool(bad or bad_failed), info_names=info_names)


def _scan_live(ds, live, n: int) -> list[int]:
    if live is None:
        return damaged_rows(ds)
    if not ds.fletcher32:
        return []
    return [r for start, stop in live for r in read_range(ds, start, stop)]


def _read_failed(f) -> tuple[dict, bool]:
    fk, freasons = _strings(f["failed/paths"]), _strings(f["failed/reasons"])
    fsizes, bad_fs = _read_checked(f["failed/sizes"])
    fmtimes, bad_fm = _read_checked(f["failed/mtimes"])
    bad = set(bad_fs) | set(bad_fm)
    failed = {k: (r, (int(s), int(m)))
              for j, (k, r, s, m) in enumerate(zip(fk, freasons, fsizes, fmtimes)) if j not in bad}
    return failed, bool(bad)


class Journal:
    """Progress of a local run: finished batches become shards of about `flush_rows` rows
    (or 30 s of work), so a killed run loses at most one and the next run resumes."""

    def __init__(self, path: Path, settings, flush_rows=1024, flush_seconds=30.0):
        self.path, self.dir = Path(path), shards_dir(path)
        self.settings = settings
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self._reset()

    def _reset(self):
        self.rows = ShardRows()
        self.vectors: list[np.ndarray] = []
        self.since = time.monotonic()

    def add(self, items, embeddings, info: dict | None = None):
        """Rows of `items`; `info`: their row-info columns (name -> one code per item)."""
        for name, codes in (info or {}).items():
            column = self.rows.info.setdefault(name, [-1] * (len(self.rows.keys)))
            column.extend(int(c) for c in codes)
        for it, row in zip(items, embeddings):
            self.rows.keys.append(it.key)
            self.rows.fingerprints.append(it.fingerprint)
            self.rows.digests.append(getattr(it, "digest", ""))
            self.vectors.append(np.asarray(row, dtype=np.float32))
        for column in self.rows.info.values():  # a batch without a column: -1, unknown
            column.extend([-1] * (len(self.rows.keys) - len(column)))
        if (len(self.rows.keys) >= self.flush_rows
                or time.monotonic() - self.since > self.flush_seconds):
            self.flush()

    def fail(self, item, reason: str):
        self.rows.failed.append((item.key, reason, item.fingerprint))

    def flush(self):
        if not self.rows.keys and not self.rows.failed:
            return
        if self.vectors:
            self.rows.embeddings = np.stack(self.vectors)
        write_shard(self.path, new_name("part"), self.settings, self.rows)
        self._reset()
