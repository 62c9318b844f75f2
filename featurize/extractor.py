"""Embedding settings (the cache key) and the extractor they describe.

An extractor has two halves: `prepare(path)` turns one image file into a fixed-shape uint8
array (run in worker threads), and `embed(batch)` turns a batch of those into embeddings
(run on the accelerator). Keras is imported only when an extractor is built.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol, runtime_checkable

from .backbones import DEFAULT_BACKBONE, Backbone, get_backbone, keras_layer_name
from .errors import UserError, check_range
from .images import MAX_PIXELS, ModelInput
from .weights import RANDOM_SEED, Weights, load_into, resolve


@runtime_checkable
class Extractor(Protocol):
    """What featurize, predict, finetune and verify need of an extractor (a family makes it).

    Optional, found with getattr: `input_shape` (of a prepared image; None: `prepare` returns
    embeddings, any shape), `parallel` ("process": `prepare` runs in worker processes,
    for work that holds the GIL), `overlap_upload` (copy the next batch to the accelerator
    while this one runs) and `to_device(batch)` (a batch as a backend tensor).
    """

    prepare: Callable[[str], Any]  # one image file -> a fixed-shape array (picklable)
    dim: int  # the length of one embedding

    def embed(self, batch) -> Any:
        """A batch of prepared images -> (N, dim) float32 embeddings."""

    def provenance(self) -> dict:
        """Versions of what computed the embeddings, recorded with them."""


RESIZE = "pil-bilinear"  # part of the key: a different resize gives different embeddings
DEVICE_RESIZE = "device-bilinear-{}x{}"  # antialiased bilinear in the model, from (h, w)
MAX_INPUT_SIZE = 2048  # a larger side is a typo, or a batch that does not fit in memory
MAX_JITTER = 1000  # dlib computes every jittered copy: 1000 is already 1000x the time
# --tta: named --jitter choices for dlib-resnet (benchmarks/jitter_curve.py measured them on
# LFW View 1). "accurate" is the cheapest jitter count whose accuracy matches the best measured
# within noise; it is a shorthand for --jitter N, and shares that cache.
TTA_PRESETS = {"fast": 0, "accurate": 4}


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
    align: str = "none"  # --align preset (featurize.align); "none" is left out of the key
    # How --jitter N jitters (featurize.dlib_backbone): "seeded" (pass i of an image depends
    # only on its chip and i); "" for no jitter, and for caches made before, whose --jitter
    # was dlib's unseeded one. Left out of the key when "": those caches keep their keys.
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
    def spec(self) -> Backbone:
        return get_backbone(self.backbone)

    @property
    def model_input(self) -> ModelInput:
        """What the CPU does to each image file before the model sees it: with --align, the
        face crop of the backbone's protocol (featurize.align.AlignedInput)."""
        if self.align != "none":
            from .align import AlignedInput
            return AlignedInput(self.input_size, self.spec.crop_protocol)
        source = None
        if self.resize.startswith("device-"):
            h, w = self.resize.rsplit("-", 1)[1].split("x")
            source = (int(h), int(w))
        return ModelInput(self.input_size, self.crop or None, source)


