"""Where dlib-resnet loses accuracy on LFW: each step of its face chip, measured on View 1.

Protocol: View 1 only (View 2's pairs.txt is held back). Two figures per variant and metric:
the threshold chosen on pairsDevTrain.txt applied to pairsDevTest.txt, and the standard
10-fold protocol (each fold's threshold chosen on the other nine) over all 3,200 View 1 pairs
(each file cut into 10 interleaved folds, fold k of both files together). The functions are
classify/verify.py's.

Only the 4,992 View 1 pair images are embedded. Detection (HOG without and with one upsampling,
dlib's CNN detector where HOG finds nothing) runs once per image; each variant then picks a box
from those detections, and a descriptor is computed once per distinct (image, box, landmark
model, chip size, padding, jitter), so a variant that changes only a few images costs only
those. Everything is kept in --work (default /tmp/lfw_gap), so an interrupted run resumes.
Detections are also counted on the whole of LFW (--count-all, HOG only: ~3 core-minutes).

    nice -n 5 python benchmarks/lfw_gap.py --workers 2 --count-all --jitter 10 \
        --jitter-pairs 60 --expensive-on-devtest --full "68-point landmarks,..." \
        --reuse data/cache/lfw-deepfunneled-*__dlib-resnet__none__a61c78197511.h5
    python benchmarks/lfw_gap.py --table      # the docs' table, from the saved JSON

--expensive-on-devtest: variants that change every descriptor (padding, chip size) run on
the pairsDevTest images only (10-fold within its 1,000 pairs), except those --full names;
--reuse: today's descriptors from a cache made with today's defaults (not computed again).

Writes benchmarks/results/lfw_gap.json after every variant.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from classify._verify import evaluate, parse_pairs
from common import LFW, command_line, lfw_images, save
from featurize.models.dlib_backbone import FALLBACK_BOX, model_file, models_dir

_MODELS = {}


def _init_worker():
    import dlib
    os.nice(5)
    # the model files, found as the backbone finds them: face_recognition_models is never
    # imported (its __init__ needs pkg_resources, gone from setuptools 81+)
    sp68 = models_dir("the LFW benchmark") / "shape_predictor_68_face_landmarks.dat"
    _MODELS.update(
        hog=dlib.get_frontal_face_detector(),
        sp5=dlib.shape_predictor(model_file("five_point", "the LFW benchmark")),
        sp68=dlib.shape_predictor(str(sp68)),
        net=dlib.face_recognition_model_v1(model_file("recognition", "the LFW benchmark")),
        cnn=dlib.cnn_face_detection_model_v1(model_file("cnn", "the LFW benchmark")))


def _read(path):
    from featurize.data.images import read_rgb
    return read_rgb(path)


def _boxes(rects, scores):
    return [(r.left(), r.top(), r.right(), r.bottom(), float(s)) for r, s in zip(rects, scores)]


def detect(path, cnn=True):
    """HOG at upsampling 0, else 1; dlib's CNN detector only where HOG finds nothing."""
    rgb = _read(path)
    hog = _MODELS["hog"]
    found = {"shape": rgb.shape[:2], "hog0": _boxes(*hog.run(rgb, 0, 0)[:2])}
    if not found["hog0"]:
        found["hog1"] = _boxes(*hog.run(rgb, 1, 0)[:2])
        if not found["hog1"] and cnn:
            for up in (0, 1):
                dets = _MODELS["cnn"](rgb, up)
                found["cnn"] = [(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom(),
                                 float(d.confidence)) for d in dets]
                if found["cnn"]:
                    break
    return path, found


def describe(task):
    """(path, box, landmarks, size, padding, jitter) -> the 128-D descriptor."""
    import dlib
    path, box, landmarks, size, padding, jitter = task
    rgb = _read(path)
    rect = dlib.rectangle(*box)
    shape = _MODELS[landmarks](rgb, rect)
    chip = dlib.get_face_chip(rgb, shape, size=size, padding=padding)
    if size != 150:  # the network takes 150x150 chips only: cut larger, resize with antialias
        from PIL import Image
        chip = np.asarray(Image.fromarray(chip).resize((150, 150), Image.LANCZOS))
    return task, np.asarray(_MODELS["net"].compute_face_descriptor(chip, jitter), np.float32)


