"""A stored search index is data, not trusted: `classify search` uses the file in
`CACHE.h5.search/` only when its record (cache key, row count, SHA-256) matches and a few
stored rows find themselves first in it; otherwise it builds the index again with a warning,
and it removes or replaces only the files it makes there."""

import hashlib
import importlib
import json
import os
import warnings
from pathlib import Path

import faiss
import numpy as np
import pytest

import classify
from conftest import blobs, make_folder, synthetic_cache
from featurize import atomic
from test_search import brute_force, search_cli, tiny_embedder  # noqa: F401 (a fixture)

search = importlib.import_module("classify._search")  # the module (classify.search: the API's)


def planted_index(X, like_row=0):
    """A valid IVF index with the cache's width and row count whose every vector is row
    `like_row`: what a foreign or stale file can hold."""
    d = X.shape[1]
    unit = np.ascontiguousarray(X / np.linalg.norm(X, axis=1, keepdims=True), np.float32)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, 1, faiss.METRIC_INNER_PRODUCT)
    index.cp.min_points_per_centroid = 1  # no k-means warning for a small cache
    index.train(unit)
    index.add_with_ids(np.repeat(unit[[like_row]], len(X), axis=0), np.arange(len(X)))
    return index


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def gallery(tmp_path):
    X, y, classes = blobs(n_classes=6, per_class=100, dim=24, spread=0.8, seed=3)
    return synthetic_cache(tmp_path / "gallery.h5", X, y, classes), X


def built(path):
    """A legitimate stored index: (its file, its record)."""
    g = classify.Gallery(path, k=5, method="approximate")
    g.nearest(np.ones((1, g.dim)))
    assert g.built and g.index_path.is_file()
    return g.index_path, g.index_path.with_suffix(".json")


def test_cli_replaces_a_planted_index_and_answers_as_exact_search(tmp_path, tiny_embedder):  # noqa: F811
    """The planted file (right width and row count, wrong content) has our name but no
    record: a one-line warning, the index built again, exact's answer (test_search runs the
    command in a fresh process)."""
    import featurize
    faces = make_folder(tmp_path / "faces")
    cache = featurize.embed_folder(faces, tiny_embedder, tmp_path / "c.h5", progress=False,
                                   workers=1)
    key = classify.Gallery(cache.path, exact_max_rows=0).key
    folder = tmp_path / "c.h5.search"
    folder.mkdir()
    planted = folder / f"ivfflat-{key}.faiss"
    faiss.write_index(planted_index(cache.X), str(planted))
    before = planted.read_bytes()
    query = faces / "bob" / "bob_0002.jpg"
    code, out, err = search_cli([query, "--cache", "c.h5", "-k", "3", "--exact-max-rows", "0",
                                 "--json"], tmp_path)
    assert code == 0, err
    warned = [line for line in err.splitlines() if "not using the search index" in line]
    assert len(warned) == 1 and f"c.h5.search/{planted.name}" in warned[0]
    assert "no valid record" in warned[0] and warned[0].endswith("building it again")
    doc = json.loads(out)
    assert doc["method"] == "approximate"
    got = [(n["row"], n["distance"]) for n in doc["results"][0]["neighbours"]]
    row = cache.paths.index("bob/bob_0002.jpg")
    want_rows, want_dist = brute_force(cache.X, cache.X[[row]], 3)
    assert [r for r, _ in got] == want_rows[0].tolist() and got[0][0] == row
    np.testing.assert_allclose([d for _, d in got], want_dist[0], atol=1e-4)
    assert got[0][1] < 1e-4  # the self-match at 0.0 first
    assert planted.read_bytes() != before  # replaced by the real index, with its record
    record = json.loads(planted.with_suffix(".json").read_text())
    assert record["sha256"] == sha256(planted) and record["rows"] == len(cache.X)


def test_an_index_changed_since_it_was_built_fails_its_digest(gallery):
    path, X = gallery
    index_file, record_file = built(path)
    faiss.write_index(planted_index(X), str(index_file))  # same width and count, other rows
    planted = sha256(index_file)
    g = classify.Gallery(path, k=5, method="approximate")
    with pytest.warns(search.SearchIndexWarning,
                      match="SHA-256 digest does not match its record"):
        rows, dist = g.nearest(X[:20])
    assert g.built
    np.testing.assert_array_equal(rows[:, 0], np.arange(20))
    assert (dist[:, 0] < 1e-4).all()
    assert sha256(index_file) != planted
    assert json.loads(record_file.read_text())["sha256"] == sha256(index_file)