@dataclass(frozen=True)
class EmbedderConfig:
    """The embedding options, checked when made (no Keras import, no download): what the
    `--backbone ... --resize` options and `featurize.Embedder(...)` take. Every default is
    written here once; the command line reads its defaults from these fields.

    resize "device" crops and resizes on the accelerator, from images brought to
    `source_size` (height, width); featurize takes it from the dataset's first image.
    """

    backbone: str = DEFAULT_BACKBONE
    weights: str = "default"  # "default", "none" (random, seeded) or a weight file path
    layer: str | None = None
    pool: str | None = None  # "avg" or "max"; None: the backbone's
    input_size: int | None = None  # None: the backbone's
    crop: float | None = None
    flip: bool = False
    precision: str = "float32"
    jitter: int = 0
    resize: str = "cpu"
    source_size: tuple[int, int] | None = None
    align: str | None = None  # "none" or "dlib" (featurize.align); None: "none"
    tta: str | None = None  # dlib-resnet: a TTA_PRESETS name, instead of --jitter N

    def __post_init__(self):
        spec = get_backbone(self.backbone)
        _check_align(spec, self)
        _apply_tta(spec, self)
        _check_input_size(spec, self.input_size)
        check_range("--crop", self.crop, kind=float)
        if self.crop is not None and not 0 < self.crop <= 1:
            raise UserError(f"--crop must be a fraction in (0, 1], not {self.crop}.")
        check_range("--jitter", self.jitter, 0, MAX_JITTER)
        _check_choice("--pool", self.pool, POOLS, none_ok=True)
        _check_choice("--precision", self.precision, PRECISIONS)
        _check_choice("--resize", self.resize, RESIZES)
        spec.family.check_options(spec, self)
        if self.resize == "cpu" and self.source_size is not None:
            object.__setattr__(self, "resize", "device")  # a source size means device resizing
        if self.source_size is not None:
            if not isinstance(self.source_size, (tuple, list)) or len(self.source_size) != 2:
                raise UserError(f"source_size must be (height, width), not {self.source_size!r}.")
            for side in self.source_size:
                check_range("source_size", side, 1, MAX_PIXELS)
            object.__setattr__(self, "source_size", tuple(self.source_size))
        if _is_top(spec, self.layer) and self.input_size not in (None, spec.input_size):
            raise UserError(f"--layer {self.layer} is in the classifier top of {spec.name}, "
                            f"which needs --input-size {spec.input_size}.")

    def settings(self, download: bool = True) -> tuple[EmbeddingSettings, Weights]:
        """The cache key these options give, and the weights (resolved: downloaded once)."""
        if self.resize == "device" and self.source_size is None:
            raise UserError("--resize device needs the images' size: give source_size=(height, "
                            "width), or use resize='cpu'.")
        spec = get_backbone(self.backbone)
        w = resolve(spec, self.weights, include_top=_is_top(spec, self.layer), download=download)
        settings = EmbeddingSettings(
            backbone=spec.name, weights=w.identity,
            weights_file=(w.path.rsplit("/", 1)[-1] if w.path else w.kind),
            layer=self.layer or "",
            pooling=self.pool or spec.default_pool,  # dlib's "none": it takes no --pool
            input_size=self.input_size or spec.input_size, crop=float(self.crop or 0.0),
            flip=bool(self.flip), preprocessing=spec.preprocessing, precision=self.precision,
            jitter=int(self.jitter),
            jitter_scheme=_seeded_scheme() if self.jitter else "",
            resize=DEVICE_RESIZE.format(*self.source_size) if self.source_size else RESIZE,
            # dlib-resnet's own chip is its alignment: its settings stay those it always had
            align=self.align if self.align and spec.crop_protocol else "none")
        return settings, w


POOLS = ("avg", "max")
PRECISIONS = ("float32", "mixed", "int8")  # int8: CPU, quantised (featurize.runtimes.int8)
RESIZES = ("cpu", "device")


def _check_choice(option: str, value, choices, none_ok: bool = False):
    if value is None and none_ok:
        return
    if value not in choices:
        raise UserError(f"{option} must be {' or '.join(choices)}, not {value!r}.")


def make_settings(backbone=DEFAULT_BACKBONE, weights="default", download=True,
                  **options) -> tuple[EmbeddingSettings, Weights]:
    """Validate the options (the fields of `EmbedderConfig`) and resolve the weights; no
    Keras import."""
    return EmbedderConfig(backbone, weights, **options).settings(download=download)


_KEYLESS_DEFAULTS = {"align": "none", "jitter_scheme": "", "precision_engine": ""}


def _seeded_scheme() -> str:
    from .dlib_backbone import SEEDED  # no dlib import: the module imports it lazily
    return SEEDED


