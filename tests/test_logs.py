"""Logs: item_id follows an item across stages, log_level holds in every process, console and JSON renderers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections import defaultdict

import pytest

from runner.logs import ConsoleFormatter
from tests.conftest import ROOT, run_cli, wait_gone

TASKS = '''
import logging, structlog

log = structlog.get_logger("tasks")

def first(x):
    log.info("first saw", x=x)
    log.debug("first debug", x=x)
    logging.getLogger("tasks.std").warning("first std %s", x)
    return x * 10

def second(y):
    log.info("second saw", y=y)
    if y % 30 == 0:
        raise ValueError(y)
    return y

def only_odd(x):
    log.info("filter saw", x=x)
    return x if x % 2 else None

def twice(x):
    yield x
    yield x

def dead(letter):
    log.info("dead saw", x=letter["item"])

def bad(x):
    if x == 4:
        raise KeyError(x)
    if x % 2:
        raise ValueError(x)
    return x
'''


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_event(recs):
    found = defaultdict(list)
    for r in recs:
        found[r["event"]].append(r)
    return found


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_item_id_follows_an_item_across_stages(tmp_pipeline, tmp_path, method):
    """A record a stage function writes while handling an item carries ``item_id = <producer>:<n>`` (n: the
    item's index in its source, across the producer's processes), the same in the next stage, for
    dead-lettered items too; stdlib records carry it as structlog's do."""
    text = f"""version: 1
settings: {{start_method: {method}}}
stages:
  - {{name: src, kind: producer, processes: 2, source: {{range: {{stop: 12}}}}, output: a}}
  - {{name: one, kind: consumer, processes: 2, input: a, function: "tasks_t:first", output: b}}
  - {{name: two, kind: pool, processes: 2, input: b, function: "tasks_t:second", on_error: skip,
     dead_letter: dlq}}
  - {{name: dl, kind: consumer, input: dlq, function: "tasks_t:dead"}}
"""
    log_file = tmp_path / "log.jsonl"
    result = run_cli(str(tmp_pipeline(text, TASKS)), "--log-file", str(log_file))
    assert result.returncode == 0, result.stderr
    events = by_event(records(log_file))
    assert sorted(r["x"] for r in events["first saw"]) == list(range(12))
    for r in events["first saw"]:
        assert r["item_id"] == f"src:{r['x']}" and r["stage"] == "one"
    std = [r for r in records(log_file) if str(r["event"]).startswith("first std")]
    assert len(std) == 12 and all(r["item_id"] == f"src:{r['event'].split()[-1]}" for r in std)
    assert sorted(r["y"] for r in events["second saw"]) == [10 * x for x in range(12)]
    for r in events["second saw"]:
        assert r["item_id"] == f"src:{r['y'] // 10}" and r["stage"] == "two"
    assert sorted(r["x"] for r in events["dead saw"]) == [0, 30, 60, 90]
    for r in events["dead saw"]:
        assert r["item_id"] == f"src:{r['x'] // 10}"
    lifecycle = [r for r in records(log_file) if r["event"] in ("process started", "process exited")]
    assert lifecycle and all("item_id" not in r for r in lifecycle)


def test_item_id_through_fan_in_filters_generators_and_lifo(tmp_pipeline, tmp_path):
    """Two producers into one queue keep their own names; an item a filter drops takes no id with it; each
    output of a generator inherits its item's id; ids survive a LIFO queue."""
    text = """version: 1
settings: {start_method: fork}
queues: {stack: {type: lifo}}
stages:
  - {name: evens, kind: producer, source: {items: [0, 2, 4, 6]}, output: a}
  - {name: odds, kind: producer, source: {items: [1, 3, 5, 7]}, output: a}
  - {name: gen, kind: consumer, input: a, function: "tasks_t:twice", output: b}
  - {name: filter, kind: pool, processes: 2, input: b, function: "tasks_t:only_odd", output: stack}
  - {name: last, kind: consumer, input: stack, function: "tasks_t:first"}
"""
    log_file = tmp_path / "log.jsonl"
    result = run_cli(str(tmp_pipeline(text, TASKS)), "--log-file", str(log_file))
    assert result.returncode == 0, result.stderr
    events = by_event(records(log_file))

    def expected(x):
        return f"evens:{x // 2}" if x % 2 == 0 else f"odds:{x // 2}"

    assert sorted(r["x"] for r in events["filter saw"]) == sorted(2 * list(range(8)))
    assert all(r["item_id"] == expected(r["x"]) for r in events["filter saw"])
    assert sorted(r["x"] for r in events["first saw"]) == [1, 1, 3, 3, 5, 5, 7, 7]
    assert all(r["item_id"] == expected(r["x"]) for r in events["first saw"])


