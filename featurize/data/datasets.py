"""`python -m featurize.datasets lfw [DEST]`: download, check and lay out LFW.

DEST (default data/lfw) gets the class-per-folder layout featurize reads, `Name/Name_0001.jpg`,
with the protocol files beside the class folders: pairs.txt (View 2), pairsDevTrain.txt and
pairsDevTest.txt (View 1) and people.txt.

Where the images come from: `--from PATH` (a local copy: a folder holding the variant's
folder, e.g. `lfw-deepfunneled/`, and the pair files, like ../shared/datasets/lfw; or the
.tgz archive). Without it the archive is downloaded; if that fails, the first local copy
among $FEATURIZE_LFW and ../shared/datasets/lfw (relative to the current folder) is used.
From a folder the images are linked, not copied: hard links where the file system allows
(the layout then stands on its own), else symbolic links. A protocol file that can be neither
copied from a local copy nor downloaded is a warning saying what will not work without it.
A failed set-up leaves no folder behind that it made.
"""

from __future__ import annotations

import errno
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from featurize import atomic
from featurize.data.download import fetch, sha256_of
from featurize.errors import UserError

LFW_SITE = "http://vis-www.cs.umass.edu/lfw/"
LOCAL_ENV = "FEATURIZE_LFW"  # a local LFW copy, tried when the download fails
SHARED_COPY = Path("..") / "shared" / "datasets" / "lfw"  # beside the checkout
# The folder each variant's archive unpacks to (and a local copy holds).
VARIANT_FOLDERS = {"original": "lfw", "funneled": "lfw_funneled",
                   "deepfunneled": "lfw-deepfunneled"}


@dataclass(frozen=True)
class Remote:
    filename: str
    url: str
    sha256: str | None  # None: no published checksum; the computed one is printed
    needed_for: str = ""  # what does not work without it (protocol files)


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
           "ea42330c62c92989f9d7c03237ed5d591365e89b3e649747777b70e692dc1592",
           "classify verify --pairs on View 2 (the 10-fold benchmark) will not work"),
    Remote("pairsDevTrain.txt", "https://ndownloader.figshare.com/files/5976012",
           "1d454dada7dfeca0e7eab6f65dc4e97a6312d44cf142207be28d688be92aabfa",
           "classify verify --train-pairs on View 1 will not work"),
    Remote("pairsDevTest.txt", "https://ndownloader.figshare.com/files/5976009",
           "7cb06600ea8b2814ac26e946201cdb304296262aad67d046a16a7ec85d0ff87c",
           "classify verify --pairs on View 1 will not work"),
    Remote("people.txt", LFW_SITE + "people.txt",
           "bc8fa2b7f25c895cf7efb6de4f4fc27ca8b8d1cfa63350ad8b96eae2b198d365",
           "View 2's 10 folds of people will be missing (featurize and classify do not read it)"),
]



def local_copies() -> list[Path]:
    """Where a local LFW copy is looked for when the download fails: $FEATURIZE_LFW, then
    ../shared/datasets/lfw (relative to the current folder: beside a checkout)."""
    env = os.environ.get(LOCAL_ENV)
    return ([Path(env)] if env else []) + [SHARED_COPY]


def download(remote: Remote, dest: Path, log=print, hint: str = "") -> Path:
    log(f"downloading {remote.url}")
    path = fetch(remote.url, dest, remote.sha256, hint=hint)
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
    _move_into(staging, dest)
    return count


def link_classes(root: Path, dest: Path) -> tuple[int, str]:
    """Lay out the `Name/Name_0001.jpg` images of the folder `root` in `dest` as links, not
    copies: hard links where the file system allows, else symbolic links. Returns the count
    of images and which links were made."""
    staging = dest.with_name(dest.name + ".linking")
    shutil.rmtree(staging, ignore_errors=True)
    count, kinds = 0, set()
    try:
        for person in sorted(os.scandir(root), key=lambda e: e.name):
            if person.name.startswith(".") or not person.is_dir():
                continue
            files = sorted(f.name for f in os.scandir(person.path)
                           if f.name.lower().endswith(".jpg") and f.is_file())
            if files:
                (staging / person.name).mkdir(parents=True)
            for name in files:
                kinds.add(_link(Path(person.path) / name, staging / person.name / name))
                count += 1
    except BaseException as e:  # an interrupted layout leaves no half-made folder either
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise UserError(f"cannot lay out {root} in {dest} ({e}); check that {dest.parent} "
                            "is writable.") from None
        raise
    if not count:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"{root} holds no Name/Name_0001.jpg images; give an LFW copy.")
    _move_into(staging, dest)
    return count, " and ".join(sorted(kinds))


def _link(source: Path, target: Path) -> str:
    try:
        os.link(source, target)
        return "hard links"
    except OSError as e:  # another file system, or one (or a policy) without hard links
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK,
                           errno.EOPNOTSUPP):
            raise
    os.symlink(os.path.realpath(source), target)
    return "symbolic links"


def _move_into(staging: Path, dest: Path) -> None:
    """Move the class folders laid out in `staging` into `dest` (replacing those of the same
    name: a half-finished earlier layout), then remove `staging`."""
    dest.mkdir(parents=True, exist_ok=True)
    for person in staging.iterdir():
        target = dest / person.name
        if target.is_symlink():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        os.replace(person, target)
    staging.rmdir()


