"""Decode in parallel workers, embed in fixed-shape batches, in input order.

Workers decode ahead of the model through a bounded window (memory stays flat), results are
taken in submission order (so output never depends on timing), and every batch handed to
the model has the same shape, the last one padded (no recompilation on JAX or TF).

For extractors fed uint8 arrays (every Keras backbone) workers write pixels straight into a
small ring of batch buffers, in shared memory when the workers are processes, so no pixel
is pickled or stacked; the model embeds batch k in its own thread while batch k+1 is copied
to the accelerator, the workers fill the next ones and the caller writes batch k-1.

Worker processes leave as soon as the process that started them dies, even by SIGKILL, and
their shared memory is named after it (`featurize-<pid>-<n>`), so a later run removes what a
killed one left in /dev/shm.
"""

from __future__ import annotations

import ast
import itertools
import multiprocessing
import os
import signal
import sys
import threading
import traceback
import warnings
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featurize.data.images import prepare_image
from featurize.errors import UserError
from featurize.settings import installed_version

if TYPE_CHECKING:
    from featurize.models.keras import Extractor

# Decoding threads stop scaling at about 4 (the GIL); processes scale with the cores.
# Measured on the lent 16-core GPU machine: benchmarks/featurize_throughput.py.
PROCESS_MIN_WORKERS = 4
CHUNK = 16  # images per worker task: amortises the task round trip
SHM_PREFIX = "featurize-"  # + "<owner pid>-<n>": the owner's death makes a segment garbage
SHM_FOLDER = Path("/dev/shm")  # where Linux keeps POSIX shared memory
GUARD = 'if __name__ == "__main__":'
_segment_numbers = itertools.count()


@dataclass
class Batch:
    items: list  # the items embedded, in order
    embeddings: np.ndarray  # (len(items), D)
    failed: list  # (item, reason)
    # Row-info columns of the items (name -> (len(items),) int8), when the extractor's
    # `prepare` declares some (`row_info`, with `with_info(path) -> (array, {name: code})`):
    # e.g. how the face was found. None otherwise.
    info: dict | None = None


def prepare_with_info(prepare, path):
    """prepare_image(), plus the row info when `prepare` gives some: ((array, info), reason)."""
    with_info = getattr(prepare, "with_info", None)
    if with_info is None:
        array, reason = prepare_image(prepare, path)
        return (array, None), reason
    value, reason = prepare_image(with_info, path)
    return (value if reason is None else (None, None)), reason


def info_columns(prepare, infos: list) -> dict | None:
    """The per-row info dicts of a batch's embedded rows as int8 columns."""
    names = getattr(prepare, "row_info", None)
    if not names:
        return None
    return {name: np.asarray([(i or {}).get(name, -1) for i in infos], np.int8) for name in names}


def default_workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def _start_worker():
    """The first thing each worker process runs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent):
    """Leave when the process that started the pool dies. A SIGKILLed parent cannot stop its
    workers, and their OS parent is the forkserver, which outlives it; but the end of a pipe
    the parent holds closes with it (multiprocessing's parent sentinel)."""
    parent.join()
    os._exit(1)


def _pool(workers: int, processes: bool) -> Executor:
    if not processes or workers < 2:
        return ThreadPoolExecutor(workers)
    # Never fork a process that may hold accelerator or BLAS threads.
    if sys.platform.startswith("linux"):
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])  # each worker forks with decoders imported
    else:
        context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker)


def _wants_processes(extractor: Extractor, workers: int, n_items: int) -> bool:
    """Processes for extractors that need them (dlib is neither thread-safe nor releases
    the GIL), or for many workers on more than a handful of images; else threads."""
    if _process_only(extractor):
        return True
    return workers >= PROCESS_MIN_WORKERS and n_items > CHUNK


def _process_only(extractor: Extractor) -> bool:
    """Whether `prepare` must not run in several threads of one process: dlib's descriptor,
    or --align's dlib detector (featurize.models.align.AlignedInput), are not thread-safe."""
    return "process" in (getattr(extractor, "parallel", "thread"),
                         getattr(getattr(extractor, "prepare", None), "parallel", "thread"))


def batches(items, extractor: Extractor, batch_size=32, workers=None, prefetch_batches=2):
    """Yield a `Batch` per `batch_size` items, in order."""
    workers, items = workers or default_workers(), list(items)
    processes = _wants_processes(extractor, workers, len(items)) and workers > 1
    if processes and (why := _why_workers_would_fail()):
        warnings.warn_explicit(why[0], RuntimeWarning, *why[1:])
        processes = False
        if _process_only(extractor):
            workers = 1  # such an extractor (dlib) is not thread-safe
    remove_dead_segments()  # whatever a killed run left, whether this one shares memory or not
    pool = _pool(workers, processes)
    try:
        if getattr(extractor, "input_shape", None) is None:
            yield from _object_batches(items, extractor, batch_size, pool, prefetch_batches)
        else:
            yield from _array_batches(items, extractor, batch_size, pool, prefetch_batches)
    except BrokenProcessPool:
        raise UserError(_broken_pool_message()) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- scripts without the main guard --------------------------------------------------------------

