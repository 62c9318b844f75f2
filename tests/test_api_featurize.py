"""The featurize Python API (issue #12): Embedder, embed_folder, open_cache, typed options,
and a caller's process left as it was found."""

import socket
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import featurize
from conftest import call_cli, cli_env, make_folder, run_python, same, write_image
from featurize.errors import UserError
from featurize.models import dlib_backbone

TINY = dict(backbone="vggface-vgg16", weights="none", input_size=32)


def _run_script(script: str, cwd: Path):
    return run_python(script, cwd=cwd, env=cli_env(TF_CPP_MIN_LOG_LEVEL="3"), timeout=300)


def _rows(cache, root: Path, paths) -> np.ndarray:
    """The cache's rows for these image files, in their order."""
    index = {p: i for i, p in enumerate(cache.paths)}
    return cache.X[[index[str(Path(p).relative_to(root))] for p in paths]]


# --- item 1: Embedder --------------------------------------------------------------------------

def test_embedder_gives_the_caches_numbers_for_paths_pil_images_and_arrays(tmp_path):
    folder = make_folder(tmp_path / "faces")
    write_image(folder / "dave" / "grey.png", seed=7, size=(52, 36), mode="L")
    write_image(folder / "dave" / "alpha.png", seed=8, size=(30, 44), mode="RGBA")
    cache = featurize.embed_folder(folder, cache=tmp_path / "c", progress=False, **TINY)
    paths = sorted(str(p) for p in folder.rglob("*.*"))
    embedder = featurize.Embedder(**TINY, batch_size=5)  # several batches, one partial
    expected = _rows(cache, folder, paths)
    X = embedder(paths)
    assert X.dtype == np.float32 and X.shape == (14, 512) == (len(paths), embedder.dim)
    np.testing.assert_allclose(X, expected, rtol=same(), atol=1e-6)
    pil = [Image.open(p) for p in paths]  # grey, RGBA: converted as the files are
    arrays = [np.asarray(Image.open(p)) for p in paths]  # (h, w), (h, w, 4), (h, w, 3)
    mixed = pil[:5] + arrays[5:]
    np.testing.assert_allclose(embedder(mixed), expected, rtol=same(), atol=1e-6)
    one = embedder(arrays[3])  # a single image is a batch of one
    assert one.shape == (1, 512)
    np.testing.assert_allclose(one[0], expected[3], rtol=same(), atol=1e-6)
    assert embedder.settings == cache.settings


def test_embedder_crop_and_device_resize_follow_the_cache(tmp_path):
    folder = make_folder(tmp_path / "faces", classes=("a",), per_class=3)
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    for options in (dict(crop=0.8, flip=True), dict(resize="device")):
        cache = featurize.embed_folder(folder, cache=tmp_path / "c", progress=False,
                                       **TINY, **options)
        if options.get("resize"):
            options["source_size"] = (40, 40)  # featurize took it from the first image
        embedder = featurize.Embedder(**TINY, **options)
        assert embedder.settings == cache.settings
        pixels = [np.asarray(Image.open(p)) for p in paths]
        np.testing.assert_allclose(embedder(pixels), _rows(cache, folder, paths),
                                   rtol=same(), atol=1e-6)


