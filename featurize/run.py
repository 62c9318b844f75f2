"""One featurize run: list the dataset, embed what is new or changed, commit the cache."""

from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from . import cache
from .errors import UserError
from .extractor import build_extractor, default_batch_size, make_settings
from .images import ImageError, image_size, list_dataset
from .pipeline import batches


@dataclass
class Summary:
    path: Path
    total: int = 0
    embedded: int = 0
    reused: int = 0
    failed: dict = field(default_factory=dict)  # key -> reason, this run's new failures
    failed_total: int = 0
    interrupted: bool = False
    seconds: float = 0.0


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM ends a run like Ctrl-C: the work done so far is committed first."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def provenance(extractor=None) -> dict:
    out = {"featurize_version": _version("featurize-embeddings"), "python": sys.version.split()[0]}
    if extractor is not None and hasattr(extractor, "provenance"):
        out.update(extractor.provenance())  # the versions of what computed the embeddings
    return out


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def featurize(source, backbone="vggface-resnet50", weights="default", layer=None, pool=None,
              input_size=None, crop=None, flip=False, precision="float32", jitter=0,
              batch_size=None, workers=None, out=None, cache_dir=cache.DEFAULT_DIR,
              progress=True, flush_rows=1024, resize="cpu", source_size=None) -> Summary:
    """Embed every image of `source` once into an HDF5 cache; re-runs only do what changed.

    resize="device" crops and resizes on the accelerator, from the size of the dataset's
    first image (or `source_size`); batch_size None picks one for the machine.
    """
    start = time.perf_counter()
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {batch_size}.")
    if resize not in ("cpu", "device"):
        raise UserError(f"--resize must be cpu or device, not {resize!r}.")
    dataset = list_dataset(source)
    if resize == "device" and source_size is None:
        source_size = _first_image_size(dataset)
    settings, w = make_settings(backbone, weights, layer, pool, input_size, crop, flip,
                                precision, jitter, source_size=source_size)
    path = Path(out) if out else cache.default_path(dataset.name, settings, cache_dir)
    summary = Summary(path, total=len(dataset.items))
    _check_writable(path)
    with cache.lock(path), _sigterm_as_interrupt():
        state = cache.State(path, settings)
        todo = state.todo(dataset.items)
        summary.reused = len(dataset.items) - len(todo)
        if not todo and state.up_to_date(dataset):
            summary.failed_total = len(state.failed)
            summary.seconds = time.perf_counter() - start
            return summary
        extractor = build_extractor(settings, w) if todo else None
        journal = cache.Journal(path, settings, flush_rows=flush_rows)
        try:
            bar = _progress(len(todo), progress)
            size = batch_size or default_batch_size()
            for batch in (batches(todo, extractor, size, workers) if todo else ()):
                journal.add(batch.items, batch.embeddings)
                for item, reason in batch.failed:
                    journal.fail(item, reason)
                    summary.failed[item.key] = reason
                summary.embedded += len(batch.items)
                bar.update(len(batch.items) + len(batch.failed))
            bar.close()
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            journal.flush()
            dim = getattr(extractor, "dim", None)
            prov = {**provenance(extractor), "weights_path": w.path or ""}
            counts = cache.commit(path, settings, dataset, prov, dim=dim)
            summary.failed_total = counts["failed"]
    summary.seconds = time.perf_counter() - start
    return summary


def _first_image_size(dataset) -> tuple[int, int]:
    """The (height, width) every image is brought to before the model resizes it."""
    for item in dataset.items[:100]:
        try:
            return image_size(item.path)
        except ImageError:
            continue
    raise UserError(f"none of the first images of {dataset.root} could be read to learn the "
                    "size for --resize device; use --resize cpu.")


def _check_writable(path: Path):
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the cache folder {folder} ({e.strerror}); choose a "
                        "writable --out or --cache-dir.") from None
    if not folder.is_dir() or not _can_write(folder):
        raise UserError(f"cannot write to {folder}; choose a writable --out or --cache-dir.")


def _can_write(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit="img", disable=not enabled or total == 0, smoothing=0.1)
