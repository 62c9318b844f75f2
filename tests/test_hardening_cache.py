"""Issue #11, the cache: an atomic lock, leftovers of killed runs, one cache per dataset root,
checksums against bit rot, degenerate embeddings, completeness, --check content, and clear
one-line errors for caches and --out paths that are not what they should be."""

import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import (
    as_schema1,
    blobs,
    call_cli,
    make_folder,
    one_line_error,
    run_cli,
    same,
    stored_in,
    synthetic_cache,
    write_image,
)
from featurize import cache
from featurize.data.images import Dataset, Item
from featurize.errors import UserError
from featurize.jobs.run import featurize
from featurize.jobs.verify import verify_cache

TINY = dict(backbone="vggface-vgg16", weights="none", input_size=32, progress=False)
TINY_ARGS = ["--backbone", "vggface-vgg16", "--weights", "none", "--input-size", "32", "--quiet"]


def flip_bytes(path: Path, dataset: str, chunk: int, count: int = 8):
    """Invert `count` bytes in the middle of one stored chunk of `dataset`: bit rot."""
    path = stored_in(path, dataset)
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(chunk)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        data = fh.read(count)
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes(b ^ 0xFF for b in data))


# --- item 5: the lock ----------------------------------------------------------------------------

INSIDE, DOUBLE, BUSY, OTHER = 1, 2, 3, 4


def _contend(path, barrier, mine, peer, results, index):
    """One of a pair: take the lock at the same moment as its peer. Inside, it holds the lock
    until the peer has tried, so a correct lock lets exactly one of the two in."""
    marker = str(path) + ".inside"
    barrier.wait()
    try:
        with cache.lock(path):
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                results[index] = INSIDE
            except FileExistsError:
                results[index] = DOUBLE  # the peer is inside too
            mine.set()
            peer.wait(60)
            if results[index] == INSIDE:
                os.unlink(marker)
    except UserError as e:
        results[index] = BUSY if "being written by another featurize run" in str(e) else OTHER
        mine.set()
    except BaseException:
        results[index] = OTHER
        mine.set()


@pytest.mark.parametrize("pairs", [20, pytest.param(200, marks=pytest.mark.slow)])
def test_lock_lets_exactly_one_of_many_simultaneous_pairs_in(tmp_path, pairs):
    ctx = multiprocessing.get_context("fork")  # cheap: no re-import per process
    wave = 10
    results = ctx.Array("i", 2 * pairs, lock=False)
    for first in range(0, pairs, wave):
        procs = []
        for p in range(first, first + wave):
            path = tmp_path / f"pair{p}" / "x.h5"
            barrier, events = ctx.Barrier(2), (ctx.Event(), ctx.Event())
            for side in (0, 1):
                procs.append(ctx.Process(target=_contend, args=(
                    path, barrier, events[side], events[1 - side], results, 2 * p + side)))
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(120)
            assert proc.exitcode == 0
    outcomes = [sorted(results[2 * p:2 * p + 2]) for p in range(pairs)]
    assert outcomes == [[INSIDE, BUSY]] * pairs
    assert not list(tmp_path.rglob("*.lock")) and not list(tmp_path.rglob("*.inside"))


def _hold_and_die(path, ready):
    with cache.lock(path):
        ready.set()
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_lock_whose_owner_was_killed_is_free_and_a_busy_lock_names_its_owner(tmp_path,
                                                                              image_folder):
    s = featurize(image_folder, cache_dir=tmp_path / "c", **TINY)
    lock_path = Path(str(s.path) + ".lock")
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_hold_and_die, args=(s.path, ready))
    child.start()
    child.join(60)
    assert ready.is_set() and child.exitcode == -signal.SIGKILL
    assert lock_path.read_text().split()[1] == str(child.pid)  # left behind by the dead owner
    code, out, err = call_cli("featurize", image_folder, *TINY_ARGS, "--out", s.path,
                              cwd=tmp_path)
    assert code == 0 and "12 already cached" in out, err
    assert not lock_path.exists()
    with cache.lock(s.path):  # a live owner: a fresh process is refused, with our name
        code, out, err = run_cli("featurize", image_folder, *TINY_ARGS, "--out", s.path,
                                 cwd=tmp_path, timeout=300)
        assert lock_path.read_text().split()[1] == str(os.getpid())
    one_line_error(code, err, "being written by another featurize run", f" {os.getpid()})")


