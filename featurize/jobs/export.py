"""`python -m featurize export CACHE --format parquet|npy OUT`: a cache in the layouts that the
vector-search tools read (embedding-reader, autofaiss, clip-retrieval's index).

--format parquet   OUT/part-0.parquet, part-1.parquet...: columns `path` (string, relative to
                   the dataset root), `label` (class name, null when unlabelled) and
                   `embedding` (fixed_size_list<float32>[D]). embedding-reader's "parquet"
                   format; autofaiss `build_index(OUT, file_format="parquet", id_columns=["path"])`.
--format npy       OUT/img_emb/img_emb_0.npy... ((rows, D) float32) and, row for row,
                   OUT/metadata/metadata_0.parquet... (`path`, `label`): the layout
                   clip-retrieval's inference writes, embedding-reader's "parquet_npy" format;
                   autofaiss `build_index(OUT/img_emb)` reads the .npy files alone.

Both: rows in the cache's order, in files of --rows-per-file rows; the provenance (the cache's
attributes: settings, backbone, weights, versions, dataset...) and `normalized` as JSON under
the key `featurize` of every parquet file's key-value metadata. A parquet OUT holds its part
files and nothing else, so every reader takes the bare folder as one table:
pd.read_parquet(OUT), pyarrow.dataset.dataset(OUT), pl.read_parquet(OUT) and DuckDB's
read_parquet('OUT/**'). The npy layout also has OUT/_featurize_export.json (a summary: format,
rows, dim, normalized, files, provenance), which its readers, pointed at OUT/img_emb and
OUT/metadata, never see; `sidecar(OUT)` gives that summary for both layouts (for parquet, from
the part files' metadata). Parquet has no fixed-size list type: `embedding` reads back as
fixed_size_list<float32>[D] in Arrow readers (pyarrow, pandas, polars' Array) and as FLOAT[] in
DuckDB's read_parquet, which takes `embedding::FLOAT[D]` for array_cosine_similarity and its
other array_* functions. --normalize writes every row scaled to unit L2 length (a zero row
stays zero): inner product is then cosine similarity, what autofaiss/faiss's inner-product
indexes need to rank like `classify search`.
Readers sort file names as text, so the numbers in them are zero-padded to one width.

The export is written in OUT.tmp-<pid> and renamed to OUT when complete: OUT is either absent
or whole; an earlier export there (--overwrite: a folder of nothing but part-N.parquet files,
each with the `featurize` metadata, or one with export's summary file, as npy and older
exports have) is moved to OUT.old-<pid> first, then deleted.
Those two folders carry a marker written by export before anything else (naming the folder,
the host and the process): an OUT.tmp-*/OUT.old-* folder left by a killed export is removed
by the next export to OUT only with that marker and its process gone; any other folder, such
as a user's `faces.old-2023`, is never touched. Parquet (also the metadata of the npy layout)
needs pyarrow: the `parquet` extra.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featurize import atomic
from featurize.errors import OptionError, UserError, check_range

FORMATS = ("parquet", "npy")
SIDECAR = "_featurize_export.json"  # the npy layout's summary (parquet's, before)
LEGACY_SIDECARS = ("featurize_export.json",)  # its name in older exports
PART = re.compile(r"part-[0-9]+\.parquet")  # a parquet export's files: its whole folder
LEFTOVER = "_featurize_export.partial"  # in OUT.tmp-<pid> and OUT.old-<pid> while export runs
METADATA_KEY = b"featurize"
FILE_BYTES = 256 << 20  # default file size: embedding-reader reads ~50 MB pieces of a file
INSTALL = "pip install 'featurize-embeddings[parquet]'"


@dataclass
class Export:
    """What an export wrote."""

    out: Path
    format: str
    rows: int
    dim: int
    files: list[dict]
    normalized: bool = False  # rows written at unit L2 length (--normalize)
    notes: list[str] = field(default_factory=list)  # warnings, for the caller to show


def export(cache_path, out, fmt: str = "parquet", rows_per_file: int | None = None,
           overwrite: bool = False, normalize: bool = False) -> Export:
    """Write the cache at `cache_path` to the folder `out` in format `fmt` (see the module's
    doc); `normalize`: rows at unit L2 length. Every mistake is found before anything is
    written."""
    from featurize import cache

    if fmt not in FORMATS:
        raise OptionError("format", f"must be one of {', '.join(FORMATS)}, not {fmt!r}.")
    check_range("rows_per_file", rows_per_file, 1)
    _require_pyarrow(fmt)
    _check_out(Path(out), overwrite)
    c = cache.read(cache_path, option="CACHE")
    if not len(c.paths):
        raise UserError(f"cache {cache_path} has no embeddings, so there is nothing to export; "
                        "run python -m featurize on its dataset first.")
    notes = [] if c.complete else [f"cache {cache_path} is incomplete ({c.pending} images "
                                   "pending): exported the rows it has"]
    if normalize:
        c.embeddings = unit_rows(c.X)
    rows = rows_per_file or max(1, FILE_BYTES // (4 * c.X.shape[1]))
    meta = {**provenance(c), "normalized": bool(normalize)}
    target = Path(os.path.abspath(out))  # a name to rename, even for "." or "dir/"
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    _remove_stale(target)
    _claim(tmp)
    try:
        files = (_write_parquet if fmt == "parquet" else _write_npy)(c, tmp, rows, meta)
        if fmt == "npy":  # parquet's folder stays bare: its files carry the summary
            summary = _summary(fmt, files, int(c.X.shape[1]), meta)
            (tmp / SIDECAR).write_text(json.dumps(summary, indent=1) + "\n")
        _sync(tmp)
        _publish(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        fix = ("free some space or choose" if e.errno == errno.ENOSPC
               else "choose a writable folder as")
        raise UserError(f"cannot write the export {out} ({e.strerror or e}); {fix} OUT. "
                        "Nothing was written to OUT.") from None
    except BaseException:  # Ctrl-C or SIGTERM: no half export left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Export(Path(out), fmt, len(c.paths), int(c.X.shape[1]), files, bool(normalize),
                  notes)


def unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to L2 length 1, in float32; a zero row stays zero."""
    X = np.asarray(X, np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float64))[:, None]
    return (X / np.where(norms > 0, norms, 1)).astype(np.float32)


