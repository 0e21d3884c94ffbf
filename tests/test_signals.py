"""Signals as terminals and CI deliver them: to the whole process group, through `timeout`, Ctrl-C typed into
a pseudo-terminal; children that ignore them or spin in C; the main process killed with SIGKILL."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import processes_with_token, wait_gone

TASKS = '''
import itertools, os, signal, time
from pathlib import Path

MARKS = Path(os.environ["MARKS"])

def slow(x):
    """About 10 ms an item; the first call leaves a mark."""
    (MARKS / "started").touch()
    time.sleep(0.01)
    return x

def stubborn(x):
    """Ignores every signal it can and sleeps: only SIGKILL ends it."""
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    (MARKS / "started").touch()
    time.sleep(600)
    return x

def spin(x):
    """Holds the GIL in C for hours."""
    (MARKS / f"spin-{os.getpid()}").touch()
    return sum(itertools.repeat(1, 10**13))
'''

PIPELINE = """version: 1
settings: {{start_method: {method}, shutdown_timeout: {timeout}, log_level: info}}
stages:
  - {{name: src, kind: producer, source: {{range: {{stop: {n}}}}}, output: a}}
  - {{name: work, kind: {kind}, processes: 2, input: a, output: b, function: "tasks_t:{fn}"}}
  - {{name: sink, kind: consumer, input: b, function: jsonl, kwargs: {{path: out.jsonl}}}}
"""


def _pipeline(tmp_path: Path, fn: str = "slow", *, n: int = 100_000, kind: str = "pool", method: str = "forkserver",
              timeout: float = 60) -> Path:
    (tmp_path / "tasks_t.py").write_text(TASKS)
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.format(fn=fn, n=n, kind=kind, method=method, timeout=timeout))
    return path


def _start(path: Path, marks: Path, *args: str, prefix: tuple[str, ...] = ()) -> tuple[subprocess.Popen[str], str]:
    """mprun in a process group of its own, as a shell or CI runner starts a job; metrics go to metrics.json."""
    token = uuid.uuid4().hex
    env = {**os.environ, "MARKS": str(marks), "MPRUN_TEST_TOKEN": token}
    mprun = Path(sys.executable).with_name("mprun")
    cmd = [*prefix, str(mprun), str(path), "--no-progress", "--metrics-json", str(path.parent / "metrics.json"), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    return proc, token


def _wait_for(path: Path, proc: Any = None, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        assert proc is None or proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.01)


def _left_and_done(tmp_path: Path) -> tuple[dict, int]:
    data = json.loads((tmp_path / "metrics.json").read_text())
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    return data, len(lines)



@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_group_signal_is_one_first_signal(tmp_path, marks, signum, code):
    """SIGINT or SIGTERM to the whole process group (Ctrl-C, CI runners, docker stop): the children leave it
    to the main process, which stops as for one first signal: chunks in flight finish, the queued items are
    left and counted, the message names the signal, exit 130/143, well before shutdown_timeout (60 s), no
    process left. It was once misreported as a second signal, or as a worker that exited with code 255."""
    proc, token = _start(_pipeline(tmp_path), marks)
    _wait_for(marks / "started", proc)
    os.killpg(proc.pid, signum)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=30)
    took = time.monotonic() - t0
    assert proc.returncode == code, err[-3000:]
    name = signal.Signals(signum).name
    assert f"stopped by {name}" in err and "second signal" not in err and "exited with code" not in err, err[-3000:]
    assert took < 10, f"the stop took {took:.1f}s"
    assert wait_gone(token) == []
    data, written = _left_and_done(tmp_path)
    sink = data["stages"]["sink"]
    assert written == sink["delivered"]  # what the sink counts as done is what it wrote
    left = sum(q["left"] for q in data["queues"].values())
    assert left > 0 and "left in queues, not processed" in err
    produced = data["stages"]["src"]["items_out"]
    done = data["stages"]["work"]["delivered"]
    assert data["queues"]["a"]["left"] == produced - data["stages"]["work"]["items_in"]
    assert data["stages"]["work"]["items_in"] == done  # every item the stage kept was finished


def test_timeout_command_around_a_ci_step(tmp_path, marks):
    """`timeout -s TERM` signals its child and then the child's whole group: the same stop delivered twice
    is one stop (exit 143, not 'stopped at once')."""
    proc, token = _start(_pipeline(tmp_path), marks, prefix=("timeout", "--preserve-status", "-s", "TERM", "3"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM" in err and "at once" not in err, err[-3000:]
    assert wait_gone(token) == []


def test_ctrl_c_typed_into_a_terminal(tmp_path, marks):
    """Ctrl-C typed into a real pseudo-terminal (the live display on): exit 130, the display showed the
    run stopping, the summary follows, no process left."""
    path = _pipeline(tmp_path)
    token = uuid.uuid4().hex
    env = {**os.environ, "MARKS": str(marks), "MPRUN_TEST_TOKEN": token, "TERM": "xterm"}
    mprun = str(Path(sys.executable).with_name("mprun"))
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session of its own whose controlling terminal is the pty
        os.execve(mprun, [mprun, str(path)], env)
    output = b""
    deadline = time.monotonic() + 60
    typed = False
    while True:
        assert time.monotonic() < deadline, output[-3000:]
        if not typed and (marks / "started").exists():
            os.write(fd, b"\x03")  # what the terminal sends for Ctrl-C: SIGINT to the foreground group
            typed = True
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    text = output.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 130, text[-3000:]
    assert "stopping" in text and "stopped by SIGINT" in text and "second signal" not in text, text[-3000:]
    assert wait_gone(token) == []


@pytest.mark.parametrize("fn", ["stubborn", "spin"])
def test_children_that_do_not_stop_are_killed_at_the_shutdown_timeout(tmp_path, marks, fn):
    """A call that ignores every signal, or spins in C holding the GIL: after the shutdown timeout (1 s) every
    child is killed and mprun exits 143, with no join that waits for ever and no process left."""
    proc, token = _start(_pipeline(tmp_path, fn, n=10, timeout=1), marks)
    mark = marks / "started" if fn == "stubborn" else None
    if mark is None:
        deadline = time.monotonic() + 30
        while not list(marks.glob("spin-*")):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
    else:
        _wait_for(mark, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err[-3000:]
    assert time.monotonic() - t0 < 10
    assert "shutdown timeout passed" in err
    assert wait_gone(token) == []


@pytest.mark.parametrize("method", ["forkserver", "spawn", "fork"])
def test_kill_9_of_mprun_while_a_worker_holds_the_gil(tmp_path, marks, method):
    """`kill -9` of the main process while its workers spin in C holding the GIL (a watcher thread could
    never run there): the workers, the forkserver and the resource tracker end too (PR_SET_PDEATHSIG)."""
    proc, token = _start(_pipeline(tmp_path, "spin", n=10, method=method), marks)
    deadline = time.monotonic() + 30
    while len(list(marks.glob("spin-*"))) < 2:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)
    assert wait_gone(token, deadline=10) == []


def test_no_process_outlives_a_normal_exit(tmp_path, marks):
    """When mprun exits 0, no process of its tree is still running at that moment (not even the forkserver
    and resource tracker it started): checked at once, without waiting."""
    proc, token = _start(_pipeline(tmp_path, n=20), marks)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert processes_with_token(token) == []



SLOW_IMPORT = """import os, time
from pathlib import Path

