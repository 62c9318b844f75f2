"""dlib-resnet's accuracy against --jitter N on all of LFW View 1, with the cost of each point.

Protocol: View 1 only (View 2's pairs.txt is held back): the threshold chosen on
pairsDevTrain.txt (2,200 pairs) applied to pairsDevTest.txt (1,000 pairs), and the 10-fold
protocol over all 3,200 pairs (each file cut into 10 interleaved folds, fold k of both files
together; each fold's threshold chosen on the other nine). classify/verify.py's functions.

Compute is planned around featurize's seeded jitter (featurize.dlib_backbone): pass i of an
image depends only on (its chip, i), so every pass of every image is computed once and kept
in --work (default /tmp/jitter_curve, resumable), and --jitter N is the mean of passes
0..N (pass 0 is the chip itself). The cheap deterministic variants are passes of their own:
the mirrored chip, and the chip shifted by 2% (3 pixels) left, right, up and down.
`--check` shows that the stored passes give featurize's --jitter N embedding exactly.

    nice -n 5 python benchmarks/jitter_curve.py --workers 2 --max-jitter 10
    nice -n 5 python benchmarks/jitter_curve.py --workers 2 --max-jitter 20   # extends it
    python benchmarks/jitter_curve.py --speed --speed-images 64     # img/s of featurize
    python benchmarks/jitter_curve.py --table                       # the docs' table (docs/faces.md), from JSON

Writes benchmarks/results/jitter_curve.json (the curve after every pass group; --speed adds
the costs).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

from classify._verify import evaluate, parse_pairs
from common import LFW, RESULTS, command_line, lfw_images, save

NAME = "jitter_curve"
SHIFTS = {"shift-left": (-0.02, 0.0), "shift-right": (0.02, 0.0), "shift-up": (0.0, -0.02),
          "shift-down": (0.0, 0.02)}
CHUNK = 128  # images per task


# --- the stored passes --------------------------------------------------------------------

def view1_pairs(lfw: Path):
    train = parse_pairs(lfw / "pairsDevTrain.txt")
    test = parse_pairs(lfw / "pairsDevTest.txt")
    return train, test


def pass_names(max_jitter: int) -> list[str]:
    """The passes in the order they are computed: the cheap ones first, so that a run cut
    short still has the start of the curve and the deterministic variants."""
    first = ["plain", "seeded-1", "mirror", "seeded-2", "seeded-3", "seeded-4", "shift-left",
             "shift-right"]
    rest = [f"seeded-{i}" for i in range(5, max_jitter + 1)]
    return first + rest[:6] + ["shift-up", "shift-down"] + rest[6:]


def _chip(task):
    from featurize.data.images import read_rgb
    from featurize.models.dlib_backbone import face_chip
    root, rel = task
    chip, code = face_chip(read_rgb(str(root / rel)))
    return chip, code


def make_chips(pool, root: Path, images: list[str], work: Path) -> np.ndarray:
    """The 150x150 chips of every image (cut once, as featurize cuts them), kept in --work."""
    path = work / "chips.npy"
    if path.exists() and json.loads((work / "images.json").read_text()) == images:
        return np.load(path, mmap_mode="r")
    start = time.perf_counter()
    made = pool.map(_chip, [(root, rel) for rel in images], chunksize=16)
    chips = np.stack([c for c, _ in made])
    np.save(work / "chips.tmp.npy", chips)
    os.replace(work / "chips.tmp.npy", path)
    (work / "images.json").write_text(json.dumps(images))
    (work / "faces.json").write_text(json.dumps([int(code) for _, code in made]))
    print(f"chips: {len(images)} images in {time.perf_counter() - start:.0f} s", flush=True)
    return np.load(path, mmap_mode="r")


def pass_chips(name: str, chips) -> list[np.ndarray]:
    """The chips of one pass over `chips`."""
    from featurize.models.dlib_backbone import chip_digest, jitter_draw, transform_chip
    if name == "plain":
        return [np.asarray(c) for c in chips]
    if name == "mirror":
        return [np.ascontiguousarray(np.asarray(c)[:, ::-1]) for c in chips]
    if name in SHIFTS:
        dx, dy = SHIFTS[name]
        return [transform_chip(np.asarray(c), dx=dx, dy=dy, margin=0) for c in chips]
    i = int(name.split("-")[1])
    return [transform_chip(np.asarray(c), **jitter_draw(chip_digest(np.asarray(c)), i))
            for c in chips]


def _pass_task(task):
    os.nice(5) if os.getpriority(os.PRIO_PROCESS, 0) < 5 else None
    from featurize.models.dlib_backbone import pass_descriptors
    work, name, lo, hi = task
    chips = np.load(work / "chips.npy", mmap_mode="r")[lo:hi]
    out = pass_descriptors(pass_chips(name, chips))
    target = work / "passes" / f"{name}.{lo:06d}.npy"
    np.save(target.with_suffix(".tmp.npy"), out)
    os.replace(target.with_suffix(".tmp.npy"), target)
    return task


def compute_passes(pool, work: Path, names: list[str], n: int, on_group=None):
    """Every (pass, chunk of images) not yet in --work; `on_group(name)` after each pass."""
    (work / "passes").mkdir(exist_ok=True)
    for name in names:
        tasks = [(work, name, lo, min(lo + CHUNK, n)) for lo in range(0, n, CHUNK)
                 if not (work / "passes" / f"{name}.{lo:06d}.npy").exists()]
        if tasks:
            start = time.perf_counter()
            for _ in pool.imap_unordered(_pass_task, tasks):
                pass
            seconds = time.perf_counter() - start
            print(f"pass {name}: {len(tasks)} chunks in {seconds:.0f} s "
                  f"({len(tasks) * CHUNK / seconds:.1f} img/s)", flush=True)
        if on_group:
            on_group(name)


def load_pass(work: Path, name: str, n: int) -> np.ndarray | None:
    """(n, 128) float64 descriptors of one pass, or None while any chunk is missing."""
    parts = []
    for lo in range(0, n, CHUNK):
        path = work / "passes" / f"{name}.{lo:06d}.npy"
        if not path.exists():
            return None
        parts.append(np.load(path))
    return np.concatenate(parts)


# --- the curve ------------------------------------------------------------------------------

def figures(emb: np.ndarray, images: list[str], train, test) -> dict:
    """Both View 1 protocols, cosine and euclidean, from (images, 128) embeddings."""
    from types import SimpleNamespace

    from classify._verify import distances
    c = SimpleNamespace(paths=images, embeddings=emb.astype(np.float32), path="view1")
    same_train = np.array([p.same for p in train])
    out = {}
    for metric in ("euclidean", "cosine"):
        d_train, _ = distances(c, train, metric)
        d_test, _ = distances(c, test, metric)
        dev = evaluate(d_test, test, train=(d_train, same_train))
        ten = evaluate(np.concatenate([d_train, d_test]), train + test)
        out[metric] = {"devtest_accuracy": dev["accuracy_all"], "threshold": dev["threshold"],
                       "tenfold_accuracy": ten["accuracy"], "tenfold_std": ten["accuracy_std"],
                       "roc_auc": ten["roc_auc"]}
    return out


def variants(stored: dict, max_jitter: int) -> dict:
    """name -> (network passes, list of pass names averaged), for what `stored` allows."""
    out = {}
    for n in range(0, max_jitter + 1):
        names = ["plain"] + [f"seeded-{i}" for i in range(1, n + 1)]
        if all(k in stored for k in names):
            out[f"jitter {n}"] = (n + 1, names)
        if n and all(k in stored for k in names[1:]):
            out[f"jitter {n}, without the chip (dlib's way)"] = (n, names[1:])
    fixed = {"mirror": ["plain", "mirror"], "2 shifts": ["plain", "shift-left", "shift-right"],
             "mirror + 2 shifts": ["plain", "mirror", "shift-left", "shift-right"],
             "4 shifts": ["plain", *SHIFTS], "mirror + 4 shifts": ["plain", "mirror", *SHIFTS]}
    for name, names in fixed.items():
        if all(k in stored for k in names):
            out[name] = (len(names), names)
    return out


def curve(work: Path, images, train, test, max_jitter: int) -> dict:
    n = len(images)
    stored = {}
    for name in pass_names(max_jitter):
        value = load_pass(work, name, n)
        if value is not None:
            stored[name] = value
    rows = {}
    for label, (passes, names) in variants(stored, max_jitter).items():
        emb = np.mean(np.stack([stored[k] for k in names]), axis=0)
        rows[label] = {"passes": passes, **figures(emb, images, train, test)}
    return rows


# --- the cost ------------------------------------------------------------------------------

def _featurize_seconds(folder: Path, cache_dir: Path, jitter: int, workers: int) -> tuple:
    """(wall seconds, CPU seconds of this process and its worker processes) of one run."""
    from featurize.jobs.run import featurize
    before = _cpu_seconds()
    s = featurize(folder, backbone="dlib-resnet", jitter=jitter, workers=workers,
                  cache_dir=cache_dir, progress=False)
    assert s.failed_total == 0 and s.embedded == s.total, s
    return s.seconds, _cpu_seconds() - before


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its worker processes (Linux /proc): each live
    process's own time and that of its children it has reaped (a pool's ended workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # ended meanwhile
                continue
            # ppid; utime + stime + cutime + cstime (its own, and its reaped children's)
            stats[int(entry.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]))
    mine, frontier = set(), {os.getpid()}
    while frontier:  # this process and its descendants
        mine |= frontier
        frontier = {pid for pid, (ppid, _) in stats.items() if ppid in frontier} - mine
    return sum(stats[pid][1] for pid in mine if pid in stats) / tick


def speed(root: Path, images: list[str], args) -> dict:
    """featurize's img/s per --jitter N on the first --speed-images View 1 images (a fresh
    cache each: every image embedded), both workers; less the start-up (a one-image run),
    so that a short run is not penalised. Then where one image's time goes, in one process."""
    import shutil
    import tempfile
    tmp = Path(tempfile.mkdtemp(prefix="jitter_speed_"))
    try:
        folder = tmp / "faces"
        for rel in images[:args.speed_images]:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).symlink_to(root / rel)
        one = tmp / "one"
        (one / images[0]).parent.mkdir(parents=True)
        (one / images[0]).symlink_to(root / images[0])
        # A run's fixed cost (its worker processes and their models), measured on one image
        # after a first run has paid this process's one-time imports.
        _featurize_seconds(one, tmp / "cache-warm-up", 0, args.workers)
        startup, startup_cpu = _featurize_seconds(one, tmp / "cache-startup", 0, args.workers)
        by = {n: {"seconds": 0.0, "cpu_seconds": 0.0, "seconds_with_startup": 0.0}
              for n in map(int, args.speed_jitters.split(","))}
        for r in range(args.speed_rounds):  # interleaved, so the shared load hits all alike
            for n, row in by.items():
                total, cpu = _featurize_seconds(folder, tmp / f"cache-{n}-{r}", n, args.workers)
                row["seconds"] += total - startup
                row["cpu_seconds"] += cpu - startup_cpu
                row["seconds_with_startup"] += total
        for n, row in by.items():
            done = args.speed_images * args.speed_rounds
            row.update(img_per_s=done / row["seconds"],
                       img_per_cpu_s=done / row["cpu_seconds"])
            print(f"--jitter {n}: {row['img_per_s']:.2f} img/s, "
                  f"{row['img_per_cpu_s']:.2f} img per CPU-second", flush=True)
        plain = by[min(by)]
        for n, row in by.items():  # what N jitters cost against N+1 plain runs
            row["ratio_to_n_plus_1_plain_runs"] = row["seconds"] / ((n + 1) * plain["seconds"])
            row["cpu_ratio_to_n_plus_1_plain_runs"] = (row["cpu_seconds"]
                                                       / ((n + 1) * plain["cpu_seconds"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"images": args.speed_images, "rounds": args.speed_rounds, "workers": args.workers,
            "startup_seconds": startup, "load_average": os.getloadavg()[0],
            "by_jitter": by, "one_image": breakdown(root, images[:24])}


def breakdown(root: Path, images: list[str]) -> dict:
    """Seconds per image, in this process: reading + finding the face + cutting the chip;
    one network pass alone and in batches of 2, 11 and 24 chips; one jittered copy."""
    from featurize.data.images import read_rgb
    from featurize.models.dlib_backbone import face_chip, jittered_chips, pass_descriptors
    start = time.perf_counter()
    chips = [face_chip(read_rgb(str(root / rel)))[0] for rel in images]
    out = {"chip": (time.perf_counter() - start) / len(chips)}
    pass_descriptors(chips[:1])  # the model loaded
    for size in (1, 2, 11, 24):
        start = time.perf_counter()
        for lo in range(0, len(chips), size):
            pass_descriptors(chips[lo:lo + size])
        out[f"pass_batch_{size}"] = (time.perf_counter() - start) / len(chips)
    start = time.perf_counter()
    for chip in chips:
        jittered_chips(chip, 1)
    out["jittered_copy"] = (time.perf_counter() - start) / len(chips)
    return out


def check(root: Path, images: list[str], work: Path, k: int) -> dict:
    """For the first `k` images: featurize's --jitter N (N = 0, 1, 4 and the largest stored)
    equals the mean of the stored passes 0..N, bit for bit."""
    from featurize.models.dlib_backbone import describe
    stored = {}
    for name in pass_names(20):
        value = load_pass(work, name, len(images))
        if value is not None:
            stored[name] = value[:k]
    out = {}
    for label, (passes, names) in variants(stored, 20).items():
        n = passes - 1
        if label != f"jitter {n}" or n not in (0, 1, 4, max(1, len(names) - 1)):
            continue
        emb = np.mean(np.stack([stored[q] for q in names]), axis=0).astype(np.float32)
        made = np.stack([describe(str(root / rel), n) for rel in images[:k]])
        out[label] = {"images": k, "identical": bool(np.array_equal(emb, made)),
                      "max_abs_difference": float(np.abs(emb - made).max())}
        print(label, out[label], flush=True)
    return out


def table(results: dict, metric: str = "euclidean") -> str:
    """The docs' table (docs/faces.md): one row per variant, with its passes and cost."""
    costs = {int(k): v for k, v in results.get("speed", {}).get("by_jitter", {}).items()}
    head = ("| variant | passes | dev threshold -> DevTest | 10-fold over 3,200 pairs | "
            "ROC AUC | img/s (2 cores) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|"]
    for label, row in results.get("curve", {}).items():
        m = row[metric]
        n = int(label.split()[1].rstrip(",")) if label.startswith("jitter ") else None
        cost = costs.get(n, {}).get("img_per_s") if "without" not in label else None
        lines.append(f"| {label} | {row['passes']} | {m['devtest_accuracy']:.4f} | "
                     f"{m['tenfold_accuracy']:.4f} ± {m['tenfold_std']:.4f} | "
                     f"{m['roc_auc']:.4f} | {'' if cost is None else f'{cost:.1f}'} |")
    return "\n".join(lines)


def recommend(rows: dict) -> dict:
    """The cheapest --jitter N whose 10-fold accuracy is within noise of the best jitter
    count's, in both metrics: noise is the best point's standard error over the 10 folds
    (its fold std / sqrt(10), about 5 pairs of 3,200)."""
    counts = {int(k.split()[1]): v for k, v in rows.items()
              if k.startswith("jitter ") and "without" not in k}
    out = {}
    for metric in ("euclidean", "cosine"):
        best = max(counts, key=lambda n: (counts[n][metric]["tenfold_accuracy"], -n))
        top = counts[best][metric]
        floor = top["tenfold_accuracy"] - top["tenfold_std"] / np.sqrt(10)
        within = [n for n in sorted(counts) if counts[n][metric]["tenfold_accuracy"] >= floor]
        out[metric] = {"best": best, "best_accuracy": top["tenfold_accuracy"],
                       "floor": floor, "cheapest_within_noise": within[0]}
    out["jitter"] = max(out[m]["cheapest_within_noise"] for m in ("euclidean", "cosine"))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lfw", default=None, help="the lfw-deepfunneled folder")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-jitter", type=int, default=10)
    ap.add_argument("--work", default="/tmp/jitter_curve")
    ap.add_argument("--speed", action="store_true", help="measure featurize's img/s per N")
    ap.add_argument("--speed-images", type=int, default=64)
    ap.add_argument("--speed-jitters", default="0,1,2,4,10")
    ap.add_argument("--speed-rounds", type=int, default=2,
                    help="runs of each N, interleaved (their times are summed)")
    ap.add_argument("--check", type=int, default=0,
                    help="check K images: stored passes == featurize's --jitter N")
    ap.add_argument("--table", action="store_true", help="print the docs' table and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads((RESULTS / f"{NAME}.json").read_text())))
        return
    root, work = lfw_images(args.lfw), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train, test = view1_pairs(LFW if args.lfw is None else Path(args.lfw).parent)
    images = sorted({q for p in train + test for q in (p.a, p.b)})
    results = _previous()
    if args.speed:  # the costs, with their own command (the curve keeps its own)
        results["speed"] = {**speed(root, images, args), "command": command_line()}
        save(NAME, results, results.get("command") or command_line())
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers) as pool:
        make_chips(pool, root, images, work)
        if args.check:
            results["check"] = check(root, images, work, args.check)
            save(NAME, results, command_line())
            return

        def on_group(name):
            results.update(view1_images=len(images), pairs=len(train) + len(test),
                           max_jitter=args.max_jitter,
                           curve=curve(work, images, train, test, args.max_jitter))
            results["recommended"] = recommend(results["curve"])
            save(NAME, results, command_line())
        compute_passes(pool, work, pass_names(args.max_jitter), len(images), on_group)
    print(table(results))


def _previous() -> dict:
    path = RESULTS / f"{NAME}.json"
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    return {k: v for k, v in old.items() if k not in ("benchmark", "command", "date", "machine")}


if __name__ == "__main__":
    main()
