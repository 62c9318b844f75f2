"""The Python API in one script: embed a folder once, train heads on the cache in memory, use
a run on new images, and the scikit-learn way. Offline by default (random weights: the
accuracy means nothing); pass a real folder and backbone for real use:

    python examples/quickstart.py                                    # a tiny synthetic folder
    python examples/quickstart.py ../shared/datasets/lfw/lfw-deepfunneled --backbone dlib-resnet \
        --weights default --min-per-class 50
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline

import classify
import featurize


def synthetic_folder(root: Path, classes=("alice", "bob", "carol"), per_class=8) -> Path:
    """Images whose colour depends on the class, with noise."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 70 * c, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i:04d}.jpg")
    return root


def main(folder: Path, backbone: str, weights: str, input_size, min_per_class: int, work: Path):
    # 1. Embed once: incremental, locked, resumable; a re-run embeds only what changed.
    embedder = featurize.Embedder(backbone, weights=weights, input_size=input_size)
    cache = featurize.embed_folder(folder, embedder, cache=work / "cache", progress=False)
    print(f"cache: {cache.X.shape[0]} x {cache.X.shape[1]}, {len(cache.classes)} classes, "
          f"{cache.summary.embedded} embedded now, {len(cache.failed)} failed")

    # 2. Many heads on the cache, in memory: no file written.
    for head in ("logreg", "centroid", "knn"):
        run = classify.train(cache, head, min_per_class=min_per_class)
        print(f"{head}: accuracy {run.metrics['accuracy']:.3f}")

    # 3. Keep one, and use it on new images: embedded exactly as the cache was.
    run = classify.train(cache, "logreg", {"C": 10}, min_per_class=min_per_class)
    run.save(work / "runs" / "logreg")
    same = classify.Run.load(work / "runs" / "logreg")
    first = [int(np.flatnonzero(cache.y == k)[0]) for k in range(len(cache.classes))]
    images = [str(folder / cache.paths[i]) for i in first]  # one image of each class
    print("predicted:", list(same.predict(images)), "true:", cache.classes)
    print("in memory too:", np.asarray(embedder(images)).shape)

    # 4. The scikit-learn way: image paths in, a grid search over the head.
    paths = [str(folder / p) for p in cache.paths]
    labels = [cache.classes[i] for i in cache.y]
    model = make_pipeline(featurize.EmbeddingTransformer(backbone, weights=weights,
                                                         input_size=input_size,
                                                         cache=str(cache.path)),
                          LogisticRegression(max_iter=1000))
    search = GridSearchCV(model, {"logisticregression__C": [0.1, 10]}, cv=2).fit(paths, labels)
    print(f"grid search: best C {search.best_params_['logisticregression__C']}, "
          f"cv accuracy {search.best_score_:.3f}")


if __name__ == "__main__":  # worker processes import this script again: keep the call here
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", nargs="?", help="a folder of class folders (default: synthetic)")
    p.add_argument("--backbone", default="vggface-vgg16")
    p.add_argument("--weights", default="none")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--min-per-class", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = Path(args.folder) if args.folder else synthetic_folder(work / "images")
        size = args.input_size or (32 if not args.folder and args.weights == "none" else None)
        main(folder, args.backbone, args.weights, size, args.min_per_class, work)
