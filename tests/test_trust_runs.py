"""Run folders are data, not code: loading one (predict, finetune, Run.load) runs nothing from
it. Heads are saved with skops (only the types a run's pipeline has), Keras files load in safe
mode, and a pickled run of an older version loads only on request (--trust-pickle)."""

import json
import os
import shutil
from pathlib import Path

import joblib
import numpy as np
import pytest
import skops.io

import classify
from classify import _heads as heads, _runs as runs
from conftest import blobs, call_cli, one_line_error, run_python, synthetic_cache, write_image
from featurize.errors import UserError

OPEN_SET = "logreg-open-set"


class Trojan:
    """Pickled, it makes whoever loads it create `marker`: what a malicious head.joblib holds."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


# Imported by the loader, this class would create its marker as it is built from a file.
TROJAN_MODULE = '''
class Trojan:
    def __init__(self, marker):
        self.marker = marker

    def __setstate__(self, state):
        open(state["marker"], "w").close()
'''


def classify_cli(args, cwd):
    """`classify ARGS`, called in this process."""
    return call_cli("classify", *args, cwd=cwd)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 4 x 10 cache of 512-D rows (the size of the random vgg16's embeddings, so images can
    be predicted too), an image, and a saved run of every head (and an open-set one)."""
    root = tmp_path_factory.mktemp("trust")
    X, y, classes = blobs(n_classes=4, per_class=10, dim=512)
    cache = synthetic_cache(root / "c.h5", X, y, classes)
    made = {head: classify.train(cache, head, save_to=root / "runs" / head)
            for head in heads.HEADS}
    made[OPEN_SET] = classify.train(cache, "logreg", save_to=root / "runs" / OPEN_SET,
                                    open_set=True)
    write_image(root / "face.jpg", seed=3)
    return {"root": root, "X": X, "runs": made, "image": root / "face.jpg"}


def shared_copy(world, head: str, target: Path) -> Path:
    """A copy of a saved run, as someone else would share it."""
    return Path(shutil.copytree(world["runs"][head].path, target))


def pickled_copy(world, head: str, target: Path) -> Path:
    """The run as the previous version wrote it: the fitted pipeline pickled by joblib into
    head.joblib (and a dense head's model in head.keras too), no head.skops."""
    run = shared_copy(world, head, target)
    (run / runs.PIPELINE_FILE).unlink()
    joblib.dump(world["runs"][head].pipeline, run / runs.PICKLE_FILE)
    return run


def trojan_run(world, tmp_path) -> tuple[Path, Path]:
    """A run folder whose head.joblib runs code when unpickled, and the file that code makes."""
    run = tmp_path / "shared-run"
    run.mkdir()
    shutil.copy(world["runs"]["logreg"].path / "run.json", run / "run.json")
    marker = tmp_path / "PWNED"
    joblib.dump(Trojan(marker), run / "head.joblib")
    return run, marker


def test_predict_and_finetune_refuse_a_pickled_run_and_run_nothing(world, tmp_path):
    run, marker = trojan_run(world, tmp_path)
    for args in (["predict", world["image"], "--run", run], ["finetune", "--run", run]):
        proc = classify_cli(args, tmp_path)
        line = one_line_error(proc.returncode, proc.stderr, "head.joblib", "--trust-pickle",
                              "pickle")
        assert "trust_pickle=True" in line
        assert not marker.exists(), args


def test_run_load_refuses_a_pickled_run_unless_trusted(world, tmp_path):
    run, marker = trojan_run(world, tmp_path)
    with pytest.raises(UserError, match=r"head\.joblib is a pickle .*trust_pickle=True"):
        classify.Run.load(run)
    assert not marker.exists()
    # The opt-in is the old behaviour: the pickle is loaded, whatever it holds.
    with pytest.raises(UserError, match="disagree on the classes"):
        classify.Run.load(run, trust_pickle=True)
    assert marker.exists()


def _skops_run(world, tmp_path, head_object) -> Path:
    run = shared_copy(world, "logreg", tmp_path / "crafted")
    pipeline = world["runs"]["logreg"].pipeline
    crafted = type(pipeline)([*pipeline.steps[:-1], ("head", head_object)])
    skops.io.dump(crafted, run / runs.PIPELINE_FILE)
    return run


