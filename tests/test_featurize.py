"""featurize end to end on synthetic folders: cache contents, equality with a direct
model.predict, resume, incremental updates and user errors."""

import os
import time

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import LFW_IMAGES, lfw_available, same, write_image
from featurize import cache
from featurize.cli import main
from featurize.data.images import list_dataset, load_for_model
from featurize.errors import UserError
from featurize.jobs.run import featurize

TINY = dict(backbone="vggface-vgg16", weights="none", input_size=32, progress=False)


def run(folder, tmp_path, **kw):
    return featurize(folder, cache_dir=tmp_path / "cache", **{**TINY, **kw})


def test_cache_holds_every_image_with_labels_and_provenance(image_folder, tmp_path):
    import keras
    s = run(image_folder, tmp_path)
    c = cache.read(s.path)
    assert s.embedded == 12 and c.embeddings.shape == (12, 512)
    assert c.classes == ["alice", "bob", "carol"]
    assert c.paths == sorted(c.paths) and c.paths[0] == "alice/alice_0000.jpg"
    assert [c.classes[i] for i in c.labels] == [p.split("/")[0] for p in c.paths]
    assert c.attrs["backbone"] == "vggface-vgg16" and c.attrs["pooling"] == "avg"
    assert c.attrs["input_size"] == 32 and c.attrs["schema_version"] == 2
    assert c.attrs["keras_version"] and c.attrs["backend"] == keras.backend.backend()
    assert np.isfinite(c.embeddings).all() and c.embeddings.std() > 0


def test_embeddings_equal_direct_predict_on_preprocessed_arrays(image_folder, tmp_path):
    import keras

    from featurize.vggface import vggface_vgg16
    s = run(image_folder, tmp_path)
    c = cache.read(s.path)
    keras.utils.set_random_seed(0)  # --weights none is this seeded random network
    base = vggface_vgg16(include_top=False, input_shape=(32, 32, 3))
    raw = np.stack([load_for_model(str(image_folder / p), 32) for p in c.paths]).astype("float32")
    x = raw[..., ::-1] - np.array([93.5940, 104.7624, 129.1863], np.float32)  # VGGFace v1
    direct = base.predict(x, verbose=0).mean(axis=(1, 2))
    np.testing.assert_allclose(c.embeddings, direct, rtol=same(), atol=same() * np.abs(direct).max())


def test_keras_vggface_h5_weights_load_and_give_the_same_embeddings(image_folder, tmp_path):
    import keras

    from featurize.models.weights import write_keras2_h5
    from featurize.vggface import keras_layer_name, vggface_h5_name, vggface_resnet50
    keras.utils.set_random_seed(7)
    model = vggface_resnet50(include_top=False, input_shape=(64, 64, 3))
    for layer in model.layers:  # non-trivial BatchNorm statistics too
        if layer.weights:
            layer.set_weights([np.random.default_rng(1).uniform(0.5, 1.5, w.shape).astype("float32")
                               if "variance" in w.name else w.numpy() for w in layer.weights])
    weights_file = tmp_path / "rcmalli_vggface_tf_notop_resnet50.h5"
    write_keras2_h5(model, weights_file, vggface_h5_name)
    with h5py.File(weights_file) as f:  # the published layout: "/" names, nested groups
        names = [n.decode() for n in f.attrs["layer_names"]]
        assert "conv1/7x7_s2" in names and "conv2_1_1x1_reduce/bn" in names
        assert "conv1/7x7_s2/bn/gamma:0" in f["conv1/7x7_s2/bn"].attrs["weight_names"][0].decode()
    s = featurize(image_folder, backbone="vggface-resnet50", weights=str(weights_file),
                  input_size=64, cache_dir=tmp_path / "cache", progress=False)
    c = cache.read(s.path)
    assert c.attrs["weights_file"] == weights_file.name and len(c.attrs["weights"]) == 64
    raw = np.stack([load_for_model(str(image_folder / p), 64) for p in c.paths]).astype("float32")
    x = raw[..., ::-1] - np.array([91.4953, 103.8827, 131.0912], np.float32)  # VGGFace2
    feat = keras.Model(model.input, model.get_layer(keras_layer_name("activation_49")).output)
    direct = feat.predict(x, verbose=0).mean(axis=(1, 2))
    np.testing.assert_allclose(c.embeddings, direct, rtol=same(), atol=same() * np.abs(direct).max())