def _main_rerun_by_workers() -> str | None:
    """The main script's file if spawn and forkserver workers run it again while they start
    (what `python script.py` and `python -m package.script` need), else None."""
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name == "__main__" or (name or "").endswith(".__main__"):
        return None  # python -m package: multiprocessing leaves it alone
    return getattr(main, "__file__", None)


def _why_workers_would_fail() -> tuple[str, str, int] | None:
    """(message, script, line) when worker processes, which import the main script again as
    they start, would fail: it is no file (`python - < code.py`), or this call comes from its
    top level outside any `if __name__ ...` block, so each worker would make it again. None
    when they can start, or when it cannot be told (`exit_if_worker_is_starting` is the
    safety net then)."""
    script = _main_rerun_by_workers()
    if script is None:
        return None
    main = vars(sys.modules["__main__"])
    line = next((frame.f_lineno for frame, _ in traceback.walk_stack(None)
                 if frame.f_globals is main and frame.f_code.co_name == "<module>"), None)
    slower = "so images are decoded in threads instead, which is slower"
    try:
        tree = ast.parse(Path(script).read_bytes(), script)
    except OSError:
        return (f"worker processes cannot import {script} again, {slower}; run the code from "
                "a file.", script, line or 0)
    except (SyntaxError, ValueError):
        return None
    if line is None or any(node.lineno <= line <= node.end_lineno for node in _name_tests(tree)):
        return None
    return (f"this call runs at the top level of {script} without `{GUARD}`: worker processes "
            f"would run it again (they import the script), {slower}. Put the call under "
            f"`{GUARD}`.", script, line)


def _name_tests(tree):
    """The `if` statements whose test reads `__name__`: the main guard, however written."""
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and any(isinstance(n, ast.Name) and n.id == "__name__"
                                            for n in ast.walk(node.test)):
            yield node


def exit_if_worker_is_starting():
    """Called first by featurize(): a worker process still starting (importing the main
    script again) has reached a featurize() call the script does not guard. Leave before
    touching any file; the parent reports it (see `_broken_pool_message`)."""
    # multiprocessing's own sign of it (see multiprocessing.spawn._check_not_importing_main)
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise SystemExit(f"error: a featurize worker process imported {_main_rerun_by_workers()} "
                         f"again, which calls featurize at its top level; put the call under "
                         f"`{GUARD}`.")


def _broken_pool_message() -> str:
    message = ("a decoding worker process ended abruptly (killed, or out of memory); what was "
               "already embedded is kept: run again to resume")
    script = _main_rerun_by_workers()
    if script:
        message += (f". If {script} calls featurize at its top level, put the call under "
                    f"`{GUARD}`: worker processes import the script again")
    return message + "."


# --- extractors fed fixed-shape uint8 arrays ----------------------------------------------------

class _Buffer:
    """One batch of pixels; in shared memory when worker processes fill it."""

    def __init__(self, shape, shared: bool):
        self.shape = shape
        self.shm = _new_segment(int(np.prod(shape))) if shared else None
        self.array = (np.ndarray(shape, np.uint8, buffer=self.shm.buf) if shared
                      else np.zeros(shape, np.uint8))

    @property
    def target(self):
        """What a worker writes into: the array itself, or the name of its shared memory."""
        return (self.shm.name, self.shape) if self.shm else self.array

    def release(self):
        self.array = None
        if self.shm:
            try:
                self.shm.close()
            except BufferError:  # a framework still holds a view; unlinking is what matters
                pass
            self.shm.unlink()


def _new_segment(size: int) -> shared_memory.SharedMemory:
    """A segment named after this process, so that its death tells others it is garbage."""
    while True:
        name = f"{SHM_PREFIX}{os.getpid()}-{next(_segment_numbers)}"
        try:
            return shared_memory.SharedMemory(name, create=True, size=size)
        except FileExistsError:  # left by a dead process that had our PID
            continue


def remove_dead_segments() -> list[str]:
    """Unlink the shared memory of featurize processes that no longer run (a SIGKILL gives
    them no chance to); Linux only (elsewhere there is no folder to list). Returns the names."""
    removed = []
    for path in SHM_FOLDER.glob(f"{SHM_PREFIX}*-*") if SHM_FOLDER.is_dir() else ():
        owner = path.name[len(SHM_PREFIX):].split("-")[0]
        if owner.isdigit() and not _alive(int(owner)):
            try:
                path.unlink()
                removed.append(path.name)
            except OSError:  # another user's, or removed meanwhile
                pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, but another user's
        pass
    return True


_attached: dict = {}  # in a worker process: shared-memory name -> (segment, array)


