"""Fine-tuning on CPU with a small base pretrained inside the test.

The base learns where a bright blob is (4 quadrants); the new task is related but different
(which third, left/centre/right, the blob is in), so its features help without being perfect.
"""

import json

import numpy as np
import pytest
from PIL import Image

from classify._finetune import finetune
from classify._runs import load
from classify._train import train
from classify.cli import main
from conftest import same
from featurize import cache
from featurize.errors import UserError
from featurize.jobs.run import featurize

SIZE = 32


def blob_image(rng, cx, cy):
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 3.0 ** 2))
    img = 40 + 180 * blob[..., None] * rng.uniform(0.6, 1.0, 3) + rng.normal(0, 12, (SIZE, SIZE, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    import keras
    from keras import layers
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    X, y = [], []
    for _ in range(320):
        q = rng.integers(4)
        cx = rng.uniform(4, 14) + 16 * (q % 2)
        cy = rng.uniform(4, 14) + 16 * (q // 2)
        X.append(blob_image(rng, cx, cy))
        y.append(q)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.Rescaling(1 / 255.0, name="rescale")(inputs)
    for i, filters in enumerate((8, 16, 32), 1):
        x = layers.Conv2D(filters, 3, padding="same", name=f"block{i}_conv")(x)
        x = layers.BatchNormalization(name=f"block{i}_bn")(x)
        x = layers.Activation("relu", name=f"block{i}_relu")(x)
        if i < 3:
            x = layers.MaxPooling2D(name=f"block{i}_pool")(x)
    base = keras.Model(inputs, x, name="tiny_base")
    out = layers.Dense(4, activation="softmax")(layers.GlobalAveragePooling2D()(base.output))
    pretrain = keras.Model(inputs, out)
    pretrain.compile("adam", "sparse_categorical_crossentropy")
    pretrain.fit(np.array(X, "float32"), np.array(y), epochs=6, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("base") / "tiny_base.keras"
    base.save(path)
    return path


@pytest.fixture(scope="module")
def run_dir(base_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("thirds")
    rng = np.random.default_rng(1)
    for k, name in enumerate(("left", "centre", "right")):
        (root / "images" / name).mkdir(parents=True)
        for i in range(30):
            img = blob_image(rng, rng.uniform(3, 8) + 11 * k, rng.uniform(4, 28))
            Image.fromarray(img).save(root / "images" / name / f"{name}_{i:03d}.png")
    s = featurize(root / "images", backbone=str(base_file), cache_dir=root / "cache", progress=False)
    return train(s.path, "logreg", runs_dir=root / "runs").run_dir


@pytest.fixture(scope="module")
def finetuned(run_dir):
    return finetune(run_dir, epochs=3, batch_size=8, log=lambda m: None)


def test_assembled_model_reproduces_the_head_and_fine_tuning_is_not_worse(finetuned, run_dir):
    # finetune() itself refuses to train if the assembled model differs from the head by
    # more than 1e-3; here the test-split metrics before must equal the run's own.
    record, _ = load(run_dir)
    assert finetuned["before"]["accuracy"] == pytest.approx(record["metrics"]["accuracy"])
    assert finetuned["after"]["accuracy"] >= finetuned["before"]["accuracy"]
    assert finetuned["epochs_run"] >= 1


def test_only_the_top_block_trains_and_batchnorm_statistics_stay(finetuned, run_dir, base_file):
    import keras
    assert finetuned["trained_layers"] == ["block3_conv"]  # BatchNorm stays frozen
    assert finetuned["frozen_layers_unchanged"]
    original = keras.saving.load_model(base_file)
    tuned = keras.saving.load_model(finetuned["run_dir"] / "model.keras")
    inner = next(layer for layer in tuned.layers if isinstance(layer, keras.Model))
    for name in ("block1_conv", "block1_bn", "block2_conv", "block2_bn"):
        for a, b in zip(original.get_layer(name).get_weights(), inner.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(original.get_layer("block3_bn").get_weights(),
                    inner.get_layer("block3_bn").get_weights()):  # moving statistics included
        np.testing.assert_array_equal(a, b)
    changed = not np.array_equal(original.get_layer("block3_conv").get_weights()[0],
                                 inner.get_layer("block3_conv").get_weights()[0])
    assert changed == finetuned["paid"]  # trained, or restored when it did not pay


def test_saved_model_reloads_predicts_identically_and_is_a_run(finetuned, run_dir, capsys):
    import keras
    new = finetuned["run_dir"]
    record = json.loads((new / "run.json").read_text())
    assert record["head"] == "finetune" and record["finetuned_from"] == str(run_dir.resolve())
    assert json.loads((new / "split.json").read_text()) == json.loads((run_dir / "split.json").read_text())
    image = sorted((run_dir.parent.parent / "images" / "right").glob("*.png"))[0]
    batch = np.asarray(Image.open(image))[None]
    model = keras.saving.load_model(new / "model.keras")
    again = keras.saving.load_model(new / "model.keras")
    np.testing.assert_array_equal(model.predict(batch, verbose=0), again.predict(batch, verbose=0))
    assert main(["predict", str(image), "--run", str(new), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["top"][0]["probability"] == pytest.approx(
        float(model.predict(batch, verbose=0).max()), abs=same(1e-5))
    assert main(["runs", "--runs-dir", str(new.parent)]) == 0
    assert "finetune" in capsys.readouterr().out


def test_refeaturize_writes_a_new_cache_with_the_tuned_base(run_dir, tmp_path):
    r = finetune(run_dir, epochs=1, batch_size=8, refeaturize=True, out=tmp_path / "ft",
                 log=lambda m: None)
    record, _ = load(run_dir)
    old, new = cache.read(record["cache"]), cache.read(r["cache"])
    assert new.path != old.path and new.paths == old.paths
    assert new.attrs["weights"] != old.attrs["weights"]
    assert new.attrs["backbone"].endswith("finetuned_base.keras")


def test_a_fine_tune_that_does_not_pay_keeps_the_original_weights(run_dir, tmp_path, base_file):
    import keras
    messages = []
    # A learning rate this large wrecks the weights: the validation loss rises (a learning
    # rate of 0 is refused as a mistake).
    r = finetune(run_dir, lr=1.0, epochs=1, batch_size=8, out=tmp_path / "wrecked",
                 log=messages.append)
    assert not r["paid"] and any("did not lower the validation loss" in m for m in messages)
    assert r["after"] == r["before"]
    tuned = keras.saving.load_model(r["run_dir"] / "model.keras")
    inner = next(layer for layer in tuned.layers if isinstance(layer, keras.Model))
    original = keras.saving.load_model(base_file)
    for a, b in zip(original.get_weights(), inner.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_errors(run_dir, tmp_path, capsys):
    messages = []
    with pytest.raises(UserError, match="has 3 blocks"):
        finetune(run_dir, unfreeze_blocks=5, epochs=1, log=messages.append)
    with pytest.raises(UserError, match="validation slice"):
        finetune(run_dir, val_fraction=0.01, epochs=1, log=messages.append)
    finetune(run_dir, lr=0.01, epochs=1, batch_size=8, out=tmp_path / "risky", log=messages.append)
    assert any("wreck the pretrained weights" in m for m in messages)
    record = json.loads((run_dir / "run.json").read_text())
    knn = train(record["cache"], "knn", runs_dir=tmp_path / "runs").run_dir
    assert main(["finetune", "--run", str(knn)]) == 2
    assert "needs a dense or logreg run" in capsys.readouterr().err


def test_a_dense_run_is_fine_tuned_from_its_own_layers(run_dir, tmp_path):
    record, _ = load(run_dir)
    dense = train(record["cache"], "dense", runs_dir=tmp_path / "runs")
    r = finetune(dense.run_dir, epochs=1, batch_size=8, out=tmp_path / "ft", log=lambda m: None)
    assert r["before"]["accuracy"] == pytest.approx(dense.metrics["accuracy"])
    assert r["after"]["accuracy"] >= r["before"]["accuracy"] - 1 / 23  # one image at most
