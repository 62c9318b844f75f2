"""Issue #11, worker processes: a user's script without the main guard (item 4), no worker
or shared memory outlives a SIGKILLed run (item 6), and no model call for a batch in which
every image failed (item 18)."""

import ast
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import call_cli, cli_command, cli_env, make_folder, run_python, write_image
from featurize import cache
from featurize.data.images import Item, ModelInput
from featurize.engines import pipeline

TINY_ARGS = ["--backbone", "vggface-vgg16", "--weights", "none", "--input-size", "32", "--quiet"]
GUARD = 'if __name__ == "__main__":'
TF_LOG = re.compile(r"WARNING: All log messages before absl|[IWE]\d{4} ")  # TensorFlow's C++ log
linux_shm = pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs Linux /dev/shm")


def env(**extra):
    return cli_env(TF_CPP_MIN_LOG_LEVEL="3", **extra)


# --- item 4: a script that calls featurize() at its top level ------------------------------------

SCRIPT = """
import sys
from featurize.errors import UserError
from featurize.run import featurize

{prefix}try:
{indent}    s = featurize({folder!r}, backbone="vggface-vgg16", weights="none", input_size=32,
{indent}                  progress=False, workers=4, cache_dir={cache_dir!r})
{indent}except UserError as e:
{indent}    if __name__ != "__main__":  # a worker re-running the script: let it be seen
{indent}        raise
{indent}    sys.exit(f"error: {{e}}")
{indent}print("embedded", s.embedded)
"""


def our_lines(stderr: str) -> list:
    return [line for line in stderr.strip().splitlines() if not TF_LOG.match(line)]


def run_script(tmp_path, prefix=""):
    folder = make_folder(tmp_path / "imgs", per_class=12)  # 36 images: more than one task
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT.format(prefix=prefix, indent="    " if prefix else "",
                                    folder=str(folder), cache_dir=str(tmp_path / "cache")))
    return run_python(script, env=env(), cwd=tmp_path, timeout=300), script


def test_a_script_without_the_main_guard_works_in_threads_and_says_how_to_use_processes(tmp_path):
    proc, script = run_script(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "embedded 36" in proc.stdout and proc.stdout.count("embedded") == 1  # ran once
    assert "Traceback" not in proc.stderr and "being written by another" not in proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warnings) == 1, proc.stderr
    assert f"{script}:7: RuntimeWarning" in warnings[0] and GUARD in warnings[0]
    path = next((tmp_path / "cache").glob("*.h5"))
    assert len(cache.read(path).paths) == 36


def test_an_unguarded_call_the_check_cannot_see_stops_workers_before_the_lock(tmp_path):
    # A guard that tests __name__ but is no guard: workers import the script and call
    # featurize() again; they must leave quietly, and the parent explain it in one line.
    proc, script = run_script(tmp_path, prefix='if __name__ != "some other name":\n    ')
    lines = our_lines(proc.stderr)
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: a decoding worker process ended abruptly")
    assert str(script) in lines[0] and GUARD in lines[0]
    assert "Traceback" not in proc.stderr and "being written by another" not in proc.stderr
    assert not list((tmp_path / "cache").glob("*.lock"))


