"""dlib's model files are found without importing `pkg_resources` (face_recognition_models'
own __init__ imports it; setuptools 81+ no longer has it and a Python 3.12+ virtualenv has no
setuptools at all), and an import of dlib that fails is reported with its real reason."""

import importlib.util
import os
import sys
from pathlib import Path

import h5py
import pytest

from conftest import (
    LFW_IMAGES,
    cli_env,
    lfw_available,
    one_line_error,
    run_cli,
    run_python,
    write_image,
)

HAS_DLIB = importlib.util.find_spec("dlib") is not None
TINY = ["--backbone", "vggface-vgg16", "--weights", "none", "--input-size", "32", "--quiet"]
LFW_SAMPLE = ["Aaron_Peirsol/Aaron_Peirsol_0001.jpg", "Aaron_Peirsol/Aaron_Peirsol_0002.jpg",
              "Colin_Powell/Colin_Powell_0007.jpg"]


def _blockers(folder: Path, **modules) -> Path:
    """A folder of stand-in modules: name -> source (put first on PYTHONPATH)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        (folder / f"{name}.py").write_text(source)
    return folder


def _run(args, cwd, blockers, module="featurize"):
    """The command line in a fresh process whose imports meet the stand-ins first."""
    return run_cli(module, *args, cwd=cwd, env=cli_env(path=[blockers]))


NO_PKG_RESOURCES = "raise ImportError(\"No module named 'pkg_resources' (blocked by the test)\")\n"


@pytest.mark.skipif(not (lfw_available() and HAS_DLIB), reason="needs ../shared and dlib")
def test_dlib_resnet_and_align_dlib_run_where_pkg_resources_does_not_import(tmp_path):
    blockers = _blockers(tmp_path / "blockers", pkg_resources=NO_PKG_RESOURCES)
    check = run_python("import pkg_resources", env={**os.environ, "PYTHONPATH": str(blockers)})
    assert check.returncode == 1 and "blocked by the test" in check.stderr  # the blocker works
    for name in LFW_SAMPLE:
        target = tmp_path / "data" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(LFW_IMAGES / name)
    for args in (["--backbone", "dlib-resnet", "--quiet"], TINY + ["--align", "dlib"]):
        out_file = tmp_path / f"{args[1]}.h5"
        code, out, err = _run([tmp_path / "data", *args, "--workers", "1", "--out", out_file],
                              tmp_path, blockers)
        assert code == 0 and "Traceback" not in err, err
        with h5py.File(out_file) as f:
            assert len(f["paths"]) == len(LFW_SAMPLE)
            assert f.attrs["backbone"] == args[1]


def test_a_dlib_that_does_not_import_is_reported_with_its_reason(tmp_path):
    write_image(tmp_path / "data" / "a" / "a.jpg", 0)
    blockers = _blockers(tmp_path / "blockers",
                         dlib="raise ImportError('libcblas.so.3: cannot open shared object')\n")
    for args, needle in ((["--backbone", "dlib-resnet"], "dlib-resnet backbone needs dlib"),
                         (TINY + ["--align", "dlib"], "--align dlib needs dlib")):
        code, _, err = _run([tmp_path / "data", *args, "--cache-dir", tmp_path / "c"], tmp_path,
                            blockers)
        one_line_error(code, err, needle, "libcblas.so.3: cannot open shared object",
                       "pip install -e '.[dlib]'")
    assert not (tmp_path / "c").exists()


def test_missing_model_files_are_a_one_line_error(tmp_path):
    """A face_recognition_models without its models folder (dlib itself stands in: an
    empty module); its __init__ would raise if anything imported it."""
    write_image(tmp_path / "data" / "a" / "a.jpg", 0)
    blockers = _blockers(tmp_path / "blockers", dlib="")
    package = blockers / "face_recognition_models"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('the package was imported')\n")
    code, _, err = _run([tmp_path / "data", "--backbone", "dlib-resnet", "--cache-dir",
                         tmp_path / "c"], tmp_path, blockers)
    one_line_error(code, err, "face-recognition-models package at", "has no models folder",
                   "pip install -e '.[dlib]'")
    assert "was imported" not in err


@pytest.mark.skipif(not HAS_DLIB, reason="dlib not installed (pip install -e '.[dlib]')")
def test_the_model_files_are_the_packages_own(monkeypatch):
    """The files are those face_recognition_models itself names (where it imports)."""
    from featurize.models import dlib_backbone
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "pkg_resources", None)  # as on Python 3.12+
        path = dlib_backbone.model_path()
    assert path.is_file() and path.parent.name == "models"
    assert path.parent.parent.name == "face_recognition_models"
    frm = pytest.importorskip("face_recognition_models")  # it needs pkg_resources itself
    assert Path(frm.face_recognition_model_location()) == path
    assert dlib_backbone.model_file("five_point") == frm.pose_predictor_five_point_model_location()
    assert dlib_backbone.model_file("cnn") == frm.cnn_face_detector_model_location()
