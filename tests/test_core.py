"""The runner's core promises: end of stream, fan-in/out, sources, call semantics, logging, failures."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from runner import run_pipeline
from tests.conftest import START_METHODS, run_cli

TASKS = '''
import logging, os, time, structlog
from pathlib import Path

def double(x):
    return x * 2

def add(x, n=0):
    return x + n

def evens_only(x):
    return x if x % 2 == 0 else None

def twice(x):
    yield x
    yield -x

def numbers(count=3):
    return range(count)

def chatty(x):
    structlog.get_logger("t").info("structlog record", item=x)
    logging.getLogger("t").warning("stdlib record %s", x)
    return None

def boom(x):
    if x == 3:
        raise ValueError(f"cannot take {x}")
    return x

READY = []
def init():
    READY.append(os.getpid())

def needs_init(x):
    assert READY == [os.getpid()], "init did not run in this process"
    return x

def count_in_file(x, path):
    # Read-modify-write of a counter with no atomic operation: two calls at once lose an increment.
    p = Path(path)
    n = int(p.read_text() or 0)
    time.sleep(0.002)
    p.write_text(str(n + 1))
    return os.getpid()
'''


def pipeline(stages: str, queues: str = "", settings: str = "") -> str:
    return f"version: 1\n{settings}{queues}stages:\n{stages}"


@pytest.mark.parametrize("method", START_METHODS)
def test_chain_delivers_every_item_once(tmp_pipeline, method):
    """2,000 items through producer -> 3 consumers -> pool -> collect arrive exactly once each."""
    path = tmp_pipeline(
        pipeline(
            """
  - {name: src, kind: producer, source: {range: {stop: 2000}}, output: a}
  - {name: dbl, kind: consumer, processes: 3, input: a, function: "tasks_t:double", output: b}
  - {name: inc, kind: pool, processes: 2, input: b, function: "tasks_t:add", kwargs: {n: 1}, output: c}
  - {name: out, kind: consumer, input: c, function: collect}
"""
        ),
        TASKS,
    )
    result = run_pipeline(path, start_method=method)
    assert result.exit_code == 0
    assert Counter(result.collected["out"]) == Counter(2 * i + 1 for i in range(2000))
    assert result.stats["dbl"].items_in == 2000 and result.stats["inc"].items_out == 2000


def test_pool_ordered_keeps_input_order(tmp_pipeline):
    """An ordered pool emits results in input order, over many chunks and workers."""
    path = tmp_pipeline(
        pipeline(
            """
  - {name: src, kind: producer, source: {range: {stop: 5000}}, output: a}
  - {name: dbl, kind: pool, processes: 3, ordered: true, chunksize: 7, input: a, function: "tasks_t:double", output: b}
  - {name: out, kind: consumer, input: b, function: collect}
"""
        ),
        TASKS,
    )
    result = run_pipeline(path, start_method="fork")
    assert result.collected["out"] == [2 * i for i in range(5000)]


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_fan_out_and_fan_in(tmp_pipeline, method):
    """Fan-out sends every item to each output queue; fan-in merges two writers and ends after both."""
    path = tmp_pipeline(
        pipeline(
            """
  - {name: a, kind: producer, source: {range: {stop: 300}}, output: [left, right]}
  - {name: b, kind: producer, source: {items: [1000, 1001]}, output: merged}
  - {name: l, kind: consumer, processes: 2, input: left, function: identity, output: merged}
  - {name: r, kind: consumer, input: right, function: "tasks_t:double", output: merged}
  - {name: out, kind: consumer, processes: 1, input: merged, function: collect}
"""
        ),
        TASKS,
    )
    result = run_pipeline(path, start_method=method)
    expected = Counter(range(300)) + Counter(2 * i for i in range(300)) + Counter([1000, 1001])
    assert Counter(result.collected["out"]) == expected


@pytest.mark.parametrize("method", START_METHODS)
def test_lifo_concurrent_readers_deliver_everything(tmp_pipeline, method):
    """5,000 items through a LIFO queue read by two stages (4 + 1 processes) while 2 producers write:
    every item arrives exactly once."""
    path = tmp_pipeline(
        pipeline(
            """
  - {name: src, kind: producer, processes: 2, source: {range: {stop: 5000}}, output: stack}
  - {name: work, kind: consumer, processes: 4, input: stack, function: identity, output: done}
  - {name: more, kind: pool, input: stack, function: identity, output: done}
  - {name: out, kind: consumer, input: done, function: collect}
