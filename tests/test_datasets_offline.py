"""`python -m featurize.datasets lfw` without a network: from a local copy (`--from PATH`, or
found beside the checkout / in $FEATURIZE_LFW when the download fails), protocol files that
cannot be had are warnings, and a failure leaves no folder behind. Every run that could
download is a fresh process whose proxy is a closed port on 127.0.0.1, so nothing can reach
the internet."""

import os
import socket
from pathlib import Path

import pytest

from conftest import LFW, call_cli, cli_env, lfw_available, one_line_error, run_cli, write_image
from featurize.data.images import list_dataset

TINY = ["--backbone", "vggface-vgg16", "--weights", "none", "--input-size", "32", "--quiet"]
PROTOCOL = ["pairs.txt", "pairsDevTrain.txt", "pairsDevTest.txt", "people.txt"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed: connections refused


def _offline_env(**extra):
    proxy = f"http://127.0.0.1:{_closed_port()}"
    drop = [k for k in os.environ
            if k.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")]
    return cli_env(drop=[*drop, "FEATURIZE_LFW"], http_proxy=proxy, https_proxy=proxy,
                   HTTP_PROXY=proxy, HTTPS_PROXY=proxy, **extra)


def _run(args, cwd, module="featurize.datasets", **env):
    return run_cli(module, *args, cwd=cwd, env=_offline_env(**env))


def _fake_copy(folder: Path) -> Path:
    """A small local copy laid out as ../shared/datasets/lfw is (no protocol files)."""
    for name, n in (("Ann_Lee", 2), ("Bo_Chan", 3)):
        for i in range(1, n + 1):
            write_image(folder / "lfw-deepfunneled" / name / f"{name}_{i:04d}.jpg", seed=i)
    return folder


def _warnings(err):
    lines = err.strip().splitlines()
    assert all(line.startswith("warning: ") for line in lines) and "Traceback" not in err, err
    return {line.split()[1]: line for line in lines}


@pytest.mark.skipif(not lfw_available(), reason="../shared/datasets/lfw not present")
def test_from_the_shared_copy_links_every_image_and_warns_about_pairs_txt(tmp_path):
    code, out, err = _run(["lfw", "out", "--from", LFW], cwd=tmp_path)
    assert code == 0, err
    dest = tmp_path / "out"
    assert "13233 images in out (hard links" in out or "13233 images in out (symbolic" in out
    warned = _warnings(err)
    if not (LFW / "pairs.txt").exists():  # the copy has View 1's files, not View 2's
        assert list(warned) == ["pairs.txt"]
        assert "classify verify --pairs on View 2" in warned["pairs.txt"]
        assert "present: pairsDevTrain.txt, pairsDevTest.txt, people.txt" in warned["pairs.txt"]
    for name in PROTOCOL[1:]:
        assert (dest / name).read_bytes() == (LFW / name).read_bytes()
    ds = list_dataset(dest)
    assert len(ds.items) == 13233 and len(ds.classes) == 5749
    image = dest / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg"
    assert image.is_symlink() or image.stat().st_nlink > 1  # a link, not a copy
    assert os.path.samefile(image, LFW / "lfw-deepfunneled" / "Aaron_Peirsol" / image.name)
    code, out, err = _run(["lfw", "out", "--from", LFW], cwd=tmp_path)  # done already
    assert code == 0 and "out already holds LFW (13233 images" in out, err


def test_a_failed_download_without_a_local_copy_is_one_line_and_leaves_no_folder(tmp_path):
    checkout = tmp_path / "checkout"  # no ../shared/datasets/lfw beside it
    checkout.mkdir()
    code, out, err = _run(["lfw", "data/lfw"], cwd=checkout)
    one_line_error(code, err, "could not download", "--from PATH", "no local copy at")
    assert list(checkout.iterdir()) == []  # neither data/lfw nor data/ is left behind
    code, out, err = _run(["lfw", "data/lfw", "--from", tmp_path / "nothing"], cwd=checkout)
    one_line_error(code, err, "--from", "nothing")
    assert list(checkout.iterdir()) == []


def test_the_readme_line_offline_falls_back_to_the_copy_beside_the_checkout(tmp_path):
    """`datasets lfw data/lfw && featurize data/lfw` with ../shared/datasets/lfw present."""
    _fake_copy(tmp_path / "shared" / "datasets" / "lfw")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    code, out, err = _run(["lfw", "data/lfw"], cwd=checkout)
    assert code == 0, err
    assert "using the local copy in ../shared/datasets/lfw" in out
    assert "5 images in data/lfw" in out and "ready: python -m featurize data/lfw" in out
    assert sorted(_warnings(err)) == sorted(PROTOCOL)  # none in this copy, none downloaded
    ds = list_dataset(checkout / "data" / "lfw")
    assert ds.classes == ["Ann_Lee", "Bo_Chan"] and len(ds.items) == 5
    code, out, err = call_cli("featurize", "data/lfw", *TINY, "--cache-dir", "cache",
                              cwd=checkout)  # embeds local files only: no network
    assert code == 0 and "5 embedded" in out, err


def test_featurize_lfw_names_a_copy_anywhere_and_from_archive_still_works(tmp_path):
    copy = _fake_copy(tmp_path / "elsewhere")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    code, out, err = _run(["lfw", "a"], cwd=checkout, FEATURIZE_LFW=str(copy))
    assert code == 0 and f"using the local copy in {copy}" in out, err
    assert len(list_dataset(checkout / "a").items) == 5
    code, out, err = _run(["lfw", "b", "--from-archive", copy], cwd=checkout)  # the old name
    assert code == 0 and len(list_dataset(checkout / "b").items) == 5, err


def test_the_default_backbone_without_its_weights_names_dlib_resnet(tmp_path):
    write_image(tmp_path / "data" / "a" / "a_0001.jpg", 0)
    code, _, err = _run(["data", "--cache-dir", "cache"], cwd=tmp_path, module="featurize",
                        KERAS_HOME=str(tmp_path / "keras"))
    one_line_error(code, err, "could not download", "--backbone dlib-resnet",
                   "pip install -e '.[dlib]'")
    assert not (tmp_path / "cache").exists()
