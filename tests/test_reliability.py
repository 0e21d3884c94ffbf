"""Fault injection: failures never hang the run, never lose an item, never leave a process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from runner import run_pipeline
from runner.backends.local.children import SIGNAL_GAP
from tests.conftest import run_cli, wait_gone

METHODS = ["fork", "spawn"]

TASKS = '''
import os, signal, threading, time
from pathlib import Path

MARKS = Path(os.environ.get("MARKS", "."))

def attempt(x):
    """How many times this item has been tried, across processes (1 on the first call)."""
    n = 1
    while True:
        try:
            fd = os.open(MARKS / f"{x}-{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
            return n
        except FileExistsError:
            n += 1

def bad_sevens(x):
    if x % 7 == 0:
        raise ValueError(f"no sevens: {x}")
    return x

def flaky(x):
    """Fails the first two attempts of every fifth item, then works."""
    if x % 5 == 0 and attempt(x) <= 2:
        raise ConnectionError(f"flaky {x}")
    return x

def slow_on_13(x):
    if x == 13:
        time.sleep(60)
    return x

def slow_init():
    time.sleep(1.0)

def killed_once(x):
    """SIGKILLs its own process the first time it holds every tenth item."""
    if x % 10 == 3 and attempt(x) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return x

def exits_on_4(x):
    if x == 4:
        os._exit(3)
    return x

def unpicklable_on_2(x):
    return threading.Lock() if x == 2 else x

def slow(x):
    time.sleep(0.05)
    Path(MARKS / "started").touch()
    return x
'''


def pipeline(kind: str, function: str, extra: str = "", stop: int = 60, out: str = "good") -> str:
    return f"""version: 1
stages:
  - {{name: src, kind: producer, source: {{range: {{stop: {stop}}}}}, output: a}}
  - {{name: work, kind: {kind}, processes: 2, input: a, function: "tasks_t:{function}", output: {out}{extra}}}
  - {{name: good, kind: consumer, input: good, function: collect}}
"""


DLQ = "\n  - {name: dead, kind: consumer, input: dlq, function: collect}\n"


@pytest.mark.parametrize("kind", ["consumer", "pool"])
@pytest.mark.parametrize("method", METHODS)
def test_skip_drops_and_counts_failed_items(tmp_pipeline, marks, kind, method):
    """on_error: skip drops each raising item, counts it, and delivers every other item once."""
    path = tmp_pipeline(pipeline(kind, "bad_sevens", ", on_error: skip"), TASKS)
    result = run_pipeline(path, start_method=method)
    assert result.exit_code == 0, result.error
    assert Counter(result.collected["good"]) == Counter(x for x in range(60) if x % 7)
    st = result.stats["work"]
    assert (st.skipped, st.failed, st.items_in) == (9, 9, 60)


@pytest.mark.parametrize("kind", ["consumer", "pool"])
def test_skip_with_dead_letter_queue(tmp_pipeline, marks, kind):
    """With dead_letter, every item given up on arrives there as {item, error, stage, attempts}."""
    text = pipeline(kind, "bad_sevens", ", on_error: skip, dead_letter: dlq") + DLQ
    result = run_pipeline(tmp_pipeline(text, TASKS), start_method="fork")
    assert result.exit_code == 0, result.error
    letters = result.collected["dead"]
    assert sorted(d["item"] for d in letters) == [x for x in range(60) if x % 7 == 0]
    assert all(d["stage"] == "work" and d["attempts"] == 1 and "ValueError: no sevens" in d["error"] for d in letters)
    assert result.stats["work"].dead_lettered == 9 and result.stats["work"].skipped == 0


@pytest.mark.parametrize("kind", ["consumer", "pool"])
@pytest.mark.parametrize("method", METHODS)
def test_retry_delivers_flaky_items_exactly_once(tmp_pipeline, marks, kind, method):
    """Items that fail twice then succeed are delivered exactly once, with two retries each counted."""
    text = pipeline(kind, "flaky", ", on_error: retry, retries: 3, retry_backoff: 0.01")
    result = run_pipeline(tmp_pipeline(text, TASKS), start_method=method)
    assert result.exit_code == 0, result.error
    assert Counter(result.collected["good"]) == Counter(range(60))
    assert result.stats["work"].retried == 24 and result.stats["work"].failed == 24


def test_retry_exhausted_goes_to_dead_letter(tmp_pipeline, marks):
    """An item still failing after `retries` retries is dead-lettered with its attempt count."""
    text = pipeline("pool", "bad_sevens", ", on_error: retry, retries: 2, retry_backoff: 0, dead_letter: dlq", stop=8) + DLQ
    result = run_pipeline(tmp_pipeline(text, TASKS), start_method="fork")
    assert result.exit_code == 0, result.error
    # two processes: their letters arrive in either order
    assert sorted((d["item"], d["attempts"]) for d in result.collected["dead"]) == [(0, 3), (7, 3)]


def test_fail_policy_exits_1_naming_stage_and_item(tmp_pipeline, marks):
    """on_error: fail (the default) stops the run with exit 1, the stage, process and item named."""
    result = run_pipeline(tmp_pipeline(pipeline("consumer", "bad_sevens"), TASKS), start_method="fork")
    assert result.exit_code == 1
    assert "stage 'work'" in result.error and "ValueError: no sevens" in result.error and "item" in result.error


@pytest.mark.parametrize("kind", ["consumer", "pool"])
@pytest.mark.parametrize("method", METHODS)
def test_timeout_fails_the_call_and_replaces_the_worker(tmp_pipeline, marks, kind, method):
    """A call sleeping past `timeout` fails; its worker is replaced; skip drops just that item."""
    text = pipeline(kind, "slow_on_13", ", timeout: 0.5, on_error: skip, dead_letter: dlq", stop=30) + DLQ
    t0 = time.monotonic()
    result = run_pipeline(tmp_pipeline(text, TASKS), start_method=method)
    assert time.monotonic() - t0 < 20
    assert result.exit_code == 0, result.error
    assert Counter(result.collected["good"]) == Counter(x for x in range(30) if x != 13)
    [letter] = result.collected["dead"]
    assert letter["item"] == 13 and "timed out after 0.5s" in letter["error"]
    assert result.stats["work"].restarts == 1


def test_timeout_of_a_call_that_starts_after_every_other_event(tmp_pipeline, marks):
    """The stuck call starts once the runner has nothing left to wake it (input ended, the worker still in
    its slow init): its timeout is still enforced (the runner looks at a timed worker again every 50 ms)."""
    text = """version: 1
