"""Real accuracy on real LFW with dlib's ResNet descriptor (skipped without ../shared or dlib).

Featurizes the 12 people with at least 50 images plus the images of View 1 test pairs, once,
and checks identification and verification accuracy: by default on a subset (20 images a
person, the first 200 pairs: about 600 images); `-m slow` on all 1,560 images and 1,000 pairs.
"""

import os

import pytest

from conftest import LFW, LFW_IMAGES, lfw_available

pytestmark = [
    pytest.mark.skipif(not lfw_available(), reason="../shared/datasets/lfw not present"),
    pytest.mark.skipif(__import__("importlib").util.find_spec("dlib") is None,
                       reason="dlib not installed (pip install -e '.[dlib]')"),
]


SMALL = dict(per_person=20, pairs=200)  # CI's representative subset: about 600 images
FULL = dict(per_person=None, pairs=None)  # every image of the 12 people, all 1,000 pairs


def _lfw_cache(root, per_person, pairs):
    """A dlib-resnet cache of the people with >= 50 images (their first `per_person` images)
    and the images of the first `pairs` View 1 test pairs: (cache path, people, pairs)."""
    from classify._verify import parse_pairs
    from featurize.jobs.run import featurize
    root.mkdir()
    people = [p for p in sorted(os.listdir(LFW_IMAGES)) if len(os.listdir(LFW_IMAGES / p)) >= 50]
    for person in people:
        (root / person).mkdir()
        for name in sorted(os.listdir(LFW_IMAGES / person))[:per_person]:
            (root / person / name).symlink_to(LFW_IMAGES / person / name)
    lines = (LFW / "pairsDevTest.txt").read_text().split("\n")
    n = int(lines[0])  # View 1: n matched lines, then n mismatched ones
    k = min(n, (pairs or 2 * n) // 2)
    pair_file = root.parent / "pairs.txt"  # the first k of each kind, in View 1's format
    pair_file.write_text("\n".join([str(k)] + lines[1:1 + k] + lines[1 + n:1 + n + k]) + "\n")
    chosen = parse_pairs(pair_file)
    for pair in chosen:
        for rel in (pair.a, pair.b):
            target = root / rel
            target.parent.mkdir(exist_ok=True)
            if not target.exists():
                target.symlink_to(LFW_IMAGES / rel)
    s = featurize(root, backbone="dlib-resnet", cache_dir=root.parent / "cache", progress=False,
                  workers=os.cpu_count())
    assert s.failed_total == 0
    return s.path, people, pair_file


@pytest.fixture(scope="module", params=[
    pytest.param(SMALL, id="subset"), pytest.param(FULL, id="full", marks=pytest.mark.slow)])
def lfw_cache(request, tmp_path_factory):
    return _lfw_cache(tmp_path_factory.mktemp("lfw") / "lfw", **request.param), request.param


def test_identification_of_people_with_at_least_50_images(lfw_cache, tmp_path):
    from classify._train import train
    (path, people, _), size = lfw_cache
    r = train(path, "logreg", min_per_class=size["per_person"] or 50, runs_dir=tmp_path / "runs")
    assert r.classes == people and r.n_images == (1560 if size is FULL else 12 * 20)
    assert r.metrics["accuracy"] > 0.95, r.metrics


def test_view1_verification(lfw_cache, tmp_path):
    from classify._verify import verify
    (path, _, pairs), size = lfw_cache
    result = verify(path, pairs, roc_path=tmp_path / "roc.png")
    assert result["pairs"] == (size["pairs"] or 1000) and result["skipped"] == 0
    assert result["accuracy"] > 0.95 and result["roc_auc"] > 0.97, result
