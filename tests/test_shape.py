"""The packages' shape as users meet it: Python errors for Python callers (ValueErrors that
name the argument) and flags on the command line; one runtime-aware extractor, so predict and
search embed new images on the runtime featurize chose; registries that refuse a name twice;
the `embed` subcommand and folders named like a subcommand; the one atomic-write module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import classify
import featurize
from conftest import make_folder, run_cli
from featurize import atomic
from featurize.errors import OptionError, UserError

TINY = dict(backbone="vggface-vgg16", weights="none", input_size=32)
cli = run_cli  # `python -m MODULE ARGS` in a fresh process: the point of these tests


# --- errors for each audience -------------------------------------------------------------

def test_user_errors_are_value_errors_that_name_the_field():
    assert issubclass(UserError, ValueError) and issubclass(OptionError, UserError)
    with pytest.raises(ValueError, match=r"^min_per_class must be at least 1, not 0\.$"):
        classify.TrainOptions(min_per_class=0)
    with pytest.raises(ValueError, match=r"^crop must be a fraction in \(0, 1\], not 2\.0\.$"):
        featurize.EmbedderConfig("vggface-vgg16", crop=2.0)
    with pytest.raises(OptionError) as e:
        classify.FinetuneOptions(unfreeze_blocks=-1)
    assert e.value.field == "unfreeze_blocks"
    assert e.value.command_line().startswith("--unfreeze must be at least 0")


def test_the_command_lines_name_the_flags(tmp_path):
    proc = cli("classify", "--min-per-class", "0", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --min-per-class must be at least 1, not 0."
    proc = cli("featurize", tmp_path, "--crop", "2", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --crop must be a fraction in (0, 1], not 2.0."


def test_signatures_show_none_not_data_tables():
    import inspect
    defaults = [p.default for p in inspect.signature(featurize.fetch_lfw).parameters.values()]
    assert not any(isinstance(d, dict) for d in defaults)


# --- registries ----------------------------------------------------------------------------

def test_a_family_or_head_name_is_registered_once():
    from featurize.models.registry import FAMILIES, register_family
    with pytest.raises(ValueError, match="already registered"):
        register_family(FAMILIES["vggface"])
    with pytest.raises(ValueError, match="'logreg' is already registered"):
        classify.register_head(classify.HeadSpec("logreg", "again", dict, "probability"))


def test_a_registered_head_trains(tmp_path):
    from sklearn.neighbors import NearestCentroid

    from classify import _heads
    from conftest import blobs, synthetic_cache
    head = classify.HeadSpec("test-nearest-centroid", "sklearn's NearestCentroid",
                             lambda **p: NearestCentroid(**p), "score")
    classify.register_head(head)
    try:
        X, y, classes = blobs(n_classes=3, per_class=10, dim=8)
        path = synthetic_cache(tmp_path / "c.h5", X, y, classes)
        run = classify.train(path, "test-nearest-centroid", min_per_class=2)
        assert run.metrics["accuracy"] > 0.9
    finally:
        del _heads.HEADS[head.name]


# --- one runtime-aware extractor ----------------------------------------------------------

@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_predict_and_search_embed_on_the_runtime_featurize_chose(tmp_path, monkeypatch, runtime):
    from featurize.runtimes import installed
    if not installed(runtime):
        pytest.skip(f"{runtime} is not installed (the test extra installs it)")
    monkeypatch.setenv("FEATURIZE_RUNTIME", runtime)  # this machine's default runtime
    folder = make_folder(tmp_path / "images", per_class=3)
    c = featurize.embed_folder(folder, cache_dir=tmp_path / "cache", progress=False, **TINY)
    assert c.attrs["runtime"] == runtime
    images = sorted(str(p) for p in folder.rglob("*.jpg"))[:4]

    run = classify.train(c.path, "centroid", min_per_class=2)
    run.predict(images)
    assert run._extractor.provenance()["runtime"] == runtime
    gallery = classify.Gallery(c.path)
    hits = gallery.search(images)
    assert gallery._extractor.provenance()["runtime"] == runtime
    # the same embeddings as the cache's: each image finds itself first
    assert [Path(h["neighbours"][0]["path"]) for h in hits] == [Path(p) for p in images]


# --- the command line's subcommands --------------------------------------------------------

def test_embed_is_the_default_command_and_has_a_name(tmp_path):
    folder = make_folder(tmp_path / "map", per_class=2)  # a folder named like a subcommand
    flags = ["--backbone", "vggface-vgg16", "--weights", "none", "--input-size", "32",
             "--quiet", "--cache-dir", tmp_path / "cache"]
    named = cli("featurize", "map", *flags, cwd=tmp_path)
    assert named.returncode == 2  # `map` is the command; the hint says how to embed the folder
    assert "python -m featurize ./map or python -m featurize embed map" in named.stderr
    as_path = cli("featurize", "./map", *flags, cwd=tmp_path)
    assert as_path.returncode == 0, as_path.stderr
    explicit = cli("featurize", "embed", folder.name, *flags, cwd=tmp_path)
    assert explicit.returncode == 0, explicit.stderr
    assert "6 already cached" in explicit.stdout


# --- atomic files ------------------------------------------------------------------------

def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    atomic.write_text(target, "old")

    def crash(tmp, final):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(atomic, "replace", crash)
    with pytest.raises(OSError):
        atomic.write_text(target, "new")
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]


def test_a_folder_is_published_whole(tmp_path):
    work = atomic.new_folder_beside(tmp_path / "out")
    (work / "a.npy").write_bytes(np.zeros(3).tobytes())
    atomic.publish(work, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "a.npy").is_file()
    second = atomic.new_folder_beside(tmp_path / "out")
    (second / "b").write_text("x")
    with pytest.raises(OSError):  # never merged into, never replaced
        atomic.publish(second, tmp_path / "out")
    atomic.discard(second)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.npy"]
