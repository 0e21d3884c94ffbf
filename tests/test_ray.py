"""The ray backend: the same pipeline gives the same results as the local backend, on one local Ray instance.

One Ray instance serves every test of this module (started by the ``ray_instance`` fixture, stopped at the end
of the module, before other modules fork processes); the backend reuses an instance it finds connected. The
CLI tests start their own instance through the real entry point and check that none of its processes remain.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from runner import run_pipeline
from tests.conftest import run_cli, wait_gone

pytestmark = pytest.mark.ray

TASKS = '''
import logging, os, time
import structlog
from pathlib import Path

def double(x):
    return x * 2

def add(x, n=0):
    return x + n

def bad_sevens(x):
    if x % 7 == 0:
        raise ValueError(f"no sevens: {x}")
    return x

def flaky(x, marks):
    """Fails the first attempt of every fifth item (a mark file per item remembers), then works."""
    mark = Path(marks, str(x))
    if x % 5 == 0 and not mark.exists():
        mark.touch()
        raise ConnectionError(f"flaky {x}")
    return x

def chatty(x):
    structlog.get_logger("t").info("structlog record", item=x)
    logging.getLogger("t").warning("stdlib record %s", x)
    print(f"line {x}")
    return None

def unpicklable_on_2(x):
    import threading
    return threading.Lock() if x == 2 else x

def exits_on_4(x):
    if x == 4:
        os._exit(3)
    return x

def slow_on_3(x):
    if x == 3:
        time.sleep(60)
    return x

def slow(x, marks):
    Path(marks, "started").touch()
    time.sleep(0.05)
    return x

def module_folder(x):
    return os.path.dirname(os.path.abspath(__file__))

def count_in_file(x, path):
    """Read-modify-write of a shared counter: only a lock keeps every increment."""
    p = Path(path)
    n = int(p.read_text() or 0)
    time.sleep(0.002)
    p.write_text(str(n + 1))
    return x

def monitor():
    while True:
        structlog.get_logger("monitor").info("monitor alive")
        time.sleep(0.05)
'''

PATTERNS = """version: 1
queues:
  stack: {type: lifo}
stages:
  - {name: src, kind: producer, source: {range: {stop: 500}}, output: [a, fan]}
  - {name: inc, kind: pool, processes: 2, ordered: true, chunksize: 7, input: a, function: "tasks_t:add",
     kwargs: {n: 1}, output: b}
  - {name: dbl, kind: consumer, input: b, function: "tasks_t:double", output: c}
  - {name: chain, kind: consumer, input: c, function: collect}
  - {name: more, kind: producer, processes: 2, source: {items: [-1, -2, -3]}, output: fan}
  - {name: spread, kind: consumer, processes: 3, input: fan, function: identity, output: merged}
  - {name: fanin, kind: consumer, input: merged, function: collect}
  - {name: lifo_src, kind: producer, source: {range: {stop: 100}}, output: stack}
  - {name: lifo_read, kind: consumer, after: [lifo_src], input: stack, function: identity, output: popped}
  - {name: lifo, kind: consumer, input: popped, function: collect}
"""


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance (2 CPUs) for the module; every Ray process carries a token, all gone at the end."""
    ray = pytest.importorskip("ray")
    token = uuid.uuid4().hex
    saved = os.environ.get("MPRUN_TEST_TOKEN")
    os.environ["MPRUN_TEST_TOKEN"] = token  # inherited by the Ray processes started here
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    finally:
        if saved is None:
            del os.environ["MPRUN_TEST_TOKEN"]
        else:
            os.environ["MPRUN_TEST_TOKEN"] = saved
    yield token
    ray.shutdown()
    assert wait_gone(token) == [], "Ray processes left after ray.shutdown()"


