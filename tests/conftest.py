import os
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# The suite runs on Keras (the source of truth) wherever ONNX Runtime or OpenVINO is
# installed; tests/test_runtimes.py asks for the others, and for the default, explicitly.
os.environ.setdefault("FEATURIZE_RUNTIME", "keras")

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
LFW = REPO.parent / "shared" / "datasets" / "lfw"
LFW_IMAGES = LFW / "lfw-deepfunneled"


# --- command lines: in a fresh process, or called in this one -------------------------------------

class Ran(NamedTuple):
    """What a command line did: exit code and what it printed (a CompletedProcess's names)."""
    returncode: int
    stdout: str
    stderr: str


def cli_env(*, path=(), drop=(), **extra) -> dict:
    """The environment of a fresh process: this test's (its KERAS_HOME too) without the names in
    `drop`, `path` then the repository first on PYTHONPATH, and `extra` (str() of each)."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    entries = [*map(str, path), str(REPO), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    env["PYTHONPATH"] = os.pathsep.join(e for e in entries if e)
    return {**env, **{k: str(v) for k, v in extra.items()}}


def cli_command(module: str, *args) -> list[str]:
    """`python -m MODULE ARGS` as an argv list (for subprocess.Popen)."""
    return [sys.executable, "-m", module, *map(str, args)]


def run_cli(module: str, *args, cwd=None, env=None, timeout=600) -> Ran:
    """`python -m MODULE ARGS` in a fresh process (env: cli_env() unless given)."""
    return _run(cli_command(module, *args), cwd, env, timeout)


def run_python(code, *args, cwd=None, env=None, timeout=600) -> Ran:
    """A fresh Python running `code` (`python -c`), or the script file `code` names (a Path)."""
    program = [str(code)] if isinstance(code, Path) else ["-c", code]
    return _run([sys.executable, *program, *map(str, args)], cwd, env, timeout)


def _run(argv, cwd, env, timeout) -> Ran:
    proc = subprocess.run(argv, cwd=cwd, env=cli_env() if env is None else env,
                          capture_output=True, text=True, timeout=timeout)
    return Ran(proc.returncode, proc.stdout, proc.stderr)


@contextmanager
def working_directory(path):
    """Run a block in `path` (None: where we are)."""
    before = os.getcwd()
    if path is not None:
        os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def call_cli(module: str, *args, cwd=None) -> Ran:
    """A command line called in this process, for tests whose point is not a fresh process
    (a mistake's message and exit code, a computation): `main(argv)` of featurize, classify or
    featurize.datasets, run in `cwd`, its stdout and stderr captured."""
    import io
    from contextlib import redirect_stderr, redirect_stdout
    if module == "featurize":
        from featurize.cli import main
    elif module == "classify":
        from classify.cli import main
    elif module == "featurize.datasets":
        from featurize.datasets import main
    else:
        raise ValueError(f"no command line {module}")
    out, err = io.StringIO(), io.StringIO()
    with working_directory(cwd), redirect_stdout(out), redirect_stderr(err), \
            warnings.catch_warnings():
        _python_default_warning_filters()  # not pytest's: the warnings a user's run shows
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # --help
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    return Ran(code, out.getvalue(), err.getvalue())


def _python_default_warning_filters():
    """The filters Python starts with (no -W, no PYTHONWARNINGS)."""
    warnings.resetwarnings()
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__",
                            append=True)
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                     ResourceWarning):
        warnings.filterwarnings("ignore", category=category, append=True)


def write_image(path: Path, seed: int, size=(40, 40), fmt=None, mode="RGB"):
    """A random but structured image (a class-dependent colour plus noise)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


def make_folder(root: Path, classes=("alice", "bob", "carol"), per_class=4, ext=".jpg"):
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"{name}_{i:04d}{ext}", seed=100 * c + i)
    return root


@pytest.fixture
def image_folder(tmp_path):
    return make_folder(tmp_path / "faces")


@pytest.fixture(autouse=True)
def _isolated_keras_home(tmp_path, monkeypatch):
    """Weights are never looked up or downloaded in the user's real ~/.keras."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))


def same(rtol=1e-4) -> float:
    """Relative tolerance for "the same computation": `rtol` in float32 on a CPU; GPUs run
    float32 convolutions on TF32 matrix units with batch-size-dependent kernels (measured on
    the lent H100 with JAX: differences up to ~1e-2 relative on small values)."""
    from featurize.models.keras import accelerator
    return 1e-2 if accelerator() else rtol


def lfw_available() -> bool:
    return LFW_IMAGES.is_dir()


def synthetic_cache(path: Path, X, y, classes, paths=None, backbone="vggface-vgg16",
                    weights="random-seed0", weights_file="random"):
    """A cache file with given embeddings, written through featurize's own cache module."""
    from featurize import cache
    from featurize.data.images import Dataset, Item
    from featurize.settings import EmbeddingSettings

    settings = EmbeddingSettings(backbone=backbone, weights=weights, weights_file=weights_file,
                                 layer="", pooling="avg", input_size=32, crop=0.0, flip=False,
                                 preprocessing="vggface1", precision="float32", jitter=0)
    if paths is None:
        paths = [f"{classes[label]}/{classes[label]}_{i:04d}.jpg" if label >= 0 else f"x_{i:04d}.jpg"
                 for i, label in enumerate(y)]
    items = [Item(p, p, classes[label] if label >= 0 else None, 1, 1) for p, label in zip(paths, y)]
    order = sorted(range(len(items)), key=lambda i: items[i].key)
    journal = cache.Journal(path, settings)
    journal.add([items[i] for i in order], np.asarray(X, np.float32)[order])
    journal.flush()
    dataset = Dataset(path.parent, "synthetic", sorted(items, key=lambda it: it.key),
                      sorted({c for c, label in zip(classes, range(len(classes)))
                              if label in set(int(v) for v in y)}))
    cache.commit(path, settings, dataset, {"keras_version": "test", "backend": "none"})
    return path


