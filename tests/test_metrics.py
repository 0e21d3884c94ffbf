"""--metrics-json and the end-of-run summary: figures equal what really happened, the schema is documented."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from runner import metrics as metrics_module
from runner.metrics import Latency
from tests.conftest import run_cli

TASKS = '''
import os, signal, time
from pathlib import Path

MARKS = Path(os.environ["MARKS"])

def attempt(x, stage):
    """How many times this stage has been called with x (1 on the first call), across processes."""
    n = 1
    while True:
        try:
            os.close(os.open(MARKS / f"{stage}-{x}-{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return n
        except FileExistsError:
            n += 1

def note(stage, x, n, how):
    (MARKS / f"{stage}-{x}-{n}").write_text(how)

def flaky(x):
    """Every fourth item fails its first attempt; every eighth its second too; then it works. Sleeps 5 ms."""
    n = attempt(x, "retry")
    time.sleep(0.005)
    if (x % 4 == 0 and n == 1) or (x % 8 == 0 and n == 2):
        note("retry", x, n, "fail")
        raise ConnectionError(x)
    note("retry", x, n, "ok")
    return x

def picky(x):
    """Fails every fifth item (skipped by the policy)."""
    n = attempt(x, "skip")
    if x % 5 == 0:
        note("skip", x, n, "fail")
        raise ValueError(x)
    note("skip", x, n, "ok")
    return x

def killed_once(x):
    """SIGKILLs its own process the first time it holds item 3."""
    if x == 3 and attempt(x, "kill") == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return x
'''

RETRY_AND_SKIP = """version: 1
settings: {start_method: fork}
stages:
  - {name: src, kind: producer, source: {range: {stop: 40}}, output: a}
  - {name: retry, kind: pool, processes: 2, input: a, function: "tasks_t:flaky", output: b,
     on_error: retry, retries: 2, retry_backoff: 0}
  - {name: skip, kind: consumer, processes: 2, input: b, function: "tasks_t:picky", output: c, on_error: skip}
  - {name: sink, kind: consumer, input: c, function: collect}
"""


@pytest.fixture
def marks(tmp_path):
    path = tmp_path / "marks"
    path.mkdir()
    return path


def real_counts(marks, stage):
    """Calls of ``stage`` that failed and that succeeded, from the marks its function left."""
    hows = Counter(p.read_text() for p in marks.iterdir() if p.name.startswith(f"{stage}-"))
    return hows["fail"], hows["ok"]


def run_with_metrics(tmp_pipeline, tmp_path, marks, text):
    out = tmp_path / "metrics.json"
    result = run_cli(str(tmp_pipeline(text, TASKS)), "--metrics-json", str(out), env={"MARKS": str(marks)})
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text()), result


def test_metrics_equal_the_real_counts_of_a_run_with_retries_and_skips(tmp_pipeline, tmp_path, marks):
    """Every count in the report equals what the functions' own marks say happened; latency is a real sample."""
    data, result = run_with_metrics(tmp_pipeline, tmp_path, marks, RETRY_AND_SKIP)
    retry, skip = data["stages"]["retry"], data["stages"]["skip"]
    failed, ok = real_counts(marks, "retry")
    assert (retry["failed"], retry["retried"], retry["delivered"], retry["items_in"], retry["items_out"]) == (
        failed, failed, ok, ok, ok)  # every failure was retried, every item finally worked
    failed, ok = real_counts(marks, "skip")
    assert (skip["failed"], skip["skipped"], skip["delivered"], skip["items_out"]) == (failed, failed, ok, ok)
    assert skip["items_in"] == retry["items_out"] and skip["retried"] == 0 and skip["dead_lettered"] == 0
    sink = json.loads(result.stdout)
    assert data["stages"]["sink"]["items_in"] == len(sink) == ok
    assert data["stages"]["src"]["items_out"] == 40 and data["exit_code"] == 0 and data["error"] is None
    # latency: flaky sleeps 5 ms per call, so every sampled item took at least that long
    lat = retry["latency"]
    assert 1 <= lat["samples"] <= 40 + failed
    assert 0.005 <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert data["stages"]["src"]["latency"] is None
    for name, st in data["stages"].items():
        assert 0 <= st["utilisation"] <= 1.0 + 1e-6, name
        assert st["busy_per_process"] == pytest.approx(st["busy_seconds"] / st["processes"], abs=1e-5)
    assert data["slowest_stage"] == "retry"
    assert data["wall_seconds"] > 0
    assert set(data["process_stats"]) == {"src", "retry-1", "retry-2", "skip-1", "skip-2", "sink"}
    assert all(p == {"stage": p["stage"], "exit_code": 0, "restarts": 0} for p in data["process_stats"].values())
    assert data["process_stats"]["skip-2"]["stage"] == "skip"