def choose_box(found, choice, fallback):
    """The box a variant uses, and how it was found (hog, hog-upsampled, cnn, fixed)."""
    h, w = found["shape"]
    for source in ("hog0", "hog1") + (("cnn",) if fallback == "cnn" else ()):
        faces = found.get(source) or []
        if faces:
            break
    else:
        fl, ft, fr, fb = FALLBACK_BOX
        return (int(fl * w), int(ft * h), int(fr * w), int(fb * h)), "fixed"
    if choice == "central":
        best = min(faces, key=lambda f: ((f[0] + f[2]) / 2 - w / 2) ** 2
                   + ((f[1] + f[3]) / 2 - h / 2) ** 2)
    elif choice == "largest":
        best = max(faces, key=lambda f: (f[2] - f[0]) * (f[3] - f[1]))
    else:  # the detector's most confident
        best = max(faces, key=lambda f: f[4])
    return tuple(int(v) for v in best[:4]), source


VARIANTS = [  # name, face choice, fallback, landmarks, chip size, padding
    ("baseline (today)", "central", "fixed", "sp5", 150, 0.25),
    ("CNN detector as fallback", "central", "cnn", "sp5", 150, 0.25),
    ("largest face", "largest", "fixed", "sp5", 150, 0.25),
    ("most confident face", "confident", "fixed", "sp5", 150, 0.25),
    ("padding 0.4", "central", "fixed", "sp5", 150, 0.4),
    ("padding 0.1", "central", "fixed", "sp5", 150, 0.1),
    ("68-point landmarks", "central", "fixed", "sp68", 150, 0.25),
    ("68-point landmarks + CNN fallback", "central", "cnn", "sp68", 150, 0.25),
    ("chip 300 resized to 150", "central", "fixed", "sp5", 300, 0.25),
]


class Memo:
    """Descriptors and detections kept on disk in --work, so that a re-run resumes."""

    def __init__(self, work: Path):
        self.path = work / "memo.pkl"
        work.mkdir(parents=True, exist_ok=True)
        self.data = pickle.loads(self.path.read_bytes()) if self.path.exists() else {
            "detections": {}, "descriptors": {}}

    def flush(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(self.data))
        os.replace(tmp, self.path)


def run_pool(pool, func, tasks, store, memo, label):
    todo = [t for t in tasks if t not in store]
    start, last = time.perf_counter(), time.perf_counter()
    for n, (task, value) in enumerate(pool.imap_unordered(func, todo, chunksize=4), 1):
        store[task] = value
        if time.perf_counter() - last > 60:
            memo.flush()
            last = time.perf_counter()
            print(f"  {label}: {n}/{len(todo)}", flush=True)
    memo.flush()
    seconds = time.perf_counter() - start
    return len(todo), seconds


def view1_figures(embeddings: dict, train, test) -> dict:
    """From {relative path: descriptor}, with both metrics: the 10-fold protocol within
    pairsDevTest (1,000 pairs) always; with the pairsDevTrain images too, the threshold from
    pairsDevTrain applied to pairsDevTest and the 10-fold protocol over all 3,200 pairs."""
    from classify._verify import distances
    paths = sorted(embeddings)
    cache = SimpleNamespace(paths=paths, embeddings=np.stack([embeddings[p] for p in paths]),
                            path="view1")
    full = all(q in embeddings for p in train for q in (p.a, p.b))
    out = {}
    for metric in ("cosine", "euclidean"):
        d_test, _ = distances(cache, test, metric)
        dev10 = evaluate(d_test, test)
        out[metric] = {"devtest_10fold_accuracy": dev10["accuracy"],
                       "devtest_10fold_std": dev10["accuracy_std"]}
        if not full:
            continue
        d_train, _ = distances(cache, train, metric)
        same_train = np.array([p.same for p in train])
        dev = evaluate(d_test, test, train=(d_train, same_train))
        ten = evaluate(np.concatenate([d_train, d_test]), train + test)
        out[metric].update(devtest_accuracy=dev["accuracy_all"], threshold=dev["threshold"],
                           tenfold_accuracy=ten["accuracy"], tenfold_std=ten["accuracy_std"],
                           roc_auc_3200=ten["roc_auc"])
    return out


