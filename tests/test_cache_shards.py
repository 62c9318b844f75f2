"""Issue #13 item 1: an append-only cache of immutable shards under an atomically swapped index.

Appending writes a shard and a new index, never the old rows; deleted and changed files are
masked; small shards are merged; `compact` merges on request; schema-1 caches are read and
migrated without copying; h5py sees the whole cache through the index's virtual datasets."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import (
    as_schema1,
    call_cli,
    cli_env,
    copy_cache,
    make_folder,
    run_cli,
    same,
    shard_files,
    write_image,
)
from featurize import cache, open_cache
from featurize.cache import index
from featurize.errors import UserError
from featurize.jobs.run import featurize

TINY = dict(backbone="vggface-vgg16", weights="none", input_size=32, progress=False)
TINY_ARGS = ["--backbone", "vggface-vgg16", "--weights", "none", "--input-size", "32", "--quiet"]


def digests(folder: Path) -> dict:
    """Content hash and inode of each shard file: what "never rewritten" means."""
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_ino)
            for p in folder.glob("*.h5")}


def mapping(c) -> dict:
    return {p: (row, label) for p, row, label in zip(c.paths, c.embeddings, c.labels)}


def assert_same_cache(a, b):
    assert sorted(a.paths) == sorted(b.paths) and a.classes == b.classes
    ma, mb = mapping(a), mapping(b)
    for p in ma:
        np.testing.assert_allclose(ma[p][0], mb[p][0], rtol=same(1e-5), atol=same(1e-6))
        assert a.classes[ma[p][1]] == b.classes[mb[p][1]]


@pytest.fixture
def no_merging(monkeypatch):
    """Every shard counts as big: appends stay separate shards (as in a large cache)."""
    monkeypatch.setattr(index, "SMALL_BYTES", 0)


def test_appending_writes_one_new_shard_and_never_touches_the_old_ones(tmp_path, no_merging):
    folder = make_folder(tmp_path / "imgs", per_class=4)
    first = featurize(folder, cache_dir=tmp_path / "c", flush_rows=4, batch_size=4, **TINY)
    shards = cache.shards_dir(first.path)
    before = digests(shards)
    assert len(before) == 3  # one shard per 4 journalled rows, none merged
    write_image(folder / "bob" / "new.jpg", seed=99)
    again = featurize(folder, cache_dir=tmp_path / "c", flush_rows=4, batch_size=4, **TINY)
    after = digests(shards)
    assert again.embedded == 1 and again.reused == 12
    assert {k: after[k] for k in before} == before and len(after) == 4
    listed, present = shard_files(first.path)
    assert listed == present and len(listed) == 4
    fresh = featurize(folder, cache_dir=tmp_path / "fresh", **TINY)
    assert_same_cache(cache.read(again.path), cache.read(fresh.path))


def test_deleted_and_changed_files_are_masked_not_rewritten(tmp_path, no_merging):
    folder = make_folder(tmp_path / "imgs", per_class=4)
    s = featurize(folder, cache_dir=tmp_path / "c", **TINY)
    before = digests(cache.shards_dir(s.path))
    (folder / "alice" / "alice_0001.jpg").unlink()
    write_image(folder / "carol" / "carol_0002.jpg", seed=1234)  # same name, new content
    os.utime(folder / "carol" / "carol_0002.jpg", ns=(1, 1))
    again = featurize(folder, cache_dir=tmp_path / "c", **TINY)
    assert again.embedded == 1 and again.reused == 10
    after = digests(cache.shards_dir(s.path))
    assert {k: after[k] for k in before} == before  # the old shard is the same file
    with h5py.File(s.path, "r") as f:
        runs = f["shards/runs"][()]
    assert len(runs) == 4  # the old shard in 3 runs around the 2 masked rows, the new one
    fresh = featurize(folder, cache_dir=tmp_path / "fresh", **TINY)
    assert_same_cache(cache.read(s.path), cache.read(fresh.path))


def test_h5py_reads_the_whole_cache_through_the_index(tmp_path, no_merging):
    folder = make_folder(tmp_path / "imgs", per_class=3)
    featurize(folder, cache_dir=tmp_path / "c", flush_rows=2, batch_size=2, **TINY)
    (folder / "bob" / "bob_0000.jpg").unlink()
    s = featurize(folder, cache_dir=tmp_path / "c", flush_rows=2, batch_size=2, **TINY)
    c = open_cache(s.path)
    os.chdir(tmp_path / "imgs")  # the shards are found from the index's folder, not the cwd
    with h5py.File(s.path, "r") as f:
        assert [p.decode() for p in f["paths"][()]] == c.paths
        np.testing.assert_array_equal(f["embeddings"][()], c.X)
        np.testing.assert_array_equal(f["labels"][()], c.y)
        assert f["embeddings"].is_virtual and len(f["shards/names"]) > 1


def test_small_shards_are_merged_and_the_old_ones_outlive_one_commit(tmp_path):
    folder = make_folder(tmp_path / "imgs", per_class=4)
    s = featurize(folder, cache_dir=tmp_path / "c", flush_rows=2, batch_size=2, **TINY)
    listed, present = shard_files(s.path)
    assert len(listed) == 1 and listed == present  # 6 journal shards merged into one
    c = cache.read(s.path)
    assert c.paths == sorted(c.paths)
    reader = h5py.File(s.path, "r")  # a reader holding this version of the index
    try:
        write_image(folder / "bob" / "new.jpg", seed=99)
        featurize(folder, cache_dir=tmp_path / "c", **TINY)  # merges both small shards
        listed_now, present_now = shard_files(s.path)
        assert len(listed_now) == 1 and listed_now != listed and present_now == listed_now | listed
        np.testing.assert_array_equal(reader["embeddings"][()], c.X)  # still readable
    finally:
        reader.close()
    write_image(folder / "bob" / "new2.jpg", seed=98)
    featurize(folder, cache_dir=tmp_path / "c", **TINY)
    listed_last, present_last = shard_files(s.path)
    # the first merged shard was retired by the second commit and deleted by the third
    assert not listed & present_last and present_last == listed_last | listed_now


def test_compact_merges_shards_in_a_fresh_process_with_the_same_rows(tmp_path, no_merging):
    folder = make_folder(tmp_path / "imgs", per_class=4)
    s = featurize(folder, cache_dir=tmp_path / "c", flush_rows=3, batch_size=3, **TINY)
    (folder / "alice" / "alice_0000.jpg").unlink()
    featurize(folder, cache_dir=tmp_path / "c", flush_rows=3, batch_size=3, **TINY)
    before = cache.read(s.path)
    assert len(shard_files(s.path)[0]) == 4
    code, out, err = run_cli("featurize", "compact", s.path, cwd=tmp_path, timeout=300)
    assert code == 0 and "11 rows in 1 shard(s) (were 4)" in out, err
    after = cache.read(s.path)
    assert after.paths == sorted(before.paths) and after.attrs["labels_digest"] == \
        before.attrs["labels_digest"]
    assert_same_cache(before, after)
    again = featurize(folder, cache_dir=tmp_path / "c", **TINY)
    assert again.embedded == 0 and again.reused == 11


def test_compact_mistakes_are_one_line_errors(tmp_path):
    code, _, err = call_cli("featurize", "compact", tmp_path / "nope.h5", cwd=tmp_path)
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err, err
    code, _, err = call_cli("featurize", "compact", cwd=tmp_path)
    assert code == 2 and err.count("\n") == 1 and "compact" in err, err


def test_a_schema1_cache_is_read_then_migrated_without_copying_or_embedding(tmp_path):
    folder = make_folder(tmp_path / "imgs", per_class=4)
    s = featurize(folder, cache_dir=tmp_path / "c", **TINY)
    made = cache.read(s.path)
    as_schema1(s.path)
    old = cache.read(s.path)  # read as it is
    assert old.attrs["schema_version"] == 1 and old.paths == made.paths
    inode = s.path.stat().st_ino
    code, out, err = call_cli("featurize", folder, *TINY_ARGS, "--cache-dir", tmp_path / "c",
                              cwd=tmp_path)
    assert code == 0 and "12 already cached" in out, err
    assert "sharded layout" in err and "nothing was embedded again" in err, err
    migrated = cache.read(s.path)
    assert migrated.attrs["schema_version"] == cache.SCHEMA_VERSION
    listed, present = shard_files(s.path)
    assert len(listed) == 1 and listed == present
    assert (tmp_path / "c" / listed.pop()).stat().st_ino == inode  # linked, not copied
    np.testing.assert_array_equal(migrated.embeddings, made.embeddings)
    code, out, err = call_cli("featurize", folder, *TINY_ARGS, "--cache-dir", tmp_path / "c",
                              cwd=tmp_path)
    assert code == 0 and "sharded layout" not in err


def test_a_renamed_index_still_reads_and_a_lone_copied_index_says_what_is_missing(tmp_path):
    folder = make_folder(tmp_path / "imgs", per_class=2)
    s = featurize(folder, cache_dir=tmp_path / "c", **TINY)
    renamed = s.path.with_name("renamed.h5")
    s.path.rename(renamed)
    assert len(cache.read(renamed).paths) == 6
    again = featurize(folder, out=renamed, **TINY)  # appends beside the old shards
    assert again.embedded == 0 and again.reused == 6
    lone = tmp_path / "elsewhere" / "lone.h5"
    lone.parent.mkdir()
    lone.write_bytes(renamed.read_bytes())
    code, _, err = call_cli("classify", "--cache", lone, "--head", "centroid", cwd=tmp_path)
    assert code == 2 and err.count("\n") == 1 and "is missing" in err, err
    assert "moved or copied together" in err
    copied = copy_cache(renamed, tmp_path / "copied" / "whole.h5")
    assert_same_cache(cache.read(copied), cache.read(renamed))


def test_a_run_embeds_again_the_rows_of_a_lost_shard(tmp_path, no_merging):
    folder = make_folder(tmp_path / "imgs", per_class=4)
    s = featurize(folder, cache_dir=tmp_path / "c", flush_rows=6, batch_size=6, **TINY)
    listed, _ = shard_files(s.path)
    assert len(listed) == 2
    lost = sorted(listed)[0]
    (tmp_path / "c" / lost).unlink()
    with pytest.raises(UserError, match="is missing"):
        cache.read(s.path)
    again = featurize(folder, cache_dir=tmp_path / "c", **TINY)
    assert again.embedded == 6 and again.reused == 6
    fresh = featurize(folder, cache_dir=tmp_path / "fresh", **TINY)
    assert_same_cache(cache.read(s.path), cache.read(fresh.path))


def test_relabelling_rewrites_only_the_index(tmp_path, no_merging):
    folder = make_folder(tmp_path / "imgs", classes=("a", "b"), per_class=3)
    names = sorted(str(p.relative_to(tmp_path)) for p in folder.rglob("*.jpg"))
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\t{p.split('/')[1]}\n" for p in names))
    s = featurize(listing, out=tmp_path / "c" / "listed.h5", **TINY)
    before, first = digests(cache.shards_dir(s.path)), cache.read(s.path)
    listing.write_text("".join(f"{p}\t{'b' if p.split('/')[1] == 'a' else 'a'}\n" for p in names))
    again = featurize(listing, out=s.path, **TINY)
    assert again.embedded == 0 and again.reused == 6
    second = cache.read(s.path)
    assert digests(cache.shards_dir(s.path)) == before
    assert [first.classes[i] for i in first.labels] != [second.classes[i] for i in second.labels]
    assert [second.classes[i] for i in second.labels] == [
        "b" if p.startswith("imgs/a/") else "a" for p in second.paths]


def test_compact_and_export_from_python(tmp_path, no_merging):
    import featurize
    folder = make_folder(tmp_path / "imgs", per_class=4)
    s = featurize.embed_folder(folder, backbone="vggface-vgg16", weights="none", input_size=32,
                               cache=tmp_path / "c", batch_size=4, flush_rows=4,
                               progress=False)
    assert len(shard_files(s.path)[0]) == 3
    counts = featurize.compact_cache(s.path, everything=True)
    assert counts == {"shards_before": 3, "shards_after": 1, "rows": 12}
    assert_same_cache(featurize.open_cache(s.path), s)
    done = featurize.export_cache(s.path, tmp_path / "out", "npy")
    assert done.rows == 12 and (tmp_path / "out" / "_featurize_export.json").is_file()


READER = """
import os, sys
from featurize import cache
from featurize.errors import UserError
seen = []
while True:  # until the writer is done (its stop file), then once more
    stop = os.path.exists(sys.argv[2])
    try:
        seen.append(len(cache.read(sys.argv[1]).paths))
    except UserError as e:
        print("error:", e)
        sys.exit(1)
    if len(seen) == 1:
        print("reading", flush=True)
    if stop:
        break
print(" ".join(map(str, seen)))
"""


def test_a_reader_in_another_process_sees_whole_versions_while_runs_append(tmp_path):
    folder = make_folder(tmp_path / "imgs", per_class=3)
    s = featurize(folder, cache_dir=tmp_path / "c", **TINY)
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(s.path), str(stop)],
                              env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    assert reader.stdout.readline() == "reading\n", reader.communicate(timeout=60)
    for k in range(4):  # each run appends a shard and merges the small ones: shards come and go
        write_image(folder / "alice" / f"more_{k}.jpg", seed=500 + k)
        featurize(folder, cache_dir=tmp_path / "c", **TINY)
    stop.touch()
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, out + err
    counts = [int(n) for n in out.split()]
    assert counts and counts == sorted(counts) and set(counts) <= set(range(9, 14)), counts
