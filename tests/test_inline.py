"""`mprun run --inline`: every stage in the main process, in topological order, with a normal run's results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli, wait_gone


def collected(result: subprocess.CompletedProcess[str]) -> list[list]:
    """The JSON arrays a run printed, one per collect stage (the last lines of stdout; stages print above)."""
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("[")]


@pytest.mark.parametrize(
    ("pipeline", "ordered"),
    [("pool_map", True), ("lifo", True), ("apply_async", True), ("daemon", False)],
)
def test_inline_collects_what_a_normal_run_collects(pipeline, ordered):
    """Inline and normal runs collect the same items: the same order for ordered pools and LIFO, else as multisets."""
    normal = collected(run_cli(f"pipelines/{pipeline}.yaml", "--no-summary"))
    inline = collected(run_cli(f"pipelines/{pipeline}.yaml", "--no-summary", "--inline"))
    assert len(inline) == len(normal) == 1
    if ordered:
        assert inline == normal
    else:
        assert Counter(map(json.dumps, inline[0])) == Counter(map(json.dumps, normal[0]))
    assert inline[0]  # something was collected


def test_inline_lifo_is_newest_first():
    """Inline, the LIFO queue yields its newest item first: third, second, first."""
    assert collected(run_cli("pipelines/lifo.yaml", "--no-summary", "--inline")) == [["third", "second", "first"]]


def test_inline_prints_what_a_normal_run_prints():
    """queue_sentinel's creator and consumer print the same lines, in the same order, inline as in a normal run."""
    normal = run_cli("pipelines/queue_sentinel.yaml", "--no-summary")
    inline = run_cli("pipelines/queue_sentinel.yaml", "--no-summary", "--inline")
    assert normal.returncode == inline.returncode == 0, inline.stderr
    assert inline.stdout == normal.stdout
    assert inline.stdout.splitlines()[0] == "Creating data and putting it on the queue"


def test_inline_prints_the_summary_and_skips_a_daemon_with_a_warning():
    """An inline run prints the per-stage summary; the daemon monitor is skipped with a warning record."""
    result = run_cli("pipelines/daemon.yaml", "--inline")
    assert result.returncode == 0, result.stderr
    assert "daemon stage skipped" in result.stderr
    assert "monitor alive" not in result.stderr
    rows = {line.split()[0]: line.split() for line in result.stderr.splitlines() if line.split()}
    assert rows["doubler"][2:4] == ["5", "5"]  # items in, out
    assert rows["monitor"][1:4] == ["0", "0", "0"]
    assert "ok in" in result.stderr


FAILING = """\
version: 1
settings: {start_method: fork}
stages:
  - name: numbers
    kind: producer
    source: {range: {start: 1, stop: 100}}
    output: numbers
  - name: check
    kind: consumer
    input: numbers
    function: tasks_t:check
    output: checked
  - name: results
    kind: consumer
    input: checked
    function: collect
"""
TASKS = """\
import multiprocessing
import os


def check(n):
    if n == 3:
        raise ValueError(f"bad {n}")
    return n


def look(n):
    breakpoint()
    return n


def hook(*args, **kwargs):
    where = "main" if multiprocessing.parent_process() is None else "child"
    with open(os.environ["BREAKPOINT_LOG"], "a") as f:
        f.write(f"{where} {multiprocessing.current_process().name}\\n")
"""


def test_inline_failure_is_the_normal_one_line_error(tmp_pipeline):
    """A raising function ends an inline run with exit 1 and the same one-line error as a normal run."""
    path = tmp_pipeline(FAILING, TASKS)
    normal = run_cli(str(path), "--no-summary")
    inline = run_cli(str(path), "--no-summary", "--inline")
    assert normal.returncode == inline.returncode == 1
    line = "mprun: error: stage 'check' (process check) failed on item 3: ValueError: bad 3"
    assert line in normal.stderr.splitlines()
    assert inline.stderr.splitlines()[-1] == line
    assert "Traceback" in inline.stderr  # the record of the error carries the traceback, as in a normal run


def test_inline_limit_caps_each_producer(tmp_pipeline):
    """--limit applies inline: each producer emits at most N items."""
    path = tmp_pipeline(FAILING.replace("tasks_t:check", "identity"), TASKS)
    result = run_cli(str(path), "--no-summary", "--inline", "--limit", "4")
    assert collected(result) == [[1, 2, 3, 4]]


