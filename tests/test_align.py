"""--align presets (#15 section 2) and the cache's row-info columns (how each face was found).

The geometry is checked on real LFW images (skipped without ../shared or dlib): dlib's own
5-point model, run on the crop, must find the landmarks where the protocol puts them.
"""

import hashlib
import json
import sys

import h5py
import numpy as np
import pytest

from conftest import LFW_IMAGES, call_cli, lfw_available, one_line_error, write_image
from featurize.models.inputs import model_input

HAS_DLIB = __import__("importlib").util.find_spec("dlib") is not None
needs_dlib = pytest.mark.skipif(not HAS_DLIB,
                                reason="dlib not installed (pip install -e '.[dlib]')")
needs_lfw = pytest.mark.skipif(not lfw_available(), reason="../shared/datasets/lfw not present")
TINY = ["--backbone", "vggface-vgg16", "--weights", "none", "--input-size", "32", "--quiet"]
LFW_SAMPLE = ["Aaron_Peirsol/Aaron_Peirsol_0001.jpg", "Aaron_Peirsol/Aaron_Peirsol_0002.jpg",
              "Colin_Powell/Colin_Powell_0007.jpg", "Colin_Powell/Colin_Powell_0008.jpg"]


def _points(shape, n=5):
    return np.array([(shape.part(i).x, shape.part(i).y) for i in range(n)], float) + 0.5


# --- the geometry on real faces ------------------------------------------------------------

@needs_lfw
@needs_dlib
@pytest.mark.parametrize("name", LFW_SAMPLE)
def test_the_crop_holds_the_landmarks_where_the_protocol_puts_them(name):
    """Expected: the detector box's centre at the crop's centre, its side grown by 0.3 and
    brought to 256 px, the eyes level; dlib's 5-point model on the crop must agree."""

    from featurize.data.images import read_rgb
    from featurize.models.align import AlignedInput
    from featurize.models.dlib_backbone import _finders
    from featurize.models.families.vggface import VGGFACE2_CROP as protocol
    rgb = read_rgb(str(LFW_IMAGES / name))
    detector, predictor = _finders()
    box = min(detector(rgb, 0), key=lambda r: abs(r.center().x - 125) + abs(r.center().y - 125))
    landmarks = _points(predictor(rgb, box))
    crop, info = AlignedInput(protocol.crop, protocol).pixels_with_info(rgb)
    assert crop.shape == (224, 224, 3) and info == {"face": 0}

    eyes = sorted([landmarks[0:2].mean(0), landmarks[2:4].mean(0)], key=lambda p: p[0])
    angle = np.arctan2(eyes[1][1] - eyes[0][1], eyes[1][0] - eyes[0][0])
    side = max(box.width(), box.height())
    scale = protocol.shorter_side / (side * (1 + protocol.enlarge))
    centre = np.array([(box.left() + box.right()) / 2, (box.top() + box.bottom()) / 2])
    turn = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    expected = (landmarks - centre) @ turn.T * scale + protocol.crop / 2

    found = detector(crop, 0)  # the crop is a face again, and its own landmarks sit there
    assert len(found) >= 1
    on_crop = _points(predictor(crop, found[0]))
    np.testing.assert_allclose(on_crop, expected, atol=0.03 * protocol.crop)
    left_eye, right_eye = on_crop[2:4].mean(0), on_crop[0:2].mean(0)
    assert abs(left_eye[1] - right_eye[1]) < 0.02 * protocol.crop  # levelled
    r = found[0]
    assert abs(r.center().x - 112) < 0.1 * 224 and abs(r.center().y - 112) < 0.1 * 224
    assert abs(r.width() - side * scale) < 0.15 * side * scale


