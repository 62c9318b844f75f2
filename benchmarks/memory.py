"""Peak memory of featurize for 1,000 and 16,000 images, side by side: it must stay flat
(embeddings are journalled to disk in parts, never all held in memory).

    python benchmarks/memory.py --sizes 1000,16000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from common import REPO, command_line, save

PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)")


def make_images(folder: Path, n: int):
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"class{i % 50:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(sub / f"{i:06d}.jpg")


def peak_rss_mb(folder: Path, cache_dir: Path, args) -> float:
    import subprocess
    cmd = [sys.executable, "-c", PEAK, sys.executable, "-m", "featurize", str(folder),
           "--backbone", args.backbone, "--weights", "none", "--input-size", str(args.input_size),
           "--batch-size", str(args.batch_size), "--quiet", "--cache-dir", str(cache_dir)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    kb, code = out.split()[-2:]
    assert code == "0", out
    return int(kb) / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,16000")
    p.add_argument("--backbone", default="vggface-vgg16")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in map(int, args.sizes.split(",")):
            folder = Path(tmp) / f"images{n}"
            make_images(folder, n)
            mb = peak_rss_mb(folder, Path(tmp) / "cache", args)
            rows.append({"images": n, "peak_rss_mb": mb})
            print(f"{n:>7} images: peak RSS {mb:.0f} MB", flush=True)
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    print(f"ratio {ratio:.3f} (goal: within 1.10)")
    save("memory", {"backbone": args.backbone, "input_size": args.input_size, "rows": rows,
                    "ratio_largest_to_smallest": ratio}, command_line())


if __name__ == "__main__":
    main()
