"""A failing stage stays cheap and readable: a skipped item never leaves the worker's tight loop, yet every
record says what the policy path would say; stderr counts repeats, the log file and the metrics hold each."""

from __future__ import annotations

import array
import io
import json
import logging
import math
import queue
import threading
from collections import Counter
from typing import Any

import pytest

from runner import logs, worker
from runner.topology import StagePlan
from tests.conftest import run_cli

STAGE = StagePlan(name="double", kind="pool", process_names=("double-1",), inputs=("numbers",), outputs=("doubled",),
                  function="tasks_t:fail_some", on_error="skip")
BIG = 10**250  # its repr is longer than an item's text may be
ITEMS: list[Any] = [BIG, "text", {"a": [1, 2]}, 2.5, math.inf, None, True, {1, 2}, list(range(100)), *range(40)]
POSITION = {id(item): n for n, item in enumerate(ITEMS)}
FAILED = [n for n in range(len(ITEMS)) if n < 9 or n % 3 == 0]


def fail_some(item: Any) -> Any:
    """Raise for the first 9 items and one in three after (two kinds of error: two places); yield twice for
    one item and return None for another."""
    n = POSITION[id(item)]
    if n in FAILED:
        raise (KeyError if n % 2 else ValueError)(f"bad {n}")
    if n == 10:
        return (x for x in (item, item))
    return None if n == 11 else item


def run_logged(lock: Any, monkeypatch: pytest.MonkeyPatch, counted: bool = False,
               ) -> tuple[worker.ChunkResult, list[dict[str, Any]], list[Any]]:
    """``run_items`` over ITEMS in a worker's logging set-up; the result, every record sent (batches whole) and
    the counts sent instead of repeats (``counted``: the listener counts them: no log file)."""
    q: queue.Queue = queue.Queue()
    q.repeats_counted = counted  # type: ignore[attr-defined]
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    progress = memoryview(array.array("q", [0] * worker.PROGRESS_SLOTS)).cast("B").cast("q")
    ids = range(100, 100 + len(ITEMS))
    monkeypatch.setattr(worker, "_id_names", ("numbers",))
    monkeypatch.setattr(worker, "_chunk", (ids, progress))
    monkeypatch.setattr(logs, "item_id_source", worker.current_item_id)
    try:
        logs.configure(q, "info", stage="double", process="double-1")
        result = worker.run_items(fail_some, STAGE, 0, list(ITEMS), None, lock, progress, logs.get_logger("mprun"), ids)
        logs.configure(queue.Queue(), "info")  # sends what waits
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    sent = [q.get_nowait() for _ in range(q.qsize())]
    counts = [r.msg for r in sent if isinstance(r, logs._Counts)]
    events = [e.msg for r in sent if not isinstance(r, logs._Counts)
              for e in (r.events() if isinstance(r, logs._Batch) else [r])]
    for event in [*events, *(first for c in counts for first, _, _ in c.values())]:
        event.pop("timestamp", None)  # the traceback from the stage function's frame on (the worker's frames differ)
        if "exception" in event:
            event["exception"] = event["exception"][event["exception"].index(f'File "{__file__}"'):]
    return result, events, counts


