"""python -m featurize.datasets lfw against a local HTTP server serving a small LFW-like tgz."""

import hashlib
import tarfile

import pytest

from conftest import write_image
from featurize.data.datasets import Remote, fetch_lfw
from featurize.data.images import list_dataset
from featurize.datasets import main
from featurize.errors import UserError


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def lfw_server(tmp_path, http_server):
    served, base, stop = http_server
    src = tmp_path / "src" / "lfw-deepfunneled"
    for name, n in (("Ann_Lee", 2), ("Bo_Chan", 3)):
        for i in range(1, n + 1):
            write_image(src / name / f"{name}_{i:04d}.jpg", seed=i)
    with tarfile.open(served / "lfw-deepfunneled.tgz", "w:gz") as tar:
        tar.add(src, arcname="lfw-deepfunneled")
    (served / "pairs.txt").write_text("1 1\nBo_Chan 1 2\nAnn_Lee 1 Bo_Chan 3\n")
    archives = {"deepfunneled": Remote("lfw-deepfunneled.tgz", base + "lfw-deepfunneled.tgz",
                                       sha(served / "lfw-deepfunneled.tgz"))}
    protocol = [Remote("pairs.txt", base + "pairs.txt", sha(served / "pairs.txt"))]
    return archives, protocol, stop, served


def test_download_extract_and_nothing_downloaded_again(tmp_path, lfw_server):
    archives, protocol, stop, _ = lfw_server
    dest = fetch_lfw(tmp_path / "data" / "lfw", archives=archives, protocol=protocol,
                     log=lambda m: None, local=[])
    ds = list_dataset(dest)
    assert ds.classes == ["Ann_Lee", "Bo_Chan"] and len(ds.items) == 5
    assert ds.items[0].key == "Ann_Lee/Ann_Lee_0001.jpg" and (dest / "pairs.txt").exists()
    stop()  # offline from here on: a second call must not need the network
    messages = []
    fetch_lfw(dest, archives=archives, protocol=protocol, log=messages.append, local=[])
    assert "already holds LFW" in messages[0]


def test_checksum_mismatch_and_offline_are_clear_errors(tmp_path, lfw_server):
    archives, protocol, stop, _ = lfw_server
    bad = {"deepfunneled": Remote(archives["deepfunneled"].filename, archives["deepfunneled"].url,
                                  "0" * 64)}
    with pytest.raises(UserError, match="could not download .*(hash|checksum|corrupt)"):
        fetch_lfw(tmp_path / "a", archives=bad, protocol=protocol, log=lambda m: None, local=[])
    assert not (tmp_path / "lfw-deepfunneled.tgz").exists()
    stop()
    with pytest.raises(UserError, match=r"could not download http://127\.0\.0\.1.*--from PATH"):
        fetch_lfw(tmp_path / "b", archives=archives, protocol=protocol, log=lambda m: None,
                  local=[tmp_path / "nowhere"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing left


def test_from_archive_uses_a_local_tgz(tmp_path, lfw_server):
    archives, protocol, _, served = lfw_server
    dest = fetch_lfw(tmp_path / "c", source=served / "lfw-deepfunneled.tgz",
                     archives=archives, protocol=protocol, log=lambda m: None, local=[])
    assert len(list_dataset(dest).items) == 5
    assert main(["lfw", str(tmp_path / "d"), "--from-archive", str(tmp_path / "nope.tgz")]) == 2