def actors_alive(token: str) -> list[str]:
    """Command lines of live processes of this Ray instance that run an mprun actor (a stage or the hub)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path("/proc", entry, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = Path("/proc", entry, "environ").read_bytes()
        except OSError:
            continue
        if f"MPRUN_TEST_TOKEN={token}".encode() in environ.split(b"\0") and any(
            name in cmdline for name in ("_WorkerActor", "_ProducerActor", "_Hub")
        ):
            found.append(cmdline)
    return found


@pytest.fixture
def ray_run(ray_instance):
    """Run a pipeline on the ray backend; afterwards no actor of the run may be alive (bounded wait)."""

    def run(path, **options):
        return run_pipeline(path, backend="ray", **options)

    yield run
    deadline = time.monotonic() + 10
    while actors_alive(ray_instance) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert actors_alive(ray_instance) == []


def stats_of(result) -> dict[str, tuple[int, ...]]:
    return {
        name: (s.items_in, s.items_out, s.delivered, s.skipped, s.retried, s.failed, s.dead_lettered)
        for name, s in result.stats.items()
    }


def test_core_patterns_match_local(tmp_pipeline, ray_run):
    """Chain, ordered pool, fan-out, fan-in and LIFO order: the same items, order and counts as locally."""
    path = tmp_pipeline(PATTERNS, TASKS)
    local = run_pipeline(path, start_method="forkserver")
    ray = ray_run(path)
    assert local.exit_code == 0 and ray.exit_code == 0, ray.error
    assert ray.collected["chain"] == local.collected["chain"] == [2 * i + 2 for i in range(500)]
    assert Counter(ray.collected["fanin"]) == Counter(local.collected["fanin"]) == Counter([*range(500), -1, -2, -3])
    assert ray.collected["lifo"] == local.collected["lifo"] == list(range(99, -1, -1))
    assert stats_of(ray) == stats_of(local)


@pytest.mark.parametrize("kind", ["consumer", "pool"])
def test_raising_function_fails_like_local(tmp_pipeline, ray_run, kind):
    """A raising function under on_error: fail ends the run with exit 1 and the local backend's error line."""
    text = f"""version: 1
stages:
  - {{name: src, kind: producer, source: {{range: {{start: 7, stop: 8}}}}, output: a}}
  - {{name: fragile, kind: {kind}, processes: 1, input: a, function: "tasks_t:bad_sevens"}}
"""
    path = tmp_pipeline(text, TASKS)
    local = run_pipeline(path, start_method="forkserver")
    ray = ray_run(path)
    assert ray.exit_code == local.exit_code == 1
    assert ray.error == local.error == "stage 'fragile' (process fragile) failed on item 7: ValueError: no sevens: 7"


FIVE = """version: 1
stages:
  - {name: src, kind: producer, source: {range: {stop: 5}}, output: a}
  - {name: sink, kind: consumer, input: a, function: collect}
"""


def test_fork_is_refused_in_a_process_connected_to_ray(tmp_pipeline, ray_instance):
    """A local run with start_method fork in a process connected to Ray stops with a usage error before it
    forks (a fork copies Ray's gRPC threads); forkserver runs there, its import check too."""
    from runner.errors import UsageError

    path = tmp_pipeline(FIVE, TASKS)
    with pytest.raises(UsageError, match="start_method fork cannot be used in a process connected to Ray"):
        run_pipeline(path, start_method="fork")
    assert run_pipeline(path, start_method="forkserver").collected["sink"] == [0, 1, 2, 3, 4]


def test_a_hub_ray_never_starts_fails_the_run_instead_of_hanging(tmp_pipeline, ray_run, monkeypatch):
    """The queue hub actor waiting for resources that never come: the run fails after START_TIMEOUT with
    one line saying so, and every actor it started is gone (the fixture checks)."""
    ray_backend = pytest.importorskip("runner.backends.ray.driver")
    monkeypatch.setattr(ray_backend, "START_TIMEOUT", 2.0)
    monkeypatch.setattr(ray_backend, "KILL_GRACE", 0.5)  # each bounded wait on the hub that never started
    monkeypatch.setattr(ray_backend, "_Hub", ray_backend._Hub.options(resources={"mprun-test-never": 1}))
    result = ray_run(tmp_pipeline(FIVE, TASKS))
    assert result.exit_code == 1
    assert result.error == "Ray did not start the queue hub actor within 2s"


