"""Issue #13 item 3: `python -m featurize export CACHE --format parquet|npy OUT`, in the layouts
embedding-reader and autofaiss read (parquet with a fixed-size-list `embedding` column;
img_emb/*.npy paired with metadata/*.parquet), provenance in the files' metadata, written
atomically, and one-line errors that write nothing."""

import json
import os
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import (
    blobs,
    call_cli,
    one_line_error,
    run_cli,
    run_python,
    synthetic_cache,
    unparseable_as,
)
from featurize import cache
from featurize.cli import main as featurize_main
from featurize.errors import UserError
from featurize.jobs import export as export_module


def export_cli(*args, cwd):
    """`featurize export ...`, called in this process: (exit code, stdout, stderr)."""
    return call_cli("featurize", "export", *args, cwd=cwd)


def export_without(blocked, *args, cwd):
    """`featurize export ...` in a fresh process where `import BLOCKED` fails, as when it is
    not installed."""
    argv = ["export", *map(str, args)]
    code = (f"import sys; sys.modules[{blocked!r}] = None; from featurize.cli import main; "
            f"sys.exit(main({argv!r}))")
    return run_python(code, cwd=cwd, timeout=120)


@pytest.fixture
def small_cache(tmp_path):
    """21 rows of 16-D: 3 classes and 4 unlabelled rows (label -1)."""
    X, y, classes = blobs(n_classes=3, per_class=7, dim=16, seed=3)
    y = y.copy()
    y[[2, 9, 15, 20]] = -1
    path = synthetic_cache(tmp_path / "cache" / "c.h5", X, y, classes)  # its own folder
    return cache.read(path)


def tree(root: Path) -> dict:
    """Every file and folder under `root`: its content, None for a folder."""
    return {p.relative_to(root): p.read_bytes() if p.is_file() else None
            for p in root.rglob("*")}


def expected_labels(c) -> list:
    return [c.classes[i] if i >= 0 else None for i in c.labels.tolist()]


def test_parquet_export_equals_the_cache_row_for_row(small_cache, tmp_path):
    c = small_cache
    code, out, err = export_cli(c.path, "--format", "parquet", "emb", "--rows-per-file", "2",
                                cwd=tmp_path)
    assert code == 0, err
    assert "exported 21 rows" in out and "11 parquet file(s)" in out
    folder = tmp_path / "emb"
    files = sorted(folder.glob("*.parquet"))  # as readers list them: names sorted as text
    assert [f.name for f in files] == [f"part-{i:02d}.parquet" for i in range(11)]
    table = pa.concat_tables([pq.read_table(f) for f in files])
    dim = c.X.shape[1]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), dim)
    assert table.schema.field("path").type == pa.string()
    assert table.schema.field("label").type == pa.string()
    assert table.column("path").to_pylist() == c.paths
    assert table.column("label").to_pylist() == expected_labels(c)
    assert table.column("label").null_count == 4
    emb = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    assert emb.dtype == np.float32 and np.array_equal(emb.view(np.uint32), c.X.view(np.uint32))
    meta = json.loads(pq.read_schema(files[-1]).metadata[b"featurize"])
    assert meta["settings"] == c.attrs["settings"] and meta["backbone"] == "vggface-vgg16"
    assert meta["weights"] == c.attrs["weights"] and meta["keras_version"] == "test"
    assert meta["dataset_root"] == c.attrs["dataset_root"] and meta["rows"] == 21
    assert meta["cache_path"] == str(c.path.resolve()) and meta["classes"] == c.classes
    assert sorted(p.name for p in folder.iterdir()) == [f.name for f in files]  # bare
    summary = export_module.sidecar(folder)  # rebuilt from the files' footers
    assert summary["format"] == "parquet" and summary["provenance"] == meta
    assert summary["rows"] == 21 and summary["dim"] == dim and summary["normalized"] is False
    assert summary["files"] == [{"file": f.name, "rows": 2 if i < 10 else 1}
                                for i, f in enumerate(files)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "emb"]  # no temporary left


