"""Gallery search (`python -m classify search`, classify.search / classify.Gallery): exact
cosine search against brute force, the approximate index above the threshold (recall, reuse,
rebuild when the cache changes, fallback without the library), the command line on real
images, one-line errors; and the full LFW cache where it is present."""

import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import classify
from conftest import (
    as_schema1,
    blobs,
    call_cli,
    cli_env,
    make_folder,
    one_line_error,
    run_cli,
    stored_in,
    synthetic_cache,
    unparseable_as,
    write_image,
)
from featurize import atomic
from featurize.errors import UserError

# A full-LFW dlib-resnet cache to check search at scale, where the person running the tests
# names one (python -m featurize LFW --backbone dlib-resnet makes it, in about 20 minutes).
LFW_CACHES = [Path(os.environ["FEATURIZE_LFW_CACHE"])] if os.environ.get("FEATURIZE_LFW_CACHE") \
    else []


def brute_force(X, Q, k):
    """The k nearest rows by cosine distance, the plain way: (rows, distances)."""
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    d = 1 - Qn @ Xn.T
    rows = np.argsort(d, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(d, rows, axis=1)


def recall(found, truth):
    return np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())])


@pytest.fixture
def gallery_cache(tmp_path):
    X, y, classes = blobs(n_classes=6, per_class=100, dim=24, spread=0.8, seed=3)
    return synthetic_cache(tmp_path / "gallery.h5", X, y, classes), X, y, classes


def search_cli(args, cwd, fresh=False):
    """`classify search ARGS`: called in this process, or in a fresh one."""
    if fresh:
        return run_cli("classify", "search", *args, cwd=cwd, timeout=300,
                       env=cli_env(TF_CPP_MIN_LOG_LEVEL="3"))
    return call_cli("classify", "search", *args, cwd=cwd)


def test_exact_search_equals_brute_force_block_by_block(gallery_cache, monkeypatch):
    search_module = importlib.import_module("classify._search")  # classify.search: the API's
    path, X, _, _ = gallery_cache
    # Small blocks: the running top k is merged across many gallery and query blocks.
    monkeypatch.setattr(search_module, "BLOCK_ROWS", 37)
    monkeypatch.setattr(search_module, "QUERY_ROWS", 5)
    rng = np.random.default_rng(0)
    Q = X[rng.choice(len(X), 12, replace=False)] + rng.normal(0, 0.5, (12, X.shape[1]))
    g = classify.Gallery(path, k=7)
    assert g.method == "exact"
    rows, dist = g.nearest(Q)
    want_rows, want_dist = brute_force(X, Q, 7)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(dist, want_dist, atol=1e-5)
    # k above the gallery's size gives every row, in order.
    rows, _ = g.nearest(Q[:2], k=10_000)
    np.testing.assert_array_equal(rows, brute_force(X, Q[:2], len(X))[0])


def test_search_dicts_name_paths_and_labels(gallery_cache):
    path, X, y, classes = gallery_cache
    hits = classify.search(X[[5, 250]], path, k=3)
    assert [h["query"] for h in hits] == [0, 1]
    for hit, row in zip(hits, (5, 250)):
        first = hit["neighbours"][0]
        assert first["row"] == row and first["distance"] < 1e-5
        assert first["label"] == classes[y[row]]
        name = classes[y[row]]
        assert first["path"] == str(path.parent / name / f"{name}_{row:04d}.jpg")
        assert len(hit["neighbours"]) == 3


def test_approximate_index_above_threshold_is_reused(gallery_cache, monkeypatch):
    path, X, _, _ = gallery_cache
    # 3 of the index's 15 lists per query (600 rows: 600 // 39 lists): really approximate.
    rng = np.random.default_rng(1)
    Q = X[rng.choice(len(X), 50, replace=False)] + rng.normal(0, 0.3, (50, X.shape[1]))
    assert classify.Gallery(path, k=10, exact_max_rows=len(X)).method == "exact"
    g = classify.Gallery(path, k=10, exact_max_rows=len(X) - 1, nprobe=3)
    assert g.method == "approximate"
    rows, dist = g.nearest(Q)
    assert g.built and g.index_path.parent == Path(f"{path}.search") and g.index_path.is_file()
    assert g._index.nlist == 15 and g._index.nprobe == 3
    truth, truth_dist = brute_force(X, Q, 10)
    assert recall(rows, truth) >= 0.95
    np.testing.assert_allclose(dist[:, 0], truth_dist[:, 0], atol=1e-4)
    stamp = g.index_path.stat().st_mtime_ns
    again = classify.Gallery(path, k=10, exact_max_rows=len(X) - 1, nprobe=3)
    np.testing.assert_array_equal(again.nearest(Q)[0], rows)
    assert not again.built and again.index_path == g.index_path
    assert g.index_path.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in g.index_path.parent.iterdir()) == [  # no temp file
        g.index_path.name, g.index_path.with_suffix(".json").name]  # the index and its record


