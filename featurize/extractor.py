"""Embedding settings (the cache key) and the extractor they describe.

An extractor has two halves: `prepare(path)` turns one image file into a fixed-shape uint8
array (run in worker threads), and `embed(batch)` turns a batch of those into embeddings
(run on the accelerator). Keras is imported only when an extractor is built.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from .backbones import Backbone, get_backbone, keras_layer_name
from .errors import UserError, check_range
from .images import ModelInput
from .weights import RANDOM_SEED, Weights, load_into, resolve

RESIZE = "pil-bilinear"  # part of the key: a different resize gives different embeddings
DEVICE_RESIZE = "device-bilinear-{}x{}"  # antialiased bilinear in the model, from (h, w)
MAX_INPUT_SIZE = 2048  # a larger side is a typo, or a batch that does not fit in memory
MAX_JITTER = 1000  # dlib computes every jittered copy: 1000 is already 1000x the time


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

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EmbeddingSettings:
        return cls(**json.loads(text))

    @property
    def spec(self) -> Backbone:
        return get_backbone(self.backbone)

    @property
    def model_input(self) -> ModelInput:
        """What the CPU does to each image file before the model sees it."""
        source = None
        if self.resize.startswith("device-"):
            h, w = self.resize.rsplit("-", 1)[1].split("x")
            source = (int(h), int(w))
        return ModelInput(self.input_size, self.crop or None, source)


def make_settings(backbone="vggface-resnet50", weights="default", layer=None, pool=None,
                  input_size=None, crop=None, flip=False, precision="float32", jitter=0,
                  download=True, source_size=None) -> tuple[EmbeddingSettings, Weights]:
    """Validate the options and resolve the weights; no Keras import.

    source_size (height, width): crop and resize on the accelerator, from images brought to
    that size (see `ModelInput`); None resizes on the CPU with Pillow.
    """
    spec = get_backbone(backbone)
    _check_input_size(spec, input_size)
    check_range("--crop", crop, kind=float)
    if crop is not None and not 0 < crop <= 1:
        raise UserError(f"--crop must be a fraction in (0, 1], not {crop}.")
    check_range("--jitter", jitter, 0, MAX_JITTER)
    if pool not in (None, "avg", "max"):
        raise UserError(f"--pool must be avg or max, not {pool!r}.")
    if precision not in ("float32", "mixed"):
        raise UserError(f"--precision must be float32 or mixed, not {precision!r}.")
    if spec.family == "dlib":
        if layer or pool or input_size or flip or crop or source_size:
            raise UserError("dlib-resnet takes no --layer/--pool/--input-size/--flip/--crop/"
                            "--resize: it aligns a 150x150 face chip itself (use --jitter N to "
                            "average).")
    elif jitter:
        raise UserError("--jitter is for the dlib-resnet backbone only.")
    include_top = bool(layer) and _is_top_layer(spec, layer)
    if include_top and input_size not in (None, spec.input_size):
        raise UserError(f"--layer {layer} is in the classifier top of {spec.name}, which "
                        f"needs --input-size {spec.input_size}.")
    w = resolve(spec, weights, include_top=include_top, download=download)
    settings = EmbeddingSettings(
        backbone=spec.name, weights=w.identity,
        weights_file=(w.path.rsplit("/", 1)[-1] if w.path else w.kind), layer=layer or "",
        pooling="none" if spec.family == "dlib" else (pool or spec.default_pool),
        input_size=input_size or spec.input_size, crop=float(crop or 0.0), flip=bool(flip),
        preprocessing=spec.preprocessing, precision=precision, jitter=int(jitter),
        resize=DEVICE_RESIZE.format(*source_size) if source_size else RESIZE)
    return settings, w


def _check_input_size(spec: Backbone, input_size):
    if input_size is None:
        return
    check_range("--input-size", input_size, spec.min_input_size, MAX_INPUT_SIZE)
    if spec.family == "file" and input_size != spec.input_size:
        raise UserError(f"--input-size {input_size}: the model {spec.name} takes "
                        f"{spec.input_size}x{spec.input_size} images; drop --input-size.")


def _is_top_layer(spec: Backbone, layer: str) -> bool:
    return keras_layer_name(layer) in {keras_layer_name(n) for n in spec.top_layers}


def build_extractor(settings: EmbeddingSettings, weights: Weights):
    if settings.spec.family == "dlib":
        from .dlib_backbone import DlibExtractor
        return DlibExtractor(settings, weights)
    return KerasExtractor(settings, weights)


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
        keras.utils.set_random_seed(RANDOM_SEED)
    include_top = bool(settings.layer) and _is_top_layer(spec, settings.layer)
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
    layer_name = settings.layer or spec.feature_layer
    if not layer_name:
        return base
    if spec.family == "vggface":
        layer_name = keras_layer_name(layer_name)
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
    if spec.family != "keras":
        include_top = bool(settings.layer) and _is_top_layer(spec, settings.layer)
        try:
            w = resolve(spec, "default", include_top=include_top, download=False)
        except UserError:
            w = None
        if w is not None and w.sha256 == settings.weights:
            return w
    raise UserError(f"the weights this cache was made with ({settings.weights_file}, sha256 "
                    f"{settings.weights[:12]}...) are not present at {weights_path or 'the default place'}; "
                    "put that file back there.")


def extractor_for(attrs: dict):
    """The extractor that made a cache, from its attributes (for new images)."""
    settings = EmbeddingSettings.from_json(attrs["settings"])
    return build_extractor(settings, weights_for(settings, attrs.get("weights_path", "")))
