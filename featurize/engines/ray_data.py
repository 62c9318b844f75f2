"""`--engine ray`: featurize on Ray Data, on one machine or a cluster.

The shape of clip-retrieval's inference: a reader, a mapper, a writer and a runner.

- reader (driver): the images still to embed, already sorted by key, are cut into work shards
  of `shard_rows` images; each gets a stable name, `work-<hash>`, from the settings and its
  images' keys and fingerprints, so a re-run after a crash gives the same shards again. A
  shard whose file already exists is not redone.
- mapper: Ray Data CPU tasks decode each shard with the extractor's own `prepare` (exactly the
  local path's decoding, so the embeddings are the same); an actor pool of `ShardEmbedder`
  (one per GPU, else CPU actors) builds the extractor once and embeds. Extractors that work
  per image (dlib) or whose `prepare` differs from the settings' decode in the actor.
- writer: the actor that embedded a shard writes it, failures included, as one cache shard
  (`cache.write_shard`: a temporary file renamed into place when complete).
- runner (driver): joins `--address` or starts a local Ray, iterates the results (progress,
  counts) and returns; the caller commits the cache index, which folds the shards in.

A killed driver loses nothing written: its complete shards count as done on the next run. A
killed actor (OOM, a lost node) is restarted by Ray and its shard in flight retried: Ray Data
gives actor pools `max_restarts=-1` and `max_task_retries=-1` unless told otherwise (passing
them ourselves is deprecated since Ray 2.5x), and tasks `max_retries` likewise. A shard that
kills its actor every time (a crashing decoder) is retried until the run is stopped.

Test hook: with FEATURIZE_RAY_TRACE=FILE in the environment, each actor appends
`start <pid>` when its model is built and `embed <shard> <rows> <pid>` after each model pass
over a shard (before it is written), and the driver `init` before it starts Ray and
`result <shard> <rows>` when it has counted a shard, so tests can count model calls and find
an actor to kill;
FEATURIZE_RAY_TRACE_SLEEP=SECONDS then also makes it wait that long after writing each shard,
so that a test can kill a run in the middle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import socket
import time
from pathlib import Path

import numpy as np

from featurize import cache
from featurize.data.images import Item, is_url
from featurize.engines.pipeline import (
    Target,
    info_columns,
    prepare_with_info,
    progress_bar,
    provenance,
)
from featurize.errors import UserError
from featurize.models.inputs import model_input
from featurize.models.registry import spec_of

MAX_SHARD_ROWS = 256  # images per work shard: what a killed actor loses at most
SHARDS_PER_ACTOR = 4  # at least this many shards per actor, so that all finish together
CONNECT_SECONDS = 10  # --address: how long the head node may take to accept a connection
TRACE_ENV = "FEATURIZE_RAY_TRACE"
INSTALL = "pip install 'featurize-embeddings[ray]'"


def embed_on_ray(todo: list[Item], target: Target, summary, run) -> dict:
    """Embed `todo` on Ray Data into cache shards beside `target.path`; count into `summary`.
    Returns {"provenance": ..., "dim": ...} as the actors report them (the caller commits)."""
    cache_path, settings, weights = target.astuple()
    ray = import_ray()
    made = {"provenance": provenance(), "dim": None}  # what a local run without work has
    with _quiet_ray(), _ray_session(ray, run):
        actors = _actor_count(ray, settings, run.gpus_per_worker or 0)
        shards = work_shards(todo, settings, shard_rows(run, len(todo), actors))
        done = cache.shards_dir(cache_path)
        pending = [s for s in shards if not (done / f"{s['name']}.h5").exists()]
        summary.reused += len(todo) - sum(len(s["items"]) for s in pending)
        if not pending:
            return made
        progress = ray.remote(num_cpus=0)(_Progress).remote()
        dataset = _pipeline(ray, pending, (cache_path, settings, weights, progress),
                            (run, min(len(pending), actors)))
        bar = progress_bar(sum(len(s["items"]) for s in pending), run.progress)
        with _polled(lambda: ray.get(progress.total.remote(), timeout=5), bar):
            for row in _results(dataset):
                _count(row, summary)
                _trace(f"result {row['name']} {row['rows']}")
                made = {"provenance": json.loads(row["provenance"]), "dim": int(row["dim"])}
    return made


class _Progress:
    """A Ray actor: the images each work shard's actor has done so far (its latest attempt),
    so that the driver's bar moves per model batch, not per shard."""

    def __init__(self):
        self.rows = {}

    def report(self, name: str, rows: int):
        self.rows[name] = rows

    def total(self) -> int:
        return sum(self.rows.values())