def test_npy_export_pairs_each_embedding_file_with_its_metadata(small_cache, tmp_path):
    c = small_cache
    code, out, err = export_cli(c.path, "out", "--format", "npy", "--rows-per-file", "2",
                                cwd=tmp_path)
    assert code == 0, err
    folder = tmp_path / "out"
    embeddings = sorted((folder / "img_emb").glob("*.npy"))
    metadata = sorted((folder / "metadata").glob("*.parquet"))
    assert [p.stem.split("_")[-1] for p in embeddings] == [p.stem.split("_")[-1]
                                                           for p in metadata]
    assert len(embeddings) == 11 and embeddings[10].name == "img_emb_10.npy"
    rows, paths, labels = [], [], []
    for emb_file, meta_file in zip(embeddings, metadata):
        block, table = np.load(emb_file), pq.read_table(meta_file)
        assert block.dtype == np.float32 and block.ndim == 2 and len(block) == table.num_rows
        assert table.column_names == ["path", "label"]
        rows.append(block)
        paths += table.column("path").to_pylist()
        labels += table.column("label").to_pylist()
    X = np.concatenate(rows)
    assert np.array_equal(X.view(np.uint32), c.X.view(np.uint32))
    assert paths == c.paths and labels == expected_labels(c)
    meta = json.loads(pq.read_schema(metadata[0]).metadata[b"featurize"])
    summary = json.loads((folder / "_featurize_export.json").read_text())
    assert summary["provenance"] == meta and meta["settings"] == c.attrs["settings"]
    assert summary["files"][0] == {"file": "img_emb/img_emb_00.npy",
                                   "metadata": "metadata/metadata_00.parquet", "rows": 2}


def test_embedding_reader_reads_both_exports(small_cache, tmp_path):
    """The real reader, where it is installed (it pins pandas<3, so it is not a test
    dependency): every row, in order, with its path and label."""
    er = pytest.importorskip("embedding_reader")
    c = small_cache
    export_module.export(c.path, tmp_path / "pq", "parquet", rows_per_file=5)
    export_module.export(c.path, tmp_path / "np", "npy", rows_per_file=5)
    readers = [er.EmbeddingReader(str(tmp_path / "pq"), file_format="parquet",
                                  embedding_column="embedding", meta_columns=["path", "label"]),
               er.EmbeddingReader(str(tmp_path / "np" / "img_emb"), file_format="parquet_npy",
                                  metadata_folder=str(tmp_path / "np" / "metadata"),
                                  meta_columns=["path", "label"])]
    for reader in readers:
        assert (reader.count, reader.dimension) == (21, 16)
        for emb, meta in reader(batch_size=8, start=3, end=21, show_progress=False):
            rows = meta["i"].to_numpy()
            assert np.array_equal(emb, c.X[rows])
            assert list(meta["path"]) == [c.paths[i] for i in rows]
            assert [v if isinstance(v, str) else None for v in meta["label"]] == \
                [expected_labels(c)[i] for i in rows]


def test_default_rows_per_file_is_one_file_for_a_small_cache(small_cache, tmp_path):
    done = export_module.export(small_cache.path, tmp_path / "out")
    assert done.format == "parquet" and done.files == [{"file": "part-0.parquet", "rows": 21}]
    assert pq.read_metadata(tmp_path / "out" / "part-0.parquet").num_rows == 21