def test_damaged_index_is_built_again(gallery_cache):
    path, X, _, _ = gallery_cache
    g = classify.Gallery(path, k=5, method="approximate")
    rows = g.nearest(X[:5])[0]
    g.index_path.write_bytes(g.index_path.read_bytes()[:1000])  # cut short
    again = classify.Gallery(path, k=5, method="approximate")
    with pytest.warns(UserWarning, match="SHA-256 digest does not match its record"):
        np.testing.assert_array_equal(again.nearest(X[:5])[0], rows)
    assert again.built


def test_schema1_cache_is_searched_and_keyed_by_its_file(gallery_cache):
    path, X, _, _ = gallery_cache
    as_schema1(path)
    rows = classify.Gallery(path, k=5, method="exact").nearest(X[:4])[0]
    np.testing.assert_array_equal(rows, brute_force(X, X[:4], 5)[0])
    g = classify.Gallery(path, k=5, method="approximate")
    np.testing.assert_array_equal(g.nearest(X[:4])[0][:, 0], np.arange(4))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # rewritten
    again = classify.Gallery(path, k=5, method="approximate")
    again.nearest(X[:4])
    assert again.built and again.index_path != g.index_path


def test_without_the_library_auto_searches_exactly_with_a_note(gallery_cache, monkeypatch):
    path, X, _, _ = gallery_cache
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss: ImportError
    g = classify.Gallery(path, k=4, exact_max_rows=10)
    assert g.method == "exact"
    assert len(g.notes) == 1 and "searching exactly" in g.notes[0] and "[search]" in g.notes[0]
    np.testing.assert_array_equal(g.nearest(X[:3])[0], brute_force(X, X[:3], 4)[0])
    with pytest.raises(UserError, match="--method approximate needs faiss-cpu"):
        classify.Gallery(path, method="approximate")


@pytest.mark.parametrize("method", ["exact", "approximate"])
def test_rows_with_nan_are_never_returned(tmp_path, method):
    X, y, classes = blobs(n_classes=2, per_class=5, dim=8)
    X[3] = np.nan  # stored by an older or foreign writer
    path = synthetic_cache(tmp_path / "c.h5", X, y, classes)
    hits = classify.Gallery(path, k=20, method=method).search(X[[0]])[0]["neighbours"]
    assert sorted(h["row"] for h in hits) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert hits[0]["row"] == 0


def test_damaged_cache_is_a_user_error_not_a_wrong_answer(gallery_cache):
    import h5py
    path, X, _, _ = gallery_cache
    shard = stored_in(path, "embeddings")
    with h5py.File(shard, "r") as f:
        info = f["embeddings"].id.get_chunk_info(0)
    with open(shard, "r+b") as fh:  # bit rot in the first chunk of rows
        fh.seek(info.byte_offset + info.size // 2)
        data = fh.read(8)
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes(b ^ 0xFF for b in data))
    for method in ("exact", "approximate"):
        with pytest.raises(UserError, match="fail their checksum.*featurize verify"):
            classify.Gallery(path, method=method).nearest(X[:1])


@pytest.mark.parametrize("settings, needle", [
    ({"k": 0}, "^k must be at least 1"),
    ({"method": "fast"}, "^method must be"),
    ({"exact_max_rows": -1}, "^exact_max_rows"),
    ({"nprobe": 0}, "^nprobe must be at least 1"),
])
def test_bad_options_are_user_errors(gallery_cache, settings, needle):
    path, X, _, _ = gallery_cache
    with pytest.raises(UserError, match=needle):
        classify.search(X[:1], path, **settings)


def test_bad_query_arrays_are_user_errors(gallery_cache):
    path, X, _, _ = gallery_cache
    g = classify.Gallery(path)
    with pytest.raises(UserError, match=r"\(N, 24\) array"):
        g.search(np.zeros((2, 5)))
    with pytest.raises(UserError, match="NaN"):
        g.search(np.full((1, 24), np.nan))