def _apply_tta(spec: Backbone, config: EmbedderConfig):
    """--tta NAME: the --jitter of the preset (for dlib-resnet only; not with --jitter)."""
    if config.tta is None:
        return
    _check_choice("--tta", config.tta, tuple(TTA_PRESETS))
    if config.jitter not in (0, TTA_PRESETS[config.tta]):  # equal: a replace() of a config
        raise UserError(f"--tta {config.tta} sets the jitter itself (to "
                        f"{TTA_PRESETS[config.tta]}); give --tta or --jitter {config.jitter}, "
                        "not both.")
    if TTA_PRESETS[config.tta] and spec.family.name != "dlib":
        raise UserError(f"--tta {config.tta} averages jittered face chips of dlib-resnet; "
                        f"{spec.name} has --flip instead.")
    object.__setattr__(config, "jitter", TTA_PRESETS[config.tta])


def tta_of(jitter: int, scheme: str) -> str:
    """The --tta preset that `jitter` and `scheme` amount to, for the provenance: a preset
    name, or "custom" (another --jitter, or dlib's unseeded jitter of older caches)."""
    seeded = scheme == _seeded_scheme() or not jitter
    names = [name for name, n in TTA_PRESETS.items() if n == jitter and seeded]
    return names[0] if names else "custom"


def jitter_cost_line(config: EmbedderConfig) -> str | None:
    """What --jitter N / --tta costs, said before a run; None without jitter."""
    if not config.jitter:
        return None
    n = config.jitter  # measured (benchmarks/jitter_curve.py): 0.7x to 1.25x of N+1 plain runs
    how = f"--tta {config.tta}" if config.tta else f"--jitter {n}"
    preset = f" (--jitter {n})" if config.tta else ""
    return (f"{how}{preset}: each face goes through the network {n + 1} times (the chip and "
            f"{n} jittered copies), about {n + 1}x the time of the default --tta fast.")


def _check_align(spec: Backbone, config: EmbedderConfig):
    """--align: a known preset, for a face model, with options that leave the crop to it."""
    from .align import check_align
    if config.align is None or (config.align == "dlib" and spec.align == "dlib"
                                and spec.crop_protocol is None):
        return  # dlib-resnet: the preset is built in
    check_align(config.align, spec)
    if config.align != "none" and (config.crop or config.resize != "cpu" or config.source_size):
        raise UserError(f"--align {config.align} cuts the face crop itself; drop --crop and "
                        "--resize device.")


def _check_input_size(spec: Backbone, input_size):
    if input_size is None:
        return
    check_range("--input-size", input_size, spec.min_input_size, MAX_INPUT_SIZE)
    spec.family.check_input_size(spec, input_size)


def _is_top_layer(spec: Backbone, layer: str) -> bool:
    return keras_layer_name(layer) in {keras_layer_name(n) for n in spec.top_layers}


def _is_top(spec: Backbone, layer: str | None) -> bool:
    return bool(layer) and _is_top_layer(spec, layer)


def build_extractor(settings: EmbeddingSettings, weights: Weights) -> Extractor:
    """The extractor the settings' backbone family makes (Keras imported only now)."""
    if settings.precision == "int8":
        raise UserError("--precision int8 runs on ONNX Runtime: build the extractor with "
                        "featurize.runtimes.build_extractor, or use --precision float32.")
    if settings.precision_engine:  # bfloat16 on OpenVINO: not Keras's mixed precision
        from .runtimes import build_extractor as build_runtime_extractor
        return build_runtime_extractor(settings, weights)
    return settings.spec.family.make_extractor(settings, weights)


class KerasExtractor:
    """uint8 RGB batch -> preprocessing -> frozen base up to the layer -> pooling (-> flip)."""

    def __init__(self, settings: EmbeddingSettings, weights: Weights):
        self.settings = settings
        self.prepare = settings.model_input  # picklable: runs in worker processes
        self.input_shape = self.prepare.shape
        self.overlap_upload = accelerator()  # see featurize.pipeline
        self.model = build_embedding_model(settings, weights)
        self.dim = int(self.model.output.shape[-1])

    @staticmethod
    def provenance() -> dict:
        import keras
        return {"keras_version": keras.__version__, "backend": keras.backend.backend()}

    @staticmethod
    def to_device(batch):
        """The batch as a backend tensor (on the accelerator, if there is one)."""
        import keras
        return keras.ops.convert_to_tensor(batch)

    def embed(self, batch):
        """Embeddings of a uint8 batch (a NumPy array or a `to_device` tensor)."""
        import numpy as np
        return np.asarray(self.model.predict_on_batch(batch), dtype=np.float32)