def test_embedder_mistakes_are_one_clear_error(tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    embedder = featurize.Embedder(**TINY)
    with pytest.raises(UserError, match="notes.jpg cannot be embedded: not an image"):
        embedder([str(write_image(tmp_path / "ok.jpg", 1)), bad])
    with pytest.raises(UserError, match="image missing.png does not exist"):
        embedder(Path("missing.png"))
    with pytest.raises(UserError, match=r"image 1 is an array of float32 .*uint8"):
        embedder([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(UserError, match="cannot embed a int"):
        embedder(3)
    with pytest.raises(UserError, match="^crop must be a fraction"):
        featurize.Embedder(**TINY, crop=1.5)
    with pytest.raises(UserError, match="unknown backbone"):
        featurize.Embedder("vgg-nope")
    with pytest.raises(UserError, match="source_size"):
        featurize.Embedder(**TINY, resize="device")


def test_dlib_embedder_takes_paths_and_arrays(tmp_path):
    pytest.importorskip("dlib")
    try:  # dlib and its model files, found without importing face_recognition_models
        dlib_backbone.check_installed()
    except UserError as e:
        pytest.skip(str(e))
    folder = make_folder(tmp_path / "faces", classes=("a",), per_class=2)
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    cache = featurize.embed_folder(folder, backbone="dlib-resnet", cache=tmp_path / "c",
                                   progress=False)
    embedder = featurize.Embedder("dlib-resnet")
    X = embedder(paths + [np.asarray(Image.open(paths[0]))])
    assert X.shape == (3, 128) and embedder.dim == 128
    np.testing.assert_allclose(X[:2], _rows(cache, folder, paths), atol=1e-6)
    np.testing.assert_array_equal(X[2], X[0])


# --- item 2: embed_folder and open_cache --------------------------------------------------------

def test_embed_folder_is_incremental_and_returns_the_opened_cache(tmp_path):
    folder = make_folder(tmp_path / "faces")
    (folder / "bob" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 50)
    embedder = featurize.Embedder(**TINY)
    first = featurize.embed_folder(folder, embedder, cache=tmp_path / "c", progress=False)
    assert first.summary.embedded == 12 and first.X.shape == (12, 512)
    assert first.classes == ["alice", "bob", "carol"]
    assert first.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert list(first.failed) == ["bob/broken.jpg"]
    write_image(folder / "carol" / "new.jpg", seed=99)
    again = featurize.embed_folder(folder, first.settings, cache=tmp_path / "c", progress=False)
    assert (again.summary.embedded, again.summary.reused) == (1, 13)  # 12 rows, 1 failure
    assert again.path == first.path and len(again.paths) == 13
    np.testing.assert_array_equal(featurize.open_cache(first.path).X, again.X)
    np.testing.assert_allclose(again.X[again.paths.index("carol/new.jpg")],
                               embedder(str(folder / "carol" / "new.jpg"))[0],
                               rtol=same(), atol=1e-6)
    named = featurize.embed_folder(folder, featurize.EmbedderConfig(**TINY),
                                   cache=tmp_path / "named.h5", progress=False, batch_size=4)
    assert named.path == tmp_path / "named.h5" and named.summary.embedded == 13
    as_made = featurize.embed_folder(folder, named, cache=tmp_path / "named.h5", progress=False)
    assert as_made.summary.reused == 14  # the Cache itself: embedded as it was


def test_embed_folder_options_are_checked_before_anything_is_written(tmp_path):
    folder = make_folder(tmp_path / "faces", classes=("a",), per_class=1)
    embedder = featurize.Embedder(**TINY)
    for options, message in ((dict(workers=-1), "^workers must be between 1 and 256"),
                             (dict(flush_rows=0), "^flush_rows must be at least 1"),
                             (dict(check="sha"), "^check must be mtime or content"),
                             (dict(input_size=64), "input_size belong to the Embedder")):
        with pytest.raises(UserError, match=message):
            featurize.embed_folder(folder, embedder, cache=tmp_path / "c", **options)
    with pytest.raises(UserError, match="takes an Embedder"):
        featurize.embed_folder(folder, "vggface-vgg16", cache=tmp_path / "c")
    with pytest.raises(TypeError, match="unknown featurize option"):
        featurize.embed_folder(folder, embedder, cache=tmp_path / "c", batchsize=3)
    assert not (tmp_path / "c").exists()


def test_cache_to_pandas(tmp_path):
    pd = pytest.importorskip("pandas")
    folder = make_folder(tmp_path / "faces", classes=("a", "b"), per_class=2)
    write_image(folder / "flat.jpg", seed=3)  # a file beside the class folders
    cache = featurize.embed_folder(folder, cache=tmp_path / "c", progress=False, **TINY)
    frame = cache.to_pandas()
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == ["path", "label", "embedding"]
    assert frame["path"].tolist() == cache.paths
    assert cache.paths[-1] == "flat.jpg" and cache.y[-1] == -1
    assert frame["label"].tolist()[:4] == ["a", "a", "b", "b"]
    assert frame["label"].isna().tolist() == [False] * 4 + [True]  # unlabelled
    np.testing.assert_array_equal(np.stack(frame["embedding"].to_list()), cache.X)


def test_cache_to_pandas_without_pandas_says_how_to_get_it(tmp_path, monkeypatch):
    from conftest import synthetic_cache
    path = synthetic_cache(tmp_path / "s.h5", np.ones((2, 4), np.float32), [0, 1], ["a", "b"])
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas fails
    with pytest.raises(UserError, match="pip install pandas"):
        featurize.open_cache(path).to_pandas()


# --- item 3: typed options, validated once, defaults written once --------------------------------

def test_options_are_checked_once_when_made():
    from featurize.jobs.run import FeaturizeOptions, RunOptions
    with pytest.raises(UserError, match="^batch_size must be between 1 and 8192, not 0"):
        RunOptions(batch_size=0)
    with pytest.raises(UserError, match="--jitter is for the dlib-resnet backbone only"):
        featurize.EmbedderConfig("vggface-vgg16", jitter=2)
    with pytest.raises(UserError, match="^pool must be avg or max, not 'mean'"):
        FeaturizeOptions.from_kwargs(pool="mean")
    with pytest.raises(UserError, match="^resize must be cpu or device"):
        featurize.EmbedderConfig(resize="gpu")
    options = FeaturizeOptions.from_kwargs(**TINY, workers=3)
    assert options.embedding == featurize.EmbedderConfig(**TINY)
    assert options.run == RunOptions(workers=3)


def test_command_line_defaults_are_the_dataclass_defaults():
    from dataclasses import fields

    from featurize.cli import options_from, parse
    from featurize.jobs.run import FeaturizeOptions
    from_cli = options_from(parse(["folder"]))
    defaults = FeaturizeOptions()
    assert from_cli.embedding == defaults.embedding
    assert {f.name: getattr(from_cli.run, f.name) for f in fields(from_cli.run)} == \
        {f.name: getattr(defaults.run, f.name) for f in fields(defaults.run)
         if f.name != "cache_dir"} | {"cache_dir": str(defaults.run.cache_dir)}


def test_the_command_line_and_python_make_the_same_cache(tmp_path):
    folder = make_folder(tmp_path / "faces", classes=("a", "b"), per_class=2)
    proc = call_cli("featurize", folder, "--backbone", "vggface-vgg16", "--weights", "none",
                    "--input-size", "32", "--quiet", "--cache-dir", "c", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    again = featurize.embed_folder(folder, cache=tmp_path / "c", progress=False, **TINY)
    assert again.summary.embedded == 0 and again.summary.reused == 4  # the CLI's own cache
    bad = call_cli("featurize", folder, "--checkpoint-rows", "0", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: --checkpoint-rows must be at least 1, not 0."


# --- item 4: the caller's process is left as it was found ---------------------------------------

def test_random_weights_leave_the_callers_random_state_and_dtype_policy(tmp_path):
    """In a fresh process: the first Keras import is part of it."""
    script = """
import random, numpy as np, featurize
random.seed(123); np.random.seed(5)
expect_py = random.Random(); expect_py.setstate(random.getstate())
expect_np = np.random.RandomState(); expect_np.set_state(np.random.get_state())
e = featurize.Embedder("vggface-vgg16", "none", input_size=32)
X = e(np.full((32, 32, 3), 9, np.uint8))
assert random.random() == expect_py.random(), "python random state changed"
assert np.random.random() == expect_np.random_sample(), "numpy random state changed"
import keras
keras.mixed_precision.set_global_policy("float16")
featurize.Embedder("vggface-vgg16", "none", input_size=32, precision="mixed").dim
assert keras.mixed_precision.global_policy().name == "float16"
print(X[0, :3])
"""
    first, second = _run_script(script, tmp_path), _run_script(script, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout == second.stdout  # the same random network in every process


def test_random_network_is_the_one_keras_set_random_seed_gives():
    import keras

    from featurize.models.keras import build_base
    from featurize.vggface import vggface_vgg16
    embedder = featurize.Embedder(**TINY)
    ours = build_base(embedder.settings, embedder.resolved_weights)
    keras.utils.set_random_seed(0)  # what build_base did before issue #12, globally
    theirs = vggface_vgg16(include_top=False, input_shape=(32, 32, 3))
    assert len(ours.weights) == len(theirs.weights)
    for a, b in zip(ours.weights, theirs.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_embedder_and_embed_folder_work_from_a_thread_and_keep_process_flags(tmp_path):
    folder = make_folder(tmp_path / "faces", classes=("a",), per_class=2)
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    flags = (ImageFile.LOAD_TRUNCATED_IMAGES, socket.getdefaulttimeout())
    results, errors = {}, []

    def work():
        try:
            embedder = featurize.Embedder(**TINY)
            results["X"] = embedder(paths)
            results["cache"] = featurize.embed_folder(folder, embedder, cache=tmp_path / "c",
                                                      progress=False)
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not errors, errors
    np.testing.assert_allclose(results["X"], _rows(results["cache"], folder, paths),
                               rtol=same(), atol=1e-6)
    assert (ImageFile.LOAD_TRUNCATED_IMAGES, socket.getdefaulttimeout()) == flags


# --- item 5: import featurize stays cheap --------------------------------------------------------

def test_import_featurize_and_open_a_cache_without_keras(tmp_path):
    folder = make_folder(tmp_path / "faces", classes=("a",), per_class=2)
    cache = featurize.embed_folder(folder, cache=tmp_path / "c", progress=False, **TINY)
    script = f"""
import sys, featurize
assert "keras" not in sys.modules and "featurize.api" not in sys.modules
c = featurize.open_cache({str(cache.path)!r})
assert c.X.shape == (2, 512) and c.paths == ["a/a_0000.jpg", "a/a_0001.jpg"]
again = featurize.embed_folder({str(folder)!r}, c.settings, cache={str(cache.path)!r},
                               progress=False)
assert again.summary.reused == 2
assert "keras" not in sys.modules and "tensorflow" not in sys.modules, "Keras imported"
assert "Embedder" in dir(featurize)
print("ok")
"""
    proc = _run_script(script, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"
    with pytest.raises(AttributeError, match="no attribute 'embedder'"):
        featurize.embedder  # noqa: B018


def test_the_readme_example_runs_in_a_fresh_process(tmp_path):
    make_folder(tmp_path / "faces")
    script = """
import numpy as np
import featurize
from PIL import Image

embedder = featurize.Embedder("vggface-vgg16", weights="none", input_size=32)
X = embedder(["faces/alice/alice_0000.jpg", Image.open("faces/bob/bob_0000.jpg"),
              np.zeros((40, 40, 3), np.uint8)])
print(X.shape, X.dtype, embedder.dim)
cache = featurize.embed_folder("faces", embedder, progress=False)
print(cache.X.shape, cache.y[:5], cache.classes, cache.summary.embedded)
same = featurize.open_cache(cache.path)
print(len(same.paths), same.failed)
"""
    proc = _run_script(script, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [
        "(3, 512) float32 512", "(12, 512) [0 0 0 0 1] ['alice', 'bob', 'carol'] 12", "12 {}"]
    assert len(list((tmp_path / "data" / "cache").glob("faces-*.h5"))) == 1