@pytest.fixture(scope="module")
def tiny_embedder():
    import featurize
    return featurize.Embedder("vggface-vgg16", weights="none", input_size=32)


def test_index_rebuilt_after_featurize_appends_rows(tmp_path, tiny_embedder):
    import featurize
    faces = make_folder(tmp_path / "faces", per_class=3)
    cache = featurize.embed_folder(faces, tiny_embedder, tmp_path / "c.h5", progress=False,
                                   workers=1)
    g = classify.Gallery(cache, k=2, exact_max_rows=1)
    g.nearest(cache.X[:1])
    first = g.index_path
    assert g.method == "approximate" and g.built
    write_image(faces / "dave" / "dave_0000.jpg", seed=777)
    cache = featurize.embed_folder(faces, tiny_embedder, tmp_path / "c.h5", progress=False,
                                   workers=1)
    new_row = cache.paths.index("dave/dave_0000.jpg")
    hits = g.search(cache.X[[new_row]])  # the same Gallery: it sees the new content
    assert g.rows == len(cache.X) and g.built and g.index_path != first and not first.exists()
    assert hits[0]["neighbours"][0]["path"].endswith("dave/dave_0000.jpg")
    assert hits[0]["neighbours"][0]["label"] == "dave"


def test_cli_search_real_images(tmp_path, tiny_embedder):
    """A fresh process: the query image's own file comes first at distance ~0, through the
    approximate index (--exact-max-rows 0); an unreadable image is reported, exit code 1."""
    import featurize
    faces = make_folder(tmp_path / "faces")
    featurize.embed_folder(faces, tiny_embedder, tmp_path / "c.h5", progress=False,
                           workers=1)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code, out, err = search_cli([faces / "bob" / "bob_0002.jpg", "broken.jpg", "--cache",
                                 "c.h5", "-k", "3", "--exact-max-rows", "0", "--json"],
                                tmp_path, fresh=True)
    assert code == 1, err
    assert [line for line in err.splitlines() if not line.startswith("note: ")] == [], err
    assert "building the search index of 12 rows" in err
    doc = json.loads(out)
    assert doc["method"] == "approximate" and (tmp_path / "c.h5.search").is_dir()
    ok, bad = doc["results"]
    assert ok["query"].endswith("bob_0002.jpg") and len(ok["neighbours"]) == 3
    first = ok["neighbours"][0]
    assert first["path"] == str(faces / "bob" / "bob_0002.jpg") and first["label"] == "bob"
    assert abs(first["distance"]) < 1e-4
    assert bad["query"] == "broken.jpg" and bad["error"]


def test_cli_text_output(tmp_path, tiny_embedder, capsys):
    import featurize
    from classify.cli import main
    faces = make_folder(tmp_path / "faces", per_class=2)
    featurize.embed_folder(faces, tiny_embedder, tmp_path / "c.h5", progress=False,
                           workers=1)
    assert main(["search", str(faces / "carol"), "--cache", str(tmp_path / "c.h5"), "-k", "2"]) == 0
    header, *out = capsys.readouterr().out.splitlines()
    assert header == "exact search of 6 gallery rows, k=2"
    assert out[0] == f"{faces / 'carol' / 'carol_0000.jpg'}:"
    assert out[1].split()[:3] == ["1", "0.0000", "carol"]
    assert out[1].endswith("carol_0000.jpg") and len(out) == 6


@pytest.mark.parametrize("args, needles", [
    (["x.jpg", "--cache", "missing.h5"], ["missing.h5", "does not exist"]),
    (["empty", "--cache", "c.h5"], ["no images in folder empty"]),
])
def test_cli_mistakes_are_one_line(tmp_path, args, needles):
    X, y, classes = blobs(n_classes=2, per_class=5, dim=8)
    synthetic_cache(tmp_path / "c.h5", X, y, classes)
    (tmp_path / "empty").mkdir()
    write_image(tmp_path / "x.jpg", seed=1)
    code, out, err = search_cli(args, tmp_path)
    one_line_error(code, err, *needles)
    assert not (tmp_path / "c.h5.search").exists()


