"""The options of training and fine-tuning, validated once, shared by the API and the CLI.

Each dataclass checks itself when it is made (`__post_init__`), so an object that exists is
valid, whether it came from `python -m classify` (whose argparse defaults are these fields'
defaults) or from `classify.train(...)` in a notebook. Messages name the command-line option,
as the rest of the project's do.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from featurize.errors import OptionError, UserError, check_flag, check_range

DEFAULT_HEAD = "logreg"  # one of classify._heads.HEADS (not imported here: scikit-learn)
SAFE_LR = 1e-5  # fine-tuning's default Adam learning rate
RISKY_LR = 1e-3  # above this, with unfrozen layers, pretrained weights get wrecked
SEED_MAX = 2**32 - 1  # numpy's seed range


def defaults(cls) -> dict:
    """{field: default} of an options dataclass: the CLI's argparse defaults."""
    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING}


def check_fraction(option: str, value) -> float:
    """A number strictly between 0 and 1 (NaN is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise OptionError(option, f"must be a fraction between 0 and 1 (exclusive), not {value}.")
    return value


@dataclass(frozen=True)
class TrainOptions:
    """How a head is trained and judged. `params` is a dict of the head's hyper-parameters
    (or `key=value` strings, as --param gives them); it holds checked, parsed values after
    construction. `normalize=None` means: on for face backbones."""

    head: str = DEFAULT_HEAD
    params: Mapping = field(default_factory=dict)
    min_per_class: int = 1
    max_per_class: int | None = None
    test_size: float = 0.25
    cv: int | None = None
    seed: int = 0
    normalize: bool | None = None
    standardize: bool = False
    pca: int | None = None
    # Open-set identification (classify/openset.py): whole people held out as unknowns.
    open_set: bool = False
    unknown_fraction: float = 0.25  # of the people, when --min-per-class excludes no one
    max_unknown: int = 2000  # unknown probe images at most
    target_far: float = 0.01  # the false-alarm rate the learnt threshold aims at

    def __post_init__(self):
        from classify import _heads as heads  # scikit-learn: only once options are really made
        spec = heads.get_head(self.head)
        if isinstance(self.params, Mapping):
            params = heads.check_params(spec, dict(self.params))
        elif isinstance(self.params, (list, tuple)):
            params = heads.parse_params(spec, list(self.params))
        else:
            params = heads.check_params(spec, self.params)  # the one message for a bad type
        object.__setattr__(self, "params", params)
        self._check_selection()
        check_flag("normalize", self.normalize, allow_none=True)
        check_flag("standardize", self.standardize)
        self._check_open_set()

    def _check_open_set(self) -> None:
        check_flag("open_set", self.open_set)
        check_fraction("unknown_fraction", self.unknown_fraction)
        check_range("max_unknown", self.max_unknown, 1)
        check_fraction("target_far", self.target_far)
        if self.open_set and self.cv is not None:
            raise UserError(f"--open-set evaluates on one held-out split of the known people "
                            f"and cannot be combined with --cv {self.cv}; drop --cv (or "
                            "--open-set).")

    def _check_selection(self) -> None:
        """The selection, split and feature options, before anything is read or computed."""
        check_range("min_per_class", self.min_per_class, 1)
        check_range("max_per_class", self.max_per_class, 1)
        check_range("cv", self.cv, 2)  # scikit-learn's StratifiedKFold: n_splits >= 2
        check_range("seed", self.seed, 0, SEED_MAX)
        check_range("pca", self.pca, 1)
        if self.cv is None:
            check_fraction("test_size", self.test_size)
        need = self.cv or 2
        if self.max_per_class is not None and self.max_per_class < need:
            split = f"--cv {self.cv}" if self.cv else "a held-out split"
            raise UserError(f"--max-per-class {self.max_per_class} keeps fewer images per class "
                            f"than the {need} that {split} needs; raise --max-per-class to at "
                            f"least {need}.")

    @property
    def spec(self):
        from classify import _heads as heads
        return heads.get_head(self.head)


@dataclass(frozen=True)
class FinetuneOptions:
    """How the backbone of a run is fine-tuned with its head (Keras's limits checked)."""

    unfreeze_blocks: int = 1
    lr: float = SAFE_LR
    epochs: int = 10
    batch_size: int = 16
    val_fraction: float = 0.1
    augment: bool = True
    refeaturize: bool = False
    seed: int = 0

    def __post_init__(self):
        check_range("unfreeze_blocks", self.unfreeze_blocks, 0)
        check_range("epochs", self.epochs, 1)
        check_range("batch_size", self.batch_size, 1)
        check_range("seed", self.seed, 0, SEED_MAX)
        check_fraction("val_fraction", self.val_fraction)
        lr = self.lr
        if (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)
                or lr <= 0):
            raise OptionError("lr", f"must be a positive number, not {lr}; {SAFE_LR} is the safe "
                            "default.")
        check_flag("augment", self.augment)
        check_flag("refeaturize", self.refeaturize)

    @property
    def risky(self) -> bool:
        """A learning rate that wrecks pretrained weights, on unfrozen layers."""
        return self.lr > RISKY_LR and self.unfreeze_blocks > 0
