"""The classify Python API (issue #12, item 1 and item 4's typed options): `classify.train`
-> Run (in memory unless saved), Run.predict / predict_proba on embeddings and on images,
save / load, `classify.verify` -> Verification, `classify.finetune(run)` -> Run, the options
dataclasses shared with the command line, and a cheap `import classify`."""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import classify
from classify import cli
from classify._options import FinetuneOptions, TrainOptions, defaults
from classify.cli import _finetune_parser as finetune_parser
from conftest import make_folder, run_python, same, synthetic_cache
from featurize import cache
from featurize.errors import UserError, command_line_text
from featurize.jobs.run import featurize

TINY = dict(backbone="vggface-vgg16", weights="none", input_size=32, progress=False)
IMAGES = ("alice/alice_0001.jpg", "bob/bob_0003.jpg", "carol/carol_0002.jpg")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny dataset (3 classes of 6 images) and its cache from a random-weight vgg16."""
    base = tmp_path_factory.mktemp("api")
    root = make_folder(base / "faces", per_class=6)
    path = featurize(root, cache_dir=base / "cache", **TINY).path
    c = cache.read(path)
    return {"base": base, "root": root, "cache": path, "c": c,
            "images": [str(root / n) for n in IMAGES],
            "rows": c.embeddings[[c.paths.index(n) for n in IMAGES]]}


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def cli_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err[len("error: "):].strip()


def test_train_in_memory_writes_nothing_and_predicts_from_embeddings_and_images(
        world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = listing(world["base"])
    run = classify.train(world["cache"], "logreg", {"C": 10})
    assert isinstance(run, classify.Run) and run.path is None
    assert listing(world["base"]) == before and listing(tmp_path) == []  # not even runs/
    assert run.head == "logreg" and run.classes == ["alice", "bob", "carol"]
    assert run.record["params"] == {"C": 10} and 0 <= run.metrics["accuracy"] <= 1
    X = world["c"].embeddings
    assert run.predict(X) == [run.classes[k] for k in run.pipeline.predict(X)]
    proba = run.predict_proba(X)
    np.testing.assert_allclose(proba, run.pipeline.predict_proba(X))
    # images are embedded exactly as the cache was, then go through the same pipeline
    from_images = run.predict_proba(world["images"])
    np.testing.assert_allclose(from_images, run.predict_proba(world["rows"]),
                               rtol=same(1e-4), atol=1e-5)
    assert run.predict(world["images"]) == [run.classes[j] for j in from_images.argmax(1)]
    assert run.predict(world["images"][0]) == run.predict(world["images"][:1])  # one path
    with pytest.raises(UserError, match=r"an \(N, 512\) array of embeddings"):
        run.predict(X[:, :10])
    assert listing(world["base"]) == before and listing(tmp_path) == []


def test_save_and_load_give_the_command_lines_run_folder_and_the_same_predictions(
        world, tmp_path, capsys):
    run = classify.train(world["cache"], "centroid")
    saved = run.save(tmp_path / "api-run")
    assert saved == tmp_path / "api-run" and run.path == saved
    assert cli.main(["--cache", str(world["cache"]), "--head", "centroid",
                     "--out", str(tmp_path / "cli-run")]) == 0
    capsys.readouterr()
    assert listing(saved) == listing(tmp_path / "cli-run")  # the same files
    for name in ("split.json", "metrics.json", "report.txt"):
        assert (saved / name).read_text() == (tmp_path / "cli-run" / name).read_text()
    api_record, cli_record = (json.loads((d / "run.json").read_text())
                              for d in (saved, tmp_path / "cli-run"))
    assert set(api_record) == set(cli_record)
    loaded = classify.Run.load(saved)
    X = world["c"].embeddings
    assert np.array_equal(loaded.predict_proba(X), run.predict_proba(X))
    assert loaded.predict(world["images"]) == run.predict(world["images"])
    # save_to writes the same folder at once; a taken folder is refused before training
    direct = classify.train(world["cache"], "centroid", save_to=tmp_path / "direct")
    assert direct.path == tmp_path / "direct" and listing(direct.path) == listing(saved)
    with pytest.raises(UserError, match="already exists"):
        classify.train(world["cache"], "centroid", save_to=saved)
    # a loaded run saves a copy of its folder
    assert listing(loaded.save(tmp_path / "copy")) == listing(saved)
    # the command line's predict, from Python, takes a Run
    for given in (loaded, saved, run, classify.train(world["cache"], "centroid")):
        top = classify.predict(world["images"] + [str(saved / "run.json")], given, top_k=1)
        assert [t["prediction"] for t in top[:3]] == loaded.predict(world["images"])
        assert top[3]["error"] == "not an image"  # reported, not raised


@pytest.mark.parametrize("params, pair", [({"C": -1}, "C=-1"), ({"nope": 1}, "nope=1"),
                                          ({"C": "x"}, "C=x"),
                                          ({"penalty": "l3"}, "penalty=l3")])
def test_a_params_dict_gets_the_same_validation_and_error_as_param(world, tmp_path, capsys,
                                                                  params, pair):
    with pytest.raises(UserError) as e:
        classify.train(world["cache"], "logreg", params)
    line = cli_error(capsys, ["--cache", str(world["cache"]), "--param", pair,
                              "--runs-dir", str(tmp_path / "runs")])
    assert line == " ".join(str(e.value).split())
    assert not (tmp_path / "runs").exists()
    with pytest.raises(UserError, match="must be a dict"):
        classify.train(world["cache"], "logreg", 10)


@pytest.mark.parametrize("kwargs, argv", [
    ({"cv": 1}, ["--cv", "1"]), ({"test_size": 1.5}, ["--test-size", "1.5"]),
    ({"max_per_class": 1}, ["--max-per-class", "1"]), ({"pca": 0}, ["--pca", "0"]),
    ({"head": "forest"}, ["--head", "forest"]), ({"seed": -1}, ["--seed", "-1"])])
def test_train_options_are_checked_once_for_python_and_the_command_line(
        world, tmp_path, capsys, kwargs, argv):
    with pytest.raises(UserError) as e:
        TrainOptions(**kwargs)
    # the same check, naming the field in Python and the flag on the command line
    assert cli_error(capsys, ["--cache", str(world["cache"]), *argv]) == command_line_text(e.value)
    with pytest.raises(UserError, match=str(e.value).split(";")[0][:20]):
        classify.train(world["cache"], **kwargs)


@pytest.mark.parametrize("kwargs, argv", [
    ({"lr": -1.0}, ["--lr", "-1"]), ({"unfreeze_blocks": -1}, ["--unfreeze", "-1"]),
    ({"val_fraction": 1.0}, ["--val-fraction", "1"]), ({"epochs": 0}, ["--epochs", "0"])])
def test_finetune_options_are_checked_once_before_the_run_is_read(tmp_path, capsys, kwargs,
                                                                  argv):
    with pytest.raises(UserError) as e:
        FinetuneOptions(**kwargs)
    # the run folder does not even exist: the options are judged first
    assert cli_error(capsys, ["finetune", "--run", str(tmp_path / "nowhere"), *argv]) == \
        command_line_text(e.value)
    assert argv[0] in command_line_text(e.value)
    with pytest.raises(UserError) as again:
        classify.finetune(tmp_path / "nowhere", **kwargs)
    assert str(again.value) == str(e.value)


def test_every_default_is_the_dataclass_field_default():
    args = cli._train_parser().parse_args([])
    assert {k: getattr(args, k) for k in defaults(TrainOptions)} == defaults(TrainOptions)
    assert TrainOptions().params == {} and args.param == []
    ft = vars(finetune_parser().parse_args(["--run", "x"]))
    assert {k: ft[k] for k in defaults(FinetuneOptions)} == defaults(FinetuneOptions)


def test_options_object_or_keywords_not_both(world):
    opts = TrainOptions("centroid", min_per_class=2)
    run = classify.train(world["cache"], options=opts)
    assert run.head == "centroid" and run.record["selection"]["min_per_class"] == 2
    with pytest.raises(TypeError, match="either"):
        classify.train(world["cache"], options=opts, seed=3)
    with pytest.raises(TypeError):  # not an option: Python's own error for a wrong keyword
        classify.train(world["cache"], "logreg", epochs=3)


def test_a_run_is_trained_and_used_from_a_thread(world):
    def work():
        run = classify.train(world["cache"], "knn", {"n_neighbors": 3})
        return run.predict(world["images"]), run.predict_proba(world["rows"])

    with ThreadPoolExecutor(1) as pool:
        labels, proba = pool.submit(work).result(timeout=300)
    here_labels, here_proba = work()
    assert labels == here_labels and np.array_equal(proba, here_proba)


def test_finetune_takes_a_run_in_memory_and_gives_a_run(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = classify.train(world["cache"], "logreg")
    before = listing(world["base"])
    with pytest.raises(UserError, match="refeaturize"):  # needs the saved base: refused first
        classify.finetune(run, refeaturize=True, epochs=1)
    tuned = classify.finetune(run, epochs=1, batch_size=8, val_fraction=0.3, log=lambda m: None)
    assert isinstance(tuned, classify.Run) and tuned.head == "finetune" and tuned.path is None
    assert listing(world["base"]) == before and listing(tmp_path) == []
    assert tuned.record["finetuned_from"] is None and set(tuned.record["params"]) >= {"lr"}
    proba = tuned.predict_proba(world["images"])
    assert proba.shape == (3, 3) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    assert tuned.predict(world["images"]) == [tuned.classes[j] for j in proba.argmax(1)]
    with pytest.raises(UserError, match="predicts from images"):
        tuned.predict(world["rows"])
    saved = tuned.save(tmp_path / "tuned")
    assert {"model.keras", "run.json", "split.json", "metrics.json"} <= set(listing(saved))
    assert json.loads((saved / "split.json").read_text()) == run.split
    again = classify.Run.load(saved)
    np.testing.assert_allclose(again.predict_proba(world["images"]), proba, rtol=1e-5,
                               atol=1e-6)


def test_verify_returns_a_verification_equal_to_the_command_lines_json(tmp_path, capsys):
    rng = np.random.default_rng(0)
    names = [f"P{k}" for k in range(10)] + [f"Q{k}" for k in range(10)]
    paths, X = [], []
    for name in names:
        centre = rng.normal(0, 1, 16)
        for j in (1, 2):
            paths.append(f"{name}/{name}_{j:04d}.jpg")
            X.append(centre + 0.05 * rng.normal(0, 1, 16))
    c = synthetic_cache(tmp_path / "c.h5", np.array(X), np.repeat(np.arange(20), 2), names,
                        paths=paths)
    (tmp_path / "pairs.txt").write_text(
        "10 1\n" + "".join(f"P{k} 1 2\nP{k} 1 Q{k} 1\n" for k in range(10)))
    roc = tmp_path / "roc.png"
    v = classify.verify(c, tmp_path / "pairs.txt", roc=roc)
    assert roc.stat().st_size and v.roc_png == str(roc)
    assert isinstance(v, classify.Verification)
    assert v.accuracy == 1.0 and len(v.fold_accuracies) == 10 and v.roc_auc == 1.0
    assert v.pairs == 20 and v.skipped == 0 and v.threshold is None
    assert classify.verify(cache.read(c), tmp_path / "pairs.txt").accuracy == v.accuracy
    assert cli.main(["verify", "--pairs", str(tmp_path / "pairs.txt"), "--cache", str(c),
                     "--roc", str(roc), "--json", "--out", str(tmp_path / "v")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed.pop("out") == str(tmp_path / "v")  # the CLI always writes a folder
    assert printed == json.loads(json.dumps(v.as_dict()))
    with pytest.raises(UserError, match="--metric"):
        classify.verify(c, tmp_path / "pairs.txt", metric="hamming")


def test_import_classify_loads_neither_scikit_learn_nor_keras(tmp_path):
    code = (
        "import sys, types, classify\n"
        "heavy = lambda: sorted(m for m in ('keras', 'tensorflow', 'sklearn', 'jax', 'torch') "
        "if m in sys.modules)\n"
        "print(heavy())\n"
        "names = ('train', 'predict', 'verify', 'finetune')\n"
        "print([callable(getattr(classify, n)) for n in names], classify.Run.__name__)\n"
        "import classify._train, classify._predict, classify._verify, classify._finetune\n"
        "print([isinstance(getattr(classify, n), types.FunctionType) for n in names])\n"
        "print('keras' in sys.modules)\n"
        "try:\n    import classify.train\nexcept ModuleNotFoundError:\n    print('no module')\n"
        "print(type(classify).__name__)\n")
    proc = run_python(code, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # the functions are plain attributes of a plain module: the private implementation
    # modules do not replace them, and classify.train is not a module
    assert proc.stdout.splitlines() == ["[]", "[True, True, True, True] Run",
                                        "[True, True, True, True]", "False", "no module",
                                        "module"]


def test_the_api_in_a_fresh_process(world, tmp_path):
    script = tmp_path / "notebook.py"
    script.write_text(
        "import sys\nimport classify\nfrom featurize import cache\n"
        "run = classify.train(sys.argv[1], 'centroid', {'temperature': 0.1})\n"
        "X = cache.read(sys.argv[1]).embeddings[:4]\n"
        "print(run.predict(X))\n"
        "saved = run.save('saved-run')\n"
        "loaded = classify.Run.load(saved)\n"
        "print(loaded.predict(X))\n"
        "print(loaded.predict(sys.argv[2:]) == run.predict(sys.argv[2:]))\n")
    proc = run_python(script, world["cache"], *world["images"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and lines[0] == lines[1] and lines[2] == "True"
    assert (tmp_path / "saved-run" / "head.skops").is_file()
    assert not (tmp_path / "saved-run" / "head.joblib").exists()
