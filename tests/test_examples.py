"""The example scripts run as a user runs them: a fresh process, from the repository."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_runs_offline_and_learns_the_synthetic_classes(tmp_path):
    (tmp_path / "work").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "quickstart.py")], env=env,
                          cwd=tmp_path / "work", capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "cache: 24 x 512, 3 classes, 24 embedded now, 0 failed"
    # Class colours are far apart: even a random network separates them.
    assert "logreg: accuracy 1.000" in lines
    assert "predicted: ['alice', 'bob', 'carol'] true: ['alice', 'bob', 'carol']" in lines
    assert any(line.startswith("grid search: best C") for line in lines)
    assert list((tmp_path / "work").iterdir()) == []  # all went into its temporary folder