def test_failing_reader_never_leaves_its_writers_blocked(tmp_pipeline, ray_run):
    """A reader fails while its writers wait on full queues: the run still ends at once with exit 1."""
    text = """version: 1
queues:
  a: {maxsize: 10}
  b: {maxsize: 10}
stages:
  - {name: src, kind: producer, source: {range: {stop: 1000000}}, output: a}
  - {name: relay, kind: consumer, input: a, function: identity, output: b}
  - {name: fragile, kind: consumer, input: b, function: "tasks_t:bad_sevens"}
"""
    t0 = time.monotonic()
    result = ray_run(tmp_pipeline(text, TASKS))
    assert result.exit_code == 1 and result.error.startswith("stage 'fragile'"), result.error
    assert time.monotonic() - t0 < 30


def test_records_output_locks_names_and_daemons_of_worker_actors(tmp_pipeline, ray_run, tmp_path, capfd):
    """In one run: 300 items x 2 records from two worker actors all reach the log file with stage/process/pid/
    node, and printed lines reach stdout; a lock serializes calls across worker actors (no lost increment),
    process_names name them; a daemon monitor never holds the run open."""
    log_file, counter = tmp_path / "log.jsonl", tmp_path / "counter"
    counter.write_text("0")
    text = f"""version: 1
stages:
  - {{name: src, kind: producer, source: {{range: {{stop: 300}}}}, output: a}}
  - {{name: talk, kind: consumer, processes: 2, input: a, function: "tasks_t:chatty"}}
  - {{name: mon, kind: producer, daemon: true, source: {{function: "tasks_t:monitor"}}}}
  - {{name: few, kind: producer, source: {{range: {{stop: 40}}}}, output: w}}
  - {{name: work, kind: consumer, processes: 2, process_names: [alice, bob], lock: counter, input: w,
     function: "tasks_t:count_in_file", kwargs: {{path: "{counter}"}}}}
"""
    result = ray_run(tmp_pipeline(text, TASKS), log_file=str(log_file))
    assert result.exit_code == 0, result.error
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    structured = [r for r in records if r["event"] == "structlog record"]
    stdlib = [r for r in records if r["event"].startswith("stdlib record")]
    assert sorted(r["item"] for r in structured) == list(range(300))
    assert len(stdlib) == 300 and {r["level"] for r in stdlib} == {"warning"}
    assert {r["process"] for r in structured} <= {"talk-1", "talk-2"} and {r["stage"] for r in structured} == {"talk"}
    assert all(r["pid"] != os.getpid() and r["node"] for r in structured)
    started = [r for r in records if r["event"] == "process started"]
    assert {r["process"] for r in started} >= {"src", "talk-1", "talk-2"}
    out = capfd.readouterr().out.splitlines()
    assert sorted(out) == sorted(f"line {i}" for i in range(300))
    assert counter.read_text() == "40"
    assert {r["process"] for r in started if r["stage"] == "work"} == {"alice", "bob"}
    assert any(r["event"] == "monitor alive" for r in records)