def _require_pyarrow(fmt: str):
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        what = ("" if fmt == "parquet"
                else " (the npy layout keeps the paths and labels in parquet files)")
        raise UserError(f"--format {fmt} needs pyarrow{what}: {INSTALL}.") from None


def _check_out(out: Path, overwrite: bool):
    """OUT is new, an empty folder, or (with --overwrite) an earlier export."""
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT {out} is a file; give a folder to create (or an empty one).")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"OUT {out} is not empty; choose a new or empty folder, or add "
                        "--overwrite to replace an earlier export there.")
    if not is_export(out):
        raise UserError(f"OUT {out} is not empty and is not an export (neither only "
                        f"part-N.parquet files written by export nor a {SIDECAR}); "
                        "--overwrite only replaces earlier exports: choose a new or empty "
                        "folder.")


def is_export(folder: Path) -> bool:
    """Whether `folder` is an export: a summary file (npy layout, older exports) or nothing but
    part-N.parquet files, each with export's `featurize` metadata (a parquet export)."""
    folder = Path(folder)
    if any((folder / name).is_file() for name in (SIDECAR, *LEGACY_SIDECARS)):
        return True
    return _parts(folder) is not None


def sidecar(folder) -> dict:
    """The summary of the export in `folder` (format, rows, dim, normalized, files,
    provenance): an npy (or older) export's summary file, or rebuilt from a parquet export's
    part files (their footers: rows, dim and the `featurize` metadata)."""
    folder = Path(folder)
    for name in (SIDECAR, *LEGACY_SIDECARS):
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    parts = _parts(folder)
    if parts is None:
        raise UserError(f"{folder} is not an export of python -m featurize export (neither "
                        f"its part-N.parquet files nor a {SIDECAR}); give the folder that "
                        "command wrote.")
    files = [{"file": name, "rows": rows} for name, rows, _, _ in parts]
    return _summary("parquet", files, parts[0][2], parts[0][3])


def _summary(fmt: str, files: list[dict], dim: int, meta: dict) -> dict:
    return {"format": fmt, "rows": sum(f["rows"] for f in files), "dim": dim,
            "normalized": bool(meta.get("normalized", False)), "files": files,
            "provenance": meta}


def _parts(folder: Path) -> list[tuple] | None:
    """(name, rows, dim, provenance) of each part file, in name order, when `folder` holds
    part-N.parquet files and nothing else (but a leftover marker), each with export's
    `featurize` metadata (read from its footer); None otherwise: not ours."""
    try:
        names = sorted(p.name for p in folder.iterdir() if p.name != LEFTOVER)
    except OSError:
        return None
    if not names or not all(PART.fullmatch(n) and (folder / n).is_file() for n in names):
        return None
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return None  # no reader: export itself asks for pyarrow first
    parts = []
    for name in names:
        try:
            with pq.ParquetFile(folder / name) as f:
                meta = json.loads((f.schema_arrow.metadata or {})[METADATA_KEY])
                dim = f.schema_arrow.field("embedding").type.list_size
                parts.append((name, f.metadata.num_rows, int(dim), meta))
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            return None  # unreadable, no `featurize` key or no fixed-size embedding column
        if not isinstance(meta, dict):
            return None
    return parts


def provenance(c) -> dict:
    """The cache's attributes that JSON can hold, plus where the cache is and its classes."""
    meta = {}
    for key, value in c.attrs.items():
        value = _json_value(value)
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            continue  # an attribute no JSON reader could use
        meta[key] = value
    meta.update(cache_path=str(Path(c.path).resolve()), rows=len(c.paths),
                dim=int(c.X.shape[1]), classes=list(c.classes), failed=len(c.failed))
    return meta


