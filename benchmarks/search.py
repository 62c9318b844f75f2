"""Gallery search: exact cosine search against approximate indexes (hnswlib, faiss, usearch).

Figures for `classify search` (classify/search.py): recall@10 against exact search, queries
per second, build time, index size and load time, on

  lfw        a real cache (dlib-resnet LFW): each of --queries cache rows as a query, its
             own row left out of both answers;
  synthetic  --rows x 512 float32 (default 1,000,000): a seeded Gaussian mixture (--clusters
             centres, points spread in a 32-dim latent subspace plus isotropic noise, so
             neighbours are meaningful); queries are new points of the same mixture. The
             libraries are compared on the first --compare-rows rows (building every HNSW on
             1M rows would take hours on 2 shared cores); --full-library is also built on
             all rows;
  calls      whole `Gallery.nearest` calls on cache files of several sizes, exact against
             the stored index: what sets EXACT_MAX_ROWS.

    python benchmarks/search.py                       # all parts
    python benchmarks/search.py --parts lfw calls --rows 200000
    python benchmarks/search.py --parts synthetic --libraries hnswlib --full-library hnswlib \
        --name search_hnswlib_1m              # hnswlib on all 1M rows too (minutes more)

Search timings use one thread (QPS per core), builds use every core; the JSON says which.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import RESULTS, command_line, save

K = 10
LATENT = 32
THREADS = os.cpu_count() or 1
HNSW_M, HNSW_EF_CONSTRUCTION = 16, 100


# --- data --------------------------------------------------------------------------------------

def mixture(n: int, dim: int, clusters: int, seed: int, start: int = 0, block=100_000):
    """Rows start..start+n of a seeded Gaussian mixture, unit length; the same rows whatever
    the block size (each block has its own seed)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (clusters, dim)).astype(np.float32)
    # Within a cluster, points spread in a LATENT-dim subspace, about half as far as the
    # centres are apart: neighbours are the cluster's nearest points, as with faces.
    basis = rng.normal(0, 1, (LATENT, dim)).astype(np.float32) / 8
    out = np.empty((n, dim), np.float32)
    for b0 in range(0, n, block):
        r = np.random.default_rng([seed, (start + b0) // block])
        m = min(block, n - b0)
        out[b0:b0 + m] = (centres[r.integers(0, clusters, m)] + r.normal(
            0, 1, (m, LATENT)).astype(np.float32) @ basis + 0.05 * r.normal(
            0, 1, (m, dim)).astype(np.float32))
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def exact_topk(X: np.ndarray, Q: np.ndarray, k: int, block=50_000):
    """Brute force: the k largest inner products of each query, by blocks of X."""
    best_s = np.full((len(Q), k), -np.inf, np.float32)
    best_i = np.full((len(Q), k), -1, np.int64)
    for s in range(0, len(X), block):
        S = Q @ X[s:s + block].T
        part = np.argpartition(-S, k - 1, axis=1)[:, :k]
        all_s = np.concatenate([best_s, np.take_along_axis(S, part, 1)], 1)
        all_i = np.concatenate([best_i, part + s], 1)
        o = np.argsort(-all_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(all_s, o, 1), np.take_along_axis(all_i, o, 1)
    return best_i, best_s


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k].tolist()) & set(t.tolist())) / k
                          for f, t in zip(found, truth)]))


# --- the libraries -----------------------------------------------------------------------------

class Hnswlib:
    name, settings = "hnswlib", f"HNSW M={HNSW_M} ef_construction={HNSW_EF_CONSTRUCTION}, ip"
    efs = (32, 64, 128)

    def build(self, X):
        import hnswlib
        self.index = hnswlib.Index(space="ip", dim=X.shape[1])
        self.index.init_index(len(X), M=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION,
                              random_seed=0)
        self.index.add_items(X, num_threads=THREADS)

    def search(self, Q, k, ef):
        self.index.set_ef(max(ef, k))
        return self.index.knn_query(Q, k=k, num_threads=1)[0]

    def save(self, path):
        self.index.save_index(str(path))

    def load(self, path, n, dim):
        import hnswlib
        self.index = hnswlib.Index(space="ip", dim=dim)
        self.index.load_index(str(path), max_elements=n)


