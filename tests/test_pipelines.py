"""Every example pipeline runs and shows what its header promises (the multiprocessing tutorial's output)."""

from __future__ import annotations

import json
import re

import pytest

from runner import run_pipeline
from tests.conftest import PIPELINES, START_METHODS, run_cli


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line]


# Output checks run the CLI, or run in this process with fork/spawn: a forkserver started by an earlier
# test keeps the stdout that test had, so in-process forkserver runs are checked by what they collect.


@pytest.mark.parametrize("method", START_METHODS)
def test_doubler_five_processes(method):
    """The doubler doubles 5, 10, 15, 20, 25, each line naming a pid; the five processes share the items."""
    result = run_cli("pipelines/doubler.yaml", "--start-method", method)
    out = lines(result.stdout)
    assert result.returncode == 0, result.stderr
    pattern = re.compile(r"^(\d+) doubled to (\d+) by process id: (\d+)$")
    matches = [pattern.match(line) for line in out]
    assert all(matches), out
    assert sorted((int(m[1]), int(m[2])) for m in matches) == [(n, 2 * n) for n in (5, 10, 15, 20, 25)]
    assert len({m[3] for m in matches}) == 5


def test_doubler_cli_prints_summary():
    """`mprun pipelines/doubler.yaml` exits 0, prints five lines and a per-stage summary on stderr."""
    result = run_cli("pipelines/doubler.yaml")
    assert result.returncode == 0, result.stderr
    assert len(lines(result.stdout)) == 5
    assert re.search(r"^doubler\s+5\s+5\s+5\s", result.stderr, re.MULTILINE), result.stderr
    assert "ok in" in result.stderr


def test_named_processes_are_stage_dash_index_or_given_names(capfd):
    """Processes are named <stage>-<i>, and process_names gives one process the name Test."""
    assert run_pipeline(PIPELINES / "named_processes.yaml", start_method="spawn").exit_code == 0
    out = lines(capfd.readouterr().out)
    assert "2 doubled to 4 by: Test" in out
    names = sorted(line.split("by: ")[1] for line in out if not line.endswith("Test"))
    assert names == [f"doubler-{i}" for i in range(1, 6)]


def test_lock_printer_prints_each_item_once(capfd):
    """The lock example prints tango, foxtrot and 10 once each, whole lines (that `lock:` excludes calls of
    other processes is proven by test_core's read-modify-write counter)."""
    assert run_pipeline(PIPELINES / "lock_printer.yaml", start_method="fork").exit_code == 0
    assert sorted(lines(capfd.readouterr().out)) == ["10", "foxtrot", "tango"]


def test_logging_lifecycle_from_every_process(tmp_path, capfd):
    """Every process's start and exit (with exit code) and the user's records reach the one log file."""
    log_file = tmp_path / "run.jsonl"
    assert run_pipeline(PIPELINES / "logging.yaml", log_file=str(log_file), start_method="fork").exit_code == 0
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    started = {r["process"] for r in records if r["event"] == "process started"}
    exited = {(r["process"], r["exitcode"]) for r in records if r["event"] == "process exited"}
    assert started == {"items", "printer-1", "printer-2", "printer-3"}
    assert exited == {(p, 0) for p in started}
    user = [r for r in records if r["event"] == "printing"]
    stdlib = [r for r in records if r["event"].startswith("printed ")]
    assert sorted(str(r["item"]) for r in user) == ["10", "foxtrot", "tango"]
    assert len(stdlib) == 3
    assert all({"stage", "process", "pid", "level", "timestamp"} <= r.keys() for r in records)
    assert sorted(lines(capfd.readouterr().out)) == ["10", "foxtrot", "tango"]


@pytest.mark.parametrize("method", START_METHODS)
def test_pool_map_in_order(method):
    """A pool of 3 over [5, 10, 20] collects [10, 20, 40], in order."""
    result = run_pipeline(PIPELINES / "pool_map.yaml", start_method=method)
    assert result.exit_code == 0
    assert result.collected == {"results": [10, 20, 40]}


def test_apply_async_cli_prints_the_collected_result():
    """One item, 25, through a pool: the CLI prints the collected [50] on stdout."""
    result = run_cli("pipelines/apply_async.yaml", "--no-summary")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[50]\n"


def test_queue_sentinel_without_sentinel(capfd):
    """The creator's data reaches the consumer over a FIFO queue and the run ends with no user sentinel."""
    assert run_pipeline(PIPELINES / "queue_sentinel.yaml", start_method="spawn").exit_code == 0
    assert lines(capfd.readouterr().out) == [
        "Creating data and putting it on the queue",
        "data found to be processed: 5",
        "10",
        "data found to be processed: 10",
        "20",
        "data found to be processed: 13",
        "26",
    ]


@pytest.mark.parametrize("method", START_METHODS)
def test_lifo_pipeline_yields_last_in_first_out(method):
    """Through the manager-served LIFO queue, items come out last-in first-out: third, second, first."""
    result = run_pipeline(PIPELINES / "lifo.yaml", start_method=method)
    assert result.exit_code == 0
    assert result.collected == {"order": ["third", "second", "first"]}


def test_daemon_never_holds_the_run(tmp_path):
    """The never-ending monitor does not keep the run open; it is stopped once the work is done."""
    log_file = tmp_path / "run.jsonl"
    result = run_pipeline(PIPELINES / "daemon.yaml", log_file=str(log_file))
    assert result.exit_code == 0
    assert sorted(result.collected["results"]) == [2, 4, 6, 8, 10]
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert any(r["event"] == "monitor alive" for r in records)
    assert any(r["event"] == "process exited" and r["process"] == "monitor" for r in records)
