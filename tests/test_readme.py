"""The README's Python API example runs as written, in a fresh process."""

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import make_folder

REPO = Path(__file__).resolve().parents[1]


def readme_block(heading: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_python_api_example_of_the_readme_runs(tmp_path):
    make_folder(tmp_path / "faces")
    for name in ("pairsDevTest.txt", "pairsDevTrain.txt"):  # View 1 format, names of the folder
        (tmp_path / name).write_text("2\nalice 1 2\nbob 0 3\nalice 1 bob 1\ncarol 2 bob 2\n")
    (tmp_path / "example.py").write_text(readme_block("## Python API"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "(3, 512) 512"
    assert lines[1] == "(12, 512) [0 0 0 0 1] ['alice', 'bob', 'carol']"
    assert any(line.startswith("logreg-c10 ") for line in lines)  # classify.runs_table
    assert "True" in lines  # featurize.verify_cache(...).ok
    assert any(line.endswith("faces/alice/alice_0001.jpg") for line in lines)  # search: itself
    assert any(line.startswith("{'0.1': ") for line in lines)  # the open-set run's dir_at_far
    assert lines[-1].startswith("bad --param for head logreg: The 'C' parameter")
    assert (tmp_path / "runs" / "logreg-c10" / "run.json").is_file()
