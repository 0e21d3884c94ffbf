"""Stages for real work on the multi-process backend: the shipped examples end to end, with exact accounting,
and the runner's side of close(), batches, concurrency, routes and self-fed queues."""

from __future__ import annotations

from collections import Counter

import pytest

from runner import run_pipeline
from runner.metrics import metrics
from tests.conftest import ROOT, run_cli

EXAMPLES = ROOT / "pipelines"


def balanced(result) -> None:
    """Per stage items_in = delivered + skipped + dead-lettered; per queue produced = delivered."""
    report = metrics(result)
    assert all(s["balanced"] for s in report["stages"].values()), report["stages"]
    assert all(q["balanced"] for q in report["queues"].values()), report["queues"]


def test_word_count_class_stages_close_once_per_process():
    """Two counting processes each give their counts once (close), the merge gives the totals once."""
    result = run_pipeline(EXAMPLES / "wordcount.yaml", start_method="forkserver", log_level="warning")
    assert result.exit_code == 0, result.error
    assert result.stats["count"].items_out == 2  # one dict per counting process, from close()
    assert result.stats["merge"].items_out == 1
    assert result.queues["totals"]["produced"] == 1
    balanced(result)


def test_crawl_self_fed_lifo_visits_every_node_once():
    result = run_pipeline(EXAMPLES / "crawl.yaml", start_method="forkserver", log_level="warning")
    assert result.exit_code == 0, result.error
    assert sorted(result.collected["visited"]) == sorted(
        "r" + "".join(f".{b}" for b in path) for depth in range(4)
        for path in [tuple(int(c) for c in f"{i:0{depth}b}") if depth else () for i in range(2**depth)])
    assert result.queues["todo"] == {"produced": 15, "delivered": 15, "left": 0, "balanced": True}
    balanced(result)


def test_router_counts_each_route_queue():
    result = run_pipeline(EXAMPLES / "router.yaml", start_method="forkserver", log_level="warning")
    assert result.exit_code == 0, result.error
    assert result.stats["check"].routed == {"good": 2, "bad": 2}
    assert result.queues["good"]["produced"] == 2 and result.queues["bad"]["produced"] == 2
    balanced(result)


def test_async_fetch_retries_then_dead_letters_with_concurrency():
    result = run_pipeline(EXAMPLES / "async_fetch.yaml", start_method="forkserver", log_level="error")
    assert result.exit_code == 0, result.error
    st = result.stats["fetch"]
    assert (st.delivered, st.dead_lettered, st.retried, st.failed) == (3, 1, 2, 3)
    balanced(result)


def test_batched_writer_writes_every_row_in_transactions(tmp_path, monkeypatch):
    db = tmp_path / "r.db"
    monkeypatch.setenv("READINGS_DB", str(db))
    result = run_pipeline(EXAMPLES / "batched_writer.yaml", start_method="forkserver", log_level="warning")
    assert result.exit_code == 0, result.error
    import sqlite3

    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM readings").fetchone() == (120,)
    balanced(result)


TASKS = """\
import os, threading, time

_first_wave = threading.Barrier(4, timeout=5)

def wave(n):
    if n < 4:  # the first 4 items must be called at once: they wait for each other
        _first_wave.wait()
    return n

def slow_source():
    for i in range(3):
        yield i
        time.sleep(0.3)

class Sizes:
    def __init__(self):
        self.sizes = []

    def __call__(self, items):
        self.sizes.append(len(items))
        return items

    def close(self):
        return {"sizes": self.sizes}

def expand(n):
    if n > 0:
        yield n - 1
        yield n - 1

class DiesInClose:
    def __call__(self, item):
        return item

    def close(self):
        os._exit(3)
"""


def test_partial_batch_passes_after_batch_timeout(tmp_pipeline):
    """Items 0.3 s apart with batch: 50 and batch_timeout: 0.05: each goes on alone rather than waiting for
    49 more (which never come)."""
    text = """version: 1
stages:
  - {name: src, kind: producer, source: {function: "tasks_t:slow_source"}, output: a}
  - {name: sizes, kind: consumer, input: a, batch: 50, batch_timeout: 0.05, function: "tasks_t:Sizes", output: b}
  - {name: sink, kind: consumer, input: b, function: collect}
"""
    result = run_pipeline(tmp_pipeline(text, TASKS), start_method="forkserver", log_level="warning")
    assert result.exit_code == 0, result.error
    items = result.collected["sink"]
    assert sorted(i for i in items if isinstance(i, int)) == [0, 1, 2]
    sizes = next(i for i in items if isinstance(i, dict))["sizes"]
    assert sum(sizes) == 3 and max(sizes) < 3  # never held until all 3 were there
    balanced(result)


def test_concurrency_stage_gets_whole_waves_of_a_starting_stream(tmp_pipeline):
    """A producer's first batches are small (1, 1, 2, 4 items...): a stage with `concurrency: 4` holds them until
    4 wait, so its first 4 calls run at once instead of one, two, then four."""
    text = """version: 1
stages:
  - {name: src, kind: producer, source: {range: {stop: 64}}, output: a}
  - {name: w, kind: pool, processes: 1, concurrency: 4, input: a, function: "tasks_t:wave", output: b}
  - {name: sink, kind: consumer, input: b, function: collect}
"""
    result = run_pipeline(tmp_pipeline(text, TASKS), start_method="forkserver", log_level="warning")
    assert result.exit_code == 0, result.error
    assert sorted(result.collected["sink"]) == list(range(64))
    balanced(result)


