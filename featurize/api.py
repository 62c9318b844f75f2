"""The Python API: embed images in memory, embed a folder into a cache, open a cache.

    import featurize
    embedder = featurize.Embedder("vggface-vgg16")        # weights resolved (downloaded once)
    X = embedder(["a.jpg", pil_image, uint8_array])       # (3, 512) float32, like the cache
    cache = featurize.embed_folder("data/lfw", embedder)  # incremental, locked, resumable
    cache.X, cache.y, cache.classes, cache.to_pandas()

Nothing here changes the caller's process: no signal handler, no random seed, no Pillow
flag, no socket timeout, no Keras dtype policy is left changed (the command line alone
handles SIGTERM).
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import numpy as np

from featurize import cache as cache_io
from featurize.data.images import ImageError
from featurize.errors import UserError, check_range
from featurize.jobs.run import MAX_BATCH_SIZE
from featurize.models.config import EmbedderConfig
from featurize.models.keras import Extractor, default_batch_size
from featurize.models.registry import DEFAULT_BACKBONE, spec_of
from featurize.runtimes import build_extractor, check_runtime, settle
from featurize.settings import EmbeddingSettings

_SERIAL = threading.Lock()  # for families whose extractors are not thread-safe (dlib)
PER_IMAGE_BATCH = 32  # a family that works per image has no accelerator to fill
_EMBEDDING_FIELDS = set(EmbedderConfig.__dataclass_fields__)
_IMAGE_HELP = "give image file paths, PIL images or uint8 arrays of shape (height, width, 3)"


class Embedder:
    """A frozen backbone that embeds images in memory, exactly as `featurize` embeds files.

    The options are those of `EmbedderConfig` (crop=, flip=, precision=, jitter=, resize=,
    source_size=, align= as keywords; align="dlib" cuts each face the way the backbone was
    trained on, see featurize.models.align); runtime= "keras", "onnx" or "openvino" runs the
    same model (default None: the fastest faithful one installed, see featurize.runtimes),
    the same `featurize.build_extractor` featurize and classify use. The weights
    are resolved when it is made; the model is built once, on first use. `embedder(images)`
    takes one image or a list of them: file paths (decoded like the cache's, bad files are a
    UserError naming them), PIL images or uint8 arrays (converted to RGB and resized like a
    file's pixels; in-memory JPEGs are resized from full resolution, where files are decoded
    at reduced scale when much larger), and returns an (N, D) float32 array.
    """

    def __init__(self, backbone=DEFAULT_BACKBONE, weights="default", layer=None, pool=None,
                 input_size=None, *, batch_size=None, runtime=None, **options):
        if isinstance(backbone, EmbedderConfig):
            config = backbone
        else:
            config = EmbedderConfig(backbone, weights, layer, pool, input_size, **options)
        self.batch_size = check_range("batch_size", batch_size, 1, MAX_BATCH_SIZE)
        self.runtime = check_runtime(runtime)  # None: the fastest faithful one installed
        self.config = config
        self.settings, self.resolved_weights = config.settings()
        self.settings = settle(self.settings, self.runtime)  # mixed: bfloat16 on OpenVINO
        self._extractor = None
        self._building = threading.Lock()

    @classmethod
    def for_cache(cls, cache) -> Embedder:
        """The embedder that made a cache (a `Cache` or its path), for new images."""
        from featurize.models.config import weights_for
        if isinstance(cache, dict):
            attrs = cache
        else:
            attrs = cache.attrs if isinstance(cache, cache_io.Cache) else cache_io.read_attrs(cache)
        settings = EmbeddingSettings.from_json(attrs["settings"])
        embedder = cls.__new__(cls)
        embedder.batch_size, embedder.config, embedder.runtime = None, None, None
        embedder.settings = settings
        embedder.resolved_weights = weights_for(settings, attrs.get("weights_path", ""))
        embedder._extractor, embedder._building = None, threading.Lock()
        return embedder

    @property
    def extractor(self) -> Extractor:
        """The built extractor (the model is built on first use, once)."""
        with self._building:
            if self._extractor is None:
                self._extractor = build_extractor(self.settings, self.resolved_weights,
                                                  self.runtime)
            return self._extractor

    @property
    def dim(self) -> int:
        """Length of one embedding (builds the model if needed)."""
        return int(self.extractor.dim)

    def __repr__(self) -> str:
        s = self.settings
        return (f"Embedder({s.backbone!r}, weights={s.weights_file!r}, layer={s.layer!r}, "
                f"pooling={s.pooling!r}, input_size={s.input_size})")

    def __call__(self, images, batch_size: int | None = None) -> np.ndarray:
        items = _as_list(images)
        extractor = self.extractor
        if not spec_of(self.settings).family.thread_safe or self.settings.align != "none":
            # dlib (its descriptor, or --align's detector) is not thread-safe
            with _SERIAL:
                return self._embed(items, extractor, batch_size)
        return self._embed(items, extractor, batch_size)

    def _embed(self, items: list, extractor: Extractor, batch_size: int | None) -> np.ndarray:
        size = check_range("batch_size", batch_size, 1, MAX_BATCH_SIZE) or self.batch_size
        if size is None:
            per_image = spec_of(self.settings).family.per_image
            size = PER_IMAGE_BATCH if per_image else default_batch_size()
        out = np.empty((len(items), extractor.dim), dtype=np.float32)
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
            prepared = np.stack([self._prepare(extractor.prepare, image, start + i)
                                 for i, image in enumerate(chunk)])
            out[start:start + len(chunk)] = extractor.embed(prepared)
        return out

    def _prepare(self, prepare, image, index: int) -> np.ndarray:
        """What the extractor's `prepare` makes of a file, for a path or in-memory pixels."""
        if isinstance(image, (str, Path)):
            if not os.path.lexists(image):
                raise UserError(f"image {image} does not exist; {_IMAGE_HELP}.")
            try:
                return prepare(str(image))
            except ImageError as e:
                raise UserError(f"image {image} cannot be embedded: {e}; {_IMAGE_HELP}.") from None
        return spec_of(self.settings).family.prepare_pixels(self.settings, _rgb(image, index))