def test_a_skip_in_the_tight_loop_logs_and_counts_as_the_policy_path(monkeypatch):
    """Skipped items logged from the tight loop (no lock) and through ``_with_policy`` (a lock): the same
    records, counts, outputs and output ids; items as their JSON values, or their text where JSON has none."""
    fast, fast_events, _ = run_logged(None, monkeypatch)
    slow, slow_events, _ = run_logged(threading.Lock(), monkeypatch)
    assert fast_events == slow_events
    n = len(FAILED)
    assert (fast.skipped, fast.failed, fast.done) == (slow.skipped, slow.failed, slow.done) == (n, n, len(ITEMS))
    assert fast.outputs == slow.outputs == [1, 1, *(x for x in ITEMS[12:] if POSITION[id(x)] not in FAILED)]
    assert fast.ends == slow.ends
    ids = range(100, 100 + len(ITEMS))
    assert worker.output_ids(ids, fast.ends, len(fast.outputs)) == [110, 110, *(100 + n for n in range(12, len(ITEMS))
                                                                                   if n not in FAILED)]
    given_up = [e for e in fast_events if e["event"] == "item given up"]  # a batch holds each place's in turn
    given_up.sort(key=lambda e: int(e["item_id"].split(":")[1]))
    assert [e["item_id"] for e in given_up] == [f"numbers:{100 + n}" for n in FAILED]
    assert [e["error"] for e in given_up] == [f"KeyError: 'bad {n}'" if n % 2 else f"ValueError: bad {n}" for n in FAILED]
    cut = [repr(BIG)[:197] + "...", repr(list(range(100)))[:197] + "..."]
    assert [e["item"] for e in given_up] == [cut[0], "text", {"a": [1, 2]}, 2.5, math.inf, None, True, "{1, 2}", cut[1],
                                             *(n - 9 for n in FAILED[9:])]
    with_tb = [e for e in given_up if "exception" in e]
    assert [e["error"].split(":")[0] for e in with_tb] == ["ValueError", "KeyError"]  # the first of each place
    assert all("raise" in e["exception"] for e in with_tb)
    assert all(e["traceback"] == "as earlier in this process" for e in given_up if "exception" not in e)
    assert all(e["stage"] == "double" and e["process"] == "double-1" and e["level"] == "warning" and e["attempts"] == 1
               for e in given_up)


def test_a_skip_counted_in_the_tight_loop_is_counted_as_on_the_policy_path(monkeypatch):
    """No log file: past 5 of a place, the tight loop counts a skipped item without its record (nor its
    FunctionFailed) being made; the same counts, last errors, records and results as through ``_with_policy``."""
    fast, fast_events, fast_counts = run_logged(None, monkeypatch, counted=True)
    slow, slow_events, slow_counts = run_logged(threading.Lock(), monkeypatch, counted=True)
    assert (fast_events, fast_counts) == (slow_events, slow_counts)
    assert (fast.skipped, fast.outputs, fast.ends) == (slow.skipped, slow.outputs, slow.ends)
    assert [e["error"] for e in fast_events] == [f"KeyError: 'bad {n}'" if n % 2 else f"ValueError: bad {n}"
                                                 for n in FAILED[:10]]  # 5 of each place, sent one by one
    repeats = {place[4]: (n, error) for c in fast_counts for place, (_, n, error) in c.items()}
    kinds = Counter("KeyError" if n % 2 else "ValueError" for n in FAILED)
    last = {kind: max(n for n in FAILED if n % 2 == odd) for kind, odd in (("KeyError", 1), ("ValueError", 0))}
    assert repeats == {"KeyError": (kinds["KeyError"] - 5, f"KeyError: 'bad {last['KeyError']}'"),
                       "ValueError": (kinds["ValueError"] - 5, f"ValueError: bad {last['ValueError']}")}


FAILING = """\
version: 1
stages:
  - {name: numbers, kind: producer, source: {range: {stop: 3000}}, output: numbers}
  - {name: double, kind: pool, processes: 2, input: numbers, function: tasks_t:fail_some, on_error: skip, output: doubled}
  - {name: out, kind: consumer, input: doubled, function: collect}
"""
FAIL_SOME = """\
def fail_some(x):
    if x % 10 == 0:
        raise ValueError(f"bad item {x}")
    if x % 100 == 5:
        raise KeyError(x)
    return x
"""


