"""The embedding options users write (`EmbedderConfig`, checked when made: no Keras import,
no download), the `EmbeddingSettings` they give, the weights a cache was made with, and the
Keras-side extractor a backbone's family makes. The runtime-aware
`featurize.runtimes.build_extractor` is the public way to build an extractor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from featurize.data.images import MAX_PIXELS
from featurize.errors import OptionError, UserError, check_choice, check_range
from featurize.models.registry import DEFAULT_BACKBONE, get_backbone, spec_of
from featurize.models.specs import Backbone, is_top_layer
from featurize.models.weights import Weights, file_sha256, resolve
from featurize.settings import (
    DEVICE_RESIZE,
    MAX_INPUT_SIZE,
    MAX_JITTER,
    POOLS,
    PRECISIONS,
    RESIZE,
    RESIZES,
    SEEDED,
    TTA_PRESETS,
    EmbeddingSettings,
)


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
        check_range("crop", self.crop, kind=float)
        if self.crop is not None and not 0 < self.crop <= 1:
            raise OptionError("crop", f"must be a fraction in (0, 1], not {self.crop}.")
        check_range("jitter", self.jitter, 0, MAX_JITTER)
        check_choice("pool", self.pool, POOLS, none_ok=True)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("resize", self.resize, RESIZES)
        spec.family.check_options(spec, self)
        if self.resize == "cpu" and self.source_size is not None:
            object.__setattr__(self, "resize", "device")  # a source size means device resizing
        if self.source_size is not None:
            if not isinstance(self.source_size, (tuple, list)) or len(self.source_size) != 2:
                raise OptionError("source_size",
                                  f"must be (height, width), not {self.source_size!r}.")
            for side in self.source_size:
                check_range("source_size", side, 1, MAX_PIXELS)
            object.__setattr__(self, "source_size", tuple(self.source_size))
        if is_top_layer(spec, self.layer) and self.input_size not in (None, spec.input_size):
            raise UserError(f"--layer {self.layer} is in the classifier top of {spec.name}, "
                            f"which needs --input-size {spec.input_size}.")

    def settings(self, download: bool = True) -> tuple[EmbeddingSettings, Weights]:
        """The cache key these options give, and the weights (resolved: downloaded once)."""
        if self.resize == "device" and self.source_size is None:
            raise UserError("--resize device needs the images' size: give source_size=(height, "
                            "width), or use resize='cpu'.")
        spec = get_backbone(self.backbone)
        w = resolve(spec, self.weights, include_top=is_top_layer(spec, self.layer),
                    download=download)
        settings = EmbeddingSettings(
            backbone=spec.name, weights=w.identity,
            weights_file=(w.path.rsplit("/", 1)[-1] if w.path else w.kind),
            layer=self.layer or "",
            pooling=self.pool or spec.default_pool,  # dlib's "none": it takes no --pool
            input_size=self.input_size or spec.input_size, crop=float(self.crop or 0.0),
            flip=bool(self.flip), preprocessing=spec.preprocessing, precision=self.precision,
            jitter=int(self.jitter),
            jitter_scheme=SEEDED if self.jitter else "",
            resize=DEVICE_RESIZE.format(*self.source_size) if self.source_size else RESIZE,
            # dlib-resnet's own chip is its alignment: its settings stay those it always had
            align=self.align if self.align and spec.crop_protocol else "none")
        return settings, w


def make_settings(backbone=DEFAULT_BACKBONE, weights="default", download=True,
                  **options) -> tuple[EmbeddingSettings, Weights]:
    """Validate the options (the fields of `EmbedderConfig`) and resolve the weights; no
    Keras import."""
    return EmbedderConfig(backbone, weights, **options).settings(download=download)


def _apply_tta(spec: Backbone, config: EmbedderConfig):
    """--tta NAME: the --jitter of the preset (for dlib-resnet only; not with --jitter)."""
    if config.tta is None:
        return
    check_choice("tta", config.tta, tuple(TTA_PRESETS))
    if config.jitter not in (0, TTA_PRESETS[config.tta]):  # equal: a replace() of a config
        raise UserError(f"--tta {config.tta} sets the jitter itself (to "
                        f"{TTA_PRESETS[config.tta]}); give --tta or --jitter {config.jitter}, "
                        "not both.")
    if TTA_PRESETS[config.tta] and spec.family.name != "dlib":
        raise UserError(f"--tta {config.tta} averages jittered face chips of dlib-resnet; "
                        f"{spec.name} has --flip instead.")
    object.__setattr__(config, "jitter", TTA_PRESETS[config.tta])


def jitter_cost_line(config: EmbedderConfig) -> str | None:
    """What --jitter N / --tta costs, said before a run; None without jitter."""
    if not config.jitter:
        return None
    n = config.jitter  # measured (benchmarks/jitter_curve.py --speed): 0.7x to 0.84x of N+1 runs
    how = f"--tta {config.tta}" if config.tta else f"--jitter {n}"
    preset = f" (--jitter {n})" if config.tta else ""
    return (f"{how}{preset}: each face goes through the network {n + 1} times (the chip and "
            f"{n} jittered copies), about {n + 1}x the time of the default --tta fast.")


def _check_align(spec: Backbone, config: EmbedderConfig):
    """--align: a known preset, for a face model, with options that leave the crop to it."""
    from featurize.models.align import check_align
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
    check_range("input_size", input_size, spec.min_input_size, MAX_INPUT_SIZE)
    spec.family.check_input_size(spec, input_size)


def weights_for(settings: EmbeddingSettings, weights_path: str = "") -> Weights:
    """Find the weights a cache was made with (same identity), or say where to put them."""
    spec = spec_of(settings)
    if settings.weights.startswith("random"):
        return Weights("random")
    if settings.weights == "imagenet":
        return Weights("imagenet")
    if (weights_path and os.path.isfile(weights_path)
            and file_sha256(weights_path) == settings.weights):
        return Weights("file", weights_path, settings.weights)
    include_top = is_top_layer(spec, settings.layer)
    try:  # the family's default file, if that is what made the cache
        w = resolve(spec, "default", include_top=include_top, download=False)
    except UserError:
        w = None
    if w is not None and w.sha256 == settings.weights:
        return w
    raise UserError(f"the weights this cache was made with ({settings.weights_file}, sha256 "
                    f"{settings.weights[:12]}...) are not present at "
                    f"{weights_path or 'the default place'}; "
                    "put that file back there.")

def family_extractor(settings: EmbeddingSettings, weights: Weights):
    """The extractor the settings' backbone family makes itself (Keras, or dlib): what
    `featurize.runtimes.build_extractor` runs when the runtime is Keras."""
    return spec_of(settings).family.make_extractor(settings, weights)
