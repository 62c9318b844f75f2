"""`python -m featurize compact CACHE [--all]`: merge a cache's small and masked shards."""

from __future__ import annotations

from .errors import ArgumentParser


def _parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m featurize compact",
        description="Merge the small shards of a cache, and those mostly holding rows of "
                    "deleted or changed files, into one; the index is swapped atomically, as by "
                    "a featurize run (which also merges small shards by itself).")
    p.add_argument("cache", help="the cache file (the index, e.g. data/cache/NAME.h5)")
    p.add_argument("--all", action="store_true", help="merge every shard into one")
    return p


def main(argv) -> int:
    from . import cache
    args = _parser().parse_args(argv)
    counts = cache.compact(args.cache, everything=args.all)
    print(f"{args.cache}: {counts['rows']} rows in {counts['shards_after']} shard(s) "
          f"(were {counts['shards_before']})")
    return 0