(Path(os.environ["MARKS"]) / "importing").touch()
time.sleep(60)

def f(x):
    return x
"""


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_before_the_run_ends_the_command_at_once(tmp_path, marks, signum, code):
    """A group signal while mprun checks the stage functions (their module takes a minute to import) ends the
    command at once: 130/143, one line, no traceback, no process of its tree left (forkserver, import check)."""
    (tmp_path / "slow_t.py").write_text(SLOW_IMPORT)
    path = tmp_path / "p.yaml"
    path.write_text("""version: 1
stages:
  - {name: src, kind: producer, source: {range: {stop: 3}}, output: a}
  - {name: work, kind: consumer, input: a, function: "slow_t:f"}
""")
    proc, token = _start(path, marks)
    _wait_for(marks / "importing", proc)
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err[-3000:]
    assert err.strip() == f"mprun: error: stopped by {signal.Signals(signum).name}", err[-3000:]
    assert wait_gone(token) == []


HOOKED = """
import os, signal, sys
from runner import cli

signal.signal(signal.SIGTERM, cli._interrupted)
os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGTERM))  # lands in a fork hook
if os.fork() == 0:
    os._exit(0)
for _ in range(10**6):  # an exception raised in the hook would be swallowed: the loop would run to its end
    pass
print("signal lost")
"""


def test_a_signal_in_a_fork_hook_is_not_lost():
    """Before a run, a signal that lands where Python swallows exceptions (a fork hook, a weakref callback)
    still ends the command: it is never turned into an exception."""
    done = subprocess.run([sys.executable, "-c", HOOKED], capture_output=True, text=True, timeout=30, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (143, "", "mprun: error: stopped by SIGTERM\n")
