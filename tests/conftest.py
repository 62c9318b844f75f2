import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import pytest
from PIL import Image

LFW = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "lfw"
LFW_IMAGES = LFW / "lfw-deepfunneled"


def write_image(path: Path, seed: int, size=(40, 40), fmt=None, mode="RGB"):
    """A random but structured image (a class-dependent colour plus noise)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


def make_folder(root: Path, classes=("alice", "bob", "carol"), per_class=4, ext=".jpg"):
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"{name}_{i:04d}{ext}", seed=100 * c + i)
    return root


@pytest.fixture
def image_folder(tmp_path):
    return make_folder(tmp_path / "faces")


@pytest.fixture(autouse=True)
def _isolated_keras_home(tmp_path, monkeypatch):
    """Weights are never looked up or downloaded in the user's real ~/.keras."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))


def same(rtol=1e-4) -> float:
    """Relative tolerance for "the same computation": `rtol` in float32 on a CPU; GPUs run
    float32 convolutions on TF32 matrix units with batch-size-dependent kernels (measured on
    the lent H100 with JAX: differences up to ~1e-2 relative on small values)."""
    from featurize.extractor import accelerator
    return 1e-2 if accelerator() else rtol


def lfw_available() -> bool:
    return LFW_IMAGES.is_dir()


def synthetic_cache(path: Path, X, y, classes, paths=None, backbone="vggface-vgg16",
                    weights="random-seed0", weights_file="random"):
    """A cache file with given embeddings, written through featurize's own cache module."""
    from featurize import cache
    from featurize.extractor import EmbeddingSettings
    from featurize.images import Dataset, Item

    settings = EmbeddingSettings(backbone=backbone, weights=weights, weights_file=weights_file,
                                 layer="", pooling="avg", input_size=32, crop=0.0, flip=False,
                                 preprocessing="vggface1", precision="float32", jitter=0)
    if paths is None:
        paths = [f"{classes[label]}/{classes[label]}_{i:04d}.jpg" if label >= 0 else f"x_{i:04d}.jpg"
                 for i, label in enumerate(y)]
    items = [Item(p, p, classes[label] if label >= 0 else None, 1, 1) for p, label in zip(paths, y)]
    order = sorted(range(len(items)), key=lambda i: items[i].key)
    journal = cache.Journal(path, settings)
    journal.add([items[i] for i in order], np.asarray(X, np.float32)[order])
    journal.flush()
    dataset = Dataset(path.parent, "synthetic", sorted(items, key=lambda it: it.key),
                      sorted({c for c, label in zip(classes, range(len(classes)))
                              if label in set(int(v) for v in y)}))
    cache.commit(path, settings, dataset, {"keras_version": "test", "backend": "none"})
    return path


def blobs(n_classes=5, per_class=30, dim=32, spread=0.3, seed=0):
    """Well separated Gaussian classes."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (n_classes, dim))
    X = np.concatenate([centres[c] + spread * rng.normal(0, 1, (per_class, dim))
                        for c in range(n_classes)])
    y = np.repeat(np.arange(n_classes), per_class)
    return X, y, [f"person{c}" for c in range(n_classes)]


@pytest.fixture
def http_server(tmp_path):
    """Serves tmp_path/served on 127.0.0.1; yields (folder, base_url, stop)."""
    import http.server
    import threading
    from functools import partial

    served = tmp_path / "served"
    served.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stopped = []

    def stop():
        if not stopped:
            server.shutdown()
            server.server_close()
            stopped.append(True)
    yield served, f"http://127.0.0.1:{server.server_address[1]}/", stop
    stop()
