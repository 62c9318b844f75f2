"""Open-set identification (issue #15, section 3): `--open-set` holds out whole people as
unknowns and reports DIR/FAR in metrics.json; the rejection threshold comes from the training
images alone and is saved with the run; `predict` (CLI and Run.predict) answers `unknown`
below it, with the score in --json."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import classify
from classify import _openset as openset, cli
from classify._options import TrainOptions
from conftest import blobs, call_cli, one_line_error, synthetic_cache
from featurize import cache as cache_io
from featurize.errors import UserError, command_line_text


def cache_of(tmp_path, big=6, small=8, per_big=20, per_small=3, name="c.h5", seed=0):
    """`big` people with `per_big` images and `small` with `per_small` (well separated)."""
    X, y, classes = blobs(n_classes=big + small, per_class=per_big, dim=24, spread=0.3, seed=seed)
    keep = (y < big) | (np.arange(len(y)) % per_big < per_small)
    return synthetic_cache(tmp_path / name, X[keep], y[keep], classes), X[keep], y[keep], classes


def brute_force(known_scores, correct, unknown_scores):
    """DIR and FAR at every candidate threshold, straight from their definitions."""
    points = []
    for t in np.unique(np.r_[known_scores, unknown_scores, np.inf]):
        points.append((np.mean(unknown_scores >= t), np.mean((known_scores >= t) & correct)))
    return np.array(sorted(points))


def test_dir_at_far_and_auc_follow_the_definitions():
    rng = np.random.default_rng(3)
    known = rng.normal(0.7, 0.1, 300)
    correct = rng.random(300) < 0.9
    unknown = rng.normal(0.4, 0.12, 2000)
    f = openset.figures(known, correct, unknown, threshold=0.55)
    points = brute_force(known, correct, unknown)
    for far, value in f["dir_at_far"].items():
        assert value == pytest.approx(points[points[:, 0] <= float(far), 1].max())
    assert f["auc_open"] == pytest.approx(np.trapezoid(points[:, 1], points[:, 0]))
    assert f["auc_open"] <= correct.mean()  # a wrong top-1 never counts
    assert (f["dir"], f["far"]) == (np.mean((known >= 0.55) & correct), np.mean(unknown >= 0.55))


def test_the_threshold_weighs_each_person_the_same():
    rng = np.random.default_rng(0)
    # one person with many high pseudo-unknown scores, many people with one low score each
    scores = np.r_[rng.uniform(0.8, 0.9, 500), rng.uniform(0.1, 0.5, 99)]
    groups = np.r_[np.zeros(500, int), np.arange(1, 100)]
    t = openset.threshold_for_far(scores, 0.05, groups)
    weight = 1.0 / np.bincount(groups)[groups]
    share_above = weight[scores > t].sum() / weight.sum()
    assert share_above <= 0.05 + 1e-9 < weight[scores >= t].sum() / weight.sum()
    assert t < openset.threshold_for_far(scores, 0.05) == pytest.approx(np.quantile(scores, 0.95))


def test_open_set_holds_out_the_people_min_per_class_excludes(tmp_path):
    path, X, y, classes = cache_of(tmp_path)
    run = classify.train(path, "logreg", min_per_class=10, open_set=True)
    m = run.metrics["open_set"]
    assert run.classes == classes[:6]
    assert (m["n_known_identities"], m["n_unknown_identities"], m["n_unknown_probes"]) == \
        (6, 8, 24)
    unknown = set(run.split["unknown"])
    fold = run.split["folds"][0]
    assert len(unknown) == 24 and not unknown & set(fold["train"] + fold["test"])
    assert {p.split("/")[0] for p in unknown} == set(classes[6:])
    assert m["n_known_probes"] == len(fold["test"])
    assert set(m["dir_at_far"]) == {"0.1", "0.01", "0.001"}
    assert m["threshold_from"] == openset.FROM_TRAINING  # every left-out person is a probe
    # well separated people: every known probe is named and kept, the unknowns rejected
    assert m["dir_at_far"]["0.01"] == 1.0 and m["dir"] == 1.0 and m["far"] <= 0.1
    # the cap on unknown probes takes whole people in a seeded order
    chosen = [set(classify.train(path, "logreg", min_per_class=10, open_set=True, seed=s,
                                 max_unknown=4).split["unknown"]) for s in (0, 1, 2)]
    assert all(len(c) == 4 for c in chosen) and len({frozenset(c) for c in chosen}) > 1


def test_without_exclusions_a_seeded_fraction_of_the_people_is_held_out(tmp_path):
    X, y, classes = blobs(n_classes=8, per_class=8, dim=16, seed=1)
    path = synthetic_cache(tmp_path / "c.h5", X, y, classes)
    held = {}
    for seed in range(3):
        run = classify.train(path, "centroid", open_set=True, seed=seed)
        held[seed] = {p.split("/")[0] for p in run.split["unknown"]}
        assert len(held[seed]) == 2 and not held[seed] & set(run.classes)
        assert len(run.classes) == 6
    assert len({frozenset(h) for h in held.values()}) > 1
    run = classify.train(path, "centroid", open_set=True, unknown_fraction=0.5)
    assert run.metrics["open_set"]["n_unknown_identities"] == 4 and len(run.classes) == 4


def test_the_threshold_comes_from_the_training_images_only(tmp_path):
    path, X, y, classes = cache_of(tmp_path)
    run = classify.train(path, "logreg", min_per_class=10, open_set=True)
    # other unknown people (now close to person0), same known people: the same threshold
    moved = np.where((y >= 6)[:, None], X[y == 0][:1] + 0.01 * X, X)
    other = synthetic_cache(tmp_path / "moved.h5", moved, y, classes)
    again = classify.train(other, "logreg", min_per_class=10, open_set=True)
    assert again.threshold == run.threshold
    assert again.metrics["open_set"] != run.metrics["open_set"]
    # ... and it is the leave-one-identity-out quantile of the training rows of split.json
    rows = cache_io.read(path)
    train = [rows.paths.index(p) for p in run.split["folds"][0]["train"]]
    labels = np.array([run.classes.index(rows.paths[i].split("/")[0]) for i in train])
    expected = openset.Rejector.fit(rows.embeddings[train], labels, 6, 0.01)
    assert run.threshold == expected.threshold
    np.testing.assert_allclose(run.rejector.centroids, expected.centroids)


def test_the_threshold_is_learnt_from_background_people_when_there_are_enough(tmp_path):
    path, X, y, classes = cache_of(tmp_path, small=40)
    run = classify.train(path, "logreg", min_per_class=10, open_set=True, max_unknown=29,
                         target_far=0.1)
    m = run.metrics["open_set"]
    probe_people = {p.split("/")[0] for p in run.split["unknown"]}
    assert len(probe_people) == 10 and m["n_unknown_probes"] == 29  # the 10th cut short
    # the background: the other left-out people, none of them among the probes
    background = np.isin(y, [k for k in range(6, 46) if classes[k] not in probe_people])
    assert m["threshold_from"] == openset.FROM_BACKGROUND
    assert m["n_background_images"] == background.sum() == 90
    expected = openset.threshold_for_far(run.open_set_score(X[background]), 0.1,
                                         groups=y[background])
    assert run.threshold == pytest.approx(expected, rel=1e-6)
    # too small a background for the target (fewer than 5 / 0.01 images): the training people
    few = classify.train(path, "logreg", min_per_class=10, open_set=True, max_unknown=29)
    assert few.metrics["open_set"]["threshold_from"] == openset.FROM_TRAINING


def test_predict_answers_unknown_below_the_threshold_in_python_and_saved(tmp_path):
    path, X, y, classes = cache_of(tmp_path)
    run = classify.train(path, "knn", min_per_class=10, open_set=True)
    probes = np.r_[X[y == 0][:3], X[y == 7], X[y == 9]]
    scores = run.open_set_score(probes)
    names = run.predict(probes)
    assert names == [run.classes[int(k)] if s >= run.threshold else "unknown"
                     for k, s in zip(run.pipeline.predict(probes), scores)]
    assert names[:3] == ["person0"] * 3 and names[3:] == ["unknown"] * 6
    assert run.predict_proba(probes).shape == (9, 6)  # closed-set scores, as documented
    run.save(tmp_path / "run")
    assert (tmp_path / "run" / openset.FILE).is_file()
    loaded = classify.Run.load(tmp_path / "run")
    assert loaded.threshold == run.threshold and loaded.predict(probes) == names
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["open_set"]["threshold"] == run.threshold
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["open_set"] == run.metrics["open_set"]


def test_a_run_without_open_set_predicts_as_before(tmp_path):
    path, X, y, classes = cache_of(tmp_path)
    run = classify.train(path, "logreg", min_per_class=10)
    assert run.threshold is None and "open_set" not in run.metrics
    assert "unknown" not in run.predict(X[y >= 6])
    with pytest.raises(UserError, match="--open-set"):
        run.open_set_score(X[:2])
    run.save(tmp_path / "run")
    assert not (tmp_path / "run" / openset.FILE).exists()
    assert classify.Run.load(tmp_path / "run").threshold is None


def test_a_damaged_rejection_file_is_one_line(tmp_path, capsys):
    path, X, y, classes = cache_of(tmp_path)
    classify.train(path, "centroid", min_per_class=10, open_set=True, save_to=tmp_path / "run")
    saved = (tmp_path / "run" / openset.FILE).read_bytes()
    for damaged in (saved[:len(saved) // 2], b"not numpy"):  # cut short, or another file
        (tmp_path / "run" / openset.FILE).write_bytes(damaged)
        with pytest.raises(UserError, match=openset.FILE):
            classify.Run.load(tmp_path / "run")
    code = cli.main(["predict", str(tmp_path / "x.jpg"), "--run", str(tmp_path / "run")])
    one_line_error(code, capsys.readouterr().err, openset.FILE, "--open-set")


def cli_error(capsys, argv) -> str:
    code = cli.main(argv)
    return one_line_error(code, capsys.readouterr().err)[len("error: "):]


@pytest.mark.parametrize("kwargs, argv, needle", [
    ({"open_set": True, "cv": 3}, ["--open-set", "--cv", "3"], "--cv"),
    ({"target_far": 0.0}, ["--target-far", "0"], "target_far"),
    ({"unknown_fraction": 1.5}, ["--unknown-fraction", "1.5"], "unknown_fraction"),
    ({"max_unknown": 0}, ["--max-unknown", "0"], "max_unknown"),
    ({"open_set": "yes"}, None, "open_set")])
def test_open_set_options_are_checked_once_for_python_and_the_command_line(
        tmp_path, capsys, kwargs, argv, needle):
    with pytest.raises(UserError, match=needle) as e:
        TrainOptions(**kwargs)
    if argv is not None:
        line = cli_error(capsys, ["--cache", str(tmp_path / "none.h5"), *argv,
                                  "--runs-dir", str(tmp_path / "runs")])
        assert line == command_line_text(e.value) and argv[0] in line
    assert not (tmp_path / "runs").exists()


def test_too_few_people_to_hold_out_is_one_line(tmp_path, capsys):
    X, y, classes = blobs(n_classes=3, per_class=6, dim=8)
    path = synthetic_cache(tmp_path / "c.h5", X, y, classes)
    with pytest.raises(UserError, match="--unknown-fraction"):
        classify.train(path, open_set=True, unknown_fraction=0.5)
    line = cli_error(capsys, ["--cache", str(path), "--open-set", "--unknown-fraction", "0.5",
                              "--runs-dir", str(tmp_path / "runs")])
    assert "3 people" in line and not (tmp_path / "runs").exists()
    unlabelled = synthetic_cache(tmp_path / "u.h5", X, -np.ones(len(y), int), classes)
    with pytest.raises(UserError, match="no labels"):
        classify.train(unlabelled, open_set=True)

    named = synthetic_cache(tmp_path / "n.h5", *blobs(n_classes=4, per_class=6, dim=8)[:2],
                            ["ann", "bob", "carl", "unknown"])
    for seed in range(3):  # whichever people the seed holds out, "unknown" is refused if kept
        try:
            classify.train(named, open_set=True, seed=seed)
        except UserError as e:
            assert "class named 'unknown'" in str(e) and "rename" in str(e)
            break
    else:
        pytest.fail("a class named 'unknown' was kept as a known person without a word")


def colour_image(path: Path, colour, seed: int) -> str:
    """A flat colour with noise: a random-weight network tells colours apart."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None] + rng.normal(0, 25, (40, 40, 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return str(path)


