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


# -- trust: a cache entry is only read from a folder and a file that are this user's alone ----------------

PAYLOAD = """
import os, pickle, sys
class Planted:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
open(sys.argv[1], "wb").write(pickle.dumps(Planted()))
"""


def _plant(entry, marker) -> None:
    """Overwrite ``entry`` with a pickle that creates ``marker`` when it is loaded."""
    subprocess.run([sys.executable, "-c", PAYLOAD, str(entry), str(marker)], check=True, timeout=30)


def _cached_run(path, cache_dir, *options: str):
    """Run ``path`` once through the CLI so the cache holds its entry; return that entry."""
    assert run_cli(str(path), "--no-summary", *options).returncode == 0
    (entry,) = cache_dir.glob("*.pickle")
    return entry


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another uid needs root")
def test_an_entry_owned_by_another_user_is_never_loaded(tmp_pipeline, cache_dir, tmp_path):
    """A planted pickle owned by uid 65534 in the user's own cache folder does not run; the run proceeds uncached."""
    path = tmp_pipeline(PIPELINE, TASKS)
    entry = _cached_run(path, cache_dir, "--log-level", "debug")
    marker = tmp_path / "planted-code-ran"
    _plant(entry, marker)
    os.chown(entry, 65534, 65534)
    result = run_cli(str(path), "--no-summary", "--log-level", "debug")
    assert not marker.exists()
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(result.stdout)) == [0, 2, 4, 6]
    assert "owned by uid 65534" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another uid needs root")
def test_a_folder_owned_by_another_user_is_neither_read_nor_written(tmp_pipeline, cache_dir, tmp_path):
    """A cache folder made in advance by another user (uid 65534): its entries are not loaded, nothing is stored there."""
    path = tmp_pipeline(PIPELINE, TASKS)
    entry = _cached_run(path, cache_dir)
    marker = tmp_path / "planted-code-ran"
    _plant(entry, marker)
    os.chown(cache_dir, 65534, 65534)
    result = run_cli(str(path), "--no-summary")
    assert not marker.exists()
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(result.stdout)) == [0, 2, 4, 6]
    entry.unlink()
    assert run_cli(str(path), "--no-summary").returncode == 0
    assert not list(cache_dir.glob("*.pickle"))


def test_a_folder_or_entry_writable_by_others_is_not_trusted(tmp_pipeline, cache_dir, tmp_path):
    """Group- or world-writable: the folder (then the entry) is ignored, the planted code does not run."""
    path = tmp_pipeline(PIPELINE, TASKS)
    entry = _cached_run(path, cache_dir)
    marker = tmp_path / "planted-code-ran"
    _plant(entry, marker)
    os.chmod(entry, 0o666)
    assert run_cli(str(path), "--no-summary").returncode == 0
    assert not marker.exists()
    os.chmod(entry, 0o600)
    os.chmod(cache_dir, 0o777)
    assert run_cli(str(path), "--no-summary").returncode == 0
    assert not marker.exists()


def test_a_symlinked_entry_or_folder_is_not_followed(tmp_pipeline, cache_dir, tmp_path):
    """An entry that is a symlink (to a file the user owns, even) is not read; nor is a cache folder that is one."""
    path = tmp_pipeline(PIPELINE, TASKS)
    entry = _cached_run(path, cache_dir)
    marker = tmp_path / "planted-code-ran"
    elsewhere = tmp_path / "elsewhere.pickle"
    _plant(elsewhere, marker)
    entry.unlink()
    entry.symlink_to(elsewhere)
    assert run_cli(str(path), "--no-summary").returncode == 0
    assert not marker.exists()
    real = tmp_path / "real-cache"
    cache_dir.rename(real)
    (real / entry.name).unlink()
    _plant(real / entry.name, marker)
    cache_dir.symlink_to(real)
    assert run_cli(str(path), "--no-summary").returncode == 0
    assert not marker.exists()


def test_the_folder_is_created_private(tmp_pipeline, cache_dir):
    """A new cache folder is made with mode 0o700, and its entries are readable and writable by the user alone."""
    path = tmp_pipeline(PIPELINE, TASKS)
    entry = _cached_run(path, cache_dir)
    assert cache_dir.stat().st_mode & 0o777 == 0o700
    assert entry.stat().st_mode & 0o077 == 0