""",
            queues="queues:\n  stack: {type: lifo, maxsize: 100}\n",
        ),
        TASKS,
    )
    result = run_pipeline(path, start_method=method)
    assert result.exit_code == 0
    assert sorted(result.collected["out"]) == list(range(5000))
    assert result.stats["work"].items_in + result.stats["more"].items_in == 5000


def test_lifo_end_marker_never_overtakes_items(tmp_pipeline):
    """Items stacked before the end of stream all come out, newest first, before the reader stops."""
    path = tmp_pipeline(
        pipeline(
            """
  - {name: src, kind: producer, source: {range: {stop: 500}}, output: stack}
  - {name: read, kind: consumer, after: [src], input: stack, function: identity, output: done}
  - {name: out, kind: consumer, input: done, function: collect}
""",
            queues="queues:\n  stack: {type: lifo}\n",
        ),
        TASKS,
    )
    result = run_pipeline(path, start_method="fork")
    assert result.collected["out"] == list(range(499, -1, -1))


def test_none_emits_nothing_and_generators_emit_each(tmp_pipeline):
    """Returning None drops the item; a generator's every yielded item goes on."""
    path = tmp_pipeline(
        pipeline(
            """
  - {name: src, kind: producer, source: {items: [1, 2, 3, 4]}, output: a}
  - {name: even, kind: consumer, input: a, function: "tasks_t:evens_only", output: b}
  - {name: gen, kind: consumer, input: b, function: "tasks_t:twice", output: c}
  - {name: out, kind: consumer, input: c, function: collect}
"""
        ),
        TASKS,
    )
    result = run_pipeline(path, start_method="fork")
    assert Counter(result.collected["out"]) == Counter([2, -2, 4, -4])
    assert result.stats["even"].items_out == 2


def test_sources_function_file_and_limit(tmp_pipeline, tmp_path):
    """function, lines, jsonl and csv sources produce their items; --limit caps each producer."""
    (tmp_path / "in.txt").write_text("a\nb\nc\n")
    (tmp_path / "in.jsonl").write_text('{"x": 1}\n\n{"x": 2}\n')
    (tmp_path / "in.csv").write_text("x,y\n1,2\n3,4\n")
    path = tmp_pipeline(
        pipeline(
            """
  - {name: fn, kind: producer, source: {function: "tasks_t:numbers"}, kwargs: {count: 4}, output: q}
  - {name: lines, kind: producer, source: {file: {path: in.txt}}, output: q}
  - {name: js, kind: producer, source: {file: {path: in.jsonl, format: jsonl}}, output: q}
  - {name: rows, kind: producer, source: {file: {path: in.csv, format: csv}}, output: q}
  - {name: out, kind: consumer, input: q, function: collect}
"""
        ),
        TASKS,
    )
    items = run_pipeline(path, start_method="fork").collected["out"]
    assert Counter(map(json.dumps, items)) == Counter(
        map(json.dumps, [0, 1, 2, 3, "a", "b", "c", {"x": 1}, {"x": 2}, {"x": "1", "y": "2"}, {"x": "3", "y": "4"}])
    )
    limited = run_pipeline(path, start_method="fork", limit=1).collected["out"]
    assert len(limited) == 4


def test_init_runs_once_in_each_worker(tmp_pipeline):
    """`init` runs in every consumer and pool worker before its first item."""
    path = tmp_pipeline(
        pipeline(
            """
  - {name: src, kind: producer, source: {range: {stop: 50}}, output: a}
  - {name: c, kind: consumer, processes: 2, init: "tasks_t:init", input: a, function: "tasks_t:needs_init", output: b}
  - {name: p, kind: pool, processes: 2, init: "tasks_t:init", input: b, function: "tasks_t:needs_init", output: d}
  - {name: out, kind: consumer, input: d, function: collect}
"""
        ),
        TASKS,
    )
    result = run_pipeline(path, start_method="spawn")
    assert result.exit_code == 0, result.error
    assert sorted(result.collected["out"]) == list(range(50))


