"""Runs that say what they do: `--doctor`, the header line before work, and the warning after
a run whose embeddings cannot tell images apart. The command line as a user runs it: --doctor
in a fresh process (the Keras backend it names is chosen at import), the others called in this
one with the environment they name."""

import json
import warnings

import h5py
import numpy as np
import pytest

from conftest import call_cli, cli_env, make_folder, run_cli


def _featurize(*args, cwd, env=None, monkeypatch=None):
    """`featurize ARGS` with these environment variables: in a fresh process, or (given
    monkeypatch) called in this one."""
    if monkeypatch is None:
        return run_cli("featurize", *args, cwd=cwd, env=cli_env(**(env or {})))
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    return call_cli("featurize", *args, cwd=cwd)


def test_doctor_says_what_a_run_would_use_and_why(tmp_path):
    keras_home = tmp_path / "keras_home"
    done = _featurize("--doctor", "--backbone", "mobilenetv2", "--weights", "none",
                      "--runtime", "onnx", "--batch-size", "8", "--workers", "3", cwd=tmp_path,
                      env={"KERAS_BACKEND": "tensorflow", "KERAS_HOME": str(keras_home)})
    assert done.returncode == 0, done.stderr
    lines = {line.split(":")[0]: line for line in done.stdout.splitlines()}
    assert "tensorflow" in lines["backend"] and "KERAS_BACKEND=tensorflow" in lines["backend"]
    assert "cpu" in lines["devices"].lower() and "[gpu]" in lines["devices"]
    assert "onnx" in lines["runtime"] and "--runtime" in lines["runtime"]
    assert "float32" in lines["precision"]
    assert " 8 " in lines["batch size"] + " " and "--batch-size" in lines["batch size"]
    assert " 3 " in lines["workers"] + " " and "--workers" in lines["workers"]
    assert "keras" in lines["versions"]
    assert not list(tmp_path.glob("data")), "--doctor wrote a cache folder"


def test_doctor_names_the_default_runtime_choice(tmp_path, monkeypatch):
    env = {"FEATURIZE_RUNTIME": "", "KERAS_HOME": str(tmp_path / "kh")}
    done = _featurize("--doctor", "--backbone", "mobilenetv2", "--weights", "none",
                      cwd=tmp_path, env=env, monkeypatch=monkeypatch)
    assert done.returncode == 0, done.stderr
    runtime = next(line for line in done.stdout.splitlines() if line.startswith("runtime"))
    from featurize.runtimes import installed
    expected = "openvino" if installed("openvino") else "onnx" if installed("onnx") else "keras"
    assert runtime.split()[1] == expected, runtime
    assert "(" in runtime and ")" in runtime  # and why


def test_doctor_says_missing_weights_without_downloading(tmp_path, monkeypatch):
    done = _featurize("--doctor", "--backbone", "vggface-vgg16", cwd=tmp_path,
                      env={"KERAS_HOME": str(tmp_path / "kh")}, monkeypatch=monkeypatch)
    assert done.returncode == 0, done.stderr
    weights = next(line for line in done.stdout.splitlines() if line.startswith("weights"))
    assert "not available" in weights and "dlib-resnet" in weights, weights
    assert not (tmp_path / "kh" / "models" / "vggface").exists()


def test_a_run_says_what_it_will_do_then_warns_of_all_zero_embeddings(tmp_path, monkeypatch):
    faces = make_folder(tmp_path / "faces")
    done = _featurize(str(faces), "--backbone", "mobilenetv2", "--weights", "none",
                      "--input-size", "32", "--out", str(tmp_path / "c.h5"), cwd=tmp_path,
                      env={"FEATURIZE_RUNTIME": "keras"}, monkeypatch=monkeypatch)
    assert done.returncode == 0, done.stderr
    err = done.stderr.splitlines()
    header = next(line for line in err if line.startswith("featurize: "))
    for part in ("12 images to embed", "mobilenetv2", "runtime keras", "float32",
                 str(tmp_path / "c.h5")):
        assert part in header, header
    assert err.index(header) == 0, done.stderr  # before any work
    warning = [line for line in err if line.startswith("warning: ")]
    assert len(warning) == 1 and "all ~0" in warning[0] and "--weights" in warning[0], err
    again = _featurize(str(faces), "--backbone", "mobilenetv2", "--weights", "none",
                       "--input-size", "32", "--out", str(tmp_path / "c.h5"), cwd=tmp_path,
                       env={"FEATURIZE_RUNTIME": "keras"}, monkeypatch=monkeypatch)
    assert "featurize: " not in again.stderr  # nothing to embed: nothing to announce


@pytest.mark.parametrize("rows, expected", [
    (np.zeros((5, 4)), "all ~0"),
    (np.tile([[0.5, -1.0, 2.0, 0.1]], (5, 1)), "same embedding"),
    (np.vstack([np.full((1, 4), np.nan), np.eye(4)]), "NaN"),
    (np.eye(5, 4) + 0.1, None),
])
def test_degenerate_names_each_kind(tmp_path, rows, expected):
    from featurize.jobs.run import degenerate
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        f["embeddings"] = rows.astype(np.float32)
    found = degenerate(path)
    assert (found is None) if expected is None else (expected in found), found


def test_embed_folder_warns_python_callers(tmp_path):
    import featurize
    faces = make_folder(tmp_path / "faces")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        featurize.embed_folder(faces, backbone="mobilenetv2", weights="none", input_size=32,
                               cache=tmp_path / "c.h5", progress=False, runtime="keras")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("all ~0" in m for m in messages), messages
    assert json.loads(json.dumps(messages))  # plain text, one line each


def test_a_one_time_export_is_announced_before_it_starts_and_only_once(tmp_path, monkeypatch):
    faces = make_folder(tmp_path / "faces", per_class=2)
    env = {"KERAS_HOME": str(tmp_path / "kh")}
    options = ["--backbone", "mobilenetv2", "--weights", "none", "--input-size", "32",
               "--runtime", "onnx"]
    first = _featurize(str(faces), *options, "--out", str(tmp_path / "a.h5"), cwd=tmp_path,
                       env=env, monkeypatch=monkeypatch)
    assert first.returncode == 0, first.stderr
    lines = first.stderr.splitlines()
    assert lines[0].startswith("featurize: 6 images to embed") and "runtime onnx" in lines[0]
    assert lines[1].startswith("featurize: exporting mobilenetv2 for onnx first"), lines[:3]
    second = _featurize(str(faces), *options, "--out", str(tmp_path / "b.h5"), cwd=tmp_path,
                        env=env, monkeypatch=monkeypatch)
    assert second.returncode == 0 and "exporting" not in second.stderr, second.stderr
