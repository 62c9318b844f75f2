"""Feeding the model: the fast JPEG path gives Pillow's pixels, the resize on the accelerator
gives Pillow's resize, and worker processes give what threads give."""

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from conftest import LFW_IMAGES, lfw_available, make_folder, same, write_image
from featurize import cache
from featurize.data.images import (
    ImageError,
    ModelInput,
    _decode_plain_jpeg,
    fit,
    open_rgb,
    read_rgb,
)
from featurize.engines.pipeline import batches
from featurize.jobs.run import featurize
from featurize.models.config import make_settings
from featurize.models.keras import image_input
from featurize.runtimes import build_extractor
from featurize.settings import EmbeddingSettings

TINY = dict(backbone="vggface-vgg16", weights="none", input_size=32, progress=False)


def photo(h=60, w=80, seed=0):
    """Smooth structure plus noise, like a photograph (pure noise would hide resize errors)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(x / 7 + c) * np.cos(y / 5 - c) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def jpeg(arr, path, **save):
    Image.fromarray(arr).save(path, "JPEG", quality=90, **save)
    return path


def test_fast_jpeg_path_gives_pillows_pixels_and_leaves_the_rest_to_pillow(tmp_path):
    rgb = photo()
    plain = jpeg(rgb, tmp_path / "plain.jpg")
    progressive = jpeg(rgb, tmp_path / "prog.jpg", progressive=True)
    grey = jpeg(rgb[..., 0], tmp_path / "grey.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    rotated = jpeg(rgb, tmp_path / "rotated.jpg", exif=exif.tobytes())
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG")
    for path, fast in [(plain, True), (progressive, True), (grey, True), (rotated, False),
                       (cmyk, False)]:
        data = path.read_bytes()
        assert (_decode_plain_jpeg(data, None) is not None) == fast, path.name
        np.testing.assert_array_equal(read_rgb(str(path)), np.asarray(open_rgb(str(path))))
    assert read_rgb(str(rotated)).shape == (80, 60, 3)  # EXIF orientation applied
    # a large JPEG that Pillow would decode at reduced scale goes to Pillow, as before
    big = jpeg(photo(400, 400), tmp_path / "big.jpg")
    assert _decode_plain_jpeg(big.read_bytes(), 100) is None
    assert _decode_plain_jpeg(big.read_bytes(), 300) is not None


def test_a_truncated_jpeg_is_still_a_clear_failure(tmp_path):
    data = jpeg(photo(), tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt"):
        read_rgb(str(tmp_path / "cut.jpg"))


@pytest.mark.skipif(not lfw_available(), reason="needs ../shared/datasets/lfw")
def test_fast_path_equals_pillow_on_real_lfw():
    paths = sorted(LFW_IMAGES.glob("A*/*.jpg"))[:150]
    for p in paths:
        assert _decode_plain_jpeg(p.read_bytes(), 224) is not None
        np.testing.assert_array_equal(read_rgb(str(p)), np.asarray(open_rgb(str(p))))


@pytest.mark.parametrize("crop", [None, 0.8])
def test_resize_in_the_model_matches_pillows_resize(tmp_path, crop):
    import keras
    settings, _ = make_settings("vggface-vgg16", "none", input_size=48, crop=crop,
                                source_size=(60, 80))
    images, x = image_input(settings)
    front = keras.Model(images, x)
    rgb = np.stack([photo(seed=s) for s in range(3)])
    got = np.asarray(front.predict_on_batch(rgb))
    none = replace(settings, resize="pil-bilinear")
    images, x = image_input(none)  # the CPU path's model: preprocessing only
    cpu = keras.Model(images, x).predict_on_batch(np.stack([fit(a, 48, crop) for a in rgb]))
    diff = np.abs(got - np.asarray(cpu))
    assert got.shape == (3, 48, 48, 3)
    assert diff.mean() < 0.6 and diff.max() <= 3.0, (diff.mean(), diff.max())


def test_featurize_with_device_resize_records_it_and_stays_close_to_cpu(tmp_path):
    folder = make_folder(tmp_path / "faces", per_class=3)
    write_image(folder / "bob" / "odd_size.jpg", seed=9, size=(30, 50))  # brought to 40x40 first
    cpu = cache.read(featurize(folder, cache_dir=tmp_path / "c", **TINY).path)
    dev = featurize(folder, cache_dir=tmp_path / "c", resize="device", **TINY)
    c = cache.read(dev.path)
    assert dev.embedded == 10 and dev.path != cpu.path
    assert EmbeddingSettings.from_json(c.attrs["settings"]).resize == "device-bilinear-40x40"
    assert c.paths == cpu.paths
    a = c.embeddings / np.linalg.norm(c.embeddings, axis=1, keepdims=True)
    b = cpu.embeddings / np.linalg.norm(cpu.embeddings, axis=1, keepdims=True)
    assert (a * b).sum(1).min() > 0.99
    again = featurize(folder, cache_dir=tmp_path / "c", resize="device", **TINY)
    assert again.path == dev.path and again.embedded == 0  # the same cache, reused
    # new images (predict) go through exactly the cache's preparation and model
    ext = extractor_for(c.attrs)
    odd = ext.prepare(str(folder / "bob" / "odd_size.jpg"))
    assert odd.shape == (40, 40, 3)
    row = c.paths.index("bob/odd_size.jpg")
    np.testing.assert_allclose(ext.embed(odd[None])[0], c.embeddings[row], rtol=same(), atol=same())


def test_worker_processes_give_what_threads_give(tmp_path):
    folder = make_folder(tmp_path / "faces", per_class=12)
    (folder / "alice" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    from featurize.data.images import list_dataset
    items = list_dataset(folder).items
    ext = build_extractor(*make_settings(**{k: v for k, v in TINY.items() if k != "progress"}))
    out = {}
    for workers in (1, 4):  # 4 and more workers are processes writing to shared memory
        ext.overlap_upload = workers > 1  # the next batch copied while one is computed
        got = list(batches(items, ext, batch_size=16, workers=workers))
        out[workers] = (np.concatenate([b.embeddings for b in got]),
                        [it.key for b in got for it in b.items],
                        [(it.key, r) for b in got for it, r in b.failed])
    np.testing.assert_array_equal(out[1][0], out[4][0])
    assert out[1][1:] == out[4][1:] and len(out[4][1]) == 36
    assert out[4][2] == [("alice/broken.jpg", out[4][2][0][1])] and "corrupt" in out[4][2][0][1]


def test_model_input_is_picklable_for_worker_processes():
    import pickle
    prep = ModelInput(32, 0.8, (40, 40))
    assert pickle.loads(pickle.dumps(prep)) == prep and prep.shape == (40, 40, 3)
    assert ModelInput(32).shape == (32, 32, 3)


def extractor_for(attrs):  # what predict, search and `featurize verify` use for new images
    from featurize.runtimes import build_extractor
    from featurize.settings import EmbeddingSettings
    return build_extractor(EmbeddingSettings.from_json(attrs["settings"]), cache_attrs=attrs)