def count_sources(boxes: dict) -> dict:
    counts = {}
    for _, source in boxes.values():
        counts[source] = counts.get(source, 0) + 1
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lfw", default=None, help="the lfw-deepfunneled folder")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", default="/tmp/lfw_gap")
    ap.add_argument("--count-all", action="store_true", help="also count detections on all LFW")
    ap.add_argument("--jitter", type=int, default=0, help="also: --jitter N on a sample")
    ap.add_argument("--jitter-pairs", type=int, default=200)
    ap.add_argument("--variants", default="", help="comma-separated names, run in this order "
                    "(default: all)")
    ap.add_argument("--expensive-on-devtest", action="store_true",
                    help="variants that change every descriptor (padding, landmarks, chip "
                         "size) on the pairsDevTest images only (10-fold within its 1,000 "
                         "pairs): a third of the work")
    ap.add_argument("--full", default="", help="with --expensive-on-devtest: these variants "
                    "(comma-separated) on all 3,200 pairs all the same")
    ap.add_argument("--reuse", help="a dlib-resnet cache of the same LFW folder made with "
                    "today's settings: its rows (committed or journalled) are the baseline's "
                    "descriptors, not computed again")
    ap.add_argument("--table", action="store_true", help="print the saved results as Markdown")
    args = ap.parse_args()
    if args.table:
        import json

        from common import RESULTS
        print(table(json.loads((RESULTS / "lfw_gap.json").read_text())))
        return
    os.nice(5)
    root = lfw_images(args.lfw)
    train = parse_pairs(LFW / "pairsDevTrain.txt")
    test = parse_pairs(LFW / "pairsDevTest.txt")
    images = sorted({q for p in train + test for q in (p.a, p.b)})
    memo = Memo(Path(args.work))
    dets = memo.data["detections"]
    results = {"images": len(images), "pairs": {"devtrain": len(train), "devtest": len(test)},
               "variants": {}}
    by_name = {v[0]: v for v in VARIANTS}
    # variants that change every descriptor, run on pairsDevTest only unless --full names them
    devtest_only = {v[0] for v in VARIANTS if v[3:] != ("sp5", 150, 0.25)
                    and args.expensive_on_devtest} - set(args.full.split(","))
    wanted = [by_name[n] for n in args.variants.split(",")] if args.variants else VARIANTS
    with mp.get_context("fork").Pool(args.workers, initializer=_init_worker) as pool:
        n, s = run_pool(pool, detect, [str(root / p) for p in images], dets, memo, "detect")
        results["detect_seconds_per_image"] = s / n if n else None
        # cheapest and most telling first; the chip size last (see LATE)
        for variant in [v for v in wanted if v[0] not in LATE]:
            if args.reuse:  # again before each: a run still writing that cache goes on
                results["reused_baseline_rows"] = reuse(args.reuse, root, images, memo)
            run_variant(pool, variant, (root, images, dets, memo, train, test,
                                         devtest_only), results)
        if args.count_all:
            results["all_lfw"] = count_all(pool, root, memo)
            save("lfw_gap", results, command_line())
        if args.jitter:
            results["jitter"] = jitter_sample(pool, root, dets, memo, train + test, args)
            save("lfw_gap", results, command_line())
        for variant in [v for v in wanted if v[0] in LATE]:
            run_variant(pool, variant, (root, images, dets, memo, train, test,
                                         devtest_only), results)


LATE = ("chip 300 resized to 150",)


def run_variant(pool, variant, data, results):
    """Embed what the variant changes, evaluate it, save the JSON."""
    root, images, dets, memo, train, test, devtest_only = data
    name, choice, fallback, landmarks, size, padding = variant
    if name in devtest_only:
        # a new descriptor for every image: on the 1,549 images of pairsDevTest only
        images = sorted({q for p in test for q in (p.a, p.b)})
    descriptors = memo.data["descriptors"]
    boxes = {p: choose_box(dets[str(root / p)], choice, fallback) for p in images}
    tasks = {p: (str(root / p), boxes[p][0], landmarks, size, padding, 0) for p in images}
    n, s = run_pool(pool, describe, list(tasks.values()), descriptors, memo, name)
    emb = {p: descriptors[t] for p, t in tasks.items()}
    results["variants"][name] = {
        "face_choice": choice, "fallback": fallback, "landmarks": landmarks,
        "chip_size": size, "padding": padding, "face_found_by": count_sources(boxes),
        "recomputed_images": n, "seconds_per_image": s / n if n else None,
        **view1_figures(emb, train, test)}
    print(name, results["variants"][name]["cosine"], flush=True)
    save("lfw_gap", results, command_line())