def build_base(settings: EmbeddingSettings, weights: Weights):
    """The backbone with its weights, cut at the embedding layer (no preprocessing/pooling)."""
    import keras

    spec = settings.spec
    if weights.kind == "random":
        with seeded(RANDOM_SEED):
            base = spec.build(include_top=_is_top(spec, settings.layer),
                              input_size=settings.input_size)
        return _cut(base, settings)
    include_top = _is_top(spec, settings.layer)
    if weights.kind == "imagenet":
        from .download import cause, network_timeout
        try:
            with network_timeout():
                base = spec.build(include_top, settings.input_size, imagenet=True)
        except Exception as e:
            raise UserError(f"could not get the ImageNet weights of {spec.name} ({cause(e)}); "
                            "connect to the internet once, or pass --weights PATH or "
                            "--weights none.") from None
    else:
        base = spec.build(include_top=include_top, input_size=settings.input_size)
        load_into(base, spec, weights)
    return _cut(base, settings)


_SEEDING = threading.Lock()  # the generators are the process's: one seeded build at a time


@contextmanager
def _random_state_kept():
    """The caller's Python and NumPy global random states are as they were afterwards."""
    import random

    import numpy as np
    with _SEEDING:
        saved = random.getstate(), np.random.get_state()
        try:
            yield
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])


def import_keras():
    """`import keras`, without the draw from Python's global generator that its first import
    makes (the caller's random state is theirs)."""
    with _random_state_kept():
        import keras
    return keras


@contextmanager
def seeded(seed: int):
    """Inside: the generators Keras draws initial weights from are seeded like
    `keras.utils.set_random_seed(seed)` seeds them (so the network is the same); after: the
    caller's Python and NumPy global states and Keras's seed attributes are back as they
    were. TensorFlow's and torch's global seeds, which set_random_seed also sets, are left
    alone: Keras 3 initializers draw from Keras's own seed generator, never from them."""
    import random

    import numpy as np
    import_keras()
    from keras.src.backend.common import global_state
    from keras.src.random.seed_generator import GLOBAL_SEED_GENERATOR
    names = ("global_random_seed", GLOBAL_SEED_GENERATOR)
    with _random_state_kept():
        saved = [global_state.get_global_attribute(n) for n in names]
        global_state.set_global_attribute(names[0], seed)
        global_state.set_global_attribute(names[1], None)  # recreated from the seed
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            for name, value in zip(names, saved):
                global_state.set_global_attribute(name, value)


def _cut(base, settings: EmbeddingSettings):
    """The base cut at the embedding layer (the backbone's feature layer, or --layer)."""
    import keras
    spec = settings.spec
    layer_name = settings.layer or spec.feature_layer
    if not layer_name:
        return base
    layer_name = spec.family.layer_name(layer_name)
    names = [layer.name for layer in base.layers]
    if layer_name not in names:
        import difflib
        close = difflib.get_close_matches(layer_name, names, n=5, cutoff=0.5) or names[-5:]
        raise UserError(f"{spec.name} has no layer {settings.layer!r}; candidates: "
                        f"{', '.join(close)}.")
    return keras.Model(base.input, base.get_layer(layer_name).output, name=f"{spec.short_name}_base")


def pool_features(features, pooling: str, **layer_kwargs):
    """The embedding of a layer's output: global avg/max pooling of a feature map, else flat."""
    from keras import layers
    if len(features.shape) == 4:
        pool = layers.GlobalAveragePooling2D if pooling == "avg" else layers.GlobalMaxPooling2D
        return pool(**layer_kwargs)(features)
    return layers.Flatten(**layer_kwargs)(features)


