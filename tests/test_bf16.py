"""--precision mixed on a CPU with native bfloat16 runs the fp32 OpenVINO export in bfloat16:
its own cache key, an agreement report (computed once, kept beside the export), and the same
engine for every later use of the cache (predict, search, verify)."""

import hashlib
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from conftest import call_cli, make_folder
from featurize import runtimes
from featurize.errors import UserError

pytest.importorskip("openvino")
from featurize.runtimes.bf16 import BF16_ENGINE, native_bf16  # noqa: E402

TINY = dict(backbone="vggface-vgg16", weights="none", input_size=32)
needs_bf16 = pytest.mark.skipif(not native_bf16(), reason="this CPU has no native bfloat16")


@pytest.fixture
def cpu_default(monkeypatch):
    """The default runtime of a CPU machine (the suite's FEATURIZE_RUNTIME=keras removed)."""
    monkeypatch.delenv("FEATURIZE_RUNTIME", raising=False)
    monkeypatch.setattr(runtimes, "_on_accelerator", lambda: False)


def _mixed():
    from featurize.models.config import make_settings
    return make_settings(**TINY, precision="mixed")


@needs_bf16
def test_mixed_is_openvino_bf16_with_its_own_key(cpu_default):
    keras_mixed, _ = _mixed()
    settings = runtimes.settle(keras_mixed)
    assert settings.precision_engine == BF16_ENGINE and runtimes.choose(settings) == "openvino"
    fp32 = replace(keras_mixed, precision="float32")
    assert len({settings.key(), keras_mixed.key(), fp32.key()}) == 3
    # Keras-mixed (and every earlier) cache keeps the key and JSON it had before the field.
    old = {k: v for k, v in asdict(keras_mixed).items()
           if k not in ("precision_engine", "align", "jitter_scheme")}
    assert keras_mixed.key() == hashlib.sha256(
        json.dumps(old, sort_keys=True).encode()).hexdigest()[:12]
    assert "precision_engine" not in json.loads(keras_mixed.to_json())
    assert json.loads(settings.to_json())["precision_engine"] == BF16_ENGINE
    assert runtimes.describe_precision(settings).startswith("mixed: bfloat16 on OpenVINO")


