"""`--engine ray` (issue #13 item 2): Ray Data decoding tasks and an actor pool write cache
shards; equal to a local run; resumes after a killed driver without redoing a shard; survives
a killed worker; reads a manifest of s3:// URLs from a local S3 server; one-line errors
without Ray or s3fs. Ray starts with 2 CPUs."""

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    call_cli,
    cli_command,
    cli_env,
    make_folder,
    run_cli,
    run_python,
    same,
    write_image,
)
from featurize import cache, open_cache
from featurize.errors import UserError
from featurize.jobs.run import featurize
from featurize.models import dlib_backbone

# Ray Data's own DataContext warns about its own deprecated fields as it copies itself.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")
TINY = dict(backbone="vggface-vgg16", weights="none", input_size=32, progress=False)
TINY_CLI = ["--backbone", "vggface-vgg16", "--weights", "none", "--input-size", "32"]
SMALL = dict(flush_rows=6, batch_size=4)  # work shards of 6 images, model batches of 4
SMALL_CLI = ["--checkpoint-rows", "6", "--batch-size", "4"]
BAD = {"bob/bob_truncated.jpg": "corrupt: truncated", "carol/carol_text.jpg": "not an image"}


def _env(keras_home: Path, **extra) -> dict:
    return cli_env(TF_CPP_MIN_LOG_LEVEL="3", KERAS_HOME=keras_home, **extra)


def _cli(*args) -> list[str]:
    return cli_command("featurize", *args)


