"""`python -m featurize verify CACHE`: check that a cache is sound and still matches its files."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from . import cache


@dataclass
class Report:
    path: str
    rows: int = 0
    problems: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    max_difference: float | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        lines = [f"{self.path}: {self.rows} rows"]
        if self.max_difference is not None:
            lines.append(f"re-embedded sample: max abs difference {self.max_difference:.2e}")
        lines += [f"problem: {p}" for p in self.problems]
        lines += [f"missing: {m}" for m in self.missing[:20]]
        lines.append("ok" if self.ok else f"{len(self.problems)} problem(s)")
        return "\n".join(lines)


def verify_cache(path, sample: int = 0, tolerance: float = 1e-3, seed: int = 0) -> Report:
    c = cache.read(path)  # shapes, label range, finite rows: a UserError if broken
    report = Report(str(path), rows=len(c.paths))
    root = c.attrs.get("dataset_root", "")
    report.missing = [p for p in c.paths if not os.path.exists(os.path.join(root, p))]
    if report.missing:
        report.problems.append(f"{len(report.missing)} file(s) no longer exist under {root}")
    if len(set(c.paths)) != len(c.paths):
        report.problems.append("duplicate paths")
    if sample and c.paths:
        from .extractor import extractor_for
        ext = extractor_for(c.attrs)
        present = [i for i, p in enumerate(c.paths) if p not in set(report.missing)]
        rng = np.random.default_rng(seed)
        pick = sorted(rng.choice(present, size=min(sample, len(present)), replace=False))
        arrays = np.stack([ext.prepare(os.path.join(root, c.paths[i])) for i in pick])
        fresh = ext.embed(arrays)
        report.max_difference = float(np.abs(fresh - c.embeddings[pick]).max())
        if report.max_difference > tolerance:
            report.problems.append(f"re-embedded rows differ by {report.max_difference:.2e} "
                                   f"(> {tolerance})")
    return report