def test_mixed_stays_keras_where_asked_or_not_native(cpu_default, monkeypatch):
    keras_mixed, _ = _mixed()
    assert runtimes.settle(keras_mixed, "keras") == keras_mixed
    assert runtimes.choose(keras_mixed) == "keras"  # a Keras-mixed cache goes on with Keras
    with pytest.raises(UserError, match="runs on Keras: use --runtime keras"):
        runtimes.choose(keras_mixed, "onnx")
    monkeypatch.setenv("FEATURIZE_RUNTIME", "keras")  # a machine whose default is Keras
    assert runtimes.settle(keras_mixed) == keras_mixed
    monkeypatch.delenv("FEATURIZE_RUNTIME")
    monkeypatch.setattr("featurize.runtimes.bf16.native_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="no native bfloat16.*--precision float32"):
        assert runtimes.settle(keras_mixed) == keras_mixed  # emulated: Keras, as before
    with pytest.raises(UserError, match="no native bfloat16.*--precision float32"):
        runtimes.settle(keras_mixed, "openvino")
    bf16 = replace(keras_mixed, precision_engine=BF16_ENGINE)
    with pytest.raises(UserError, match="OpenVINO's: use --runtime openvino"):
        runtimes.choose(bf16, "keras")


def test_native_bf16_reads_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n")
    assert native_bf16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    assert not native_bf16(str(info))


@needs_bf16
def test_bf16_embeddings_are_close_to_fp32_and_not_equal(cpu_default):
    from featurize.runtimes.agreement import agreement
    settings, w = _mixed()
    settings = runtimes.settle(settings)
    bf16 = runtimes.build_extractor(settings, w)
    fp32 = runtimes.build_extractor(replace(settings, precision="float32",
                                            precision_engine=""), w, "openvino")
    assert bf16.provenance()["openvino_inference_precision"] == "bf16"
    assert bf16.exported.path == fp32.exported.path  # the fp32 export, not converted again
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    a, b = fp32.embed(images), bf16.embed(images)
    difference = float(np.abs(a - b).max() / np.abs(a).max())
    assert 1e-5 < difference < 0.1  # bfloat16: not fp32's numbers, but close to them
    report = agreement(fp32, bf16, images, ["a", "b"] * 8)
    assert 0.99 < report["mean_centred_cosine"] < 1 and report["min_centred_cosine"] > 0.95
    assert report["logreg_top1_agreement"] >= 0.5


def _featurize(args, cwd):
    """The command line where no FEATURIZE_RUNTIME is set (a CPU machine's default runtime)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FEATURIZE_RUNTIME", raising=False)
        return call_cli("featurize", *args, cwd=cwd)


@needs_bf16
def test_cli_mixed_runs_bf16_reports_once_and_is_reused(tmp_path):
    from featurize import open_cache
    folder = make_folder(tmp_path / "faces", per_class=8)
    home = Path(os.environ["KERAS_HOME"])  # conftest's: the extractors below look there too
    options = [str(folder), *sum(([f"--{k.replace('_', '-')}", str(v)]
                                  for k, v in TINY.items()), []), "--precision", "mixed"]
    first = _featurize([*options, "--cache-dir", "a"], tmp_path)
    assert first.returncode == 0, first.stderr
    assert "mixed: bfloat16 on OpenVINO (this CPU has native bfloat16)" in first.stderr
    assert "bf16 (OpenVINO) vs fp32 on 24 held-out images: cosine mean 0.9" in first.stdout
    assert "centred cosine mean 0.9" in first.stdout
    path = next((tmp_path / "a").glob("*.h5"))
    attrs = open_cache(path).attrs
    assert attrs["runtime"] == "openvino" and attrs["openvino_inference_precision"] == "bf16"
    assert 0.99 < attrs["bf16_mean_centred_cosine"] < 1
    # The report is kept beside the export: a fresh cache of the same sample reads it.
    kept = next(home.glob("models/featurize-exports/*-openvino-*/agreement-bf16-*.json"))
    kept.write_text(json.dumps({**json.loads(kept.read_text()), "mean_cosine": 0.5}))
    second = _featurize([*options, "--cache-dir", "b"], tmp_path)
    assert second.returncode == 0, second.stderr
    assert "cosine mean 0.50000" in second.stdout
    # predict, search and verify rebuild the cache's extractor: OpenVINO bfloat16 again.
    from classify._runs import extractor_for_run
    for extractor in (extractor_for(attrs),
                      extractor_for_run({"head": "logreg", "provenance": attrs}, None)):
        prov = extractor.provenance()
        assert prov["runtime"] == "openvino" and prov["openvino_inference_precision"] == "bf16"
        assert prov["bf16_mean_cosine"] == attrs["bf16_mean_cosine"]
    cache = open_cache(path)
    images = np.stack([extractor.prepare(str(folder / key)) for key in cache.paths[:4]])
    assert np.abs(extractor.embed(images) - cache.X[:4]).max() <= 1e-6 * np.abs(cache.X).max()


def test_cli_runtime_onnx_with_mixed_is_one_line(tmp_path):
    from conftest import one_line_error
    folder = make_folder(tmp_path / "faces", per_class=1)
    proc = _featurize([str(folder), *sum(([f"--{k.replace('_', '-')}", str(v)]
                                          for k, v in TINY.items()), []),
                       "--precision", "mixed", "--runtime", "onnx"], tmp_path)
    one_line_error(proc.returncode, proc.stderr, "--runtime onnx", "--runtime keras")


def extractor_for(attrs):  # what predict, search and `featurize verify` use for new images
    from featurize.runtimes import build_extractor
    from featurize.settings import EmbeddingSettings
    return build_extractor(EmbeddingSettings.from_json(attrs["settings"]), cache_attrs=attrs)
