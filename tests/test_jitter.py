"""dlib-resnet's --jitter N and --tta presets: seeded per image (the same embedding in every run
and worker count), batched, their own cache key, the preset in the provenance, the cost said
before the run; and benchmarks/jitter_curve.py's stored passes give featurize's embedding.

Real LFW images (skipped without ../shared or dlib), a few per test.
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import LFW_IMAGES, REPO, call_cli, lfw_available, one_line_error, run_cli

HAS_DLIB = __import__("importlib").util.find_spec("dlib") is not None
needs_dlib = pytest.mark.skipif(not HAS_DLIB,
                                reason="dlib not installed (pip install -e '.[dlib]')")
needs_lfw = pytest.mark.skipif(not lfw_available(), reason="../shared/datasets/lfw not present")
SAMPLE = ["Aaron_Peirsol/Aaron_Peirsol_0001.jpg", "Aaron_Peirsol/Aaron_Peirsol_0002.jpg",
          "Colin_Powell/Colin_Powell_0007.jpg", "Colin_Powell/Colin_Powell_0008.jpg"]


def _folder(root: Path, names=SAMPLE) -> Path:
    for name in names:
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(LFW_IMAGES / name)
    return root


def _embeddings(path) -> dict:
    from featurize import cache
    c = cache.read(path)
    return {p: np.asarray(e) for p, e in zip(c.paths, c.embeddings)}


def _run(tmp_path, folder, name, *options, fresh=False):
    """featurize --backbone dlib-resnet: called in this process, or in a fresh one."""
    args = [folder, "--backbone", "dlib-resnet", "--quiet", "--cache-dir", tmp_path / name,
            *options]
    code, out, err = (run_cli("featurize", *args, cwd=tmp_path) if fresh
                      else call_cli("featurize", *args, cwd=tmp_path))
    assert code == 0, err
    path = Path(out.strip().splitlines()[-1].removeprefix("cache: "))
    return path, out


# --- determinism ---------------------------------------------------------------------------

@needs_lfw
@needs_dlib
def test_jittered_embeddings_are_bit_identical_across_runs_and_worker_counts(tmp_path):
    folder = _folder(tmp_path / "faces")
    # the first run in a fresh process, the others in this one: no state carried between runs
    runs = [_run(tmp_path, folder, name, "--jitter", "3", "--workers", workers, fresh=fresh)[0]
            for name, workers, fresh in (("one", 1, True), ("again", 1, False),
                                         ("two", 2, False))]
    first, *others = [_embeddings(path) for path in runs]
    assert sorted(first) == sorted(SAMPLE)
    for other in others:
        assert sorted(other) == sorted(first)
        for name in first:
            assert first[name].tobytes() == other[name].tobytes(), name
    plain = _embeddings(_run(tmp_path, folder, "plain", "--workers", "1")[0])
    assert all(not np.array_equal(plain[n], first[n]) for n in SAMPLE)  # it did jitter


@needs_lfw
@needs_dlib
def test_pass_i_depends_only_on_the_image_and_i():
    from featurize.data.images import read_rgb
    from featurize.models.dlib_backbone import chip_descriptor, face_chip, jittered_chips
    chip, _ = face_chip(read_rgb(str(LFW_IMAGES / SAMPLE[0])))
    other, _ = face_chip(read_rgb(str(LFW_IMAGES / SAMPLE[2])))
    few, more = jittered_chips(chip, 2), jittered_chips(chip, 5)
    assert all(np.array_equal(a, b) for a, b in zip(few, more[:2]))  # a prefix of the longer
    assert not np.array_equal(few[0], few[1])  # each pass its own jitter
    assert not np.array_equal(few[0], chip)
    chip_descriptor(other, 4)  # another image in between changes nothing
    assert np.array_equal(chip_descriptor(chip, 2), chip_descriptor(chip.copy(), 2))


@needs_lfw
@needs_dlib
def test_the_benchmarks_stored_passes_give_featurizes_embedding():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import jitter_curve
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    from featurize.data.images import read_rgb
    from featurize.models.dlib_backbone import describe, face_chip, pass_descriptors
    chips = np.stack([face_chip(read_rgb(str(LFW_IMAGES / n)))[0] for n in SAMPLE[:3]])
    names = jitter_curve.pass_names(4)
    stored = {k: pass_descriptors(jitter_curve.pass_chips(k, chips)) for k in names
              if k == "plain" or k.startswith("seeded-")}
    for n in (0, 1, 4):
        _, averaged = jitter_curve.variants(stored, 4)[f"jitter {n}"]
        emb = np.mean(np.stack([stored[k] for k in averaged]), axis=0).astype(np.float32)
        for row, name in enumerate(SAMPLE[:3]):
            assert np.array_equal(emb[row], describe(str(LFW_IMAGES / name), n)), (n, name)


# --- the preset, its key, its cost and its provenance ----------------------------------------

@needs_lfw
@needs_dlib
def test_tta_accurate_has_its_key_its_provenance_and_says_its_cost_first(tmp_path):
    from featurize import cache
    from featurize.models.config import make_settings
    from featurize.settings import TTA_PRESETS
    folder = _folder(tmp_path / "faces", SAMPLE[:2])
    path, out = _run(tmp_path, folder, "accurate", "--tta", "accurate")
    lines = out.strip().splitlines()
    n = TTA_PRESETS["accurate"]
    assert lines[0].startswith(f"--tta accurate (--jitter {n}): each face goes through the "
                               f"network {n + 1} times"), out
    assert lines[-2].startswith("done: 2 images, 2 embedded"), out
    attrs = cache.read_attrs(path)
    assert attrs["tta"] == "accurate" and attrs["jitter_scheme"] == "seeded"
    assert attrs["jitter"] == n
    default, _ = make_settings("dlib-resnet")
    accurate, _ = make_settings("dlib-resnet", tta="accurate")
    assert attrs["settings_key"] == accurate.key() != default.key()
    assert default.key() not in path.name and accurate.key() in path.name
    # the same embeddings as --jitter N: the same cache, found already made
    again, out = _run(tmp_path, folder, "accurate", "--jitter", n)
    assert again == path and "2 already cached" in out
    plain, out = _run(tmp_path, folder, "accurate")
    assert plain != path and "each face goes through" not in out
    assert "tta" not in cache.read_attrs(plain)


def _old_key(fields: dict) -> str:
    """The key as featurize computed it before jitter_scheme existed."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def test_caches_of_dlibs_unseeded_jitter_keep_their_key_and_do_not_share_the_new_one():
    from featurize.settings import EmbeddingSettings
    fields = dict(backbone="dlib-resnet", weights="a" * 64, weights_file="m.dat", layer="",
                  pooling="none", input_size=150, crop=0.0, flip=False,
                  preprocessing="dlib-5pt-chip", precision="float32", jitter=10,
                  resize="pil-bilinear")
    old = EmbeddingSettings.from_json(json.dumps(fields))  # as a cache made before records it
    assert old.jitter_scheme == ""
    assert old.key() == _old_key(fields)  # its cache is still found under its name
    seeded = EmbeddingSettings(**{**fields, "jitter_scheme": "seeded"})
    assert seeded.key() != old.key()  # other values: never the same cache
    assert EmbeddingSettings.from_json(seeded.to_json()) == seeded
    plain = EmbeddingSettings(**{**fields, "jitter": 0})
    assert plain.key() == _old_key({**fields, "jitter": 0})  # no jitter: the key it had


@needs_dlib
def test_jitter_n_is_seeded_and_the_default_is_not():
    from featurize.models.config import make_settings
    default, _ = make_settings("dlib-resnet")
    assert default.jitter == 0 and default.jitter_scheme == ""
    jittered, _ = make_settings("dlib-resnet", jitter=4)
    assert jittered.jitter_scheme == "seeded"


def test_tta_mistakes_are_one_line(tmp_path):
    code, _, err = call_cli("featurize", tmp_path, "--backbone", "dlib-resnet", "--tta",
                            "accurate", "--jitter", "3", cwd=tmp_path)
    one_line_error(code, err, "--tta accurate", "--jitter 3", "not both")
    code, _, err = call_cli("featurize", tmp_path, "--backbone", "mobilenetv2", "--tta",
                            "accurate", cwd=tmp_path)
    one_line_error(code, err, "--tta accurate", "dlib-resnet", "mobilenetv2", "--flip")
    code, _, err = call_cli("featurize", tmp_path, "--tta", "slow", cwd=tmp_path)
    assert code == 2 and "--tta" in err and "Traceback" not in err
