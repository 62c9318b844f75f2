"""Shared by the benchmark scripts: where LFW is, what machine this is, saving figures."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
LFW = REPO.parent / "shared" / "datasets" / "lfw"
sys.path.insert(0, str(REPO))  # run from a checkout without installing


def lfw_images(path=None) -> Path:
    root = Path(path) if path else LFW / "lfw-deepfunneled"
    if not root.is_dir():
        sys.exit(f"LFW not found at {root}; pass --lfw PATH (python -m featurize.datasets lfw).")
    return root


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    try:
        import keras
        info.update(keras=keras.__version__, backend=keras.backend.backend())
    except ImportError:
        pass
    gpu = _gpu_name()
    if gpu:
        info["gpu"] = gpu
    return info


def _gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def save(name: str, data: dict, command: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "command": command, "date": time.strftime("%Y-%m-%d %H:%M"),
               "machine": machine(), **data}
    path.write_text(json.dumps(payload, indent=2, default=float))
    print(f"-> {path}")
    return path


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])


def people_subset(root: Path, min_images: int, dest: Path) -> Path:
    """A folder of symlinks to the people with at least `min_images` images."""
    dest.mkdir(parents=True, exist_ok=True)
    for person in sorted(os.listdir(root)):
        if len(os.listdir(root / person)) >= min_images and not (dest / person).exists():
            (dest / person).symlink_to(root / person)
    return dest