# --- item 7: leftovers of a run killed while committing -----------------------------------------

def test_temporary_files_of_a_killed_commit_are_removed_by_the_next_run(tmp_path, image_folder):
    s = featurize(image_folder, cache_dir=tmp_path / "c", **TINY)
    leftover = s.path.with_name(f".{s.path.name}.tmp-99999999")
    leftover.write_bytes(b"half a cache")
    part = cache.shards_dir(s.path) / ".part-000001.tmp-99999999"
    part.write_bytes(b"half a shard")
    unrelated = s.path.with_name(".another.h5.tmp-99999999")  # not this cache's: kept
    unrelated.write_bytes(b"x")
    code, out, err = call_cli("featurize", image_folder, *TINY_ARGS, "--cache-dir", tmp_path / "c",
                              cwd=tmp_path)
    assert code == 0 and "12 already cached" in out, err
    assert not leftover.exists() and not part.exists() and unrelated.exists()
    assert len(cache.read(s.path).paths) == 12


# --- item 8: two datasets with the same folder name --------------------------------------------

def test_two_datasets_of_the_same_name_get_separate_caches(tmp_path):
    a = make_folder(tmp_path / "A" / "photos", classes=("x", "y"), per_class=3)
    b = make_folder(tmp_path / "B" / "photos", classes=("z",), per_class=2)
    sa = featurize(a, cache_dir=tmp_path / "c", **TINY)
    sb = featurize(b, cache_dir=tmp_path / "c", **TINY)
    assert sa.path != sb.path and sa.path.name.startswith("photos-")
    again = featurize(a, cache_dir=tmp_path / "c", **TINY)
    assert again.path == sa.path and again.reused == 6 and again.embedded == 0
    assert cache.read(sa.path).classes == ["x", "y"] and cache.read(sb.path).classes == ["z"]


def test_a_cache_under_the_old_default_name_stays_in_use_for_its_own_dataset(tmp_path):
    a = make_folder(tmp_path / "A" / "photos", classes=("x",), per_class=3)
    b = make_folder(tmp_path / "B" / "photos", classes=("z",), per_class=2)
    made = featurize(a, cache_dir=tmp_path / "c", **TINY)
    legacy = cache.default_path("photos", _settings(made.path), tmp_path / "c")  # the old name
    assert legacy != made.path
    made.path.rename(legacy)
    again = featurize(a, cache_dir=tmp_path / "c", **TINY)
    assert again.path == legacy and again.embedded == 0 and again.reused == 3
    other = featurize(b, cache_dir=tmp_path / "c", **TINY)  # same name, another root
    assert other.path not in (legacy, made.path) and other.embedded == 2
    assert cache.read(legacy).classes == ["x"] and len(cache.read(legacy).paths) == 3


# --- item 9: bit rot ----------------------------------------------------------------------------

def test_flipped_bytes_in_embeddings_are_reported_and_the_next_run_repairs_them(tmp_path,
                                                                               image_folder):
    s = featurize(image_folder, cache_dir=tmp_path / "c", **TINY)
    before = cache.read(s.path)
    with h5py.File(stored_in(s.path, "embeddings"), "r") as f:
        assert f["embeddings"].fletcher32
    with h5py.File(s.path, "r") as f:
        assert f["labels"].fletcher32
    flip_bytes(s.path, "embeddings", 0)
    with pytest.raises(UserError, match=r"12 row\(s\) fail their checksum.*run featurize on"):
        cache.read(s.path)
    code, out, err = run_cli("featurize", "verify", s.path, cwd=tmp_path, timeout=300)
    assert code == 1 and "Traceback" not in err, err
    assert "12 row(s) fail their checksum" in out and "damaged: row 0: alice/alice_0000.jpg" in out
    code, out, err = call_cli("classify", "--cache", s.path, "--head", "centroid", cwd=tmp_path)
    one_line_error(code, err, str(s.path), "fail their checksum")
    repaired = featurize(image_folder, cache_dir=tmp_path / "c", **TINY)
    assert repaired.embedded == 12  # the damaged rows, embedded again
    after = cache.read(s.path)
    assert after.paths == before.paths
    np.testing.assert_allclose(after.embeddings, before.embeddings, rtol=same(1e-5),
                               atol=same(1e-6))


