"""What changes an embedding: `EmbeddingSettings`, the cache key, and the option values
it may hold. A leaf: it imports nothing of featurize's, so every layer can use it.

`featurize.models.config.EmbedderConfig` is what users write (checked options); its
`settings()` gives these settings, and the cache stores them as JSON.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import metadata

RESIZE = "pil-bilinear"  # part of the key: a different resize gives different embeddings
DEVICE_RESIZE = "device-bilinear-{}x{}"  # antialiased bilinear in the model, from (h, w)
MAX_INPUT_SIZE = 2048  # a larger side is a typo, or a batch that does not fit in memory
MAX_JITTER = 1000  # dlib computes every jittered copy: 1000 is already 1000x the time
POOLS = ("avg", "max")
PRECISIONS = ("float32", "mixed", "int8")  # int8: CPU, quantised (featurize.runtimes.int8)
RESIZES = ("cpu", "device")
# --tta: named --jitter choices for dlib-resnet (benchmarks/jitter_curve.py measured them on
# LFW View 1). "accurate" is the cheapest jitter count whose accuracy matches the best measured
# within noise; it is a shorthand for --jitter N, and shares that cache.
TTA_PRESETS = {"fast": 0, "accurate": 4}
SEEDED = "seeded"  # the jitter_scheme of --jitter N (featurize.models.dlib_backbone)
# Fields added after caches existed: left out of the key at these values, so those caches
# keep their keys.
_KEYLESS_DEFAULTS = {"align": "none", "jitter_scheme": "", "precision_engine": ""}


@dataclass(frozen=True)
class EmbeddingSettings:
    """Everything that changes an embedding, and nothing else."""

    backbone: str
    weights: str  # identity: a SHA-256, "imagenet" or "random-seed0"
    weights_file: str  # file name only, for people reading the provenance
    layer: str  # "" for the backbone's default
    pooling: str  # "avg", "max" or "none"
    input_size: int
    crop: float  # 0.0 for none
    flip: bool
    preprocessing: str
    precision: str
    jitter: int  # dlib only
    resize: str = RESIZE
    align: str = "none"  # --align preset (featurize.models.align); "none" is left out of the key
    # How --jitter N jitters (featurize.models.dlib_backbone): "seeded" (pass i of an image
    # depends only on its chip and i); "" for no jitter, and for caches made before, whose
    # --jitter was dlib's unseeded one. Left out of the key when "": those caches keep their keys.
    jitter_scheme: str = ""
    # What computed a reduced precision when it is not Keras: "openvino-bf16" (--precision
    # mixed on a CPU with native bfloat16, featurize.runtimes.settle); "" for Keras (and for
    # every other precision). Left out of the key and the JSON when "": caches keep their keys.
    precision_engine: str = ""

    def key(self) -> str:
        fields = asdict(self)
        for name in _KEYLESS_DEFAULTS:  # caches made before these keep their keys
            if fields[name] == _KEYLESS_DEFAULTS[name]:
                del fields[name]
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def to_json(self) -> str:
        fields = asdict(self)
        for name in ("jitter_scheme", "precision_engine"):  # JSON recorded before they were
            if not fields[name]:
                del fields[name]
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EmbeddingSettings:
        return cls(**json.loads(text))

    @property
    def device_source(self) -> tuple[int, int] | None:
        """(height, width) the images are brought to when --resize device crops and resizes
        in the model; None for CPU resizing."""
        if not self.resize.startswith("device-"):
            return None
        h, w = self.resize.rsplit("-", 1)[1].split("x")
        return int(h), int(w)


def tta_of(jitter: int, scheme: str) -> str:
    """The --tta preset that `jitter` and `scheme` amount to, for the provenance: a preset
    name, or "custom" (another --jitter, or dlib's unseeded jitter of older caches)."""
    seeded = scheme == SEEDED or not jitter
    names = [name for name, n in TTA_PRESETS.items() if n == jitter and seeded]
    return names[0] if names else "custom"


def installed_version(dist: str, missing: str = "unknown") -> str:
    """The installed version of the distribution `dist` (or of `dist`-cpu: TensorFlow's CPU
    build on Linux), recorded with embeddings and exports; `missing` when neither is."""
    for name in (dist, f"{dist}-cpu"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return missing