def _as_list(images) -> list:
    """One image or many, as a list of single images."""
    if isinstance(images, (str, Path)) or _is_pil(images):
        return [images]
    if isinstance(images, np.ndarray):
        return [images] if images.ndim in (2, 3) else list(images)
    try:
        return list(images)
    except TypeError:
        raise UserError(f"cannot embed a {type(images).__name__}; {_IMAGE_HELP}.") from None


def _is_pil(image) -> bool:
    from PIL import Image
    return isinstance(image, Image.Image)


def _rgb(image, index: int) -> np.ndarray:
    """In-memory pixels as an RGB uint8 array, converted the way a decoded file is."""
    from PIL import Image, ImageOps

    from featurize.data.images import _to_rgb
    if _is_pil(image):
        try:
            image = ImageOps.exif_transpose(image)  # as files are; a no-op once applied
        except Exception:  # a broken EXIF block must not lose the pixels, as for files
            pass
        return np.asarray(_to_rgb(image), dtype=np.uint8)
    if not isinstance(image, np.ndarray):
        raise UserError(f"image {index} is a {type(image).__name__}; {_IMAGE_HELP}.")
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
            image.ndim == 3 and image.shape[2] not in (1, 3, 4)) or 0 in image.shape[:2]:
        raise UserError(f"image {index} is an array of {image.dtype} with shape {image.shape}; "
                        f"{_IMAGE_HELP} (values 0-255), or (height, width) grayscale.")
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    return np.asarray(_to_rgb(Image.fromarray(image.squeeze())), dtype=np.uint8)


def embed_folder(source, embedder_or_settings=None, cache=None, progress=True,
                 **options) -> cache_io.Cache:
    """Embed every image of `source` (a folder of class folders, a flat folder or a list
    file) into its cache, as `python -m featurize` does: incremental (only new or changed
    files are embedded), locked, resumable. Returns the opened cache, with the run's
    `Summary` as `.summary`. Ctrl-C commits what was embedded and raises KeyboardInterrupt:
    calling again resumes.

    embedder_or_settings: an `Embedder` (its model is reused), an `EmbedderConfig`, a `Cache`
    or its `EmbeddingSettings` (embed as that cache was), or None (the options' or the
    defaults);
    cache: the cache file (an existing file or a name ending .h5), or else a folder to keep
    it in, named after the dataset and settings (default: data/cache/);
    options: fields of `EmbedderConfig` (when no embedder is given) and of `RunOptions`
    (batch_size=, workers=, check=...).
    """
    from featurize.jobs.run import FeaturizeOptions, featurize
    embedder = embedder_or_settings if isinstance(embedder_or_settings, Embedder) else None
    if isinstance(embedder_or_settings, cache_io.Cache):  # its weights file is known too
        embedder = Embedder.for_cache(embedder_or_settings)
    elif isinstance(embedder_or_settings, EmbeddingSettings):
        embedder = Embedder.for_cache({"settings": embedder_or_settings.to_json()})
    elif isinstance(embedder_or_settings, EmbedderConfig):
        options = {**vars(embedder_or_settings), **options}
    elif embedder_or_settings is not None and embedder is None:
        raise UserError(f"embed_folder takes an Embedder, an EmbedderConfig, a Cache or "
                        f"EmbeddingSettings, not a {type(embedder_or_settings).__name__}.")
    if embedder is not None and set(options) & _EMBEDDING_FIELDS:
        raise UserError(f"embed_folder: {', '.join(sorted(set(options) & _EMBEDDING_FIELDS))} "
                        "belong to the Embedder given; make the Embedder with them instead.")
    if cache is not None:
        options[_cache_option(Path(cache))] = cache
    run_options = FeaturizeOptions.from_kwargs(progress=progress, **options)
    summary = featurize(source, run_options, embedder=embedder)
    if summary.interrupted:  # what was done is committed: calling again resumes
        raise KeyboardInterrupt
    if summary.degenerate:
        warnings.warn(summary.degenerate, RuntimeWarning, stacklevel=2)
    opened = open_cache(summary.path)
    opened.summary = summary
    return opened


def _cache_option(cache: Path) -> str:
    """A cache file (an existing file, or a name ending .h5) or a folder to keep it in."""
    if cache.is_file() or (not cache.is_dir() and cache.suffix in (".h5", ".hdf5")):
        return "out"
    return "cache_dir"


def open_cache(path) -> cache_io.Cache:
    """Read a cache file (checked: a damaged one is a UserError, never a wrong result)."""
    return cache_io.read(path)


def compact_cache(path, everything: bool = False) -> dict:
    """Merge a cache's small and mostly masked shards into one (every shard with
    `everything`), as `python -m featurize compact` does; returns the shard counts."""
    return cache_io.compact(path, everything=everything)


def export_cache(path, out, format: str = "parquet", rows_per_file: int | None = None,
                 overwrite: bool = False, normalize: bool = False):
    """Write a cache for vector-search tools (parquet, or npy + parquet metadata), as
    `python -m featurize export` does; `normalize`: rows at unit L2 length, as --normalize
    (inner product is then cosine similarity). See featurize.jobs.export."""
    from featurize.jobs.export import export
    return export(path, out, format, rows_per_file, overwrite, normalize=normalize)
