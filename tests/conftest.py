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


def lfw_available() -> bool:
    return LFW_IMAGES.is_dir()
