"""Hostile inputs, interruptions (SIGTERM, SIGKILL), locking, cache integrity, and a property
test over random sequences of file changes and interrupted runs."""

import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from conftest import (
    call_cli,
    cli_command,
    cli_env,
    copy_cache,
    make_folder,
    same,
    shard_files,
    stored_in,
    write_image,
)
from featurize import atomic, cache
from featurize.cli import main
from featurize.errors import UserError
from featurize.jobs.run import featurize

TINY = dict(backbone="vggface-vgg16", weights="none", input_size=32, progress=False)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def hostile_corpus(root: Path) -> tuple[set, dict]:
    """Writes the corpus; returns (keys expected embedded, key -> expected reason start)."""
    good, bad = set(), {}
    ok = root / "ok"
    for i in range(3):
        write_image(ok / f"ok_{i}.jpg", seed=i)
        good.add(f"ok/ok_{i}.jpg")

    def add_good(rel, writer):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        writer(path)
        good.add(rel)

    rng = np.random.default_rng(0)
    add_good("odd/one_pixel.png", lambda p: Image.new("RGB", (1, 1), (9, 9, 9)).save(p))
    add_good("odd/wide.png", lambda p: Image.new("RGB", (10000, 200), (50, 90, 10)).save(p))
    add_good("odd/sixteen_bit.png", lambda p: Image.fromarray(
        rng.integers(0, 65535, (20, 20), dtype=np.uint16)).save(p))
    add_good("odd/cmyk.jpg", lambda p: Image.new("CMYK", (20, 20), (10, 200, 30, 5)).save(p))
    add_good("odd/palette.gif", lambda p: Image.new("RGB", (20, 20), (200, 0, 0)).convert("P").save(
        p, transparency=0))
    add_good("odd/animated.gif", lambda p: Image.new("RGB", (20, 20), (0, 0, 200)).save(
        p, save_all=True, append_images=[Image.new("RGB", (20, 20), (0, 200, 0))]))
    add_good("odd/image.tiff", lambda p: Image.new("RGB", (20, 20), (1, 2, 3)).save(p))
    add_good("odd/broken_exif.jpg", lambda p: Image.new("RGB", (20, 20)).save(
        p, exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7fgarbage"))
    add_good("odd/with space.jpg", lambda p: write_image(p, 7))
    add_good("odd/new\nline.jpg", lambda p: write_image(p, 8))
    add_good("odd/" + "l" * 200 + ".jpg", lambda p: write_image(p, 9))
    locked = root / "odd" / "locked.jpg"
    write_image(locked, 10)
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway
        good.add("odd/locked.jpg")
    else:
        bad["odd/locked.jpg"] = "permission denied"
    raw = os.fsencode(str(root / "odd")) + b"/caf\xe9.jpg"  # Latin-1 byte: not UTF-8
    with open(raw, "wb") as f:
        f.write((ok / "ok_0.jpg").read_bytes())
    good.add("odd/caf\\xe9.jpg")

    junk = root / "junk"
    junk.mkdir()
    (junk / "zero.jpg").write_bytes(b"")
    bad["junk/zero.jpg"] = "empty file"
    data = (ok / "ok_1.jpg").read_bytes()
    (junk / "truncated.jpg").write_bytes(data[: len(data) // 3])
    bad["junk/truncated.jpg"] = "corrupt"
    png = (root / "odd" / "one_pixel.png").read_bytes()
    (junk / "bad_crc.png").write_bytes(png[:29] + bytes([png[29] ^ 0xFF]) + png[30:])
    bad["junk/bad_crc.png"] = "corrupt"
    (junk / "text.jpg").write_text("hello")
    bad["junk/text.jpg"] = "not an image"
    (junk / "page.png").write_text("<html><body>404</body></html>")
    bad["junk/page.png"] = "not an image"
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    (junk / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
                                    + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                                    + png_chunk(b"IEND", b""))
    bad["junk/bomb.png"] = "too large"
    (junk / "dangling.jpg").symlink_to(junk / "nowhere.jpg")
    bad["junk/dangling.jpg"] = "missing or broken symlink"
    (junk / "loop_a.jpg").symlink_to(junk / "loop_b.jpg")
    (junk / "loop_b.jpg").symlink_to(junk / "loop_a.jpg")
    bad["junk/loop_a.jpg"] = bad["junk/loop_b.jpg"] = "cannot stat"

    (root / "only_bad").mkdir()
    (root / "only_bad" / "x.jpg").write_bytes(b"")
    bad["only_bad/x.jpg"] = "empty file"
    (root / "empty_class").mkdir()
    (root / "ok" / ".hidden.jpg").write_bytes(b"")
    (root / "ok" / ".DS_Store").write_bytes(b"\x00\x01")
    return good, bad


def test_hostile_corpus_every_good_image_embedded_every_bad_one_recorded(tmp_path, capsys):
    good, bad = hostile_corpus(tmp_path / "corpus")
    argv = [str(tmp_path / "corpus"), "--backbone", "vggface-vgg16", "--weights", "none",
            "--input-size", "32", "--quiet", "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert f"{len(bad)} failed" in captured.out and "warning: junk/" in captured.err
    path = Path(captured.out.strip().splitlines()[-1].split("cache: ")[1])
    c = cache.read(path)
    assert set(c.paths) == good
    assert set(c.failed) == set(bad)
    for key, reason in bad.items():
        assert c.failed[key].startswith(reason), (key, c.failed[key])
    assert "empty_class" not in c.classes and np.isfinite(c.embeddings).all()
    assert main(argv + ["--strict"]) == 1  # nothing new, but the failures are still there


def _args(folder, cache_dir, *extra):
    return [folder, "--backbone", "vggface-vgg16", "--weights", "none", "--input-size", "48",
            "--quiet", "--cache-dir", cache_dir, *extra]


def _cli(folder, cache_dir, *extra):
    """The run in a fresh process, for Popen: one to signal or kill."""
    return cli_command("featurize", *_args(folder, cache_dir, *extra))


def _wait_for_parts(cache_dir, n, proc, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        parts = list(Path(cache_dir).glob("*.shards/part-*.h5"))
        if len(parts) >= n or proc.poll() is not None:
            return len(parts)
        time.sleep(0.05)
    return 0


def _shared_memory() -> set:
    shm = Path("/dev/shm")
    return {p.name for pattern in ("psm_*", "featurize-*") for p in shm.glob(pattern)} if shm.is_dir() else set()


@pytest.mark.parametrize("workers", ["2", "4"])  # decoding threads; processes + shared memory
def test_sigterm_commits_progress_and_the_resumed_cache_equals_an_uninterrupted_one(tmp_path,
                                                                                    workers):
    folder = make_folder(tmp_path / "imgs", classes=("a", "b", "c", "d"), per_class=40)
    before = _shared_memory()
    proc = subprocess.Popen(_cli(folder, tmp_path / "c", "--batch-size", "2", "--workers",
                                 workers, "--checkpoint-rows", "2"), env=cli_env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for_parts(tmp_path / "c", 2, proc) >= 2
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0 and "done:" in out:  # a GPU embeds all 160 before the signal lands
        pytest.skip("the run finished before it could be interrupted (fast machine)")
    assert proc.returncode == 130 and "interrupted, progress saved" in out
    assert "Traceback" not in err and "leaked" not in err, err
    assert _shared_memory() <= before  # every batch buffer unlinked
    path = next((tmp_path / "c").glob("*.h5"))
    partial = cache.read(path)
    listed, present = shard_files(path)
    assert 0 < len(partial.paths) < 160 and listed == present  # all progress committed
    assert not Path(str(path) + ".lock").exists()
    assert call_cli("featurize", *_args(folder, tmp_path / "c"), cwd=tmp_path).returncode == 0
    assert call_cli("featurize", *_args(folder, tmp_path / "fresh"),
                    cwd=tmp_path).returncode == 0
    resumed, fresh = cache.read(path), cache.read(next((tmp_path / "fresh").glob("*.h5")))
    assert resumed.paths == fresh.paths and list(resumed.labels) == list(fresh.labels)
    np.testing.assert_allclose(resumed.embeddings, fresh.embeddings, rtol=same(1e-5),
                               atol=same(1e-6))


def test_sigkill_at_several_moments_never_leaves_an_unreadable_cache(tmp_path):
    folder = make_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=40)
    env = cli_env()
    args = _args(folder, tmp_path / "c", "--batch-size", "2", "--checkpoint-rows", "2")
    cmd = cli_command("featurize", *args)
    seen = []
    for parts in (1, 3, 6):
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        _wait_for_parts(tmp_path / "c", parts, proc)
        proc.kill()
        proc.wait()
        for h5 in (tmp_path / "c").glob("*.h5"):
            seen.append(len(cache.read(h5).paths))  # the previous or a newer valid state
    assert call_cli("featurize", *args, cwd=tmp_path).returncode == 0
    final = cache.read(next((tmp_path / "c").glob("*.h5")))
    assert len(final.paths) == 120 and seen == sorted(seen)


def test_a_second_run_on_the_same_cache_is_refused_and_a_stale_lock_is_taken_over(tmp_path,
                                                                                 image_folder):
    first = featurize(image_folder, cache_dir=tmp_path / "c", **TINY)
    lock = Path(str(first.path) + ".lock")
    with cache.lock(first.path):  # held by a live run: this one
        with pytest.raises(UserError, match=r"being written by another featurize run \(\S+ "
                                            f"{os.getpid()}\\)"):
            featurize(image_folder, cache_dir=tmp_path / "c", **TINY)
    assert not lock.exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # an old-style lock, owner gone
    dead.wait()
    lock.write_text(f"{os.uname().nodename} {dead.pid}")
    assert featurize(image_folder, cache_dir=tmp_path / "c", **TINY).reused == 12
    assert not lock.exists()


def test_a_reader_keeps_a_consistent_view_while_the_cache_is_replaced(tmp_path, image_folder):
    s = featurize(image_folder, cache_dir=tmp_path / "c", **TINY)
    with h5py.File(s.path, "r") as reader:
        write_image(image_folder / "alice" / "new.jpg", seed=77)
        featurize(image_folder, cache_dir=tmp_path / "c", **TINY)
        assert reader["embeddings"].shape[0] == len(reader["paths"]) == 12
    assert len(cache.read(s.path).paths) == 13


def test_a_failed_write_keeps_the_previous_cache_and_the_progress(tmp_path, image_folder,
                                                                   monkeypatch):
    s = featurize(image_folder, cache_dir=tmp_path / "c", **TINY)
    before = cache.read(s.path)
    write_image(image_folder / "bob" / "new.jpg", seed=78)
    real_replace = atomic.replace

    def full_disk(tmp, final):
        if Path(final) == s.path:
            raise OSError(28, "No space left on device")
        return real_replace(tmp, final)
    monkeypatch.setattr(atomic, "replace", full_disk)
    with pytest.raises(UserError, match="No space left on device.*previous cache"):
        featurize(image_folder, cache_dir=tmp_path / "c", **TINY)
    after = cache.read(s.path)
    assert after.paths == before.paths and not list((tmp_path / "c").glob(".*tmp*"))
    monkeypatch.setattr(atomic, "replace", real_replace)
    again = featurize(image_folder, cache_dir=tmp_path / "c", **TINY)
    assert again.embedded == 0 and len(cache.read(s.path).paths) == 13  # from the journal


def test_schema_version_and_tampered_caches_are_clear_errors(tmp_path, image_folder):
    s = featurize(image_folder, cache_dir=tmp_path / "c", **TINY)
    for name, edit, message in [
        ("newer.h5", lambda f: f.attrs.__setitem__("schema_version", 99), "upgrade this package"),
        ("older.h5", lambda f: f.attrs.__setitem__("schema_version", 0), "re-run featurize"),
        ("nan.h5", lambda f: f["embeddings"].__setitem__((0, 0), np.nan), "NaN or Inf"),
        ("labels.h5", lambda f: f["labels"].__setitem__(0, 7), "labels outside"),
        ("short.h5", lambda f: (f.__delitem__("labels"), f.create_dataset(
            "labels", data=[0], dtype="i4")), "inconsistent"),
        ("runs.h5", lambda f: f["shards/names"].__setitem__(0, "gone.h5"), "gone.h5 is missing"),
    ]:
        target = copy_cache(s.path, tmp_path / name / "cache.h5")
        with h5py.File(stored_in(target, "embeddings") if name == "nan.h5" else target,
                       "r+") as f:
            edit(f)
        with pytest.raises(UserError, match=message):
            cache.read(target)


def test_verify_command_checks_files_and_re_embeds_a_sample(tmp_path, image_folder, capsys):
    s = featurize(image_folder, cache_dir=tmp_path / "c", **TINY)
    assert main(["verify", str(s.path), "--sample", "4"]) == 0
    out = capsys.readouterr().out
    assert "12 rows" in out and "max abs difference" in out and out.strip().endswith("ok")
    (image_folder / "carol" / "carol_0001.jpg").unlink()
    assert main(["verify", str(s.path)]) == 1
    out = capsys.readouterr().out
    assert "missing: carol/carol_0001.jpg" in out and "1 file(s) no longer exist" in out
    with h5py.File(s.path, "r+") as f:
        f["embeddings"][3, 0] += 1.0
    assert main(["verify", str(s.path), "--sample", "12"]) == 1
    assert "re-embedded rows differ" in capsys.readouterr().out


# --- property: whatever happens to the folder, the cache equals a fresh featurize ----------------

class _ToyExtractor:
    """A fast deterministic stand-in for a network: the property is about the cache."""

    parallel = "thread"
    dim = 4

    def prepare(self, path):
        from featurize.data.images import load_for_model
        return load_for_model(path, 8)

    def embed(self, batch):
        x = batch.astype(np.float32)
        return np.stack([x.mean(axis=(1, 2, 3)), x[..., 0].std(axis=(1, 2)),
                         x[:, :4].mean(axis=(1, 2, 3)), x[:, 4:].mean(axis=(1, 2, 3))], 1)


actions = st.lists(st.tuples(st.sampled_from(["add", "change", "delete", "run", "interrupt"]),
                             st.integers(0, 7)), min_size=1, max_size=10)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=actions)
def test_property_final_cache_equals_a_fresh_featurize(steps, tmp_path_factory, monkeypatch):
    import featurize.jobs.run as run_module
    monkeypatch.setattr(run_module, "build_extractor", lambda s, w, *args: _ToyExtractor())
    real = run_module.batches
    root = tmp_path_factory.mktemp("prop")
    folder = root / "data"
    write_image(folder / "a" / "seed.png", seed=0, size=(8, 8), fmt="PNG")
    kw = dict(cache_dir=root / "cache", batch_size=2, flush_rows=1, **TINY)
    version = iter(range(1000, 10**6))
    for action, n in steps:
        path = folder / "abc"[n % 3] / f"img{n}.png"
        if action == "add" or (action == "change" and path.exists()):
            write_image(path, seed=next(version), size=(8, 8), fmt="PNG")
            os.utime(path, ns=(time.time_ns(), time.time_ns() + next(version)))
        elif action == "delete" and path.exists() and len(list(folder.rglob("*.png"))) > 1:
            path.unlink()
        elif action in ("run", "interrupt"):
            if action == "interrupt":
                def interrupted(*a, stop=n % 3, **k):
                    for i, b in enumerate(real(*a, **k)):
                        if i == stop:
                            raise KeyboardInterrupt
                        yield b
                monkeypatch.setattr(run_module, "batches", interrupted)
            featurize(folder, **kw)
            monkeypatch.setattr(run_module, "batches", real)
    final = cache.read(featurize(folder, **kw).path)
    fresh = cache.read(featurize(folder, **{**kw, "cache_dir": root / "fresh"}).path)
    assert final.paths == fresh.paths and final.classes == fresh.classes
    assert list(final.labels) == list(fresh.labels)
    np.testing.assert_array_equal(final.embeddings, fresh.embeddings)
