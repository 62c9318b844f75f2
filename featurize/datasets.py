"""`python -m featurize.datasets lfw [DEST]`: download, check and lay out LFW.

DEST (default data/lfw) gets the class-per-folder layout featurize reads, `Name/Name_0001.jpg`,
with the protocol files beside the class folders: pairs.txt (View 2), pairsDevTrain.txt and
pairsDevTest.txt (View 1) and people.txt.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .download import fetch, sha256_of
from .errors import UserError

LFW_SITE = "http://vis-www.cs.umass.edu/lfw/"


@dataclass(frozen=True)
class Remote:
    filename: str
    url: str
    sha256: str | None  # None: no published checksum; the computed one is printed


# Checksums: scikit-learn's fetch_lfw mirrors; people.txt from the LFW site's copy.
LFW_ARCHIVES = {
    "original": Remote("lfw.tgz", "https://ndownloader.figshare.com/files/5976018",
                       "055f7d9c632d7370e6fb4afc7468d40f970c34a80d4c6f50ffec63f5a8d536c0"),
    "funneled": Remote("lfw-funneled.tgz", "https://ndownloader.figshare.com/files/5976015",
                       "b47c8422c8cded889dc5a13418c4bc2abbda121092b3533a83306f90d900100a"),
    "deepfunneled": Remote("lfw-deepfunneled.tgz", LFW_SITE + "lfw-deepfunneled.tgz", None),
}
LFW_PROTOCOL = [
    Remote("pairs.txt", "https://ndownloader.figshare.com/files/5976006",
           "ea42330c62c92989f9d7c03237ed5d591365e89b3e649747777b70e692dc1592"),
    Remote("pairsDevTrain.txt", "https://ndownloader.figshare.com/files/5976012",
           "1d454dada7dfeca0e7eab6f65dc4e97a6312d44cf142207be28d688be92aabfa"),
    Remote("pairsDevTest.txt", "https://ndownloader.figshare.com/files/5976009",
           "7cb06600ea8b2814ac26e946201cdb304296262aad67d046a16a7ec85d0ff87c"),
    Remote("people.txt", LFW_SITE + "people.txt",
           "bc8fa2b7f25c895cf7efb6de4f4fc27ca8b8d1cfa63350ad8b96eae2b198d365"),
]


def download(remote: Remote, dest: Path, log=print) -> Path:
    log(f"downloading {remote.url}")
    path = fetch(remote.url, dest, remote.sha256, hint=" (or pass --from-archive PATH)"
                 if remote.filename.endswith(".tgz") else "")
    if not remote.sha256:
        log(f"{remote.filename}: SHA-256 {sha256_of(path)} (no published checksum to compare)")
    return path


def extract_classes(archive: Path, dest: Path) -> int:
    """Unpack `Top/Name/Name_0001.jpg` members as `dest/Name/Name_0001.jpg`; count images."""
    staging = dest.with_name(dest.name + ".extracting")
    shutil.rmtree(staging, ignore_errors=True)
    count = 0
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                parts = Path(member.name).parts
                if not member.isfile() or len(parts) < 3 or not parts[-1].lower().endswith(".jpg"):
                    continue
                member.name = str(Path(*parts[-2:]))  # drop the archive's top folder
                tar.extract(member, staging, filter="data")
                count += 1
    except (tarfile.TarError, OSError, EOFError) as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"cannot extract {archive} ({e}); is it an LFW .tgz? Delete it and "
                        "download again.") from None
    if not count:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"{archive} holds no Name/Name_0001.jpg images; is it an LFW .tgz?")
    dest.mkdir(parents=True, exist_ok=True)
    for person in staging.iterdir():
        target = dest / person.name
        if target.exists():
            shutil.rmtree(target)
        os.replace(person, target)
    staging.rmdir()
    return count


def fetch_lfw(dest="data/lfw", variant="deepfunneled", from_archive=None,
              archives=LFW_ARCHIVES, protocol=LFW_PROTOCOL, log=print) -> Path:
    """Make `dest` hold LFW; what is already there is not downloaded again."""
    if variant not in archives:
        raise UserError(f"unknown LFW variant {variant!r}; choose {', '.join(archives)}.")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    marker = dest / f".complete-{variant}"
    if not marker.exists():
        remote = archives[variant]
        if from_archive:
            archive = Path(from_archive)
            if not archive.is_file():
                raise UserError(f"--from-archive {archive} does not exist; give the path of "
                                f"{remote.filename}.")
            if remote.sha256 and sha256_of(archive) != remote.sha256:
                raise UserError(f"{archive} is not the published {remote.filename} (SHA-256 "
                                "differs); use the original archive.")
        else:
            archive = download(remote, dest.parent / remote.filename, log)
        n = extract_classes(archive, dest)
        marker.write_text(f"{n} images from {archive.name}\n")
        log(f"{n} images in {dest}")
    else:
        log(f"{dest} already holds LFW ({marker.read_text().strip()})")
    for remote in protocol:
        target = dest / remote.filename
        if not target.exists():
            download(remote, target, log)
    return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m featurize.datasets",
                                description="Download and lay out a dataset for featurize.")
    p.add_argument("dataset", choices=["lfw"])
    p.add_argument("dest", nargs="?", default="data/lfw")
    p.add_argument("--variant", default="deepfunneled", choices=list(LFW_ARCHIVES))
    p.add_argument("--from-archive", help="use a .tgz you already have")
    args = p.parse_args(argv)
    try:
        dest = fetch_lfw(args.dest, args.variant, args.from_archive)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"ready: python -m featurize {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
