"""LFW pair parsing and the 10-fold threshold protocol, on synthetic distances."""

import numpy as np
import pytest

from classify._verify import best_threshold, evaluate, parse_pairs
from classify.cli import main
from conftest import synthetic_cache
from featurize.errors import UserError


def write_view2(path, folds=10, per=3):
    lines = [f"{folds} {per}"]
    for k in range(folds):
        lines += [f"P{k}_{i} 1 2" for i in range(per)]
        lines += [f"P{k}_{i} 1 Q{k}_{i} 1" for i in range(per)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_view2_and_view1_formats(tmp_path):
    pairs = parse_pairs(write_view2(tmp_path / "pairs.txt"))
    assert len(pairs) == 60 and {p.fold for p in pairs} == set(range(10))
    assert pairs[0].a == "P0_0/P0_0_0001.jpg" and pairs[0].b == "P0_0/P0_0_0002.jpg" and pairs[0].same
    assert pairs[3].b == "Q0_0/Q0_0_0001.jpg" and not pairs[3].same
    (tmp_path / "dev.txt").write_text("2\nA 1 2\nB 3 4\nA 1 B 2\nC 1 D 1\n")
    dev = parse_pairs(tmp_path / "dev.txt")
    assert [p.same for p in dev] == [True, True, False, False]


@pytest.mark.parametrize("text, message", [
    ("10 300\nA 1 2\n", "promises 6000 pairs"),
    ("1\nA 1\nA 1 B 2\n", "matched pair is 'name i j'"),
    ("1\nA 1 2\nA 1 B\n", "mismatched pair"),
    ("hello\n", "expected '10 300'"),
    ("1\nA x 2\nA 1 B 2\n", "not an image number"),
])
def test_malformed_pair_files_name_the_line(tmp_path, text, message):
    (tmp_path / "p.txt").write_text(text)
    with pytest.raises(UserError, match=message):
        parse_pairs(tmp_path / "p.txt")


def test_best_threshold_has_the_known_answer():
    d = np.array([0.1, 0.2, 0.3, 0.45, 0.5, 0.9])
    same = np.array([1, 1, 1, 0, 1, 0], bool)
    t = best_threshold(d, same)
    # cut after 0.3 (5/6) or after 0.5 (5/6): the first best cut is taken
    assert t == pytest.approx(0.375)
    assert best_threshold(np.array([0.1, 0.2]), np.array([0, 0], bool)) < 0.1
    assert best_threshold(np.array([0.1, 0.1, 0.3]), np.array([1, 1, 0], bool)) == pytest.approx(0.2)


def test_folds_take_thresholds_from_the_other_folds(tmp_path):
    pairs = parse_pairs(write_view2(tmp_path / "pairs.txt", folds=10, per=20))
    same = np.array([p.same for p in pairs])
    rng = np.random.default_rng(0)
    d = np.where(same, rng.uniform(0.0, 0.5, len(same)), rng.uniform(0.4, 1.0, len(same)))
    r = evaluate(d, pairs)
    assert len(r["fold_accuracies"]) == 10 and 0.85 < r["accuracy"] < 1.0
    perfect = np.where(same, 0.2, 0.8)
    r = evaluate(perfect, pairs)
    assert r["accuracy"] == 1.0 and r["roc_auc"] == 1.0
    assert all(0.2 < t < 0.8 for t in r["thresholds"])
    # a threshold from a separate training set is used as is
    r = evaluate(perfect, pairs, train=(np.array([0.1, 0.15]), np.array([True, False])))
    assert r["threshold"] == pytest.approx(0.125) and r["accuracy"] == 0.5


def test_verify_end_to_end_on_a_cache(tmp_path, capsys):
    rng = np.random.default_rng(0)
    names = [f"P{k}_{i}" for k in range(10) for i in range(3)] + \
            [f"Q{k}_{i}" for k in range(10) for i in range(3)]
    paths, X, y = [], [], []
    for n, name in enumerate(names):
        centre = rng.normal(0, 1, 16)
        for j in (1, 2):
            paths.append(f"{name}/{name}_{j:04d}.jpg")
            X.append(centre + 0.05 * rng.normal(0, 1, 16))
            y.append(n)
    c = synthetic_cache(tmp_path / "c.h5", np.array(X), np.array(y), names, paths=paths)
    pairs = write_view2(tmp_path / "pairs.txt")
    assert main(["verify", "--pairs", str(pairs), "--cache", str(c), "--roc",
                 str(tmp_path / "roc.png"), "--out", str(tmp_path / "v")]) == 0
    out = capsys.readouterr().out
    assert "accuracy 1.0000 ± 0.0000 over 10 folds" in out and (tmp_path / "roc.png").stat().st_size
    (tmp_path / "more.txt").write_text("1\nZed 1 2\nP0_0 1 Q0_0 1\n")
    assert main(["verify", "--pairs", str(tmp_path / "more.txt"), "--cache", str(c)]) == 2
    assert "2 images of the pairs are not in" in capsys.readouterr().err