def _image_root(folder: Path, variant: str) -> Path | None:
    """Where a local copy keeps the variant's class folders: `folder/lfw-deepfunneled` (for
    deepfunneled), or `folder` itself when it is that folder or a layout made here."""
    name = VARIANT_FOLDERS.get(variant, variant)
    for root in (folder / name, folder):
        if root == folder and not (folder.name == name or (folder / f".complete-{variant}")
                                   .exists()):
            continue
        if root.is_dir() and any(p.is_dir() and (p / f"{p.name}_0001.jpg").is_file()
                                 for p in root.iterdir()):
            return root
    return None


def _first_local(local, variant: str) -> Path | None:
    return next((Path(p) for p in local if _image_root(Path(p), variant)), None)


def _source_hint(remote: Remote, variant: str, local) -> str:
    folder = VARIANT_FOLDERS.get(variant, variant)
    places = " or ".join(str(p) for p in local) or "none given"
    return (f", or pass --from PATH (that archive, or a folder holding {folder}/ and the pair "
            f"files; no local copy at {places})")


def _images(dest: Path, variant: str, source, remote: Remote, local, log) -> Path | None:
    """Lay out the images in `dest` unless done before; returns the local folder they came
    from, if any (the protocol files are looked for there first)."""
    marker = dest / f".complete-{variant}"
    if marker.exists():
        log(f"{dest} already holds LFW ({marker.read_text().strip()})")
        return Path(source) if source and Path(source).is_dir() else None
    if source is None:
        try:
            source = download(remote, dest.parent / remote.filename, log,
                              _source_hint(remote, variant, local))
        except UserError:
            source = _first_local(local, variant)
            if source is None:
                raise
            log(f"could not download {remote.filename}; using the local copy in {source}")
    source = Path(source)
    if source.is_dir():
        root = _image_root(source, variant)
        if root is None:
            raise UserError(f"--from {source} holds no LFW images: give a folder holding "
                            f"{VARIANT_FOLDERS.get(variant, variant)}/Name/Name_0001.jpg "
                            f"(like {SHARED_COPY}), or the {remote.filename} archive.")
        n, how = link_classes(root, dest)
        what = f"{how} to {root.resolve()}, no copies"
    else:
        _check_archive(source, remote)
        n, what = extract_classes(source, dest), f"from {source.name}"
    marker.write_text(f"{n} images, {what}\n")
    log(f"{n} images in {dest} ({what})")
    return source if source.is_dir() else None


def _check_archive(archive: Path, remote: Remote) -> None:
    if not archive.is_file():
        raise UserError(f"--from {archive} does not exist; give the path of {remote.filename} "
                        f"or of a folder holding the images (like {SHARED_COPY}).")
    if remote.sha256 and sha256_of(archive) != remote.sha256:
        raise UserError(f"{archive} is not the published {remote.filename} (SHA-256 "
                        "differs); use the original archive.")


def _copy_local(remote: Remote, folders, target: Path, log) -> bool:
    """Copy `remote`'s file from the first of `folders` that has it (checked against the
    published SHA-256); False if none has."""
    for folder in folders:
        path = Path(folder) / remote.filename
        if not path.is_file():
            continue
        if remote.sha256 and sha256_of(path) != remote.sha256:
            log(f"warning: {path} is not the published {remote.filename} (SHA-256 differs); "
                "not used")
            continue
        tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
        shutil.copyfile(path, tmp)
        atomic.replace(tmp, target)
        log(f"{remote.filename}: copied from {folder}")
        return True
    return False


def _protocol_files(dest: Path, protocol, source: Path | None, local, log) -> None:
    """Each protocol file: from the local copy the images came from, else downloaded, else
    from another local copy; one that is nowhere to be had is a warning, not an error."""
    missing = []
    for remote in protocol:
        target = dest / remote.filename
        if target.exists() or _copy_local(remote, [source] if source else [], target, log):
            continue
        try:
            download(remote, target, log)
            continue
        except UserError as e:
            why = str(e).rstrip(".")
        others = [p for p in local if source is None or Path(p).resolve() != source.resolve()]
        if not _copy_local(remote, others, target, log):
            missing.append((remote, why))
    present = [r.filename for r in protocol if (dest / r.filename).exists()]
    for remote, why in missing:
        log(f"warning: {remote.filename} not available: {remote.needed_for or 'it is missing'}"
            f"; present: {', '.join(present) or 'no protocol file'} ({why}).")


def fetch_lfw(dest="data/lfw", variant="deepfunneled", source=None, archives=None,
              protocol=None, log=print, local=None) -> Path:
    """Make `dest` hold LFW; what is already there is not downloaded again. `source`: a local
    copy (folder or archive); without it the archive is downloaded, and when that fails the
    first of `local` (default: local_copies()) holding LFW is used. Warnings go to `log` as
    lines starting with "warning:". On failure the folders made here are removed again.
    `archives` and `protocol` (default: the published LFW_ARCHIVES and LFW_PROTOCOL files,
    with their URLs and SHA-256) are for mirrors and tests."""
    archives = LFW_ARCHIVES if archives is None else archives
    protocol = LFW_PROTOCOL if protocol is None else protocol
    if variant not in archives:
        raise UserError(f"unknown LFW variant {variant!r}; choose {', '.join(archives)}.")
    dest = Path(dest)
    local = local_copies() if local is None else list(local)
    made = [p for p in (dest, *dest.absolute().parents) if not p.exists()]
    try:
        folder = _images(dest, variant, source, archives[variant], local, log)
    except BaseException:
        for path in made:  # deepest first; only folders still empty
            try:
                path.rmdir()
            except OSError:
                pass
        raise
    _protocol_files(dest, protocol, folder, local, log)
    return dest