stages:
  - {name: src, kind: producer, source: {items: [13, 14]}, output: a}
  - {name: work, kind: consumer, input: a, function: "tasks_t:slow_on_13", init: "tasks_t:slow_init",
     timeout: 0.5, on_error: skip, output: good}
  - {name: good, kind: consumer, input: good, function: collect}
"""
    t0 = time.monotonic()
    result = run_pipeline(tmp_pipeline(text, TASKS), start_method="fork")
    assert time.monotonic() - t0 < 20
    assert result.exit_code == 0, result.error
    assert result.collected["good"] == [14]
    assert result.stats["work"].skipped == 1 and result.stats["work"].restarts == 1


@pytest.mark.parametrize("kind", ["consumer", "pool"])
@pytest.mark.parametrize("method", METHODS)
def test_sigkilled_worker_with_retry_delivers_every_item_once(tmp_pipeline, marks, kind, method):
    """Workers SIGKILLed while holding an item are replaced; with retry every item arrives exactly once."""
    text = pipeline(kind, "killed_once", ", on_error: retry, retry_backoff: 0", stop=50)
    result = run_pipeline(tmp_pipeline(text, TASKS), start_method=method)
    assert result.exit_code == 0, result.error
    assert Counter(result.collected["good"]) == Counter(range(50))
    assert result.stats["work"].restarts == 5 and result.stats["work"].failed == 5


def test_pool_ordered_survives_killed_workers(tmp_pipeline, marks):
    """An ordered pool keeps input order even when workers die mid-chunk and chunks are handed out again."""
    text = pipeline("pool", "killed_once", ", ordered: true, chunksize: 4, on_error: retry, retry_backoff: 0", stop=50)
    result = run_pipeline(tmp_pipeline(text, TASKS), start_method="fork")
    assert result.collected["good"] == list(range(50))


@pytest.mark.parametrize("kind", ["consumer", "pool"])
def test_sigkilled_worker_with_restart_false_exits_1_fast(tmp_pipeline, marks, kind):
    """restart: false: a killed worker ends the run with exit 1 within seconds, naming process and signal."""
    text = pipeline(kind, "killed_once", ", restart: false, on_error: retry", stop=50)
    t0 = time.monotonic()
    result = run_cli(str(tmp_pipeline(text, TASKS)), "--start-method", "fork", env={"MARKS": str(marks)}, timeout=30)
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - t0 < 15
    last = result.stderr.strip().splitlines()[-1]
    assert "stage 'work'" in last and "SIGKILL" in last and "work-" in last and "restart: false" in last, last


def test_os_exit_in_worker_is_a_failed_attempt(tmp_pipeline, marks):
    """os._exit in a worker: with skip, the item it held is dropped and counted; the rest arrive."""
    text = pipeline("consumer", "exits_on_4", ", on_error: skip", stop=10)
    result = run_pipeline(tmp_pipeline(text, TASKS), start_method="fork")
    assert result.exit_code == 0, result.error
    assert sorted(result.collected["good"]) == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert result.stats["work"].skipped == 1 and result.stats["work"].restarts == 1


def test_os_exit_with_fail_policy_names_exit_code(tmp_pipeline, marks):
    """os._exit(3) under on_error: fail ends the run with exit 1 and says the process exited with code 3."""
    result = run_pipeline(tmp_pipeline(pipeline("pool", "exits_on_4", stop=10), TASKS), start_method="fork")
    assert result.exit_code == 1 and "exited with code 3" in result.error


@pytest.mark.parametrize("kind", ["consumer", "pool"])
def test_unpicklable_result_fails_that_item(tmp_pipeline, marks, kind):
    """An unpicklable result fails its item with a clear error (skip: the others arrive; fail: exit 1)."""
    result = run_pipeline(tmp_pipeline(pipeline(kind, "unpicklable_on_2", ", on_error: skip", stop=6), TASKS), start_method="fork")
    assert result.exit_code == 0, result.error
    assert sorted(result.collected["good"]) == [0, 1, 3, 4, 5]
    failed = run_pipeline(tmp_pipeline(pipeline(kind, "unpicklable_on_2", stop=6), TASKS), start_method="fork")
    assert failed.exit_code == 1 and "cannot be pickled" in failed.error and "work" in failed.error


def test_unpicklable_source_item_fails_the_producer(tmp_pipeline, marks):
    """A producer emitting an unpicklable item fails the run, naming the stage and the item."""
    tasks = TASKS + "\ndef lock_source():\n    return [1, threading.Lock()]\n"
    text = """version: 1