def _dataset(root: Path, per_class: int = 10) -> Path:
    """Three classes of small JPEGs, one truncated and one text file named .jpg."""
    make_folder(root, classes=("alice", "bob", "carol"), per_class=per_class)
    good = write_image(root / "bob" / "whole.jpg", seed=7).read_bytes()
    (root / "bob" / "bob_truncated.jpg").write_bytes(good[:len(good) // 2])
    (root / "bob" / "whole.jpg").unlink()
    (root / "carol" / "carol_text.jpg").write_text("not an image")
    return root


def _assert_same_cache(got: Path, want: Path):
    a, b = cache.read(got), cache.read(want)
    assert a.paths == b.paths and a.classes == b.classes
    assert list(a.labels) == list(b.labels)
    assert a.failed == b.failed
    np.testing.assert_allclose(a.embeddings, b.embeddings, rtol=same(1e-5), atol=same(1e-6))


@pytest.fixture(scope="module")
def keras_home(tmp_path_factory):
    """Not the user's ~/.keras; shared by this module's runs, Ray workers and subprocesses, so
    the tiny model is exported for ONNX Runtime (the CPU default) once, not once per process."""
    home = tmp_path_factory.mktemp("keras_home")
    with pytest.MonkeyPatch.context() as mp:  # for the module fixtures' own runs
        mp.setenv("KERAS_HOME", str(home))
        yield home


@pytest.fixture(autouse=True)
def _shared_keras_home(_isolated_keras_home, keras_home, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(keras_home))


@pytest.fixture(scope="module")
def ray_session(keras_home):
    """One Ray for the in-process tests (the subprocess tests start their own)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"KERAS_HOME": str(keras_home)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _dataset(tmp_path_factory.mktemp("ray") / "faces")


@pytest.fixture(scope="module")
def reference(keras_home, images, tmp_path_factory):
    """The single-process cache of `images`: what every Ray run must equal."""
    out = tmp_path_factory.mktemp("ref") / "local.h5"
    summary = featurize(images, out=out, **SMALL, **TINY)
    assert summary.failed == BAD and summary.embedded == 30
    return out


def test_ray_run_equals_a_local_run(ray_session, images, reference, tmp_path):
    out = tmp_path / "ray.h5"
    summary = featurize(images, out=out, engine="ray", **SMALL, **TINY)
    assert summary.embedded == 30 and summary.failed == BAD and summary.committed
    _assert_same_cache(out, reference)
    assert ray_session.is_initialized()  # the caller's Ray is left running
    attrs = cache.read(out).attrs
    assert attrs["keras_version"] and attrs["embedding_dim"] == 512  # the actors' provenance
    again = featurize(images, out=out, engine="ray", **SMALL, **TINY)
    assert again.embedded == 0 and again.reused == 32


def test_a_mistake_an_actor_finds_is_one_user_error(ray_session, tmp_path):
    import h5py

    from featurize.errors import UserError
    folder = make_folder(tmp_path / "imgs", per_class=1)
    with h5py.File(tmp_path / "not_weights.h5", "w") as f:  # found out when the model loads
        f["x"] = np.zeros(3)
    options = dict(TINY, weights=str(tmp_path / "not_weights.h5"))
    with pytest.raises(UserError, match="not a Keras 2 weight file"):
        featurize(folder, out=tmp_path / "c.h5", engine="ray", **options)
    assert not (tmp_path / "c.h5").exists()


def test_per_image_extractor_dlib_decodes_in_its_actors(ray_session, tmp_path):
    pytest.importorskip("dlib")
    try:  # dlib and its model files, found without importing face_recognition_models
        dlib_backbone.check_installed()
    except UserError as e:
        pytest.skip(str(e))
    folder = make_folder(tmp_path / "faces", per_class=2)
    (folder / "alice" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 40)
    options = dict(backbone="dlib-resnet", progress=False, flush_rows=4)
    local = featurize(folder, out=tmp_path / "local.h5", **options)
    on_ray = featurize(folder, out=tmp_path / "ray.h5", engine="ray", **options)
    assert on_ray.embedded == local.embedded == 6 and on_ray.failed == local.failed
    _assert_same_cache(tmp_path / "ray.h5", tmp_path / "local.h5")
    assert cache.read(tmp_path / "ray.h5").attrs["dlib_version"]
    # how each face was found (the "face" row-info column) is written by the actors too
    ray_faces, local_faces = (open_cache(tmp_path / f"{n}.h5").face_found for n in ("ray", "local"))
    assert ray_faces is not None and len(ray_faces) == 6
    np.testing.assert_array_equal(ray_faces, local_faces)
    assert (local_faces == 3).all()  # flat-colour images: no face, the fixed box (code 3)
    # the counts the command line's `faces:` line prints, as a local run makes them
    assert on_ray.row_info == local.row_info == {"face": {3: 6}}


def _trace_lines(path: Path, kind: str) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split()[1:] for line in path.read_text().splitlines() if line.startswith(kind)]


def _wait(condition, proc, timeout=120):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended first ({proc.returncode}): {out[-500:]} {err[-2000:]}")
        time.sleep(0.05)
    pytest.fail("timed out")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_killed_driver_rerun_skips_every_completed_shard(keras_home, images, reference,
                                                        tmp_path):
    out, trace = tmp_path / "ray.h5", tmp_path / "trace"
    # a pause after each shard: the Ray processes outlive the killed driver for a moment
    env = _env(keras_home, FEATURIZE_RAY_TRACE=str(trace), FEATURIZE_RAY_TRACE_SLEEP="1")
    args = [images, "--engine", "ray", "--out", out, *TINY_CLI, *SMALL_CLI]
    proc = subprocess.Popen(_cli(*args), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait(lambda: len(list(cache.shards_dir(out).glob("work-*.h5"))) >= 2, proc)
    proc.kill()  # SIGKILL: no cleanup, no commit
    proc.communicate()
    actors = {int(pid) for (pid,) in _trace_lines(trace, "start")}
    _wait(lambda: all(_gone(pid) for pid in actors), None, timeout=60)  # Ray dies with it
    done = {p.stem for p in cache.shards_dir(out).glob("work-*.h5")}
    before = [name for name, _, _ in _trace_lines(trace, "embed")]
    assert 2 <= len(done) < 6 and not out.exists()

    rerun = run_cli("featurize", *args, "--quiet", cwd=tmp_path, timeout=300,
                    env=_env(keras_home, FEATURIZE_RAY_TRACE=str(trace)))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    noise = [line for line in rerun.stderr.splitlines() if not line.startswith("warning: ")
             and "core_worker.cc" not in line]  # Ray's C++ note on actor restarts, one line
    assert noise == [], rerun.stderr  # no Ray start-up, log or progress lines
    _assert_same_cache(out, reference)
    later = [name for name, _, _ in _trace_lines(trace, "embed")[len(before):]]
    assert done <= set(before) and not done & set(later)  # no completed shard redone
    assert len(later) == len(set(later)) and len(done | set(later)) == 6  # 32 images / 6


def test_killed_worker_is_restarted_and_the_run_completes(keras_home, images, reference,
                                                          tmp_path):
    out, trace = tmp_path / "ray.h5", tmp_path / "trace"
    env = _env(keras_home, FEATURIZE_RAY_TRACE=str(trace), FEATURIZE_RAY_TRACE_SLEEP="0.4")
    proc = subprocess.Popen(_cli(images, "--engine", "ray", "--out", out, "--quiet",
                                 *TINY_CLI, *SMALL_CLI),
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait(lambda: len(_trace_lines(trace, "embed")) >= 1, proc)
    (first,) = {int(pid) for (pid,) in _trace_lines(trace, "start")}
    os.kill(first, signal.SIGKILL)  # the embedding actor, mid-run
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert len(_trace_lines(trace, "start")) >= 2  # Ray started a new actor
    _assert_same_cache(out, reference)
    assert "done:" in stdout


GLOBALS_SCRIPT = """
import faulthandler, signal, sys
from featurize.run import featurize
def state():
    return ({s: signal.getsignal(s) for s in signal.Signals
             if s not in (signal.SIGKILL, signal.SIGSTOP)}, faulthandler.is_enabled())
before = state()
summary = featurize(sys.argv[1], out=sys.argv[2], engine="ray", backbone="vggface-vgg16",
                    weights="none", input_size=32, progress=False)
import ray
print(summary.embedded, state() == before, ray.is_initialized())
"""


def test_a_library_call_that_starts_ray_leaves_the_process_as_found(keras_home, tmp_path):
    folder = make_folder(tmp_path / "imgs", per_class=1)
    run = run_python(GLOBALS_SCRIPT, folder, tmp_path / "c.h5", env=_env(keras_home),
                     cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["3", "True", "False"]  # signals, faulthandler; Ray shut down


# --- fsspec manifests on a local S3 server ------------------------------------------------------

@pytest.fixture(scope="module")
def s3(images):
    """moto's S3 server on 127.0.0.1 with the test images uploaded under s3://faces/."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3
    client = boto3.client("s3")
    client.create_bucket(Bucket="faces")
    for path in sorted(images.rglob("*.jpg")):
        client.upload_file(str(path), "faces", path.relative_to(images).as_posix())
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def _manifest(images: Path, path: Path, url: bool) -> Path:
    lines = []
    for p in sorted(images.rglob("*.jpg")):
        rel = p.relative_to(images).as_posix()
        lines.append(f"{'s3://faces/' + rel if url else p}\t{rel.split('/')[0]}")
    lines.append("s3://faces/nobody/missing.jpg\tnobody" if url else f"{images}/nobody.jpg\tnobody")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_s3_manifest_on_ray_and_locally_equals_the_same_images_from_disk(keras_home, images, s3,
                                                                         tmp_path):
    disk = featurize(_manifest(images, tmp_path / "disk.txt", url=False),
                     out=tmp_path / "disk.h5", **SMALL, **TINY)
    manifest = _manifest(images, tmp_path / "s3.txt", url=True)
    run = run_cli("featurize", manifest, "--engine", "ray", "--out", tmp_path / "ray.h5",
                  "--quiet", *TINY_CLI, *SMALL_CLI, env=_env(keras_home, **s3), cwd=tmp_path,
                  timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    local = featurize(manifest, out=tmp_path / "local.h5", **SMALL, **TINY)
    assert local.embedded == 30 and disk.embedded == 30
    want = cache.read(tmp_path / "disk.h5")
    by_name = {"/".join(Path(p).parts[-2:]): row for row, p in enumerate(want.paths)}
    for made in (cache.read(tmp_path / "ray.h5"), cache.read(tmp_path / "local.h5")):
        assert all(p.startswith("s3://faces/") for p in made.paths)  # keys: the URLs
        rows = [by_name[p[len("s3://faces/"):]] for p in made.paths]
        assert len(rows) == 30 and made.classes == want.classes
        np.testing.assert_allclose(made.embeddings, want.embeddings[rows], rtol=same(1e-5),
                                   atol=same(1e-6))
        assert list(made.labels) == list(want.labels[rows])
        assert {k.removeprefix("s3://faces/"): r for k, r in made.failed.items()} == {
            **BAD, "nobody/missing.jpg": "missing"}
    check = call_cli("featurize", "verify", tmp_path / "local.h5", "--sample", "3", cwd=tmp_path)
    assert check.returncode == 0 and "30 rows" in check.stdout, check.stdout + check.stderr
    assert "max abs difference" in check.stdout and "missing" not in check.stdout


# --- one-line errors ----------------------------------------------------------------------------

def _without(module: str, *args, keras_home, cwd):
    """`python -m featurize ARGS` in a fresh process where `import MODULE` fails."""
    code = (f"import runpy, sys; sys.modules[{module!r}] = None; "
            "sys.argv = ['featurize'] + sys.argv[1:]; "
            "runpy.run_module('featurize', run_name='__main__')")
    return run_python(code, *args, env=_env(keras_home), cwd=cwd, timeout=120)


def test_missing_ray_is_one_line_naming_the_extra(keras_home, tmp_path):
    folder = make_folder(tmp_path / "imgs", per_class=1)
    run = _without("ray", folder, "--engine", "ray", "--out", tmp_path / "c.h5", *TINY_CLI,
                   keras_home=keras_home, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert "pip install 'featurize-embeddings[ray]'" in run.stderr
    assert not (tmp_path / "c.h5").exists()


def test_missing_s3fs_is_one_line_naming_the_package(keras_home, tmp_path):
    manifest = tmp_path / "list.txt"
    manifest.write_text("s3://bucket/a.jpg\talice\n")
    run = _without("s3fs", manifest, "--out", tmp_path / "c.h5", *TINY_CLI,
                   keras_home=keras_home, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "pip install s3fs" in run.stderr


# --- unreachable clusters, SIGTERM, work shards, progress and summary (issue items 6, 22.7) -----

def test_unresolvable_address_is_one_line_at_once(keras_home, tmp_path):
    """ray.init retried a host that does not resolve for minutes (and ignored SIGTERM)."""
    from conftest import one_line_error
    folder = make_folder(tmp_path / "imgs", per_class=1)
    run = run_cli("featurize", folder, "--engine", "ray", "--address", "nowhere:1", "--out",
                  tmp_path / "c.h5", "--quiet", *TINY_CLI, env=_env(keras_home), cwd=tmp_path,
                  timeout=60)
    one_line_error(run.returncode, run.stderr, "--address nowhere:1", "host nowhere not found")
    assert not (tmp_path / "c.h5").exists()


def test_refused_port_is_one_line(keras_home, tmp_path):
    import socket

    from conftest import one_line_error
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    folder = make_folder(tmp_path / "imgs", per_class=1)
    run = run_cli("featurize", folder, "--engine", "ray", "--address", address, "--out",
                  tmp_path / "c.h5", "--quiet", *TINY_CLI, env=_env(keras_home), cwd=tmp_path,
                  timeout=60)
    one_line_error(run.returncode, run.stderr, f"--address {address}", "no answer")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigterm_stops_a_ray_run_as_ctrl_c_does(keras_home, images, reference, tmp_path, sig,
                                                ray_session):
    out, trace = tmp_path / "ray.h5", tmp_path / "trace"
    env = _env(keras_home, FEATURIZE_RAY_TRACE=str(trace), FEATURIZE_RAY_TRACE_SLEEP="1")
    args = [images, "--engine", "ray", "--out", out, "--quiet", *TINY_CLI, *SMALL_CLI]
    proc = subprocess.Popen(_cli(*args), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait(lambda: len(_trace_lines(trace, "result")) >= 1, proc)  # the driver counted one
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]  # as after Ctrl-C: progress committed
    assert "interrupted, progress saved; run again to resume" in stdout
    assert f"cache: {out}" in stdout
    check = call_cli("featurize", "verify", out, "--sample", "2", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    committed = cache.read(out, strict=False)
    assert 1 <= len(committed.paths) < 30  # what was done before the signal is kept
    rerun = call_cli("featurize", *args, cwd=tmp_path)  # on this process's Ray
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    _assert_same_cache(out, reference)


def test_work_shards_give_every_actor_work():
    from featurize.data.images import Item
    from featurize.engines.ray_data import MAX_SHARD_ROWS, SHARDS_PER_ACTOR, shard_rows, work_shards
    from featurize.jobs.run import RunOptions
    from featurize.models.config import make_settings
    run = RunOptions()  # --checkpoint-rows 1024: shards of at most 256 images
    assert shard_rows(run) == MAX_SHARD_ROWS
    settings, _ = make_settings("vggface-vgg16", "none", input_size=32)
    todo = [Item(f"p/{i:04d}.jpg", f"p/{i:04d}.jpg", "p", 1, i) for i in range(274)]
    for actors in (1, 2, 8):
        sizes = [len(s["items"]) for s in work_shards(todo, settings,
                                                      shard_rows(run, len(todo), actors))]
        assert sum(sizes) == 274 and len(sizes) > actors  # every actor has work: no 256 + 18
        assert max(sizes) == -(-274 // (actors * SHARDS_PER_ACTOR))  # ~SHARDS_PER_ACTOR each
    assert shard_rows(RunOptions(flush_rows=6), 274, 2) == 6  # --checkpoint-rows still bounds


def test_actors_report_progress_per_model_batch():
    """The driver's bar follows each actor's batches (it moved per shard of up to 256)."""
    from featurize.engines.ray_data import ShardEmbedder

    class Reports:
        def __init__(self):
            self.seen = []
            self.report = self  # the handle's method, called as .remote(name, rows)

        def remote(self, name, rows):
            self.seen.append((name, rows))

    class Model:
        dim = 3

        def embed(self, batch):
            return np.ones((len(batch), 3), np.float32)

    actor = ShardEmbedder.__new__(ShardEmbedder)
    actor.extractor, actor.batch_size = Model(), 4
    actor.progress, actor.shard = Reports(), "work-x"
    out, _ = actor._embed_pixels(np.zeros((10, 2, 2, 3), np.uint8), [None] * 10)
    assert out.shape == (10, 3)
    assert actor.progress.seen == [("work-x", 4), ("work-x", 8), ("work-x", 10)]


def test_sigterm_while_ray_starts_stops_the_run_as_ctrl_c_does(keras_home, tmp_path):
    """ray.init puts its own SIGTERM handler in place (sys.exit(15): the run ended with code 15
    and no word); the command line's is run instead: the run stops as after Ctrl-C."""
    folder = make_folder(tmp_path / "imgs", per_class=2)
    out, trace = tmp_path / "c.h5", tmp_path / "trace"
    proc = subprocess.Popen(_cli(folder, "--engine", "ray", "--out", out, "--quiet",
                                 *TINY_CLI), env=_env(keras_home, FEATURIZE_RAY_TRACE=str(trace)),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait(lambda: len(_trace_lines(trace, "init")) >= 1, proc)
    time.sleep(0.5)  # into ray.init (it takes seconds), where Ray's handler is in place
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (stdout, stderr[-2000:])
    assert "interrupted, progress saved; run again to resume" in stdout
    assert not _trace_lines(trace, "start")  # stopped before any actor started
