"""Check the VGGFace builders against the original keras-vggface 0.6, side by side.

The original needs Keras 2, so it runs in a second Python (`--reference-python`, a virtual
environment with tensorflow-cpu==2.15.1, keras-applications==1.0.8 and keras-vggface==0.6;
see benchmarks/README.md). There, for each architecture, the original model is built with
random weights (BatchNorm statistics randomised too), saved with Keras 2's `save_weights`
(the layout of the published files), and run on random images preprocessed by its own
`utils.preprocess_input`. Here, featurize loads that same file and embeds the same raw images.

    python benchmarks/vggface_equivalence.py --reference-python /path/to/refvenv/bin/python

Prints a table and writes benchmarks/results/vggface_equivalence.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ARCHS = {"vgg16": 1, "resnet50": 2, "senet50": 2}  # keras-vggface preprocessing version

REFERENCE = r'''
import sys, types, json
import numpy as np
import keras, keras.src.utils.layer_utils as lu, keras.src.utils.data_utils as du
# keras-vggface 0.6 imports Keras 2.2 module paths; point them at Keras 2.15's.
sys.modules["keras.utils.layer_utils"] = lu; keras.utils.layer_utils = lu
sys.modules["keras.utils.data_utils"] = du
topology = types.ModuleType("keras.engine.topology")
topology.get_source_inputs = keras.utils.get_source_inputs
sys.modules["keras.engine"] = types.ModuleType("keras.engine")
sys.modules["keras.engine.topology"] = topology
from keras_vggface.vggface import VGGFace
from keras_vggface import utils

out, arch, version, top, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "top", int(sys.argv[5])
rng = np.random.default_rng(0)
model = VGGFace(model=arch, include_top=top, weights=None, pooling=None if top else "avg")
# Random everything, BatchNorm statistics included, scaled to keep activations of the order
# of a trained network's (a chaotic random network would only measure float rounding growth).
for layer in model.layers:
    ws = layer.get_weights()
    if not ws:
        continue
    if type(layer).__name__ == "BatchNormalization":
        c = ws[0].shape
        new = [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c),
               rng.uniform(0.5, 2.0, c)]
    else:
        fan_in = int(np.prod(ws[0].shape[:-1]))
        new = [rng.normal(0, (1.0 / fan_in) ** 0.5, ws[0].shape)]
        new += [rng.normal(0, 0.01, w.shape) for w in ws[1:]]
    layer.set_weights([w.astype("float32") for w in new])
model.save_weights(out + ".h5")
images = rng.integers(0, 256, (n, 224, 224, 3)).astype("uint8")
x = utils.preprocess_input(images.astype("float32"), version=version)
y = model.predict(x, verbose=0)
np.savez(out + ".npz", images=images, outputs=y)
layers = [[l.name, type(l).__name__, [list(w.shape) for w in l.get_weights()]] for l in model.layers]
json.dump(layers, open(out + ".json", "w"))
'''


def compare(arch: str, version: int, top: bool, reference_python: str, workdir: Path, n: int):
    import keras

    from featurize.models import vggface
    from featurize.models.config import make_settings
    from featurize.models.keras import build_embedding_model
    from featurize.models.weights import load_keras2_h5

    stem = workdir / f"{arch}-{'top' if top else 'notop'}"
    script = workdir / "reference.py"
    script.write_text(REFERENCE)
    subprocess.run([reference_python, str(script), str(stem), arch, str(version),
                    "top" if top else "notop", str(n)], check=True,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""})
    ref = np.load(f"{stem}.npz")
    ref_layers = json.loads(Path(f"{stem}.json").read_text())

    # Architecture: same weighted layers, in the same order, same names, same shapes.
    ours = getattr(vggface, f"vggface_{arch}")(include_top=top, pooling=None if top else "avg")
    load_keras2_h5(ours, f"{stem}.h5", vggface.keras_layer_name)
    ref_weighted = [(vggface.keras_layer_name(n), s) for n, _, s in ref_layers if s]
    our_weighted = [(layer.name, [list(w.shape) for w in layer.get_weights()])
                    for layer in ours.layers if layer.weights]
    same_layers = ref_weighted == our_weighted

    # Outputs of the whole model on the same preprocessed input.
    x = ref["images"].astype("float32")[..., ::-1] - np.array(
        [[93.5940, 104.7624, 129.1863], [91.4953, 103.8827, 131.0912]][version - 1], np.float32)
    direct = ours.predict(x, verbose=0)
    result = {"arch": arch, "top": top, "images": n, "weighted_layers": len(our_weighted),
              "same_layer_names_and_shapes": same_layers,
              "model_max_abs_diff": float(np.abs(direct - ref["outputs"]).max()),
              "output_scale": float(np.abs(ref["outputs"]).max())}
    if not top:
        # The featurize pipeline from raw uint8 pixels: its own preprocessing + default pooling.
        settings, w = make_settings(f"vggface-{arch}", str(stem) + ".h5", download=False)
        emb = build_embedding_model(settings, w).predict(ref["images"], verbose=0)
        result["featurize_max_abs_diff"] = float(np.abs(emb - ref["outputs"].reshape(n, -1)).max())
    result["relative_diff"] = max(result["model_max_abs_diff"],
                                  result.get("featurize_max_abs_diff", 0)) / result["output_scale"]
    keras.backend.clear_session()
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference-python", required=True,
                   help="python of an environment with keras-vggface 0.6 and TensorFlow 2.15")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--top", action="store_true", help="also compare the classifier tops")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "vggface_equivalence.json"))
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch, version in ARCHS.items():
            for top in ([False, True] if args.top else [False]):
                rows.append(compare(arch, version, top, args.reference_python, Path(tmp), args.images))
                r = rows[-1]
                print(f"{arch:<9} {'top' if top else 'notop':<6} layers={r['weighted_layers']:<4} "
                      f"same_names_shapes={r['same_layer_names_and_shapes']} "
                      f"model_diff={r['model_max_abs_diff']:.2e} "
                      f"featurize_diff={r.get('featurize_max_abs_diff', float('nan')):.2e} "
                      f"scale={r['output_scale']:.2e} relative={r['relative_diff']:.2e}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    import keras
    Path(args.out).write_text(json.dumps({"keras": keras.__version__,
                                          "backend": keras.backend.backend(), "results": rows},
                                         indent=2))
    ok = all(r["same_layer_names_and_shapes"] and r["relative_diff"] < 1e-4 for r in rows)
    print("PASS" if ok else "FAIL", "->", args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
