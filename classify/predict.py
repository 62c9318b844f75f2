"""`python -m classify predict`: new images -> the run's backbone -> the run's head."""

from __future__ import annotations

import numpy as np

from featurize.extractor import extractor_for
from featurize.images import collect
from featurize.pipeline import batches

from . import heads, runs


def predict(inputs, run_dir, top_k: int = 5, batch_size: int = 32, workers=None) -> list[dict]:
    """One result per image: top-k classes with probabilities (or distances), or an error."""
    record, pipeline = runs.load(run_dir)
    items = collect(inputs)
    extractor = extractor_for(record["provenance"])  # exactly the cache's backbone settings
    classes = [record["classes"][k] for k in pipeline.classes_]  # score columns, in order
    kind = record.get("score_kind", "probability")
    head = pipeline.named_steps["head"]
    results = []
    for batch in batches(items, extractor, batch_size, workers):
        for item, reason in batch.failed:
            results.append({"path": item.key, "error": reason})
        if not batch.items:
            continue
        if kind == "distance":
            scores = head.class_distances(pipeline[:-1].transform(batch.embeddings))
            order = np.argsort(scores, axis=1)
        else:
            scores = heads.scores(pipeline, batch.embeddings)
            order = np.argsort(-scores, axis=1)
        for item, row, ranks in zip(batch.items, scores, order):
            top = [{"class": classes[j], kind: float(row[j])} for j in ranks[:top_k]]
            results.append({"path": item.key, "prediction": top[0]["class"], "top": top})
    order = {it.key: n for n, it in enumerate(items)}
    return sorted(results, key=lambda r: order[r["path"]])