stages:
  - {name: src, kind: producer, source: {function: "tasks_t:lock_source"}, output: a}
  - {name: out, kind: consumer, input: a, function: collect}
"""
    result = run_pipeline(tmp_pipeline(text, tasks), start_method="fork")
    assert result.exit_code == 1 and "stage 'src'" in result.error and "cannot be pickled" in result.error


def _start_slow_run(tmp_pipeline, marks, tmp_path, extra_env=None):
    text = pipeline("consumer", "slow", stop=100000)
    path = tmp_pipeline(text, TASKS)
    token = uuid.uuid4().hex
    log_file = tmp_path / "log.jsonl"
    env = {**os.environ, "MARKS": str(marks), "MPRUN_TEST_TOKEN": token, **(extra_env or {})}
    mprun = Path(sys.executable).with_name("mprun")
    proc = subprocess.Popen(
        [str(mprun), str(path), "--log-file", str(log_file), "--set", "settings.shutdown_timeout=2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    started = marks / "started"
    deadline = time.monotonic() + 30
    while not started.exists():  # the first item is being worked on
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.02)
    return proc, token, log_file


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_run_stops_cleanly(tmp_pipeline, marks, tmp_path, signum, code):
    """SIGINT/SIGTERM mid-run: exit 130/143 within the shutdown timeout, summary printed, log flushed, no child left."""
    proc, token, log_file = _start_slow_run(tmp_pipeline, marks, tmp_path)
    t0 = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert time.monotonic() - t0 < 10
    assert wait_gone(token) == []
    assert "stage" in err and "items/s" in err  # the summary
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    exited = {r["process"] for r in records if r["event"] == "process exited"}
    assert {"src", "work-1", "work-2", "good"} <= exited


def test_killing_the_main_process_leaves_no_child(tmp_pipeline, marks, tmp_path):
    """SIGKILL of the main process: every child notices its parent is gone and exits."""
    proc, token, _ = _start_slow_run(tmp_pipeline, marks, tmp_path)
    proc.kill()
    proc.communicate(timeout=30)
    assert wait_gone(token, deadline=15) == []


def test_accounting_balances_per_edge(tmp_pipeline, marks, tmp_path):
    """--metrics-json: per stage counts, and per queue produced = delivered (+ skipped + dead-lettered downstream)."""
    text = pipeline("pool", "flaky", ", on_error: retry, retries: 1, retry_backoff: 0, dead_letter: dlq") + DLQ
    metrics = tmp_path / "m.json"
    result = run_cli(str(tmp_pipeline(text, TASKS)), "--start-method", "fork", "--metrics-json", str(metrics),
                     env={"MARKS": str(marks)})
    assert result.returncode == 0, result.stderr
    data = json.loads(metrics.read_text())
    work = data["stages"]["work"]
    assert (work["items_in"], work["items_out"], work["dead_lettered"], work["retried"]) == (60, 48, 12, 12)
    assert data["queues"]["a"] == {"produced": 60, "delivered": 60, "left": 0, "balanced": True}
    assert data["queues"]["dlq"]["produced"] == 12 and data["queues"]["good"]["delivered"] == 48
    assert work["delivered"] == 48 and all(st["balanced"] for st in data["stages"].values())
    assert all(q["balanced"] for q in data["queues"].values())
    assert data["exit_code"] == 0 and data["processes"]["work-1"] == 0


def test_second_sigint_stops_at_once(tmp_pipeline, marks, tmp_path):
    """A second Ctrl-C does not wait for in-flight items (here: a 60 s call): exit 130 at once, no child left."""
    tasks = TASKS + "\ndef stuck(x):\n    Path(MARKS / 'started').touch()\n    time.sleep(60)\n    return x\n"
    path = tmp_pipeline(pipeline("consumer", "stuck", stop=10), tasks)
    token = uuid.uuid4().hex
    log_file = tmp_path / "log.jsonl"
    env = {**os.environ, "MARKS": str(marks), "MPRUN_TEST_TOKEN": token}
    mprun = Path(sys.executable).with_name("mprun")
    proc = subprocess.Popen([str(mprun), str(path), "--set", "settings.shutdown_timeout=60", "--log-file", str(log_file)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_for(done):
        deadline = time.monotonic() + 30
        while not done():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)

    wait_for((marks / "started").exists)
    proc.send_signal(signal.SIGINT)
    # Two signals sent back to back may be delivered as one: send the second once the first was seen.
    wait_for(lambda: log_file.exists() and "stopping" in log_file.read_text())
    time.sleep(SIGNAL_GAP)  # a signal within SIGNAL_GAP of the first is the same one delivered twice
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert time.monotonic() - t0 < 15
    assert wait_gone(token) == []


def test_lifo_manager_dying_fails_the_run(tmp_pipeline, marks):
    """If the manager serving a LIFO queue dies, the run fails with exit 1 and names the manager (not the
    producer or the stage whose calls to it failed); nothing hangs."""
    import multiprocessing
    import threading

    text = """version: 1