def test_bad_inputs_are_one_line_errors_that_write_nothing(small_cache, tmp_path):
    c = small_cache
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    one_line_error(*export_cli(tmp_path / "missing.h5", "o", cwd=tmp_path)[::2], "missing.h5")
    one_line_error(*export_cli(c.path, "o", "--format", "csv", cwd=tmp_path)[::2], "--format")
    one_line_error(*export_cli(c.path, a_file, cwd=tmp_path)[::2], "notes.txt", "is a file")
    one_line_error(*export_cli(c.path, full, cwd=tmp_path)[::2], "full", "--overwrite")
    one_line_error(*export_cli(c.path, full, "--overwrite", cwd=tmp_path)[::2],
                   "not an export")
    one_line_error(*export_cli(c.path, "o", "--rows-per-file", "0", cwd=tmp_path)[::2],
                   "--rows-per-file")
    one_line_error(*export_cli(a_file, "o", cwd=tmp_path)[::2], "notes.txt")  # not a cache
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert a_file.read_text() == "mine" and [p.name for p in full.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_without_pyarrow_the_error_names_the_extra(small_cache, tmp_path, fmt):
    code, _, err = export_without("pyarrow", small_cache.path, "o", "--format", fmt,
                                  cwd=tmp_path)
    one_line_error(code, err, "pyarrow", "featurize-embeddings[parquet]")
    assert not (tmp_path / "o").exists()


def test_overwrite_replaces_an_earlier_export_whole(small_cache, tmp_path):
    c = small_cache
    (tmp_path / "empty").mkdir()
    code, _, err = export_cli(c.path, "empty", "--rows-per-file", "4", cwd=tmp_path)
    assert code == 0, err  # an empty folder is fine without --overwrite
    code, _, err = export_cli(c.path, "empty", "--format", "npy", "--overwrite", cwd=tmp_path)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [
        "_featurize_export.json", "img_emb", "metadata"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "empty"]


def test_a_failed_export_leaves_no_folder_and_keeps_the_earlier_one(small_cache, tmp_path,
                                                                     monkeypatch):
    c = small_cache
    export_module.export(c.path, tmp_path / "out", "npy")
    saved = tree(tmp_path)
    calls, real_save = [], np.save

    def save_then_fail(path, array):
        calls.append(path)
        if len(calls) >= 2:
            raise OSError(28, "No space left on device")
        real_save(path, array)

    monkeypatch.setattr(export_module.np, "save", save_then_fail)
    with pytest.raises(UserError, match="No space left on device.*free some space"):
        export_module.export(c.path, tmp_path / "out", "npy", rows_per_file=5, overwrite=True)
    with pytest.raises(UserError, match="No space left on device.*free some space"):
        export_module.export(c.path, tmp_path / "new", "npy", rows_per_file=2)
    assert len(calls) == 3
    monkeypatch.setattr(export_module.np, "save", lambda *a: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        export_module.export(c.path, tmp_path / "new", "npy")
    assert tree(tmp_path) == saved  # the earlier export intact, nothing of the failed ones left


def leftover(folder: Path, pid: int, marked: bool = True) -> Path:
    """A folder as an export killed while writing leaves it: marked by export, or not."""
    folder.mkdir()
    (folder / "half.npy").write_bytes(b"x")
    if marked:
        (folder / export_module.LEFTOVER).write_text(json.dumps(
            {"folder": folder.name, "host": socket.gethostname(), "pid": pid}))
    return folder


def test_leftovers_of_killed_exports_are_removed_and_live_ones_kept(small_cache, tmp_path):
    """`python -m featurize export` in a fresh process: this test's own process is the live
    owner of a leftover."""
    dead = run_python("import os; print(os.getpid())")
    dead_pid = int(dead.stdout)
    for name in (f"out.tmp-{dead_pid}", f"out.old-{dead_pid}", f"out.tmp-{os.getpid()}"):
        leftover(tmp_path / name, int(name.rpartition("-")[2]))
    code, _, err = run_cli("featurize", "export", small_cache.path, "out", cwd=tmp_path,
                           timeout=120)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out",
                                                          f"out.tmp-{os.getpid()}"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "part-0.parquet"]  # no marker (nor summary) left in the export


def test_folders_export_did_not_make_are_never_removed(small_cache, tmp_path):
    """A user's own `out.old-2023` (a backup), an unmarked `out.tmp-<dead pid>`, a marker
    naming another folder: all kept, with or without --overwrite."""
    kept = [leftover(tmp_path / "out.old-2023", 2023, marked=False),
            leftover(tmp_path / "out.tmp-99999999", 99999999, marked=False),
            leftover(tmp_path / "out.old-99999998", 99999998, marked=False)]
    copied = leftover(tmp_path / "out.old-99999997", 99999997)  # e.g. copied from elsewhere
    (copied / export_module.LEFTOVER).write_text(json.dumps(
        {"folder": "out.tmp-99999997", "host": socket.gethostname(), "pid": 99999997}))
    for args in ([], ["--overwrite"], ["--overwrite", "--format", "npy"]):
        code, _, err = export_cli(small_cache.path, "out", *args, cwd=tmp_path)
        assert code == 0, err
    for folder in [*kept, copied]:
        assert (folder / "half.npy").read_bytes() == b"x", folder


def test_overwrite_replaces_only_an_export(small_cache, tmp_path):
    mine = tmp_path / "faces"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for args in ([], ["--overwrite"]):
        code, _, err = export_cli(small_cache.path, "faces", *args, cwd=tmp_path)
        one_line_error(code, err, "faces", "--overwrite" if not args else "not an export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "faces"]
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    old = tmp_path / "old-export"  # made before the sidecar was renamed
    old.mkdir()
    (old / "featurize_export.json").write_text("{}")
    (old / "part-0.parquet").write_bytes(b"x")
    code, _, err = export_cli(small_cache.path, "old-export", cwd=tmp_path)
    one_line_error(code, err, "old-export", "--overwrite")
    code, _, err = export_cli(small_cache.path, "old-export", "--overwrite", cwd=tmp_path)
    assert code == 0, err
    assert export_module.sidecar(old)["rows"] == 21
    assert not (old / "featurize_export.json").exists()


def foreign_parquet(folder: Path, name: str = "part-0.parquet") -> Path:
    """A parquet file export did not write: the same name and columns, no `featurize` key."""
    folder.mkdir(exist_ok=True)
    pq.write_table(pa.table({"path": ["a.jpg"], "label": ["x"]}), folder / name)
    return folder / name


def test_overwrite_leaves_parquet_files_that_are_not_ours(small_cache, tmp_path):
    """Without the summary file, a parquet export is recognised by its files alone: only
    part-N.parquet files, each with export's metadata. Anything else is the user's."""
    theirs = tmp_path / "theirs"  # the user's own parquet files
    foreign_parquet(theirs)
    mixed = tmp_path / "mixed"  # an export the user added a file to
    export_module.export(small_cache.path, mixed, rows_per_file=10)
    foreign_parquet(mixed, "part-9.parquet")
    notes = tmp_path / "noted"
    export_module.export(small_cache.path, notes)
    (notes / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    for folder in (theirs, mixed, notes):
        assert not export_module.is_export(folder)
        code, _, err = export_cli(small_cache.path, folder.name, "--overwrite", cwd=tmp_path)
        one_line_error(code, err, folder.name, "not an export")
        with pytest.raises(UserError, match="not an export"):
            export_module.sidecar(folder)
    assert tree(tmp_path) == before
    export_module.export(small_cache.path, tmp_path / "ours", rows_per_file=10)
    assert export_module.is_export(tmp_path / "ours")
    code, _, err = export_cli(small_cache.path, "ours", "--overwrite", "--format", "npy",
                              cwd=tmp_path)
    assert code == 0, err
    assert export_module.sidecar(tmp_path / "ours")["format"] == "npy"


def test_an_incomplete_cache_is_exported_with_a_warning(small_cache, tmp_path):
    import h5py
    with h5py.File(small_cache.path, "a") as f:
        f.attrs["complete"] = False
        f.attrs["pending"] = 5
    code, out, err = export_cli(small_cache.path, "out", cwd=tmp_path)
    assert code == 0 and "exported 21 rows" in out
    assert err.strip().startswith("warning:") and "5 images pending" in err
    meta = export_module.sidecar(tmp_path / "out")["provenance"]
    assert meta["complete"] is False and meta["pending"] == 5


def test_a_cache_featurize_grew_in_two_runs_exports_whole(tmp_path):
    """A real cache: two runs (the second adds images), then the export has every row of
    both, with the run's provenance (backbone, weights, versions)."""
    from conftest import make_folder, write_image
    from featurize.jobs.run import featurize

    folder = make_folder(tmp_path / "faces", per_class=3)
    tiny = dict(backbone="vggface-vgg16", weights="none", input_size=32, progress=False,
                out=tmp_path / "cache" / "faces.h5")
    featurize(folder, **tiny)
    write_image(folder / "dave" / "dave_0000.jpg", seed=7)
    write_image(folder / "loose.jpg", seed=8)  # no class folder: unlabelled
    s = featurize(folder, **tiny)
    assert s.embedded == 2 and s.reused == 9
    c = cache.read(s.path)
    code, _, err = export_cli(s.path, "out", "--format", "npy", "--rows-per-file", "5",
                              cwd=tmp_path)
    assert code == 0, err
    X = np.concatenate([np.load(f) for f in sorted((tmp_path / "out").glob("img_emb/*.npy"))])
    metadata = sorted((tmp_path / "out").glob("metadata/*.parquet"))
    assert np.array_equal(X.view(np.uint32), c.X.view(np.uint32)) and len(X) == 11
    labels = sum((pq.read_table(f).column("label").to_pylist() for f in metadata), [])
    assert labels == expected_labels(c) and labels.count(None) == 1 and "dave" in labels
    meta = json.loads(pq.read_schema(metadata[0]).metadata[b"featurize"])
    assert meta["backbone"] == "vggface-vgg16" and meta["keras_version"] == c.attrs["keras_version"]
    assert meta["dataset_root"] == str(folder) and meta["settings"] == c.attrs["settings"]


TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=24)
BAD = {"--format": TEXT.filter(lambda t: t not in export_module.FORMATS),
       "--rows-per-file": st.one_of(st.integers(max_value=0).map(str), TEXT.filter(unparseable_as(int)))}


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_every_invalid_option_value_is_refused_before_writing(small_cache, capsys, data):
    option = data.draw(st.sampled_from(sorted(BAD)))
    value = data.draw(BAD[option])
    root = small_cache.path.parent.parent
    before = tree(root)
    code = featurize_main(["export", str(small_cache.path), str(root / "out"), f"{option}={value}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (option, value, err)
    assert tree(root) == before