def test_train_open_set_then_predict_unknown_from_the_command_line(tmp_path, capsys):
    from featurize.jobs.run import featurize
    reds = {"ann": (230, 30, 30), "ben": (200, 60, 30), "cid": (230, 30, 70), "dan": (180, 20, 20)}
    root = tmp_path / "faces"
    for k, (name, colour) in enumerate(reds.items()):
        for i in range(6):
            colour_image(root / name / f"{i}.png", colour, 100 * k + i)
    for i in range(2):  # too few for --min-per-class 4: the unknown people of the evaluation
        colour_image(root / "eve" / f"{i}.png", (30, 200, 30), 900 + i)
    cache = featurize(root, cache_dir=tmp_path / "cache", backbone="vggface-vgg16",
                      weights="none", input_size=32, progress=False).path
    proc = call_cli("classify", "--cache", cache, "--open-set", "--head", "centroid",
                    "--min-per-class", "4", "--out", "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "open set: 4 known people" in proc.stdout and "learnt threshold" in proc.stdout
    report = (tmp_path / "run" / "report.html").read_text()
    assert "DIR at FAR 0.01" in report and "auc_open" in report  # the open set in the report
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["open_set"]
    assert metrics["n_unknown_identities"] == 1 and metrics["n_unknown_probes"] == 2
    known = colour_image(tmp_path / "new" / "ann.png", reds["ann"], 7)
    stranger = colour_image(tmp_path / "new" / "stranger.png", (30, 200, 200), 8)
    proc = call_cli("classify", "predict", known, stranger, "--run", "run", "--json",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    threshold = json.loads((tmp_path / "run" / "run.json").read_text())["open_set"]["threshold"]
    assert [r["prediction"] for r in results] == ["ann", "unknown"]
    assert all(r["threshold"] == threshold for r in results)
    assert results[0]["score"] >= threshold > results[1]["score"]
    assert results[1]["top"][0]["class"] in reds  # the nearest known people are still listed
    assert classify.Run.load(tmp_path / "run").predict([known, stranger]) == ["ann", "unknown"]
    assert cli.main(["predict", stranger, "--run", str(tmp_path / "run")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{stranger}: unknown  (open-set score ") and "< threshold" in line