def test_damage_is_located_to_its_chunk_of_rows(tmp_path):
    X, y, classes = blobs(n_classes=3, per_class=32, dim=2048)
    path = synthetic_cache(tmp_path / "big.h5", X, y, classes)
    with h5py.File(stored_in(path, "embeddings"), "r") as f:
        assert f["embeddings"].chunks == (32, 2048)
    flip_bytes(path, "embeddings", 1)
    c = cache.read(path, strict=False)
    assert c.damaged == list(range(32, 64))
    np.testing.assert_array_equal(c.embeddings[:32], np.asarray(X, np.float32)[:32])
    report = verify_cache(path)
    assert any("32 row(s) fail their checksum" in p for p in report.problems)
    assert report.damaged[0] == f"row 32: {c.paths[32]}"
    # featurize's view: exactly those rows are to be embedded again
    items = [Item(p, p, None, 1, 1) for p in c.paths]
    state = cache.State(path, _settings(path))
    assert [it.key for it in state.todo(items)] == c.paths[32:64] and state.damaged_rows == 32
    assert not state.up_to_date(Dataset(path.parent, "synthetic", items, []))


def _settings(path):
    from featurize.settings import EmbeddingSettings
    return EmbeddingSettings.from_json(cache.read_attrs(path)["settings"])


def _strip_checksums(path: Path):
    """Rewrite a cache as versions before the checksums wrote it: one file (schema 1),
    contiguous datasets, no digests, no completeness attributes."""
    as_schema1(path)
    with h5py.File(path, "r+") as f:
        for name in ("embeddings", "labels", "sizes", "mtimes", "failed/sizes", "failed/mtimes"):
            data = f[name][()]
            del f[name]
            f.create_dataset(name, data=data)
        del f["digests"]
        del f.attrs["complete"]
        del f.attrs["pending"]


def test_caches_written_before_the_checksums_still_read_and_are_reused(tmp_path, image_folder):
    s = featurize(image_folder, cache_dir=tmp_path / "c", **TINY)
    before = cache.read(s.path)
    _strip_checksums(s.path)
    with h5py.File(s.path, "r") as f:
        assert not f["embeddings"].fletcher32 and "digests" not in f
    old = cache.read(s.path)
    assert old.complete and old.pending == 0 and old.paths == before.paths
    np.testing.assert_array_equal(old.embeddings, before.embeddings)
    assert verify_cache(s.path).ok
    again = featurize(image_folder, cache_dir=tmp_path / "c", **TINY)
    assert again.embedded == 0 and again.reused == 12


# --- item 10: degenerate embeddings and a tolerance relative to their scale ---------------------

def test_verify_flags_identical_and_vanishing_embeddings(tmp_path):
    _, y, classes = blobs(n_classes=2, per_class=5, dim=16)
    same_rows = synthetic_cache(tmp_path / "same.h5", np.tile(np.arange(16.0), (10, 1)), y, classes)
    report = verify_cache(same_rows)
    assert any("all 10 embeddings are the same" in p for p in report.problems), report.problems
    rng = np.random.default_rng(0)
    tiny = synthetic_cache(tmp_path / "tiny.h5", 1e-12 * rng.normal(size=(10, 16)), y, classes)
    report = verify_cache(tiny)
    assert any("every embedding is about zero" in p for p in report.problems), report.problems
    X, y, classes = blobs(n_classes=2, per_class=5, dim=16)
    fine = synthetic_cache(tmp_path / "fine.h5", X, y, classes)
    assert not any("embedding" in p for p in verify_cache(fine).problems)
    code, out, err = call_cli("featurize", "verify", same_rows, cwd=tmp_path)
    assert code == 1 and "embeddings are the same" in out and "Traceback" not in err


class _Reembed:
    """Stands in for the model: gives back each cached row times (1 + error)."""

    def __init__(self, c, error):
        self.rows = dict(zip(c.paths, c.embeddings))
        self.root, self.error = c.attrs["dataset_root"], error

    def prepare(self, path):
        return self.rows[os.path.relpath(path, self.root)] * (1 + self.error)

    def embed(self, arrays):
        return arrays


