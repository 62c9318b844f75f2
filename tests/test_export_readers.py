"""A parquet export is a bare Parquet dataset: the folder holds only its part files, so it reads
as one table, given as it is, in pandas, pyarrow (read_table and pyarrow.dataset), polars and
DuckDB (`OUT/**`); its summary comes from the files' own metadata. The embedding column is a
fixed-size list (DuckDB's ARRAY after a cast). And `--normalize` (also export_cache's
`normalize`) gives rows an inner-product index ranks exactly as `classify search` does (the
README's autofaiss recipe)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from conftest import blobs, one_line_error, synthetic_cache
from featurize import cache
from featurize.jobs import export as export_module
from featurize.jobs.export import unit_rows
from test_export import export_cli


@pytest.fixture
def exported(tmp_path):
    """A cache of 21 rows of 16-D (4 unlabelled), exported in 3 parquet files."""
    X, y, classes = blobs(n_classes=3, per_class=7, dim=16, seed=3)
    y = y.copy()
    y[[2, 9, 15, 20]] = -1
    c = cache.read(synthetic_cache(tmp_path / "cache" / "c.h5", X, y, classes))
    out = tmp_path / "out"
    export_module.export(c.path, out, "parquet", rows_per_file=8)
    return c, out


def check_table(c, table: pa.Table):
    assert table.num_rows == 21 and table.column_names[:3] == ["path", "label", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 16)
    assert table.column("path").to_pylist() == c.paths
    emb = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, 16)
    assert np.array_equal(emb, c.X)


def test_the_folder_holds_only_its_parts_and_they_carry_the_summary(exported):
    c, out = exported
    assert sorted(p.name for p in out.iterdir()) == [
        "part-0.parquet", "part-1.parquet", "part-2.parquet"]
    assert export_module.is_export(out)
    summary = export_module.sidecar(out)
    meta = json.loads(pq.read_schema(out / "part-0.parquet").metadata[b"featurize"])
    assert summary == {"format": "parquet", "rows": 21, "dim": 16, "normalized": False,
                       "files": [{"file": "part-0.parquet", "rows": 8},
                                 {"file": "part-1.parquet", "rows": 8},
                                 {"file": "part-2.parquet", "rows": 5}],
                       "provenance": meta}
    assert meta["cache_path"] == str(c.path.resolve()) and meta["rows"] == 21


def test_pyarrow_reads_the_folder_as_one_table(exported):
    c, out = exported
    check_table(c, pq.read_table(out))
    check_table(c, ds.dataset(out, format="parquet").to_table())
    check_table(c, ds.dataset(str(out)).to_table())  # the default format is parquet


def test_pandas_reads_the_folder(exported):
    pd = pytest.importorskip("pandas")
    c, out = exported
    df = pd.read_parquet(out)
    assert list(df["path"]) == c.paths
    assert [v if isinstance(v, str) else None for v in df["label"]] == [
        c.classes[i] if i >= 0 else None for i in c.labels.tolist()]
    assert np.array_equal(np.stack(df["embedding"].to_list()).astype(np.float32), c.X)


def test_polars_reads_the_folder(exported):
    pl = pytest.importorskip("polars")
    c, out = exported
    for df in (pl.read_parquet(out), pl.scan_parquet(out).collect()):  # the folder as given
        assert df["path"].to_list() == c.paths
        assert df.schema["embedding"] == pl.Array(pl.Float32, 16)
        assert np.array_equal(df["embedding"].to_numpy(), c.X)


def test_duckdb_reads_the_folder_and_its_arrays(exported):
    """Parquet has no fixed-size list: DuckDB reads the files' `embedding` as FLOAT[] and
    takes `embedding::FLOAT[D]` for its ARRAY functions; through pyarrow.dataset it gets the
    Arrow type, FLOAT[D], as it is."""
    duckdb = pytest.importorskip("duckdb")
    c, out = exported
    con = duckdb.connect()
    query = ("SELECT path, array_cosine_similarity({e}, {e}), typeof({e}) FROM {source} "
             "ORDER BY path")
    every = con.execute(query.format(  # `**`: every file under OUT, the bare folder's parts
        e="embedding::FLOAT[16]", source=f"read_parquet('{out}/**')")).fetchall()
    parquet = con.execute(query.format(
        e="embedding::FLOAT[16]", source=f"read_parquet('{out}/*.parquet')")).fetchall()
    (raw,) = con.execute(f"SELECT DISTINCT typeof(embedding) FROM read_parquet('{out}/**')"
                         ).fetchall()
    assert raw == ("FLOAT[]",)
    dataset = ds.dataset(out)  # noqa: F841 - DuckDB finds it by its name
    arrow = con.execute(query.format(e="embedding", source="dataset")).fetchall()
    for rows in (every, parquet, arrow):
        assert [r[0] for r in rows] == sorted(c.paths)
        assert {r[2] for r in rows} == {"FLOAT[16]"}
        assert np.allclose([r[1] for r in rows], 1.0, atol=1e-5)


# --- --normalize: the README's inner-product recipe ranks like classify search ----------------

def varied_norms(tmp_path):
    """A cache whose rows' lengths differ by orders of magnitude: raw inner product then
    ranks long rows first, cosine does not."""
    rng = np.random.default_rng(7)
    X, y, classes = blobs(n_classes=4, per_class=40, dim=24, spread=1.0, seed=5)
    X = X * rng.uniform(0.05, 20.0, (len(X), 1))
    X[5] = 0.0  # a zero row stays zero
    return cache.read(synthetic_cache(tmp_path / "cache" / "c.h5", X, y, classes)), rng


def test_a_normalized_export_ranks_like_classify_search_with_faiss(tmp_path):
    faiss = pytest.importorskip("faiss")
    from classify._search import Gallery
    c, rng = varied_norms(tmp_path)
    code, out, err = export_cli(c.path, "out", "--normalize", "--rows-per-file", "50",
                                cwd=tmp_path)
    assert code == 0, err
    assert "unit-length" in out
    table = pq.read_table(tmp_path / "out")
    emb = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, 24)
    norms = np.linalg.norm(emb, axis=1)
    assert np.allclose(np.delete(norms, 5), 1.0, atol=1e-6) and norms[5] == 0
    meta = json.loads(pq.read_schema(tmp_path / "out" / "part-0.parquet").metadata[b"featurize"])
    assert meta["normalized"] is True
    assert export_module.sidecar(tmp_path / "out")["normalized"] is True

    index = faiss.IndexFlatIP(24)
    index.add(np.ascontiguousarray(emb))
    queries = rng.normal(0, 1, (12, 24)).astype(np.float32) * rng.uniform(0.1, 10, (12, 1))
    unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    _, found = index.search(unit.astype(np.float32), 10)
    rows, _ = Gallery(c.path, method="exact").nearest(queries, 10)
    assert np.array_equal(found, rows)
    raw = faiss.IndexFlatIP(24)  # the recipe's old failure: raw rows, inner product
    raw.add(np.ascontiguousarray(c.X))
    assert not np.array_equal(raw.search(unit.astype(np.float32), 10)[1], rows)


def test_without_normalize_the_rows_are_the_caches_and_recorded_so(exported):
    c, out = exported
    assert export_module.sidecar(out)["normalized"] is False
    meta = json.loads(pq.read_schema(out / "part-0.parquet").metadata[b"featurize"])
    assert meta["normalized"] is False


def test_export_cache_normalizes_when_asked(tmp_path):
    import featurize
    c, _ = varied_norms(tmp_path)
    plain = featurize.export_cache(c.path, tmp_path / "plain", rows_per_file=100)
    unit = featurize.export_cache(c.path, tmp_path / "unit", rows_per_file=100, normalize=True)
    assert (plain.normalized, unit.normalized) == (False, True)
    for folder, expected in ((tmp_path / "plain", c.X), (tmp_path / "unit", unit_rows(c.X))):
        table = pq.read_table(folder)
        emb = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, 24)
        assert np.array_equal(emb, expected)
        assert export_module.sidecar(folder)["normalized"] is (folder.name == "unit")
    norms = np.linalg.norm(unit_rows(c.X), axis=1)
    assert np.allclose(np.delete(norms, 5), 1.0, atol=1e-6) and norms[5] == 0


def test_normalize_is_an_option_of_the_command_only(exported, tmp_path):
    c, _ = exported
    code, _, err = export_cli(c.path, "o", "--normalize=yes", cwd=tmp_path)
    one_line_error(code, err, "--normalize")
    assert not (tmp_path / "o").exists()
