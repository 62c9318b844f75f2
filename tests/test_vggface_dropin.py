"""keras-vggface 0.6 on Keras 3: `featurize.vggface` as a drop-in (issue #12, item 3).

Offline: the weight and label files are made here (random weights in the release's Keras 2
.h5 layout, made-up identity names) and either put where keras-vggface keeps them
(KERAS_HOME/models/vggface) or served by a local HTTP server standing in for the release.
"""

import dataclasses
import difflib
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_command, cli_env, run_python, same, write_image
from featurize.errors import UserError

# A user's script, written for keras-vggface as its README shows (feature extraction,
# then prediction with the identity names). The test changes its import lines, nothing else.
KERAS_VGGFACE_SCRIPT = """\
import sys

import numpy as np
from keras.preprocessing import image
from keras_vggface.vggface import VGGFace
from keras_vggface import utils


def load(path):
    img = image.load_img(path, target_size=(224, 224))
    x = image.img_to_array(img)
    x = np.expand_dims(x, axis=0)
    return utils.preprocess_input(x, version=2)


x = np.concatenate([load(path) for path in sys.argv[1:]])

vgg_features = VGGFace(model='resnet50', include_top=False, input_shape=(224, 224, 3),
                       pooling='avg')
np.save('features.npy', vgg_features.predict(x))

model = VGGFace(model='resnet50')
preds = model.predict(x)
np.save('preds.npy', preds)
print('Predicted:', utils.decode_predictions(preds))
"""


def _port(script: str) -> str:
    """The one edit a user makes: keras_vggface's imports become featurize.vggface's."""
    return (script.replace("from keras_vggface.vggface import VGGFace",
                           "from featurize.vggface import VGGFace")
            .replace("from keras_vggface import utils", "from featurize.vggface import utils"))


def _vggface_dir() -> Path:
    folder = Path(os.environ["KERAS_HOME"]) / "models" / "vggface"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _random_weights_file(model, path: Path) -> Path:
    """`model`'s weights with non-trivial BatchNorm statistics, in the release's .h5 layout."""
    from featurize.models.weights import write_keras2_h5
    from featurize.vggface import vggface_h5_name
    rng = np.random.default_rng(3)
    for layer in model.layers:
        if any("moving" in w.name for w in layer.weights):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32")
                               if "variance" in w.name else w.numpy() for w in layer.weights])
    write_keras2_h5(model, path, vggface_h5_name)
    return path


def _labels_file(path: Path, classes: int) -> np.ndarray:
    # The release's names start with a space (" A.J._Buckley"), hence the original's
    # "b' A.J._Buckley'" on Python 3.
    labels = np.array([f" Person_{i:04d}" for i in range(classes)])
    np.save(path, labels)
    return labels


