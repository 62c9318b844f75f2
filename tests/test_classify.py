"""classify on synthetic caches with known structure, and from images through a saved run."""

import json

import h5py
import numpy as np
import pytest

from classify import _heads as heads
from classify._data import select
from classify._runs import load
from classify._train import train
from classify.cli import main
from conftest import blobs, synthetic_cache, write_image
from featurize import cache
from featurize.jobs.run import featurize


@pytest.fixture
def separable(tmp_path):
    X, y, classes = blobs()
    return synthetic_cache(tmp_path / "blobs.h5", X, y, classes)


def test_separable_classes_are_learned_and_random_labels_stay_near_chance(tmp_path, separable):
    r = train(separable, "logreg", runs_dir=tmp_path / "runs")
    assert r.metrics["accuracy"] > 0.95 and r.metrics["macro_f1"] > 0.95
    X, _, classes = blobs()
    y_random = np.random.default_rng(1).integers(0, 5, len(X))
    noise = synthetic_cache(tmp_path / "noise.h5", X, y_random, classes)
    r = train(noise, "logreg", runs_dir=tmp_path / "runs")
    assert r.metrics["accuracy"] < 0.45  # chance is 0.2


@pytest.mark.parametrize("head", list(heads.HEADS))
def test_every_head_trains_saves_reloads_and_predicts_identically(head, tmp_path, separable):
    r = train(separable, head, runs_dir=tmp_path / "runs")
    assert r.metrics["accuracy"] > 0.9, r.metrics
    files = {p.name for p in r.run_dir.iterdir()}
    assert {"run.json", "split.json", "metrics.json", "report.txt", "confusion.png",
            "head.skops"} <= files
    assert "head.joblib" not in files  # no pickle: loading a run runs none of its content
    assert ("head.keras" in files) == (head == "dense")
    record, pipeline = load(r.run_dir)
    c = cache.read(separable)
    trained = json.loads((r.run_dir / "split.json").read_text())["folds"][0]
    test_rows = [c.paths.index(p) for p in trained["test"]]
    X = c.embeddings[test_rows]
    again = train(separable, head, runs_dir=tmp_path / "runs2")
    _, pipeline2 = load(again.run_dir)
    np.testing.assert_array_equal(pipeline.predict(X), pipeline2.predict(X))
    np.testing.assert_allclose(heads.scores(pipeline, X), heads.scores(pipeline2, X), atol=1e-5)
    assert record["metrics"]["accuracy"] == pytest.approx(r.metrics["accuracy"])


def test_split_is_the_same_for_every_head_and_depends_on_the_seed(tmp_path, separable):
    a = train(separable, "logreg", runs_dir=tmp_path / "runs")
    b = train(separable, "centroid", runs_dir=tmp_path / "runs")
    c = train(separable, "logreg", seed=1, runs_dir=tmp_path / "runs")
    def split(r):
        return json.loads((r.run_dir / "split.json").read_text())["folds"]
    assert split(a) == split(b) and split(a) != split(c)
    test = split(a)[0]["test"]
    assert len(test) == round(0.25 * 150) and not set(test) & set(split(a)[0]["train"])


def test_min_per_class_selection_matches_a_direct_count(tmp_path):
    rng = np.random.default_rng(0)
    counts = [1, 2, 5, 9, 20, 3]
    y = np.repeat(np.arange(6), counts)
    path = synthetic_cache(tmp_path / "c.h5", rng.normal(0, 1, (len(y), 8)), y,
                           [f"p{i}" for i in range(6)])
    c = cache.read(path)
    for n in (1, 3, 9):
        sel = select(c, min_per_class=n, min_needed=1)
        assert sel.classes == [f"p{i}" for i, k in enumerate(counts) if k >= n]
        assert len(sel.y) == sum(k for k in counts if k >= n)
    sel = select(c, min_per_class=1, max_per_class=4)
    assert len(sel.y) == 1 * 0 + 2 + 4 + 4 + 4 + 3 and "dropped 1 classes" in sel.notes[0]


def test_cross_validation_reports_mean_and_std(tmp_path, separable):
    r = train(separable, "centroid", cv=5, runs_dir=tmp_path / "runs")
    assert "accuracy_std" in r.metrics and r.metrics["accuracy"] > 0.9
    record = json.loads((r.run_dir / "run.json").read_text())
    assert len(record["folds"]) == 5