@needs_lfw
@needs_dlib
def test_where_hog_finds_no_face_the_cnn_detector_does():
    """One of the LFW faces HOG misses (upsampled too): dlib's CNN detector finds it, the
    row says so, and the crop is centred on that face."""
    from featurize.data.images import read_rgb
    from featurize.models.align import AlignedInput
    from featurize.models.dlib_backbone import _cnn, _detect
    from featurize.models.families.vggface import VGGFACE2_CROP as protocol
    rgb = read_rgb(str(LFW_IMAGES / "Colin_Montgomerie/Colin_Montgomerie_0004.jpg"))
    assert _detect(rgb)[1] == 3  # without the CNN detector: the fixed box
    crop, info = AlignedInput(protocol.crop, protocol).pixels_with_info(rgb)
    assert info == {"face": 2}
    found = [d.rect for d in _cnn()(crop, 0)]  # the face the crop was cut around
    assert any(abs(r.center().x - 112) < 25 and abs(r.center().y - 112) < 25 for r in found)


@needs_dlib
@pytest.mark.parametrize("kind", ["noise", "blank"])
def test_no_face_gives_the_same_fixed_crop_every_time_and_says_so(kind):
    from featurize.models.align import FACE_FIXED_BOX, AlignedInput
    from featurize.models.dlib_backbone import FALLBACK_BOX
    from featurize.models.families.vggface import VGGFACE2_CROP as protocol
    rng = np.random.default_rng(3)
    side = 100  # small: where HOG finds nothing, dlib's CNN detector is tried (slow)
    rgb = (rng.integers(0, 256, (side, side, 3)) if kind == "noise"
           else np.full((side, side, 3), 128)).astype(np.uint8)
    aligned = AlignedInput(64, protocol)
    first, info = aligned.pixels_with_info(rgb)
    again, _ = aligned.pixels_with_info(rgb.copy())
    assert info == {"face": FACE_FIXED_BOX}
    np.testing.assert_array_equal(first, again)
    # the fixed box, not turned: a white square drawn in it lands centred in the crop
    marked = np.zeros_like(rgb)
    left, t, r, b = (int(f * side) for f in FALLBACK_BOX)
    marked[t:b, left:r] = 255
    crop = aligned.pixels(marked).mean(axis=2)
    inside = crop > 127
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    expected = 64 * protocol.shorter_side / (1 + protocol.enlarge) / protocol.crop
    assert abs(rows.mean() - 31.5) < 2 and abs(cols.mean() - 31.5) < 2
    assert abs(len(rows) - expected) <= 3 and abs(len(cols) - expected) <= 3


# --- settings, key, provenance -------------------------------------------------------------

def test_the_preset_is_in_the_key_and_caches_without_it_keep_theirs():
    from featurize.models.config import EmbedderConfig
    from featurize.settings import EmbeddingSettings
    plain, _ = EmbedderConfig("vggface-vgg16", weights="none", input_size=32).settings()
    assert plain.align == "none"
    old_json = json.dumps({k: v for k, v in json.loads(plain.to_json()).items() if k != "align"},
                          sort_keys=True)  # the settings JSON of a cache made before --align
    old = EmbeddingSettings.from_json(old_json)
    assert old == plain
    assert old.key() == plain.key() == hashlib.sha256(old_json.encode()).hexdigest()[:12]
    if HAS_DLIB:
        aligned, _ = EmbedderConfig("vggface-vgg16", weights="none", input_size=32,
                                    align="dlib").settings()
        assert aligned.align == "dlib" and aligned.key() != plain.key()
        assert EmbeddingSettings.from_json(aligned.to_json()) == aligned
        assert type(model_input(aligned)).__name__ == "AlignedInput"


def test_list_backbones_names_each_face_models_preset(tmp_path):
    code, out, err = call_cli("featurize", "--list-backbones")
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["name"][3] == "align"
    for name in ("vggface-vgg16", "vggface-resnet50", "vggface-senet50", "dlib-resnet"):
        assert rows[name][3] == "dlib", rows[name]
    assert rows["mobilenetv2"][3] == "none"


