"""Identification and verification on real LFW, through the project's own commands' code.

1. Identification, people with at least 20 images (62 classes, 3,023 images), stratified
   75/25 split, seed 0: every head.
2. People with at least 70 images (7 classes, 1,288 images), same protocol, beside
   scikit-learn's eigenfaces + SVM example computed here on exactly the same split.
3. Verification on View 1: threshold chosen on pairsDevTrain.txt, accuracy on pairsDevTest.txt
   (and the 10-fold protocol within pairsDevTest.txt).

    python benchmarks/lfw_results.py --backbone dlib-resnet --full
    python benchmarks/lfw_results.py --backbone vggface-resnet50 --weights none --input-size 112

Embeds only the images it needs (people with enough images + the View 1 pair images) into the
usual cache, so a second run reuses it. Writes benchmarks/results/lfw_<backbone>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from classify._heads import HEADS
from classify._train import train
from classify._verify import parse_pairs, verify
from common import LFW, command_line, lfw_images, people_subset, save
from featurize.jobs.run import featurize


def subset_folder(root: Path, min_images: int, pair_files, dest: Path) -> Path:
    """Symlinks: whole folders of people with >= min_images, single files for pair images."""
    people_subset(root, min_images, dest)
    for pairs in pair_files:
        for pair in parse_pairs(pairs):
            for rel in (pair.a, pair.b):
                target = dest / rel
                if target.parent.is_symlink() or target.exists():
                    continue
                target.parent.mkdir(exist_ok=True)
                target.symlink_to(root / rel)
    return dest


def eigenfaces_svm(root: Path, split: dict, classes: list[str], seed: int = 0) -> dict:
    """scikit-learn's 'Faces recognition example using eigenfaces and SVMs', same split."""
    from PIL import Image
    from scipy.stats import loguniform
    from sklearn.decomposition import PCA
    from sklearn.model_selection import RandomizedSearchCV
    from sklearn.svm import SVC

    from classify._report import evaluate

    def load(paths):
        # fetch_lfw_people(resize=0.4): crop rows 70:195, cols 78:172, grey, 50x37 pixels
        return np.stack([np.asarray(Image.open(root / p).convert("L").crop((78, 70, 172, 195))
                                    .resize((37, 50), Image.BILINEAR), np.float32).ravel() / 255
                         for p in paths])

    fold = split["folds"][0]
    label = {c: i for i, c in enumerate(classes)}
    ytr = np.array([label[p.split("/")[0]] for p in fold["train"]])
    yte = np.array([label[p.split("/")[0]] for p in fold["test"]])
    t0 = time.perf_counter()
    Xtr, Xte = load(fold["train"]), load(fold["test"])
    pca = PCA(n_components=150, svd_solver="randomized", whiten=True, random_state=seed).fit(Xtr)
    search = RandomizedSearchCV(SVC(kernel="rbf", class_weight="balanced"),
                                {"C": loguniform(1e3, 1e5), "gamma": loguniform(1e-4, 1e-1)},
                                n_iter=10, random_state=seed)
    search.fit(pca.transform(Xtr), ytr)
    pred = search.predict(pca.transform(Xte))
    return {**evaluate(yte, pred, n_classes=len(classes)), "seconds": time.perf_counter() - t0}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="dlib-resnet")
    p.add_argument("--weights", default="default")
    p.add_argument("--input-size", type=int)
    p.add_argument("--lfw", help="LFW image root (default ../shared/datasets/lfw/lfw-deepfunneled)")
    p.add_argument("--pairs-dir", default=str(LFW), help="folder with pairsDevTrain/Test.txt")
    p.add_argument("--heads", default=",".join(HEADS))
    p.add_argument("--workers", type=int)
    p.add_argument("--skip-verify", action="store_true", help="identification only")
    p.add_argument("--full", action="store_true",
                   help="embed all of LFW (one cache for every experiment) instead of the subset")
    args = p.parse_args()
    root = lfw_images(args.lfw)
    pairs = [Path(args.pairs_dir) / "pairsDevTrain.txt", Path(args.pairs_dir) / "pairsDevTest.txt"]
    work = Path(tempfile.gettempdir()) / "lfw_results_subset"
    folder = root if args.full else subset_folder(
        root, 20, [] if args.skip_verify else pairs, work / ("lfw_ident" if args.skip_verify else "lfw"))
    t0 = time.perf_counter()
    s = featurize(folder, backbone=args.backbone, weights=args.weights,
                  input_size=args.input_size, workers=args.workers, progress=True)
    embed_seconds = time.perf_counter() - t0
    print(f"cache {s.path}: {s.total} images, {s.embedded} embedded now "
          f"({embed_seconds:.0f} s), {s.failed_total} failed")
    out = {"backbone": args.backbone, "weights": args.weights, "input_size": args.input_size,
           "cache": str(s.path), "images": s.total, "embedded_now": s.embedded,
           "embed_seconds": embed_seconds, "identification": {}}
    with tempfile.TemporaryDirectory() as runs_dir:
        for min_per_class, heads in ((20, args.heads.split(",")), (70, args.heads.split(","))):
            rows = {}
            for head in heads:
                r = train(s.path, head, min_per_class=min_per_class, runs_dir=runs_dir)
                rows[head] = {"accuracy": r.metrics["accuracy"], "macro_f1": r.metrics["macro_f1"],
                              "train_seconds": r.train_seconds, "classes": len(r.classes),
                              "images": r.n_images}
                print(f">= {min_per_class}: {head:<9} {len(r.classes)} classes {r.n_images} images "
                      f"acc {r.metrics['accuracy']:.4f} macroF1 {r.metrics['macro_f1']:.4f} "
                      f"train {r.train_seconds:.2f} s", flush=True)
                if min_per_class == 70 and head == heads[0]:
                    split = json.loads((r.run_dir / "split.json").read_text())
                    eig = eigenfaces_svm(root, split, r.classes)
                    rows["eigenfaces+svm (scikit-learn example, same split)"] = eig
                    print(f">= 70: eigenfaces+svm acc {eig['accuracy']:.4f} "
                          f"macroF1 {eig['macro_f1']:.4f}", flush=True)
            out["identification"][f"min_{min_per_class}"] = rows
    name = "lfw_" + args.backbone.replace("-", "_") + ("_random" if args.weights == "none" else "")
    if args.skip_verify:
        return save(name, out, command_line())
    v1 = verify(s.path, pairs[1], train_pairs=pairs[0])
    v10 = verify(s.path, pairs[1])
    out["verification_view1"] = {
        "threshold_from_devtrain": v1["threshold"], "devtest_accuracy": v1["accuracy_all"],
        "devtest_10fold_accuracy": v10["accuracy"], "devtest_10fold_std": v10["accuracy_std"],
        "roc_auc": v10["roc_auc"], "pairs": v10["pairs"]}
    print(f"View 1: threshold {v1['threshold']:.4f} from pairsDevTrain -> pairsDevTest accuracy "
          f"{v1['accuracy_all']:.4f}; 10-fold within DevTest {v10['accuracy']:.4f} ± "
          f"{v10['accuracy_std']:.4f}, AUC {v10['roc_auc']:.4f}")
    save(name, out, command_line())


if __name__ == "__main__":
    main()
