"""The example scripts run as a user runs them: a fresh process, from the repository."""

from conftest import REPO, run_python


def test_quickstart_runs_offline_and_learns_the_synthetic_classes(tmp_path):
    (tmp_path / "work").mkdir()
    proc = run_python(REPO / "examples" / "quickstart.py", cwd=tmp_path / "work")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "cache: 24 x 512, 3 classes, 24 embedded now, 0 failed"
    # Class colours are far apart: even a random network separates them.
    assert "logreg: accuracy 1.000" in lines
    assert "predicted: ['alice', 'bob', 'carol'] true: ['alice', 'bob', 'carol']" in lines
    assert any(line.startswith("grid search: best C") for line in lines)
    assert list((tmp_path / "work").iterdir()) == []  # all went into its temporary folder
