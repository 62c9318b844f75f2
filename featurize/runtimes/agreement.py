"""How embeddings of a reduced precision (int8 on ONNX Runtime, bfloat16 on OpenVINO) agree
with fp32's on held-out images of the dataset: the seeded sample, the report (cosine, centred
cosine, a logistic-regression head's top-1 agreement), kept beside the model it measures,
and the lines a cache's attributes give."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from featurize import atomic

CALIBRATION_IMAGES = 96  # enough for stable min/max ranges; each one is embedded once more
HELD_OUT_IMAGES = 128  # images not calibrated on, embedded with fp32 and int8 to compare
SAMPLE_SEED = 0


def sample(items: list, calibration: int = CALIBRATION_IMAGES, held_out: int = HELD_OUT_IMAGES):
    """A seeded sample of the dataset's items: (calibration items, held-out items), disjoint,
    the same for the same dataset listing."""
    calibration = min(calibration, max(1, len(items) // 2))  # a small dataset keeps half back
    order = np.random.default_rng(SAMPLE_SEED).permutation(len(items))
    chosen = [items[i] for i in order[:calibration + held_out]]
    return chosen[:calibration], chosen[calibration:]


def prepared(items, prepare) -> tuple[np.ndarray, list]:
    """The images that decode, prepared like the pipeline prepares them, and their items."""
    from featurize.data.images import ImageError
    arrays, kept = [], []
    for item in items:
        try:
            arrays.append(prepare(item.path))
            kept.append(item)
        except (ImageError, OSError):
            continue
    return np.stack(arrays) if arrays else np.zeros((0, *prepare.shape), np.uint8), kept


REPORT_VERSION = 2  # 2: with the centred cosine


_REPORT_KEYS = ("held_out_images", "mean_cosine", "min_cosine", "mean_centred_cosine",
                "min_centred_cosine", "max_relative_difference", "logreg_top1_agreement")


def cached_report(folder, name: str, identity, compute) -> dict:
    """`compute()`'s agreement report, kept in `folder` (beside the model it measures) under
    a hash of `identity` (the held-out images): a fresh cache of the same model and sample
    reads it instead of embedding the sample twice again."""
    identity = json.dumps([REPORT_VERSION, identity])
    path = folder / f"agreement-{name}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if (isinstance(data, dict) and data.get("held_out_images") is not None
            and all(k in _REPORT_KEYS and isinstance(v, (int, float)) for k, v in data.items())):
        return data  # data from disk: only the names and number types a report has
    report = compute()
    try:
        atomic.write_text(path, json.dumps(report, sort_keys=True))
    except OSError:
        pass  # a read-only export folder: computed again next time
    return report


def agreement(fp32, int8, images: np.ndarray, labels: list) -> dict:
    """How the int8 embeddings of held-out images compare with fp32's: cosine (mean, min), and
    when the images are labelled, how often a logistic-regression head trained on each (on
    one half) predicts the same class for the other half."""
    if not len(images):
        return {"held_out_images": 0}
    a = np.concatenate([fp32.embed(images[i:i + 32]) for i in range(0, len(images), 32)])
    b = np.concatenate([int8.embed(images[i:i + 32]) for i in range(0, len(images), 32)])
    cosine = _cosine(a, b)
    centre = a.mean(axis=0)  # the mean fp32 embedding: what every row shares
    centred = _cosine(a - centre, b - centre)
    report = {"held_out_images": len(images), "mean_cosine": float(cosine.mean()),
              "min_cosine": float(cosine.min()), "mean_centred_cosine": float(centred.mean()),
              "min_centred_cosine": float(centred.min()),
              "max_relative_difference": float(np.abs(a - b).max() / np.abs(a).max())}
    top1 = _head_agreement(a, b, labels)
    if top1 is not None:
        report["logreg_top1_agreement"] = top1
    return report


def _cosine(a, b) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, 1) / np.maximum(norms, 1e-12)


def _head_agreement(a, b, labels) -> float | None:
    """Fraction of the second half where heads trained on fp32 and on int8 agree."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import normalize
    if any(label is None for label in labels) or len(labels) < 4:
        return None
    half = len(labels) // 2
    train = labels[:half]
    if len(set(train)) < 2:
        return None
    predictions = []
    for x in (a, b):
        x = normalize(x)  # as classify does by default
        head = LogisticRegression(max_iter=1000).fit(x[:half], train)
        predictions.append(head.predict(x[half:]))
    return float(np.mean(predictions[0] == predictions[1]))


def agreement_text(report: dict) -> str:
    """cosine and centred cosine (mean, min), head top-1 agreement, of an agreement report."""
    text = (f"cosine mean {float(report['mean_cosine']):.5f}, min "
            f"{float(report['min_cosine']):.5f}")
    if "mean_centred_cosine" in report:
        text += (f"; centred cosine mean {float(report['mean_centred_cosine']):.5f}, min "
                 f"{float(report['min_centred_cosine']):.5f}")
    if "logreg_top1_agreement" in report:
        text += (f"; logistic-regression top-1 agreement "
                 f"{float(report['logreg_top1_agreement']):.1%}")
    return text


def report_lines(attrs: dict) -> list[str]:
    """The agreement report a cache's attributes hold: int8's or OpenVINO bfloat16's (empty
    for other precisions)."""
    lines = [report_line(attrs)] if "bf16_mean_cosine" in attrs else []
    if "int8_mean_cosine" in attrs:
        lines.append(f"int8 vs fp32 on {int(attrs['int8_held_out_images'])} held-out images "
                     f"(calibrated on {int(attrs['int8_calibration_images'])}): "
                     + agreement_text(recorded_report(attrs, "int8")))
    return lines


def recorded_report(attrs: dict, prefix: str) -> dict:
    """The agreement report a cache's attributes hold (`<prefix>_<name>` keys)."""
    return {k[len(prefix) + 1:]: v for k, v in attrs.items() if k.startswith(f"{prefix}_")}


def report_line(attrs: dict) -> str | None:
    """One line: how the bfloat16 embeddings of a cache compare with fp32's."""
    if "bf16_mean_cosine" not in attrs:
        return None
    return (f"bf16 (OpenVINO) vs fp32 on {int(attrs['bf16_held_out_images'])} held-out images: "
            + agreement_text(recorded_report(attrs, "bf16")))