@pytest.mark.parametrize("level", ["warning", "debug"])
def test_log_level_holds_in_every_process(tmp_pipeline, tmp_path, level):
    """settings.log_level (here via --log-level) filters records made in the children, structlog and stdlib."""
    text = """version: 1
settings: {start_method: spawn}
stages:
  - {name: src, kind: producer, source: {range: {stop: 3}}, output: a}
  - {name: one, kind: consumer, input: a, function: "tasks_t:first"}
"""
    log_file = tmp_path / "log.jsonl"
    result = run_cli(str(tmp_pipeline(text, TASKS)), "--log-level", level, "--log-file", str(log_file))
    assert result.returncode == 0, result.stderr
    events = by_event(records(log_file))
    assert len([r for r in records(log_file) if str(r["event"]).startswith("first std")]) == 3  # warnings pass
    if level == "warning":
        assert events["first saw"] == [] and events["first debug"] == [] and events["process started"] == []
        assert "first saw" not in result.stderr
    else:
        assert len(events["first debug"]) == 3 and all(r["level"] == "debug" for r in events["first debug"])
        assert "first debug" in result.stderr


def test_console_lines_are_aligned_columns_without_colours_off_a_terminal(tmp_pipeline):
    """Console records off a terminal: no ANSI codes; time, level, stage and process in aligned columns."""
    text = """version: 1
settings: {start_method: fork}
stages:
  - {name: src, kind: producer, source: {range: {stop: 3}}, output: a}
  - {name: a_longer_stage, kind: consumer, processes: 2, input: a, function: "tasks_t:first"}
"""
    result = run_cli(str(tmp_pipeline(text, TASKS)), "--no-summary")
    assert result.returncode == 0
    assert "\x1b[" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if re.match(r"\d\d:\d\d:\d\d\.\d{3} ", line)]
    assert len(lines) >= 3 + 3 + 3  # three records per item, plus lifecycle
    starts = {line.index("process started") for line in lines if "process started" in line}
    assert len(starts) == 1  # the event column starts at one offset whatever the stage and process
    saw = [line for line in lines if "first saw" in line]
    assert all(re.search(r" info +a_longer_stage a_longer_stage-\d first saw +item_id=src:\d x=\d", s) for s in saw)


def test_json_lines_on_request(tmp_pipeline):
    """--log-format json: every stderr record line is a JSON object with stage, process, pid and level."""
    text = """version: 1
settings: {start_method: fork}
stages:
  - {name: src, kind: producer, source: {range: {stop: 3}}, output: a}
  - {name: one, kind: consumer, input: a, function: "tasks_t:first"}
"""
    result = run_cli(str(tmp_pipeline(text, TASKS)), "--log-format", "json", "--no-summary")
    assert result.returncode == 0
    recs = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert recs and all({"stage", "process", "pid", "level", "event"} <= r.keys() for r in recs)
    assert {r["item_id"] for r in recs if r["event"] == "first saw"} == {"src:0", "src:1", "src:2"}


