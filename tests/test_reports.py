"""Issue #16: report.html of a run, a fine-tune and a verification, `classify runs --html`,
`featurize map`, output placement, and the pages as a browser renders them (Chromium)."""

import base64
import html as html_lib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import blobs, call_cli, run_cli, synthetic_cache, write_image

CLASSES = ("alice", "bob", "carol", "dave")


def _cli(module, args, cwd, fresh=True):
    """A command line in a fresh process (or called in this one)."""
    proc = (run_cli(module, *args, cwd=cwd, timeout=300) if fresh
            else call_cli(module, *args, cwd=cwd))
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def _images(page: Path) -> list[str]:
    return re.findall(r'<img[^>]*\bsrc="([^"]*)"', page.read_text())


def _title(page: Path) -> str:
    return html_lib.unescape(re.search(r"<title>(.*?)</title>", page.read_text(), re.S).group(1))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Real small images, a noisy cache of them (so some test images are misclassified), a
    pairs file, and the pages made by the command lines, each run from an empty folder
    (training, `runs --html` and `map` in fresh processes, verify in this one)."""
    base = tmp_path_factory.mktemp("reports")
    faces = base / "faces"
    X, y, _ = blobs(len(CLASSES), 10, 16, spread=1.3, seed=3)
    paths = [f"{CLASSES[c]}/{CLASSES[c]}_{i % 10 + 1:04d}.jpg" for i, c in enumerate(y)]
    for k, p in enumerate(paths):
        write_image(faces / p, seed=k, size=(36, 36))
    cache = synthetic_cache(faces / "c.h5", X, y, list(CLASSES), paths=paths)
    pairs = base / "pairs.txt"  # View 2 layout: 10 folds of 1 matched + 1 mismatched pair
    pairs.write_text("10 1\n" + "".join(
        f"{CLASSES[k % 4]} {1 + k % 5} {6 + k % 5}\n{CLASSES[k % 4]} {1 + k % 9} "
        f"{CLASSES[(k + 1) % 4]} {2 + k % 8}\n" for k in range(10)))
    cwd, verify_cwd = base / "cwd", base / "verify_cwd"
    cwd.mkdir()
    verify_cwd.mkdir()
    runs = base / "runs"
    import classify  # the API writes the same folders as the command lines
    classify.train(cache, "centroid", cv=3, save_to=runs / "centroid")
    v = classify.verify(cache, pairs, out=base / "verify")
    assert v.out == str(base / "verify")
    procs = {
        "train": _cli("classify", ["--cache", cache, "--out", runs / "logreg"], cwd),
        # no --out: a new run folder under runs/, as training's default
        "verify": _cli("classify", ["verify", "--pairs", pairs, "--cache", cache], verify_cwd,
                       fresh=False),
        "runs": _cli("classify", ["runs", "--runs-dir", runs, "--html", base / "runs.html"], cwd),
        "map": _cli("featurize", ["map", cache, "--method", "pca", "--sample", "30",
                                  "--out", base / "map"], cwd),
    }
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, proc.stderr)
    return {"base": base, "cache": cache, "faces": faces, "pairs": pairs, "cwd": cwd,
            "verify_cwd": verify_cwd, "runs": runs, "procs": procs, "X": X, "y": y,
            "paths": paths}


# --- item 1: report.html of a run -------------------------------------------------------------

def test_a_runs_report_shows_its_figures_and_misclassified_images_inlined(world):
    run = world["runs"] / "logreg"
    page, record = run / "report.html", json.loads((run / "run.json").read_text())
    assert record["report_html"] == "report.html" and record["confusion_png"] is True
    assert {"confusion.png", "f1.png"} <= {p.name for p in run.iterdir()}
    text = page.read_text()
    acc, f1 = record["metrics"]["accuracy"], record["metrics"]["macro_f1"]
    assert f"accuracy {acc:.4f}, macro F1 {f1:.4f}" in _title(page)
    srcs = _images(page)
    assert srcs and all(s.startswith("data:image/") for s in srcs)  # self-contained
    assert "http" not in "".join(re.findall(r'(?:src|href)="([^"]*)"', text))
    split = json.loads((run / "split.json").read_text())["folds"][0]["test"]
    pred_wrong = round((1 - acc) * len(split))
    assert pred_wrong > 0, "the fixture should misclassify some test images"
    thumbs = [s for s in srcs if s.startswith("data:image/jpeg")]
    assert len(thumbs) == pred_wrong  # every misclassified test image, as a JPEG thumbnail
    with Image.open(io.BytesIO(base64.b64decode(thumbs[0].split(",", 1)[1]))) as im:
        assert im.format == "JPEG" and max(im.size) <= 110  # small: the page stays light
    assert f"Misclassified test images: {pred_wrong}" in text
    assert "± std over 3 folds" in (world["runs"] / "centroid" / "report.html").read_text()


def test_the_gallery_puts_the_worst_error_first_and_skips_images_it_cannot_show(tmp_path):
    from classify._html import gallery
    from classify._report import worst_errors
    scores = np.array([[0.9, 0.1], [0.4, 0.6], [0.1, 0.9], [0.45, 0.55]])
    y_true, y_pred = np.array([0, 0, 0, 1]), np.array([0, 1, 1, 1])
    assert [row for row, _ in worst_errors(y_true, y_pred, scores)] == [2, 1]  # margin 0.8, 0.2
    assert worst_errors(y_true, y_pred, np.array([0.5, 1.0, 3.0, 0.1]))[0][0] == 2  # binary
    write_image(tmp_path / "a" / "ok.jpg", 1)
    g = gallery(str(tmp_path), ["a/ok.jpg", "a/missing.jpg", "s3://bucket/x.jpg", "a/ok.jpg"],
                np.array([0, 0, 0, 1]), np.array([1, 1, 1, 1]),
                np.array([[0.1, 0.9], [0.3, 0.7], [0.2, 0.8], [0.0, 1.0]]), ["p", "q"])
    assert [c["path"] for c in g["cards"]] == ["a/ok.jpg"] and g["total"] == 3
    assert g["cards"][0]["score"] == pytest.approx(0.9)
    assert "2 of the images could not be shown" in g["notes"][0]


def test_many_classes_get_the_most_confused_pairs_and_readable_f1_bars(tmp_path):
    import classify
    X, y, classes = blobs(40, 6, 16, spread=1.5, seed=1)
    cache = synthetic_cache(tmp_path / "many.h5", X, y, classes)
    run = classify.train(cache, "centroid", save_to=tmp_path / "run")
    files = {p.name for p in run.path.iterdir()}
    assert "confused_pairs.png" in files and "confusion.png" not in files
    assert json.loads((run.path / "run.json").read_text())["confusion_png"] is False
    with Image.open(run.path / "f1.png") as im:  # one column: 20 px per class
        assert im.height >= 40 * 0.2 * 100 and im.width < 700
    from classify._report import f1_png
    y62 = np.repeat(np.arange(62), 2)
    f1_png(y62, y62[::-1], [f"c{k}" for k in range(62)], tmp_path / "f62.png")
    with Image.open(tmp_path / "f62.png") as im:  # two columns of 31: still 20 px per class
        assert 31 * 0.2 * 100 <= im.height < 40 * 0.2 * 100 and im.width > 1200
    from classify._report import confused_pairs
    y_pred = run.pipeline.predict(X)
    f1_png(y, y_pred, classes, tmp_path / "worst10.png", most=10)  # thousands of classes
    with Image.open(tmp_path / "worst10.png") as im:
        assert im.height < 10 * 0.19 * 100 + 200
    pairs = confused_pairs(y, y_pred, classes)
    counts = [p["count"] for p in pairs]
    assert counts == sorted(counts, reverse=True) and sum(counts) <= int((y != y_pred).sum())


def test_a_failing_report_never_fails_the_run(tmp_path, monkeypatch):
    import classify
    from classify import _html as html
    X, y, classes = blobs(3, 8, 8)
    cache = synthetic_cache(tmp_path / "c.h5", X, y, classes)

    def broken(*a, **k):
        raise RuntimeError("template exploded")
    monkeypatch.setattr(html, "render", broken)
    run = classify.train(cache, "logreg", save_to=tmp_path / "run")
    assert (run.path / "head.skops").is_file() and not (run.path / "report.html").exists()
    record = json.loads((run.path / "run.json").read_text())
    assert any("template exploded" in n for n in record["notes"])


def test_the_fine_tune_report_shows_before_and_after_side_by_side(tmp_path, world):
    from classify import _html as html, _runs as runs
    from classify._finetune import TestScores
    record = json.loads((world["runs"] / "logreg" / "run.json").read_text())
    split = json.loads((world["runs"] / "logreg" / "split.json").read_text())
    test_paths = split["folds"][0]["test"]
    y = np.array([CLASSES.index(p.split("/")[0]) for p in test_paths])
    rng = np.random.default_rng(0)
    before = rng.dirichlet(np.ones(4), len(y))  # a poor start...
    after = np.eye(4)[y] * 0.9 + 0.025  # ...and a perfect end
    record.update(head="finetune", metrics_before={"accuracy": 0.25, "macro_f1": 0.2},
                  metrics={"accuracy": 1.0, "macro_f1": 1.0})
    writer = runs.RunWriter(tmp_path / "ft")
    html.write_finetune_report(writer, record, split, TestScores(y, after, before))
    writer.commit()
    page = tmp_path / "ft" / "report.html"
    text = page.read_text()
    assert "before fine-tuning" in text and "after fine-tuning" in text
    assert {"before_confusion.png", "confusion.png", "before_f1.png", "f1.png"} <= \
        {p.name for p in (tmp_path / "ft").iterdir()}
    wrong_before = int((before.argmax(1) != y).sum())
    assert f"Misclassified test images: {wrong_before}" in text
    assert "No test image was misclassified." in text  # after


# --- item 1: the verification report ----------------------------------------------------------

def test_the_verification_report_has_roc_det_auc_and_the_hardest_pairs(world):
    out = world["base"] / "verify"
    v = json.loads((out / "verification.json").read_text())
    page = out / "report.html"
    assert f"ROC AUC {v['roc_auc']:.4f}" in _title(page) and (out / "roc.png").is_file()
    with Image.open(out / "roc.png") as im:
        assert im.width > 1.8 * im.height  # ROC and DET side by side
    text = page.read_text()
    assert "Hardest matched pairs" in text and "Hardest mismatched pairs" in text
    srcs = _images(page)
    assert len([s for s in srcs if s.startswith("data:image/jpeg")]) == 2 * v["pairs"]
    cards = re.findall(r'distance (\d\.\d{4})(?: <b class="bad">(\w+)</b>)?', text)
    d = [float(x) for x, _ in cards]
    matched, mismatched = d[:10], d[10:]
    assert matched == sorted(matched, reverse=True) and mismatched == sorted(mismatched)
    t = float(np.mean(v["thresholds"]))  # marked on the page: the folds' mean threshold
    assert [mark for _, mark in cards] == ["rejected" if x > t else "" for x in matched] + \
        ["accepted" if x <= t else "" for x in mismatched]
    assert any(mark for _, mark in cards)  # the noisy fixture has errors at the threshold


def test_verify_writes_a_run_folder_by_default_never_the_current_folder(world):
    cwd = world["verify_cwd"]  # before #16, roc.png landed here
    assert [p.name for p in cwd.iterdir()] == ["runs"]
    (folder,) = (cwd / "runs").iterdir()
    assert folder.name.endswith("-verify")
    assert {p.name for p in folder.iterdir()} == {"verification.json", "roc.png", "report.html"}
    assert f"report: runs/{folder.name}/report.html" in world["procs"]["verify"].stdout
    cli = json.loads((folder / "verification.json").read_text())
    api = json.loads((world["base"] / "verify" / "verification.json").read_text())
    assert cli["roc_auc"] == api["roc_auc"] and cli["accuracy"] == api["accuracy"]


def test_the_command_lines_write_nothing_in_the_current_folder(world):
    assert list(world["cwd"].iterdir()) == []


# --- item 2: runs --html ----------------------------------------------------------------------

def test_runs_html_compares_every_run_with_links_to_their_reports(world):
    page = world["base"] / "runs.html"
    text = page.read_text()
    assert _title(page) == f"2 runs under {world['runs']}"
    links = re.findall(r'<a href="([^"]+)">', text)
    assert sorted(links) == ["runs/centroid/report.html", "runs/logreg/report.html"]
    assert all((page.parent / link).is_file() for link in links)
    for name in ("logreg", "centroid"):
        acc = json.loads((world["runs"] / name / "run.json").read_text())["metrics"]["accuracy"]
        assert f'<td class="num">{acc:.4f}</td>' in text
    (chart,) = _images(page)
    assert chart.startswith("data:image/png;base64,")
    assert "2 runs:" in world["procs"]["runs"].stdout


def test_runs_html_links_a_run_folder_with_any_name(world, tmp_path):
    from urllib.parse import unquote

    from classify._html import runs_page
    odd = tmp_path / "runs" / "run ü #1?"
    shutil.copytree(world["runs"] / "logreg", odd)
    runs_page(tmp_path / "runs", tmp_path / "page.html")
    (link,) = re.findall(r'<a href="([^"]+)">', (tmp_path / "page.html").read_text())
    assert "#" not in link and "?" not in link and " " not in link
    assert (tmp_path / unquote(link)).resolve() == (odd / "report.html").resolve()


def test_runs_html_mistakes_are_one_line(world, tmp_path, capsys):
    from classify.cli import main
    assert main(["runs", "--runs-dir", str(world["runs"]), "--html", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["runs", "--runs-dir", str(world["runs"]), "--html",
                 str(tmp_path / "no" / "r.html")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["runs", "--runs-dir", str(tmp_path / "empty"), "--html",
                 str(tmp_path / "r.html")]) == 2
    assert "no runs under" in capsys.readouterr().err and not (tmp_path / "r.html").exists()


# --- item 3: featurize map --------------------------------------------------------------------

def test_map_draws_a_sample_with_hover_thumbnails(world):
    out = world["base"] / "map"
    facts = json.loads((out / "map-pca.json").read_text())
    assert facts["rows"] == 30 and facts["cache_rows"] == 40 and facts["classes"] == 4
    assert "30 of 40 rows" in world["procs"]["map"].stdout
    text = (out / "map-pca.html").read_text()
    assert text.count("<circle") == 30 and text.count("data-t=") == 30
    assert len(set(re.findall(r'data-p="([^"]+)"', text))) == 30
    with Image.open(out / "map-pca.png") as im:
        arr = np.asarray(im.convert("RGB"), dtype=float)
    assert arr.std() > 10  # points and a legend drawn, not an empty canvas


def test_map_default_output_is_beside_the_cache_and_pca_matches_sklearn(world, tmp_path):
    from sklearn.decomposition import PCA

    from featurize.jobs.map import MapOptions, make_map, project
    cache = shutil.copy(world["cache"], tmp_path / "c.h5")
    shutil.copytree(str(world["cache"]) + ".shards", tmp_path / "c.h5.shards")
    facts = make_map(cache, options=MapOptions("pca", thumbnails=0), log=lambda *_: None)
    assert Path(facts["html"]).parent == tmp_path / "c.map" and facts["thumbnails"] == 0
    np.testing.assert_allclose(np.abs(project(world["X"], "pca")),
                               np.abs(PCA(2).fit_transform(world["X"])), rtol=1e-4, atol=1e-5)


def test_map_mistakes_are_one_line(world, tmp_path, capsys):
    from featurize.cli import main
    for args, message in ((["--method", "lda"], "invalid choice"), (["--sample", "0"], "--sample"),
                          (["--min-per-class", "99"], "lower --min-per-class")):
        assert main(["map", str(world["cache"]), "--out", str(tmp_path / "m"), *args]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["map", str(world["cache"]), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_tsne_map_of_fewer_rows_than_its_pca_step(world, tmp_path):
    from featurize.jobs.map import project
    assert project(world["X"][:30], "tsne").shape == (30, 2)  # PCA to min(50, rows) first


def test_a_page_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    from featurize.errors import UserError
    from featurize.reporting import write_text_atomic

    def refuse(*_, **__):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(Path, "unlink", refuse)  # as the cleanup fails on a read-only folder
    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(UserError, match=r"cannot write --html .*Read-only file system"):
        write_text_atomic(tmp_path / "r.html", "<p>x</p>", "--html")


# --- the pages in a browser -------------------------------------------------------------------

CHECK = ("<script>addEventListener('load', function () { var i = Array.from(document.images);"
         " document.body.setAttribute('data-loaded', i.filter(function (x) { return x.complete"
         " && x.naturalWidth > 0; }).length + '/' + i.length); });</script>")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed")
@pytest.mark.parametrize("page", ["runs/logreg/report.html", "verify/report.html", "runs.html",
                                  "map/map-pca.html"])
def test_each_page_renders_in_headless_chromium(world, page, tmp_path):
    source = world["base"] / page
    probe = source.with_name(f".probe-{source.name}")  # beside it: relative links still work
    probe.write_text(source.read_text().replace("</body>", CHECK + "</body>"))
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
         "--window-size=1200,1400", "--dump-dom", "--virtual-time-budget=5000",
         probe.as_uri()], capture_output=True, text=True, timeout=120)
    probe.unlink()
    dom = proc.stdout
    assert re.search(r"<title>\s*\S", dom), dom[:500]
    loaded, total = map(int, re.search(r'data-loaded="(\d+)/(\d+)"', dom).groups())
    assert total > 0 and loaded == total
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"), dtype=float)
    assert pixels.std() > 5  # text and pictures, not a blank page


@pytest.mark.slow
def test_a_fine_tune_from_the_command_line_writes_its_before_and_after_report(tmp_path):
    from conftest import make_folder
    faces = make_folder(tmp_path / "faces", per_class=6)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    steps = [("featurize", [faces, "--backbone", "vggface-vgg16", "--weights", "none",
                            "--input-size", "32", "--out", tmp_path / "c.h5"]),
             ("classify", ["--cache", tmp_path / "c.h5", "--out", tmp_path / "run"]),
             ("classify", ["finetune", "--run", tmp_path / "run", "--epochs", "1",
                           "--val-fraction", "0.3", "--out", tmp_path / "ft"])]
    for module, args in steps:
        proc = _cli(module, args, cwd)
        assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "ft" / "report.html").read_text()
    assert "before fine-tuning" in text and "after fine-tuning" in text
    assert {"before_f1.png", "f1.png"} <= {p.name for p in (tmp_path / "ft").iterdir()}
    assert list(cwd.iterdir()) == []