@contextlib.contextmanager
def _polled(read, bar, every: float = 0.3):
    """`bar` set to `read()` by a thread every `every` seconds while the block runs, and once
    more at its end (the bar is then closed)."""
    import threading
    stop = threading.Event()

    def poll():
        while True:
            try:
                bar.n = max(bar.n, min(bar.total, int(read())))
                bar.refresh()
            except Exception:  # Ray shutting down under us: the bar is cosmetic
                return
            if stop.wait(every):
                return
    thread = threading.Thread(target=poll, name="featurize-ray-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError(f"--engine ray needs Ray Data, which is not installed: "
                        f"{INSTALL}.") from None
    return ray


def shard_rows(run, images: int | None = None, actors: int = 1) -> int:
    """Images per work shard: --checkpoint-rows (the most a kill may lose), at most 256, and
    small enough that each of the `actors` gets SHARDS_PER_ACTOR shards of `images` (274
    images in one 256-image shard and one of 18 left one of two actors idle)."""
    rows = max(1, min(run.flush_rows, MAX_SHARD_ROWS))
    if images:
        rows = min(rows, max(1, math.ceil(images / (max(1, actors) * SHARDS_PER_ACTOR))))
    return rows


# --- reader ------------------------------------------------------------------------------------

def work_shards(todo: list[Item], settings, rows: int) -> list[dict]:
    """`todo` in groups of `rows`, each named after its settings, keys and fingerprints."""
    shards = []
    for start in range(0, len(todo), rows):
        items = todo[start:start + rows]
        h = hashlib.sha256(settings.key().encode())
        for it in items:
            h.update(json.dumps([it.key, it.size, it.mtime_ns]).encode())
        shards.append({"name": f"work-{h.hexdigest()[:20]}", "items": items})
    return shards


def _row(shard: dict) -> dict:
    """What travels to the workers; paths absolute, since workers may run elsewhere."""
    items = [[it.key, it.path if is_url(it.path) else os.path.abspath(it.path), it.size,
              it.mtime_ns, it.digest] for it in shard["items"]]
    return {"name": shard["name"], "work": json.dumps(items)}


# --- mapper and writer -------------------------------------------------------------------------

def _cpu_prepare(settings):
    """What CPU tasks decode images with: the settings' model input for a family whose
    extractor works on batches of pixels; None (the actor decodes) for per-image work."""
    family = spec_of(settings).family
    return None if family.per_image or not family.thread_safe else model_input(settings)


def decode_shard(row: dict, prepare) -> dict:
    """A CPU task: the shard's pixels, decoded as the local pipeline decodes them (a failed
    image gives zeros and its reason)."""
    work = json.loads(row["work"])
    pixels = np.zeros((len(work), *prepare.shape), np.uint8)
    reasons, infos = [], []
    for i, (_, path, *_rest) in enumerate(work):
        (array, info), reason = prepare_with_info(prepare, path)
        if reason is None:
            pixels[i] = array
        reasons.append(reason)
        infos.append(info)
    return {**row, "pixels": pixels, "reasons": json.dumps(reasons), "infos": json.dumps(infos)}