@pytest.mark.parametrize("body, flagged_line", [
    (f"{GUARD}\n    report()\n", None),
    (f"def main():\n    report()\n\n{GUARD}\n    main()\n", None),
    ("def main():\n    report()\n\nmain()\n", 6),
    ("x = 1\nreport()\n", 4),
])
def test_only_calls_workers_would_repeat_give_up_worker_processes(tmp_path, body, flagged_line):
    script = tmp_path / "user_script.py"
    script.write_text("from featurize.pipeline import _why_workers_would_fail\n"
                      "report = lambda: print(repr(_why_workers_would_fail()))\n" + body)
    proc = run_python(script, env=env(), cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    why = ast.literal_eval(proc.stdout.strip())
    assert why is None if flagged_line is None else why[1:] == (str(script), flagged_line)


# --- item 6: nothing outlives a SIGKILLed run ---------------------------------------------------

def marked_processes(marker: str) -> list[int]:
    """Processes (of any parentage) whose environment carries `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if f"FEATURIZE_TEST_MARKER={marker}".encode() in environ and state != "Z":
                    found.append(int(entry.name))  # a zombie (Z) has already exited
            except OSError:  # gone meanwhile, or not ours
                pass
    return found


def segments_of(pid: int) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"featurize-{pid}-*"))


def wait_until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return condition()


@linux_shm
def test_sigkill_with_worker_processes_leaves_no_process_and_no_shared_memory(tmp_path):
    folder = make_folder(tmp_path / "imgs", classes=("a", "b", "c", "d"), per_class=40)
    marker = uuid.uuid4().hex
    args = [folder, *TINY_ARGS, "--cache-dir", tmp_path / "c"]
    slow = ["--workers", "4", "--batch-size", "2", "--checkpoint-rows", "2"]
    proc = subprocess.Popen(cli_command("featurize", *args, *slow),
                            env=env(FEATURIZE_TEST_MARKER=marker), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: list((tmp_path / "c").glob("*.shards/part-*.h5"))
                          or proc.poll() is not None, 120)
        if proc.poll() is not None:  # a GPU embeds all 160 before the first check
            pytest.skip("the run finished before it could be killed (fast machine)")
        assert segments_of(proc.pid)  # batch buffers carry their owner's PID
        assert len(marked_processes(marker)) >= 6  # featurize, forkserver, 4 workers (+ tracker)
        proc.kill()
        proc.wait()
        # Workers see their parent die and leave; then the forkserver and resource tracker.
        assert wait_until(lambda: not marked_processes(marker)), marked_processes(marker)
    finally:
        for pid in marked_processes(marker):  # only if the test failed; the resource tracker
            try:  # ignores SIGTERM, and cleans up once the rest is gone
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    # A kill of the whole process group leaves segments no tracker removes: the next run does.
    (Path("/dev/shm") / f"featurize-{proc.pid}-99").write_bytes(b"\0" * 16)
    done = call_cli("featurize", *args, cwd=tmp_path)  # the default workers
    assert done.returncode == 0, done.stderr
    assert segments_of(proc.pid) == []
    assert len(cache.read(next((tmp_path / "c").glob("*.h5"))).paths) == 160


@linux_shm
def test_segments_are_removed_only_when_their_owner_is_dead(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    shm = Path("/dev/shm")
    mine, theirs = shm / f"featurize-{os.getpid()}-777", shm / f"featurize-{dead.pid}-777"
    for path in (mine, theirs):
        path.write_bytes(b"\0")
    try:
        assert theirs.name in pipeline.remove_dead_segments()
        assert mine.exists() and not theirs.exists()
    finally:
        mine.unlink(missing_ok=True)
        theirs.unlink(missing_ok=True)


# --- item 18: no model call for a batch of failures ---------------------------------------------

class CountingExtractor:
    """A tiny extractor (arrays, or objects like dlib's) that counts its model calls."""

    def __init__(self, kind="arrays"):
        self.prepare = ModelInput(8)  # the real decoder; picklable for worker processes
        self.input_shape = None if kind == "objects" else self.prepare.shape
        self.overlap_upload = kind == "arrays, overlapped upload"  # as on an accelerator
        self.calls = 0

    @staticmethod
    def to_device(batch):
        return batch.copy()

    def embed(self, batch):
        self.calls += 1
        return np.asarray(batch, np.float32).reshape(len(batch), -1)[:, :4]


def unreadable_folder(root: Path, n: int, good=()) -> list:
    """`n` files named .jpg that are empty or text, and real images named `good`."""
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"bad_{i:04d}.jpg").write_bytes(b"" if i % 2 else b"not an image at all")
    for seed, name in enumerate(good):
        write_image(root / name, seed=seed)
    return [Item(p.name, str(p), None, 0, 0) for p in sorted(root.glob("*.jpg"))]


@pytest.mark.parametrize("workers", [2, 4])  # threads; processes and shared memory
@pytest.mark.parametrize("kind", ["arrays", "arrays, overlapped upload", "objects"])
def test_batches_of_failed_images_never_reach_the_model(tmp_path, workers, kind):
    items = unreadable_folder(tmp_path / "bad", 300, good=["bad_0100_ok.jpg"])
    extractor = CountingExtractor(kind)
    out = list(pipeline.batches(items, extractor, batch_size=32, workers=workers))
    assert sum(len(b.failed) for b in out) == 300
    assert [b.items[0].key for b in out if b.items] == ["bad_0100_ok.jpg"]
    assert extractor.calls == 1  # only the mixed batch
    assert all(b.embeddings.shape[0] == len(b.items) for b in out)


def test_featurize_calls_the_model_only_for_batches_with_a_readable_image(tmp_path,
                                                                          monkeypatch):
    import featurize.jobs.run as run_module
    extractor = CountingExtractor()
    monkeypatch.setattr(run_module, "build_extractor", lambda s, w, *args: extractor)
    folder = tmp_path / "data"
    unreadable_folder(folder / "a", 150)
    make_folder(folder, classes=("b",), per_class=1)
    s = run_module.featurize(folder, backbone="vggface-vgg16", weights="none", input_size=32,
                             progress=False, batch_size=16, cache_dir=tmp_path / "c")
    assert s.embedded == 1 and s.failed_total == 150 and extractor.calls == 1
