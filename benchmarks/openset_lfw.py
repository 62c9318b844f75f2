"""Open-set identification baselines on an LFW cache: DIR at FAR 0.1/0.01/0.001, auc_open,
and DIR/FAR at a threshold learnt from the training images only.

Protocol (the one of `python -m classify --open-set --min-per-class 20`): the known people
are those with >= 20 images, split 75/25 by the seed (their test images are the known
probes); the unknown probes are up to 2,000 images of people with fewer, whole people in a
seeded order. Every method sees the same split.

    python benchmarks/openset_lfw.py --cache /work/lfwcache/lfw-deepfunneled-...dlib-resnet...h5

Methods (each: its own top-1 and its own score). The threshold is learnt as runs learn it:
the (1 - target FAR) quantile of the scores of the background (the people with fewer than
20 images beyond the unknown probes, never the probes' people), each person weighing the
same:
- logreg max softmax: the max probability of the default logreg head;
- centroid cosine: cosine to the nearest class centroid (nearest-centroid top-1);
- nearest-neighbour cosine: similarity to the nearest training image (1-NN top-1);
- run (logreg + centroid cosine): what `python -m classify --open-set` (default logreg head)
  stores and `predict` applies: logreg names the person, the centroid score rejects;
- centroid cosine, leave-one-identity-out threshold: the threshold from the known people's
  training images alone (what runs fall back to without a background).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from classify import _data as data, _heads as heads, _openset as openset
from classify._options import TrainOptions
from common import command_line, save
from featurize import cache as cache_io

METHODS = ("logreg max softmax", "centroid cosine", "nearest-neighbour cosine",
           "run (logreg + centroid cosine)", "centroid cosine, leave-one-identity-out threshold")


def one_seed(c, seed, target_far, max_unknown, min_per_class=20):
    o = TrainOptions("logreg", open_set=True, min_per_class=min_per_class, seed=seed,
                     max_unknown=max_unknown, target_far=target_far)
    sel, unknowns = data.open_set_selection(c, o)
    (tr, te), = data.splits(sel.y, o.test_size, None, seed)
    Xtr, ytr, Xte, yte, Xu = sel.X[tr], sel.y[tr], sel.X[te], sel.y[te], unknowns.X
    model = data.pipeline(heads.get_head("logreg").make(), True, False, None, seed).fit(Xtr, ytr)
    rejector = openset.Rejector.fit(Xtr, ytr, len(sel.classes), target_far, unknowns.background,
                                    unknowns.background_people)
    gallery = openset.unit(Xtr)

    def msp(X):
        p = model.predict_proba(X)
        return p.max(1), model.classes_[p.argmax(1)]

    def centroid(X):
        s = openset.unit(X) @ rejector.centroids.T
        return s.max(1), s.argmax(1)

    def nearest(X):
        s = openset.unit(X) @ gallery.T
        return s.max(1), ytr[s.argmax(1)]

    def run(X):
        return centroid(X)[0], model.predict(X)

    rows = {}
    for method, score in zip(METHODS, (msp, centroid, nearest, run)):
        (known, top1), (unknown, _) = score(Xte), score(Xu)
        background = score(unknowns.background)[0]
        threshold = openset.threshold_for_far(background, target_far,
                                              groups=unknowns.background_people)
        rows[method] = openset.figures(known, top1 == yte, unknown, threshold)
    loio = openset.Rejector.fit(Xtr, ytr, len(sel.classes), target_far)
    rows[METHODS[4]] = openset.figures(*centroid(Xte)[:1], centroid(Xte)[1] == yte,
                                       centroid(Xu)[0], loio.threshold)
    counts = {"known_identities": len(sel.classes), "known_probes": len(te),
              "train_images": len(tr), "unknown_identities": unknowns.n_identities,
              "unknown_probes": len(Xu), "background_images": len(unknowns.background),
              "background_identities": len(np.unique(unknowns.background_people)),
              "run_threshold": rejector.threshold, "run_threshold_from": rejector.source}
    return rows, counts


def flat(figures: dict) -> dict:
    out = {f"dir@{f}": v for f, v in figures["dir_at_far"].items()}
    out.update(auc_open=figures["auc_open"], dir=figures["dir"], far=figures["far"])
    return out


def table(per_seed: list[dict]) -> tuple[str, dict]:
    keys = list(flat(per_seed[0][METHODS[0]]))
    summary = {}
    lines = ["| method | DIR@FAR 0.1 | DIR@FAR 0.01 | DIR@FAR 0.001 | auc_open | learnt "
             "threshold: DIR | learnt threshold: FAR |", "|---" * 7 + "|"]
    for method in METHODS:
        values = np.array([[flat(rows[method])[k] for k in keys] for rows in per_seed])
        mean, std = values.mean(0), values.std(0)
        summary[method] = {k: {"mean": float(m), "std": float(s)}
                           for k, m, s in zip(keys, mean, std)}
        cells = [f"{m:.4f} ± {s:.4f}" if len(per_seed) > 1 else f"{m:.4f}"
                 for m, s in zip(mean, std)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines), summary


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", required=True, help="a dlib-resnet cache of the full LFW")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--target-far", type=float, default=0.01)
    p.add_argument("--max-unknown", type=int, default=2000)
    p.add_argument("--min-per-class", type=int, default=20, help="known people: at least this "
                   "many images (default 20; results saved as openset_lfw_minN otherwise)")
    args = p.parse_args()
    c = cache_io.read(args.cache)
    t0 = time.perf_counter()
    per_seed, counts = [], []
    for seed in range(args.seeds):
        rows, n = one_seed(c, seed, args.target_far, args.max_unknown, args.min_per_class)
        per_seed.append(rows)
        counts.append(n)
        print(f"seed {seed}: {n}; " + "; ".join(
            f"{m}: DIR@0.01 {r['dir_at_far']['0.01']:.4f}, learnt DIR {r['dir']:.4f} "
            f"FAR {r['far']:.4f}" for m, r in rows.items()))
    text, summary = table(per_seed)
    print(text)
    name = "openset_lfw" + ("" if args.min_per_class == 20 else f"_min{args.min_per_class}")
    save(name, {"cache": str(args.cache), "backbone": c.attrs.get("backbone"),
                "min_per_class": args.min_per_class, "seeds": list(range(args.seeds)),
                "target_far": args.target_far, "max_unknown": args.max_unknown,
                "counts": counts, "summary": summary, "per_seed": per_seed, "table": text,
                "seconds": time.perf_counter() - t0}, command_line())


if __name__ == "__main__":
    main()