def test_queue_high_water_mark_counts_items_put_before_the_reader_starts(tmp_pipeline, tmp_path, marks):
    """A queue filled before its reader starts (``after``) reaches exactly the number of items put into it."""
    text = """version: 1
settings: {start_method: fork}
queues: {a: {maxsize: 0}}
stages:
  - {name: src, kind: producer, source: {range: {stop: 300}}, output: a}
  - {name: work, kind: consumer, input: a, function: identity, after: [src]}
"""
    data, _ = run_with_metrics(tmp_pipeline, tmp_path, marks, text)
    assert data["queue_high_water"] == {"a": 300}


def test_a_worker_killed_holding_an_item_is_one_restart_of_process_and_stage(tmp_pipeline, tmp_path, marks):
    """A worker killed while holding an item is counted as one restart of that process and of its stage."""
    text = """version: 1
settings: {start_method: fork}
stages:
  - {name: src, kind: producer, source: {range: {stop: 10}}, output: a}
  - {name: work, kind: consumer, processes: 2, input: a, function: "tasks_t:killed_once", on_error: retry,
     retry_backoff: 0}
"""
    data, result = run_with_metrics(tmp_pipeline, tmp_path, marks, text)
    restarts = {name: p["restarts"] for name, p in data["process_stats"].items()}
    seen = f"{data}\n{result.stderr}"  # what a failure shows
    assert sorted(restarts.values()) == [0, 0, 1], seen
    assert data["stages"]["work"]["restarts"] == 1 and data["stages"]["work"]["failed"] == 1, seen
    assert data["processes"] == dict.fromkeys(restarts, 0), seen  # the replacement ended normally
    summary = [line for line in result.stderr.splitlines() if line.startswith("work")]
    assert summary[0].split()[8] == "1", seen  # the restarts column of the summary


def test_summary_table_marks_the_slowest_stage(tmp_pipeline, tmp_path, marks):
    """The summary has every column, a line per stage, the slowest stage starred and named with its busy time."""
    _, result = run_with_metrics(tmp_pipeline, tmp_path, marks, RETRY_AND_SKIP)
    lines = result.stderr.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    assert lines[head].split() == ["stage", "procs", "in", "out", "skipped", "retried", "failed", "dead", "restarts",
                                   "seconds", "items/s", "util"]
    rows = lines[head + 1 : head + 5]
    assert [r.split()[0] for r in rows] == ["src", "retry", "skip", "sink"]
    assert rows[1].endswith("  *") and not any(r.endswith("*") for r in rows[:1] + rows[2:])
    assert re.match(r"\* slowest stage: retry \(\d+\.\d{3}s busy per process, \d+% utilised\)", lines[head + 5])
    assert len({len(r.removesuffix("  *")) for r in [lines[head], *rows]}) == 1  # aligned: every row as wide


def test_latency_percentiles_are_within_5_percent_of_exact():
    """Latency percentiles fall within 5% of the exact ones, and never above the largest sample."""
    lat = Latency()
    samples = [i / 1000 for i in range(1, 1001)]  # 1 ms .. 1 s
    lat.add(samples)
    for q, exact in ((50, 0.5), (95, 0.95), (99, 0.99)):
        assert lat.percentile(q) == pytest.approx(exact, rel=0.05)
    assert lat.report()["max"] == 1.0 and lat.report()["samples"] == 1000
    assert Latency().report() is None


def test_every_reported_key_is_documented(tmp_pipeline, tmp_path, marks):
    """Each key the report holds is named in the schema in runner/metrics.py's docstring."""
    data, _ = run_with_metrics(tmp_pipeline, tmp_path, marks, RETRY_AND_SKIP)
    doc = metrics_module.__doc__ or ""
    keys = set(data) | set(data["stages"]["retry"]) | set(data["stages"]["retry"]["latency"])
    keys |= set(data["queues"]["a"]) | set(data["process_stats"]["src"])
    assert {k for k in keys if f'"{k}"' not in doc} == set()
