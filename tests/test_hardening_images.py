"""Issue #11, listing and decoding images: truncated JPEGs (item 11), XMP orientation (12),
symlinked class folders (13), list files (16), huge files (17), sources that are not datasets,
and `collect` (classify predict's inputs)."""

import io
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import LFW_IMAGES, call_cli, lfw_available, run_python, write_image
from featurize import cache
from featurize.data import images
from featurize.data.images import ImageError, collect, list_dataset, open_rgb, read_rgb
from featurize.errors import UserError

SIX_GB = 6 << 30


def photo(h=60, w=80, seed=0):
    """Smooth structure plus noise, like a photograph."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(x / 7 + c) * np.cos(y / 5 - c) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def jpeg_bytes(arr, mode="RGB", **save) -> bytes:
    out = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(out, "JPEG", quality=90, **save)
    return out.getvalue()


def exif_orientation(value=6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def cut_with_end_marker(data: bytes, fraction=0.4) -> bytes:
    """The issue's file: the first 40% of a JPEG, closed by an end-of-image marker."""
    return data[:int(len(data) * fraction)] + b"\xff\xd9"


def pillow_pixels(path, draft=None) -> np.ndarray:
    """What Pillow alone makes of a valid file: the reference featurize must keep."""
    with Image.open(path) as im:
        if draft:
            im.draft("RGB", (draft, draft))
        im.load()
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


# -- item 11: a JPEG with missing scan data is a failure in both decoding paths -------------------

TRUNCATED = {  # name -> (JPEG bytes, draft size): every route a JPEG can take
    "plain (fast path)": (jpeg_bytes(photo()), None),
    "progressive (fast path)": (jpeg_bytes(photo(), progressive=True), None),
    "grey (fast path)": (jpeg_bytes(photo(), "L"), None),
    "Exif orientation (Pillow)": (jpeg_bytes(photo(), exif=exif_orientation()), None),
    "CMYK (Pillow)": (jpeg_bytes(photo(), "CMYK"), None),
    "big, draft-scaled (Pillow)": (jpeg_bytes(photo(400, 400)), 100),
}


@pytest.mark.parametrize("name", sorted(TRUNCATED))
@pytest.mark.parametrize("end_marker", [True, False])
def test_a_truncated_jpeg_fails_on_both_paths(tmp_path, name, end_marker):
    data, draft = TRUNCATED[name]
    cut = cut_with_end_marker(data) if end_marker else data[:int(len(data) * 0.4)]
    path = tmp_path / "cut.jpg"
    path.write_bytes(cut)
    for decode in (read_rgb, open_rgb):
        with pytest.raises(ImageError, match="^corrupt: truncated$"):
            decode(str(path), draft)


def test_a_small_file_declaring_8000x8000_pixels_fails(tmp_path):
    data = bytearray(jpeg_bytes(photo()))
    sof = data.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    data[sof + 5:sof + 9] = (8000).to_bytes(2, "big") * 2
    path = tmp_path / "huge.jpg"
    path.write_bytes(bytes(data))
    assert path.stat().st_size < 8000 and Image.open(path).size == (8000, 8000)
    for draft in (None, 224):
        for decode in (read_rgb, open_rgb):
            with pytest.raises(ImageError, match="^corrupt: truncated$"):
                decode(str(path), draft)


def test_a_progressive_jpeg_cut_between_two_scans_fails(tmp_path):
    """libjpeg gives no warning at all here: the later scans are simply absent."""
    data = jpeg_bytes(photo(), progressive=True)
    scans = [i for i in range(len(data) - 1) if data[i:i + 2] == b"\xff\xda"]
    assert len(scans) > 4
    for cut in (scans[2], scans[-1]):
        path = tmp_path / f"cut{cut}.jpg"
        path.write_bytes(data[:cut] + b"\xff\xd9")
        for decode in (read_rgb, open_rgb):
            with pytest.raises(ImageError, match="^corrupt: truncated$"):
                decode(str(path))