def test_a_keras_vggface_readme_script_runs_unchanged_and_equals_the_cache(tmp_path):
    """The acceptance test of the drop-in, in fresh processes. About 30 s of CPU (20 s on 2
    free cores): the README's resnet50 at 224 px, since the original cannot build it smaller."""
    import keras

    from featurize import cache
    from featurize.vggface import VGGFace

    folder = _vggface_dir()
    full = VGGFace(model="resnet50", weights=None)
    _random_weights_file(full, folder / "rcmalli_vggface_tf_resnet50.h5")
    base = keras.Model(full.inputs, full.get_layer("avg_pool").output)  # the same layers
    notop = _random_weights_file(base, folder / "rcmalli_vggface_tf_notop_resnet50.h5")
    labels = _labels_file(folder / "rcmalli_vggface_labels_v2.npy", 8631)
    images = [write_image(tmp_path / "faces" / name / f"{name}_0.png", seed, size=(224, 224))
              for seed, name in enumerate(["alice", "bob"])]
    ported = _port(KERAS_VGGFACE_SCRIPT)
    changed = [line for line in difflib.ndiff(KERAS_VGGFACE_SCRIPT.splitlines(),
                                              ported.splitlines()) if line[:1] in "+-"]
    assert changed and all(re.match(r"[+-] from \S+ import \w+$", line) for line in changed)
    (tmp_path / "script.py").write_text(ported)

    # The two fresh processes run side by side: most of their time is single-threaded start-up.
    featurize_cli = subprocess.Popen(
        cli_command("featurize", "faces", "--backbone", "vggface-resnet50", "--weights", notop,
                    "--cache-dir", "cache"),
        cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = run_python(tmp_path / "script.py", *images, cwd=tmp_path, timeout=300)
    _, featurize_err = featurize_cli.communicate(timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert featurize_cli.returncode == 0, featurize_err[-3000:]

    ours = cache.read(next((tmp_path / "cache").glob("*.h5")))
    assert ours.paths == ["alice/alice_0.png", "bob/bob_0.png"]
    features = np.load(tmp_path / "features.npy")
    assert features.shape == (2, 2048)
    np.testing.assert_allclose(features, ours.embeddings, rtol=same(),
                               atol=same() * np.abs(ours.embeddings).max())
    preds = np.load(tmp_path / "preds.npy")
    assert preds.shape == (2, 8631)
    np.testing.assert_allclose(preds.sum(axis=1), 1, rtol=1e-4)
    # Five names per image, best first, spelt exactly as keras-vggface printed them.
    expected = [f"b'{labels[i]}'" for row in preds for i in np.argsort(-row, kind="stable")[:5]]
    assert re.findall(r"\"(b' Person_\d{4}')\"", done.stdout) == expected


def test_published_weights_are_downloaded_once_to_keras_home_and_loaded(http_server,
                                                                         monkeypatch):
    import keras

    from featurize.models import registry as backbones
    from featurize.models.specs import WeightFile
    from featurize.models.weights import load_keras2_h5
    from featurize.vggface import VGGFace

    served, base, stop = http_server
    name = "rcmalli_vggface_tf_notop_vgg16.h5"
    _random_weights_file(VGGFace(include_top=False, weights=None, input_shape=(48, 48, 3)),
                         served / name)
    spec = backbones.BACKBONES["vggface-vgg16"]
    monkeypatch.setitem(backbones.BACKBONES, "vggface-vgg16", dataclasses.replace(
        spec, notop_weights=WeightFile(name, base + name)))

    model = VGGFace(include_top=False, input_shape=(48, 48, 3), pooling="max")
    assert (_vggface_dir() / name).read_bytes() == (served / name).read_bytes()
    reference = VGGFace(include_top=False, weights=None, input_shape=(48, 48, 3))
    load_keras2_h5(reference, served / name)
    for ours, theirs in zip(model.weights, reference.weights):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    stop()  # the release is out of reach now: the file in KERAS_HOME is used
    again = VGGFace(include_top=False, input_shape=(64, 64, 3))
    np.testing.assert_array_equal(again.get_layer("conv5_3").get_weights()[0],
                                  model.get_layer("conv5_3").get_weights()[0])
    # Behind the caller's own layers (input_tensor), only VGGFace's layers are loaded.
    inputs = keras.Input((48, 48, 3))
    mixed = keras.layers.Conv2D(3, 1, name="colour_mix")(inputs)
    chained = VGGFace(include_top=False, input_tensor=mixed, input_shape=(48, 48, 3))
    assert chained.layers[1].name == "colour_mix"
    np.testing.assert_array_equal(chained.get_layer("conv1_1").get_weights()[0],
                                  model.get_layer("conv1_1").get_weights()[0])
    top = "rcmalli_vggface_tf_vgg16.h5"
    monkeypatch.setitem(backbones.BACKBONES, "vggface-vgg16", dataclasses.replace(
        spec, top_weights=WeightFile(top, base + top)))
    with pytest.raises(UserError, match=r"could not download .*rcmalli_vggface_tf_vgg16\.h5"):
        VGGFace()


def test_decode_predictions_reads_the_release_labels_once_as_the_original(http_server,
                                                                         monkeypatch):
    from featurize import vggface

    served, base, stop = http_server
    labels = _labels_file(served / "rcmalli_vggface_labels_v1.npy", 2622)
    monkeypatch.setattr(vggface, "VGGFACE_RELEASE", base)
    preds = np.random.default_rng(0).dirichlet(np.ones(2622), size=3).astype("float32")
    preds[1, [7, 2000, 42]] = [0.5, 0.3, 0.2]

    decoded = vggface.decode_predictions(preds, top=3)
    assert (_vggface_dir() / "rcmalli_vggface_labels_v1.npy").is_file()
    assert [[name for name, _ in row] for row in decoded][1] == [
        "b' Person_0007'", "b' Person_2000'", "b' Person_0042'"]
    for row, result in zip(preds, decoded):  # [[name, score], ...], best first
        best = np.argsort(-row, kind="stable")[:3]
        assert result == [[f"b'{labels[i]}'", row[i]] for i in best]
        assert all(isinstance(score, np.float32) for _, score in result)
    stop()  # downloaded once: no network needed any more
    assert vggface.decode_predictions(preds[:1]) == vggface.decode_predictions(preds)[:1]
    assert len(vggface.decode_predictions(preds)[0]) == 5
    with pytest.raises(UserError, match=r"could not download .*labels_v2\.npy"):
        vggface.decode_predictions(np.ones((1, 8631)))
    for shape in [(2, 10), (2622,), (1, 2, 2622)]:
        with pytest.raises(ValueError, match=r"expects a batch of predictions.*" +
                           re.escape(str(shape))):
            vggface.decode_predictions(np.ones(shape))


@pytest.mark.parametrize("version, scheme", [(1, "vggface1"), (2, "vggface2")])
def test_preprocess_input_is_the_original_and_what_the_models_do_inside(version, scheme):
    from featurize.models.preprocessing import ImagePreprocessing
    from featurize.vggface import preprocess_input, utils

    rng = np.random.default_rng(version)
    x = rng.integers(0, 256, (2, 5, 4, 3)).astype("float32")
    kept = x.copy()
    out = preprocess_input(x, version=version)
    # keras-vggface: RGB -> BGR, then subtract its BGR means in place, in float32.
    means = {1: (93.5940, 104.7624, 129.1863), 2: (91.4953, 103.8827, 131.0912)}[version]
    original = x[..., ::-1].copy()
    for channel, mean in enumerate(means):
        original[..., channel] -= mean
    np.testing.assert_array_equal(out, original)
    assert out.dtype == np.float32 and isinstance(out, np.ndarray)
    np.testing.assert_array_equal(x, kept)  # the caller's array is not changed
    inside = np.asarray(ImagePreprocessing(scheme)(x.astype("uint8")))
    np.testing.assert_array_equal(out, inside)
    np.testing.assert_array_equal(preprocess_input(x.astype("uint8"), version=version), out)
    first = utils.preprocess_input(x.transpose(0, 3, 1, 2), "channels_first", version)
    np.testing.assert_array_equal(first, out.transpose(0, 3, 1, 2))
    assert preprocess_input(x.astype("float64"), version=version).dtype == np.float64


def test_preprocess_input_rejects_what_the_original_rejects():
    from featurize.vggface import preprocess_input
    with pytest.raises(NotImplementedError, match="version must be 1"):
        preprocess_input(np.zeros((1, 4, 4, 3)), version=3)
    with pytest.raises(ValueError, match="data_format"):
        preprocess_input(np.zeros((1, 4, 4, 3)), data_format="channels_middle")


@pytest.mark.parametrize("kwargs, message", [
    (dict(classes=10), "`classes` should be 2622"),
    (dict(model="resnet50", classes=2622), "`classes` should be 8631"),
    (dict(model="senet50", classes=1000), "`classes` should be 8631"),
    (dict(model="vgg19"), "`model` argument should be one of vgg16, resnet50, senet50"),
    (dict(weights="imagenet"), "`weights` argument should be either `None`"),
    (dict(include_top=False, input_shape=(40, 40, 3)), "at least 48x48"),
    (dict(include_top=False, input_shape=(64, 64)), "three integers"),
    (dict(input_shape=(None, None, 3), weights=None), "static `input_shape`"),
    (dict(include_top=False, pooling="mean"), "pooling must be"),
    (dict(include_top=False, input_tensor=np.zeros((1, 48, 48, 3))), "must be a Keras tensor"),
])
def test_wrong_arguments_give_the_originals_errors_before_any_download(kwargs, message):
    from featurize.vggface import VGGFace
    with pytest.raises(ValueError, match=re.escape(message)):
        VGGFace(**kwargs)
    assert not (Path(os.environ["KERAS_HOME"]) / "models").exists()


def test_architectures_and_outputs_are_the_builders_with_the_originals_options():
    import keras

    from featurize import vggface

    for model, builder in [("vgg16", vggface.vggface_vgg16),
                           ("resnet50", vggface.vggface_resnet50),
                           ("senet50", vggface.vggface_senet50)]:
        net = vggface.VGGFace(model=model, include_top=False, weights=None,
                              input_shape=(64, 64, 3), pooling="avg")
        ours = builder(include_top=False, input_shape=(64, 64, 3), pooling="avg")
        assert net.name == ours.name == f"vggface_{model}"
        assert [layer.name for layer in net.layers[1:]] == [layer.name for layer in ours.layers[1:]]
        assert [w.shape for w in net.weights] == [w.shape for w in ours.weights]
        assert net.output_shape == (None, 512 if model == "vgg16" else 2048)
    # No input_shape and no top: any image size, as the original's (None, None, 3).
    free = vggface.VGGFace(model="resnet50", include_top=False, weights=None)
    assert free.input_shape == (None, None, None, 3)
    assert free.output_shape == (None, None, None, 2048) and free.layers[-1].name == "avg_pool"
    top = vggface.VGGFace(weights=None, classes=3, input_shape=(48, 48, 3))
    assert top.output_shape == (None, 3) and top.layers[-1].name == "fc8_softmax"
    # input_tensor: the model starts at the tensor's own inputs, the caller's layers included.
    inputs = keras.Input((48, 48, 3))
    scaled = keras.layers.Rescaling(255.0, name="to_pixels")(inputs)
    chained = vggface.VGGFace(include_top=False, weights=None, input_tensor=scaled,
                              input_shape=(48, 48, 3), pooling="max")
    assert chained.inputs[0] is inputs and chained.layers[1].name == "to_pixels"
    assert chained.output_shape == (None, 512)


def test_get_layer_takes_keras_vggface_names_with_a_slash(tmp_path):
    """A script written for keras-vggface asks for `fc7/relu` (Keras 3 forbids "/" in layer
    names, so the layer is `fc7_relu`); the model stays a plain Keras model that saves and
    loads, names included."""
    import keras

    from featurize.vggface import VGGFace

    vgg = VGGFace(weights=None, input_shape=(48, 48, 3))
    assert isinstance(vgg, keras.Model)
    for theirs, ours in [("fc7/relu", "fc7_relu"), ("fc6/relu", "fc6_relu"),
                         ("fc8/softmax", "fc8_softmax"), ("conv1_1", "conv1_1")]:
        assert vgg.get_layer(theirs) is vgg.get_layer(ours) and vgg.get_layer(theirs).name == ours
    # The sixth script's use: features from fc7's ReLU.
    features = keras.Model(vgg.input, vgg.get_layer("fc7/relu").output)
    x = np.random.default_rng(0).uniform(0, 255, (2, 48, 48, 3)).astype("float32")
    assert features.predict(x, verbose=0).shape == (2, 4096)
    for model in ("resnet50", "senet50"):
        net = VGGFace(model=model, include_top=False, weights=None, input_shape=(64, 64, 3))
        for theirs in ["conv1/7x7_s2", "conv1/7x7_s2/bn", "conv2_1_1x1_reduce/bn",
                       "conv5_3_1x1_increase/bn"]:
            layer = net.get_layer(theirs)
            assert layer.name == theirs.replace("/", "_") and layer in net.layers
        assert isinstance(net.get_layer("conv1/7x7_s2/bn"), keras.layers.BatchNormalization)
        with pytest.raises(ValueError, match=r"No such layer: fc7/relu \(Keras 3 name fc7_relu\)"):
            net.get_layer("fc7/relu")
    assert isinstance(net.get_layer("conv5_3_1x1_up"), keras.layers.Conv2D)  # SE block, as named
    vgg.save(tmp_path / "vgg.keras")
    again = keras.saving.load_model(tmp_path / "vgg.keras")
    assert type(again) is type(vgg) and again.get_layer("fc7/relu").name == "fc7_relu"
    np.testing.assert_allclose(again.predict(x, verbose=0), vgg.predict(x, verbose=0), rtol=1e-5)
    # A fresh process that imports the drop-in (as a ported script does) loads it back too.
    (tmp_path / "load.py").write_text(
        "import keras\nfrom featurize.vggface import VGGFace\n"
        "print(keras.saving.load_model('vgg.keras').get_layer('fc7/relu').name)\n")
    done = run_python(tmp_path / "load.py", cwd=tmp_path, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["fc7_relu"], done.stderr[-3000:]


def test_weight_errors_name_python_arguments_not_command_line_options(http_server,
                                                                      monkeypatch):
    """VGGFace's caller passes Python arguments: a missing or unusable weight file says
    where the file goes and `VGGFace(..., weights=None)`, never `--weights`."""
    from featurize.models import registry as backbones
    from featurize.models.specs import WeightFile
    from featurize.vggface import VGGFace

    _, base, stop = http_server
    stop()  # the release cannot be reached
    spec = backbones.BACKBONES["vggface-vgg16"]
    name = "rcmalli_vggface_tf_notop_vgg16.h5"
    monkeypatch.setitem(backbones.BACKBONES, "vggface-vgg16", dataclasses.replace(
        spec, notop_weights=WeightFile(name, base + name)))
    with pytest.raises(UserError) as missing:
        VGGFace(include_top=False, input_shape=(48, 48, 3))
    text = str(missing.value)
    assert f"download it yourself to {_vggface_dir() / name}" in text
    assert "VGGFace(..., weights=None)" in text and "--" not in text
    (_vggface_dir() / name).write_bytes(b"an HTML error page, saved as the weights")
    with pytest.raises(UserError) as unusable:
        VGGFace(include_top=False, input_shape=(48, 48, 3))
    text = str(unusable.value)
    assert str(_vggface_dir() / name) in text and "not an HDF5 weight file" in text
    assert "VGGFace(..., weights=None)" in text and "--" not in text
