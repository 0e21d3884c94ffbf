"""runner.cache: a file run before with the same inputs skips YAML and Pydantic; any changed input is a miss."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from runner import plan_run
from tests.conftest import run_cli

PIPELINE = """\
version: 1
stages:
  - name: numbers
    kind: producer
    source: {range: {stop: "${COUNT:-4}"}}
    output: numbers
  - name: double
    kind: pool
    processes: 2
    input: numbers
    output: doubled
    function: tasks_t:double
  - name: out
    kind: consumer
    input: doubled
    function: collect
"""
TASKS = "def double(x):\n    return x * 2\n"

PLAN_AND_SAY_WHAT_WAS_IMPORTED = """
import sys
from runner import plan_run
plan = plan_run(sys.argv[1])
print(plan.stages[1].processes, "pydantic" in sys.modules, "yaml" in sys.modules)
"""


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A cache folder of this test alone."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("MPRUN_CACHE_DIR", str(folder))
    return folder


def _plan_in_fresh_process(path, env=None) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PLAN_AND_SAY_WHAT_WAS_IMPORTED, str(path)], capture_output=True,
                         text=True, timeout=60, check=True, env={**os.environ, **(env or {})})
    return out.stdout.split()


def test_second_plan_of_a_file_skips_yaml_and_pydantic(tmp_pipeline, cache_dir):
    """The first plan validates (pydantic imported) and stores an entry; the second reads it without either."""
    path = tmp_pipeline(PIPELINE, TASKS)
    assert _plan_in_fresh_process(path) == ["2", "True", "True"]
    assert len(list(cache_dir.glob("*.pickle"))) == 1
    assert _plan_in_fresh_process(path) == ["2", "False", "False"]


def test_turned_off_by_mprun_no_cache(tmp_pipeline, cache_dir):
    """MPRUN_NO_CACHE=1: nothing is written and every plan validates."""
    path = tmp_pipeline(PIPELINE, TASKS)
    for _ in range(2):
        assert _plan_in_fresh_process(path, {"MPRUN_NO_CACHE": "1"}) == ["2", "True", "True"]
    assert not cache_dir.exists()


def test_every_input_of_a_plan_is_part_of_its_key(tmp_pipeline, cache_dir, monkeypatch):
    """An edit of the file, a --set, a setting, --limit or a ${VAR} the file names each give a new plan."""
    path = tmp_pipeline(PIPELINE, TASKS)
    assert plan_run(path).stages[1].processes == 2
    path.write_text(PIPELINE.replace("processes: 2", "processes: 3"))
    assert plan_run(path).stages[1].processes == 3
    assert plan_run(path, ["stages.double.processes=1"]).stages[1].processes == 1
    assert plan_run(path, start_method="spawn").start_method == "spawn"
    assert plan_run(path).start_method == "forkserver"
    assert plan_run(path, limit=2).limit == 2
    assert plan_run(path).stages[0].source == {"range": {"start": 0, "stop": 4, "step": 1}}
    monkeypatch.setenv("COUNT", "7")
    assert plan_run(path).stages[0].source["range"]["stop"] == 7
    assert len(list(cache_dir.glob("*.pickle"))) == 6


def test_an_invalid_file_is_never_stored(tmp_pipeline, cache_dir):
    """A file that fails validation or the import check leaves no entry, so it is checked in full every time."""
    bad = tmp_pipeline(PIPELINE.replace("processes: 2", "processes: zero"), TASKS)
    for _ in range(2):
        result = run_cli(str(bad))
        assert result.returncode == 2
        assert "p.yaml:9:16: error: stages[1].processes:" in result.stderr
    missing = tmp_pipeline(PIPELINE.replace("tasks_t:double", "nowhere:double"), TASKS, name="q.yaml")
    assert run_cli(str(missing)).returncode == 2
    assert not list(cache_dir.glob("*.pickle"))


def test_a_module_gone_since_the_last_run_is_reported_located(tmp_pipeline, cache_dir):
    """A hit still import-checks the functions; a problem then is reported as without the cache (exit 2, line:col)."""
    path = tmp_pipeline(PIPELINE, TASKS)
    first = run_cli(str(path), "--no-summary")
    assert first.returncode == 0
    assert sorted(json.loads(first.stdout)) == [0, 2, 4, 6]
    (path.parent / "tasks_t.py").unlink()
    again = run_cli(str(path), "--no-summary")
    assert again.returncode == 2
    assert again.stderr.startswith(f"{path}:12:15: error: stages[1].function: cannot import 'tasks_t:double'")


def test_an_unreadable_entry_is_a_miss(tmp_pipeline, cache_dir):
    """A truncated entry (a crash while writing elsewhere, a disk problem) is ignored and written again."""
    path = tmp_pipeline(PIPELINE, TASKS)
    plan_run(path)
    (entry,) = cache_dir.glob("*.pickle")
    entry.write_bytes(entry.read_bytes()[:10])
    assert _plan_in_fresh_process(path) == ["2", "True", "True"]
    assert _plan_in_fresh_process(path) == ["2", "False", "False"]