class ShardEmbedder:
    """An actor of the pool: builds the extractor once, embeds whole shards and writes each
    one into the cache as it is done."""

    def __init__(self, settings, weights, cache_path, options, cpu_prepare):
        # A user's mistake (a weight file that does not fit, a missing extra on this node) is
        # kept for the first shard's answer: raised here, Ray would print its traceback.
        self.mistake, self.progress, self.shard = "", options[2], ""
        try:
            self._build(settings, weights, options, cpu_prepare)
        except UserError as e:
            self.mistake = str(e)
        self.settings, self.cache_path = settings, cache_path
        _trace(f"start {os.getpid()}")

    def _build(self, settings, weights, options, cpu_prepare):
        """The extractor a local run would build on this node (--runtime: Keras, or an
        exported copy of the model on ONNX Runtime / OpenVINO where that is faster)."""
        from featurize.models.keras import default_batch_size
        from featurize.runtimes import build_extractor
        batch_size, runtime, self.progress = options
        self.extractor = build_extractor(settings, weights, runtime)
        self.batch_size = batch_size or default_batch_size()
        self.pixels_usable = cpu_prepare is not None and self.extractor.prepare == cpu_prepare
        prov = getattr(self.extractor, "provenance", dict)()
        self.provenance = json.dumps({**provenance(), **prov})

    def __call__(self, row: dict) -> dict:
        if not self.mistake:
            try:
                return self._shard(row)
            except UserError as e:  # cannot write the shard (disk full, no permission)
                self.mistake = str(e)
        return {"name": row["name"], "rows": 0, "embedded": 0, "failed": "[]",
                "pid": os.getpid(), "provenance": "{}", "dim": 0, "mistake": self.mistake,
                "row_info": "{}"}

    def _shard(self, row: dict) -> dict:
        work = json.loads(row["work"])
        self.shard = row["name"]
        if self.pixels_usable and "pixels" in row:
            reasons, infos = json.loads(row["reasons"]), json.loads(row["infos"])
            embeddings, _ = self._embed_pixels(np.asarray(row["pixels"]), reasons)
        else:
            embeddings, reasons, infos = self._embed_paths([w[1] for w in work])
        _trace(f"embed {row['name']} {len(work)} {os.getpid()}")
        ok = [i for i, r in enumerate(reasons) if r is None]
        failed = [(work[i][0], r, (work[i][2], work[i][3])) for i, r in enumerate(reasons)
                  if r is not None]
        rows = cache.ShardRows(keys=[work[i][0] for i in ok],
                               fingerprints=[(work[i][2], work[i][3]) for i in ok],
                               digests=[work[i][4] for i in ok],
                               embeddings=embeddings[ok].astype(np.float32, copy=False),
                               failed=failed,
                               info=info_columns(self.extractor.prepare,
                                                 [infos[i] for i in ok]) or {})
        cache.write_shard(self.cache_path, row["name"], self.settings, rows)
        self._report(len(work))
        _trace_pause()
        return {"name": row["name"], "rows": len(work), "embedded": len(ok),
                "failed": json.dumps([f[:2] for f in failed]), "pid": os.getpid(),
                "provenance": self.provenance, "dim": int(self.extractor.dim), "mistake": "",
                "row_info": json.dumps(_code_counts(rows.info))}

    def _report(self, rows: int):
        """How far this shard is, for the driver's progress bar (not waited for)."""
        if self.progress is not None:
            self.progress.report.remote(self.shard, rows)

    def _embed_pixels(self, pixels: np.ndarray, reasons: list):
        """Embed in batches of one fixed shape (the last padded), as the local pipeline does,
        so the model compiles once and gives the same numbers."""
        out = np.zeros((len(pixels), self.extractor.dim), np.float32)
        size = self.batch_size
        for start in range(0, len(pixels), size):
            if all(r is not None for r in reasons[start:start + size]):
                continue  # every image failed: no model call
            batch = pixels[start:start + size]
            if len(batch) < size:
                batch = np.concatenate([batch, np.zeros((size - len(batch), *batch.shape[1:]),
                                                        batch.dtype)])
            out[start:start + size] = self.extractor.embed(batch)[:len(pixels) - start]
            self._report(min(start + size, len(pixels)))
        return out, reasons

    def _embed_paths(self, paths: list[str]):
        """Decode in the actor with the extractor's own `prepare` (dlib computes the whole
        descriptor there), then embed."""
        prepared = []
        for path in paths:  # the slow part for dlib: reported per image
            prepared.append(prepare_with_info(self.extractor.prepare, path))
            self._report(len(prepared) - 1)
        arrays = [array for (array, _), _ in prepared]
        infos = [info for (_, info), _ in prepared]  # row info (how the face was found)
        reasons = [reason for _, reason in prepared]
        if getattr(self.extractor, "input_shape", None) is not None:
            pixels = np.zeros((len(paths), *self.extractor.input_shape), np.uint8)
            for i, (array, reason) in enumerate(zip(arrays, reasons)):
                if reason is None:
                    pixels[i] = array
            return (*self._embed_pixels(pixels, reasons), infos)
        out = np.zeros((len(paths), self.extractor.dim), np.float32)
        ok = [i for i, r in enumerate(reasons) if r is None]
        if ok:
            out[ok] = self.extractor.embed(np.stack([arrays[i] for i in ok]))
        return out, reasons, infos


