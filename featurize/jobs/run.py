"""One featurize run: list the dataset, embed what is new or changed, commit the cache."""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from featurize import cache
from featurize.data.images import ImageError, image_size, list_dataset
from featurize.engines.pipeline import (
    Target,
    batches,
    exit_if_worker_is_starting,
    progress_bar,
    provenance,
)
from featurize.errors import OptionError, UserError, check_range
from featurize.models.config import EmbedderConfig
from featurize.models.keras import Extractor, default_batch_size
from featurize.runtimes import (
    build_extractor,
    check_options,
    check_runtime,
    choose as choose_runtime,
    describe_precision,
    settle,
)


@dataclass
class Summary:
    path: Path
    total: int = 0
    embedded: int = 0
    reused: int = 0
    failed: dict = field(default_factory=dict)  # key -> reason, this run's new failures
    failed_total: int = 0
    interrupted: bool = False
    committed: bool = False  # False: nothing could be embedded yet, no cache file written
    seconds: float = 0.0
    notes: list = field(default_factory=list)  # what the listing skipped, and why
    # This run's rows by row-info column and code, e.g. {"face": {0: 980, 3: 2}}: how the
    # faces were found (featurize.models.align.FACE_CODES; 3: none found, the fixed box was used).
    row_info: dict = field(default_factory=dict)
    degenerate: str | None = None  # why the cache's embeddings cannot tell images apart


