"""Where a backbone's weights come from, resolved in one place.

`--weights` is "default" (the published file: keras-vggface release or Keras's ImageNet
weights, downloaded once), "none" (seeded random weights, for tests and smoke runs) or a
path to a local file. The identity of the weights (a file's SHA-256) is part of the cache
key, so it is computed here without importing Keras.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from featurize.data.download import fetch, sha256_of
from featurize.errors import UserError
from featurize.models.specs import VGGFACE_CACHE_SUBDIR, Backbone, WeightFile

RANDOM_SEED = 0  # `--weights none` is reproducible: the same random network every time
# The end of every "weights not there" error: the one pretrained model needing no download.
NO_DOWNLOAD = ("or use --backbone dlib-resnet, whose weights come with the dlib extra "
               "(pip install -e '.[dlib]') and need no download")


@dataclass(frozen=True)
class Weights:
    kind: str  # "file", "imagenet", "random" or "dlib"
    path: str | None = None
    sha256: str | None = None

    @property
    def identity(self) -> str:
        return self.sha256 if self.kind in ("file", "dlib") else f"{self.kind}-seed{RANDOM_SEED}" \
            if self.kind == "random" else self.kind


def keras_home() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))


def resolve(spec: Backbone, weights: str = "default", include_top: bool = False,
            download: bool = True) -> Weights:
    """Find (downloading if needed) the weights for `spec`, without building anything."""
    return spec.family.resolve(spec, weights, include_top, download)


def local_file(weights: str) -> Weights:
    """A weight file the user named with --weights PATH."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; give an existing file to "
                        "--weights, or 'default' or 'none'.")
    return Weights("file", str(path.resolve()), file_sha256(path))


def download_weights(wf: WeightFile) -> Path:
    """Into ~/.keras/models/vggface, where keras-vggface keeps them."""
    return fetch(wf.url, keras_home() / VGGFACE_CACHE_SUBDIR / wf.filename, wf.sha256,
                 hint=f", or pass --weights PATH, {NO_DOWNLOAD}")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered beside it (keyed by size and mtime) when writable."""
    path = Path(path)
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    memo = path.with_name(path.name + ".sha256.json")
    try:
        saved = json.loads(memo.read_text())
        if saved["stamp"] == stamp:
            return saved["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    sha = sha256_of(path)
    try:
        memo.write_text(json.dumps({"stamp": stamp, "sha256": sha}))
    except OSError:
        pass  # read-only location: hash again next time
    return sha


# --- the keras-vggface (Keras 2) .h5 layout --------------------------------------------------
# Root attribute `layer_names`; one group per layer (nested where the name has "/"), each with
# attribute `weight_names` listing its datasets in order. Full-model files nest this under
# `model_weights`.

def read_keras2_h5(path) -> dict[str, list[np.ndarray]]:
    """Layer name (as written in the file) -> its weight arrays, in order."""
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise UserError(f"{path} is not an HDF5 weight file; pass a keras-vggface .h5 file "
                        "to --weights.") from None
    with f:
        group = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in group.attrs:
            raise UserError(f"{path} is not a Keras 2 weight file (no 'layer_names'); pass a "
                            "keras-vggface .h5 file to --weights.")
        out = {}
        for name in group.attrs["layer_names"]:
            name = name.decode() if isinstance(name, bytes) else str(name)
            layer = group[name]
            wnames = [w.decode() if isinstance(w, bytes) else str(w)
                      for w in layer.attrs.get("weight_names", [])]
            if wnames:
                out[name] = [np.asarray(layer[w]) for w in wnames]
        return out


def write_keras2_h5(model, path, h5_name=lambda name: name) -> None:
    """Save `model`'s weights in the Keras 2 layout keras-vggface published (tests, exports)."""
    with h5py.File(path, "w") as f:
        names = [h5_name(layer.name) for layer in model.layers]
        f.attrs["layer_names"] = np.array([n.encode() for n in names])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for layer, name in zip(model.layers, names):
            group = f.create_group(name)
            wnames = [f"{name}/{w.path.split('/')[-1]}:0" for w in layer.weights]
            group.attrs["weight_names"] = np.array([w.encode() for w in wnames])
            for wname, w in zip(wnames, layer.get_weights()):
                group.create_dataset(wname, data=w)


def load_keras2_h5(model, path, keras_name=lambda name: name) -> None:
    """Load a Keras 2 .h5 by layer name, checking every shape before assigning anything."""
    saved = {keras_name(name): arrays for name, arrays in read_keras2_h5(path).items()}
    plan = []
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in saved:
            raise UserError(f"weights file {path} does not fit {model.name}: it has no layer "
                            f"{layer.name!r} (wrong file for this backbone, or a no-top file "
                            "for a layer of the top?).")
        arrays = saved[layer.name]
        want = [tuple(w.shape) for w in layer.weights]
        got = [tuple(a.shape) for a in arrays]
        if want != got:
            raise UserError(f"weights file {path} does not fit {model.name}: layer "
                            f"{layer.name!r} has shapes {want} in the model but {got} in the file.")
        plan.append((layer, arrays))
    for layer, arrays in plan:
        layer.set_weights(arrays)


def load_into(model, spec: Backbone, weights: Weights) -> None:
    """Put `weights` into a freshly built `spec` model (random weights need nothing)."""
    spec.family.load_weights(model, spec, weights)
