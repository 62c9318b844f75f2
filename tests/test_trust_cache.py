"""A cache file is data someone else may have made: every file name its index gives (shards it
lists, shards it retired, the sources of its virtual datasets) is checked before any file is
opened or removed, so a crafted index never reaches a file outside its shards folder."""

from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import blobs, call_cli, make_folder, one_line_error, synthetic_cache, write_image
from featurize import cache
from featurize.cache.schema import shard_file
from featurize.errors import UserError

TINY = ["--backbone", "vggface-vgg16", "--weights", "none", "--input-size", "32", "--quiet"]


def featurize_cli(*args, cwd):
    """`featurize ...` called in this process: (exit code, stdout, stderr)."""
    return call_cli("featurize", *args, cwd=cwd)


def victims(tmp_path) -> list[Path]:
    """Files the user can delete, outside any shards folder."""
    out = [tmp_path / "victim.txt", tmp_path / "victim2.h5", tmp_path / "a" / "victim3.h5"]
    for v in out:
        v.parent.mkdir(parents=True, exist_ok=True)
        v.write_text("precious")
    return out


def set_strings(path: Path, dataset: str, values):
    with h5py.File(path, "r+") as f:
        if dataset in f:
            del f[dataset]
        f.create_dataset(dataset, data=values, dtype=h5py.string_dtype("utf-8"))


def crafted(tmp_path, where: str) -> Path:
    """A cache at tmp_path/a/b/c.h5 whose index names the victims in `where`."""
    X, y, classes = blobs(n_classes=2, per_class=4, dim=8, seed=1)
    path = synthetic_cache(tmp_path / "a" / "b" / "c.h5", X, y, classes)
    v = victims(tmp_path)
    names = [str(v[0]), "../../victim2.h5", "c.h5.shards/../../victim3.h5"]
    if where == "retired":
        set_strings(path, "shards/retired", names)
    else:
        with h5py.File(path, "r") as f:
            listed = [n.decode() for n in f["shards/names"][()]]
        set_strings(path, "shards/names", [names[0]] + listed[1:])
    return path


@pytest.mark.parametrize("where", ["retired", "names"])
def test_compact_of_a_crafted_index_removes_nothing_outside(tmp_path, where):
    path = crafted(tmp_path, where)
    for _ in range(2):  # the old code deleted the retired names, and retired listed ones
        code, _, err = featurize_cli("compact", path, cwd=tmp_path)
        line = one_line_error(code, err, "damaged", str(path), "run featurize again")
    assert "nothing was read or removed" in line
    assert all(v.read_text() == "precious" for v in victims_present(tmp_path))


def victims_present(tmp_path) -> list[Path]:
    out = [tmp_path / "victim.txt", tmp_path / "victim2.h5", tmp_path / "a" / "victim3.h5"]
    assert all(v.is_file() for v in out), [v for v in out if not v.exists()]
    return out


def test_a_featurize_run_on_a_crafted_index_removes_nothing_outside(tmp_path):
    folder = make_folder(tmp_path / "faces", per_class=2)
    out = tmp_path / "a" / "b" / "c.h5"
    code, _, err = featurize_cli(folder, *TINY, "--out", out, cwd=tmp_path)
    assert code == 0, err
    victims(tmp_path)
    set_strings(out, "shards/retired", [str(tmp_path / "victim.txt"), "../../victim2.h5"])
    write_image(folder / "dave" / "dave_0000.jpg", seed=9)  # a change: the run commits
    code, _, err = featurize_cli(folder, *TINY, "--out", out, cwd=tmp_path)
    one_line_error(code, err, "damaged", str(out), "victim")
    victims_present(tmp_path)


def test_virtual_sources_outside_the_shards_folder_are_refused(tmp_path):
    X, y, classes = blobs(n_classes=2, per_class=4, dim=8, seed=1)
    path = synthetic_cache(tmp_path / "c.h5", X, y, classes)
    outside = tmp_path / "elsewhere.h5"
    with h5py.File(outside, "w") as f:
        f.create_dataset("embeddings", data=np.ones((8, 8), np.float32))
    with h5py.File(path, "r+") as f:  # an index whose view reads another file
        del f["embeddings"]
        layout = h5py.VirtualLayout(shape=(8, 8), dtype=np.float32)
        layout[:] = h5py.VirtualSource(str(outside), "embeddings", shape=(8, 8))
        f.create_virtual_dataset("embeddings", layout)
    for reader in (cache.read, cache.read_attrs, cache.compact):
        with pytest.raises(UserError, match="damaged.*elsewhere.h5"):
            reader(path)


@pytest.mark.parametrize("name", ["/etc/passwd", "../x.h5", "c.h5.shards/../../x.h5",
                                  "c.h5.shards/sub/x.h5", "c.h5.shards/.hidden.h5",
                                  "c.h5.shards/x.txt", "", ".", "c.h5.shards\\x.h5",
                                  "a/b.shards/x.h5", "c.h5.shards/x.h5\0"])
def test_only_plain_shard_names_pass(tmp_path, name):
    with pytest.raises(UserError, match="is damaged"):
        shard_file(tmp_path / "c.h5", name)


def test_names_of_shards_pass_and_only_this_caches_own_are_removable(tmp_path):
    index = tmp_path / "c.h5"
    own = "c.h5.shards/part-00000000000000000001-12-0.h5"
    assert shard_file(index, own) == tmp_path / own
    assert shard_file(index, own, remove=True) == tmp_path / own
    copied = "orig.h5.shards/merged-1-2-3.h5"  # a copied cache reads its original's folder
    assert shard_file(index, copied) == tmp_path / copied
    assert shard_file(index, copied, remove=True) is None
    assert shard_file(index, "c.h5", remove=True) is None  # a schema-1 file: never removed


def test_a_shard_that_links_out_of_its_folder_is_refused(tmp_path):
    (tmp_path / "c.h5.shards").mkdir()
    (tmp_path / "c.h5.shards" / "part-1.h5").symlink_to(tmp_path / "victim.h5")
    with pytest.raises(UserError, match="damaged.*link out of"):
        shard_file(tmp_path / "c.h5", "c.h5.shards/part-1.h5")


def test_the_commit_after_migrating_a_schema1_cache_keeps_the_index(tmp_path):
    """The migrated schema-1 file was listed as retired by the migrating commit, and the next
    commit deleted it: the index itself."""
    from conftest import as_schema1
    from featurize.jobs.run import featurize
    folder = make_folder(tmp_path / "faces", per_class=2)
    tiny = dict(backbone="vggface-vgg16", weights="none", input_size=32, progress=False,
                out=tmp_path / "c" / "c.h5")
    as_schema1(featurize(folder, **tiny).path)
    featurize(folder, **tiny)  # migrates
    with h5py.File(tmp_path / "c" / "c.h5", "r") as f:
        assert [n.decode() for n in f["shards/retired"][()]] == []
    write_image(folder / "dave" / "dave_0000.jpg", seed=9)
    s = featurize(folder, **tiny)
    assert s.path.is_file() and len(cache.read(s.path).paths) == 7
