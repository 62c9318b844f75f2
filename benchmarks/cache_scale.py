"""The sharded cache at scale: a synthetic cache of 1,000,000 rows x 512 D (random floats, fake
paths), through featurize's own cache module. Measures, in one run:

- appending 1,000 rows: the shard a run's journal writes plus the commit (index swap), in
  seconds and as bytes written relative to the cache's bytes;
- a cache hit on every row: what featurize does after listing the folder (the State of the
  cache, the to-do list, the up-to-date check);
- open_cache(...).X for every row, against reading the shard files' bytes in the same state
  of the page cache (a ratio; 1.0 is disk speed);
- the peak memory of a commit, in a fresh process, for a cache of N/4 and of N rows (so the
  part that grows with the number of rows shows, and that the embeddings are never held).

    python benchmarks/cache_scale.py                 # 1,000,000 x 512, about 2 GB in a temp dir
    python benchmarks/cache_scale.py --rows 100000   # quicker
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import REPO, command_line, save

SHARD_ROWS = 125_000  # how the synthetic cache is laid out: as a run's merged shards would be


def settings():
    from featurize.settings import EmbeddingSettings
    return EmbeddingSettings(backbone="synthetic", weights="random", weights_file="random",
                             layer="", pooling="avg", input_size=32, crop=0.0, flip=False,
                             preprocessing="none", precision="float32", jitter=0)


def items(n: int, start: int = 0):
    """Fake images of 5,000 people; the paths of later ones fall among the earlier ones'."""
    from featurize.data.images import Item
    return [Item(f"person_{i % 5000:04d}/img_{i:07d}.jpg", f"/nowhere/{i}.jpg",
                 f"person_{i % 5000:04d}", 1000 + i % 977, 1_700_000_000_000_000_000 + i)
            for i in range(start, start + n)]


def dataset(its):
    from featurize.data.images import Dataset
    return Dataset(Path("/nowhere"), "synthetic", sorted(its, key=lambda it: it.key),
                   sorted({it.label for it in its}))


def shard_rows(its, dim: int, seed: int):
    from featurize import cache
    rng = np.random.default_rng(seed)
    return cache.ShardRows([it.key for it in its], [it.fingerprint for it in its],
                           [""] * len(its), rng.standard_normal((len(its), dim), np.float32))


def build(path: Path, rows: int, dim: int) -> list:
    """The synthetic cache: shards of SHARD_ROWS rows, then one commit."""
    from featurize import cache
    its = sorted(items(rows), key=lambda it: it.key)  # a run's shards: consecutive paths
    for k, start in enumerate(range(0, rows, SHARD_ROWS)):
        cache.write_shard(path, f"bulk-{k:04d}", settings(), shard_rows(its[start:start + SHARD_ROWS], dim, k))
    cache.commit(path, settings(), dataset(its), {"featurize_version": "benchmark"})
    return its


def cache_bytes(path: Path) -> int:
    from featurize import cache
    return path.stat().st_size + sum(p.stat().st_size for p in cache.shards_dir(path).glob("*.h5"))


def append(path: Path, its: list, dim: int, n: int) -> dict:
    from featurize import cache
    before = cache_bytes(path)
    new = items(n, start=len(its))
    t = time.perf_counter()
    shard = cache.write_shard(path, "appended", settings(), shard_rows(new, dim, 99))
    t_shard = time.perf_counter()
    cache.commit(path, settings(), dataset(its + new), {"featurize_version": "benchmark"})
    t_commit = time.perf_counter()
    written = shard.stat().st_size + path.stat().st_size
    return {"rows_added": n, "shard_seconds": t_shard - t, "commit_seconds": t_commit - t_shard,
            "total_seconds": t_commit - t, "bytes_written": written, "cache_bytes": before,
            "written_fraction": written / before}, its + new


def hit(path: Path, its: list) -> dict:
    from featurize import cache
    t = time.perf_counter()
    state = cache.State(path, settings())
    todo = state.todo(its)
    fresh = state.up_to_date(dataset(its)) if not todo else False
    seconds = time.perf_counter() - t
    return {"rows": len(its), "todo": len(todo), "up_to_date": fresh, "seconds": seconds}


