"""tests/worker_crashes.py on a throwaway suite: 20 one-test files, then one whose test aborts
its worker. Without the plugin pytest-xdist 3.8 waits forever here (its dead worker's 20
finished files come back as empty units); with it the run ends, the crash is a rerun, and a
test that crashes every time fails."""

import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

CRASHING = """
import os
from pathlib import Path

def test_crash():
    mark = Path(os.environ["CRASH_MARK"])
    if not mark.exists() or os.environ.get("CRASH_ALWAYS"):
        mark.write_text("crashed")
        os.abort()
"""


def run_suite(tmp_path: Path, always: bool, *options: str) -> subprocess.CompletedProcess:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\npytest_plugins = ['worker_crashes']\n"
    )
    for i in range(20):
        (suite / f"test_{i:02d}.py").write_text("def test_one():\n    pass\n")
    (suite / "test_zz_crash.py").write_text(CRASHING)
    env = {"CRASH_MARK": str(tmp_path / "mark"), "PATH": "/usr/bin:/bin"}
    if always:
        env["CRASH_ALWAYS"] = "1"
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2"]
    return subprocess.run(
        [*argv, "--dist", "loadfile", *options, str(suite)],
        cwd=suite,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # the unpatched scheduler never returns
    )


@pytest.mark.parametrize("always", [False, True], ids=["crashes-once", "crashes-always"])
def test_a_crashed_worker_reruns_its_test_once_and_the_run_ends(tmp_path, always):
    result = run_suite(tmp_path, always)
    summary = result.stdout.strip().splitlines()[-1]
    if always:
        assert result.returncode == 1, result.stdout
        assert "1 failed, 20 passed, 1 rerun" in summary, result.stdout
        assert "test_zz_crash.py::test_crash (2x; failed)" in result.stdout
    else:
        assert result.returncode == 0, result.stdout
        assert "21 passed, 1 rerun" in summary, result.stdout
        assert "test_zz_crash.py::test_crash (1x; passed or failed on its rerun)" in result.stdout


def test_a_crashed_test_that_is_never_rerun_fails_the_run(tmp_path):
    """No restarts left: the run stops without the rerun, and that is not a success."""
    result = run_suite(tmp_path, False, "--max-worker-restart=0")
    assert result.returncode == 1, result.stdout
    assert "test_zz_crash.py::test_crash (1x; never rerun: the run fails)" in result.stdout