def test_a_failed_item_is_skipped_alone_and_a_lost_worker_replaced(tmp_pipeline, ray_run):
    """Under on_error: skip, in one run: an output that cannot be pickled fails just its item (pool); os._exit
    in a worker actor drops the item it held and the actor is replaced (consumer); a call past `timeout` is
    killed and its worker replaced (pool). The other items of each stage arrive, each failure counted."""
    text = """version: 1
stages:
  - {name: src, kind: producer, source: {range: {stop: 10}}, output: [a, b, c]}
  - {name: pickle, kind: pool, processes: 2, input: a, function: "tasks_t:unpicklable_on_2", on_error: skip,
     output: pickled}
  - {name: exits, kind: consumer, processes: 2, input: b, function: "tasks_t:exits_on_4", on_error: skip,
     output: survived}
  - {name: slow, kind: pool, processes: 2, input: c, function: "tasks_t:slow_on_3", timeout: 1, on_error: skip,
     output: timely}
  - {name: pickled, kind: consumer, input: pickled, function: collect}
  - {name: survived, kind: consumer, input: survived, function: collect}
  - {name: timely, kind: consumer, input: timely, function: collect}
"""
    t0 = time.monotonic()
    result = ray_run(tmp_pipeline(text, TASKS))
    assert result.exit_code == 0, result.error
    assert time.monotonic() - t0 < 30  # the 60 s call was cut at its timeout
    everything = list(range(10))
    assert sorted(result.collected["pickled"]) == [x for x in everything if x != 2]
    assert result.stats["pickle"].skipped == 1 and result.stats["pickle"].delivered == 9
    assert sorted(result.collected["survived"]) == [x for x in everything if x != 4]
    assert result.stats["exits"].skipped == 1 and result.stats["exits"].restarts >= 1
    assert sorted(result.collected["timely"]) == [x for x in everything if x != 3]
    assert result.stats["slow"].skipped == 1 and result.stats["slow"].restarts == 1


def test_dead_worker_with_restart_false_fails_the_run(tmp_pipeline, ray_run):
    """restart: false: a worker actor that dies ends the run with exit 1, naming stage and process."""
    text = """version: 1
stages:
  - {name: src, kind: producer, source: {range: {stop: 10}}, output: a}
  - {name: work, kind: pool, processes: 2, input: a, function: "tasks_t:exits_on_4", restart: false, on_error: skip}
"""
    result = ray_run(tmp_pipeline(text, TASKS))
    assert result.exit_code == 1
    assert "stage 'work'" in result.error and "work-" in result.error and "died" in result.error
    assert "restart: false" in result.error


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_mid_run_stops_cleanly_leaving_no_process(tmp_pipeline, tmp_path):
    """SIGTERM while worker actors are busy: exit 143 within the shutdown timeout, summary printed, every
    record flushed, and no process (driver, Ray's, actors) left behind."""
    pytest.importorskip("ray")
    marks = tmp_path / "marks"
    marks.mkdir()
    text = f"""version: 1
settings: {{backend: ray, shutdown_timeout: 1}}
stages:
  - {{name: src, kind: producer, source: {{range: {{stop: 100000}}}}, output: a}}
  - {{name: work, kind: consumer, processes: 2, input: a, function: "tasks_t:slow", kwargs: {{marks: "{marks}"}},
     output: b}}
  - {{name: good, kind: consumer, input: b, function: collect}}
"""
    path = tmp_pipeline(text, TASKS)
    token = uuid.uuid4().hex
    log_file = tmp_path / "log.jsonl"
    mprun = Path(sys.executable).with_name("mprun")
    proc = subprocess.Popen([str(mprun), str(path), "--log-file", str(log_file)], env={**os.environ, "MPRUN_TEST_TOKEN": token},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (marks / "started").exists():  # a worker actor is busy
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.02)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert time.monotonic() - t0 < 15, err
    assert wait_gone(token) == [], err
    assert "items/s" in err and err.strip().splitlines()[-1] == "mprun: error: stopped by SIGTERM"
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert {"src", "work-1", "work-2", "good"} <= {r["process"] for r in records if r["event"] == "process exited"}
    assert {"work-1", "work-2"} <= {r["process"] for r in records if r["event"] == "process started"}


