"""Install-and-smoke: what a new user does first, each step in a fresh Python, on real LFW
images with dlib's real pretrained model. `.ci/run` runs these (`-m smoke`) on every other
CPython 3.10-3.13 it finds, in a virtual environment installed as the README says; the full
suite runs them too. Skipped where ../shared/datasets/lfw or dlib is absent.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LFW_IMAGES, lfw_available

pytestmark = [
    pytest.mark.smoke,
    pytest.mark.skipif(not lfw_available(), reason="../shared/datasets/lfw not present"),
    pytest.mark.skipif(importlib.util.find_spec("dlib") is None,
                       reason="dlib not installed (pip install -e '.[dlib]')"),
]

PEOPLE = ("Colin_Powell", "Tony_Blair")
PER_PERSON = 6


def _python(*args, cwd: Path, check=True) -> subprocess.CompletedProcess:
    """`python ARGS` in a fresh interpreter, as a user types it."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Two people's real images and the dlib-resnet cache the command line makes of them."""
    root = tmp_path_factory.mktemp("smoke")
    for person in PEOPLE:
        (root / "faces" / person).mkdir(parents=True)
        for name in sorted(os.listdir(LFW_IMAGES / person))[:PER_PERSON]:
            (root / "faces" / person / name).symlink_to(LFW_IMAGES / person / name)
    done = _python("-m", "featurize", "faces", "--backbone", "dlib-resnet", "--out",
                   "cache/faces.h5", cwd=root)
    assert f"{2 * PER_PERSON} embedded" in done.stdout, done.stdout
    assert "featurize: 12 images to embed" in done.stderr  # the header says what will run
    assert "warning" not in done.stderr, done.stderr
    return root


def test_featurize_classify_and_predict_in_fresh_processes(smoke):
    done = _python("-m", "classify", "--cache", "cache/faces.h5", "--head", "logreg",
                   "--min-per-class", "3", "--out", "runs/logreg", cwd=smoke)
    assert "accuracy" in done.stdout.lower(), done.stdout
    photo = smoke / "faces" / PEOPLE[0] / sorted(os.listdir(smoke / "faces" / PEOPLE[0]))[0]
    done = _python("-m", "classify", "predict", str(photo), "--run", "runs/logreg", cwd=smoke)
    top = done.stdout.split("\n")[0]
    assert PEOPLE[0] in done.stdout.split(PEOPLE[1])[0] or PEOPLE[0] in top, done.stdout


def test_python_api_in_a_fresh_process(smoke):
    script = (
        "import featurize, classify\n"
        "cache = featurize.open_cache('cache/faces.h5')\n"
        f"assert cache.X.shape == ({2 * PER_PERSON}, 128), cache.X.shape\n"
        "run = classify.train(cache, head='centroid', min_per_class=3)\n"
        "root = cache.attrs['dataset_root']\n"
        "X = featurize.Embedder('dlib-resnet')([f'{root}/{p}' for p in cache.paths[:2]])\n"
        "assert abs(X - cache.X[:2]).max() < 1e-4, abs(X - cache.X[:2]).max()\n"
        "print('classes', sorted(run.classes))\n")
    done = _python("-c", script, cwd=smoke)
    assert f"classes {sorted(PEOPLE)}" in done.stdout, done.stdout


def test_export_is_read_back_by_pandas(smoke):
    _python("-m", "featurize", "export", "cache/faces.h5", "--format", "parquet", "export",
            cwd=smoke)
    done = _python("-c", "import pandas as pd; df = pd.read_parquet('export'); "
                   "print(len(df), len(df['embedding'][0]), sorted(set(df['label'])))", cwd=smoke)
    assert done.stdout.split()[:2] == [str(2 * PER_PERSON), "128"], done.stdout
    for person in PEOPLE:
        assert person in done.stdout