def test_json_logs_all_the_way(tmp_pipeline):
    """--log-format json: every stderr line is JSON, the summary is one record (with the run's error when it
    failed), and items inside records are JSON values, not Python reprs."""
    text = """version: 1
settings: {start_method: fork, log_format: json}
stages:
  - {name: src, kind: producer, source: {items: [{n: 4, tags: [a]}, "text", 1]}, output: a}
  - {name: one, kind: consumer, input: a, function: "tasks_t:bad", on_error: skip}
"""
    result = run_cli(str(tmp_pipeline(text, TASKS.replace("if x == 4:", "if x == 1:").replace("if x % 2:", "if True:"))))
    assert result.returncode == 0, result.stderr
    recs = [json.loads(line) for line in result.stderr.splitlines()]
    assert sorted((r["item"] for r in recs if r["event"] == "item given up"), key=str) == [1, "text", {"n": 4, "tags": ["a"]}]
    end = recs[-1]
    assert (end["event"], end["level"], end["exit_code"], end["error"]) == ("run finished", "info", 0, None)
    assert (end["stages"]["one"]["items_in"], end["stages"]["one"]["skipped"]) == (3, 3)
    assert [r["event"] for r in recs].count("run finished") == 1

    failing = run_cli(str(tmp_pipeline(text.replace(", on_error: skip", ""), name="failing.yaml")), "--no-summary")
    assert failing.returncode == 1
    last = [json.loads(line) for line in failing.stderr.splitlines()][-1]
    assert (last["event"], last["level"], last["exit_code"]) == ("run failed", "error", 1)
    assert "failed on item" in last["error"]


def test_console_formatter_colours_and_tracebacks():
    """With colours the level is coloured; a traceback follows the line; values with spaces are quoted."""
    event = {"timestamp": "2024-01-02T03:04:05.678901Z", "level": "error", "stage": "s", "process": "s-1",
             "event": "boom", "error": "ValueError: x y", "exception": "Traceback...\nValueError: x y\n"}
    plain = ConsoleFormatter(widths=(3, 4)).render(event)
    assert plain.splitlines() == ['03:04:05.678 error   s   s-1  boom                         error="ValueError: x y"',
                                  "Traceback...", "ValueError: x y"]
    coloured = ConsoleFormatter(colors=True).render(event)
    assert "\x1b[31;1merror" in coloured


LAZY_TASKS = '''
import sys

def late_logger(x):
    import structlog  # first imported here, after the worker has set up logging

    structlog.get_logger("tasks").info("late saw", x=x)
    return x

def has_structlog(x):
    return "structlog" in sys.modules
'''


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_structlog_first_imported_inside_a_stage_function_is_routed(tmp_pipeline, tmp_path, method):
    """mprun's own records do not use structlog, so a worker may import it first in the middle of a call:
    it is configured right then, and its records reach the listener with stage, process and item_id."""
    text = f"""version: 1
settings: {{start_method: {method}, log_level: info}}
stages:
  - {{name: src, kind: producer, source: {{range: {{stop: 6}}}}, output: a}}
  - {{name: late, kind: pool, processes: 2, input: a, function: "tasks_t:late_logger"}}
"""
    log_file = tmp_path / "log.jsonl"
    result = run_cli(str(tmp_pipeline(text, LAZY_TASKS)), "--log-file", str(log_file))
    assert result.returncode == 0, result.stderr
    late = by_event(records(log_file))["late saw"]
    assert sorted(r["x"] for r in late) == list(range(6))
    assert all(r["stage"] == "late" and r["item_id"] == f"src:{r['x']}" and r["level"] == "info" for r in late)
    assert "late saw" in result.stderr and "late saw" not in result.stdout  # not structlog's default printer


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_run_whose_code_does_not_log_with_structlog_never_imports_it(tmp_pipeline, method):
    """Neither the main process nor a worker imports structlog (~30 ms with asyncio) unless stage code does;
    mprun's own lifecycle records still arrive."""
    path = tmp_pipeline(f"""version: 1
settings: {{start_method: {method}, log_level: info}}
stages:
  - {{name: src, kind: producer, source: {{items: [1, 2]}}, output: a}}
  - {{name: probe, kind: consumer, input: a, function: "tasks_t:has_structlog", output: b}}
  - {{name: out, kind: consumer, input: b, function: collect}}
""", LAZY_TASKS)
    code = ("import sys, runner; r = runner.run_pipeline(sys.argv[1]); "
            "print(r.exit_code, r.collected['out'], 'structlog' in sys.modules)")
    token = uuid.uuid4().hex
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60,
                            cwd=ROOT, check=False, env={**os.environ, "MPRUN_TEST_TOKEN": token})
    assert wait_gone(token) == []
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "[False,", "False]", "False"]
    assert "process started" in result.stderr


