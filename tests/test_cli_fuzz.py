"""Property test: both command lines given a random invalid value for one option at a time
(the others valid) answer with exit code 2, exactly one line on stderr, no traceback, and
write no file. Runs in-process for speed; the subprocess tests elsewhere cover the entry
points themselves."""

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from classify.cli import main as classify_main
from conftest import blobs, make_folder, synthetic_cache, unparseable_as
from featurize.cli import main as featurize_main
from featurize.errors import UserError
from featurize.models.registry import get_backbone

FUZZ = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
# What a shell can pass in argv: no NUL, no lone surrogates; control characters are rare
# enough in real use to leave out.
TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=24)

not_int, not_float = unparseable_as(int), unparseable_as(float)


def bad_int(low=None, high=None):
    """An int outside [low, high], or text that is not an int."""
    outside = []
    if low is not None:
        outside.append(st.integers(max_value=low - 1))
    if high is not None:
        outside.append(st.integers(min_value=high + 1))
    return st.one_of(*[s.map(str) for s in outside], TEXT.filter(not_int))


def bad_fraction(closed_top=False):
    """A float outside (0, 1) (or (0, 1]), nan, inf, or text that is not a number."""
    def outside(x):
        return math.isnan(x) or x <= 0 or (x > 1 if closed_top else x >= 1)
    return st.one_of(st.floats(allow_nan=True, allow_infinity=True).filter(outside).map(repr),
                     TEXT.filter(not_float))


def bad_choice(*choices):
    return TEXT.filter(lambda t: t not in choices)


def is_backbone(name: str) -> bool:
    try:
        get_backbone(name)
        return True
    except UserError:
        return False


FEATURIZE_BAD = {
    "--batch-size": bad_int(1, 8192),
    "--workers": bad_int(1, 256),
    "--input-size": bad_int(32, 2048),
    "--checkpoint-rows": bad_int(1),
    "--jitter": st.one_of(st.integers().filter(bool).map(str), TEXT.filter(not_int)),
    "--crop": bad_fraction(closed_top=True),
    "--precision": bad_choice("float32", "mixed", "int8"),
    "--runtime": bad_choice("keras", "onnx", "openvino"),
    "--engine": bad_choice("local", "ray"),
    "--align": bad_choice("none", "dlib"),
    "--gpus-per-worker": st.one_of(st.floats(max_value=0, exclude_max=True).map(repr),
                                   st.floats(min_value=64, exclude_min=True).map(repr),
                                   st.just("nan"), TEXT.filter(not_float)),
    "--resize": bad_choice("cpu", "device"),
    "--pool": bad_choice("avg", "max"),
    "--check": bad_choice("mtime", "content"),
    "--backbone": TEXT.filter(lambda t: not is_backbone(t)),
    "--weights": TEXT.filter(lambda t: t not in ("default", "none") and not Path(t).is_file()),
}


def files_under(root: Path) -> set:
    return {p.relative_to(root) for p in root.rglob("*")}


def check_refused(main, argv, root: Path, capsys):
    before = files_under(root)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, code, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert files_under(root) == before, argv


@pytest.fixture(scope="module")
def featurize_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_featurize")
    make_folder(root / "imgs", per_class=1)
    return root


@FUZZ
@given(data=st.data())
def test_featurize_rejects_every_invalid_option_value(featurize_world, capsys, data):
    option = data.draw(st.sampled_from(sorted(FEATURIZE_BAD)))
    value = data.draw(FEATURIZE_BAD[option])
    argv = {"--backbone": "vggface-vgg16", "--weights": "none", "--input-size": "32",
            "--cache-dir": str(featurize_world / "c"), option: value}
    args = [str(featurize_world / "imgs"), "--quiet"] + [f"{k}={v}" for k, v in argv.items()]
    check_refused(featurize_main, args, featurize_world, capsys)


@FUZZ
@given(data=st.data())
def test_featurize_verify_rejects_invalid_values(featurize_world, capsys, data):
    cache_file = featurize_world / "cache.h5"
    if not cache_file.exists():
        X, y, classes = blobs(n_classes=2, per_class=3, dim=4)
        synthetic_cache(cache_file, X, y, classes)
    option = data.draw(st.sampled_from(["--sample", "--tolerance"]))
    value = data.draw(bad_int(0) if option == "--sample" else st.one_of(
        st.floats(max_value=0, exclude_max=True).map(repr), st.just("nan"),
        TEXT.filter(not_float)))
    check_refused(featurize_main, ["verify", str(cache_file), f"{option}={value}"],
                  featurize_world, capsys)