class FaissHNSW:
    name = "faiss-hnsw"
    settings = f"IndexHNSWFlat M={HNSW_M} efConstruction={HNSW_EF_CONSTRUCTION}, ip"
    efs = (32, 64, 128)

    def build(self, X):
        import faiss
        faiss.omp_set_num_threads(THREADS)
        self.index = faiss.IndexHNSWFlat(X.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        self.index.add(X)

    def search(self, Q, k, ef):
        import faiss
        faiss.omp_set_num_threads(1)
        self.index.hnsw.efSearch = max(ef, k)
        return self.index.search(Q, k)[1]

    def save(self, path):
        import faiss
        faiss.write_index(self.index, str(path))

    def load(self, path, n, dim):
        import faiss
        self.index = faiss.read_index(str(path))


class FaissIVF(FaissHNSW):
    name = "faiss-ivf"
    efs = (8, 16, 32, 64)  # nprobe

    def build(self, X):
        import faiss
        faiss.omp_set_num_threads(THREADS)
        nlist = int(4 * np.sqrt(len(X)))
        self.settings = (f"IndexIVFFlat nlist={nlist} (4 sqrt N), trained on "
                         f"{min(len(X), 64 * nlist)} rows, ip; ef = nprobe")
        self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(X.shape[1]), X.shape[1], nlist,
                                        faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        self.index.train(X[np.sort(rng.choice(len(X), min(len(X), 64 * nlist), replace=False))])
        self.index.add(X)

    def search(self, Q, k, ef):  # ef is nprobe here
        import faiss
        faiss.omp_set_num_threads(1)
        self.index.nprobe = ef
        return self.index.search(Q, k)[1]


class Usearch:
    name = "usearch"
    settings = f"HNSW connectivity={HNSW_M} expansion_add={HNSW_EF_CONSTRUCTION}, cos, f32"
    efs = (32, 64, 128)

    def build(self, X):
        from usearch.index import Index
        self.index = Index(ndim=X.shape[1], metric="cos", dtype="f32", connectivity=HNSW_M,
                           expansion_add=HNSW_EF_CONSTRUCTION)
        self.index.add(np.arange(len(X)), X, threads=THREADS)

    def search(self, Q, k, ef):
        self.index.expansion_search = max(ef, k)
        return self.index.search(Q, k, threads=1).keys

    def save(self, path):
        self.index.save(str(path))

    def load(self, path, n, dim):
        from usearch.index import Index
        self.index = Index.restore(str(path), view=True)  # memory-mapped


LIBRARIES = {"hnswlib": Hnswlib, "faiss-hnsw": FaissHNSW, "faiss-ivf": FaissIVF,
             "usearch": Usearch}


def measure(lib, X, Q, truth, k=K, drop_self=None) -> dict:
    """Build, save, load and search one library's index; recall@k against `truth`."""
    t = time.perf_counter()
    lib.build(X)
    build_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory(dir=os.environ.get("SEARCH_BENCH_TMP")) as tmp:
        path = Path(tmp) / "index.bin"
        lib.save(path)
        size = path.stat().st_size
        del lib.index
        gc.collect()
        t = time.perf_counter()
        lib.load(path, len(X), X.shape[1])
        load_s = time.perf_counter() - t
        rows = []
        for ef in lib.efs:
            lib.search(Q[:10], k + 1, ef)  # warm the pages a first query touches
            t = time.perf_counter()
            found = np.asarray(lib.search(Q, k + (drop_self is not None), ef))
            seconds = time.perf_counter() - t
            if drop_self is not None:
                found = _without_self(found, drop_self, k)
            rows.append({"ef": ef, "recall_at_10": round(recall(found, truth), 4),
                         "qps_1_thread": round(len(Q) / seconds, 1)})
            print(f"  {lib.name} ef {ef}: recall@{k} {rows[-1]['recall_at_10']:.4f}, "
                  f"{rows[-1]['qps_1_thread']:.0f} q/s", flush=True)
        del lib.index
    print(f"  {lib.name}: build {build_s:.1f} s, index {size / 2**20:.0f} MB, load "
          f"{load_s:.2f} s", flush=True)
    return {"library": lib.name, "settings": lib.settings, "rows": len(X),
            "build_s": round(build_s, 2), "build_threads": THREADS,
            "index_bytes": size, "load_s": round(load_s, 3), "search": rows}


def _without_self(found, self_rows, k):
    return np.array([[j for j in f if j != s][:k] for f, s in zip(found, self_rows)])


# --- parts -------------------------------------------------------------------------------------

def lfw_part(args) -> dict:
    import featurize
    path = args.lfw_cache or _newest(Path("/work/lfwcache"))
    cache = featurize.open_cache(path)
    X = cache.X / np.linalg.norm(cache.X, axis=1, keepdims=True)
    rng = np.random.default_rng(0)
    qrows = np.sort(rng.choice(len(X), min(args.queries, len(X)), replace=False))
    Q = X[qrows]
    t = time.perf_counter()
    found, _ = exact_topk(X, Q, K + 1)
    exact_s = time.perf_counter() - t
    truth = _without_self(found, qrows, K)
    print(f"LFW {path}: {X.shape}, exact {len(Q) / exact_s:.0f} q/s (numpy, {THREADS} threads)")
    from classify._search import Gallery
    g = Gallery(path, k=K + 1, method="exact")
    t = time.perf_counter()
    rows, _ = g.nearest(Q)
    gallery_s = time.perf_counter() - t
    same = float(np.mean(_without_self(rows, qrows, K) == truth))
    libs = [measure(LIBRARIES[name](), X, Q, truth, drop_self=qrows) for name in args.libraries]
    return {"cache": str(path), "rows": len(X), "dim": X.shape[1], "queries": len(Q),
            "queries_note": "cache rows (seed 0), each one's own row left out of both answers",
            "exact_numpy_qps": round(len(Q) / exact_s, 1), "exact_threads": THREADS,
            "exact_gallery_qps": round(len(Q) / gallery_s, 1),
            "exact_gallery_same_as_numpy": same, "libraries": libs}


def synthetic_part(args) -> dict:
    dim, n = 512, args.rows
    t = time.perf_counter()
    X = mixture(n, dim, args.clusters, seed=0)
    Q = mixture(args.queries, dim, args.clusters, seed=0, start=10**9)  # new points
    print(f"synthetic {X.shape} made in {time.perf_counter() - t:.1f} s", flush=True)
    t = time.perf_counter()
    truth, _ = exact_topk(X, Q, K)
    exact_s = time.perf_counter() - t
    print(f"exact on {n:,}: {len(Q) / exact_s:.1f} q/s ({THREADS} threads)", flush=True)
    sub = X[:args.compare_rows]
    sub_truth, _ = exact_topk(sub, Q, K)
    result = {"rows": n, "dim": dim, "clusters": args.clusters, "queries": len(Q),
              "data": f"unit rows of a Gaussian mixture: centres N(0,1), {LATENT}-dim latent "
                      "N(0,1)/8 spread, isotropic noise 0.05; queries: new draws",
              "exact_numpy_qps": round(len(Q) / exact_s, 2), "exact_threads": THREADS,
              "compare_rows": len(sub), "libraries_on_compare_rows": []}
    for name in args.libraries:
        result["libraries_on_compare_rows"].append(measure(LIBRARIES[name](), sub, Q, sub_truth))
        _save_partial(args, "synthetic", result)
    for name in args.full_library:
        print(f"{name} on all {n:,} rows", flush=True)
        result.setdefault("libraries_on_all_rows", []).append(
            measure(LIBRARIES[name](), X, Q, truth))
        _save_partial(args, "synthetic", result)
    return result


def calls_part(args) -> dict:
    """Whole Gallery.nearest calls (one query, a fresh Gallery each: what one `classify
    search` pays beyond embedding its image) on cache files of several sizes."""
    from classify._search import Gallery
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import synthetic_cache
    out = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("SEARCH_BENCH_TMP")) as tmp:
        for n in args.call_rows:
            X = mixture(n, 512, args.clusters, seed=1)
            path = synthetic_cache(Path(tmp) / f"c{n}.h5", X, np.zeros(n, int), ["all"])
            del X
            q = mixture(1, 512, args.clusters, seed=1, start=10**9)
            row = {"rows": n}
            for method in ("exact", "approximate"):
                if method == "approximate":
                    t = time.perf_counter()
                    Gallery(path, method=method).nearest(q)  # builds and stores the index
                    row["index_build_s"] = round(time.perf_counter() - t, 2)
                times = []
                for _ in range(3):
                    t = time.perf_counter()
                    Gallery(path, method=method).nearest(q)
                    times.append(time.perf_counter() - t)
                row[f"{method}_call_s"] = round(min(times), 4)
            print(f"  {n:,} rows: exact call {row['exact_call_s']:.3f} s, approximate call "
                  f"{row['approximate_call_s']:.3f} s (index built in "
                  f"{row['index_build_s']:.1f} s)",
                  flush=True)
            out.append(row)
            for f in Path(tmp).glob("*"):
                _remove(f)
    return {"note": "min of 3 calls, one query, a new Gallery each (opens the cache; "
                    "approximate: loads the stored index); files in the page cache",
            "calls": out}