def blobs(n_classes=5, per_class=30, dim=32, spread=0.3, seed=0):
    """Well separated Gaussian classes."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (n_classes, dim))
    X = np.concatenate([centres[c] + spread * rng.normal(0, 1, (per_class, dim))
                        for c in range(n_classes)])
    y = np.repeat(np.arange(n_classes), per_class)
    return X, y, [f"person{c}" for c in range(n_classes)]


@pytest.fixture
def http_server(tmp_path):
    """Serves tmp_path/served on 127.0.0.1; yields (folder, base_url, stop)."""
    import http.server
    import threading
    from functools import partial

    served = tmp_path / "served"
    served.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stopped = []

    def stop():
        if not stopped:
            server.shutdown()
            server.server_close()
            stopped.append(True)
    yield served, f"http://127.0.0.1:{server.server_address[1]}/", stop
    stop()


def stored_in(path: Path, dataset: str) -> Path:
    """The file that stores `dataset` of a cache: the index itself, or the shard its virtual
    dataset reads (caches of one shard)."""
    import h5py
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        if not ds.is_virtual:
            return Path(path)
        names = {m.file_name for m in ds.virtual_sources()}
    assert len(names) == 1, f"{path} spreads {dataset} over {len(names)} shards"
    return Path(path).parent / names.pop()


def as_schema1(path: Path) -> Path:
    """Rewrite a cache in place as featurize before the shards wrote it (schema 1: one file with
    every row inside, no index), for the tests of reading and migrating old caches."""
    import shutil

    import h5py

    from featurize import cache
    c = cache.read(path, strict=False)
    s = h5py.string_dtype("utf-8")
    with h5py.File(path, "r") as f:
        failed = {k: f["failed"][k][()] for k in ("paths", "reasons", "sizes", "mtimes")}
        digests = f["digests"][()] if len(c.paths) else []
        attrs = dict(f.attrs)
    tmp = path.with_name(path.name + ".old")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("embeddings", data=c.embeddings, chunks=True, fletcher32=True,
                         maxshape=(None, c.embeddings.shape[1]))
        f.create_dataset("paths", data=c.paths, dtype=s)
        for name, data in (("labels", c.labels.astype(np.int32)), ("sizes", c.sizes),
                           ("mtimes", c.mtimes)):
            f.create_dataset(name, data=data, chunks=True, fletcher32=True, maxshape=(None,))
        f.create_dataset("classes", data=c.classes, dtype=s)
        f.create_dataset("digests", data=digests, dtype=s)
        for k, v in failed.items():
            f.create_dataset(f"failed/{k}", data=v, **({"dtype": s} if k in ("paths", "reasons")
                                                       else {"chunks": True, "maxshape": (None,)}))
        f.attrs.update({**attrs, "schema_version": 1})
    tmp.replace(path)
    shutil.rmtree(cache.shards_dir(path))
    return path


def shard_files(path: Path) -> tuple[set, set]:
    """(the shard files the index lists, the files in its shards folder), as paths relative to
    the index's folder."""
    import h5py

    from featurize import cache
    with h5py.File(path, "r") as f:
        listed = {n.decode() for n in f["shards/names"][()]}
    folder = cache.shards_dir(path)
    present = {f"{folder.name}/{p.name}" for p in folder.iterdir()} if folder.is_dir() else set()
    return listed, present


def copy_cache(path: Path, target: Path) -> Path:
    """Copy a cache: its index, as `target`, and the shard folders it lists, beside it."""
    import shutil
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, target)
    listed, _ = shard_files(path)
    for folder in {name.split("/")[0] for name in listed}:
        if not (target.parent / folder).exists():
            shutil.copytree(Path(path).parent / folder, target.parent / folder)
    return target


def one_line_error(code, err, *needles):
    """A user mistake as the CLIs report it: exit 2, one line on stderr naming `needles`."""
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def unparseable_as(kind):
    """A filter keeping the text that `kind` (int or float) cannot parse."""
    def unparseable(text: str) -> bool:
        try:
            kind(text)
            return False
        except ValueError:
            return True
    return unparseable