@pytest.mark.parametrize("method", ["fork", "spawn"])  # the lock inherited, and the lock pickled (as forkserver)
def test_lock_keeps_every_increment_of_a_shared_counter(tmp_pipeline, tmp_path, method):
    """`lock:` makes the calls of three processes exclusive: 60 read-modify-writes of one counter file,
    spread over the processes, leave it at exactly 60 (without the lock, increments are lost)."""
    counter = tmp_path / "counter"
    counter.write_text("0")
    path = tmp_pipeline(
        pipeline(
            f"""
  - {{name: src, kind: producer, source: {{range: {{stop: 60}}}}, output: a}}
  - {{name: inc, kind: consumer, processes: 3, lock: counter, input: a, function: "tasks_t:count_in_file",
     kwargs: {{path: "{counter}"}}, output: pids}}
  - {{name: out, kind: consumer, input: pids, function: collect}}
"""
        ),
        TASKS,
    )
    result = run_pipeline(path, start_method=method)
    assert result.exit_code == 0, result.error
    assert len(set(result.collected["out"])) >= 2  # the calls overlapped in time but for the lock
    assert counter.read_text() == "60"


def test_jsonl_sink_writes_every_item(tmp_pipeline, tmp_path):
    """The jsonl built-in writes one JSON line per item to kwargs.path (truncated at the start of a run)."""
    path = tmp_pipeline(
        pipeline(
            """
  - {name: src, kind: producer, source: {range: {stop: 100}}, output: a}
  - {name: sink, kind: consumer, processes: 2, input: a, function: jsonl, kwargs: {path: out.jsonl}}
"""
        ),
        TASKS,
    )
    for _ in range(2):
        assert run_pipeline(path, start_method="fork").exit_code == 0
    values = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(values) == list(range(100))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_500_log_records_from_two_workers_all_arrive(tmp_pipeline, tmp_path, method):
    """250 items x (1 structlog + 1 stdlib record) from two workers: all 500 reach the log file."""
    log_file = tmp_path / "log.jsonl"
    path = tmp_pipeline(
        pipeline(
            """
  - {name: src, kind: producer, source: {range: {stop: 250}}, output: a}
  - {name: talk, kind: consumer, processes: 2, input: a, function: "tasks_t:chatty"}
"""
        ),
        TASKS,
    )
    assert run_pipeline(path, start_method=method, log_file=str(log_file)).exit_code == 0
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    structured = [r for r in records if r["event"] == "structlog record"]
    stdlib = [r for r in records if r["event"].startswith("stdlib record")]
    assert sorted(r["item"] for r in structured) == list(range(250))
    assert len(stdlib) == 250 and {r["level"] for r in stdlib} == {"warning"}
    assert {r["process"] for r in structured} <= {"talk-1", "talk-2"}


@pytest.mark.parametrize("kind", ["consumer", "pool"])
def test_raising_function_exits_1_fast_naming_stage(tmp_pipeline, kind):
    """A function that raises ends the run with exit 1, the error and the stage named, nothing left running."""
    path = tmp_pipeline(
        pipeline(
            f"""
  - {{name: src, kind: producer, source: {{range: {{stop: 100000}}}}, output: a}}
  - {{name: fragile, kind: {kind}, processes: 2, input: a, function: "tasks_t:boom"}}
"""
        ),
        TASKS,
    )
    t0 = time.monotonic()
    result = run_cli(str(path), "--no-summary", timeout=30)
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - t0 < 20
    last = result.stderr.strip().splitlines()[-1]
    assert "fragile" in last and "ValueError: cannot take 3" in last, last
    assert "Traceback" in result.stderr  # the user's traceback is logged, formatted in the child


def test_invalid_file_exits_2_without_traceback(tmp_pipeline):
    """An invalid file ends with located error lines and exit 2, never a traceback."""
    path = tmp_pipeline("version: 1\nstages:\n  - name: x\n    kind: consumer\n    procesess: 2\n")
    result = run_cli(str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{path}:5:5: error: stages[0].procesess: unknown key 'procesess'; did you mean 'processes'?" in result.stderr


def test_invalid_value_on_the_command_line_is_one_line_and_exit_2(tmp_pipeline):
    """A bad --set value ends with exit 2 and one located line; the import check started early stays quiet."""
    path = tmp_pipeline(
        pipeline(
            """
  - {name: src, kind: producer, source: {range: {stop: 10}}, output: a}
  - {name: dbl, kind: consumer, input: a, function: "tasks_t:double"}
"""
        ),
        TASKS,
    )
    result = run_cli(str(path), "--set", "stages.dbl.processes=zero")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        (
            "--set stages.dbl.processes=zero: error: stages[1].processes: "
            "Input should be a whole number or 'auto', got 'zero'"
        )
    ]
