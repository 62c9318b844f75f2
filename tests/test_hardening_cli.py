"""The command lines at their edges: every bad option value is one line and exit code 2 with
nothing written, junk input commits no cache, TensorFlow's start-up lines stay out of the
output, and the Python API leaves the caller's signal handlers alone."""

import signal
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import call_cli, cli_command, cli_env, make_folder, run_cli, run_python
from featurize import cache
from featurize.cli import main
from featurize.errors import UserError
from featurize.jobs.run import featurize

TINY = ["--backbone", "vggface-vgg16", "--weights", "none", "--input-size", "32", "--quiet"]


def env():
    return cli_env(drop=["TF_CPP_MIN_LOG_LEVEL"])  # as a user runs it: nothing set


def files_under(root: Path) -> set:
    return {p.relative_to(root) for p in root.rglob("*")}


@pytest.mark.parametrize("option, value, message", [
    ("--workers", "-1", "--workers must be between 1 and"),
    ("--workers", "0", "--workers must be between 1 and"),
    ("--input-size", "0", "--input-size must be between 32 and"),
    ("--input-size", "1", "--input-size must be between 32 and"),
    ("--input-size", "-5", "--input-size must be between 32 and"),
    ("--input-size", "100000", "--input-size must be between 32 and"),
    ("--batch-size", "0", "--batch-size must be between 1 and"),
    ("--checkpoint-rows", "0", "--checkpoint-rows must be at least 1"),
    ("--crop", "1.5", "--crop must be a fraction"),
    ("--jitter", "-2", "--jitter must be between 0 and"),
    ("--workers", "many", "argument --workers: invalid int value"),
])
def test_bad_featurize_values_are_one_line_and_write_nothing(option, value, message, tmp_path,
                                                             capsys, monkeypatch):
    folder = make_folder(tmp_path / "imgs", per_class=1)
    monkeypatch.chdir(tmp_path)
    before = files_under(tmp_path)
    assert main([str(folder), *TINY, option, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert files_under(tmp_path) == before


def test_inception_needs_its_own_minimum_input_size(tmp_path):
    folder = make_folder(tmp_path / "imgs", per_class=1)
    with pytest.raises(UserError, match="input_size must be between 75 and"):
        featurize(folder, backbone="inceptionv3", weights="none", input_size=64,
                  cache_dir=tmp_path / "c", progress=False)


def test_files_that_are_not_images_commit_no_cache_and_exit_2(tmp_path):
    """A folder whose every file fails (text named .jpg) is a mistake, not an empty cache that
    classify would then pick up as the newest."""
    folder = tmp_path / "notes"
    for name in ("a/one.jpg", "a/two.jpg", "b/three.png"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("Aaron_Eckhart 1 Aaron_Eckhart 2\n")
    proc = call_cli("featurize", folder, *TINY, "--cache-dir", tmp_path / "c", cwd=tmp_path)
    assert proc.returncode == 2, proc
    assert proc.stderr.count("\n") == 1 and "none of the 3 files" in proc.stderr
    assert "not an image" in proc.stderr and "Traceback" not in proc.stderr
    assert list((tmp_path / "c").glob("*.h5")) == [] and cache.newest(tmp_path / "c") is None
    assert not list((tmp_path / "c").glob("*.shards")) and not list((tmp_path / "c").glob("*.lock"))


def test_tensorflow_start_up_lines_stay_out_of_the_output(tmp_path):
    folder = make_folder(tmp_path / "imgs", per_class=2)
    proc = run_cli("featurize", folder, *TINY, "--cache-dir", tmp_path / "c", env=env(),
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr  # no oneDNN / absl / cpu_feature_guard lines
    again = run_cli("featurize", folder, *TINY, "--cache-dir", tmp_path / "c", env=env(),
                    cwd=tmp_path)
    assert again.returncode == 0 and again.stderr == "" and "6 already cached" in again.stdout


def test_commands_that_need_no_model_never_import_tensorflow(tmp_path):
    folder = make_folder(tmp_path / "imgs", per_class=2)
    featurize(folder, backbone="vggface-vgg16", weights="none", input_size=32,
              cache_dir=tmp_path / "c", progress=False)
    script = (
        "import sys\n"
        "from featurize.cli import main as f\n"
        "from classify.cli import main as c\n"
        f"assert f([{str(folder)!r}, '--backbone', 'vggface-vgg16', '--weights', 'none',"
        f" '--input-size', '32', '--cache-dir', {str(tmp_path / 'c')!r}, '--quiet']) == 0\n"
        "assert f(['--list-backbones']) == 0\n"
        f"assert c(['runs', '--runs-dir', {str(tmp_path / 'runs')!r}]) == 0\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n")
    proc = run_python(script, env=env(), cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_help_mentions_verify():
    proc = run_cli("featurize", "--help", env=env())
    assert proc.returncode == 0 and "featurize verify CACHE" in proc.stdout


def test_download_error_keeps_its_whole_cause(tmp_path, http_server):
    from featurize.models.specs import WeightFile
    from featurize.models.weights import download_weights
    served, base, stop = http_server
    stop()  # nothing listens any more: the cause is the refused connection, deep in the chain
    with pytest.raises(UserError) as info:
        download_weights(WeightFile("w.h5", base + "long-" * 30 + "/w.h5"))
    text = str(info.value)  # the reason comes after the long URL, past where it was cut
    assert "refused" in text.lower() and "download it yourself to" in text and "\n" not in text


def test_the_api_runs_in_a_thread_and_leaves_signal_handlers_alone(tmp_path):
    folder = make_folder(tmp_path / "imgs", per_class=2)
    before = signal.getsignal(signal.SIGTERM)
    results, errors = [], []

    def work():
        try:
            results.append(featurize(folder, backbone="vggface-vgg16", weights="none",
                                     input_size=32, cache_dir=tmp_path / "c", progress=False))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not errors and results[0].embedded == 6
    assert signal.getsignal(signal.SIGTERM) is before


def test_output_closed_early_by_a_pipe_is_no_traceback():
    """`python -m featurize --list-backbones | head -1`"""
    proc = subprocess.Popen(cli_command("featurize", "--list-backbones"), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # as `head -0` does, before the listing is written
    err = proc.stderr.read()
    proc.wait()
    assert "Traceback" not in err and "BrokenPipe" not in err, err