def _code_counts(info: dict) -> dict:
    """{column: {code: rows}} of a shard's row-info columns (how each face was found)."""
    return {name: {str(code): int(n) for code, n in zip(*np.unique(codes, return_counts=True))}
            for name, codes in info.items()}


def _trace(line: str):
    path = os.environ.get(TRACE_ENV)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def _trace_pause():
    if os.environ.get(TRACE_ENV) and os.environ.get(TRACE_ENV + "_SLEEP"):
        time.sleep(float(os.environ[TRACE_ENV + "_SLEEP"]))


# --- runner ------------------------------------------------------------------------------------

def _pipeline(ray, shards: list[dict], target, sizes):
    """The Ray Data pipeline: shard rows -> CPU decoding tasks -> the actor pool (`sizes`:
    the run's options and the pool's size)."""
    cache_path, settings, weights, progress = target
    run, actors = sizes
    prepare = _cpu_prepare(settings)
    dataset = ray.data.from_items([_row(s) for s in shards], override_num_blocks=len(shards))
    if prepare is not None:
        # The memory a shard's pixels take (twice: decoded, then serialised) is reserved for
        # each decoding task; it also keeps Ray Data from fusing these tasks into the actors
        # (it fuses maps whose resource requests are equal), which would decode on the GPU
        # nodes' actor processes one image at a time.
        pixels = max(len(s["items"]) for s in shards) * int(np.prod(prepare.shape))
        dataset = dataset.map(decode_shard, fn_kwargs={"prepare": prepare}, num_cpus=1,
                              memory=2 * pixels)
    gpus = run.gpus_per_worker or 0
    return dataset.map(
        ShardEmbedder,
        fn_constructor_args=(settings, weights, os.path.abspath(cache_path),
                             (run.batch_size, run.runtime, progress), prepare),
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus or None, num_cpus=1)  # Ray Data's default retries: see the docstring


