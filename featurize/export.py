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
attributes: settings, backbone, weights, versions, dataset...) as JSON under the key
`featurize` of every parquet file's key-value metadata, and in OUT/featurize_export.json.
Readers sort file names as text, so the numbers in them are zero-padded to one width.

The export is written in OUT.tmp-<pid> and renamed to OUT when complete: OUT is either absent
or whole. Parquet (also the metadata of the npy layout) needs pyarrow: the `parquet` extra.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ArgumentParser, UserError, check_range

FORMATS = ("parquet", "npy")
MARKER = "featurize_export.json"  # in every export; --overwrite replaces only such folders
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
    notes: list[str] = field(default_factory=list)  # warnings, for the caller to show


def _parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m featurize export",
        description="Write a cache's embeddings, paths and labels in the files vector-search "
                    "tools read (embedding-reader, autofaiss, clip-retrieval).",
        epilog="parquet: OUT/part-N.parquet with path, label, embedding (a fixed-size list). "
               "npy: OUT/img_emb/img_emb_N.npy with OUT/metadata/metadata_N.parquet (path, "
               "label), row for row. Provenance in each parquet file's metadata and in "
               f"OUT/{MARKER}.")
    p.add_argument("cache", metavar="CACHE", help="a cache file made by python -m featurize")
    p.add_argument("out", metavar="OUT", help="the folder to write (new or empty)")
    p.add_argument("--format", choices=FORMATS, default="parquet", help="default: %(default)s")
    p.add_argument("--rows-per-file", type=int, metavar="N",
                   help="rows in each file (default: about 256 MB of embeddings per file)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in OUT (only a folder made by this command)")
    return p


def main(argv) -> int:
    """The `export` subcommand; errors are UserErrors (one line, exit 2, by the CLI)."""
    args = _parser().parse_args(argv)
    done = export(args.cache, args.out, args.format, args.rows_per_file, args.overwrite)
    for note in done.notes:
        print(f"warning: {note}", file=sys.stderr)
    print(f"exported {done.rows} rows of {done.dim}-D float32 embeddings in "
          f"{len(done.files)} {done.format} file(s) to {done.out}")
    return 0


def export(cache_path, out, fmt: str = "parquet", rows_per_file: int | None = None,
           overwrite: bool = False) -> Export:
    """Write the cache at `cache_path` to the folder `out` in format `fmt` (see the module's
    doc). Every mistake is found before anything is written."""
    from . import cache

    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}.")
    check_range("--rows-per-file", rows_per_file, 1)
    _require_pyarrow(fmt)
    _check_out(Path(out), overwrite)
    c = cache.read(cache_path, option="CACHE")
    if not len(c.paths):
        raise UserError(f"cache {cache_path} has no embeddings, so there is nothing to export; "
                        "run python -m featurize on its dataset first.")
    notes = [] if c.complete else [f"cache {cache_path} is incomplete ({c.pending} images "
                                   "pending): exported the rows it has"]
    rows = rows_per_file or max(1, FILE_BYTES // (4 * c.X.shape[1]))
    meta = provenance(c)
    target = Path(os.path.abspath(out))  # a name to rename, even for "." or "dir/"
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    _remove_stale(target)
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # left by this process's own earlier call
        tmp.mkdir(parents=True)
        files = (_write_parquet if fmt == "parquet" else _write_npy)(c, tmp, rows, meta)
        summary = {"format": fmt, "rows": len(c.paths), "dim": int(c.X.shape[1]),
                   "files": files, "provenance": meta}
        (tmp / MARKER).write_text(json.dumps(summary, indent=1) + "\n")
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
    return Export(Path(out), fmt, len(c.paths), int(c.X.shape[1]), files, notes)


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
    if not (out / MARKER).is_file():
        raise UserError(f"OUT {out} is not empty and is not an export (no {MARKER} in it); "
                        "--overwrite only replaces earlier exports: choose a new or empty "
                        "folder.")


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
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _publish(tmp: Path, out: Path):
    """Rename the finished export to OUT; an earlier export there is moved aside first,
    then deleted (rename replaces only an empty folder)."""
    if out.is_dir() and any(out.iterdir()):
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _remove_stale(out: Path):
    """Folders left by exports to OUT that were killed (SIGKILL, power loss): their process
    is gone. A live export's folder is left alone."""
    for leftover in out.parent.glob(f"{glob.escape(out.name)}.*-*"):
        kind, _, pid = leftover.name[len(out.name) + 1:].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