def read_speed(path: Path) -> dict:
    """open_cache(...).X against reading the shard files' bytes into new arrays (the same
    first-touch cost of fresh memory), best of 3 each, alternating."""
    from featurize import cache, open_cache
    files = sorted(cache.shards_dir(path).glob("*.h5"))
    raw_times, open_times = [], []
    for _ in range(3):
        t = time.perf_counter()
        raw = 0
        for f in files:
            buf = np.empty(f.stat().st_size, np.uint8)
            with open(f, "rb", buffering=0) as fh:
                raw += fh.readinto(memoryview(buf))
            del buf
        raw_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        c = open_cache(path)
        open_times.append(time.perf_counter() - t)
        x_bytes, rows = c.X.nbytes, len(c.paths)
        del c
    t_raw, t_open = min(raw_times), min(open_times)
    return {"rows": rows, "x_bytes": x_bytes, "file_bytes": raw,
            "raw_read_seconds": t_raw, "open_cache_seconds": t_open,
            "raw_mb_s": raw / t_raw / 1e6, "open_cache_x_mb_s": x_bytes / t_open / 1e6,
            "open_cache_vs_raw": (x_bytes / t_open) / (raw / t_raw)}


def commit_memory(rows: int, dim: int, folder: Path) -> dict:
    """Peak RSS of a fresh process that builds the dataset listing, then commits 1,000 new
    rows into a cache of `rows` rows; the listing's own share measured separately."""
    code = f"""
import json, sys, time
sys.path.insert(0, {str(REPO / 'benchmarks')!r})
import cache_scale as b
from pathlib import Path
from featurize import cache
path = Path({str(folder / 'mem.h5')!r})
its = b.items({rows} + 1000)
def hwm():  # VmHWM: peak RSS of this process image (ru_maxrss survives exec in Linux)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
listing = hwm()
cache.write_shard(path, "appended", b.settings(), b.shard_rows(its[-1000:], {dim}, 7))
cache.commit(path, b.settings(), b.dataset(its), {{}})
peak = hwm()
print(json.dumps({{"listing_kb": listing, "peak_kb": peak}}))
"""
    build(folder / "mem.h5", rows, dim)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO / "benchmarks", check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    return {"rows": rows, "peak_mb": m["peak_kb"] / 1024,
            "commit_mb": (m["peak_kb"] - m["listing_kb"]) / 1024,
            "embeddings_mb": rows * dim * 4 / 2**20}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--append", type=int, default=1000)
    p.add_argument("--dir", help="where to build it (default: a temporary folder)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "synthetic.h5"
        t = time.perf_counter()
        its = build(path, args.rows, args.dim)
        built = time.perf_counter() - t
        print(f"built {args.rows} x {args.dim} in {built:.1f} s ({cache_bytes(path) / 1e9:.2f} GB)")
        fresh_hit = hit(path, its)
        print(f"cache hit on {fresh_hit['rows']} rows as one run wrote them: "
              f"{fresh_hit['seconds']:.2f} s")
        added, its = append(path, its, args.dim, args.append)
        print(f"append {args.append}: {added['total_seconds']:.2f} s, wrote "
              f"{100 * added['written_fraction']:.3f}% of the cache's bytes")
        hit_all = hit(path, its)  # the new rows' paths fall among the old ones: the general case
        print(f"cache hit on {hit_all['rows']} rows after the append: {hit_all['seconds']:.2f} s")
        read = read_speed(path)
        print(f"open_cache X: {read['open_cache_x_mb_s']:.0f} MB/s, raw read of the shards "
              f"{read['raw_mb_s']:.0f} MB/s (ratio {read['open_cache_vs_raw']:.2f})")
    memory = []
    for rows in (args.rows // 4, args.rows):
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            memory.append(commit_memory(rows, args.dim, Path(tmp)))
            print(f"commit into {rows} rows: peak {memory[-1]['peak_mb']:.0f} MB, of which the "
                  f"commit {memory[-1]['commit_mb']:.0f} MB (embeddings: "
                  f"{memory[-1]['embeddings_mb']:.0f} MB, never loaded)")
    save("cache_scale", {"rows": args.rows, "dim": args.dim, "build_seconds": built,
                         "hit": hit_all, "fresh_hit": fresh_hit, "append": added, "read": read, "commit_memory": memory},
         command_line())


if __name__ == "__main__":
    main()