def _fill(target, start, prepare, paths) -> list:
    """Decode `paths` into rows start.. of the batch; the reason for each failure, else None."""
    if isinstance(target, tuple):
        name, shape = target
        if name not in _attached:
            shm = shared_memory.SharedMemory(name=name)
            _attached[name] = (shm, np.ndarray(shape, np.uint8, buffer=shm.buf))
        target = _attached[name][1]
    out = []
    for row, path in enumerate(paths, start):
        (pixels, info), reason = prepare_with_info(prepare, path)
        target[row] = pixels if reason is None else 0
        out.append((reason, info))
    return out


def _embed(extractor: Extractor, data):
    return extractor.embed(data.result() if isinstance(data, Future) else data)


def _array_batches(items, extractor: Extractor, batch_size, pool, prefetch):
    groups = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    if not groups:
        return
    processes = isinstance(pool, ProcessPoolExecutor)
    # On an accelerator batch k+1 is copied to it while batch k is computed (the model itself
    # takes one call at a time); each of the two needs its own buffer, as does each batch
    # being decoded.
    overlap = getattr(extractor, "overlap_upload", False)
    depth = 2 if overlap else 1
    slots = min(len(groups), prefetch + depth + 1)
    ring = [_Buffer((batch_size, *extractor.input_shape), processes) for _ in range(slots)]
    model = ThreadPoolExecutor(1)
    uploader = ThreadPoolExecutor(1) if overlap else None
    filling, in_model = {}, deque()

    def fill(k):
        group, buf = groups[k], ring[k % slots]
        filling[k] = [pool.submit(_fill, buf.target, s, extractor.prepare,
                                  [it.path for it in group[s:s + CHUNK]])
                      for s in range(0, len(group), CHUNK)]

    def start_embedding():
        while len(in_model) < depth and filling:
            k = min(filling)
            results = [r for f in filling.pop(k) for r in f.result()]
            reasons, infos = [r for r, _ in results], [i for _, i in results]
            if all(r is not None for r in reasons):  # every image failed: no model call
                in_model.append((k, reasons, infos, None))
                continue
            buf = ring[k % slots]
            buf.array[len(reasons):] = 0  # the last batch's padding
            data = uploader.submit(extractor.to_device, buf.array) if overlap else buf.array
            in_model.append((k, reasons, infos, model.submit(_embed, extractor, data)))

    try:
        for k in range(slots):
            fill(k)
        start_embedding()
        while in_model:
            k, reasons, infos, future = in_model.popleft()
            emb = future.result() if future else None  # batch k is off its buffer: refill it
            if k + slots < len(groups):
                fill(k + slots)
            start_embedding()  # the model runs while the caller writes batch k
            group = groups[k]
            ok = [i for i, r in enumerate(reasons) if r is None]
            yield Batch([group[i] for i in ok], emb[ok] if ok else np.zeros((0, 0), np.float32),
                        [(group[i], r) for i, r in enumerate(reasons) if r is not None],
                        info_columns(extractor.prepare, [infos[i] for i in ok]))
    finally:
        for futures in filling.values():
            for f in futures:
                f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)  # no worker may still write to a buffer
        model.shutdown(wait=True, cancel_futures=True)
        if uploader:
            uploader.shutdown(wait=True, cancel_futures=True)
        for buf in ring:
            buf.release()


# --- extractors whose workers return anything (dlib: the descriptor itself) ---------------------

def _object_batches(items, extractor: Extractor, batch_size, pool, prefetch_batches):
    window = deque()
    pending = iter(items)
    limit = batch_size * (prefetch_batches + 1)

    def fill():
        for item in pending:
            window.append((item, pool.submit(prepare_with_info, extractor.prepare, item.path)))
            if len(window) >= limit:
                return

    try:
        fill()
        while window:
            ok, arrays, infos, failed = [], [], [], []
            while window and len(ok) + len(failed) < batch_size:
                item, future = window.popleft()
                (array, info), reason = future.result()
                if reason is None:
                    ok.append(item)
                    arrays.append(array)
                    infos.append(info)
                else:
                    failed.append((item, reason))
            fill()  # keep the workers busy while the model runs
            emb = extractor.embed(np.stack(arrays)) if arrays else np.zeros((0, 0), np.float32)
            yield Batch(ok, emb, failed, info_columns(extractor.prepare, infos))
    finally:
        for _, future in window:
            future.cancel()


@dataclass(frozen=True)
class Target:
    """Where an engine writes a run's embeddings: the cache file, the settings that key it,
    and the weights that compute them."""

    path: Path
    settings: Any  # featurize.settings.EmbeddingSettings
    weights: Any  # featurize.models.weights.Weights

    def astuple(self) -> tuple:
        return self.path, self.settings, self.weights


def provenance(extractor: Extractor | None = None) -> dict:
    out = {"featurize_version": installed_version("featurize-embeddings"),
           "python": sys.version.split()[0]}
    if extractor is not None and hasattr(extractor, "provenance"):
        out.update(extractor.provenance())  # the versions of what computed the embeddings
    return out


def progress_bar(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit="img", disable=not enabled or total == 0, smoothing=0.1)
