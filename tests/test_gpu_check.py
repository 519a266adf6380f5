"""scripts/gpu_check.sh and what it relies on, checked without a GPU: its plan fits one device call, each step
leaves its own file, the budget cuts what would not fit, and the per-test timeout and results file work."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ["warm", "tests", "verify", "kernels", "phase7", "memory", "smoke"]  # the order of value
ONE_CALL_S = 480  # 8 minutes: a cold machine's start and a re-run must fit the 15 minutes of device time


def gpu_check(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def test_plan_lists_the_steps_in_order_and_their_limits_fit_one_call():
    result = gpu_check("--plan")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert [r[0] for r in rows[:-1]] == STEPS
    limits = [int(r[1].rstrip("s")) for r in rows[:-1]]
    assert rows[-1][0] == "total" and int(rows[-1][1].rstrip("s")) == sum(limits) <= ONE_CALL_S


def test_each_step_leaves_its_own_file_and_a_short_budget_skips_what_would_not_fit(tmp_path):
    result = gpu_check("--dry-run", OUT=str(tmp_path))
    assert result.returncode == 0, result.stderr
    for step in STEPS:
        lines = (tmp_path / f"{step}.txt").read_text().splitlines()
        assert lines[0].startswith(f"=== {step} (limit") and re.match(rf"=== {step} +ok ", lines[-1])
    assert len(list(tmp_path.iterdir())) <= 8  # what the device tool brings back
    short = gpu_check("--dry-run", "tests", "verify", OUT=str(tmp_path / "short"), BUDGET_S="5")
    assert short.returncode == 0 and "tests    skipped" in short.stdout and "verify   skipped" in short.stdout
    assert gpu_check("nonsense").returncode == 2


def test_a_test_past_its_timeout_fails_and_every_test_is_recorded_as_it_ends(tmp_path):
    """The hooks of tests/conftest.py, on a throwaway test file: one test passes, one sleeps past the timeout
    (failed by the alarm, the run goes on), one fails."""
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_runtest_logreport, "
                                          "pytest_runtest_protocol  # noqa: F401\n")
    (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
        import time

        def test_quick():
            pass

        def test_slow():
            time.sleep(30)

        def test_wrong():
            assert False
    """))
    results = tmp_path / "results.txt"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "TEST_TIMEOUT_S": "2",
                              "TEST_RESULTS_FILE": str(results)})
    assert run.returncode == 1, run.stdout
    lines = results.read_text().splitlines()
    outcomes = {line.split()[1].split("::")[-1]: line.split()[0] for line in lines if not line.startswith(("START",
                                                                                                          "END"))}
    assert outcomes == {"test_quick": "PASSED", "test_slow": "TIMEOUT", "test_wrong": "FAILED"}
    assert [line.split()[0] for line in lines if line.startswith(("START", "END"))] == ["START", "END"] * 3