queues:
  stack: {type: lifo}
stages:
  - {name: src, kind: producer, source: {range: {stop: 100000}}, output: stack}
  - {name: work, kind: consumer, input: stack, function: "tasks_t:slow", output: good}
  - {name: good, kind: consumer, input: good, function: collect}
"""
    path = tmp_pipeline(text, TASKS)
    results = []
    runner = threading.Thread(target=lambda: results.append(run_pipeline(path, start_method="fork")))
    runner.start()
    deadline = time.monotonic() + 30
    while not (marks / "started").exists():
        assert time.monotonic() < deadline and runner.is_alive()
        time.sleep(0.02)
    [manager] = [p for p in multiprocessing.active_children() if p.name.startswith("StackManager")]
    os.kill(manager.pid, signal.SIGKILL)
    runner.join(30)
    assert not runner.is_alive()
    [result] = results
    assert result.exit_code == 1, result.error
    # The manager is named as the cause, not the producer or the stage that lost it.
    assert result.error.startswith("the manager process serving the LIFO queues was killed by SIGKILL"), result.error


@pytest.mark.parametrize(("signum", "dies"), [(signal.SIGTERM, True), (signal.SIGINT, False)])
def test_a_forked_child_signalled_before_its_own_handlers_leaves_the_supervisor_alone(signum, dies):
    """A `fork` child inherits the supervisor's handlers and its signal pipe until it sets its own: a SIGTERM
    then must end the child and a SIGINT be ignored, neither waking the supervisor (it once read as signal 0
    and failed the run with a traceback)."""
    from types import SimpleNamespace

    from runner.backends.local import children

    r, w = os.pipe()
    sup = SimpleNamespace(signal_received=0, pid=os.getpid())
    previous = children.install_signals(sup, w)
    try:
        pid = os.fork()
        if pid == 0:  # the child: signalled before a worker's bootstrap would have set its handlers
            os.kill(os.getpid(), signum)
            os._exit(7)
        _, status = os.waitpid(pid, 0)
    finally:
        children.restore_signals(previous)
    os.close(w)
    written = os.read(r, 64)
    os.close(r)
    assert written == b"" and sup.signal_received == 0
    if dies:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    else:
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7


EXACTLY_ONCE_TASKS = '''
import os, signal
from pathlib import Path

OUT = Path(os.environ["OUT"])

def write_once_then_die(x, die_at=0):
    """A user sink: appends the item to a file of this process; SIGKILLs its own process (once) holding die_at."""
    if x == die_at and not (OUT / "died").exists():
        (OUT / "died").touch()
        os.kill(os.getpid(), signal.SIGKILL)
    with open(OUT / f"seen-{os.getpid()}", "a") as f:
        f.write(f"{x}\\n")

def calls(x, die_at=0):
    """A stage with outputs: records every call; dies (once) holding die_at; after an item given up on
    (every 100th raises) the result so far has already gone back to the runner."""
    with open(OUT / f"calls-{os.getpid()}", "a") as f:
        f.write(f"{x}\\n")
    if x % 100 == 7:
        raise ValueError(x)
    if x == die_at and not (OUT / "died").exists():
        (OUT / "died").touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return x
'''


def _lines(folder: Path, prefix: str) -> Counter[int]:
    return Counter(int(line) for f in folder.glob(f"{prefix}-*") for line in f.read_text().splitlines())


@pytest.mark.parametrize("kind", ["consumer", "pool"])
def test_a_sink_worker_killed_mid_chunk_calls_no_completed_item_again(tmp_pipeline, tmp_path, kind):
    """A sink (here a user function writing each item to a file) whose worker is SIGKILLed mid-chunk, retried:
    every item is written exactly once. Before, the items of the chunk before the one in hand were handed out
    again and written twice (2,002 duplicate lines in a jsonl sink)."""
    text = f"""version: 1
