"""`python -m classify predict`: new images -> the run's backbone -> the run's head."""

from __future__ import annotations

import functools

import numpy as np

from classify import _heads as heads, _openset as openset, _runs as runs
from featurize.data.images import collect
from featurize.engines.pipeline import batches
from featurize.errors import check_range


def predict(inputs, run, top_k: int = 5, batch_size: int = 32, workers=None) -> list[dict]:
    """One result per image: top-k classes with probabilities (or distances), or an error.
    `top_k` above the number of classes gives them all. `run`: a run folder or a Run.
    An --open-set run adds each image's `score` and the run's `threshold`; below it the
    `prediction` is "unknown" (`top` still lists the nearest classes)."""
    check_range("top_k", top_k, 1)
    check_range("batch_size", batch_size, 1)
    check_range("workers", workers, 1)
    run = run if isinstance(run, runs.Run) else runs.Run.load(run)
    record, model, rejector = run.record, run.pipeline, run.rejector
    items = collect(inputs)
    kind = record.get("score_kind", "probability")
    extractor = runs.extractor_for_run(record, model)
    if isinstance(run, runs.FinetunedRun):  # the whole model: images in, probabilities out
        classes = record["classes"]
        score = lambda emb: emb  # noqa: E731
    else:  # the cache's embeddings, then the fitted pipeline
        classes = [record["classes"][k] for k in model.classes_]  # the score columns
        if kind == "distance":
            head = model.named_steps["head"]
            score = lambda emb: head.class_distances(heads.features(model, emb))  # noqa: E731
        else:
            score = functools.partial(heads.scores, model)
    results = []
    for batch in batches(items, extractor, batch_size, workers):
        results += [{"path": item.key, "error": reason} for item, reason in batch.failed]
        if not batch.items:
            continue
        scores = score(batch.embeddings)
        order = np.argsort(scores if kind == "distance" else -scores, axis=1)
        for item, row, ranks in zip(batch.items, scores, order):
            top = [{"class": classes[j], kind: float(row[j])} for j in ranks[:top_k]]
            results.append({"path": item.key, "prediction": top[0]["class"], "top": top})
        if rejector is not None:
            _reject(results[-len(batch.items):], rejector, batch.embeddings)
    position = {it.key: n for n, it in enumerate(items)}
    return sorted(results, key=lambda r: position[r["path"]])


def _reject(results: list[dict], rejector, embeddings) -> None:
    """An open-set run's verdict on a batch's results (in place): score, threshold, and
    "unknown" below it."""
    for result, score in zip(results, rejector.scores(embeddings)):
        result.update(score=float(score), threshold=rejector.threshold)
        if score < rejector.threshold:
            result["prediction"] = openset.UNKNOWN

