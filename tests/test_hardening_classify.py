"""Issue #11 for classify: a fine-tuned model loads in a fresh process (item 1), predict
without feature steps (item 2), fine-tuning a split whose images have gone or broken (item 3),
incomplete caches (item 14), and every user mistake of the issue's classify list: one line on
stderr, exit code 2, no traceback, nothing written."""

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from classify import _heads as heads
from classify._finetune import finetune
from classify._predict import predict
from classify._runs import load
from classify._train import train
from classify._verify import verify
from classify.cli import main
from conftest import blobs, call_cli, make_folder, run_cli, run_python, synthetic_cache
from featurize import cache
from featurize.errors import UserError
from featurize.jobs.run import featurize

TINY = dict(backbone="vggface-vgg16", weights="none", input_size=32, progress=False)


def fresh(args, cwd):
    """`python -m classify ARGS` in a fresh process."""
    return run_cli("classify", *args, cwd=cwd, timeout=300)


def files_under(root: Path) -> set:
    return {p.relative_to(root) for p in root.rglob("*")}


def assert_refused(argv, message, root: Path, capsys):
    """classify's main refuses argv: exit 2, one line naming the problem, no file written."""
    before = files_under(root)
    assert main([str(a) for a in argv]) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), (argv, err)
    assert files_under(root) == before, argv


def assert_one_line_error(proc, message):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and len(err.splitlines()) == 1, proc.stderr
    assert err.startswith("error: ") and re.search(message, err), err


# --- a synthetic world: caches and a run, no images ---------------------------------------------

@pytest.fixture(scope="module")
def blob_world(tmp_path_factory):
    """A 3 x 10 labelled cache (16-D), a 3 x 4 cache of 64-D rows, and a logreg run."""
    root = tmp_path_factory.mktemp("blobs")
    X, y, classes = blobs(n_classes=3, per_class=10, dim=16)
    synthetic_cache(root / "c.h5", X, y, classes)
    X, y, classes = blobs(n_classes=3, per_class=4, dim=64)
    synthetic_cache(root / "wide.h5", X, y, classes)
    train(root / "c.h5", "logreg", out=root / "runs" / "logreg")
    return root


TRAIN_MISTAKES = [
    (["--param", "C=-1"], r"bad --param for head logreg: The 'C' parameter .* Got -1"),
    (["--param", "C=abc"], r"--param for head logreg: The 'C' parameter .* Got 'abc'"),
    (["--param", "max_iter=1e9"], r"--param for head logreg: The 'max_iter' parameter .* must be an int"),
    (["--head", "svm", "--param", "C=0"], r"--param for head svm: The 'C' parameter"),
    (["--head", "ridge", "--param", "alpha=-1"], r"--param for head ridge: The 'alpha' parameter"),
    (["--head", "knn", "--param", "n_neighbors=0"], r"--param for head knn: The 'n_neighbors'"),
    (["--head", "knn", "--param", "n_neighbors=2000"],
     r"n_neighbors=2000 needs at least 2000 training images, and the training split has 22"),
    (["--head", "centroid", "--param", "temperature=0"], r"head centroid: The 'temperature'"),
    (["--head", "dense", "--param", "dropout=1.5"], r"head dense: The 'dropout' parameter"),
    (["--param", "l1_ratio=0.5"], r"head logreg cannot train with --param l1_ratio=0.5: Solver lbfgs"),
    (["--cv", "1"], r"--cv must be at least 2, not 1"),
    (["--cv", "-1"], r"--cv must be at least 2, not -1"),
    (["--cv", "100"], r"--cv 100 needs at least 100 images per class, but the smallest class "
                      r"of .*c\.h5 has 10 .*lower --cv to at most 10"),
    (["--cv", "x"], r"argument --cv: invalid int value"),
    (["--pca", "0"], r"--pca must be at least 1, not 0"),
    (["--pca", "-1"], r"--pca must be at least 1, not -1"),
    (["--pca", "5000"], r"--pca 5000 is more than the 16 components .*embedding dimension 16"),
    (["--max-per-class", "-1"], r"--max-per-class must be at least 1, not -1"),
    (["--max-per-class", "0"], r"--max-per-class must be at least 1, not 0"),
    (["--max-per-class", "1"], r"--max-per-class 1 keeps fewer images per class than the 2"),
    (["--min-per-class", "-3"], r"--min-per-class must be at least 1, not -3"),
    (["--test-size", "0"], r"--test-size must be a fraction between 0 and 1"),
    (["--test-size", "1"], r"--test-size must be a fraction between 0 and 1"),
    (["--test-size", "1.5"], r"--test-size must be a fraction between 0 and 1"),
    (["--test-size", "nan"], r"--test-size must be a fraction between 0 and 1"),
    (["--test-size", "0.95"], r"leaves fewer training images than the 3 classes"),
    (["--seed", "-1"], r"--seed must be between 0 and 4294967295"),
]


