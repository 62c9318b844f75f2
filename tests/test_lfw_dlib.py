"""Real accuracy on real LFW with dlib's ResNet descriptor (skipped without ../shared or dlib).

Featurizes the 12 people with at least 50 images (1,560 images) plus the images of the View 1
test pairs, once, and checks identification and verification accuracy.
"""

import os

import pytest

from conftest import LFW, LFW_IMAGES, lfw_available

pytestmark = [
    pytest.mark.skipif(not lfw_available(), reason="../shared/datasets/lfw not present"),
    pytest.mark.skipif(__import__("importlib").util.find_spec("dlib") is None,
                       reason="dlib not installed (pip install -e '.[dlib]')"),
]


@pytest.fixture(scope="module")
def lfw_cache(tmp_path_factory):
    from classify.verify import parse_pairs
    from featurize.run import featurize
    root = tmp_path_factory.mktemp("lfw") / "lfw"
    root.mkdir()
    people = [p for p in sorted(os.listdir(LFW_IMAGES)) if len(os.listdir(LFW_IMAGES / p)) >= 50]
    for person in people:
        (root / person).symlink_to(LFW_IMAGES / person)
    for pair in parse_pairs(LFW / "pairsDevTest.txt"):
        for rel in (pair.a, pair.b):
            target = root / rel
            if not target.parent.is_symlink():
                target.parent.mkdir(exist_ok=True)
                if not target.exists():
                    target.symlink_to(LFW_IMAGES / rel)
    s = featurize(root, backbone="dlib-resnet", cache_dir=root.parent / "cache", progress=False,
                  workers=os.cpu_count())
    assert s.failed_total == 0
    return s.path, people


def test_identification_of_people_with_at_least_50_images(lfw_cache, tmp_path):
    from classify.train import train
    path, people = lfw_cache
    r = train(path, "logreg", min_per_class=50, runs_dir=tmp_path / "runs")
    assert r.classes == people and r.n_images == 1560
    assert r.metrics["accuracy"] > 0.95, r.metrics


def test_view1_verification(lfw_cache, tmp_path):
    from classify.verify import verify
    path, _ = lfw_cache
    result = verify(path, LFW / "pairsDevTest.txt", roc_path=tmp_path / "roc.png")
    assert result["pairs"] == 1000 and result["skipped"] == 0
    assert result["accuracy"] > 0.95 and result["roc_auc"] > 0.97, result