def accelerator() -> bool:
    """Whether Keras's backend runs on a GPU or TPU here."""
    import keras
    try:
        devices = keras.distribution.list_devices()
    except (NotImplementedError, AttributeError):  # a backend without distribution support
        return keras.backend.backend() == "torch" and _torch_cuda()
    return bool(devices) and not devices[0].lower().startswith("cpu")


def _torch_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def default_batch_size() -> int:
    """256 on an accelerator (fills it; one fixed shape, so one compilation), 32 on a CPU."""
    return 256 if accelerator() else 32


@contextmanager
def precision(name: str):
    """Layers built inside get the precision's dtype policy; the global policy is restored."""
    import keras
    previous = keras.mixed_precision.global_policy()
    # bfloat16 keeps float32's range (no loss scaling); H100s and recent CPUs run it fast.
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if name == "mixed" else "float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def build_embedding_model(settings: EmbeddingSettings, weights: Weights):
    """One Keras model: raw uint8 images in, float32 embeddings out."""
    with precision(settings.precision):
        return _build_embedding_model(settings, weights)


def _build_embedding_model(settings: EmbeddingSettings, weights: Weights):
    import keras
    from keras import layers, ops

    base = build_base(settings, weights)
    base.trainable = False
    images, x = image_input(settings)

    def pooled(t):
        return pool_features(base(t, training=False), settings.pooling, dtype="float32")

    y = pooled(x)
    if settings.flip:
        y = layers.Average(name="flip_average", dtype="float32")([y, pooled(ops.flip(x, axis=2))])
    return keras.Model(images, y, name=f"{settings.spec.short_name}_embedding")


def image_input(settings: EmbeddingSettings):
    """A model's uint8 image input, and what the backbone gets from it: the backbone's
    preprocessing, then the crop and resize when they run on the accelerator."""
    import keras

    from .images import crop_box
    from .preprocessing import ImagePreprocessing

    prep = settings.model_input
    images = keras.Input(prep.shape, dtype="uint8", name="image")
    # Per-pixel affine preprocessing commutes with crop and resize, and gives them floats.
    x = ImagePreprocessing(settings.preprocessing, name="preprocessing")(images)
    if prep.source:
        h, w = prep.source
        if prep.crop:
            top, left, ch, cw = crop_box(h, w, prep.crop)
            x = keras.layers.Cropping2D(((top, h - top - ch), (left, w - left - cw)),
                                        dtype="float32", name="crop")(x)
        # antialiased, like Pillow's bilinear: a shrink averages, it does not skip pixels
        x = keras.layers.Resizing(prep.size, prep.size, interpolation="bilinear",
                                  antialias=True, dtype="float32", name="resize")(x)
    return images, x


def weights_for(settings: EmbeddingSettings, weights_path: str = "") -> Weights:
    """Find the weights a cache was made with (same identity), or say where to put them."""
    spec = settings.spec
    if settings.weights.startswith("random"):
        return Weights("random")
    if settings.weights == "imagenet":
        return Weights("imagenet")
    from .weights import file_sha256
    if weights_path and os.path.isfile(weights_path) and file_sha256(weights_path) == settings.weights:
        return Weights("file", weights_path, settings.weights)
    include_top = bool(settings.layer) and _is_top_layer(spec, settings.layer)
    try:  # the family's default file, if that is what made the cache
        w = resolve(spec, "default", include_top=include_top, download=False)
    except UserError:
        w = None
    if w is not None and w.sha256 == settings.weights:
        return w
    raise UserError(f"the weights this cache was made with ({settings.weights_file}, sha256 "
                    f"{settings.weights[:12]}...) are not present at {weights_path or 'the default place'}; "
                    "put that file back there.")


def extractor_for(attrs: dict) -> Extractor:
    """The extractor that made a cache, from its attributes (for new images)."""
    from .runtimes import recorded_runtime_extractor
    return recorded_runtime_extractor(attrs)