@pytest.fixture(scope="module")
def classify_world(tmp_path_factory):
    """A labelled cache (5 classes x 30 rows, 32-D) and a logreg run trained on it."""
    root = tmp_path_factory.mktemp("fuzz_classify")
    X, y, classes = blobs(n_classes=5, per_class=30, dim=32)
    synthetic_cache(root / "cache.h5", X, y, classes)
    assert classify_main(["--cache", str(root / "cache.h5"), "--out", str(root / "run")]) == 0
    make_folder(root / "imgs", classes=("a",), per_class=1)
    return root


TRAIN_BAD = {
    "--cache": TEXT.filter(lambda t: t.strip() and not Path(t).exists()),
    "--head": bad_choice("logreg", "svm", "knn", "centroid", "ridge", "dense"),
    "--min-per-class": bad_int(1, 30),  # above 30 no class is left
    "--max-per-class": bad_int(1),
    "--test-size": bad_fraction(),
    "--cv": bad_int(2, 30),
    "--seed": bad_int(0, 2**32 - 1),
    "--pca": bad_int(1, 32),
    "--unknown-fraction": bad_fraction(),
    "--target-far": bad_fraction(),
    "--max-unknown": bad_int(1),
    "--param": st.one_of(
        TEXT.filter(lambda t: "=" not in t),
        # scikit-learn's limits: C > 0, tol >= 0, max_iter >= 0 (an int)
        st.sampled_from([("C", 0), ("tol", -1e-300)]).flatmap(lambda kv: st.one_of(
            st.floats(max_value=kv[1]).map(repr), TEXT.filter(not_float)).map(
                lambda v: f"{kv[0]}={v}")),
        st.one_of(st.integers(max_value=-1).map(str), st.floats().map(repr),
                  TEXT.filter(not_int)).map(lambda v: f"max_iter={v}"),
        TEXT.filter(lambda t: t.isidentifier() and t not in (
            "C", "tol", "max_iter", "penalty", "l1_ratio", "dual", "fit_intercept",
            "intercept_scaling", "class_weight", "random_state", "solver", "verbose",
            "warm_start", "n_jobs")).map(lambda k: f"{k}=1")),
}


@FUZZ
@given(data=st.data())
def test_classify_train_rejects_every_invalid_option_value(classify_world, capsys, data):
    option = data.draw(st.sampled_from(sorted(TRAIN_BAD)))
    value = data.draw(TRAIN_BAD[option])
    args = ["--cache", str(classify_world / "cache.h5"),
            "--runs-dir", str(classify_world / "runs"), f"{option}={value}"]
    check_refused(classify_main, args, classify_world, capsys)


@FUZZ
@given(data=st.data())
def test_classify_subcommands_reject_every_invalid_option_value(classify_world, capsys, data):
    run, images = str(classify_world / "run"), str(classify_world / "imgs")
    command, option, bad = data.draw(st.sampled_from([
        ("predict", "--top-k", bad_int(1)),
        ("finetune", "--epochs", bad_int(1)),
        ("finetune", "--batch-size", bad_int(1)),
        ("finetune", "--unfreeze", bad_int(0)),
        ("finetune", "--lr", st.one_of(st.floats(max_value=0).map(repr), st.just("nan"),
                                        TEXT.filter(not_float))),
        ("finetune", "--val-fraction", bad_fraction()),
        ("verify", "--metric", bad_choice("cosine", "euclidean")),
    ]))
    value = data.draw(bad)
    if command == "predict":
        args = ["predict", images, "--run", run, f"{option}={value}"]
    elif command == "finetune":
        args = ["finetune", "--run", run, f"{option}={value}"]
    else:
        pairs = classify_world / "pairs.txt"
        pairs.write_text("1\nperson0 1 2\nperson0 1 person1 1\n")
        args = ["verify", "--pairs", str(pairs), "--cache", str(classify_world / "cache.h5"),
                f"{option}={value}"]
    check_refused(classify_main, args, classify_world, capsys)