MAX_BATCH_SIZE = 8192
MAX_WORKERS = 256
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class RunOptions:
    """How a featurize run goes (none of it changes an embedding), checked when made; the
    command line's defaults come from these fields."""

    batch_size: int | None = None  # None: 256 on an accelerator, 32 on a CPU
    workers: int | None = None  # decoding workers; None: the CPU count, at most 16
    flush_rows: int = 1024  # --checkpoint-rows: journal progress every N images (or 30 s)
    check: str = "mtime"  # or "content": also compare a hash of each cached file
    progress: bool = True
    engine: str = "local"  # or "ray": Ray Data tasks and actors (featurize.engines.ray_data)
    address: str | None = None  # --engine ray: the cluster to join; None: a local Ray
    gpus_per_worker: float = 0  # --engine ray: GPUs each embedding actor takes (0: CPU actors)
    runtime: str | None = None  # keras, onnx or openvino; None: the fastest faithful one here
    out: str | Path | None = None  # the cache file; None: named after dataset and settings
    cache_dir: str | Path = cache.DEFAULT_DIR

    def __post_init__(self):
        check_range("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        check_range("workers", self.workers, 1, MAX_WORKERS)
        check_range("flush_rows", self.flush_rows, 1)
        if self.check not in cache.CHECKS:
            raise OptionError("check", f"must be mtime or content, not {self.check!r}.")
        if self.engine not in ENGINES:
            raise OptionError("engine", f"must be {' or '.join(ENGINES)}, not {self.engine!r}.")
        check_range("gpus_per_worker", self.gpus_per_worker, 0, 64, kind=float)
        check_runtime(self.runtime)
        if self.engine != "ray" and (self.address or self.gpus_per_worker):
            raise UserError("--address and --gpus-per-worker go with --engine ray; add it, or "
                            "drop them.")


@dataclass(frozen=True)
class FeaturizeOptions:
    """Everything a featurize run takes: what the embeddings are and how the run goes."""

    embedding: EmbedderConfig = field(default_factory=EmbedderConfig)
    run: RunOptions = field(default_factory=RunOptions)

    @classmethod
    def from_kwargs(cls, base: FeaturizeOptions | None = None, **kwargs) -> FeaturizeOptions:
        """Options from keywords named like the fields of EmbedderConfig and RunOptions (e.g.
        backbone=..., batch_size=...), over `base` (default: the defaults)."""
        base = base or cls()
        parts = {}
        for name, part in (("embedding", base.embedding), ("run", base.run)):
            own = {k: kwargs.pop(k) for k in list(kwargs) if k in _field_names(part)}
            parts[name] = replace(part, **own) if own else part
        if kwargs:
            raise TypeError(f"unknown featurize option(s): {', '.join(sorted(kwargs))}; known: "
                            f"{', '.join(_field_names(EmbedderConfig) + _field_names(RunOptions))}")
        return cls(**parts)


def _field_names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def featurize(source, options: FeaturizeOptions | None = None, *, embedder=None,
              **kwargs) -> Summary:
    """Embed every image of `source` once into an HDF5 cache; re-runs only do what changed.

    `options` (or keywords named like its fields: backbone=..., batch_size=...) say what to
    embed with and how; `embedder` (a featurize.Embedder) reuses its settings and built
    model instead of options.embedding. When no image at all can be embedded, nothing is
    committed and a UserError says why.
    """
    exit_if_worker_is_starting()  # a script without the main guard, re-run by a worker
    start = time.perf_counter()
    options = FeaturizeOptions.from_kwargs(options, **kwargs)
    run = options.run
    check_options(embedder.config if embedder is not None and embedder.config else
                  options.embedding, run.runtime)
    dataset = list_dataset(source)
    if embedder is not None:
        settings, w = embedder.settings, embedder.resolved_weights
    else:
        settings, w = _settings(options.embedding, dataset)
        settings = settle(settings, run.runtime)  # mixed: OpenVINO bfloat16 where native
    path = Path(run.out) if run.out else cache.path_for(dataset, settings, run.cache_dir)
    summary = Summary(path, total=len(dataset.items), notes=list(getattr(dataset, "notes", ())))
    _check_writable(path)
    if run.engine == "ray":  # said before the lock, before any file
        if options.embedding.precision == "int8":
            raise UserError("--precision int8 runs with --engine local: it is calibrated on "
                            "a sample of the whole dataset in one process; drop --engine ray.")
        from featurize.engines.ray_data import import_ray
        import_ray()
    with cache.lock(path):
        state = cache.State(path, settings, check=run.check)
        todo = state.todo(dataset.items)
        summary.reused = len(dataset.items) - len(todo)
        if not todo and state.up_to_date(dataset):
            summary.committed = True
            summary.failed_total = len(state.failed)
            summary.seconds = time.perf_counter() - start
            return summary
        if run.progress and todo:
            _header(len(todo), summary.reused, settings, run, path)
        extractor = None
        if todo and run.engine == "local":  # Ray's actors build their own
            extractor = (embedder.extractor if embedder is not None
                         else _extractor(settings, w, run.runtime, dataset, path))
        _run(todo, extractor, Job(Target(path, settings, w), dataset, state), summary, run)
    if summary.committed and summary.embedded:
        summary.degenerate = degenerate(path)
    summary.seconds = time.perf_counter() - start
    return summary


def _header(n_todo: int, n_cached: int, settings, run: RunOptions, path: Path) -> None:
    """One line before the work: what runs, on how many images, into which cache."""
    runtime = choose_runtime(settings, run.runtime)
    engine = f", engine {run.engine}" if run.engine != "local" else ""
    print(f"featurize: {n_todo} images to embed ({n_cached} already cached) with "
          f"{settings.backbone}, weights {settings.weights_file}, runtime {runtime}, "
          f"{describe_precision(settings)}{engine} -> {path}", file=sys.stderr, flush=True)
    if runtime in ("onnx", "openvino") and not _exported(settings, runtime):
        print(f"featurize: exporting {settings.backbone} for {runtime} first (once for these "
              "settings, about a minute; kept under ~/.keras/models/featurize-exports)",
              file=sys.stderr, flush=True)


def _exported(settings, runtime: str) -> bool:
    """Whether the runtime's copy of the float32 model is already on disk."""
    from featurize.runtimes.bf16 import fp32_settings
    from featurize.runtimes.exports import MODEL_FILES, export_folder
    return (export_folder(fp32_settings(settings), runtime) / MODEL_FILES[runtime]).is_file()


SAMPLE_ROWS = 512  # rows a degenerate-embedding check reads, evenly spread over the cache


def degenerate(path: Path) -> str | None:
    """What makes the embeddings of the cache at `path` useless, read on an even sample of its
    rows: NaN rows, all values ~0 or every row the same; None when they look usable."""
    import h5py
    import numpy as np
    with h5py.File(path, "r") as f:
        ds = f["embeddings"]
        idx = np.unique(np.linspace(0, len(ds) - 1, min(len(ds), SAMPLE_ROWS)).astype(int))
        rows = ds[idx] if len(ds) else np.zeros((0, 0), np.float32)
    if not rows.size:
        return None
    fix = ("no classifier can learn from them; check --weights (none is a random network) and "
           "--layer")
    largest = float(np.nanmax(np.abs(rows))) if not np.isnan(rows).all() else float("nan")
    if np.isnan(rows).any():
        return (f"{int(np.isnan(rows).any(axis=1).sum())} of {len(rows)} sampled rows of {path} "
                f"are NaN; run python -m featurize verify {path}")
    if largest < 1e-6:
        return f"the embeddings in {path} are all ~0 (largest |value| {largest:.1e}); {fix}"
    if len(rows) > 1 and float(np.abs(rows - rows[0]).max()) <= 1e-6 * largest:
        return f"every image in {path} has the same embedding; {fix}"
    return None


def _extractor(settings, w, runtime, dataset, path):
    """The extractor on the runtime chosen (featurize.runtimes): Keras's, or an exported
    model's (int8 is calibrated on `dataset`, or goes on with the model of the cache at
    `path`)."""
    return build_extractor(settings, w, runtime, dataset, _attrs(path))


def _attrs(path) -> dict | None:
    """The attributes of the cache at `path`; None when there is none, or it is damaged
    (featurize's own checks say so)."""
    if not Path(path).is_file():
        return None
    try:
        return cache.read_attrs(path)
    except UserError:
        return None


def _settings(config: EmbedderConfig, dataset):
    """The settings of a run; --resize device takes its size from the first image."""
    if config.resize == "device" and config.source_size is None:
        config = replace(config, source_size=_first_image_size(dataset))
    return config.settings()


@dataclass(frozen=True)
class Job:
    """What one run works on: the cache it writes (`target`), the dataset listed, and the
    cache's state before the run (what is already embedded)."""

    target: Target
    dataset: Any
    state: Any


def _run(todo, extractor: Extractor, job: Job, summary, run: RunOptions):
    """Embed `todo` into the journal and commit the cache (also when interrupted)."""
    (path, settings, w), dataset, state = job.target.astuple(), job.dataset, job.state
    journal = cache.Journal(path, settings, flush_rows=run.flush_rows)
    made = {"provenance": provenance(extractor), "dim": getattr(extractor, "dim", None)}
    try:
        if run.engine == "ray":  # its workers write their own shards of the cache
            from featurize.engines.ray_data import embed_on_ray
            made = embed_on_ray(todo, job.target, summary, run)
        else:
            _embed(todo, extractor, journal, summary, run.batch_size, run.workers, run.progress)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        journal.flush()
        if summary.embedded or _reusable_rows(state, dataset):
            prov = {**made["provenance"], "weights_path": w.path or ""}
            counts = cache.commit(path, settings, dataset, prov, dim=made["dim"],
                                  complete=not summary.interrupted)
            summary.failed_total = counts["failed"]
            summary.notes += counts.get("notes", [])
            summary.committed = True
        elif not summary.interrupted:  # failures only: nothing worth a cache file
            _drop_uncommitted(path)
    if not summary.committed and not summary.interrupted:
        raise UserError(_nothing_embedded(dataset, summary))


def _embed(todo, extractor: Extractor, journal, summary, batch_size, workers, progress):
    """Embed `todo` batch by batch into the journal, counting into `summary`."""
    bar = progress_bar(len(todo), progress)
    size = batch_size or default_batch_size()
    for batch in (batches(todo, extractor, size, workers) if todo else ()):
        journal.add(batch.items, batch.embeddings, batch.info)
        for name, codes in (batch.info or {}).items():
            counts = summary.row_info.setdefault(name, {})
            for code in codes.tolist():
                counts[code] = counts.get(code, 0) + 1
        for item, reason in batch.failed:
            journal.fail(item, reason)
            summary.failed[item.key] = reason
        summary.embedded += len(batch.items)
        bar.update(len(batch.items) + len(batch.failed))
    bar.close()


def _reusable_rows(state, dataset) -> bool:
    """Whether the cache or its journal holds a row for a current file (as it is now)."""
    return any(state.has_row(it) for it in dataset.items)


def _drop_uncommitted(path: Path):
    """The shards of a run that made no cache (failures only), and their folder if empty."""
    if path.exists():
        return  # an existing cache's folder: its next commit tidies it
    shutil.rmtree(cache.shards_dir(path), ignore_errors=True)


def _nothing_embedded(dataset, summary) -> str:
    example = next(iter(summary.failed.items()), None)
    why = f" (e.g. {example[0]}: {example[1]})" if example else ""
    return (f"none of the {summary.total} files of {dataset.root} could be embedded{why}, so no "
            "cache was written; give a folder of images or a list file of image paths.")


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
