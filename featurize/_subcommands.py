"""featurize's commands besides `embed`: verify, compact, export and map. Each is one
record: its help, its arguments, and the function that calls the public API with them (the
parser itself is built in featurize.cli)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from featurize.errors import ArgumentParser
from featurize.jobs.export import FORMATS, export
from featurize.jobs.map import METHODS, MapOptions, make_map


@dataclass(frozen=True)
class Command:
    help: str
    arguments: Callable[[ArgumentParser], None]  # adds the command's arguments to its parser
    run: Callable[..., int]  # parsed arguments -> exit code
    description: str = ""
    epilog: str | None = None


def _verify_arguments(p: ArgumentParser) -> None:
    p.add_argument("cache")
    p.add_argument("--sample", type=int, default=0, help="re-embed K random images and compare")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest difference allowed, relative to the embeddings' scale (max "
                        "abs value of the rows compared)")


def verify_command(args) -> int:
    from featurize.jobs.verify import verify_cache
    report = verify_cache(args.cache, sample=args.sample, tolerance=args.tolerance)
    print(report.text())
    return 0 if report.ok else 1


def _compact_arguments(p: ArgumentParser) -> None:
    p.add_argument("cache", help="the cache file (the index, e.g. data/cache/NAME.h5)")
    p.add_argument("--all", action="store_true", help="merge every shard into one")


def compact_command(args) -> int:
    from featurize import cache
    counts = cache.compact(args.cache, everything=args.all)
    print(f"{args.cache}: {counts['rows']} rows in {counts['shards_after']} shard(s) "
          f"(were {counts['shards_before']})")
    return 0


def _export_arguments(p: ArgumentParser) -> None:
    p.add_argument("cache", metavar="CACHE", help="a cache file made by python -m featurize")
    p.add_argument("out", metavar="OUT", help="the folder to write (new or empty)")
    p.add_argument("--format", choices=FORMATS, default="parquet", help="default: %(default)s")
    p.add_argument("--rows-per-file", type=int, metavar="N",
                   help="rows in each file (default: about 256 MB of embeddings per file)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in OUT (only a folder this command made: "
                        "its part files, or its summary file)")
    p.add_argument("--normalize", action="store_true",
                   help="write each embedding scaled to unit L2 length, for inner-product "
                        "indexes (autofaiss, faiss IndexFlatIP): their scores are then cosine "
                        "similarities")


def export_command(args) -> int:
    done = export(args.cache, args.out, args.format, args.rows_per_file, args.overwrite,
                  normalize=args.normalize)
    for note in done.notes:
        print(f"warning: {note}", file=sys.stderr)
    unit = " unit-length" if done.normalized else ""
    print(f"exported {done.rows} rows of {done.dim}-D{unit} float32 embeddings in "
          f"{len(done.files)} {done.format} file(s) to {done.out}")
    return 0


def _map_arguments(p: ArgumentParser) -> None:
    d = MapOptions.__dataclass_fields__
    p.add_argument("cache", help="the cache file (e.g. data/cache/NAME.h5)")
    p.add_argument("--method", choices=METHODS,
                   help="umap (needs umap-learn; the default when installed), tsne (the "
                        "default otherwise) or pca (a quick look)")
    p.add_argument("--sample", type=int, default=d["sample"].default,
                   help="draw at most this many rows, chosen at random (default %(default)s)")
    p.add_argument("--min-per-class", type=int, default=d["min_per_class"].default,
                   help="only classes with at least this many images")
    p.add_argument("--thumbnails", type=int, default=d["thumbnails"].default,
                   help="inline this many hover thumbnails (default %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"].default)
    p.add_argument("--out", help="output folder (default: <cache name>.map/ beside the cache)")


def map_command(args) -> int:
    options = MapOptions(args.method, args.sample, args.min_per_class, args.thumbnails,
                         args.seed)
    facts = make_map(args.cache, args.out, options)
    print(f"{facts['method']}: {facts['rows']} of {facts['cache_rows']} rows, "
          f"{facts['classes']} classes, {facts['seconds']:.1f} s; {facts['thumbnails']} "
          "thumbnails")
    print(f"png: {facts['png']}\nhtml: {facts['html']}")
    return 0


COMMANDS = {
    "verify": Command(
        "check a cache (shapes, finite rows, files present; --sample K re-embeds K images)",
        _verify_arguments, verify_command,
        "Check a cache: shapes, finite rows, files present, and optionally re-embed a sample "
        "and compare."),
    "compact": Command(
        "merge a cache's small and masked shards", _compact_arguments, compact_command,
        "Merge the small shards of a cache, and those mostly holding rows of deleted or "
        "changed files, into one; the index is swapped atomically, as by a featurize run "
        "(which also merges small shards by itself)."),
    "export": Command(
        "write a cache as parquet or npy files for vector-search tools", _export_arguments,
        export_command,
        "Write a cache's embeddings, paths and labels in the files vector-search tools read "
        "(embedding-reader, autofaiss, clip-retrieval).",
        epilog="parquet: OUT holds only OUT/part-N.parquet (path, label, embedding: a "
               "fixed-size list), so pandas, pyarrow, polars and DuckDB (read_parquet("
               "'OUT/**'); it reads embedding as FLOAT[]: cast with embedding::FLOAT[D] for "
               "array_cosine_similarity) read the folder as one table. npy: "
               "OUT/img_emb/img_emb_N.npy with OUT/metadata/metadata_N.parquet (path, label), "
               "row for row, and the summary OUT/_featurize_export.json. Provenance in every "
               "parquet file's metadata (key `featurize`)."),
    "map": Command(
        "draw a 2-D map of a cache's embeddings (PNG and HTML)", _map_arguments, map_command,
        "Draw a 2-D map of a cache's embeddings, coloured by class: a PNG and an HTML page "
        "where hovering shows each image's path and thumbnail."),
}