@pytest.mark.parametrize("args, message", TRAIN_MISTAKES, ids=[" ".join(a) for a, _ in TRAIN_MISTAKES])
def test_train_mistakes_are_one_line_and_write_nothing(blob_world, args, message, capsys):
    assert_refused(["--cache", blob_world / "c.h5", "--runs-dir", blob_world / "runs", *args],
                   message, blob_world, capsys)


def test_pca_larger_than_the_training_rows_and_an_existing_out(blob_world, capsys):
    # 12 rows of 64-D: 9 training rows bound PCA, not the dimension
    assert_refused(["--cache", blob_world / "wide.h5", "--pca", "20", "--runs-dir",
                    blob_world / "runs"], r"--pca 20 is more than the 9 components .*9 training "
                   r"images, embedding dimension 64\); use --pca 9 or less", blob_world, capsys)
    assert_refused(["--cache", blob_world / "c.h5", "--out", blob_world / "runs" / "logreg"],
                   r"run folder .*logreg already exists", blob_world, capsys)
    (blob_world / "afile").write_text("x")
    assert_refused(["--cache", blob_world / "c.h5", "--runs-dir", blob_world / "afile" / "runs"],
                   r"cannot create run folder .*afile is not a writable folder", blob_world, capsys)


def test_train_mistakes_in_a_fresh_process(blob_world, tmp_path):
    """`python -m classify` itself (one fresh process), then the same command line in this one."""
    cache_file = blob_world / "c.h5"
    assert_one_line_error(fresh(["--cache", cache_file, "--cv", "100"], tmp_path),
                          r"--cv 100 needs at least 100 images per class, but the smallest class")
    assert_one_line_error(call_cli("classify", "--cache", cache_file, "--head", "knn", "--param",
                                   "n_neighbors=2000", cwd=tmp_path), r"n_neighbors=2000 needs")
    assert_one_line_error(call_cli("classify", "--cache", cache_file, "--max-per-class", "0",
                                   cwd=tmp_path), r"--max-per-class must be at least 1")
    assert not any(tmp_path.iterdir())  # no runs/ folder


def test_heads_validate_their_own_parameters_like_scikit_learn():
    from sklearn.utils._param_validation import InvalidParameterError
    for estimator in (heads.CosineKNN(n_neighbors=0), heads.CosineCentroid(temperature=-1),
                      heads.DenseHead(epochs=0), heads.DenseHead(seed=-1)):
        with pytest.raises(InvalidParameterError):
            estimator.fit(np.zeros((4, 2)), np.array([0, 0, 1, 1]))
    for name in heads.HEADS:  # every default is valid
        heads.tunable(heads.HEADS[name].make())._validate_params()


# --- predict: options, hand-edited runs ---------------------------------------------------------

def test_predict_top_k_zero_and_an_edited_run_in_a_fresh_process(blob_world, tmp_path):
    """`python -m classify predict` itself (one fresh process), then the same command line in
    this one."""
    image = tmp_path / "x.jpg"
    image.write_bytes(b"")  # never read: the mistakes are found first
    run = blob_world / "runs" / "logreg"
    assert_one_line_error(fresh(["predict", image, "--run", run, "--top-k", "0"], tmp_path),
                          r"--top-k must be at least 1, not 0")
    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / "run.json").write_text('{"head": "logreg", "classes": ["a", "b"], "cache": "c.h5"}')
    assert_one_line_error(call_cli("classify", "predict", image, "--run", edited, cwd=tmp_path),
                          r"run.json is damaged or was edited by hand \(no 'provenance'")


def _edit(key, value):
    def edit(record):
        if value is KeyError:
            del record[key]
        else:
            record[key] = value
        return json.dumps(record)
    return edit