def test_align_mistakes_are_one_line_errors(tmp_path, monkeypatch):
    from featurize.errors import UserError
    from featurize.models.config import EmbedderConfig
    write_image(tmp_path / "imgs" / "a.jpg", 0)
    for args, needles in [
            (["--backbone", "mobilenet_v2", "--weights", "none", "--align", "dlib"],
             ["--align dlib", "not a face model"]),
            (TINY + ["--align", "dlib", "--crop", "0.5"], ["--align dlib", "--crop"]),
            (["--backbone", "dlib-resnet", "--align", "none"], ["--align none"]),
            (TINY + ["--align", "mtcnn"], ["--align"])]:
        code, out, err = call_cli("featurize", tmp_path / "imgs", *args, "--cache-dir",
                                  tmp_path / "c", cwd=tmp_path)
        one_line_error(code, err, *needles)
    assert not (tmp_path / "c").exists()  # checked before anything is written
    monkeypatch.setitem(sys.modules, "dlib", None)  # dlib not installed: say how to get it
    with pytest.raises(UserError, match=r"--align dlib needs dlib.*pip install -e '\.\[dlib\]'"):
        EmbedderConfig("vggface-vgg16", weights="none", input_size=32, align="dlib")


# --- a whole run, predict and the Python API ----------------------------------------------

@pytest.fixture(scope="module")
def aligned_run(tmp_path_factory):
    """featurize --align dlib on four LFW faces and one noise image (test_dlib_models runs it
    in a fresh process)."""
    if not (lfw_available() and HAS_DLIB):
        pytest.skip("needs ../shared/datasets/lfw and dlib")
    tmp = tmp_path_factory.mktemp("align")
    for name in LFW_SAMPLE:
        target = tmp / "data" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(LFW_IMAGES / name)
    write_image(tmp / "data" / "Nobody" / "noise.png", 7, size=(120, 120))
    code, out, err = call_cli("featurize", tmp / "data", *TINY, "--align", "dlib", "--cache-dir",
                              tmp / "c", cwd=tmp)
    assert code == 0 and "Traceback" not in err, err
    return tmp, out, next((tmp / "c").glob("*.h5"))


def test_a_run_records_the_preset_and_how_each_face_was_found(aligned_run):
    import featurize
    from featurize.models.align import FACE_FIXED_BOX
    tmp, out, path = aligned_run
    assert "faces: 4 hog, 1 fixed-box (no face found" in out
    c = featurize.open_cache(path)
    assert c.attrs["align"] == "dlib" and c.settings.align == "dlib"
    assert json.loads(c.attrs["settings"])["align"] == "dlib"
    codes = dict(zip(c.paths, c.face_found.tolist()))
    assert codes == {**{name: 0 for name in LFW_SAMPLE}, "Nobody/noise.png": FACE_FIXED_BOX}
    with h5py.File(path) as f:  # the index's view, like paths
        assert f["info/face"][()].tolist() == c.face_found.tolist()


def test_new_images_are_aligned_as_the_cache_was(aligned_run):
    """classify predict embeds new images with the cache's settings (extractor_for), and
    featurize.Embedder.for_cache in memory: both give the cache's rows."""
    import featurize
    from featurize.data.images import Item, read_rgb
    from featurize.engines.pipeline import batches
    tmp, _, path = aligned_run
    c = featurize.open_cache(path)
    files = [tmp / "data" / p for p in c.paths]
    items = [Item(f.name, str(f), None, 1, 1) for f in files]
    extractor = extractor_for(c.attrs)  # what predict and `featurize verify` use
    (batch,) = list(batches(items, extractor, batch_size=8, workers=1))
    np.testing.assert_allclose(batch.embeddings, c.embeddings, rtol=1e-4, atol=1e-5)
    assert batch.info["face"].tolist() == c.face_found.tolist()
    embedder = featurize.Embedder.for_cache(c)
    in_memory = embedder([read_rgb(str(files[0])), str(files[-1])])
    np.testing.assert_allclose(in_memory, c.embeddings[[0, -1]], rtol=1e-4, atol=1e-5)


