"""`python -m classify search`: the gallery rows of a cache most similar to new images.

Cosine distance (1 - cosine similarity) between the query embeddings and every row of the
cache. Up to `EXACT_MAX_ROWS` rows the search is exact: normalised float32 products, the
cache read block by block (`BLOCK_ROWS` rows at a time), so memory stays bounded whatever
its size. Above it, an approximate index answers (faiss's inverted lists, IndexIVFFlat; the
`search` extra installs faiss-cpu): built once, kept beside the cache in `CACHE.h5.search/`,
named by a key of the cache's content (its settings, shard files and the runs of their rows,
all in the small index file: no embedding is read to compute it) and of the index's
parameters. Every commit that changes a row changes the key, so a stale index is never used;
an index is written under a temporary name and renamed into place, and the index files of
older keys are removed then. A file found there is data, not trusted: it is used only when
its record (`ivfflat-<key>.json`: the key, the row count, the file's SHA-256) matches and a
few stored rows, picked at random, find themselves first in it; otherwise it is built again
with a warning. Only the names this module makes are ever removed or replaced.
`EXACT_MAX_ROWS` and the library were chosen by `benchmarks/search.py` (see the README's
"Gallery search").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from featurize import atomic, cache as cache_io
from featurize.errors import OptionError, UserError, check_range

EXACT_MAX_ROWS = 50_000  # above this many rows, an approximate index (benchmarks/search.py)
BLOCK_ROWS = 16_384  # gallery rows read and compared at a time (32 MB at 512-D)
QUERY_ROWS = 256  # queries compared at a time: a block's scores stay under 16 MB
LISTS_PER_SQRT_ROW = 4  # inverted lists: 4 sqrt(N), faiss's guideline for IVF
TRAIN_PER_LIST = 64  # rows sampled per list to train the coarse quantiser (faiss wants >= 39)
MIN_PER_LIST = 39  # fewer training rows per list and faiss's k-means warns
NPROBE = 64  # lists scanned per query: recall@10 0.984 on LFW, 1.0 on 1M synthetic rows
INDEX_LIBRARY = "faiss-cpu"  # the package; the module is `faiss`
INSTALL_HINT = "pip install 'featurize-embeddings[search]'"
METHODS = ("auto", "exact", "approximate")
# A stored index proves it is the cache's: a record beside it and a self-check of a few rows.
RECORD_FORMAT = "classify-search-index/1"
RECORD_MAX_BYTES = 1 << 16  # a record is a few hundred bytes; anything larger is not ours
INDEX_FILE_NAME = re.compile(r"ivfflat-[0-9a-f]{16}\.(faiss|json)")  # the only names removed
SELF_CHECK_ROWS = 4  # stored rows that must find themselves in a stored index before it is used
SELF_CHECK_K = 16  # neighbours looked at (identical rows tie at distance 0)
SELF_CHECK_NPROBE = 16  # lists scanned by the self-check (its own list comes first)
SELF_MATCH_DISTANCE = 1e-4  # a unit row's cosine distance to itself, float32 rounding included


@dataclass(frozen=True)
class SearchOptions:
    """How a gallery is searched: `k` neighbours per query; `method` "auto" (exact up to
    `exact_max_rows` gallery rows, an approximate index above), "exact" or "approximate";
    `nprobe`, the approximate index's lists scanned per query (more: higher recall, slower);
    `batch_size` and `workers` for embedding query images."""

    k: int = 10
    method: str = "auto"
    exact_max_rows: int = EXACT_MAX_ROWS
    nprobe: int = NPROBE
    batch_size: int = 32
    workers: int | None = None

    def __post_init__(self):
        check_range("k", self.k, 1)
        check_range("exact_max_rows", self.exact_max_rows, 0)
        check_range("nprobe", self.nprobe, 1)
        check_range("batch_size", self.batch_size, 1)
        check_range("workers", self.workers, 1)
        if self.method not in METHODS:
            raise OptionError("method", f"must be {', '.join(METHODS)}, not {self.method!r}.")


class Gallery:
    """The rows of a cache file, searchable by cosine distance. `Gallery(cache)` reads only
    the index file's small datasets; `search(queries, k)` takes image files and folders
    (embedded exactly as the cache's images were) or an (N, D) array of embeddings, and
    `nearest(X, k)` gives arrays (rows, distances) for embeddings."""

    def __init__(self, cache, options: SearchOptions | None = None, *, log=None, **settings):
        if options is None:
            options = SearchOptions(**settings)
        elif settings:
            raise TypeError("pass either options=SearchOptions(...) or its fields, not both")
        self.options = options
        self.path = Path(getattr(cache, "path", cache))
        self.key = None
        self._extractor = None
        self._log = log or (lambda message: None)  # e.g. "building the index" (CLI: stderr)
        self._warn = log or _warning  # e.g. a stored index that is not this cache's
        self._refresh()

    def _refresh(self) -> None:
        """Read the cache's shape, classes and content key; when the key changed (a
        featurize run committed since), forget the index of the old content."""
        self.attrs = cache_io.read_attrs(self.path)
        with cache_io.schema._open(self.path) as f:
            cache_io.schema.check_shards(f, self.path)  # not zeros for a missing shard
            key = content_key(f, self.path, self.attrs)
            if key == self.key:
                return
            self.rows, self.dim = (int(n) for n in f["embeddings"].shape)
            self.classes = cache_io.schema._strings(f["classes"])
        if self.rows == 0:
            raise UserError(f"cache {self.path} has no rows to search; run featurize on its "
                            "images first.")
        self.key, self.notes = key, []
        self.method = self._choose_method()
        self.index_path: Path | None = None
        self.built = False  # whether this Gallery built its index (rather than reusing one)
        self._index = None

    def _choose_method(self) -> str:
        method = self.options.method
        if method == "auto":
            method = "exact" if self.rows <= self.options.exact_max_rows else "approximate"
        if method == "approximate" and not _faiss_installed():
            if self.options.method == "approximate":
                raise UserError(f"--method approximate needs {INDEX_LIBRARY}: "
                                f"{INSTALL_HINT}, or use --method exact.")
            self.notes.append(f"the cache has {self.rows:,} rows, above the exact search's "
                              f"{self.options.exact_max_rows:,}, but {INDEX_LIBRARY} is not "
                              f"installed ({INSTALL_HINT}); searching exactly.")
            method = "exact"
        return method

    def nearest(self, X, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest rows of each query embedding: (rows, distances), both (N, k') with
        k' = min(k, rows), nearest first; distances are cosine distances."""
        k = check_range("k", self.options.k if k is None else k, 1)
        self._refresh()  # a Gallery kept while featurize adds rows searches the new rows
        Q = _unit_rows(self._queries(X))
        k = min(k, self.rows)
        if self.method == "exact":
            return exact_search(self.path, Q, k)
        return self._approximate(Q, k)

    def search(self, queries, k: int | None = None) -> list[dict]:
        """One dict per query: `query` (its path, or its row number in an array), and
        `neighbours` (`row`, `path`, `label`, `distance`), or an `error` for an image that
        cannot be used."""
        if _are_inputs(queries):
            given, keys, X, failed = self._embed(queries)
        else:
            X = self._queries(queries)
            keys, failed = list(range(len(X))), []
            given = keys
        results = [{"query": key, "error": reason} for key, reason in failed]
        if len(X):
            rows, distances = self.nearest(X, k)
            paths, labels = self._describe(np.unique(rows[rows >= 0]))
            for key, r, d in zip(keys, rows.tolist(), distances.tolist()):
                results.append({"query": key, "neighbours": [  # -1: a row with NaN, left out
                    {"row": j, "path": paths[j], "label": labels[j], "distance": dist}
                    for j, dist in zip(r, d) if j >= 0]})
        order = {key: n for n, key in enumerate(given)}
        return sorted(results, key=lambda r: order[r["query"]])

    def _queries(self, X) -> np.ndarray:
        try:
            X = np.asarray(X, dtype=np.float32)
        except (TypeError, ValueError):
            X = None
        if X is not None and X.ndim == 1 and len(X) == self.dim:
            X = X[None]
        if X is None or X.ndim != 2 or X.shape[1] != self.dim:
            shape = "nothing usable" if X is None else f"an array of shape {X.shape}"
            raise UserError(f"give image paths or an (N, {self.dim}) array of embeddings made "
                            f"with the settings of {self.path.name}, not {shape}.")
        if not np.isfinite(X).all():
            raise UserError("the query embeddings hold NaN or Inf; embed the images again.")
        return X

    def _embed(self, inputs):
        """Image files and folders through the cache's own extractor: (every key, in the
        order given, folders expanded; the keys embedded; their rows; (key, reason) of the
        images that cannot be used)."""
        from featurize.data.images import collect
        from featurize.engines.pipeline import batches
        from featurize.runtimes import build_extractor
        from featurize.settings import EmbeddingSettings
        items = collect([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)
        if self._extractor is None:  # built once: loading a backbone takes seconds
            self._extractor = build_extractor(
                EmbeddingSettings.from_json(self.attrs["settings"]), cache_attrs=self.attrs)
        keys, rows, failed = [], [], []
        for batch in batches(items, self._extractor, self.options.batch_size,
                             self.options.workers):
            failed += [(item.key, reason) for item, reason in batch.failed]
            if batch.items:
                keys += [item.key for item in batch.items]
                rows.append(np.asarray(batch.embeddings, np.float32))
        X = np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float32)
        return [item.key for item in items], keys, X, failed

    def _describe(self, rows: np.ndarray) -> tuple[dict, dict]:
        """{row: path} (joined to the dataset's root, so it can be opened) and {row: label}
        of the given rows, read without the embeddings."""
        root = self.attrs.get("dataset_root") or ""
        with cache_io.schema._open(self.path) as f:
            if content_key(f, self.path, self.attrs) != self.key:
                raise UserError(f"cache {self.path} changed during the search; run it again.")
            idx = np.sort(rows)
            names = [p.decode() if isinstance(p, bytes) else p for p in f["paths"][idx]]
            labels = f["labels"][idx]
        paths = {int(r): _full_path(root, p) for r, p in zip(idx, names)}
        return paths, {int(r): (self.classes[int(c)] if c >= 0 else None)
                       for r, c in zip(idx, labels)}

    def _approximate(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._index is None:
            self._index, self.index_path, self.built = load_or_build_index(
                self.path, self.key, self.rows, self.dim, self._log, self._warn)
        rows, distances = ivf_search(self._index, Q, k, self.options.nprobe)
        rows[rows >= self.rows] = -1  # never a row the cache does not have
        return rows, distances


# --- exact search ------------------------------------------------------------------------------

def exact_search(path, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of unit queries Q in the cache at `path`, reading its rows block
    by block; a row whose stored numbers are not finite is never returned."""
    n_q = len(Q)
    best_sim = np.full((n_q, k), -np.inf, np.float32)
    best_row = np.full((n_q, k), -1, np.int64)
    with cache_io.schema._open(path) as f:
        ds = f["embeddings"]
        for start in range(0, ds.shape[0], BLOCK_ROWS):
            block = _read_block(path, ds, start, min(start + BLOCK_ROWS, ds.shape[0]))
            unusable = ~np.isfinite(block).all(axis=1)
            for q in range(0, n_q, QUERY_ROWS):
                sim = Q[q:q + QUERY_ROWS] @ block.T
                sim[:, unusable] = -np.inf
                _merge_top(best_sim[q:q + QUERY_ROWS], best_row[q:q + QUERY_ROWS], sim, start)
    return best_row, np.maximum(1.0 - best_sim, 0).astype(np.float32)  # not -1e-7


def _read_block(path, ds, start: int, stop: int) -> np.ndarray:
    try:
        block = ds[start:stop]
    except OSError:  # HDF5's checksum failure: the file was damaged on disk
        raise UserError(f"cache {path}: rows {start}-{stop - 1} include some that fail their "
                        f"checksum; python -m featurize verify {path} names them, and running "
                        "featurize again on its dataset re-embeds them.") from None
    return _unit_rows(block)


def _merge_top(best_sim, best_row, sim, offset: int) -> None:
    """Fold a block's similarities into the running top k (in place, best first)."""
    k = best_sim.shape[1]
    if sim.shape[1] > k:  # only each query's k best of the block can enter the top k
        part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        sim, cols = np.take_along_axis(sim, part, axis=1), part
    else:
        cols = np.broadcast_to(np.arange(sim.shape[1]), sim.shape)
    all_sim = np.concatenate([best_sim, sim], axis=1)
    all_row = np.concatenate([best_row, cols + offset], axis=1)
    order = np.argsort(-all_sim, axis=1, kind="stable")[:, :k]
    best_sim[:] = np.take_along_axis(all_sim, order, axis=1)
    best_row[:] = np.take_along_axis(all_row, order, axis=1)


def _unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero: similarity 0 to everything)."""
    X = np.asarray(X, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        norms = np.linalg.norm(X, axis=1, keepdims=True)
        return X / np.where(norms > 0, norms, 1).astype(np.float32)


# --- the approximate index -------------------------------------------------------------------

def content_key(f: h5py.File, path: Path, attrs: dict) -> str:
    """A key of the rows of an open cache index: its settings, its shard files (immutable,
    uniquely named) with their sizes, and the runs of their rows, in order. A schema-1 cache
    (every row in the file itself): its size and modification time."""
    h = hashlib.sha256(str(attrs.get("settings_key", "")).encode())
    if cache_io.is_sharded(attrs):
        names, runs = cache_io.schema.shard_table(f)
        for name in names:
            shard = path.parent / name
            h.update(f"{name}:{shard.stat().st_size if shard.exists() else -1};".encode())
        h.update(np.ascontiguousarray(runs, np.int64).tobytes())
    else:
        st = path.stat()
        h.update(f"schema1:{st.st_size}:{st.st_mtime_ns}".encode())
    params = (INDEX_LIBRARY, _library_version(), "IVFFlat", LISTS_PER_SQRT_ROW, TRAIN_PER_LIST)
    h.update(json.dumps(params).encode())
    return h.hexdigest()[:16]


def index_dir(path) -> Path:
    """Where a cache's search indexes live: beside its shards, moved with it."""
    path = Path(path)
    return path.with_name(path.name + ".search")


def load_or_build_index(path: Path, key: str, rows: int, dim: int, log=print, warn=None):
    """(index, its file or None, whether it was built now): the stored index of this content
    key when it proves to be this cache's (its record beside it names the key, the row count
    and the file's SHA-256, and a few stored rows find themselves first), memory-mapped (a
    call reads only the lists it scans); else a new one, built from the cache's rows and
    renamed into place when complete, with `warn` saying why a stored one was not used."""
    folder = index_dir(path)
    target = folder / f"ivfflat-{key}.faiss"
    if target.exists() or target.is_symlink():
        index, problem = _stored_index(path, target, key, rows, dim)
        if index is not None:
            return index, target, False
        (warn or log)(f"not using the search index {target}: {problem}; building it again")
    log(f"building the search index of {rows:,} rows once ({INDEX_LIBRARY}; kept in "
        f"{folder}, used until the cache changes)")
    index = _build(path, rows, dim)
    kept = _store(index, target, key, rows, log)
    if kept is not None:
        _remove_older(folder, {target.name, _record_path(target).name})
    return index, kept, True


def _record_path(target: Path) -> Path:
    """The record that proves which cache an index file belongs to, beside it."""
    return target.with_suffix(".json")


def _stored_index(path: Path, target: Path, key: str, rows: int, dim: int):
    """(the stored index, "") when it is this cache's, else (None, why not). Anything in the
    folder may have been put there by someone else: nothing is trusted until checked."""
    import faiss
    if target.is_symlink() or not target.is_file():
        return None, "it is not a regular file"
    record = _read_record(_record_path(target))
    if record is None:
        return None, f"no valid record {_record_path(target).name} beside it"
    if record.get("cache_key") != key or record.get("rows") != rows:
        return None, "its record describes other cache content"
    try:
        digest = _sha256(target)
    except OSError as e:
        return None, f"it cannot be read ({e.strerror or e})"
    if record.get("sha256") != digest:
        return None, "its SHA-256 digest does not match its record (changed since it was built)"
    try:
        index = faiss.read_index(str(target), faiss.IO_FLAG_MMAP)
    except RuntimeError:  # unreadable (cut short, damaged)
        return None, "faiss cannot read it"
    problem = _self_check(index, path, rows, dim)
    return (None, problem) if problem else (index, "")


def _read_record(record: Path) -> dict | None:
    """The record written by `_store`, or None for anything else (missing, a link, too big,
    not this format)."""
    try:
        if record.is_symlink() or not record.is_file() or record.stat().st_size > RECORD_MAX_BYTES:
            return None
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == RECORD_FORMAT else None


def _self_check(index, path: Path, rows: int, dim: int) -> str:
    """"" when a few of the cache's rows, picked at random, each find themselves first at
    distance ~0 in `index` (an index of other rows cannot); else what is wrong."""
    import faiss
    if (not isinstance(index, faiss.IndexIVFFlat) or index.d != dim or not index.is_trained
            or index.metric_type != faiss.METRIC_INNER_PRODUCT or not 0 < index.ntotal <= rows):
        return "it is not an inner-product IVF index of this cache's rows"
    picked = np.random.default_rng().choice(rows, min(rows, 2 * SELF_CHECK_ROWS), replace=False)
    with cache_io.schema._open(path) as f:
        ds = f["embeddings"]
        X = np.concatenate([_read_block(path, ds, int(r), int(r) + 1) for r in picked])
    usable = np.isfinite(X).all(axis=1) & (np.abs(X).sum(axis=1) > 0)  # stored, not all zero
    picked, X = picked[usable][:SELF_CHECK_ROWS], X[usable][:SELF_CHECK_ROWS]
    if not len(picked):
        return ""
    index.nprobe = min(SELF_CHECK_NPROBE, index.nlist)
    sim, found = index.search(np.ascontiguousarray(X), min(SELF_CHECK_K, index.ntotal))
    for row, s, ids in zip(picked.tolist(), 1.0 - sim, found):
        # Identical rows tie at distance 0: the row may then be beyond the k found.
        if s[0] > SELF_MATCH_DISTANCE or (row not in ids and s[-1] > SELF_MATCH_DISTANCE):
            return f"row {row} of the cache does not find itself first in it"
    return ""


def _store(index, target: Path, key: str, rows: int, log) -> Path | None:
    """Write `index` as `target` and its record beside it, each under a temporary name
    renamed into place; None (the index is used for this search only) when the folder
    cannot be written."""
    import faiss
    folder = target.parent
    # Names no other writer uses; faiss creates the file (mode as umask says, not 0600).
    stamp = f"{os.getpid()}.{uuid.uuid4().hex}.tmp"
    tmp, tmp_record = folder / f".{target.name}.{stamp}", folder / f".{target.stem}.json.{stamp}"
    try:
        folder.mkdir(exist_ok=True)
        faiss.write_index(index, str(tmp))
        record = {"format": RECORD_FORMAT, "cache_key": key, "rows": rows,
                  "ntotal": int(index.ntotal), "dim": int(index.d), "sha256": _sha256(tmp)}
        tmp_record.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        atomic.replace(tmp, target)
        atomic.replace(tmp_record, _record_path(target))
    except (OSError, RuntimeError) as e:  # a read-only or full disk: search all the same
        log(f"cannot keep the index in {folder} ({getattr(e, 'strerror', None) or e}); "
            "it is used for this search only")
        return None
    finally:
        for name in (tmp, tmp_record):
            with contextlib.suppress(OSError):
                name.unlink(missing_ok=True)
    return target


def _remove_older(folder: Path, keep: set) -> None:
    """Remove the index files and records of older contents: only names this module makes
    (`ivfflat-<key>.faiss` / `.json`), only in `folder`, never a folder."""
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            if (INDEX_FILE_NAME.fullmatch(entry.name) and entry.name not in keep
                    and (entry.is_symlink() or entry.is_file(follow_symlinks=False))):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, entry.name))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _build(path: Path, rows: int, dim: int):
    """An IVF index of the cache's unit rows (row numbers are its ids): the coarse quantiser
    trained on a seeded sample, then every row added block by block (the cache is never read
    whole)."""
    import faiss
    lists = max(1, min(int(LISTS_PER_SQRT_ROW * np.sqrt(rows)), rows // MIN_PER_LIST))
    pick = np.sort(np.random.default_rng(0).choice(rows, min(rows, TRAIN_PER_LIST * lists),
                                                   replace=False))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.min_points_per_centroid = 1  # tiny galleries: no k-means warning on stderr
    sample = np.concatenate([block[pick[(pick >= start) & (pick < stop)] - start]
                             for start, stop, block in _blocks(path, rows)])
    index.train(sample[np.isfinite(sample).all(axis=1)])
    for start, stop, block in _blocks(path, rows):
        usable = np.isfinite(block).all(axis=1)  # a row with NaN is never returned
        index.add_with_ids(block[usable], np.arange(start, stop)[usable])
    return index


def _blocks(path: Path, rows: int):
    """(start, stop, unit rows) of the cache, BLOCK_ROWS at a time."""
    with cache_io.schema._open(path) as f:
        ds = f["embeddings"]
        for start in range(0, rows, BLOCK_ROWS):
            stop = min(start + BLOCK_ROWS, rows)
            yield start, stop, _read_block(path, ds, start, stop)


def ivf_search(index, Q: np.ndarray, k: int, nprobe: int = NPROBE):
    """(rows, cosine distances) from the IVF index, `nprobe` lists per query; a query whose
    scanned lists hold fewer than k rows is searched again over every list."""
    index.nprobe = min(nprobe, index.nlist)
    sim, rows = index.search(np.ascontiguousarray(Q, np.float32), k)
    short = np.flatnonzero((rows < 0).any(axis=1))
    if len(short):
        index.nprobe = index.nlist
        sim[short], rows[short] = index.search(np.ascontiguousarray(Q[short]), k)
    return rows.astype(np.int64), np.maximum(1.0 - sim, 0).astype(np.float32)


class SearchIndexWarning(UserWarning):
    """A stored search index was not used (not this cache's, changed or damaged): it is
    built again."""


def _warning(message: str) -> None:
    warnings.warn(message, SearchIndexWarning, stacklevel=5)


def _faiss_installed() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(INDEX_LIBRARY)
    except PackageNotFoundError:
        return "?"


# --- inputs ------------------------------------------------------------------------------------

def _are_inputs(value) -> bool:
    """Image files or folders (a path, or a non-empty list of paths), not numbers."""
    if isinstance(value, (str, os.PathLike)):
        return True
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(v, (str, os.PathLike)) for v in value))


def _full_path(root: str, path: str) -> str:
    from featurize.data.images import is_url
    if not root or is_url(path) or os.path.isabs(path):
        return path
    return os.path.join(root, path)
