"""`python -m featurize verify CACHE`: check that a cache is sound and still matches its files.

Problems (exit 1): rows that fail their checksum (damaged on disk) or hold NaN/Inf, embeddings
that carry no information (all about zero, or all the same), files gone or changed since they
were embedded, and, with --sample K, images that no longer decode or re-embed differently
(by more than --tolerance, relative to the embeddings' scale).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from featurize import cache
from featurize.data.images import fingerprints, is_url, prepare_image, source_path
from featurize.errors import OptionError, check_range
from featurize.runtimes import build_extractor
from featurize.settings import EmbeddingSettings

ZERO_SCALE = 1e-6  # largest |value| below which no network's embedding is informative
SAME_ROWS = 1e-5  # rows closer than this, relative to their scale, are one and the same
SHOWN = 20  # paths listed per kind of problem


@dataclass
class Report:
    path: str
    rows: int = 0
    problems: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)  # "row N: path"
    max_difference: float | None = None
    relative_difference: float | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        lines = [f"{self.path}: {self.rows} rows"]
        if self.max_difference is not None:
            lines.append(f"re-embedded sample: max abs difference {self.max_difference:.2e} "
                         f"({self.relative_difference:.2e} of the embeddings' scale)")
        lines += [f"problem: {p}" for p in self.problems]
        for kind, entries in (("damaged", self.damaged), ("missing", self.missing),
                              ("changed", self.changed)):
            lines += [f"{kind}: {e}" for e in entries[:SHOWN]]
            if len(entries) > SHOWN:
                lines.append(f"{kind}: ... and {len(entries) - SHOWN} more")
        lines.append("ok" if self.ok else f"{len(self.problems)} problem(s)")
        return "\n".join(lines)


def verify_cache(path, sample: int = 0, tolerance: float = 1e-3, seed: int = 0) -> Report:
    check_range("sample", sample, 0)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) \
            or not math.isfinite(tolerance) or tolerance < 0:
        raise OptionError("tolerance", f"must be a number of at least 0, not {tolerance}.")
    c = cache.read(path, option="verify's CACHE argument", strict=False)
    report = Report(str(path), rows=len(c.paths))
    usable = _check_rows(c, report)
    gone = _check_files(c, report)
    if sample:
        usable &= ~gone
        _check_sample(c, report, np.flatnonzero(usable), sample, tolerance, seed)
    return report


def _check_rows(c, report: Report) -> np.ndarray:
    """Damaged, non-finite and degenerate rows; returns the mask of rows fit to compare."""
    root = c.attrs.get("dataset_root", "its dataset")
    usable = np.ones(len(c.paths), bool)
    usable[c.damaged] = False
    if c.damaged:
        report.problems.append(f"{len(c.damaged)} row(s) fail their checksum (the file was "
                               f"damaged on disk); run featurize on {root} again with the same "
                               "options to embed them again")
        report.damaged += [f"row {i}: {c.paths[i]}" for i in c.damaged]
    nonfinite = usable & ~np.isfinite(c.embeddings).all(axis=1)
    if nonfinite.any():
        rows = np.flatnonzero(nonfinite)
        report.problems.append(f"{len(rows)} row(s) hold NaN or Inf: the model overflowed (try "
                               "--precision float32); embed into a new cache")
        report.damaged += [f"row {i}: {c.paths[i]} (NaN or Inf)" for i in rows]
        usable &= ~nonfinite
    problem = degenerate(c.embeddings[usable])
    if problem:
        report.problems.append(problem)
    return usable


def degenerate(rows: np.ndarray) -> str | None:
    """Why embeddings carry no information (all about zero, or all the same), or None."""
    if not len(rows):
        return None
    scale = float(np.abs(rows).max())
    fix = ("the backbone gives no usable output: check --weights and --layer, then embed "
           "again into a new cache")
    if scale < ZERO_SCALE:
        return f"every embedding is about zero (largest |value| {scale:.1e}); {fix}"
    if len(rows) > 1:
        spread = float((rows.max(axis=0) - rows.min(axis=0)).max())
        if spread <= SAME_ROWS * scale:
            return (f"all {len(rows)} embeddings are the same (they differ by {spread:.1e} at "
                    f"most, for values up to {scale:.1e}); {fix}")
    return None


def _check_files(c, report: Report) -> np.ndarray:
    """Files gone, or changed since they were embedded; returns the mask of such rows."""
    root = c.attrs.get("dataset_root", "")
    gone = np.zeros(len(c.paths), bool)
    if c.paths and not os.path.isdir(root) and not any(map(is_url, c.paths)):
        report.problems.append(f"the dataset folder {root} no longer exists (moved or "
                               "deleted?): none of its files can be checked; run featurize on "
                               "its new place")
        report.missing = list(c.paths)
        gone[:] = True
        return gone
    found = fingerprints(root, c.paths)
    for i, key in enumerate(c.paths):
        now = found.get(key)
        if now is None:
            report.missing.append(key)
            gone[i] = True
        elif c.sizes is not None and now != (c.sizes[i], c.mtimes[i]):
            report.changed.append(key)
            gone[i] = True
    if report.missing:
        report.problems.append(f"{len(report.missing)} file(s) no longer exist under {root}")
    if report.changed:
        report.problems.append(f"{len(report.changed)} file(s) changed since they were embedded "
                               "(size or modification time); run featurize again to update them")
    if len(set(c.paths)) != len(c.paths):
        report.problems.append("duplicate paths")
    return gone


def _check_sample(c, report: Report, candidates, sample: int, tolerance: float, seed: int):
    """Re-embed up to `sample` rows and compare, relative to the scale of the rows."""
    if not len(candidates):
        report.problems.append("no image is left to re-embed for --sample (every row is "
                               "missing, changed or damaged)")
        return
    from featurize.models.keras import Extractor
    ext: Extractor = build_extractor(EmbeddingSettings.from_json(c.attrs["settings"]),
                                     cache_attrs=c.attrs)
    root = c.attrs.get("dataset_root", "")
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(candidates, size=min(sample, len(candidates)), replace=False))
    arrays, kept = [], []
    for i in picked:
        array, reason = prepare_image(ext.prepare, source_path(root, c.paths[i]))
        if reason is not None:
            report.problems.append(f"{c.paths[i]} no longer decodes ({reason}), though it "
                                   "decoded when it was embedded; replace the file or run "
                                   "featurize again")
            continue
        arrays.append(array)
        kept.append(i)
    if not kept:
        return
    fresh = np.asarray(ext.embed(np.stack(arrays)), dtype=np.float32)
    cached = c.embeddings[kept]
    diff = float(np.abs(fresh - cached).max())
    scale = float(np.abs(cached).max())
    relative = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    report.max_difference, report.relative_difference = diff, relative
    if relative > tolerance:
        report.problems.append(f"re-embedded rows differ by {diff:.2e}, {relative:.2e} of "
                               f"their scale {scale:.2e} (> --tolerance {tolerance})")