def test_inline_rejects_start_method():
    """--start-method means nothing inline: a usage error (exit 2) rather than an ignored option."""
    result = run_cli("pipelines/lifo.yaml", "--inline", "--start-method", "spawn")
    assert result.returncode == 2
    assert result.stderr.strip() == "mprun: error: --inline starts no process: --start-method does not apply"


def test_inline_invalid_file_gives_located_lines_and_exit_2(tmp_pipeline):
    """An invalid file run inline gives the located diagnostics and exit 2."""
    path = tmp_pipeline("version: 1\nstages:\n  - {name: a, kind: producer, source: {items: [1]}, output: q}\n")
    result = run_cli(str(path), "--inline")
    assert result.returncode == 2
    assert result.stderr.startswith(f"{path}:3:")
    assert "queue 'q' is written but no stage reads it" in result.stderr


def test_breakpoint_runs_in_the_main_process(tmp_pipeline, tmp_path):
    """breakpoint() in a stage function calls the breakpoint hook in the main process, once per item."""
    path = tmp_pipeline(FAILING.replace("tasks_t:check", "tasks_t:look").replace("stop: 100", "stop: 3"), TASKS)
    log = tmp_path / "breakpoints.txt"
    env = {"PYTHONBREAKPOINT": "tasks_t.hook", "BREAKPOINT_LOG": str(log)}
    result = run_cli(str(path), "--no-summary", "--inline", env=env)
    assert collected(result) == [[1, 2]]
    assert log.read_text().splitlines() == ["main check", "main check"]
    log.unlink()
    normal = run_cli(str(path), "--no-summary", env=env)
    assert collected(normal) == [[1, 2]]
    assert log.read_text().splitlines() == ["child check", "child check"]  # the hook does see the difference


def test_pdb_works_inline(tmp_pipeline):
    """With the default hook, pdb stops in the stage function, reads commands from stdin and prints locals."""
    path = tmp_pipeline(FAILING.replace("tasks_t:check", "tasks_t:look").replace("stop: 100", "stop: 3"), TASKS)
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "PYTHONBREAKPOINT"} | {"MPRUN_TEST_TOKEN": token}
    mprun = Path(sys.executable).with_name("mprun")
    result = subprocess.run(
        [str(mprun), str(path), "--no-summary", "--inline"],
        check=False,
        input="p n * 100\nc\np n * 100\nc\n",
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert wait_gone(token) == []
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("(Pdb) ") >= 2
    assert "-> return n" in out
    assert "(Pdb) 100\n" in out and "(Pdb) 200\n" in out
    assert out.splitlines()[-1].endswith("[1, 2]")



POLICIES = """\
version: 1
settings: {start_method: fork}
stages:
  - name: numbers
    kind: producer
    source: {range: {start: 1, stop: 6}}
    output: numbers
  - name: check
    kind: pool
    processes: 2
    ordered: true
    input: numbers
    function: tasks_t:check
    output: checked
POLICY
  - name: results
    kind: consumer
    input: checked
    function: collect
"""
SKIP = "    on_error: skip"
DEAD_LETTER = """\
    on_error: retry
    retries: 1
    retry_backoff: 0
    dead_letter: given_up
  - name: dead
    kind: consumer
    input: given_up
    function: collect"""


LETTER = {"item": 3, "error": "ValueError: bad 3", "stage": "check", "attempts": 2}


@pytest.mark.parametrize(("policy", "expected"), [(SKIP, [[1, 2, 4, 5]]), (DEAD_LETTER, [[LETTER], [1, 2, 4, 5]])])
def test_inline_applies_the_error_policy(tmp_pipeline, policy, expected):
    """Skipped and dead-lettered items come out the same inline as in a normal run (the worker's own policy code)."""
    path = tmp_pipeline(POLICIES.replace("POLICY", policy), TASKS)
    normal = collected(run_cli(str(path), "--no-summary"))
    inline = collected(run_cli(str(path), "--no-summary", "--inline"))
    assert inline == normal
    assert inline == expected  # collect stages print in file order: 'dead' comes first
