"""`python -m featurize.datasets lfw [DEST] [--from PATH]`: download and lay out a dataset for
featurize (`featurize.data.datasets` does the work; `featurize.fetch_lfw` from Python)."""

from __future__ import annotations

import argparse
import sys

from featurize.data.datasets import LFW_ARCHIVES, LOCAL_ENV, SHARED_COPY, fetch_lfw
from featurize.errors import UserError

__all__ = ["fetch_lfw", "main"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m featurize.datasets", description="Download and lay out a dataset for "
        f"featurize. Without --from, a failed download falls back to ${LOCAL_ENV} or "
        f"{SHARED_COPY}.")
    p.add_argument("dataset", choices=["lfw"])
    p.add_argument("dest", nargs="?", default="data/lfw")
    p.add_argument("--variant", default="deepfunneled", choices=list(LFW_ARCHIVES))
    p.add_argument("--from", "--from-archive", dest="source", metavar="PATH",
                   help="a local copy: a folder holding lfw-deepfunneled/ and the pair files "
                   f"(like {SHARED_COPY}; its images are linked, not copied), or the .tgz")
    args = p.parse_args(argv)

    def log(message):
        print(message, file=sys.stderr if message.startswith("warning:") else sys.stdout)
    try:
        dest = fetch_lfw(args.dest, args.variant, args.source, log=log)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"ready: python -m featurize {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