def test_wrong_weight_file_names_the_first_layer_that_does_not_fit(image_folder, tmp_path):
    from featurize.models.weights import write_keras2_h5
    from featurize.vggface import vggface_h5_name, vggface_vgg16
    other = tmp_path / "vgg16.h5"
    write_keras2_h5(vggface_vgg16(include_top=False, input_shape=(32, 32, 3)), other, vggface_h5_name)
    with pytest.raises(UserError, match=r"does not fit .*conv1_7x7_s2"):
        featurize(image_folder, backbone="vggface-resnet50", weights=str(other), input_size=64,
                  cache_dir=tmp_path / "cache", progress=False)


def test_rerun_embeds_only_new_and_changed_files_and_drops_deleted(image_folder, tmp_path):
    first = run(image_folder, tmp_path)
    before = cache.read(first.path)
    again = run(image_folder, tmp_path)
    assert again.embedded == 0 and again.reused == 12
    changed = image_folder / "bob" / "bob_0001.jpg"
    write_image(changed, seed=999)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    (image_folder / "carol" / "carol_0003.jpg").unlink()
    write_image(image_folder / "dave" / "dave_0000.jpg", seed=5)
    third = run(image_folder, tmp_path)
    assert third.embedded == 2 and third.path == first.path
    after = cache.read(third.path)
    assert "carol/carol_0003.jpg" not in after.paths and "dave/dave_0000.jpg" in after.paths
    assert after.classes == ["alice", "bob", "carol", "dave"]
    i_old, i_new = before.paths.index("bob/bob_0001.jpg"), after.paths.index("bob/bob_0001.jpg")
    assert not np.allclose(before.embeddings[i_old], after.embeddings[i_new])
    j_old, j_new = before.paths.index("alice/alice_0002.jpg"), after.paths.index("alice/alice_0002.jpg")
    np.testing.assert_array_equal(before.embeddings[j_old], after.embeddings[j_new])


def test_interrupted_run_leaves_a_valid_cache_and_resumes_to_the_same_file(image_folder, tmp_path,
                                                                           monkeypatch):
    import featurize.jobs.run as run_module
    real = run_module.batches

    def interrupted(*args, **kwargs):
        for n, batch in enumerate(real(*args, **kwargs)):
            if n == 1:
                raise KeyboardInterrupt
            yield batch
    monkeypatch.setattr(run_module, "batches", interrupted)
    s = run(image_folder, tmp_path, batch_size=4)
    assert s.interrupted and s.embedded == 4
    assert len(cache.read(s.path).paths) == 4  # valid, with what was done
    monkeypatch.setattr(run_module, "batches", real)
    resumed = run(image_folder, tmp_path, batch_size=4)
    assert resumed.embedded == 8 and resumed.reused == 4
    fresh = run(image_folder, tmp_path, batch_size=5, out=tmp_path / "fresh.h5")
    a, b = cache.read(resumed.path), cache.read(fresh.path)
    assert a.paths == b.paths
    np.testing.assert_allclose(a.embeddings, b.embeddings, rtol=1e-5, atol=1e-5)


def test_journal_from_a_killed_run_is_picked_up(image_folder, tmp_path):
    from featurize.engines.pipeline import batches
    from featurize.models.config import make_settings
    from featurize.runtimes import build_extractor
    settings, w = make_settings("vggface-vgg16", "none", input_size=32)
    dataset = list_dataset(image_folder)
    path = cache.path_for(dataset, settings, tmp_path / "cache")
    journal = cache.Journal(path, settings, flush_rows=1)
    items = dataset.items[:5]
    for batch in batches(items, build_extractor(settings, w), batch_size=2):
        journal.add(batch.items, batch.embeddings)  # flushed to shards; then "killed"
    assert len(list(cache.shards_dir(path).glob("part-*.h5"))) == 3
    s = run(image_folder, tmp_path)
    assert s.embedded == 7 and s.reused == 5
    # the small shards were merged into one, the journal's are gone
    assert [p.name for p in cache.shards_dir(s.path).iterdir()] == [
        n.split("/")[1] for n in _shard_names(s.path)]
    assert len(_shard_names(s.path)) == 1 and cache.read(s.path).paths == sorted(
        it.key for it in dataset.items)