@pytest.mark.parametrize("queue", ["fifo", "lifo"])
def test_self_fed_pool_of_two_ends_when_idle(tmp_pipeline, queue):
    """A self-fed queue read by two processes ends when nothing is in flight and it is empty: exact counts."""
    text = f"""version: 1
queues: {{work: {{type: {queue}}}}}
stages:
  - {{name: seed, kind: producer, source: {{items: [8, 5]}}, output: work}}
  - {{name: expand, kind: pool, processes: 2, input: work, function: "tasks_t:expand", output: [work, out]}}
  - {{name: sink, kind: consumer, input: out, function: collect}}
"""
    result = run_pipeline(tmp_pipeline(text, TASKS), start_method="forkserver", log_level="warning")
    assert result.exit_code == 0, result.error
    # A tree of depth d has 2^(d+1) - 1 nodes; every node but the roots reaches `out`.
    assert len(result.collected["sink"]) == (2**9 - 2) + (2**6 - 2)
    assert Counter(result.collected["sink"])[0] == 2**8 + 2**5
    balanced(result)


def test_bounded_self_fed_queue_is_an_error_at_the_queue(tmp_pipeline):
    text = """version: 1
queues: {work: {maxsize: 10}}
stages:
  - {name: seed, kind: producer, source: {items: [3]}, output: work}
  - {name: expand, kind: consumer, input: work, function: "tasks_t:expand", output: [work, out]}
  - {name: sink, kind: consumer, input: out, function: collect}
"""
    path = tmp_pipeline(text, TASKS)
    result = run_cli("validate", str(path))
    assert result.returncode == 2
    assert "queues.work: queue 'work' is fed by its own reader (expand), so it cannot be bounded" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_worker_dying_in_close_fails_the_stage_under_fail(tmp_pipeline):
    text = """version: 1
stages:
  - {name: src, kind: producer, source: {items: [1, 2]}, output: a}
  - {name: keep, kind: consumer, input: a, function: "tasks_t:DiesInClose", restart: true}
"""
    result = run_pipeline(tmp_pipeline(text, TASKS), start_method="forkserver", log_level="error")
    assert result.exit_code == 1
    assert result.error.startswith("stage 'keep' (process keep) failed in close(): stage 'keep': process keep exited "
                                   "with code 3")


def test_worker_dying_in_close_under_skip_loses_only_its_state(tmp_pipeline):
    text = """version: 1
stages:
  - {name: src, kind: producer, source: {items: [1, 2]}, output: a}
  - {name: keep, kind: consumer, input: a, on_error: skip, function: "tasks_t:DiesInClose", output: b}
  - {name: sink, kind: consumer, input: b, function: collect}
"""
    result = run_pipeline(tmp_pipeline(text, TASKS), start_method="forkserver", log_level="error")
    assert result.exit_code == 0, result.error
    assert sorted(result.collected["sink"]) == [1, 2]
    balanced(result)


MARKED_TASKS = """\
import os, threading, time
from pathlib import Path

_later = threading.Semaphore(0)

def write(x, out):
    OUT = Path(out)
    first = not (OUT / "died").exists()  # the first worker process; its successor calls normally
    if first and x >= 4:
        _later.release()
        time.sleep(60)  # in flight, never written: the process dies first
    if first and x == 0:
        for _ in range(3):  # items 4-6 have started: the calls of items 1-3 have ended (5 s at most)
            _later.acquire(timeout=5)
        (OUT / "died").touch()
        os._exit(3)
    with open(OUT / "out.txt", "a") as f:
        f.write(f"{x}\\n")
"""


def test_concurrent_sink_dying_calls_no_finished_item_again(tmp_pipeline, tmp_path):
    """A sink with concurrency whose process dies: the calls that had ended (items 1-3, settled while item 0,
    the first of the chunk, still ran) are counted delivered and never made again; the item that was in
    hand is skipped; the calls in flight are made again by the successor. Every item written exactly once."""
    text = """version: 1
stages:
  - {name: src, kind: producer, source: {items: [0, 1, 2, 3, 4, 5, 6, 7]}, output: a}
  - {name: sink, kind: consumer, concurrency: 4, input: a, function: "tasks_t:write", on_error: skip,
     kwargs: {out: OUT}}
"""
    path = tmp_pipeline(text.replace("OUT", str(tmp_path)), MARKED_TASKS)
    result = run_pipeline(path, start_method="forkserver", log_level="error")
    assert result.exit_code == 0, result.error
    written = (path.parent / "out.txt").read_text().split()
    assert sorted(map(int, written)) == [1, 2, 3, 4, 5, 6, 7]
    st = result.stats["sink"]
    assert (st.delivered, st.skipped, st.restarts) == (7, 1, 1)
    balanced(result)