def _json_value(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return value


def _label_names(c) -> np.ndarray:
    """The class name of each row, None when unlabelled (index -1 picks the None at the end)."""
    names = np.array([*c.classes, None], dtype=object)
    return names[np.asarray(c.labels, dtype=np.int64)]


def _metadata_table(c, start: int, stop: int, names, meta: dict):
    import pyarrow as pa
    table = pa.table({"path": pa.array(c.paths[start:stop], pa.string()),
                      "label": pa.array(names[start:stop], pa.string())})
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)})


def _embedding_array(X: np.ndarray):
    import pyarrow as pa
    flat = pa.array(np.ascontiguousarray(X, dtype=np.float32).reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, X.shape[1])


def _chunks(n: int, rows: int) -> tuple[list[tuple[int, int]], int]:
    """Row ranges of the files, and the width of their zero-padded numbers."""
    bounds = [(start, min(start + rows, n)) for start in range(0, n, rows)]
    return bounds, len(str(len(bounds) - 1))


def _write_parquet(c, folder: Path, rows: int, meta: dict) -> list[dict]:
    import pyarrow.parquet as pq
    names = _label_names(c)
    bounds, width = _chunks(len(c.paths), rows)
    files = []
    for i, (start, stop) in enumerate(bounds):
        table = _metadata_table(c, start, stop, names, meta)
        table = table.append_column("embedding", _embedding_array(c.X[start:stop]))
        name = f"part-{i:0{width}d}.parquet"
        # min/max statistics of every float would double the writing time, and help no reader
        pq.write_table(table, folder / name, use_dictionary=["label"],
                       write_statistics=["path", "label"])
        files.append({"file": name, "rows": stop - start})
    return files


def _write_npy(c, folder: Path, rows: int, meta: dict) -> list[dict]:
    import pyarrow.parquet as pq
    names = _label_names(c)
    bounds, width = _chunks(len(c.paths), rows)
    (folder / "img_emb").mkdir()
    (folder / "metadata").mkdir()
    files = []
    for i, (start, stop) in enumerate(bounds):
        emb = f"img_emb/img_emb_{i:0{width}d}.npy"
        metadata = f"metadata/metadata_{i:0{width}d}.parquet"
        np.save(folder / emb, np.ascontiguousarray(c.X[start:stop], dtype=np.float32))
        pq.write_table(_metadata_table(c, start, stop, names, meta), folder / metadata,
                       use_dictionary=["label"])
        files.append({"file": emb, "metadata": metadata, "rows": stop - start})
    return files


def _sync(folder: Path):
    """Every file on disk before the rename publishes them (a crash then shows none or all)."""
    atomic.fsync_tree(folder)


def _publish(tmp: Path, out: Path):
    """Rename the finished export to OUT; an earlier export there is moved aside first (to a
    marked folder), then deleted (rename replaces only an empty folder)."""
    if out.is_dir() and any(out.iterdir()):
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        if old.exists() or old.is_symlink():
            raise UserError(f"{old} exists and export did not make it; move it away, then "
                            "run the export again.")
        _mark(out, old.name)  # out is an earlier export (_check_out): ours to mark
        os.rename(out, old)
        atomic.publish(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        atomic.publish(tmp, out)
    (out / LEFTOVER).unlink(missing_ok=True)


def _mark(folder: Path, name: str):
    """The marker that makes a folder export's own leftover: it names the folder it is for
    (`name`), the host and this process; written and synced before anything else."""
    marker = folder / LEFTOVER
    marker.write_text(json.dumps({"folder": name, "host": socket.gethostname(),
                                  "pid": os.getpid()}) + "\n")
    atomic.fsync_file(marker)


def _marked_by(folder: Path) -> int | None:
    """The process of this host that made the leftover `folder` (its marker names the folder
    by its present name), or None: a folder export did not make, never touched."""
    try:
        if folder.is_symlink() or not folder.is_dir():
            return None
        mark = json.loads((folder / LEFTOVER).read_text())
        if (mark.get("folder") == folder.name and mark.get("host") == socket.gethostname()
                and isinstance(mark.get("pid"), int)):
            return mark["pid"]
    except (OSError, ValueError, AttributeError):
        pass
    return None


def _claim(tmp: Path):
    """Make the temporary folder OUT.tmp-<pid>, marked first thing; one this process left
    (an earlier call) is removed, a folder of that name export did not make is an error."""
    if tmp.exists() or tmp.is_symlink():
        if _marked_by(tmp) != os.getpid():
            raise UserError(f"{tmp} exists and export did not make it; move it away, then run "
                            "the export again.")
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        _mark(tmp, tmp.name)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write the export {tmp.parent / tmp.name.rpartition('.tmp-')[0]} "
                        f"({e.strerror or e}); choose a writable folder as OUT. Nothing was "
                        "written to OUT.") from None


def _remove_stale(out: Path):
    """Folders left by exports to OUT that were killed (SIGKILL, power loss): marked by export
    itself, on this host, their process gone. Anything else is left alone."""
    for leftover in out.parent.glob(f"{glob.escape(out.name)}.*-*"):
        kind, _, pid = leftover.name[len(out.name) + 1:].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit():
            continue
        owner = _marked_by(leftover)
        if owner is not None and owner == int(pid) and not _alive(owner):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