@pytest.mark.parametrize("inline", [False, True], ids=["run", "inline"])
def test_every_skipped_item_is_in_the_log_file_and_the_metrics(tmp_pipeline, tmp_path, inline):
    """330 items skipped from two places: stderr shows 5 of each place and counts the rest; the log file holds
    each, with its item id and the traceback of the first of each place in each process; the metrics count each."""
    path = tmp_pipeline(FAILING, FAIL_SOME)
    log_file, metrics = tmp_path / "run.log", tmp_path / "metrics.json"
    result = run_cli("run", str(path), "--no-summary", "--log-file", str(log_file), "--metrics-json", str(metrics),
                     *(["--inline"] if inline else []))
    assert result.returncode == 0, result.stderr
    failing = [x for x in range(3000) if x % 10 == 0 or x % 100 == 5]
    assert sorted(json.loads(result.stdout)) == sorted(set(range(3000)) - set(failing))
    lines = result.stderr.splitlines()
    assert Counter(line.split("error=")[1].strip('"').split(":")[0] for line in lines if " item given up " in line) == {
        "ValueError": 5, "KeyError": 5}
    counts = [int(line.split("item given up: ")[1].split(" more like this")[0].replace(",", ""))
              for line in lines if "item given up: " in line]
    assert sum(counts) == len(failing) - 10, lines
    given_up = [r for r in map(json.loads, log_file.read_text().splitlines()) if r["event"] == "item given up"]
    assert sorted(r["item"] for r in given_up) == failing
    assert all(r["attempts"] == 1 and r["stage"] == "double" and r["level"] == "warning" for r in given_up)
    if not inline:  # an inline run numbers no items
        assert all(r["item_id"] == f"numbers:{r['item']}" for r in given_up)
    assert all(r["error"] == (f"ValueError: bad item {r['item']}" if r["item"] % 10 == 0 else f"KeyError: {r['item']}")
               for r in given_up)
    places = Counter((r["process"], r["error"].split(":")[0]) for r in given_up)
    with_tb = Counter((r["process"], r["error"].split(":")[0]) for r in given_up if "exception" in r)
    assert with_tb == dict.fromkeys(places, 1)  # one traceback per place and process
    assert all("Traceback" in r["exception"] and "raise" in r["exception"] for r in given_up if "exception" in r)
    assert all(r["traceback"] == "as earlier in this process" for r in given_up if "exception" not in r)
    stage = json.loads(metrics.read_text())["stages"]["double"]
    assert (stage["items_in"], stage["skipped"], stage["failed"], stage["items_out"]) == (
        3000, len(failing), len(failing), 3000 - len(failing))


@pytest.mark.parametrize("inline", [False, True], ids=["run", "inline"])
def test_without_a_log_file_stderr_counts_every_skipped_item(tmp_pipeline, inline):
    """No log file: repeats are only counted where they are made, yet stderr's counts add up to every skipped
    item past the first 5 of each place, each summary line with the last error of its place."""
    path = tmp_pipeline(FAILING, FAIL_SOME)
    result = run_cli("run", str(path), "--no-summary", *(["--inline"] if inline else []))
    assert result.returncode == 0, result.stderr
    failing = [x for x in range(3000) if x % 10 == 0 or x % 100 == 5]
    assert len(json.loads(result.stdout)) == 3000 - len(failing)
    lines = result.stderr.splitlines()
    shown = Counter(line.split("error=")[1].strip('"').split(":")[0] for line in lines if " item given up " in line)
    assert shown == {"ValueError": 5, "KeyError": 5}
    summaries = [line for line in lines if "item given up: " in line]
    counts = Counter()
    for line in summaries:
        error = line.split("last_error=")[1].strip('"')
        kind, _, text = error.partition(": ")
        n = int(text.removeprefix("bad item ")) if kind == "ValueError" else int(text)
        assert n in failing and (n % 10 == 0) == (kind == "ValueError"), line
        assert "log file" not in line
        counts[kind] += int(line.split("item given up: ")[1].split(" more like this")[0].replace(",", ""))
    assert counts == {"ValueError": 300 - 5, "KeyError": 30 - 5}, lines


TOLD = """def told(x):
    import logging
    return logging.getLogger().handlers[0].queue.repeats_counted
"""


def test_workers_count_repeats_only_when_no_log_file_wants_each(tmp_pipeline, tmp_path):
    """The listener's need reaches every worker with its log queue (pickled to the forkserver's children):
    count repeats without a log file, send each with one."""
    path = tmp_pipeline("""\
version: 1
stages:
  - {name: numbers, kind: producer, source: {range: {stop: 4}}, output: numbers}
  - {name: told, kind: pool, processes: 2, input: numbers, function: tasks_t:told, output: flags}
  - {name: out, kind: consumer, input: flags, function: collect}
""", TOLD)
    for log_file, counted in ((None, True), (tmp_path / "run.log", False)):
        more = ["--log-file", str(log_file)] if log_file else []
        result = run_cli("run", str(path), "--no-summary", *more)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == [counted] * 4