VALID = {  # name -> (JPEG bytes, draft size)
    **{name.replace(" (", ", valid ("): (data, draft) for name, (data, draft) in TRUNCATED.items()},
    "every Exif orientation": (None, None),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_jpegs_keep_pillows_pixels(tmp_path, name):
    data, draft = VALID[name]
    variants = [data] if data else [jpeg_bytes(photo(), exif=exif_orientation(v))
                                    for v in range(1, 9)]
    for k, data in enumerate(variants):
        path = tmp_path / f"{k}.jpg"
        path.write_bytes(data)
        expected = pillow_pixels(path, draft)
        np.testing.assert_array_equal(read_rgb(str(path), draft), expected)
        np.testing.assert_array_equal(np.asarray(open_rgb(str(path), draft)), expected)


@pytest.mark.parametrize("size", [(60, 80), (250, 250)])
def test_a_jpeg_missing_only_its_end_marker_is_left_to_pillow(tmp_path, size):
    """Its scan data is complete: not "truncated". Pillow decodes it whole or not at all,
    depending on its read buffering; featurize does exactly what Pillow does."""
    path = tmp_path / "no_end.jpg"
    path.write_bytes(jpeg_bytes(photo(*size))[:-2])
    images._check_jpeg_scan(path.read_bytes())  # no ImageError
    try:
        expected = pillow_pixels(path)
    except OSError as e:
        with pytest.raises(ImageError, match="^corrupt: image file is truncated"):
            read_rgb(str(path))
        assert "image file is truncated" in str(e)
    else:
        np.testing.assert_array_equal(read_rgb(str(path)), expected)


@pytest.mark.skipif(not lfw_available(), reason="needs ../shared/datasets/lfw")
def test_real_lfw_jpegs_cut_at_40_percent_fail_and_intact_ones_decode(tmp_path):
    for k, path in enumerate(sorted(LFW_IMAGES.glob("B*/*.jpg"))[:30]):
        cut = tmp_path / f"{k}.jpg"
        cut.write_bytes(cut_with_end_marker(path.read_bytes()))
        for decode in (read_rgb, open_rgb):
            with pytest.raises(ImageError, match="^corrupt: truncated$"):
                decode(str(cut), 224)
        np.testing.assert_array_equal(read_rgb(str(path), 224), pillow_pixels(path, 224))


# -- item 12: orientation given only in XMP -------------------------------------------------------

XMP_ROTATE_90 = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/'
                 b'1999/02/22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/'
                 b'tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')


def test_orientation_only_in_xmp_gives_the_same_pixels_on_both_paths(tmp_path):
    path = tmp_path / "xmp.jpg"
    path.write_bytes(jpeg_bytes(photo(30, 50), xmp=XMP_ROTATE_90))
    data = path.read_bytes()
    assert b"http://ns.adobe.com/xap/1.0/\x00" in data and b"Exif" not in data
    fast, pillow = read_rgb(str(path)), np.asarray(open_rgb(str(path)))
    assert pillow.shape == (50, 30, 3)  # Pillow applies XMP's orientation
    np.testing.assert_array_equal(fast, pillow)
    # an XMP block that says nothing about orientation keeps the fast path
    plain = jpeg_bytes(photo(30, 50), xmp=b'<x:xmpmeta xmlns:x="adobe:ns:meta/"/>')
    assert images._decode_plain_jpeg(plain, None) is not None


# -- item 13: symlinked class folders -------------------------------------------------------------

def _people(root: Path, names=("alice", "bob")) -> set:
    keys = set()
    for c, name in enumerate(names):
        for i in range(2):
            write_image(root / name / f"{name}_{i}.jpg", seed=10 * c + i)
            keys.add(f"{name}/{name}_{i}.jpg")
    return keys


def test_class_folder_links_into_or_above_the_dataset_are_skipped_with_a_note(tmp_path):
    root = tmp_path / "photos"
    keys = _people(root)
    elsewhere = tmp_path / "other_disk"
    write_image(elsewhere / "carol" / "carol_0.jpg", seed=5)
    (root / "all").symlink_to(".")
    (root / "up").symlink_to("..")
    (root / "alias").symlink_to("alice")
    (root / "carol").symlink_to(elsewhere / "carol")  # elsewhere: followed, as before
    (root / "zz_everyone").symlink_to(elsewhere)  # holds carol's folder: would repeat it
    ds = list_dataset(root)
    assert {it.key for it in ds.items} == keys | {"carol/carol_0.jpg"}
    assert ds.classes == ["alice", "bob", "carol"]
    skipped = {note.split(":")[0] for note in ds.notes}
    assert skipped == {f"skipped class folder {n}" for n in ("all", "up", "alias", "zz_everyone")}
    assert all("twice" in note for note in ds.notes)
    plain = tmp_path / "plain"
    _people(plain)
    assert list_dataset(plain).notes == []  # nothing skipped, nothing said