@pytest.mark.parametrize("scale, error, ok", [(1e6, 1e-4, True), (1e-9, 0.5, False)])
def test_the_re_embed_tolerance_is_relative_to_the_embeddings_scale(tmp_path, monkeypatch, scale,
                                                                     error, ok):
    import featurize.jobs.verify as verify_module
    X, y, classes = blobs(n_classes=2, per_class=4, dim=8)
    path = synthetic_cache(tmp_path / "c.h5", X * scale, y, classes)
    c = cache.read(path)
    for key in c.paths:  # the files, as they were when embedded: size 1, mtime 1 ns
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(b"x")
        os.utime(tmp_path / key, ns=(1, 1))
    monkeypatch.setattr(verify_module, "build_extractor", lambda settings, **kw: _Reembed(c, error))
    report = verify_cache(path, sample=8)
    assert report.relative_difference == pytest.approx(error, rel=1e-3)
    assert report.ok == ok, report.problems


# --- item 14: completeness ----------------------------------------------------------------------

def test_an_interrupted_run_records_an_incomplete_cache(tmp_path, monkeypatch):
    import featurize.jobs.run as run_module
    folder = make_folder(tmp_path / "imgs", classes=("a", "b"), per_class=6)
    real = run_module.batches

    def interrupted(*a, **k):
        for i, batch in enumerate(real(*a, **k)):
            if i == 2:
                raise KeyboardInterrupt
            yield batch
    monkeypatch.setattr(run_module, "batches", interrupted)
    s = featurize(folder, cache_dir=tmp_path / "c", batch_size=2, **TINY)
    c = cache.read(s.path)
    assert s.interrupted and not c.complete and c.pending == 8 and len(c.paths) == 4
    monkeypatch.setattr(run_module, "batches", real)
    featurize(folder, cache_dir=tmp_path / "c", **TINY)
    c = cache.read(s.path)
    assert c.complete and c.pending == 0 and len(c.paths) == 12


def test_commit_records_completeness_and_pending_images(tmp_path):
    X, y, classes = blobs(n_classes=2, per_class=3, dim=4)
    path = synthetic_cache(tmp_path / "c.h5", X, y, classes)
    c = cache.read(path)
    assert c.complete and c.pending == 0
    items = [Item(p, p, c.classes[lab], 1, 1) for p, lab in zip(c.paths, c.labels)]
    items += [Item(f"person0/new_{i}.jpg", "", "person0", 1, 1) for i in range(3)]
    dataset = Dataset(tmp_path, "synthetic", sorted(items, key=lambda it: it.key), c.classes)
    cache.commit(path, _settings(path), dataset, {}, complete=False)
    c = cache.read(path)
    assert not c.complete and c.pending == 3 and len(c.paths) == 6
    with h5py.File(path, "r") as f:
        assert not f.attrs["complete"]
        assert int(f.attrs["pending"]) == 3


# --- item 15: --check content -------------------------------------------------------------------

def test_check_content_sees_a_same_size_change_with_restored_mtime(tmp_path):
    folder = tmp_path / "imgs"
    for i in range(4):
        write_image(folder / "a" / f"{i}.bmp", seed=i, size=(32, 32))  # BMP: size fixed by shape
    code, out, err = call_cli("featurize", folder, *TINY_ARGS, "--check", "content",
                              "--cache-dir", tmp_path / "c", cwd=tmp_path)
    assert code == 0 and "4 embedded" in out, err
    path = Path(out.strip().splitlines()[-1].split("cache: ")[1])
    with h5py.File(path, "r") as f:
        digests = [d.decode() for d in f["digests"][()]]
    assert all(len(d) == 32 for d in digests) and len(set(digests)) == 4
    target = folder / "a" / "2.bmp"
    st = target.stat()
    write_image(target, seed=99, size=(32, 32))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    kw = dict(cache_dir=tmp_path / "c", **TINY)
    missed = featurize(folder, **kw)  # the documented rule: size + mtime
    assert missed.embedded == 0 and missed.reused == 4
    seen = featurize(folder, check="content", **kw)
    assert seen.embedded == 1 and seen.reused == 3
    fresh = cache.read(featurize(folder, **{**kw, "cache_dir": tmp_path / "fresh"}).path)
    np.testing.assert_allclose(cache.read(path).embeddings, fresh.embeddings, rtol=same(1e-5),
                               atol=same(1e-6))
    assert featurize(folder, check="content", **kw).embedded == 0


def test_check_content_embeds_again_rows_recorded_without_a_digest(tmp_path, image_folder):
    kw = dict(cache_dir=tmp_path / "c", **TINY)
    s = featurize(image_folder, **kw)
    with h5py.File(s.path, "r") as f:
        assert set(f["digests"].asstr()[()]) == {""}
    assert featurize(image_folder, check="content", **kw).embedded == 12
    assert featurize(image_folder, check="content", **kw).embedded == 0
    with pytest.raises(UserError, match="check must be mtime or content"):
        featurize(image_folder, check="sha", **kw)


