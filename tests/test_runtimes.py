"""Issue #14: --runtime keras|onnx|openvino runs the same model as Keras (same cache key),
exported once and reused."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import call_cli, cli_env, make_folder, run_python, write_image
from featurize import runtimes
from featurize.errors import UserError

pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")
pytest.importorskip("openvino")

TINY = dict(backbone="vggface-vgg16", weights="none", input_size=32)
FAITHFUL = 1e-5  # max abs difference / max abs reference value
# Every family we ship that a runtime runs (dlib is not a Keras model), at a small size.
# ConvNeXt is left out: tf2onnx leaves its depthwise convolutions unconverted (the default
# runtime then falls back to OpenVINO).
# CI runs two (a VGGFace with BatchNorm, and EfficientNet, whose normalisation layer once
# broke the export); `python -m pytest -m slow` runs the other seven too.
_SLOW = pytest.mark.slow
EQUIVALENCE = [pytest.param("vggface-vgg16", 64, marks=_SLOW), ("vggface-resnet50", 64),
               pytest.param("vggface-senet50", 64, marks=_SLOW),
               pytest.param("vgg16", 64, marks=_SLOW), pytest.param("resnet50v2", 64, marks=_SLOW),
               pytest.param("mobilenetv2", 64, marks=_SLOW), ("efficientnetb0", 64),
               pytest.param("densenet121", 64, marks=_SLOW), pytest.param("xception", 71, marks=_SLOW)]


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory):
    """One KERAS_HOME for the module: exports made by one test are reused by the next."""
    return tmp_path_factory.mktemp("keras_home")


@pytest.fixture
def home(shared_home, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(shared_home))
    return shared_home


def relative_difference(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def random_bn_weights(name: str, size: int, path: Path) -> Path:
    """A weight file for `name` with random weights AND random BatchNorm statistics (with
    the defaults, mean 0 and variance 1, BatchNorm is nearly the identity)."""
    import keras

    from featurize.models.registry import get_backbone
    spec = get_backbone(name)
    model = spec.family.build(spec, include_top=False, input_size=size, imagenet=False)
    rng = np.random.default_rng(7)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0, 0.5, shape).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, shape).astype("float32"))
    model.save_weights(path)
    return path


@pytest.mark.parametrize("name,size", EQUIVALENCE)
def test_fp32_runtimes_equal_keras(name, size, home, tmp_path):
    from featurize.models.config import make_settings
    from featurize.runtimes import build_extractor
    weights = random_bn_weights(name, size, tmp_path / f"{name}.weights.h5")
    settings, w = make_settings(name, str(weights), input_size=size)
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    reference = build_extractor(settings, w).embed(images)
    assert np.abs(reference).max() > 0
    for runtime in ("onnx", "openvino"):
        extractor = runtimes.build_extractor(settings, w, runtime)
        assert extractor.provenance()["runtime"] == runtime
        assert relative_difference(extractor.embed(images), reference) <= FAITHFUL, runtime


def test_export_is_made_once_and_rebuilt_when_settings_change(home):
    from featurize.models.config import make_settings
    from featurize.runtimes.exports import exported_model
    settings, w = make_settings(**TINY)
    first = exported_model(settings, w, "openvino")
    mtime = first.path.stat().st_mtime_ns
    again = exported_model(settings, w, "openvino")
    assert first.exported and not again.exported and again.path == first.path
    assert again.path.stat().st_mtime_ns == mtime  # not written again
    identity = json.loads((first.path.parent / "export.json").read_text())
    assert identity["settings"]["weights"] == settings.weights and identity["versions"]["keras"]
    max_pooled, w = make_settings(**TINY, pool="max")
    other = exported_model(max_pooled, w, "openvino")
    assert other.exported and other.path.parent != first.path.parent
    leftovers = [p for p in first.path.parent.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the temporary folders were renamed or removed


def test_default_runtime_is_the_fastest_faithful_one_installed(monkeypatch):
    from featurize.models.config import make_settings
    monkeypatch.delenv("FEATURIZE_RUNTIME")  # the suite's default (conftest): keras
    settings, _ = make_settings(**TINY)
    monkeypatch.setattr(runtimes, "_on_accelerator", lambda: False)
    assert runtimes.choose(settings) == "openvino"  # the fastest on a CPU (benchmarks)
    monkeypatch.setattr(runtimes, "installed", lambda r: r == "onnx")
    assert runtimes.choose(settings) == "onnx"
    monkeypatch.setattr(runtimes, "installed", lambda r: False)
    assert runtimes.choose(settings) == "keras"
    monkeypatch.setattr(runtimes, "installed", lambda r: True)
    monkeypatch.setattr(runtimes, "_on_accelerator", lambda: True)
    assert runtimes.choose(settings) == "keras"  # a GPU runs Keras
    mixed, _ = make_settings(**TINY, precision="mixed")
    monkeypatch.setattr(runtimes, "_on_accelerator", lambda: False)
    assert runtimes.choose(mixed) == "keras"  # bfloat16 is Keras's
    with pytest.raises(UserError, match="--runtime keras"):
        runtimes.choose(mixed, "onnx")
    monkeypatch.setenv("FEATURIZE_RUNTIME", "openvino")  # a machine's own default
    assert runtimes.choose(settings) == "openvino"


def test_missing_runtime_names_the_extra(monkeypatch):
    from featurize.models.config import make_settings
    settings, _ = make_settings(**TINY)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # find_spec says: not installed
    with pytest.raises(UserError, match=r"pip install 'featurize-embeddings\[onnx\]'"):
        runtimes.choose(settings, "onnx")
    with pytest.raises(UserError, match="--runtime must be keras or onnx or openvino"):
        runtimes.check_runtime("tensorrt")


def test_embedder_runtime_gives_keras_embeddings(home):
    import featurize
    images = np.random.default_rng(1).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    on_keras = featurize.Embedder(**TINY, runtime="keras")(images)
    on_openvino = featurize.Embedder(**TINY, runtime="openvino")
    assert on_openvino.extractor.provenance()["runtime"] == "openvino"
    assert relative_difference(on_openvino(images), on_keras) <= FAITHFUL


def _featurize(args, cwd, home, code=None):
    """The command line with KERAS_HOME `home`: called in this process, or with `code` (checks
    of the process after the run) in a fresh one."""
    if code is None:
        assert os.environ["KERAS_HOME"] == str(home)  # the `home` fixture's
        return call_cli("featurize", *args, cwd=cwd)
    script = ("import sys\nfrom featurize.cli import main\ncode = main(sys.argv[1:])\n" + code
              + "sys.exit(code)\n")
    return run_python(script, *args, cwd=cwd, env=cli_env(KERAS_HOME=home,
                                                           TF_CPP_MIN_LOG_LEVEL="3"))


def test_cli_runtime_onnx_equals_keras_and_shares_its_cache(tmp_path, home):
    from featurize import open_cache
    folder = make_folder(tmp_path / "faces")
    options = ["--backbone", "vggface-vgg16", "--weights", "none", "--input-size", "32",
               "--quiet"]
    keras_run = _featurize([str(folder), *options, "--runtime", "keras", "--cache-dir", "k"],
                           tmp_path, home)
    onnx_run = _featurize([str(folder), *options, "--runtime", "onnx", "--cache-dir", "o"],
                          tmp_path, home)
    assert keras_run.returncode == 0 and onnx_run.returncode == 0, onnx_run.stderr
    keras_cache = next((tmp_path / "k").glob("*.h5"))
    onnx_cache = next((tmp_path / "o").glob("*.h5"))
    assert onnx_cache.name == keras_cache.name  # the same settings, the same cache key
    a, b = open_cache(keras_cache), open_cache(onnx_cache)
    assert b.attrs["runtime"] == "onnx" and a.attrs["settings"] == b.attrs["settings"]
    assert relative_difference(b.X, a.X) <= FAITHFUL
    # The Keras cache is reused by an ONNX run, which imports neither Keras nor the runtime.
    check = ("assert 'keras' not in sys.modules and 'onnxruntime' not in sys.modules, "
             "'imported'\n")
    reused = _featurize([str(folder), *options, "--runtime", "onnx", "--cache-dir", "k"],
                        tmp_path, home, check)
    assert reused.returncode == 0, reused.stderr
    assert "0 embedded, 12 already cached" in reused.stdout


def test_cli_missing_runtime_is_one_line(tmp_path, home):
    folder = make_folder(tmp_path / "faces", per_class=1)
    hide = "import sys\nsys.modules['openvino'] = None\n"
    script = hide + "from featurize.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    proc = run_python(script, folder, "--backbone", "vggface-vgg16", "--weights", "none",
                      "--runtime", "openvino", cwd=tmp_path, env=cli_env(KERAS_HOME=home),
                      timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --runtime openvino needs openvino: pip install 'featurize-embeddings[openvino]' "
        "(or use --runtime keras)."]
    assert not list(tmp_path.glob("data/cache/*.h5"))  # detected before anything was written


def test_cli_int8_is_its_own_cache_with_a_report(tmp_path, home):
    from featurize import open_cache
    folder = make_folder(tmp_path / "faces", per_class=8)
    options = [str(folder), "--backbone", "vggface-vgg16", "--weights", "none", "--input-size",
               "32", "--quiet", "--cache-dir", "c"]
    fp32 = _featurize(options, tmp_path, home)
    int8 = _featurize([*options, "--precision", "int8"], tmp_path, home)
    assert fp32.returncode == 0 and int8.returncode == 0, int8.stderr
    assert "int8 vs fp32 on 12 held-out images (calibrated on 12): cosine mean 0.9" in int8.stdout
    assert "logistic-regression top-1 agreement" in int8.stdout
    caches = {json.loads(open_cache(p).attrs["settings"])["precision"]: open_cache(p)
              for p in (tmp_path / "c").glob("*.h5")}
    assert set(caches) == {"float32", "int8"}  # two cache keys, two files
    attrs = caches["int8"].attrs
    assert attrs["runtime"] == "onnx" and attrs["int8_calibration_images"] == 12
    assert 0.99 < attrs["int8_mean_cosine"] < 1  # close to fp32, and not the same model
    a, b = caches["float32"].X, caches["int8"].X
    assert 1e-5 < relative_difference(b, a) < 0.1
    # New files change the sample; the cache goes on with the int8 model that made its rows.
    write_image(folder / "alice" / "alice_new.jpg", seed=999)
    more = _featurize([*options, "--precision", "int8"], tmp_path, home)
    assert more.returncode == 0 and "1 embedded, 24 already cached" in more.stdout, more.stderr
    int8_path = next(p for p in (tmp_path / "c").glob("*.h5")
                     if open_cache(p).attrs.get("runtime_export") == attrs["runtime_export"])
    assert open_cache(int8_path).attrs["int8_calibration_images"] == 12
    wrong = _featurize([*options, "--precision", "int8", "--runtime", "keras"], tmp_path, home)
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1
    assert "--precision int8 runs" in wrong.stderr


def test_embedder_int8_needs_a_dataset():
    import featurize
    with pytest.raises(UserError, match="calibrated on a dataset's own images"):
        featurize.Embedder(**TINY, precision="int8")(np.zeros((32, 32, 3), np.uint8))


def test_finetune_refeaturize_goes_through_the_runtime_choice(tmp_path, home, monkeypatch):
    """`classify finetune --refeaturize` embeds with the fine-tuned base on the runtime
    featurize would choose (here a machine default of OpenVINO)."""
    from classify._finetune import _refeaturize
    from featurize import open_cache
    from featurize.models.config import make_settings
    from featurize.models.registry import get_backbone
    from featurize.models.specs import FINETUNED_BASE_WEIGHTS
    folder = make_folder(tmp_path / "faces", per_class=2)
    settings, _ = make_settings(**TINY)
    spec = get_backbone(settings.backbone)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    base = spec.family.build(spec, include_top=False, input_size=32, imagenet=False)
    base.save_weights(run_dir / FINETUNED_BASE_WEIGHTS)  # stands for the fine-tuned base
    monkeypatch.setenv("FEATURIZE_RUNTIME", "openvino")
    path = _refeaturize(settings, folder, run_dir, tmp_path / "cache" / "old.h5")
    attrs = open_cache(path).attrs
    assert attrs["runtime"] == "openvino"
    assert json.loads(attrs["settings"])["weights_file"] == FINETUNED_BASE_WEIGHTS


def test_default_runtime_falls_back_when_it_cannot_export(monkeypatch):
    from featurize.models.config import make_settings
    settings, w = make_settings(**TINY)
    monkeypatch.delenv("FEATURIZE_RUNTIME")
    monkeypatch.setattr(runtimes, "_on_accelerator", lambda: False)
    tried = []

    def exported_extractor(settings, weights, runtime):
        tried.append(runtime)
        if runtime == "openvino":
            raise UserError("could not export it for --runtime openvino (a converter's bug)")
        return runtime

    monkeypatch.setattr(runtimes, "_exported_extractor", exported_extractor)
    with pytest.warns(RuntimeWarning, match="default runtime openvino cannot be used"):
        assert runtimes.build_extractor(settings, w) == "onnx"
    assert tried == ["openvino", "onnx"]
    tried.clear()
    with pytest.raises(UserError, match="a converter's bug"):  # asked for by name: no fallback
        runtimes.build_extractor(settings, w, "openvino")