stages:
  - {{name: src, kind: producer, source: {{range: {{stop: 30000}}}}, output: a}}
  - {{name: sink, kind: {kind}, processes: 2, input: a, function: "tasks_t:write_once_then_die",
     kwargs: {{die_at: 12345}}, on_error: retry}}
"""
    path = tmp_pipeline(text, EXACTLY_ONCE_TASKS)
    result = run_cli(str(path), "--no-progress", "--metrics-json", str(tmp_path / "m.json"), env={"OUT": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "died").exists()
    seen = _lines(tmp_path, "seen")
    assert seen == Counter(range(30000))
    st = json.loads((tmp_path / "m.json").read_text())["stages"]["sink"]
    assert (st["delivered"], st["failed"], st["retried"], st["restarts"]) == (30000, 1, 1, 1) and st["balanced"]


def test_a_dead_worker_s_outputs_are_redone_exactly_and_said(tmp_pipeline, tmp_path):
    """A stage with outputs whose worker dies mid-chunk: the calls answered by a partial result (up to an item
    given up on) are not made again; those after it, whose outputs died with the worker, are made again and a
    warning says how many; every output arrives once, every dead letter once."""
    text = """version: 1
stages:
  - {name: src, kind: producer, source: {range: {stop: 3000}}, output: a}
  - {name: work, kind: consumer, input: a, function: "tasks_t:calls", kwargs: {die_at: 1234},
     on_error: skip, dead_letter: dlq, output: b}
  - {name: good, kind: consumer, input: b, function: collect}
  - {name: dead, kind: consumer, input: dlq, function: collect}
"""
    path = tmp_pipeline(text, EXACTLY_ONCE_TASKS)
    log = tmp_path / "log.jsonl"
    result = run_cli(str(path), "--no-progress", "--no-summary", "--log-file", str(log), env={"OUT": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    good, dead = (json.loads(line) for line in result.stdout.splitlines()[-2:])
    failing = {x for x in range(3000) if x % 100 == 7}
    assert Counter(good) == Counter(x for x in range(3000) if x not in failing | {1234})
    assert sorted(d["item"] for d in dead) == sorted(failing | {1234})  # 1234: its death, under skip
    records = [json.loads(line) for line in log.read_text().splitlines()]
    [redo] = [r for r in records if r["event"] == "calling again items whose outputs died with their worker"]
    calls = _lines(tmp_path, "calls")
    twice = sorted(x for x, n in calls.items() if n == 2)
    assert len(twice) == redo["items"] and all(1207 < x < 1234 for x in twice), twice  # after the last letter
    assert max(calls.values()) <= 2 and set(calls) == set(range(3000))