@pytest.mark.parametrize("args, needles", [
    (["-k", "0"], ["-k", "at least 1"]),
    (["--method", "fast"], ["--method", "auto, exact, approximate"]),
    (["--exact-max-rows", "many"], ["--exact-max-rows", "invalid int"]),
    (["--cache"], ["--cache", "expected one argument"]),
])
def test_cli_option_mistakes_are_one_line(tmp_path, monkeypatch, capsys, args, needles):
    from classify.cli import main
    X, y, classes = blobs(n_classes=2, per_class=5, dim=8)
    synthetic_cache(tmp_path / "c.h5", X, y, classes)
    write_image(tmp_path / "x.jpg", seed=1)
    monkeypatch.chdir(tmp_path)
    code = main(["search", "x.jpg", "--cache", "c.h5", *args])
    one_line_error(code, capsys.readouterr().err, *needles)


@settings(max_examples=40, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_cli_refuses_every_invalid_option_value(tmp_path_factory, capsys, data):
    """A random invalid value for one option: exit 2, one line, nothing written (the
    options are checked before the cache is searched or an image embedded)."""
    from classify.cli import main
    text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=16)
    bad_int = lambda low: st.one_of(st.integers(max_value=low - 1).map(str),  # noqa: E731
                                    text.filter(unparseable_as(int)))
    option, value = data.draw(st.sampled_from([
        ("-k", bad_int(1)), ("--exact-max-rows", bad_int(0)), ("--nprobe", bad_int(1)),
        ("--method", text.filter(lambda t: t not in ("auto", "exact", "approximate")))]))
    root = _fuzz_world(tmp_path_factory)
    before = sorted(root.rglob("*"))
    code = main(["search", str(root / "x.jpg"), "--cache", str(root / "c.h5"),
                 f"{option}={data.draw(value)}"])
    one_line_error(code, capsys.readouterr().err, option.lstrip("-")[:5])
    assert sorted(root.rglob("*")) == before


_WORLD = {}


def _fuzz_world(factory) -> Path:
    if "root" not in _WORLD:  # once per session: hypothesis runs the test many times
        root = factory.mktemp("search_fuzz")
        X, y, classes = blobs(n_classes=2, per_class=5, dim=8)
        synthetic_cache(root / "c.h5", X, y, classes)
        write_image(root / "x.jpg", seed=1)
        _WORLD["root"] = root
    return _WORLD["root"]


@pytest.mark.skipif(not LFW_CACHES, reason="no full-LFW dlib-resnet cache named by FEATURIZE_LFW_CACHE")
def test_full_lfw_cache():
    """The full LFW cache (read only: no index is written beside it): exact search equals
    brute force, and a real LFW image (embedded with dlib as the cache was) finds itself."""
    import featurize
    path = LFW_CACHES[-1]
    cache = featurize.open_cache(path)
    rng = np.random.default_rng(0)
    rows = rng.choice(len(cache.X), 20, replace=False)
    g = classify.Gallery(path, k=10)
    assert g.method == "exact" and g.rows == len(cache.X) > 13000
    found, _ = g.nearest(cache.X[rows])
    np.testing.assert_array_equal(found, brute_force(cache.X, cache.X[rows], 10)[0])
    root = Path(cache.attrs["dataset_root"])
    query = root / cache.paths[rows[0]]
    if query.is_file():
        hit = g.search([query], k=3)[0]["neighbours"][0]
        assert hit["row"] == rows[0] and hit["distance"] < 1e-4


def test_a_cache_without_its_shards_folder_is_one_line_not_an_empty_answer(gallery_cache,
                                                                           tmp_path):
    path, X, _, _ = gallery_cache
    lonely = tmp_path / "alone" / "gallery.h5"  # the index copied, its shards folder not
    lonely.parent.mkdir()
    lonely.write_bytes(Path(path).read_bytes())
    with pytest.raises(UserError, match=r"shard .* is missing; a cache is its file plus"):
        classify.Gallery(lonely, k=3).nearest(X[:2])


def test_a_read_only_cache_folder_is_searched_with_an_index_kept_in_memory(gallery_cache,
                                                                           monkeypatch):
    path, X, _, _ = gallery_cache
    real_write = atomic.replace

    def read_only(tmp, final):  # what a read-only folder does to the rename
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(atomic, "replace", read_only)
    notes = []
    g = classify.Gallery(path, k=5, exact_max_rows=len(X) - 1, log=notes.append)
    rows, _ = g.nearest(X[:3])
    assert g.method == "approximate" and g.index_path is None and rows[:, 0].tolist() == [0, 1, 2]
    assert any("cannot keep the index" in n and "Permission denied" in n for n in notes)
    assert list(Path(f"{path}.search").glob("*")) == []  # nothing half-written left behind
    monkeypatch.setattr(atomic, "replace", real_write)