def test_counted_repeats_cross_as_counts_and_read_as_the_same_summary(monkeypatch):
    """A queue whose listener writes no log file: past 5 of a place, a process sends how many repeats there
    were and the last one's error (``log.count`` counts one without its record being made); the listener
    writes the same lines as from whole repeats."""
    q: queue.Queue = queue.Queue()
    q.repeats_counted = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    monkeypatch.setattr(logs, "item_id_source", lambda: "numbers:7")
    try:
        logs.configure(q, "info", stage="double", process="double-1")
        log = logs.get_logger("mprun")
        for i in range(12):
            log.warning("item given up", error=f"ValueError: bad {i}", item=i, attempts=1)
        assert log.count("item given up", "ValueError: bad 12")  # a repeat: counted
        assert not log.count("item given up", "KeyError: 12")  # another place, not past 5: to be logged
        assert not log.count("retrying", "ValueError: bad 12")
        for _ in range(8):
            logging.getLogger("tasks").warning("odd item")  # stdlib records count as well
        log.info("process exited", exitcode=0)
        logs.configure(queue.Queue(), "info")  # sends what waits
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    sent = [q.get_nowait() for _ in range(q.qsize())]
    assert [type(r).__name__ for r in sent] == ["_Event"] * 5 + ["_Counts"] + ["_Event"] * 5 + ["_Counts", "_Event"]
    (first, repeats, error), = sent[5].msg.values()
    assert (first["item"], first["item_id"], repeats, error) == (5, "numbers:7", 8, "ValueError: bad 12")
    assert [r[1] for r in sent[11].msg.values()] == [3]
    stream = io.StringIO()
    console = logging.StreamHandler(stream)
    console.setFormatter(logs.EventFormatter("console"))
    listener = logs.Listener(queue.Queue(), console, console=console)
    for record in sent:
        listener.handle(record)
    listener.summarise()
    lines = stream.getvalue().splitlines()
    assert sum(" item given up " in line for line in lines) == 5
    summaries = [" ".join(line.split()[4:]) for line in lines if "more like this" in line]
    assert summaries == ['item given up: 8 more like this last_error="ValueError: bad 12"',
                         "odd item: 3 more like this logger=tasks"]


def test_a_repeat_made_whole_has_its_own_fields_and_no_others(monkeypatch):
    """Repeats of one place cross as what differs from the first of their batch; made whole again, each has its
    own fields only: the one repeat with a traceback (another line raised it) has it, the others a note."""
    q: queue.Queue = queue.Queue()
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    ids = iter(["numbers:1"] * 7 + [None] + ["numbers:2"] * 10)
    monkeypatch.setattr(logs, "item_id_source", lambda: next(ids))
    try:
        logs.configure(q, "info", stage="double", process="double-1")
        log = logs.get_logger("mprun")
        for i in range(12):
            fields = {"exception": f"Traceback {i}"} if i in (0, 7) else {"traceback": worker.AS_EARLIER}
            log.warning("item given up", error=f"ValueError: bad {i}", item=i, attempts=1, **fields)
        logs.configure(queue.Queue(), "info")  # sends what waits
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    sent = [q.get_nowait() for _ in range(q.qsize())]
    events = [e.msg for r in sent for e in (r.events() if isinstance(r, logs._Batch) else [r])]
    assert [e["item"] for e in events] == list(range(12))
    assert [e.get("exception") for e in events] == ["Traceback 0", *[None] * 6, "Traceback 7", *[None] * 4]
    assert [e.get("traceback") for e in events] == [None, *[worker.AS_EARLIER] * 6, None, *[worker.AS_EARLIER] * 4]
    assert [e.get("item_id") for e in events] == ["numbers:1"] * 7 + [None] + ["numbers:2"] * 4
    assert all(e["stage"] == "double" and e["level"] == "warning" and e["logger"] == "mprun" for e in events)
