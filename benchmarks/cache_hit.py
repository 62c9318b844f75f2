"""Re-running featurize on a fully cached folder: the whole command, interpreter start included.

    python benchmarks/cache_hit.py --backbone dlib-resnet      # after featurizing all of LFW
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from common import REPO, command_line, lfw_images, save


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="dlib-resnet")
    p.add_argument("--weights", default="default")
    p.add_argument("--lfw")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cmd = [sys.executable, "-m", "featurize", str(lfw_images(args.lfw)), "--backbone",
           args.backbone, "--weights", args.weights, "--quiet"]
    times, out = [], ""
    for _ in range(args.repeats):
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        out = proc.stdout
        if proc.returncode != 0 or " 0 embedded" not in out:
            sys.exit(f"not a cache hit (featurize the folder fully first):\n{out}{proc.stderr}")
    print(out.strip())
    print(f"cache hit: best {min(times):.2f} s, runs {', '.join(f'{t:.2f}' for t in times)}")
    save("cache_hit", {"backbone": args.backbone, "summary": out.strip().splitlines()[0],
                       "seconds_best": min(times), "seconds": times}, command_line())


if __name__ == "__main__":
    main()