def test_a_late_ray_call_after_a_run_with_its_own_instance_starts_no_other(tmp_pipeline):
    """After a run that started and stopped its own Ray instance, a Ray call still made in its process (as by
    a thread of the run left waiting) fails instead of auto-starting a new instance that would outlive it."""
    pytest.importorskip("ray")
    path = tmp_pipeline(FIVE, TASKS)
    script = f"""
import ray
from runner import run_pipeline
if __name__ == "__main__":
    assert run_pipeline({str(path)!r}, backend="ray").collected["sink"] == [0, 1, 2, 3, 4]
    try:
        ray.get(ray.put(1))
    except Exception as e:
        print("refused:", type(e).__name__)
    print("initialized:", ray.is_initialized())
"""
    token = uuid.uuid4().hex
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "MPRUN_TEST_TOKEN": token})
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "initialized: False" in result.stdout, result.stdout
    assert wait_gone(token) == []


def test_missing_ray_is_a_one_line_usage_error(tmp_pipeline, tmp_path):
    """Without Ray installed, --backend ray exits 2 with one line saying what to install."""
    shadow = tmp_path / "shadow" / "ray"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n")
    path = tmp_pipeline("version: 1\nstages:\n  - {name: s, kind: producer, source: {items: [1]}}\n")
    result = run_cli("run", str(path), "--backend", "ray", env={"PYTHONPATH": str(shadow.parent)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mprun: error: the ray backend needs Ray, which is not installed: pip install -e '.[ray]' (or pip install 'mprun[ray]')"
    ]


def test_unreachable_ray_address_fails_fast(tmp_pipeline):
    """An address where no Ray cluster listens ends in seconds with exit 2 and one line (Ray alone retries for
    minutes)."""
    pytest.importorskip("ray")
    path = tmp_pipeline("version: 1\nstages:\n  - {name: s, kind: producer, source: {items: [1]}}\n")
    t0 = time.monotonic()
    result = run_cli("run", str(path), "--backend", "ray", "--ray-address", "127.0.0.1:1", timeout=60)
    assert result.returncode == 2 and time.monotonic() - t0 < 20
    assert result.stderr.strip().splitlines() == [
        "mprun: error: cannot reach the Ray cluster at 127.0.0.1:1: Connection refused (is a Ray head node running there?)"
    ]


def test_ray_address_needs_the_ray_backend(tmp_pipeline):
    """--ray-address with the local backend is a usage error (exit 2), not silently ignored."""
    path = tmp_pipeline("version: 1\nstages:\n  - {name: s, kind: producer, source: {items: [1]}}\n")
    result = run_cli("run", str(path), "--ray-address", "127.0.0.1:6379")
    assert result.returncode == 2
    assert "--ray-address applies to the ray backend" in result.stderr and "Traceback" not in result.stderr


COUNTED = '''
import os
from pathlib import Path

DRIVER, LOG = {driver}, {log!r}


class Item:
    """An item whose unpickling in the driver process leaves a line in LOG."""

    def __init__(self, x):
        self.x = x

    def __reduce__(self):
        return (revive, (self.x,))


def revive(x):
    if os.getpid() == DRIVER:
        with open(LOG, "a") as f:
            f.write(f"{{x}}\\n")
    return Item(x)


def items(stop, start=0):
    for i in range(start, stop):
        yield Item(i)


def bump(item):
    return Item(item.x + 1)


def value(item):
    return item.x
'''


def test_the_driver_never_unpickles_the_items_of_a_fifo_queue(tmp_pipeline, ray_run, tmp_path, monkeypatch):
    """Items through FIFO queues (ordered pools, a fan-out) travel by reference: the driver
    unpickles none of them; it does unpickle what it must hold, the items a `collect` stage gathers."""
    unpickled = tmp_path / "unpickled"
    text = """version: 1
stages:
  - {name: src, kind: producer, source: {function: "counted_t:items"}, kwargs: {stop: 500}, output: a}
  - {name: bump, kind: pool, processes: 2, ordered: true, input: a, function: "counted_t:bump", output: [b, c]}
  - {name: again, kind: pool, processes: 2, ordered: true, input: b, function: "counted_t:bump", output: d}
  - {name: values, kind: consumer, input: d, function: "counted_t:value", output: e}
  - {name: sink, kind: consumer, input: e, function: collect}
  - {name: drop, kind: consumer, input: c, function: "counted_t:value"}
  - {name: few, kind: producer, source: {function: "counted_t:items"}, kwargs: {start: 10000, stop: 10003},
     output: f}
  - {name: held, kind: consumer, input: f, function: collect}
"""
    path = tmp_pipeline(text)
    (path.parent / "counted_t.py").write_text(COUNTED.format(driver=os.getpid(), log=str(unpickled)))
    monkeypatch.syspath_prepend(str(path.parent))  # the driver imports Item to unpickle what `held` collects
    result = ray_run(path)
    assert result.exit_code == 0, result.error
    assert result.collected["sink"] == list(range(2, 502))
    assert sorted(item.x for item in result.collected["held"]) == [10000, 10001, 10002]
    assert sorted(unpickled.read_text().split()) == ["10000", "10001", "10002"]


METRICS = """version: 1
queues:
  stack: {type: lifo}
  small: {maxsize: 100}
stages:
  - {name: src, kind: producer, source: {range: {stop: 300}}, output: [a, r, stack]}
  - {name: sevens, kind: pool, processes: 2, input: a, function: "tasks_t:bad_sevens", on_error: skip, output: small}
  - {name: retrier, kind: consumer, processes: 2, input: r, function: "tasks_t:flaky", on_error: retry,
     retries: 2, retry_backoff: 0, kwargs: {marks: "MARKS"}, output: small}
  - {name: inc, kind: pool, processes: 2, ordered: true, input: small, function: "tasks_t:add", kwargs: {n: 1},
     output: b}
  - {name: letters, kind: consumer, processes: 2, input: b, function: "tasks_t:bad_sevens", on_error: skip,
     dead_letter: dlq, output: ok}
  - {name: ok, kind: consumer, input: ok, function: collect}
  - {name: dead, kind: consumer, input: dlq, function: collect}
  - {name: lifo_read, kind: consumer, after: [src], input: stack, function: identity}
"""


def _comparable(report: dict) -> dict:
    """The fields of a --metrics-json report that do not depend on timing or on how chunks were cut."""
    stages = {
        name: {k: v for k, v in st.items() if k in {"kind", "processes", "items_in", "items_out", "delivered", "skipped",
                                                    "retried", "failed", "dead_lettered", "restarts", "balanced"}}
        | {"latency": st["latency"] is not None}
        for name, st in report["stages"].items()
    }
    return {"exit_code": report["exit_code"], "error": report["error"], "stages": stages, "queues": report["queues"],
            "high_water": sorted(report["queue_high_water"]), "processes": report["processes"],
            "process_stats": report["process_stats"]}


def test_skip_retry_dead_letters_and_metrics_match_local(tmp_pipeline, ray_run, tmp_path):
    """on_error skip / retry and dead letters: the same delivered items, letters and counts as locally; the
    metrics report (what --metrics-json writes) is the same on both backends: counts per stage, queue
    accounts, processes and their exit codes, a high-water mark for every queue; only timings differ."""
    from runner.metrics import metrics

    results = []
    for backend in ("local", "ray"):
        marks = tmp_path / f"marks-{backend}"
        marks.mkdir()
        path = tmp_pipeline(METRICS.replace("MARKS", str(marks)), TASKS, name=f"{backend}.yaml")
        results.append(run_pipeline(path, start_method="forkserver") if backend == "local" else ray_run(path))
    local, ray = results
    assert ray.exit_code == 0, ray.error
    assert Counter(ray.collected["ok"]) == Counter(local.collected["ok"])
    assert sorted(d["item"] for d in ray.collected["dead"]) == sorted(d["item"] for d in local.collected["dead"])
    assert {d["stage"] for d in ray.collected["dead"]} == {"letters"}
    assert ray.collected["dead"][0]["error"].startswith("ValueError: no sevens")
    assert stats_of(ray) == stats_of(local)
    assert ray.queues == local.queues and all(q["balanced"] for q in ray.queues.values())
    assert ray.stats["retrier"].retried == 60 and ray.stats["sevens"].skipped == 43
    reports = {"local": metrics(local), "ray": metrics(ray)}
    assert _comparable(reports["ray"]) == _comparable(reports["local"])
    assert reports["local"]["stages"]["letters"]["dead_lettered"] > 0
    assert set(reports["ray"]["queue_high_water"]) == set(reports["ray"]["queues"]) == {"a", "r", "stack", "small",
                                                                                        "b", "ok", "dlq"}
    assert reports["ray"]["queue_high_water"]["a"] > 0


NODES = '''
import os, time
from pathlib import Path
import ray


def module_folder(x):
    return os.path.dirname(os.path.abspath(__file__))

_node = []


def node_of(x, marks):
    """(2x, the custom resource naming the Ray node this runs on: node_a or node_b). A worker's first call
    waits (at most 150 s) until a worker of each node has begun: one node's workers cannot take every item
    while the other node still prepares the run's environment (slow on a loaded machine)."""
    if not _node:
        here = ray.get_runtime_context().get_node_id()
        resources = next(n["Resources"] for n in ray.nodes() if n["NodeID"] == here)
        _node.append(next(k for k in resources if k.startswith("node_")))
        Path(marks, _node[0]).touch()
        end = time.monotonic() + 150
        while len(os.listdir(marks)) < 2 and time.monotonic() < end:
            time.sleep(0.02)
    return [2 * x, _node[0]]
'''


@pytest.fixture
def two_nodes():
    """A Ray cluster of two nodes on this machine (`ray start --head`, then `ray start --address`), each with a
    custom resource naming it; yields its address. Both are stopped at the end and leave no process."""
    pytest.importorskip("ray")
    token, port = uuid.uuid4().hex, free_port()
    env = {**os.environ, "MPRUN_TEST_TOKEN": token, "RAY_AUTH_MODE": "disabled"}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    common = ["--block", "--num-cpus", "1", f"--temp-dir={temp}", "--disable-usage-stats"]
    nodes = [subprocess.Popen(
        [ray_cli, "start", "--head", "--port", str(port), "--include-dashboard", "false", "--resources",
         '{"node_a": 10}', f"--dashboard-agent-listen-port={free_port()}", *common],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )]
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and nodes[0].poll() is None, "the head node did not start"
                time.sleep(0.1)
        nodes.append(subprocess.Popen(
            [ray_cli, "start", "--address", address, "--resources", '{"node_b": 10}',
             f"--dashboard-agent-listen-port={free_port()}", *common],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))
        wait = (f"import ray, time, logging\nray.init(address={address!r}, logging_level=logging.ERROR)\n"
                "end = time.monotonic() + 60\n"
                "while sum(n['Alive'] for n in ray.nodes()) < 2 and time.monotonic() < end:\n    time.sleep(0.1)\n"
                "print(sum(n['Alive'] for n in ray.nodes()))\n")
        joined = subprocess.run([sys.executable, "-c", wait], env=env, capture_output=True, text=True, timeout=120,
                                check=False)
        assert joined.stdout.strip() == "2", joined.stderr[-2000:]
        yield address
    finally:
        for node in reversed(nodes):
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait(10)
        left = wait_gone(token, 20)
        shutil.rmtree(temp, ignore_errors=True)
        assert left == [], "Ray processes left after stopping the two nodes"


@pytest.mark.timeout(360)  # two nodes to start, the run's environment to prepare on each
def test_a_two_node_cluster_runs_the_items_on_both_nodes(tmp_pipeline, two_nodes, tmp_path):
    """On a cluster of two nodes (`--ray-address`), the pool's worker actors on both nodes take items (batches
    read by reference across nodes), the results and counts are exact, and the tasks module travelled with
    the run (the workers import a copy, not the file beside the pipeline)."""
    text = """version: 1
stages:
  - {name: src, kind: producer, source: {range: {stop: 3000}}, output: a}
  - {name: work, kind: pool, processes: 4, input: a, function: "tasks_t:node_of", kwargs: {marks: MARKS},
     output: b}
  - {name: keep, kind: consumer, input: b, function: collect}
  - {name: where, kind: producer, source: {items: [0]}, output: w}
  - {name: from_, kind: consumer, input: w, function: "tasks_t:module_folder", output: f}
  - {name: folder, kind: consumer, input: f, function: collect}
"""
    metrics, marks = tmp_path / "metrics.json", tmp_path / "marks"
    marks.mkdir()
    path = tmp_pipeline(text.replace("MARKS", json.dumps(str(marks))), NODES)
    result = run_cli("run", str(path), "--no-summary", "--backend", "ray", "--ray-address", two_nodes,
                     "--metrics-json", str(metrics), env={"RAY_AUTH_MODE": "disabled"}, timeout=270)
    assert result.returncode == 0, result.stderr
    pairs = json.loads(result.stdout.splitlines()[0])
    assert json.loads(result.stdout.splitlines()[1]) != [str(path.parent)]  # imported from the copy Ray shipped
    assert sorted(x for x, _ in pairs) == [2 * i for i in range(3000)]
    assert Counter(node for _, node in pairs).keys() == {"node_a", "node_b"}
    report = json.loads(metrics.read_text())
    assert report["stages"]["work"]["items_in"] == report["stages"]["keep"]["items_in"] == 3000
    assert report["stages"]["folder"]["items_in"] == 1
    assert all(q["balanced"] for q in report["queues"].values())


def test_live_snapshot_counts_the_calls_in_flight_on_ray(tmp_pipeline, ray_run):
    """The workers report their calls in flight: the Ray driver's snapshot shows them as the local one does."""
    from runner import plan_run
    from runner.backends.ray.driver import RaySupervisor
    from tests.test_progress import CONCURRENT, WAIT_TASKS, calls_seen_live

    seen = calls_seen_live(RaySupervisor(plan_run(tmp_pipeline(CONCURRENT, WAIT_TASKS), log_level="warning")))
    assert seen and max(seen) > 1


@pytest.mark.parametrize("example", ["wordcount", "crawl", "router", "async_fetch", "batched_writer"])
def test_stages_for_real_work_match_local(ray_run, example, tmp_path, monkeypatch):
    """Each shipped example of class stages with close(), batches, concurrency, routes and a self-fed stack
    gives on Ray what it gives locally: the same collected items, stage counts and queue accounts."""
    monkeypatch.setenv("READINGS_DB", str(tmp_path / "readings.db"))
    path = Path(__file__).resolve().parent.parent / "pipelines" / f"{example}.yaml"
    local = run_pipeline(path, start_method="forkserver", log_level="error")
    monkeypatch.setenv("READINGS_DB", str(tmp_path / "readings-ray.db"))
    ray = ray_run(path, log_level="error")
    assert ray.exit_code == local.exit_code == 0, (ray.error, local.error)
    assert {k: Counter(map(repr, v)) for k, v in ray.collected.items()} == {
        k: Counter(map(repr, v)) for k, v in local.collected.items()}
    assert stats_of(ray) == stats_of(local)
    assert ray.queues == local.queues and all(q["balanced"] for q in ray.queues.values())
    assert {n: s.routed for n, s in ray.stats.items()} == {n: s.routed for n, s in local.stats.items()}