def _shard_names(path):
    import h5py
    with h5py.File(path, "r") as f:
        return [n.decode() for n in f["shards/names"][()]]


def test_every_setting_that_changes_an_embedding_gets_its_own_file(image_folder, tmp_path):
    paths = {run(image_folder, tmp_path, **kw).path for kw in
             [{}, {"pool": "max"}, {"flip": True}, {"crop": 0.8}, {"input_size": 48}]}
    assert len(paths) == 5


def test_mixed_precision_is_close_to_float32_and_does_not_leak(image_folder, tmp_path):
    import keras
    full = cache.read(run(image_folder, tmp_path).path)
    mixed = cache.read(run(image_folder, tmp_path, precision="mixed").path)
    assert mixed.path != full.path and mixed.attrs["precision"] == "mixed"
    assert mixed.embeddings.dtype == np.float32
    scale = np.abs(full.embeddings).max()
    assert np.abs(mixed.embeddings - full.embeddings).max() < 0.05 * scale
    assert not np.array_equal(mixed.embeddings, full.embeddings)  # bf16 really was used
    assert keras.mixed_precision.global_policy().name == "float32"


def test_flip_averages_the_image_and_its_mirror(tmp_path):
    folder = tmp_path / "flip"
    write_image(folder / "a" / "x.png", seed=1, fmt="PNG")
    Image.open(folder / "a" / "x.png").transpose(Image.FLIP_LEFT_RIGHT).save(folder / "a" / "y.png")
    plain = cache.read(run(folder, tmp_path).path).embeddings
    flipped = cache.read(run(folder, tmp_path, flip=True).path).embeddings
    np.testing.assert_allclose(flipped[0], plain.mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(flipped[0], flipped[1], rtol=1e-4, atol=1e-5)


def test_formats_and_modes_all_become_rgb(tmp_path):
    folder = tmp_path / "formats"
    for i, (ext, mode) in enumerate([(".png", "L"), (".png", "RGBA"), (".gif", "P"),
                                     (".bmp", "RGB"), (".webp", "RGB"), (".jpg", "CMYK"),
                                     (".tiff", "RGB")]):
        write_image(folder / f"img{i}{ext}", seed=i, mode=mode)
    s = run(folder, tmp_path)
    c = cache.read(s.path)
    assert len(c.paths) == 7 and not c.failed and not c.labelled and set(c.labels) == {-1}


def test_bad_images_are_recorded_and_the_run_goes_on(image_folder, tmp_path):
    (image_folder / "alice" / "empty.jpg").write_bytes(b"")
    (image_folder / "alice" / "text.jpg").write_text("not an image")
    good = (image_folder / "bob" / "bob_0000.jpg").read_bytes()
    (image_folder / "bob" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    s = run(image_folder, tmp_path)
    c = cache.read(s.path)
    assert len(c.paths) == 12 and s.failed_total == 3
    assert c.failed["alice/empty.jpg"] == "empty file"
    assert c.failed["alice/text.jpg"] == "not an image"
    assert c.failed["bob/truncated.jpg"].startswith("corrupt")
    assert run(image_folder, tmp_path).embedded == 0  # failures are remembered, not retried


def test_list_file_with_labels(image_folder, tmp_path):
    listing = image_folder / "list.txt"
    listing.write_text("alice/alice_0000.jpg\tA\nbob/bob_0000.jpg\tB\n\nbob/bob_0001.jpg\n")
    c = cache.read(run(listing, tmp_path).path)
    assert c.paths == ["alice/alice_0000.jpg", "bob/bob_0000.jpg", "bob/bob_0001.jpg"]
    assert c.classes == ["A", "B"] and list(c.labels) == [0, 1, -1]


def test_download_from_a_local_server_with_checksum(http_server):
    import hashlib

    from featurize.models.specs import WeightFile
    from featurize.models.weights import download_weights, keras_home
    served, base, stop = http_server
    payload = os.urandom(4096)
    (served / "w.h5").write_bytes(payload)
    path = download_weights(WeightFile("w.h5", base + "w.h5", hashlib.sha256(payload).hexdigest()))
    assert path == keras_home() / "models" / "vggface" / "w.h5"
    assert path.read_bytes() == payload
    with pytest.raises(UserError, match="download it yourself to .*w2.h5"):
        download_weights(WeightFile("w2.h5", base + "w.h5", "0" * 64))  # checksum mismatch
    stop()
    with pytest.raises(UserError, match=r"could not download .*download it yourself"):
        download_weights(WeightFile("w3.h5", base + "w.h5"))  # server gone: offline


@pytest.mark.parametrize("argv, message", [
    (["{missing}"], "does not exist"),
    (["{empty}"], "no images found"),
    (["{folder}", "--backbone", "vgg17"], "unknown backbone 'vgg17'.*vgg16"),
    (["{folder}", "--backbone", "vggface-vgg16", "--weights", "none", "--layer", "conv5_9",
      "--input-size", "32"], "no layer 'conv5_9'; candidates: .*conv5_"),
    (["{folder}", "--weights", "{missing}"], "weights file .* does not exist"),
    (["{folder}", "--backbone", "vggface-vgg16", "--weights", "none", "--out", "{foreign}"],
     "other settings"),
    (["{folder}", "--weights", "none", "--out", "/proc/nope/x.h5"], "cannot create the cache folder"),
    (["{folder}", "--crop", "1.5"], "--crop must be"),
])
def test_user_errors_are_one_line_with_exit_code_2(argv, message, image_folder, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    fill = {"missing": str(tmp_path / "nope"), "empty": str(tmp_path / "empty"),
            "folder": str(image_folder)}
    if "{foreign}" in argv:  # a cache of the folder made with other settings: only this case
        fill["foreign"] = str(run(image_folder, tmp_path, input_size=48).path)
    code = main([a.format(**fill) for a in argv] + ["--quiet", "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    assert __import__("re").search(message, err), err


def test_cli_success_prints_the_cache_path_and_list_backbones(image_folder, tmp_path, capsys):
    assert main([str(image_folder), "--backbone", "vggface-vgg16", "--weights", "none",
                 "--input-size", "32", "--quiet", "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "12 embedded" in out and "cache: " in out and out.strip().endswith(".h5")
    assert main(["--list-backbones"]) == 0
    listing = capsys.readouterr().out
    for name in ("vggface-vgg16", "vggface-resnet50", "vggface-senet50", "dlib-resnet",
                 "mobilenetv2", "efficientnetb0"):
        assert name in listing


def test_keras_application_backbone_with_its_own_preprocessing(image_folder, tmp_path):
    s = run(image_folder, tmp_path, backbone="mobilenet_v2", input_size=32)
    c = cache.read(s.path)
    assert c.attrs["backbone"] == "mobilenetv2" and c.embeddings.shape == (12, 1280)
    assert c.attrs["preprocessing"] == "keras.applications.mobilenet_v2"


@pytest.mark.skipif(not lfw_available(), reason="../shared/datasets/lfw not present")
def test_real_lfw_people(tmp_path):
    folder = tmp_path / "lfw"
    folder.mkdir()
    for person in ("Aaron_Eckhart", "Abdullah_Gul", "Adrien_Brody"):
        (folder / person).symlink_to(LFW_IMAGES / person)
    s = run(folder, tmp_path, input_size=64)
    c = cache.read(s.path)
    n = sum(len(os.listdir(LFW_IMAGES / p)) for p in ("Aaron_Eckhart", "Abdullah_Gul", "Adrien_Brody"))
    assert len(c.paths) == n and c.classes == ["Aaron_Eckhart", "Abdullah_Gul", "Adrien_Brody"]
    assert not c.failed