# --- robustness: caches and --out paths that are not what they should be ------------------------

def test_a_cache_missing_a_dataset_is_a_one_line_error_for_featurize_and_classify(tmp_path,
                                                                                image_folder):
    s = featurize(image_folder, cache_dir=tmp_path / "c", **TINY)
    for name in ("sizes", "failed"):
        broken = tmp_path / f"no_{name}.h5"
        shutil.copy(s.path, broken)
        with h5py.File(broken, "r+") as f:
            del f[name]
        content = broken.read_bytes()
        code, _, err = call_cli("featurize", image_folder, *TINY_ARGS, "--out", broken,
                                cwd=tmp_path)
        one_line_error(code, err, str(broken), name, "run featurize again")
        code, _, err = call_cli("classify", "--cache", broken, cwd=tmp_path)
        one_line_error(code, err, str(broken), name, "run featurize again")
        assert broken.read_bytes() == content
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".lock", ".parts", ".shards"))]


def test_out_paths_that_are_not_cache_files_are_named_with_their_fix(tmp_path, image_folder):
    folder = tmp_path / "outdir"
    folder.mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    foreign = tmp_path / "other.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.arange(3)
    before = {p.name: p.read_bytes() for p in (notes, foreign)}
    code, _, err = call_cli("featurize", image_folder, *TINY_ARGS, "--out", folder, cwd=tmp_path)
    one_line_error(code, err, f"{folder} is a directory", "--out a file path")
    code, _, err = call_cli("featurize", image_folder, *TINY_ARGS, "--out", notes, cwd=tmp_path)
    line = one_line_error(code, err, str(notes), "not a featurize cache", "another --out")
    assert "delete" not in line
    code, _, err = call_cli("featurize", image_folder, *TINY_ARGS, "--out", foreign,
                            cwd=tmp_path)
    line = one_line_error(code, err, str(foreign), "not a featurize cache", "--out")
    assert "--cache" not in line
    code, _, err = call_cli("classify", "--cache", foreign, cwd=tmp_path)
    one_line_error(code, err, str(foreign), "point --cache at")
    assert {p.name: p.read_bytes() for p in (notes, foreign)} == before
    assert not list(folder.iterdir()) and not list(tmp_path.glob("*.lock"))


# --- featurize verify ---------------------------------------------------------------------------

def test_verify_rejects_a_negative_sample_in_one_line(tmp_path):
    X, y, classes = blobs(n_classes=2, per_class=3, dim=4)
    path = synthetic_cache(tmp_path / "c.h5", X, y, classes)  # a cache, never embedded
    code, _, err = call_cli("featurize", "verify", path, "--sample", "-1", cwd=tmp_path)
    one_line_error(code, err, "--sample must be at least 0")


def test_verify_reports_an_image_corrupted_after_caching(tmp_path, image_folder):
    s = featurize(image_folder, cache_dir=tmp_path / "c", **TINY)
    target = image_folder / "bob" / "bob_0002.jpg"
    st = target.stat()
    target.write_bytes(b"\0" * st.st_size)  # same size, same mtime: only decoding can tell
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    code, out, err = call_cli("featurize", "verify", s.path, "--sample", "12", cwd=tmp_path)
    assert code == 1 and "Traceback" not in err, err
    assert "bob/bob_0002.jpg no longer decodes" in out
    assert "max abs difference" in out  # the other 11 were still compared
    (image_folder / "alice" / "alice_0001.jpg").touch()  # a change featurize would see
    report = verify_cache(s.path)
    assert report.changed == ["alice/alice_0001.jpg"] and not report.ok


def test_verify_on_a_moved_dataset_reports_the_files_missing(tmp_path, image_folder):
    s = featurize(image_folder, cache_dir=tmp_path / "c", **TINY)
    image_folder.rename(tmp_path / "moved")
    code, out, err = call_cli("featurize", "verify", s.path, "--sample", "4", cwd=tmp_path)
    assert code == 1 and "Traceback" not in err, err
    assert f"the dataset folder {image_folder} no longer exists" in out
    assert "missing: alice/alice_0000.jpg" in out and "no image is left to re-embed" in out