def _remove(path: Path):
    import shutil
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _newest(folder: Path) -> Path:
    files = sorted(folder.glob("*.h5"), key=lambda p: p.stat().st_mtime)
    if not files:
        sys.exit(f"no cache in {folder}; pass --lfw-cache PATH")
    return files[-1]


def _save_partial(args, part, data):
    """Keep what is measured so far: a long part killed halfway still leaves its figures."""
    args.results[part] = data
    save(args.name, {"parts": args.results, "peak_rss_mb": _rss_mb()}, args.command)


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def markdown(parts: dict) -> str:
    """The docs' tables, from the saved figures."""
    out = []
    for part, title in (("lfw", "LFW"), ("synthetic", "synthetic")):
        if part not in parts:
            continue
        d = parts[part]
        out.append(f"\n{title}: {d['rows']:,} x {d['dim']}, {d['queries']} queries; exact "
                   f"(numpy, {d['exact_threads']} threads): {d['exact_numpy_qps']:,} q/s\n")
        out.append("| library | rows | build s | index MB | load s "
                   "| ef / nprobe: recall@10, q/s (1 thread) |")
        out.append("|---|---|---|---|---|---|")
        for lib in d.get("libraries", []) + d.get("libraries_on_compare_rows", []) + d.get(
                "libraries_on_all_rows", []):
            cells = "; ".join(f"{r['ef']}: {r['recall_at_10']:.4f}, {r['qps_1_thread']:,.0f}"
                              for r in lib["search"])
            out.append(f"| {lib['library']} | {lib['rows']:,} | {lib['build_s']} | "
                       f"{lib['index_bytes'] / 2**20:.0f} | {lib['load_s']} | {cells} |")
    if "calls" in parts:
        out.append("\n| cache rows (512-D) | exact call s | approximate call s | index build s |")
        out.append("|---|---|---|---|")
        for c in parts["calls"]["calls"]:
            out.append(f"| {c['rows']:,} | {c['exact_call_s']} | {c['approximate_call_s']} | "
                       f"{c['index_build_s']} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=["lfw", "synthetic", "calls"],
                   choices=["lfw", "synthetic", "calls"])
    p.add_argument("--lfw-cache", help="default: the newest cache in /work/lfwcache")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--compare-rows", type=int, default=50_000)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=list(LIBRARIES))
    p.add_argument("--full-library", nargs="*", default=["faiss-ivf"], choices=list(LIBRARIES),
                   help="libraries also built on all --rows rows")
    p.add_argument("--call-rows", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    p.add_argument("--table", action="store_true", help="print the saved figures as Markdown")
    p.add_argument("--name", default="search", help="results/NAME.json (default: %(default)s)")
    args = p.parse_args()
    args.command = command_line()
    previous = RESULTS / f"{args.name}.json"
    args.results = json.loads(previous.read_text()).get("parts", {}) if previous.exists() else {}
    if args.table:
        print(markdown(args.results))
        return
    for part in args.parts:
        print(f"--- {part}", flush=True)
        data = {"lfw": lfw_part, "synthetic": synthetic_part, "calls": calls_part}[part](args)
        data["command"] = args.command
        _save_partial(args, part, data)


if __name__ == "__main__":
    main()
