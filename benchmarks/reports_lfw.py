"""Reports on real LFW (issue #16): what a run's report, the verification report, the runs
page and the embedding map cost and weigh, and the docs' screenshots.

    python benchmarks/reports_lfw.py --cache /work/lfwcache/NAME.h5 --out /tmp/reports \
        --screenshots docs

From a dlib-resnet cache of LFW: logreg and ridge runs on the people with >= 20 images
(62 classes), the View 1 verification (threshold on pairsDevTrain.txt), `runs --html`, and
the map of the >= 20 people (UMAP when installed, else t-SNE). Each is made by the project's
own command line in a fresh process; sizes of the pages and the time the report adds to a
run are measured. With --screenshots DIR, Chromium screenshots of the run report and the map
and of the verification report are saved there as small JPEGs. Writes benchmarks/results/reports_lfw.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import LFW, REPO, command_line, save

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def cli(module: str, *args) -> tuple[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], env=ENV,
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        sys.exit(f"{module} {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc.stdout, time.perf_counter() - t0


def report_cost(cache: str, min_per_class: int, repeats: int) -> dict:
    """Seconds the report (pictures + report.html) adds to saving a logreg run: saving with
    it against saving with the report writer replaced by a no-op, in-process."""
    sys.path.insert(0, str(REPO))
    import tempfile

    import classify
    from classify import _html as html
    run = classify.train(cache, "logreg", min_per_class=min_per_class)

    def saves(tmp: Path, tag: str) -> list[float]:
        times = []
        for k in range(repeats):
            t0 = time.perf_counter()
            run.save(tmp / f"{tag}{k}")
            times.append(time.perf_counter() - t0)
        return sorted(times)
    with tempfile.TemporaryDirectory() as tmp:
        with_report = saves(Path(tmp), "with")
        original, html.write_run_report = html.write_run_report, lambda *a, **k: None
        try:
            without = saves(Path(tmp), "without")
        finally:
            html.write_run_report = original
    median = repeats // 2
    return {"save_with_report_s": with_report, "save_without_report_s": without,
            "report_adds_s_median": with_report[median] - without[median],
            "train_seconds": run.train_seconds}


def screenshot(page: Path, dest: Path, width: int, height: int, crop_height: int,
               script: str = "") -> dict:
    """A JPEG of the page's top as Chromium renders it; `script` runs first (a hover)."""
    from PIL import Image
    png = dest.with_suffix(".full.png")
    shown = page.with_name(f".shot-{page.name}")  # beside it: relative links still work
    shown.write_text(page.read_text().replace("</body>", f"<script>{script}</script></body>"))
    try:
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                        f"--screenshot={png}", f"--window-size={width},{height}",
                        "--hide-scrollbars", "--virtual-time-budget=5000", shown.as_uri()],
                       capture_output=True, check=True, timeout=120)
    finally:
        shown.unlink()
    with Image.open(png) as im:
        im = im.convert("RGB").crop((0, 0, width, min(crop_height, im.height)))
        im.thumbnail((1000, 2000))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=80, optimize=True)
    png.unlink()
    dest.write_bytes(buf.getvalue())
    return {"file": str(dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest),
            "bytes": len(buf.getvalue())}


# The map's screenshot shows a hover: the first George_W_Bush point with a thumbnail.
HOVER = ("var c = Array.from(document.querySelectorAll('circle[data-t]')).find(function (c) {"
         " return c.dataset.p.indexOf('George_W_Bush') >= 0; }); if (c) {"
         " c.dispatchEvent(new Event('mouseenter')); c.setAttribute('r', 7);"
         " c.setAttribute('stroke', '#000'); c.setAttribute('stroke-width', 2); }")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True, help="dlib-resnet cache of all of LFW")
    p.add_argument("--out", required=True, help="folder for the runs, pages and map")
    p.add_argument("--min-per-class", type=int, default=20)
    p.add_argument("--map-method", default=None, help="default: umap if installed, else tsne")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--screenshots", help="save report.jpg, verify.jpg and map.jpg here")
    args = p.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    runs_dir, facts = out / "runs", {}
    for head in ("logreg", "ridge"):  # ridge: 0.966, errors enough to fill a gallery
        _, seconds = cli("classify", "--cache", args.cache, "--head", head, "--min-per-class",
                         args.min_per_class, "--out", runs_dir / head)
        facts[f"run_{head}"] = {"command_seconds": seconds,
                                "report_bytes": (runs_dir / head / "report.html").stat().st_size}
    pairs = LFW / "pairsDevTest.txt"
    _, seconds = cli("classify", "verify", "--cache", args.cache, "--pairs", pairs,
                     "--train-pairs", LFW / "pairsDevTrain.txt", "--out", out / "verify")
    facts["verify"] = {"command_seconds": seconds,
                       "report_bytes": (out / "verify" / "report.html").stat().st_size,
                       **{k: v for k, v in json.loads((out / "verify" / "verification.json")
                                                      .read_text()).items()
                          if k in ("accuracy", "roc_auc", "threshold", "accuracy_all")}}
    _, seconds = cli("classify", "runs", "--runs-dir", runs_dir, "--html", out / "runs.html")
    facts["runs_page"] = {"command_seconds": seconds,
                          "bytes": (out / "runs.html").stat().st_size}
    method = ["--method", args.map_method] if args.map_method else []
    stdout, seconds = cli("featurize", "map", args.cache, "--min-per-class", args.min_per_class,
                          *method, "--out", out / "map")
    (facts_file,) = (out / "map").glob("map-*.json")
    facts["map"] = {**json.loads(facts_file.read_text()), "command_seconds": seconds,
                    "html_bytes": Path(json.loads(facts_file.read_text())["html"]).stat().st_size}
    facts["report_cost"] = report_cost(args.cache, args.min_per_class, args.repeats)
    if args.screenshots:
        dest = Path(args.screenshots).resolve()
        dest.mkdir(parents=True, exist_ok=True)
        facts["screenshots"] = [
            screenshot(runs_dir / "ridge" / "report.html", dest / "report.jpg", 1200, 4000,
                       2300),
            screenshot(out / "verify" / "report.html", dest / "verify.jpg", 1200, 2400, 1500),
            screenshot(Path(facts["map"]["html"]), dest / "map.jpg", 1150, 1000, 960,
                       HOVER)]
    print(json.dumps(facts, indent=2, default=str))
    save("reports_lfw", facts, command_line())


if __name__ == "__main__":
    main()
