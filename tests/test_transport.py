"""Realistic data through the transport: item sizes from 16 B to 8 MiB, results larger and smaller than their
items, text lines, every stage kind and sink, every start method; never a hang, never a lost or doubled item,
memory bounded in bytes (runner/wire.py, runner/queues.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner import wire
from tests.conftest import run_cli

TASKS = '''
import os
from pathlib import Path

def make(n, size):
    """n text items of `size` characters, each starting with its index."""
    pad = "x" * max(0, size - 8)
    for i in range(n):
        yield f"{i:08d}" + pad

def resize(item, factor):
    """A result `factor` times the item's size (at least its index)."""
    return item[:8] + "y" * max(0, int(len(item) * factor) - 8)

def record(item):
    """A user sink: the index of every item it gets, one line each, in a file of this process."""
    with open(Path(os.environ["OUT"]) / f"seen-{os.getpid()}", "a") as f:
        f.write(item[:8] + "\\n")

def lines(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(f"{i:08d}" + "x" * 82 + "\\n")
'''

PIPELINE = """version: 1
settings: {{start_method: {method}, log_level: warning}}
stages:
  - {{name: src, kind: producer, source: {{function: "tasks_t:make"}}, kwargs: {{n: {n}, size: {size}}}, output: a}}
  - {{name: work, kind: {kind}, processes: 2, input: a, output: b, function: "tasks_t:resize",
     kwargs: {{factor: {factor}}}{ordered}}}
  - {{name: sink, kind: consumer, processes: {sink_processes}, input: b, function: {sink}{sink_kwargs}}}
"""

KiB, MiB = 1 << 10, 1 << 20
# (item size, items, kind, result size / item size, sink, start method): every size, kind, sink and start
# method, results 10x larger and 10x smaller; at most ~60 MB of results a case.
CASES = [
    (16, 10000, "consumer", 10, "collect", "fork"),
    (16, 10000, "pool", 0.1, "jsonl", "forkserver"),
    (100, 10000, "ordered", 10, "user", "spawn"),
    (100, 10000, "consumer", 0.1, "jsonl", "forkserver"),
    (64 * KiB, 80, "pool", 10, "user", "fork"),
    (64 * KiB, 400, "ordered", 0.1, "collect", "forkserver"),
    (MiB, 40, "consumer", 0.1, "collect", "spawn"),
    (MiB, 6, "pool", 10, "user", "forkserver"),
    (MiB, 60, "ordered", 0.1, "jsonl", "fork"),
    (8 * MiB, 4, "pool", 0.1, "user", "forkserver"),  # 2 items a worker: one in flight as a result comes back
    (8 * MiB, 4, "consumer", 0.1, "jsonl", "spawn"),
    (8 * MiB, 4, "ordered", 0.1, "collect", "fork"),
]


def _write(tmp_path: Path, size: int, n: int, kind: str, factor: float, sink: str, method: str) -> Path:
    (tmp_path / "tasks_t.py").write_text(TASKS)
    sink_fn = {"collect": "collect", "jsonl": "jsonl", "user": '"tasks_t:record"'}[sink]
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.format(
        method=method, n=n, size=size, kind="pool" if kind == "ordered" else kind, factor=factor,
        ordered=", ordered: true" if kind == "ordered" else "", sink=sink_fn,
        sink_kwargs=", kwargs: {path: out.jsonl}" if sink == "jsonl" else "",
        sink_processes=1 if sink != "user" else 2))
    return path


def _indices(tmp_path: Path, sink: str, stdout: str) -> list[int]:
    """The index of every item the sink got (collect: from stdout; jsonl: the file; user: its files)."""
    if sink == "collect":
        return [int(s[:8]) for s in json.loads(stdout.splitlines()[-1])]
    if sink == "jsonl":
        return [int(json.loads(line)[:8]) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    return [int(line) for f in tmp_path.glob("seen-*") for line in f.read_text().splitlines()]


@pytest.mark.parametrize(("size", "n", "kind", "factor", "sink", "method"), CASES,
                         ids=[f"{c[0]}B-{c[2]}-x{c[3]}-{c[4]}-{c[5]}" for c in CASES])
def test_every_item_arrives_once_at_any_size(tmp_path, size, n, kind, factor, sink, method):
    """Items from 16 B to 8 MiB, results 10x larger or smaller, through a consumer, a pool or an ordered pool
    into collect, jsonl or a user sink: the run ends (it once hung with both ends of a worker's socket
    full), exit 0, and the sink got every item exactly once (in order, for an ordered pool into collect)."""
    path = _write(tmp_path, size, n, kind, factor, sink, method)
    result = run_cli(str(path), "--no-progress", "--no-summary", timeout=90, env={"OUT": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    got = _indices(tmp_path, sink, result.stdout)
    assert sorted(got) == list(range(n))
    if kind == "ordered" and sink == "collect":
        assert got == list(range(n))


def test_text_file_lines_into_one_consumer(tmp_path):
    """100,000 lines of 90 characters from a text file into an identity consumer: the run ends with every line
    (it once hung at 0% CPU, 3 runs of 3)."""
    (tmp_path / "tasks_t.py").write_text(TASKS)
    sys.path.insert(0, str(tmp_path))
    try:
        import tasks_t

        tasks_t.lines(tmp_path / "lines.txt", 100_000)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("tasks_t", None)
    path = tmp_path / "p.yaml"
    path.write_text("""version: 1
stages:
  - {name: src, kind: producer, source: {file: {path: lines.txt}}, output: lines}
  - {name: ident, kind: consumer, input: lines, function: identity, output: out}
  - {name: sink, kind: consumer, input: out, function: jsonl, kwargs: {path: out.jsonl}}
""")
    result = run_cli(str(path), "--no-progress", "--no-summary", timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(int(s[:8]) for s in lines) == list(range(100_000))


@pytest.fixture
def cpu_load():
    """Two processes spinning on the CPU (this machine's two cores) while the test runs."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    yield
    for b in burners:
        b.kill()
        b.wait()


@pytest.mark.parametrize("round_", range(2))
def test_megabyte_items_under_cpu_load(tmp_path, cpu_load, round_):
    """1 MiB items through a 2-process pool whose function builds a new 1 MiB result, with the CPU busy,
    twice (it once hung 4 runs of 6): every item arrives once."""
    path = _write(tmp_path, MiB, 40, "pool", 1, "user", "forkserver")
    result = run_cli(str(path), "--no-progress", "--no-summary", timeout=90, env={"OUT": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(_indices(tmp_path, "user", "")) == list(range(40))


def test_memory_is_bounded_in_bytes(tmp_path):
    """400 items of 1 MiB through a 2-process pool with default settings: no process of the run (the main
    process, producer, workers, sink) goes above 320 MiB resident (it once reached 3.8 GiB in one process).
    Measured as the largest peak RSS among the run's processes, from a fresh parent process."""
    path = _write(tmp_path, MiB, 400, "pool", 1, "user", "forkserver")
    mprun = Path(sys.executable).with_name("mprun")
    probe = (
        "import resource, subprocess, sys\n"
        f"r = subprocess.run([{str(mprun)!r}, {str(path)!r}, '--no-progress', '--no-summary'], capture_output=True, text=True)\n"
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.stderr.write(r.stderr[-2000:])\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OUT": str(tmp_path)})
    code, peak_kib = map(int, done.stdout.split())
    assert code == 0, done.stderr
    assert peak_kib < 320 * 1024, f"a process of the run reached {peak_kib / 1024:.0f} MiB"
    assert sorted(_indices(tmp_path, "user", "")) == list(range(400))


def test_outbox_never_blocks_and_frames_as_connection_does():
    """The runner's side of a task pipe: a message far larger than the pipe is accepted at once (the rest
    waits in the outbox), and the reader, a plain multiprocessing Connection, gets it whole after more
    flushes; the writing thread never blocks."""
    import multiprocessing
    import threading

    r, w = multiprocessing.Pipe(duplex=False)
    outbox = wire.Outbox(w)
    big, small = os.urandom(3 * MiB), b"tail"
    outbox.send(big)  # returns at once: the pipe holds at most a fraction of it
    outbox.send(small)
    assert outbox.pending
    got = []
    reader = threading.Thread(target=lambda: got.extend([r.recv_bytes(), r.recv_bytes()]))
    reader.start()
    poller = wire.Poller()
    while outbox.pending:
        assert poller.wait([], [outbox], 10), "the pipe never became writable"
        outbox.flush()
    reader.join(10)
    assert got == [big, small]
    outbox.close()
    r.close()


def _die_halfway_through_a_record(pipe: wire.RecordPipe) -> None:
    real = os.write
    calls = []

    def write(fd: int, data: bytes) -> int:
        calls.append(real(fd, data))
        if len(calls) == 2:  # two fragments of a record of ~25 written: gone, as under SIGKILL
            os._exit(9)
        return calls[-1]

    os.write = write
    pipe.put_nowait("x" * 100_000)


def test_a_log_writer_dying_mid_record_wedges_nothing():
    """The run's record pipe: a process that dies halfway through writing a large record (a worker SIGKILLed
    while it logs a traceback) leaves no lock held and no half message in the way: the records of every other
    process still arrive, whole. (multiprocessing.Queue lost every later record and stalled each such run by
    the listener's 10 s timeout.)"""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    pipe = wire.RecordPipe(ctx)
    child = ctx.Process(target=_die_halfway_through_a_record, args=(pipe,))
    child.start()
    child.join(10)
    assert child.exitcode == 9
    big = {"record": "y" * 50_000}
    pipe.put_nowait({"after": 1})
    pipe.put_nowait(big)
    pipe.put_nowait(None)
    assert pipe.get() == {"after": 1}
    assert pipe.get() == big
    assert pipe.get() is None
    pipe.close()
