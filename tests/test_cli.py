"""The command line conventions: `mprun --version`, and `python -m runner` working like `mprun`."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.conftest import PIPELINES, ROOT, run_cli


def test_version_prints_mprun_and_python_versions():
    """`mprun --version` prints the installed version and the Python version on stdout, exit 0."""
    result = run_cli("--version")
    assert result.returncode == 0
    assert re.fullmatch(r"mprun \d+\.\d+\.\d+\S* \(Python 3\.\d+\.\d+\S*\)\n", result.stdout), result.stdout


def test_python_m_runner_works_like_mprun():
    """`python -m runner FILE` runs the pipeline (spawned children included) and `validate` checks, as `mprun` does."""
    command = [sys.executable, "-m", "runner"]
    ran = subprocess.run([*command, str(PIPELINES / "doubler.yaml"), "--no-summary", "--start-method", "spawn",
                          "--set", "stages.doubler.function=collect", "--set", "stages.doubler.kwargs={}"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert ran.returncode == 0, ran.stderr
    assert sorted(json.loads(ran.stdout.splitlines()[-1])) == [5, 10, 15, 20, 25]
    checked = subprocess.run([*command, "validate", "pipelines/doubler.yaml"], capture_output=True, text=True,
                             timeout=60, cwd=ROOT, check=False)
    assert (checked.returncode, checked.stdout) == (0, "ok pipelines/doubler.yaml\n"), checked.stderr
    bad = subprocess.run([*command, "nowhere.yaml"], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert bad.returncode == 2 and "cannot read the file" in bad.stderr