def test_a_planted_index_with_a_forged_record_fails_the_self_check(gallery):
    """The record's digest matches (whoever planted the file wrote it too): the stored rows
    do not find themselves in it, so it is not used."""
    path, X = gallery
    index_file, record_file = built(path)
    faiss.write_index(planted_index(X, like_row=7), str(index_file))
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "sha256": sha256(index_file)}))
    g = classify.Gallery(path, k=5, method="approximate")
    with pytest.warns(UserWarning, match=r"row \d+ of the cache does not find itself first"):
        rows, _ = g.nearest(X[:20])
    np.testing.assert_array_equal(rows[:, 0], np.arange(20))
    assert g.built and json.loads(record_file.read_text())["sha256"] == sha256(index_file)


def test_a_legitimate_index_with_many_identical_rows_is_reused_silently(tmp_path):
    X, y, classes = blobs(n_classes=3, per_class=60, dim=16, seed=4)
    X[:50] = X[0]  # the same image 50 times: they tie at distance 0
    path = synthetic_cache(tmp_path / "dup.h5", X, y, classes)
    built(path)
    for _ in range(3):  # the rows checked are picked at random each time
        g = classify.Gallery(path, k=5, method="approximate")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rows, dist = g.nearest(X[[60, 100]])
        assert not g.built and rows[:, 0].tolist() == [60, 100]


def test_only_files_we_made_are_removed_or_replaced(gallery, tmp_path):
    path, X = gallery
    g = classify.Gallery(path, k=3, method="approximate")
    folder = Path(f"{path}.search")
    folder.mkdir()
    outside = tmp_path / "outside.faiss"
    outside.write_bytes(b"someone else's file")
    (folder / f"ivfflat-{g.key}.faiss").symlink_to(outside)  # our name, a link out
    stale = folder / "ivfflat-0123456789abcdef.faiss"  # an older content's index and record
    stale.write_bytes(b"old")
    stale.with_suffix(".json").write_text("{}")
    foreign = ["notes.txt", "ivfflat-mine.faiss", "ivfflat-0123456789abcdef.faiss.bak"]
    for name in foreign:
        (folder / name).write_text("keep me")
    (folder / "ivfflat-fedcba9876543210.faiss").mkdir()  # a folder with our pattern's name
    with pytest.warns(UserWarning, match="not a regular file"):
        rows, _ = g.nearest(X[:3])
    assert rows[:, 0].tolist() == [0, 1, 2]
    assert outside.read_bytes() == b"someone else's file"
    assert g.index_path.is_file() and not g.index_path.is_symlink()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*foreign, "ivfflat-fedcba9876543210.faiss", g.index_path.name,
         g.index_path.with_suffix(".json").name])
    assert all((folder / name).read_text() == "keep me" for name in foreign)


def test_a_read_only_folder_with_a_planted_index_is_searched_in_memory(gallery, monkeypatch):
    path, X = gallery
    index_file, record_file = built(path)
    faiss.write_index(planted_index(X), str(index_file))
    planted = index_file.read_bytes()

    def read_only(tmp, final):  # what a read-only folder does to the rename
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(atomic, "replace", read_only)
    notes = []
    g = classify.Gallery(path, k=5, method="approximate", log=notes.append)
    rows, _ = g.nearest(X[:4])
    assert rows[:, 0].tolist() == [0, 1, 2, 3] and g.index_path is None and g.built
    assert any("not using the search index" in n for n in notes)
    assert any("cannot keep the index" in n for n in notes)
    assert index_file.read_bytes() == planted  # left as it was; nothing half-written
    assert sorted(p.name for p in index_file.parent.iterdir()) == [index_file.name,
                                                                   record_file.name]


def test_records_that_are_not_ours_are_ignored(gallery):
    """A record that is not JSON, not this format, or of another key or row count."""
    path, X = gallery
    index_file, record_file = built(path)
    good = json.loads(record_file.read_text())
    for bad in ["not json", json.dumps([good]), json.dumps({**good, "format": "x"}),
                json.dumps({**good, "rows": good["rows"] + 1}),
                json.dumps({**good, "cache_key": "0" * 16})]:
        record_file.write_text(bad)
        g = classify.Gallery(path, k=2, method="approximate")
        with pytest.warns(UserWarning, match="not using the search index"):
            assert g.nearest(X[:2])[0][:, 0].tolist() == [0, 1]
        assert g.built and json.loads(record_file.read_text())["sha256"] == sha256(index_file)
    os.utime(index_file, ns=(0, 0))  # its times do not matter: the digest still matches
    again = classify.Gallery(path, k=2, method="approximate")
    again.nearest(X[:1])
    assert not again.built