def test_runs_table_lists_runs_newest_first(tmp_path, separable, capsys):
    train(separable, "logreg", runs_dir=tmp_path / "runs", out=tmp_path / "runs" / "a-logreg")
    train(separable, "knn", runs_dir=tmp_path / "runs", out=tmp_path / "runs" / "b-knn")
    assert main(["runs", "--runs-dir", str(tmp_path / "runs")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("run") and len(lines) == 3
    assert {lines[1].split()[1], lines[2].split()[1]} == {"logreg", "knn"}


def test_predict_goes_from_image_to_label_through_a_saved_run(tmp_path, capsys):
    from PIL import Image
    folder = tmp_path / "colours"
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}
    rng = np.random.default_rng(0)
    for name, rgb in colours.items():
        for i in range(8):
            arr = np.clip(np.array(rgb) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            (folder / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(folder / name / f"{name}_{i}.png")
    s = featurize(folder, backbone="vggface-vgg16", weights="none", input_size=32,
                  cache_dir=tmp_path / "cache", progress=False)
    r = train(s.path, "logreg", runs_dir=tmp_path / "runs")
    new = tmp_path / "new.png"
    arr = np.clip(np.array(colours["green"]) + rng.normal(0, 20, (32, 32, 3)), 0, 255)
    Image.fromarray(arr.astype(np.uint8)).save(new)
    (tmp_path / "broken.jpg").write_text("nope")
    assert main(["predict", str(new), str(tmp_path / "broken.jpg"), "--run", str(r.run_dir),
                 "--json"]) == 1  # an input that is not an image: exit 1, the rest printed
    out = json.loads(capsys.readouterr().out)
    assert out[0]["prediction"] == "green" and out[0]["top"][0]["probability"] > 0.5
    assert out[1]["error"] == "not an image"
    r2 = train(s.path, "centroid", runs_dir=tmp_path / "runs")
    assert main(["predict", str(new), "--run", str(r2.run_dir)]) == 0
    assert capsys.readouterr().out.split(": ")[1].startswith("green")


def test_errors_are_one_line_and_leave_no_run_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    X, y, classes = blobs(n_classes=3, per_class=4)
    labelled = synthetic_cache(tmp_path / "ok.h5", X, y, classes)
    unlabelled = synthetic_cache(tmp_path / "flat.h5", X, -np.ones(len(y), int), classes)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = [1, 2, 3]
    one = synthetic_cache(tmp_path / "one.h5", X[:4], np.zeros(4, int), classes[:1])
    cases = [
        ([], "no cache found under data/cache"),
        (["--cache", "junk.h5"], "not a readable HDF5 file"),
        (["--cache", "foreign.h5"], "not a featurize cache"),
        (["--cache", str(unlabelled)], "has no labels"),
        (["--cache", str(one)], "only 1 class"),
        (["--cache", str(labelled), "--min-per-class", "5"], "only 0 class"),
        (["--cache", str(labelled), "--head", "forest"], "unknown head 'forest'.*logreg"),
        (["--cache", str(labelled), "--param", "gamma=2"], "no parameter gamma; valid: .*C"),
        (["--cache", str(labelled), "--param", "C"], "key=value"),
        (["--cache", str(labelled), "--test-size", "0.05"], "fewer test images than the 3"),
        (["predict", "nothing.jpg", "--run", str(tmp_path)], "not a run folder"),
        (["verify", "--pairs", "missing.txt", "--cache", str(labelled)], "cannot read pairs file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        assert __import__("re").search(message, err), (argv, err)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_predict_says_which_weights_are_missing(tmp_path, capsys):
    X, y, classes = blobs(n_classes=3, per_class=8)
    path = synthetic_cache(tmp_path / "c.h5", X, y, classes, weights="ab" * 32,
                           weights_file="rcmalli_vggface_tf_notop_vgg16.h5")
    r = train(path, "logreg", runs_dir=tmp_path / "runs")
    image = tmp_path / "x.png"
    write_image(image, seed=1, fmt="PNG")
    assert main(["predict", str(image), "--run", str(r.run_dir)]) == 2
    err = capsys.readouterr().err
    assert "rcmalli_vggface_tf_notop_vgg16.h5, sha256 abababababab" in err and "not present" in err


def test_truncated_cache_and_edited_run_are_clear_errors(tmp_path, separable, capsys):
    r = train(separable, "logreg", runs_dir=tmp_path / "runs")
    (r.run_dir / "run.json").write_text('{"head": "logreg"}')
    assert main(["predict", str(separable), "--run", str(r.run_dir)]) == 2
    assert "edited by hand" in capsys.readouterr().err
    data = separable.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    assert main(["--cache", str(tmp_path / "cut.h5")]) == 2
    assert "not a readable HDF5 file" in capsys.readouterr().err


def test_too_small_classes_are_dropped_with_a_note(tmp_path, capsys):
    X, y, classes = blobs(n_classes=4, per_class=10)
    y = y.copy()
    keep = np.ones(len(y), bool)
    keep[np.flatnonzero(y == 3)[1:]] = False  # person3 keeps one image only
    path = synthetic_cache(tmp_path / "c.h5", X[keep], y[keep], classes)
    assert main(["--cache", str(path), "--runs-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "dropped 1 classes with fewer than 2 images" in out and "3 classes" in out