EDITS = {
    "broken JSON": lambda record: json.dumps(record)[:-20],
    "not an object": lambda record: "[1, 2]",
    "provenance missing": _edit("provenance", KeyError),
    "provenance not a dict": _edit("provenance", "vggface"),
    "settings not settings": lambda record: _edit("provenance", {"settings": '{"x": 1}'})(record),
    "settings broken JSON": lambda record: _edit("provenance", {"settings": "{"})(record),
    "score_kind odd": _edit("score_kind", "odd"),
    "classes a string": _edit("classes", "person0"),
    "classes of numbers": _edit("classes", [1, 2, 3]),
    "head missing": _edit("head", KeyError),
    "cache missing": _edit("cache", KeyError),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_hand_edited_run_json_is_a_one_line_error(blob_world, tmp_path, edit, capsys):
    run = tmp_path / "run"
    run.mkdir()
    original = json.loads((blob_world / "runs" / "logreg" / "run.json").read_text())
    (run / "head.skops").write_bytes((blob_world / "runs" / "logreg" / "head.skops").read_bytes())
    (run / "run.json").write_text(EDITS[edit](original))
    image = tmp_path / "x.jpg"
    image.write_bytes(b"")
    assert_refused(["predict", image, "--run", run], r"run.json is damaged or was edited by hand",
                   tmp_path, capsys)
    assert_refused(["finetune", "--run", run], r"run.json is damaged or was edited by hand",
                   tmp_path, capsys)


# --- verify ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pairs_world(tmp_path_factory):
    """A cache of P (two images each) and Q people, and pair files over them."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    names = [f"P{k}" for k in range(10)] + [f"Q{k}" for k in range(10)]
    paths, X, y = [], [], []
    for n, name in enumerate(names):
        centre = rng.normal(0, 1, 8)
        for j in (1, 2):
            paths.append(f"{name}/{name}_{j:04d}.jpg")
            X.append(centre + 0.05 * rng.normal(0, 1, 8))
            y.append(n)
    synthetic_cache(root / "c.h5", np.array(X), np.array(y), names, paths=paths)
    matched = [f"P{k} 1 2" for k in range(10)]
    (root / "one_fold.txt").write_text("1\nP0 1 2\nP0 1 Q0 1\n")
    # mismatched pairs name images the cache lacks (number 3)
    (root / "dev.txt").write_text("\n".join(["10", *matched, *[f"P{k} 3 Q{k} 3" for k in range(10)]]) + "\n")
    (root / "good.txt").write_text("\n".join(["10", *matched, *[f"P{k} 1 Q{k} 1" for k in range(10)]]) + "\n")
    return root


def test_verify_mistakes_are_one_line_and_write_nothing(pairs_world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default --roc roc.png would land here
    c = pairs_world / "c.h5"
    assert_refused(["verify", "--pairs", pairs_world / "one_fold.txt", "--cache", c],
                   r"one_fold.txt gives 1 fold: the 10-fold protocol .* needs at least 2",
                   tmp_path, capsys)
    assert_refused(["verify", "--pairs", pairs_world / "dev.txt", "--cache", c, "--skip-missing"],
                   r"only matched pairs are left of .*dev.txt \(10, .*meaningless", tmp_path, capsys)
    assert_refused(["verify", "--pairs", pairs_world / "good.txt", "--train-pairs",
                    pairs_world / "dev.txt", "--cache", c, "--skip-missing"],
                   r"only matched pairs are left of .*dev.txt", tmp_path, capsys)
    assert_refused(["verify", "--pairs", pairs_world / "good.txt", "--cache", c, "--roc",
                    tmp_path / "missing" / "roc.png"], r"--roc .*folder .*missing does not exist",
                   tmp_path, capsys)
    assert_refused(["verify", "--pairs", pairs_world / "good.txt", "--cache", c, "--roc",
                    tmp_path / "roc.txt"], r"--roc .*roc.txt: the picture's name must end in",
                   tmp_path, capsys)
    assert not (tmp_path / "roc.png").exists()
    # with a training file the threshold comes from it: one fold is enough
    assert main(["verify", "--pairs", str(pairs_world / "one_fold.txt"), "--train-pairs",
                 str(pairs_world / "good.txt"), "--cache", str(c), "--roc", ""]) == 0
    assert "accuracy 1.0000" in capsys.readouterr().out


def test_verify_skip_missing_leaving_one_kind_in_a_fresh_process(pairs_world, tmp_path):
    """The mistake (the command line called in this process), then `python -m classify verify`
    itself in a fresh one."""
    proc = call_cli("classify", "verify", "--pairs", pairs_world / "dev.txt", "--cache",
                    pairs_world / "c.h5", "--skip-missing", cwd=tmp_path)
    assert_one_line_error(proc, r"only matched pairs are left .* would be meaningless")
    assert not any(tmp_path.iterdir())  # no roc.png in the current folder
    proc = fresh(["verify", "--pairs", pairs_world / "good.txt", "--cache", pairs_world / "c.h5"],
                 tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]  # #16: a run folder, no roc.png here
    (folder,) = (tmp_path / "runs").iterdir()  # and no temporary file left
    assert sorted(p.name for p in folder.iterdir()) == ["report.html", "roc.png",
                                                         "verification.json"]
    assert (folder / "roc.png").stat().st_size > 0


def test_library_code_leaves_the_matplotlib_backend_alone(blob_world, pairs_world, tmp_path):
    import matplotlib
    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        train(blob_world / "c.h5", "centroid", runs_dir=tmp_path / "runs")
        verify(pairs_world / "c.h5", pairs_world / "good.txt", roc_path=tmp_path / "roc.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(previous)
    assert (tmp_path / "roc.png").read_bytes().startswith(b"\x89PNG")


# --- finetune options -----------------------------------------------------------------------

FINETUNE_MISTAKES = [
    (["--epochs", "0"], r"--epochs must be at least 1, not 0"),
    (["--batch-size", "0"], r"--batch-size must be at least 1, not 0"),
    (["--unfreeze", "-1"], r"--unfreeze must be at least 0, not -1"),
    (["--unfreeze", "9"], r"--unfreeze 9: vggface-vgg16 has 5 blocks .*use --unfreeze 5 or less"),
    (["--lr", "0"], r"--lr must be a positive number, not 0.0"),
    (["--lr=-1e-5"], r"--lr must be a positive number"),
    (["--lr", "nan"], r"--lr must be a positive number"),
    (["--val-fraction", "1.5"], r"--val-fraction must be a fraction between 0 and 1 \(exclusive\)"),
    (["--val-fraction", "0"], r"--val-fraction must be a fraction between 0 and 1"),
    (["--seed", "-2"], r"--seed must be between 0 and"),
]


@pytest.mark.parametrize("args, message", FINETUNE_MISTAKES,
                         ids=[" ".join(a) for a, _ in FINETUNE_MISTAKES])
def test_finetune_mistakes_are_one_line_and_write_nothing(blob_world, args, message, capsys):
    assert_refused(["finetune", "--run", blob_world / "runs" / "logreg", *args], message,
                   blob_world, capsys)


def test_finetune_mistakes_in_a_fresh_process(blob_world, tmp_path):
    """`python -m classify finetune` itself (one fresh process), then the same command line in
    this one."""
    run = blob_world / "runs" / "logreg"
    assert_one_line_error(fresh(["finetune", "--run", run, "--epochs", "0"], tmp_path),
                          r"--epochs must be at least 1")
    assert_one_line_error(call_cli("classify", "finetune", "--run", run, "--val-fraction", "1.5",
                                   cwd=tmp_path),
                          r"--val-fraction must be a fraction between 0 and 1")
    assert_one_line_error(call_cli("classify", "finetune", "--run", run, "--unfreeze", "-1",
                                   cwd=tmp_path), r"--unfreeze must be at least 0")


# --- runs on real images ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_world(tmp_path_factory):
    """3 classes x 8 images featurized with a tiny vggface-vgg16, and a logreg run on them."""
    root = tmp_path_factory.mktemp("images")
    make_folder(root / "faces", per_class=8)
    s = featurize(root / "faces", cache_dir=root / "cache", **TINY)
    train(s.path, "logreg", out=root / "runs" / "logreg")
    return root


@pytest.mark.parametrize("head", ["knn", "centroid"])
def test_item2_distance_heads_without_feature_steps_predict(image_world, head, tmp_path):
    # normalize off and nothing else: the pipeline is the head alone (a non-face backbone's
    # default); predict crashed with "'Pipeline' has no attribute 'transform'"
    c = cache.read(next((image_world / "cache").glob("*.h5")))
    r = train(c, head, normalize=False, runs_dir=tmp_path / "runs")
    record, pipeline = load(r.run_dir)
    assert len(pipeline.steps) == 1
    name = "bob/bob_0003.jpg"
    out = predict([image_world / "faces" / name], r.run_dir, top_k=10)
    distances = pipeline.named_steps["head"].class_distances(c.embeddings[[c.paths.index(name)]])[0]
    classes = [record["classes"][k] for k in pipeline.classes_]
    assert [t["class"] for t in out[0]["top"]] == [classes[k] for k in np.argsort(distances)]
    assert out[0]["top"][0]["distance"] == pytest.approx(distances.min(), abs=1e-4)


def test_item1_a_fine_tuned_model_loads_in_a_fresh_process(tmp_path):
    # A fine-tuned run's model.keras holds featurize's ImagePreprocessing layer; a new process
    # had never imported its module, so Keras could not find the class.
    import keras

    from featurize.models.preprocessing import ImagePreprocessing
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(ImagePreprocessing("vggface1")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    run = tmp_path / "run"
    run.mkdir()
    model.save(run / "model.keras")
    X, y, classes = blobs(n_classes=2, per_class=3, dim=4)
    attrs = cache.read_attrs(synthetic_cache(tmp_path / "c.h5", X, y, classes))
    (run / "run.json").write_text(json.dumps({
        "head": "finetune", "classes": ["a", "b"], "cache": str(tmp_path / "c.h5"),
        "provenance": {"settings": attrs["settings"]}, "score_kind": "probability"}))
    batch = np.random.default_rng(0).integers(0, 256, (1, 8, 8, 3)).astype("float32")
    np.save(tmp_path / "batch.npy", batch)
    code = ("import sys, numpy as np; from classify._runs import load; "
            "record, model = load(sys.argv[1]); "
            "print(model.predict(np.load(sys.argv[2]), verbose=0)[0, 0])")
    proc = run_python(code, run, tmp_path / "batch.npy", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.split()[-1]) == pytest.approx(
        float(model.predict(batch, verbose=0)[0, 0]), rel=1e-4)


def test_predict_exits_1_when_an_input_is_not_an_image_and_clips_top_k(image_world, tmp_path):
    (tmp_path / "notes.jpg").write_text("not a picture")
    image = image_world / "faces" / "alice" / "alice_0001.jpg"
    proc = call_cli("classify", "predict", image, tmp_path / "notes.jpg", "--run",
                    image_world / "runs" / "logreg", "--top-k", "50", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    good, bad = proc.stdout.splitlines()
    assert good.startswith(f"{image}: ") and good.count(", ") == 2  # all 3 classes, no more
    assert bad == f"{tmp_path / 'notes.jpg'}: error: not an image"


def _restore(path: Path, data: bytes):
    path.write_bytes(data)


def test_item3_finetune_names_missing_images_before_training(image_world, tmp_path):
    run = image_world / "runs" / "logreg"
    split = json.loads((run / "split.json").read_text())["folds"][0]
    gone = [image_world / "faces" / p for p in (split["train"][0], split["test"][-1])]
    saved = [p.read_bytes() for p in gone]
    for p in gone:
        p.unlink()
    try:
        # options that would train on these 18 images: the check must come first
        proc = call_cli("classify", "finetune", "--run", run, "--epochs", "1", "--batch-size",
                        "8", "--val-fraction", "0.3", cwd=tmp_path)
    finally:
        for p, data in zip(gone, saved):
            _restore(p, data)
    assert_one_line_error(proc, rf"2 images of the run's split are missing from .*faces: "
                                rf"{re.escape(split['train'][0])}, {re.escape(split['test'][-1])}")
    assert sorted(p.name for p in run.parent.iterdir()) == ["logreg"]


def test_item3_an_image_that_no_longer_decodes_is_named(image_world, tmp_path):
    run = image_world / "runs" / "logreg"
    name = json.loads((run / "split.json").read_text())["folds"][0]["train"][1]
    path = image_world / "faces" / name
    saved = path.read_bytes()
    path.write_bytes(saved[:200])  # still a file, cut off: found only when decoded
    try:
        with pytest.raises(UserError, match=rf"image {re.escape(name)} of the run's split cannot "
                                            r"be read \(corrupt"):
            finetune(run, epochs=1, batch_size=8, val_fraction=0.3, log=lambda m: None)
    finally:
        _restore(path, saved)
    assert sorted(p.name for p in run.parent.iterdir()) == ["logreg"]


# --- incomplete caches (item 14) ------------------------------------------------------------

def test_training_on_an_incomplete_cache_warns_and_notes_it(tmp_path):
    X, y, classes = blobs(n_classes=3, per_class=10, dim=8)
    path = synthetic_cache(tmp_path / "c.h5", X, y, classes)
    assert not train(path, "centroid", runs_dir=tmp_path / "runs").warnings  # an older cache
    with h5py.File(path, "a") as f:
        f.attrs["complete"] = False
        f.attrs["pending"] = 7
    proc = call_cli("classify", "--cache", path, "--head", "centroid", "--out", tmp_path / "run",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warning = (f"cache {path} is incomplete: 7 images were not embedded (featurize was "
               "interrupted); run featurize again to finish it")
    assert f"warning: {warning}\n" in proc.stderr
    assert warning in json.loads((tmp_path / "run" / "run.json").read_text())["notes"]
