"""Decode in parallel workers, embed in fixed-shape batches, in input order.

Workers decode ahead of the model through a bounded window (memory stays flat), results are
taken in submission order (so output never depends on timing), and every batch handed to
the model has the same shape, the last one padded (no recompilation on JAX or TF).
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .images import ImageError


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


def executor(extractor, workers=None) -> Executor:
    """Threads (decoding releases the GIL), or processes for extractors that need them
    (dlib is neither thread-safe nor releases the GIL)."""
    workers = workers or default_workers()
    if getattr(extractor, "parallel", "thread") == "process" and workers > 1:
        return ProcessPoolExecutor(workers)
    return ThreadPoolExecutor(workers)


def batches(items, extractor, batch_size=32, workers=None, prefetch_batches=2):
    """Yield a `Batch` per `batch_size` items, in order."""
    pool = executor(extractor, workers)
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
            if arrays:
                stacked = np.stack(arrays)
                if len(arrays) < batch_size and stacked.ndim == 4:
                    pad = np.zeros((batch_size - len(arrays),) + stacked.shape[1:], stacked.dtype)
                    stacked = np.concatenate([stacked, pad])
                emb = extractor.embed(stacked)[:len(arrays)]
            else:
                emb = np.zeros((0, 0), np.float32)
            yield Batch(ok, emb, failed)
    finally:
        for _, future in window:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