def reuse(cache_path, root: Path, images, memo) -> int:
    """Seed the baseline's descriptors from a cache made with today's default settings (its
    settings key is checked); its shard files are read directly, so the progress of a run
    still going counts too."""
    import h5py

    from featurize.models.config import EmbedderConfig
    key = EmbedderConfig("dlib-resnet").settings()[0].key()
    wanted, dets, found = set(images), memo.data["detections"], 0
    store = memo.data["descriptors"]
    for shard in sorted(Path(str(cache_path) + ".shards").glob("*.h5")):
        with h5py.File(shard, "r") as f:
            if f.attrs.get("settings_key") != key:
                continue
            paths = f["paths"].asstr()[()].tolist()
            emb = f["embeddings"][()]
        for rel, row in zip(paths, emb):
            if rel in wanted and str(root / rel) in dets:
                box = choose_box(dets[str(root / rel)], "central", "fixed")[0]
                task = (str(root / rel), box, "sp5", 150, 0.25, 0)
                if task not in store:
                    store[task] = row
                    found += 1
    memo.flush()
    return found


def jitter_sample(pool, root, dets, memo, pairs, args) -> dict:
    """--jitter N against none on a random sample of View 1 pairs (10 folds within it)."""
    from classify._verify import distances
    rng = np.random.default_rng(0)
    sample = [pairs[i] for i in sorted(rng.choice(len(pairs), args.jitter_pairs, replace=False))]
    images = sorted({q for p in sample for q in (p.a, p.b)})
    out = {"pairs": len(sample), "images": len(images), "jitter": args.jitter}
    descriptors = memo.data["descriptors"]
    for jitter in (0, args.jitter):
        tasks = {p: (str(root / p), choose_box(dets[str(root / p)], "central", "fixed")[0],
                     "sp5", 150, 0.25, jitter) for p in images}
        n, s = run_pool(pool, describe, list(tasks.values()), descriptors, memo, f"jitter {jitter}")
        paths = sorted(tasks)
        cache = SimpleNamespace(paths=paths, path="sample",
                                embeddings=np.stack([descriptors[tasks[p]] for p in paths]))
        d, _ = distances(cache, sample, "cosine")
        r = evaluate(d, sample)
        out[f"jitter_{jitter}"] = {"tenfold_accuracy": r["accuracy"], "roc_auc": r["roc_auc"],
                                   "seconds_per_image": s / n if n else None}
    return out


def count_all(pool, root: Path, memo) -> dict:
    """How every LFW image's face is found today (HOG, HOG upsampled, fixed box)."""
    store = memo.data.setdefault("all_detections", {})
    paths = sorted(str(p) for p in root.glob("*/*.jpg"))
    run_pool(pool, _detect_hog, paths, store, memo, "count all")
    counts = {"images": len(paths), "hog": 0, "hog_upsampled": 0, "fixed_box": 0,
              "several_faces": 0}
    for found in (store[p] for p in paths):
        key = "hog" if found["hog0"] else "hog_upsampled" if found.get("hog1") else "fixed_box"
        counts[key] += 1
        counts["several_faces"] += len(found["hog0"] or found.get("hog1") or []) > 1
    return counts


def table(results: dict) -> str:
    """The README's Markdown table from the saved JSON."""
    rows = ["| variant | faces: HOG / upsampled / CNN / fixed box | pairs | 10-fold, 3,200 pairs "
            "(cosine) | euclidean | DevTrain threshold -> DevTest | 10-fold within DevTest |",
            "|---|---|---|---|---|---|---|"]
    for name, v in results["variants"].items():
        found = v["face_found_by"]
        faces = " / ".join(str(found.get(k, 0)) for k in ("hog0", "hog1", "cnn", "fixed"))
        cos, euc = v["cosine"], v["euclidean"]
        full = "tenfold_accuracy" in cos
        rows.append(" | ".join([
            f"| {name}", faces, "3,200" if full else "1,000 (DevTest)",
            f"{cos['tenfold_accuracy']:.4f} ± {cos['tenfold_std']:.4f}" if full else "-",
            f"{euc['tenfold_accuracy']:.4f}" if full else "-",
            f"{cos['devtest_accuracy']:.4f}" if full else "-",
            f"{cos['devtest_10fold_accuracy']:.4f} "
            f"(euclidean {euc['devtest_10fold_accuracy']:.4f}) |"]))
    return "\n".join(rows)


def _detect_hog(path):
    return detect(path, cnn=False)


if __name__ == "__main__":
    main()
