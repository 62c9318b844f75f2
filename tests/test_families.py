"""Backbone families as objects (issue #12, item 4): one registry, no `family` string switches
outside the family modules, one extractor protocol, one bad-image handling for every reader."""

import ast
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, call_cli, make_folder, run_cli
from featurize.errors import UserError
from featurize.models import dlib_backbone

TINY = dict(backbone="vggface-vgg16", weights="none", input_size=32)


def test_every_backbone_belongs_to_a_registered_family_object():
    from classify._data import default_normalize
    from featurize.models.families import Family
    from featurize.models.registry import BACKBONES, FAMILIES, get_backbone

    assert list(FAMILIES) == ["vggface", "dlib", "keras", "file"]
    for spec in BACKBONES.values():
        assert isinstance(spec.family, Family) and FAMILIES[spec.family.name] is spec.family
        assert spec.weights_source == spec.family.weights_source
        # classify L2-normalises face embeddings by default: the family says which are faces
        assert default_normalize(spec.name) is spec.family.face
    assert {n for n, f in FAMILIES.items() if f.face} == {"vggface", "dlib"}
    assert get_backbone("vggface-senet50").family.layer_name("fc7/relu") == "fc7_relu"
    assert get_backbone("mobilenet_v2").family is FAMILIES["keras"]


def _family_switches(path: Path) -> list[str]:
    """`x.family == "..."`, `x.family in (...)` and the like in one module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "family" for s in sides):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_no_family_switch_outside_the_family_modules():
    modules = [p for package in ("featurize", "classify") for p in (REPO / package).rglob("*.py")
               if "families" not in p.parts]
    assert len(modules) > 20
    assert [hit for p in modules for hit in _family_switches(p)] == []


# A family as a newcomer would add it: one module (this one stands in for it) ...
def tiny_cnn(include_top=False, input_shape=(32, 32, 3)):
    import keras
    x = inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(6, 3, strides=2, name="stage1_conv")(x)
    x = keras.layers.Conv2D(5, 3, strides=2, name="stage2_conv")(x)
    return keras.Model(inputs, x, name="tiny")


def _tiny_family():
    from featurize.models.families import Family
    from featurize.models.specs import Backbone
    from featurize.models.weights import Weights

    class Tiny(Family):
        name = "tiny"
        weights_source = "random only"

        def backbones(self):
            return [Backbone(name="tiny-cnn", family=self, builder="test_families:tiny_cnn",
                             input_size=32, preprocessing="none", embedding_dim=5,
                             blocks=("stage1_", "stage2_"))]

        def default_weights(self, spec, include_top, download):
            return Weights("random")

    return Tiny()


def test_a_new_family_is_one_module_and_one_registry_line(tmp_path, monkeypatch):
    from featurize import cache
    from featurize.jobs.run import featurize
    from featurize.models import families, registry as backbones

    family = _tiny_family()
    # ... and one registry line (what featurize.backbones does with each registered family)
    monkeypatch.setitem(families.FAMILIES, family.name, family)
    for spec in family.backbones():
        monkeypatch.setitem(backbones.BACKBONES, spec.name, spec)
    folder = make_folder(tmp_path / "faces", classes=("a", "b"), per_class=2)
    summary = featurize(folder, backbone="tiny-cnn", cache_dir=tmp_path / "c", progress=False)
    c = cache.read(summary.path)
    assert c.embeddings.shape == (4, 5) and np.isfinite(c.embeddings).all()
    assert '"backbone": "tiny-cnn"' in c.attrs["settings"] and "random-seed0" in c.attrs["settings"]
    with pytest.raises(UserError, match="dlib-resnet backbone only"):
        featurize(folder, backbone="tiny-cnn", jitter=2, cache_dir=tmp_path / "c", progress=False)


def test_cli_asks_the_family_in_a_fresh_process(tmp_path):
    listed = run_cli("featurize", "--list-backbones", cwd=tmp_path, timeout=120)
    assert listed.returncode == 0, listed.stderr
    from featurize.models.registry import FAMILIES
    for family in FAMILIES.values():
        if family.backbones():
            assert family.weights_source in listed.stdout
    folder = make_folder(tmp_path / "faces", classes=("a",), per_class=1)
    proc = call_cli("featurize", folder, "--backbone", "dlib-resnet", "--pool", "max",
                    cwd=tmp_path)
    assert proc.returncode == 2 and "dlib-resnet takes no --layer/--pool" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "faces.cache").exists()


def test_every_extractor_follows_the_protocol():
    import keras

    from classify._runs import _WholeModel
    from featurize.models.config import make_settings
    from featurize.models.keras import Extractor
    from featurize.runtimes import build_extractor

    settings, weights = make_settings(**TINY)
    keras_extractor = build_extractor(settings, weights)
    assert isinstance(keras_extractor, Extractor) and keras_extractor.dim == 512
    inputs = keras.Input((32, 32, 3), dtype="uint8")
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(
        keras.layers.Rescaling(1 / 255)(inputs))))
    whole = _WholeModel(model, settings)  # a fine-tuned run, as predict runs it
    assert isinstance(whole, Extractor) and whole.dim == 3
    assert set(whole.provenance()) == {"keras_version", "backend"}
    pytest.importorskip("dlib")
    try:  # dlib and its model files, found without importing face_recognition_models
        dlib_backbone.check_installed()
    except UserError as e:
        pytest.skip(str(e))
    settings, weights = make_settings("dlib-resnet")
    assert isinstance(build_extractor(settings, weights), Extractor)


def _out_of_memory_for(monkeypatch, name):
    """Decoding `name` runs out of memory (a huge image on a small machine)."""
    from featurize.data.images import ModelInput
    real = ModelInput.__call__

    def decode(self, path):
        if os.path.basename(path) == name:
            raise MemoryError
        return real(self, path)
    monkeypatch.setattr(ModelInput, "__call__", decode)


def test_verify_sample_handles_a_bad_image_as_the_pipeline_does(tmp_path, monkeypatch):
    from featurize.jobs.run import featurize
    from featurize.jobs.verify import verify_cache

    folder = make_folder(tmp_path / "faces", classes=("a",), per_class=2)
    summary = featurize(folder, cache_dir=tmp_path / "c", progress=False, **TINY)
    _out_of_memory_for(monkeypatch, "a_0000.jpg")
    report = verify_cache(summary.path, sample=2)
    assert report.problems == ["a/a_0000.jpg no longer decodes (out of memory while decoding), "
                               "though it decoded when it was embedded; replace the file or run "
                               "featurize again"]


def test_finetune_images_handle_a_bad_image_as_the_pipeline_does(tmp_path, monkeypatch):
    from classify._finetune import image_dataset, image_errors
    from featurize.models.config import make_settings

    folder = make_folder(tmp_path / "faces", classes=("a",), per_class=2)
    settings, _ = make_settings(**TINY)
    data = image_dataset(["a/a_0000.jpg", "a/a_0001.jpg"], [0, 0], folder, settings,
                         batch_size=2, augment=False, seed=0, shuffle=False)
    assert data[0][0].shape == (2, 32, 32, 3)
    _out_of_memory_for(monkeypatch, "a_0001.jpg")
    with pytest.raises(UserError, match=r"image a/a_0001.jpg of the run's split cannot be read "
                                        r"\(out of memory"):
        with image_errors(data):
            data[0]