def _actor_count(ray, settings, gpus: float) -> int:
    """One actor per `gpus` GPUs of the cluster; without GPUs, one per CPU for per-image
    extractors (dlib runs on one core) and one per node for Keras (it uses every core)."""
    resources = ray.cluster_resources()
    if gpus:
        count = int(resources.get("GPU", 0) // gpus)
        if count < 1:
            raise UserError(f"--gpus-per-worker {gpus:g}: the Ray cluster has "
                            f"{resources.get('GPU', 0):g} GPU(s); use a smaller value, or 0 for "
                            "CPU actors.")
        return count
    if spec_of(settings).family.per_image:
        return max(1, int(resources.get("CPU", 1)))
    return max(1, sum(1 for node in ray.nodes() if node.get("Alive")))


def _results(dataset):
    """The result rows; an actor's report of a user's mistake becomes that one-line UserError
    (what is already written stays: a re-run resumes)."""
    for row in dataset.iter_rows():
        if row["mistake"]:
            raise UserError(row["mistake"])
        yield row


def _count(row: dict, summary):
    """A shard's counts into the run's `summary`, as a local run counts (the command line's
    `faces:` line reads summary.row_info)."""
    summary.embedded += int(row["embedded"])
    for name, codes in json.loads(row["row_info"]).items():
        counts = summary.row_info.setdefault(name, {})
        for code, n in codes.items():
            counts[int(code)] = counts.get(int(code), 0) + n
    for key, reason in json.loads(row["failed"]):
        summary.failed[key] = reason


@contextlib.contextmanager
def _ray_session(ray, run):
    """Join `--address`, or the Ray already running in this process, or start a local one;
    shut down only what was started here."""
    if ray.is_initialized():
        yield
        return
    options = dict(log_to_driver=False, include_dashboard=False, configure_logging=False)
    if run.address:
        _check_reachable(run.address)
    _trace("init")
    try:
        with _process_state_kept():
            ray.init(address=run.address, **options)
    except (ConnectionError, ValueError) as e:
        if run.address:
            raise UserError(_address_help(run.address, str(e).splitlines()[0][:200])) from None
        raise
    except BaseException:  # stopped (SIGTERM, Ctrl-C) while Ray started: what it started goes
        ray.shutdown()
        raise
    try:
        yield
    finally:
        ray.shutdown()


def _address_help(address: str, why: str) -> str:
    return (f"--address {address}: cannot join that Ray cluster ({why}); check the address "
            "(ray status on the head node prints it) or leave --address out.")


def _check_reachable(address: str) -> None:
    """A host that does not resolve, or a port that does not answer within CONNECT_SECONDS, is
    a one-line UserError: ray.init would retry it for minutes. `auto`, `local` and whatever
    is not host:port are left to Ray."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    host = host.strip("[]")  # an IPv6 address in brackets
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(_address_help(address, f"host {host} not found: "
                                               f"{getattr(e, 'strerror', None) or e}")) from None
    error = None
    for family, kind, proto, _, where in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.settimeout(CONNECT_SECONDS)  # this socket's, not the process's default
                s.connect(where)
                return
        except OSError as e:
            error = e
    why = "timed out" if isinstance(error, TimeoutError) else (
        getattr(error, "strerror", None) or str(error))
    raise UserError(_address_help(address, f"no answer on {host}:{port}: {why}"))


@contextlib.contextmanager
def _process_state_kept():
    """ray.init installs its own SIGTERM handler and turns faulthandler on in the driver;
    the caller's are put back at once (the command line's SIGTERM means an orderly stop, which
    shuts Ray down through the `finally` above). A SIGTERM that comes while ray.init runs
    meets Ray's handler (SystemExit): the caller's own handler is then run instead."""
    import faulthandler
    import signal
    import threading
    main = threading.current_thread() is threading.main_thread()
    signals = [s for s in signal.Signals if s not in (signal.SIGKILL, signal.SIGSTOP)]
    handlers = {s: signal.getsignal(s) for s in signals} if main else {}
    faults = faulthandler.is_enabled()
    try:
        yield
    except SystemExit as e:  # Ray's SIGTERM handler, while ray.init ran: the caller's, after
        if e.code != signal.SIGTERM or not callable(handlers.get(signal.SIGTERM)):
            raise
        _restore(handlers, faults)
        handlers[signal.SIGTERM](signal.SIGTERM, None)  # the command line's raises Ctrl-C
        raise
    finally:
        _restore(handlers, faults)


def _restore(handlers: dict, faults: bool):
    """The signal handlers and faulthandler state as `_process_state_kept` found them."""
    import faulthandler
    import signal
    for number, handler in handlers.items():
        if handler is not None and signal.getsignal(number) != handler:
            signal.signal(number, handler)
    if not faults and faulthandler.is_enabled():
        faulthandler.disable()


@contextlib.contextmanager
def _quiet_ray():
    """Ray's own loggers say little while we run (start-up notes, Ray Data's execution plan
    and progress lines), and Ray Data draws no bars of its own; both restored afterwards."""
    import ray.data
    loggers = [logging.getLogger(name) for name in ("ray", "ray.data")]
    levels = [lg.level for lg in loggers]
    context = ray.data.DataContext.get_current()
    saved = {name: getattr(context, name, None) for name in _CONTEXT_QUIET}
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    for name, value in _CONTEXT_QUIET.items():
        if hasattr(context, name):
            setattr(context, name, value)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        for name, value in saved.items():
            if value is not None:
                setattr(context, name, value)


_CONTEXT_QUIET = {"enable_progress_bars": False, "print_on_execution_start": False,
                  "verbose_stats_logs": False}


def shard_files(cache_path) -> list[Path]:
    """The work shards written beside a cache so far (for tests and tools)."""
    folder = cache.shards_dir(cache_path)
    return sorted(folder.glob("work-*.h5")) if folder.is_dir() else []