def test_a_head_skops_with_unexpected_types_is_refused_before_anything_is_built(
        world, tmp_path, monkeypatch):
    (tmp_path / "trojan.py").write_text(TROJAN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    from trojan import Trojan as ImportableTrojan
    marker = tmp_path / "PWNED"
    crafted = {"trojan.Trojan": ImportableTrojan(str(marker)),
               "system": os.system}  # a function reference: skops would call it by name
    for name, head_object in crafted.items():
        run = _skops_run(world, tmp_path / name, head_object)
        assert any(name in t for t in skops.io.get_untrusted_types(file=run / "head.skops"))
        proc = classify_cli(["predict", world["image"], "--run", run], tmp_path)
        one_line_error(proc.returncode, proc.stderr, "head.skops", "types a run never has",
                       name)
        with pytest.raises(UserError, match="types a run never has"):
            classify.Run.load(run)
        assert not marker.exists(), name


def test_a_head_skops_of_trusted_types_but_not_a_runs_pipeline_is_refused(world, tmp_path):
    run = shared_copy(world, "logreg", tmp_path / "bare")
    skops.io.dump(world["runs"]["logreg"].pipeline.named_steps["head"], run / "head.skops")
    with pytest.raises(UserError, match=r"head\.skops holds a LogisticRegression, not a Pipeline"):
        classify.Run.load(run)
    run = _skops_run(world, tmp_path, heads.HEADS["logreg"].make())  # sklearn's own, unfitted
    with pytest.raises(UserError, match="disagree on the classes"):
        classify.Run.load(run)


def test_every_head_saves_no_pickle_and_predicts_identically_in_a_fresh_process(world, tmp_path):
    listed = classify_cli(["--list-heads"], tmp_path)
    assert [line.split()[0] for line in listed.stdout.splitlines()] == list(heads.HEADS)
    for name, run in world["runs"].items():
        files = {p.name for p in run.path.iterdir()}
        assert "head.joblib" not in files and "head.skops" in files, name
        assert ("head.keras" in files) == (name == "dense"), name
        assert set(skops.io.get_untrusted_types(file=run.path / "head.skops")) <= set(
            heads.SKOPS_TYPES)
    np.save(tmp_path / "X.npy", world["X"])
    script = ("import json, sys\nimport numpy as np\nimport classify\n"
              "X = np.load(sys.argv[1])\nout = {}\n"
              "for path in sys.argv[2:]:\n"
              "    run = classify.Run.load(path)\n"
              "    out[path] = [run.predict(X), run.predict_proba(X).tolist()]\n"
              "print(json.dumps(out))\n")
    paths = [str(run.path) for run in world["runs"].values()]
    proc = run_python(script, tmp_path / "X.npy", *paths, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.splitlines()[-1])
    for run in world["runs"].values():
        labels, proba = loaded[str(run.path)]
        assert labels == run.predict(world["X"]), run.head
        np.testing.assert_allclose(proba, run.predict_proba(world["X"]), rtol=1e-6, atol=1e-7)
    assert "unknown" in loaded[str(world["runs"][OPEN_SET].path)][0]  # its rejector came back


def test_an_old_pickled_run_loads_with_trust_and_predicts_the_same(world, tmp_path):
    X = world["X"]
    for head in ("logreg", "dense", OPEN_SET):
        old = pickled_copy(world, head, tmp_path / head)
        with pytest.raises(UserError, match="--trust-pickle"):
            classify.Run.load(old)
        trusted = classify.Run.load(old, trust_pickle=True)
        assert trusted.predict(X) == world["runs"][head].predict(X)
        np.testing.assert_allclose(trusted.predict_proba(X), world["runs"][head].predict_proba(X),
                                   rtol=1e-6, atol=1e-7)
        # Saving it again writes the safe format, which loads without trust.
        converted = trusted.save(tmp_path / f"{head}-converted")
        assert not (converted / "head.joblib").exists() and (converted / "head.skops").is_file()
        assert classify.Run.load(converted).predict(X) == trusted.predict(X)
    old = tmp_path / "logreg"
    proc = classify_cli(["predict", world["image"], "--run", old, "--trust-pickle", "--json"],
                        tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == classify.predict([world["image"]], world["runs"]["logreg"])


def test_run_files_outside_the_folder_or_with_code_are_refused(world, tmp_path):
    run = shared_copy(world, "logreg", tmp_path / "linked")
    (run / "head.skops").unlink()
    (run / "head.skops").symlink_to(world["runs"]["centroid"].path / "head.skops")
    with pytest.raises(UserError, match=r"head\.skops points outside its run folder"):
        classify.Run.load(run)
    import keras
    inputs = keras.Input((512,))
    # Python code in a Keras file: a Lambda layer's bytecode, which safe mode never loads
    lambda_model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2.0)(inputs))
    run = shared_copy(world, "dense", tmp_path / "lambda")
    lambda_model.save(run / "head.keras")
    with pytest.raises(UserError, match=r"cannot load .*head\.keras .*Lambda"):
        classify.Run.load(run)
    # A fine-tuned run's model.keras loads in safe mode too.
    tuned = shared_copy(world, "logreg", tmp_path / "tuned")
    record = json.loads((tuned / "run.json").read_text())
    (tuned / "run.json").write_text(json.dumps({**record, "head": "finetune"}))
    lambda_model.save(tuned / "model.keras")
    with pytest.raises(UserError, match=r"cannot load .*model\.keras .*Lambda"):
        classify.Run.load(tuned)