def test_a_traceback_is_logged_once_per_place_in_each_process(tmp_pipeline, tmp_path):
    """Skipped and retried items each log a warning, but each place an exception comes from logs its
    traceback once per process; the later warnings say so instead."""
    text = """version: 1
stages:
  - {name: src, kind: producer, source: {range: {stop: 12}}, output: a}
  - {name: skip, kind: consumer, processes: 1, input: a, function: "tasks_t:bad", on_error: skip, output: b}
  - {name: again, kind: pool, processes: 1, input: a2, function: "tasks_t:bad", on_error: retry, retries: 1,
     retry_backoff: 0, dead_letter: c}
  - {name: src2, kind: producer, source: {range: {stop: 6}}, output: a2}
  - {name: sink, kind: consumer, input: b, function: collect}
  - {name: dead, kind: consumer, input: c, function: collect}
"""
    log_file = tmp_path / "log.jsonl"
    result = run_cli(str(tmp_pipeline(text, TASKS)), "--log-file", str(log_file))
    assert result.returncode == 0, result.stderr
    found = by_event(records(log_file))
    given_up = [r for r in found["item given up"] if r["process"] == "skip"]
    assert sorted(r["item"] for r in given_up) == [1, 3, 4, 5, 7, 9, 11]  # JSON values, not reprs
    with_tb = [r for r in given_up if "exception" in r]
    assert sorted(r["error"].split(":")[0] for r in with_tb) == ["KeyError", "ValueError"]  # one per place
    assert all(r["traceback"] == "as earlier in this process" for r in given_up if "exception" not in r)
    assert all("raise" in r["exception"] for r in with_tb)
    # the pool: 1, 3, 4, 5 each fail twice; the first failure of each place shows its traceback
    retried = [r for r in found["retrying"] + found["item given up"] if r["process"] == "again"]
    assert len(retried) == 8
    assert sorted(r["error"].split(":")[0] for r in retried if "exception" in r) == ["KeyError", "ValueError"]


def test_repeats_of_a_place_cross_in_batches_in_order(monkeypatch):
    """After 5 warnings of one place, a process holds the next ones and sends them in one record, before any
    later record of its own; the listener's side gets each back whole, with its own fields and time."""
    import logging
    import queue

    from runner import logs

    q: queue.Queue = queue.Queue()
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        logs.configure(q, "info", stage="double", process="double-1")
        monkeypatch.setattr(logs, "item_id_source", lambda: "numbers:7")
        log = logs.get_logger("mprun")
        for i in range(12):
            log.warning("item given up", error=f"ValueError: bad {i}", item=str(i))
        log.info("process exited", exitcode=0)
        sent = [q.get_nowait() for _ in range(q.qsize())]
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert [type(r).__name__ for r in sent] == ["_Event"] * 5 + ["_Batch", "_Event"]
    events = [r.msg for r in sent[:5]] + [e.msg for e in sent[5].events()] + [sent[6].msg]
    assert [e.get("item") for e in events] == [str(i) for i in range(12)] + [None]
    assert all(e["stage"] == "double" and e["process"] == "double-1" and e["item_id"] == "numbers:7" for e in events)
    assert [e["error"] for e in events[5:12]] == [f"ValueError: bad {i}" for i in range(5, 12)]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", e["timestamp"]) for e in events)
    assert events[-1]["event"] == "process exited"
