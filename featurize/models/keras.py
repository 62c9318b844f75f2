"""The Keras model builder: an embedding model (uint8 images in, float32 embeddings out) from
`EmbeddingSettings` and resolved `Weights`, and the `Extractor` protocol every runtime's
extractor follows.

An extractor has two halves: `prepare(path)` turns one image file into a fixed-shape uint8
array (run in worker threads or processes), and `embed(batch)` turns a batch of those into
embeddings (run on the accelerator). Keras is imported only when a model is built. The one
public way to get an extractor is `featurize.runtimes.build_extractor`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

from featurize.errors import UserError
from featurize.models.inputs import model_input
from featurize.models.registry import spec_of
from featurize.models.specs import is_top_layer
from featurize.models.weights import RANDOM_SEED, Weights, load_into
from featurize.settings import EmbeddingSettings


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



class KerasExtractor:
    """uint8 RGB batch -> preprocessing -> frozen base up to the layer -> pooling (-> flip)."""

    def __init__(self, settings: EmbeddingSettings, weights: Weights):
        self.settings = settings
        self.prepare = model_input(settings)  # picklable: runs in worker processes
        self.input_shape = self.prepare.shape
        self.overlap_upload = accelerator()  # see featurize.engines.pipeline
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
    spec = spec_of(settings)
    if weights.kind == "random":
        with seeded(RANDOM_SEED):
            base = spec.build(include_top=is_top_layer(spec, settings.layer),
                              input_size=settings.input_size)
        return _cut(base, settings)
    include_top = is_top_layer(spec, settings.layer)
    if weights.kind == "imagenet":
        from featurize.data.download import cause, network_timeout
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
    spec = spec_of(settings)
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
    return keras.Model(base.input, base.get_layer(layer_name).output,
                       name=f"{spec.short_name}_base")


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
    return keras.Model(images, y, name=f"{spec_of(settings).short_name}_embedding")


def image_input(settings: EmbeddingSettings):
    """A model's uint8 image input, and what the backbone gets from it: the backbone's
    preprocessing, then the crop and resize when they run on the accelerator."""
    import keras

    from featurize.data.images import crop_box
    from featurize.models.preprocessing import ImagePreprocessing

    prep = model_input(settings)
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