def test_classify_predict_runs_on_an_aligned_cache(aligned_run, capsys):
    import classify
    from classify.cli import main
    tmp, _, path = aligned_run
    run = classify.train(path, "centroid", min_per_class=2, test_size=0.5)
    run.save(tmp / "run")
    image = tmp / "data" / LFW_SAMPLE[2]
    assert main(["predict", str(image), "--run", str(tmp / "run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["prediction"] == "Colin_Powell"


@needs_dlib
def test_the_python_api_takes_align(tmp_path):
    import featurize
    write_image(tmp_path / "imgs" / "a" / "x.png", 1, size=(64, 64))
    embedder = featurize.Embedder("vggface-vgg16", weights="none", input_size=32, align="dlib")
    assert embedder.settings.align == "dlib"
    c = featurize.embed_folder(tmp_path / "imgs", cache=tmp_path / "c", progress=False,
                               backbone="vggface-vgg16", weights="none", input_size=32,
                               align="dlib")
    assert c.settings.key() == embedder.settings.key()
    assert c.face_found.tolist() == [3] and c.summary.row_info == {"face": {3: 1}}


# --- row-info columns in the cache -----------------------------------------------------------

def test_row_info_columns_survive_shards_merges_and_old_rows(tmp_path):
    """Rows written with a column, rows written before it existed (-1), merged by compact:
    the index's view and open_cache agree throughout; a cache without any has none."""
    from featurize import cache
    from featurize.data.images import Dataset, Item
    from featurize.settings import EmbeddingSettings
    settings = EmbeddingSettings("vggface-vgg16", "random-seed0", "random", "", "avg", 32, 0.0,
                                 False, "vggface1", "float32", 0)
    path = tmp_path / "c.h5"
    items = [Item(f"p{i}.jpg", f"p{i}.jpg", None, 1, 1) for i in range(6)]
    X = np.arange(24, dtype=np.float32).reshape(6, 4)
    journal = cache.Journal(path, settings)
    journal.add(items[:2], X[:2])  # an older shard: no column
    journal.flush()
    journal.add(items[2:4], X[2:4], {"face": np.array([0, 3], np.int8)})
    journal.add(items[4:], X[4:], {"face": np.array([1, 2], np.int8)})
    journal.flush()
    dataset = Dataset(tmp_path, "t", items, [])
    cache.commit(path, settings, dataset, {"keras_version": "test", "backend": "none"})
    expected = [-1, -1, 0, 3, 1, 2]
    c = cache.read(path)
    assert c.paths == [it.key for it in items] and c.face_found.tolist() == expected
    with h5py.File(path) as f:
        assert f["info/face"][()].tolist() == expected
    cache.compact(path, everything=True)
    c = cache.read(path)
    assert c.face_found.tolist() == expected
    np.testing.assert_array_equal(c.embeddings, X)
    with h5py.File(path) as f:
        assert f["info/face"][()].tolist() == expected and len(f["shards/names"]) == 1

    plain = tmp_path / "plain.h5"  # a cache without any column (every cache made before)
    journal = cache.Journal(plain, settings)
    journal.add(items, X)
    journal.flush()
    cache.commit(plain, settings, dataset, {"keras_version": "test", "backend": "none"})
    c = cache.read(plain)
    assert c.row_info == {} and c.face_found is None
    with h5py.File(plain) as f:
        assert "info" not in f


def test_without_dlib_every_aligned_path_is_one_line(monkeypatch):
    """predict, search and verify --sample on an --align dlib cache reach the detector through
    these: without dlib they give the install line, not an ImportError."""
    from featurize.errors import UserError
    from featurize.models import dlib_backbone
    for load in (dlib_backbone._finders, dlib_backbone._net, dlib_backbone._cnn):
        load.cache_clear()
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib raises ImportError
    try:
        for load in (dlib_backbone._finders, dlib_backbone._net, dlib_backbone._cnn):
            with pytest.raises(UserError, match=r"pip install -e '\.\[dlib\]'"):
                load()
    finally:
        for load in (dlib_backbone._finders, dlib_backbone._net, dlib_backbone._cnn):
            load.cache_clear()


def extractor_for(attrs):  # what predict, search and `featurize verify` use for new images
    from featurize.runtimes import build_extractor
    from featurize.settings import EmbeddingSettings
    return build_extractor(EmbeddingSettings.from_json(attrs["settings"]), cache_attrs=attrs)