def test_an_unreadable_folder_is_noted_instead_of_silently_left_out(tmp_path, monkeypatch):
    root = tmp_path / "photos"
    _people(root)
    real_scandir = os.scandir

    def scandir(path="."):  # as for a folder without read permission (root reads anyway)
        if os.fspath(path).endswith("bob"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    ds = list_dataset(root)
    assert [it.label for it in ds.items] == ["alice", "alice"]
    assert len(ds.notes) == 1 and "bob" in ds.notes[0] and "Permission denied" in ds.notes[0]


# -- item 16: list files --------------------------------------------------------------------------

def test_a_list_file_with_a_byte_order_mark_reads_its_first_line(tmp_path):
    keys = _people(tmp_path)
    lines = [f"{k}\t{k.split('/')[0]}" for k in sorted(keys)]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n", encoding="utf-8-sig")
    ds = list_dataset(tmp_path / "list.txt")
    assert [it.key for it in ds.items] == sorted(keys)
    assert all(it.size > 0 for it in ds.items) and ds.classes == ["alice", "bob"]
    assert read_rgb(ds.items[0].path).shape == (40, 40, 3)


def test_a_list_file_giving_one_image_two_labels_is_refused_with_both_lines(tmp_path):
    _people(tmp_path)
    (tmp_path / "list.txt").write_text("# people\nalice/alice_0.jpg\talice\nbob/bob_0.jpg\tbob\n"
                                       "alice/alice_0.jpg\tbob\n")
    with pytest.raises(UserError) as e:
        list_dataset(tmp_path / "list.txt")
    message = str(e.value)
    assert "list.txt" in message and "lines 2 and 4" in message
    assert "alice/alice_0.jpg" in message


def test_a_repeated_list_line_with_the_same_label_is_taken_once(tmp_path):
    _people(tmp_path)
    (tmp_path / "list.txt").write_text("alice/alice_0.jpg\talice\n./alice/alice_0.jpg\talice\n"
                                       "bob/bob_0.jpg\tbob\n")
    ds = list_dataset(tmp_path / "list.txt")
    assert [it.key for it in ds.items] == ["alice/alice_0.jpg", "bob/bob_0.jpg"]
    assert len(ds.notes) == 1 and "1 repeated line" in ds.notes[0]


# -- item 17: a huge file is refused from its first bytes -----------------------------------------

def _sparse(path: Path, header: bytes, size=SIX_GB) -> Path:
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(size)  # sparse: takes no disk space
    return path


MP4_HEADER = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom"


@pytest.mark.parametrize("header, reason", [
    (MP4_HEADER, "^not an image$"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", r"^too large \(6,442 MB file, limit 640 MB\)$"),
])
def test_a_6_gb_file_named_jpg_is_refused_after_reading_its_first_bytes(tmp_path, monkeypatch,
                                                                       header, reason):
    path = _sparse(tmp_path / "movie.jpg", header)
    asked = []

    class Counted:
        """A file whose reads are counted; an unbounded read fails without reading."""

        def __init__(self, f):
            self.f = f

        def read(self, size=-1):
            assert size is not None and 0 <= size, "the whole file was asked for"
            asked.append(size)
            return self.f.read(size)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(images, "open", lambda *a, **k: Counted(open(*a, **k)), raising=False)
    for decode in (read_rgb, open_rgb):
        asked.clear()
        with pytest.raises(ImageError, match=reason):
            decode(str(path))
        assert 0 < sum(asked) <= 64


def test_a_file_within_the_limit_is_read_whole_and_decoded(tmp_path):
    path = tmp_path / "ok.png"
    Image.fromarray(photo()).save(path)
    with open(path, "ab") as f:
        f.write(b"\x00" * 1000)  # trailing bytes after the image: still an image
    np.testing.assert_array_equal(read_rgb(str(path)), photo())


# -- sources that are not datasets ----------------------------------------------------------------

def test_special_files_as_a_source_are_user_errors(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    try:
        for source, kind in [("/dev/null", "character device"), (fifo, "named pipe"),
                             (sock_path, "socket")]:
            with pytest.raises(UserError, match=f"{source} is a {kind}"):
                list_dataset(source)
    finally:
        sock.close()


def test_a_text_file_naming_no_existing_image_is_a_user_error(tmp_path):
    _people(tmp_path)  # pairsDevTest.txt lives beside the people's folders
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("2\nalice\t0\t1\nalice\t0\tbob\t1\n")
    with pytest.raises(UserError, match="none of its 3 lines is an existing image path"):
        list_dataset(pairs)
    partly = tmp_path / "partly.txt"  # some paths missing: recorded as failures, as before
    partly.write_text("alice/alice_0.jpg\nalice/gone.jpg\n")
    items = list_dataset(partly).items
    assert [it.key for it in items] == ["alice/alice_0.jpg", "alice/gone.jpg"]
    with pytest.raises(ImageError, match="missing"):
        read_rgb(items[1].path)
    with pytest.raises(UserError, match="is one image, not a dataset"):
        list_dataset(tmp_path / "alice" / "alice_0.jpg")


def test_featurize_cli_refuses_sources_that_are_not_datasets_in_one_line(tmp_path):
    _people(tmp_path / "data")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "data" / "pairs.txt").write_text("1\talice\t0\t1\n")
    (tmp_path / "data" / "labels.txt").write_text("alice/alice_0.jpg\talice\n"
                                                  "alice/alice_0.jpg\tbob\n")
    work = tmp_path / "work"
    work.mkdir()
    for source, says in [("/dev/null", "character device"), (tmp_path / "pipe", "named pipe"),
                         (tmp_path / "data" / "pairs.txt", "none of its 1 lines"),
                         (tmp_path / "data" / "labels.txt", "lines 1 and 2")]:
        r = call_cli("featurize", source, "--cache-dir", "cache", cwd=work)
        assert r.returncode == 2, (source, r.stderr)
        assert r.stderr.count("\n") == 1 and says in r.stderr and "Traceback" not in r.stderr
    assert list(work.iterdir()) == []  # nothing written


def test_featurize_cli_on_hostile_links_and_huge_files_stays_small_and_clean(tmp_path):
    root = tmp_path / "photos"
    keys = _people(root)
    (root / "all").symlink_to(".")
    (root / "up").symlink_to("..")
    junk = root / "junk"
    junk.mkdir()
    _sparse(junk / "movie.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")
    _sparse(junk / "clip.jpg", MP4_HEADER)
    (junk / "cut.jpg").write_bytes(cut_with_end_marker(jpeg_bytes(photo())))
    # peak memory of featurize, measured by a parent of its own
    measure = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
               "sys.exit(r.returncode)")
    r = run_python(measure, sys.executable, "-m", "featurize", root, "--backbone", "vggface-vgg16",
                   "--weights", "none", "--input-size", "32", "--quiet", "--workers", "2",
                   "--cache-dir", tmp_path / "cache", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    peak_mb = int(r.stdout.strip().splitlines()[-1]) / 1024
    print(f"featurize peak RSS: {peak_mb:.0f} MB")
    assert peak_mb < 3000, peak_mb  # a whole read of the 6 GB file would be over 6000
    assert "skipped class folder all" in r.stderr and "skipped class folder up" in r.stderr
    c = cache.read(next((tmp_path / "cache").glob("*.h5")))
    assert set(c.paths) == keys  # nothing twice, nothing from the parent folder
    assert c.failed == {"junk/clip.jpg": "not an image", "junk/cut.jpg": "corrupt: truncated",
                        "junk/movie.jpg": "too large (6,442 MB file, limit 640 MB)"}


# -- collect: classify predict's inputs -----------------------------------------------------------

def test_collect_refuses_a_folder_without_images_and_keeps_files_as_given(tmp_path):
    image = write_image(tmp_path / "a.jpg", seed=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    for folder in ("empty", "notes"):
        with pytest.raises(UserError, match=f"no images in folder .*{folder}"):
            collect([image, tmp_path / folder])
    with pytest.raises(UserError, match="does not exist"):
        collect([image, tmp_path / "gone.jpg"])
    with pytest.raises(UserError):
        collect([])
    text = tmp_path / "notes" / "readme.txt"
    os.mkfifo(tmp_path / "pipe.jpg")
    items = collect([image, text, tmp_path / "pipe.jpg"])
    assert [it.key for it in items] == [str(image), str(text), str(tmp_path / "pipe.jpg")]
    with pytest.raises(ImageError, match="^not an image$"):
        read_rgb(items[1].path)
    with pytest.raises(ImageError, match="^not a regular file$"):
        read_rgb(items[2].path)  # refused without opening it (a FIFO would block)
