"""Decode in parallel workers, embed in fixed-shape batches, in input order.

Workers decode ahead of the model through a bounded window (memory stays flat), results are
taken in submission order (so output never depends on timing), and every batch handed to
the model has the same shape, the last one padded (no recompilation on JAX or TF).

For extractors fed uint8 arrays (every Keras backbone) workers write pixels straight into a
small ring of batch buffers, in shared memory when the workers are processes, so no pixel
is pickled or stacked; the model embeds batch k in its own thread while batch k+1 is copied
to the accelerator, the workers fill the next ones and the caller writes batch k-1.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from .images import ImageError

# Decoding threads stop scaling at about 4 (the GIL); processes scale with the cores.
# Measured on the lent 16-core GPU machine: benchmarks/featurize_throughput.py.
PROCESS_MIN_WORKERS = 4
CHUNK = 16  # images per worker task: amortises the task round trip


@dataclass
class Batch:
    items: list  # the items embedded, in order
    embeddings: np.ndarray  # (len(items), D)
    failed: list  # (item, reason)


def default_workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def _safe(prepare, path):
    try:
        return prepare(path), None
    except ImageError as e:
        return None, str(e)
    except MemoryError:
        return None, "out of memory while decoding"


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def _pool(workers: int, processes: bool) -> Executor:
    if not processes or workers < 2:
        return ThreadPoolExecutor(workers)
    # Never fork a process that may hold accelerator or BLAS threads.
    if sys.platform.startswith("linux"):
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])  # each worker forks with decoders imported
    else:
        context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_ignore_sigint)


def _wants_processes(extractor, workers: int, n_items: int) -> bool:
    """Processes for extractors that need them (dlib is neither thread-safe nor releases
    the GIL), or for many workers on more than a handful of images; else threads."""
    if getattr(extractor, "parallel", "thread") == "process":
        return True
    return workers >= PROCESS_MIN_WORKERS and n_items > CHUNK


def batches(items, extractor, batch_size=32, workers=None, prefetch_batches=2):
    """Yield a `Batch` per `batch_size` items, in order."""
    workers, items = workers or default_workers(), list(items)
    pool = _pool(workers, _wants_processes(extractor, workers, len(items)))
    try:
        if getattr(extractor, "input_shape", None) is None:
            yield from _object_batches(items, extractor, batch_size, pool, prefetch_batches)
        else:
            yield from _array_batches(items, extractor, batch_size, pool, prefetch_batches)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- extractors fed fixed-shape uint8 arrays ----------------------------------------------------

class _Buffer:
    """One batch of pixels; in shared memory when worker processes fill it."""

    def __init__(self, shape, shared: bool):
        self.shape = shape
        self.shm = shared_memory.SharedMemory(create=True, size=int(np.prod(shape))) if shared else None
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


_attached: dict = {}  # in a worker process: shared-memory name -> (segment, array)


def _fill(target, start, prepare, paths) -> list:
    """Decode `paths` into rows start.. of the batch; the reason for each failure, else None."""
    if isinstance(target, tuple):
        name, shape = target
        if name not in _attached:
            shm = shared_memory.SharedMemory(name=name)
            _attached[name] = (shm, np.ndarray(shape, np.uint8, buffer=shm.buf))
        target = _attached[name][1]
    reasons = []
    for row, path in enumerate(paths, start):
        pixels, reason = _safe(prepare, path)
        target[row] = pixels if reason is None else 0
        reasons.append(reason)
    return reasons


def _embed(extractor, data):
    return extractor.embed(data.result() if isinstance(data, Future) else data)


def _array_batches(items, extractor, batch_size, pool, prefetch):
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
            reasons = [r for f in filling.pop(k) for r in f.result()]
            buf = ring[k % slots]
            buf.array[len(reasons):] = 0  # the last batch's padding
            data = uploader.submit(extractor.to_device, buf.array) if overlap else buf.array
            in_model.append((k, reasons, model.submit(_embed, extractor, data)))

    try:
        for k in range(slots):
            fill(k)
        start_embedding()
        while in_model:
            k, reasons, future = in_model.popleft()
            emb = future.result()  # batch k is off its buffer: refill it
            if k + slots < len(groups):
                fill(k + slots)
            start_embedding()  # the model runs while the caller writes batch k
            group = groups[k]
            ok = [i for i, r in enumerate(reasons) if r is None]
            yield Batch([group[i] for i in ok], emb[ok] if ok else np.zeros((0, 0), np.float32),
                        [(group[i], r) for i, r in enumerate(reasons) if r is not None])
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

def _object_batches(items, extractor, batch_size, pool, prefetch_batches):
    window = deque()
    pending = iter(items)
    limit = batch_size * (prefetch_batches + 1)

    def fill():
        for item in pending:
            window.append((item, pool.submit(_safe, extractor.prepare, item.path)))
            if len(window) >= limit:
                return

    try:
        fill()
        while window:
            ok, arrays, failed = [], [], []
            while window and len(ok) + len(failed) < batch_size:
                item, future = window.popleft()
                array, reason = future.result()
                if reason is None:
                    ok.append(item)
                    arrays.append(array)
                else:
                    failed.append((item, reason))
            fill()  # keep the workers busy while the model runs
            emb = extractor.embed(np.stack(arrays)) if arrays else np.zeros((0, 0), np.float32)
            yield Batch(ok, emb, failed)
    finally:
        for _, future in window:
            future.cancel()
