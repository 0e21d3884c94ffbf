"""The live progress display: drawn under a real pseudo-terminal, never mixed with log lines, off elsewhere."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import sys
import termios
import uuid
from pathlib import Path

from runner.progress import LiveDisplay
from tests.conftest import run_cli, wait_gone

TASKS = '''
import logging, time

def slow(x):
    time.sleep(0.002)
    if x % 10 == 0:
        logging.getLogger("tasks").warning("tenth item %s", x)
    if x % 7 == 0:
        raise ValueError(x)
    return x
'''

PIPELINE = """version: 1
name: watched
settings: {start_method: fork}
stages:
  - {name: numbers, kind: producer, source: {range: {stop: 60}}, output: a}
  - {name: work, kind: pool, processes: 2, input: a, function: "tasks_t:slow", output: b, on_error: skip}
  - {name: sink, kind: consumer, input: b, function: identity}
"""

CLEAR = re.compile(r"\r\x1b\[(\d+)A\x1b\[J")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run_in_pty(*args: str, cwd: Path) -> tuple[int, str]:
    """Run the real ``mprun`` with stdin/stdout/stderr on a new pseudo-terminal; its exit code and output."""
    token = uuid.uuid4().hex
    mprun = str(Path(sys.executable).with_name("mprun"))
    pid, fd = pty.fork()
    if pid == 0:  # the child: becomes mprun, on the terminal
        os.chdir(cwd)
        os.environ["MPRUN_TEST_TOKEN"] = token
        os.environ.pop("NO_COLOR", None)
        os.execv(mprun, [mprun, *args])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the terminal's other side is closed
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert wait_gone(token) == []
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")


def screen(text: str) -> list[str]:
    """What a terminal shows after ``text``: a minimal emulator of what the display and the logs write."""
    lines, row, col = [""], 0, 0
    i = 0
    while i < len(text):
        m = re.compile(r"\x1b\[(\d*)([A-Za-z])").match(text, i)
        if m:
            n, op = int(m.group(1) or 1), m.group(2)
            if op == "A":
                row = max(0, row - n)
            elif op == "J":
                del lines[row + 1 :]
                lines[row] = lines[row][:col]
            i = m.end()
            continue
        ch = text[i]
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append("")
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + ch + line[col + 1 :]
            col += 1
        i += 1
    return lines


def frames(text: str) -> list[str]:
    """Each frame of the block drawn in ``text`` (colours removed)."""
    plain = ANSI.sub("", text)
    return list(re.findall(r"(mprun watched .*?)(?=\r\x1b\[\d+A\x1b\[J)", plain, re.DOTALL))


def test_progress_under_a_pty_shows_every_stage_and_its_counts(tmp_pipeline):
    """On a terminal the display is on by default: frames name every stage, the last one holds the final counts."""
    path = tmp_pipeline(PIPELINE, TASKS)
    code, out = run_in_pty(str(path), cwd=path.parent)
    assert code == 0, out
    drawn = frames(out)
    assert drawn, out
    last = drawn[-1]
    rows = {line.split()[0]: line.split() for line in last.splitlines()[2:]}
    assert set(rows) == {"numbers", "work", "sink"}
    assert rows["numbers"][1:5] == ["done", "1", "-", "60"]  # state, procs, in, out
    skipped = len(range(0, 60, 7))
    assert rows["work"][1:5] == ["done", "2", "60", str(60 - skipped)]
    assert rows["work"][6:10] == [str(skipped), str(skipped), "0", "0"]  # failed, skipped, dead, restarts
    assert rows["sink"][3:5] == [str(60 - skipped)] * 2
    assert "\x1b[" in out  # colours: it is a terminal


def test_log_lines_never_land_inside_the_block(tmp_pipeline):
    """Log records written while the block is shown go above it: the final screen holds whole log lines, the
    summary, and nothing of the block (it is cleared before the summary)."""
    path = tmp_pipeline(PIPELINE, TASKS)
    code, out = run_in_pty(str(path), cwd=path.parent)
    assert code == 0
    shown = [ANSI.sub("", line) for line in screen(out)]
    tenth = [line for line in shown if "tenth item" in line]
    assert len(tenth) == 6  # x = 0, 10, ..., 50: every record whole, on its own line
    assert all(re.match(r"^\d\d:\d\d:\d\d\.\d{3} warning +work +work-\d +tenth item \d+ ", line) for line in tenth)
    assert not any(line.startswith(("mprun watched", "stage     state")) for line in shown)
    assert any(line.startswith("work ") and line.endswith("  *") for line in shown)  # the summary, after the block


def test_no_progress_on_a_terminal_and_none_off_a_terminal(tmp_pipeline):
    """--no-progress turns the display off on a terminal; without a terminal it is off by default."""
    path = tmp_pipeline(PIPELINE, TASKS)
    code, out = run_in_pty(str(path), "--no-progress", cwd=path.parent)
    assert code == 0 and frames(out) == [] and not CLEAR.search(out)
    result = run_cli(str(path))
    assert result.returncode == 0 and "\x1b[" not in result.stderr and "state" not in result.stderr


def test_progress_with_inline_is_a_usage_error(tmp_pipeline):
    """--progress does not apply to --inline (stages run one after another, for pdb): exit 2, one line."""
    path = tmp_pipeline(PIPELINE, TASKS)
    result = run_cli(str(path), "--inline", "--progress")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mprun: error: --inline runs one stage after another in this process (for pdb): --progress does not apply"
    ]


def test_display_clears_writes_and_redraws():
    """LiveDisplay: text written while a block is shown appears above the block, which is drawn again below it."""
    out = io.StringIO()
    display = LiveDisplay(out, "demo", colors=False)
    row = {"stage": "s", "kind": "consumer", "state": "running", "processes": 1, "items_in": 5, "items_out": 4,
           "finished": 4, "failed": 0, "skipped": 1, "dead_lettered": 0, "restarts": 0, "queue": "q", "depth": 3}
    display.start()
    display.refresh([row])
    display.stream.write("a log line\n")
    shown = screen(out.getvalue())
    assert shown[0] == "a log line"
    assert shown[1].startswith("mprun demo") and shown[2].split()[0] == "stage"
    assert shown[3].split() == ["s", "running", "1", "5", "4", "-", "0", "1", "0", "0", "q", "3"]
    display.stop()
    assert [line for line in screen(out.getvalue()) if line] == ["a log line"]


def test_calls_in_flight_column_only_when_a_stage_has_concurrency():
    """A stage with concurrency shows its calls in flight in a column of their own; without one, no column."""
    display = LiveDisplay(io.StringIO(), "demo", colors=False)
    base = {"kind": "consumer", "state": "running", "processes": 2, "items_in": 5, "items_out": 4, "finished": 4,
            "failed": 0, "skipped": 0, "dead_lettered": 0, "restarts": 0, "queue": "q", "depth": 3}
    lines = display.render([{**base, "stage": "fetch", "calls": 37}, {**base, "stage": "sink", "calls": None}])
    assert lines[1].split()[:4] == ["stage", "state", "procs", "calls"]
    assert lines[2].split()[:4] == ["fetch", "running", "2", "37"]
    assert lines[3].split()[:4] == ["sink", "running", "2", "-"]
    plain = display.render([{**base, "stage": "sink"}])
    assert "calls" not in plain[1].split()


CONCURRENT = """version: 1
stages:
  - {name: src, kind: producer, source: {range: {stop: 400}}, output: a}
  - {name: fetch, kind: pool, processes: 2, concurrency: 20, input: a, function: "tasks_t:wait", output: b}
  - {name: sink, kind: consumer, input: b, function: collect}
"""
WAIT_TASKS = "import time\n\ndef wait(x):\n    time.sleep(0.05)\n    return x\n"


def calls_seen_live(sup) -> list[int]:
    """Run the driver ``sup`` of ``CONCURRENT``; the calls in flight of `fetch` its snapshots showed meanwhile."""
    import threading

    seen: list[int] = []
    done = threading.Event()

    def watch():
        while not done.wait(0.02):
            rows = {r["stage"]: r for r in sup.snapshot()} if sup.runners else {}
            if rows.get("fetch", {}).get("calls"):
                seen.append(rows["fetch"]["calls"])

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = sup.run()
    done.set()
    watcher.join(5)
    assert result.exit_code == 0, result.error
    return seen


def test_live_snapshot_counts_the_calls_in_flight_of_a_concurrent_stage(tmp_pipeline):
    """While 2 processes x 20 concurrent calls wait, the driver's snapshot reports calls in flight (> 1)."""
    from runner import plan_run
    from runner.backends.local.driver import Supervisor

    plan = plan_run(tmp_pipeline(CONCURRENT, WAIT_TASKS), start_method="forkserver", log_level="warning")
    seen = calls_seen_live(Supervisor(plan))
    assert seen and max(seen) > 1


def test_percent_and_eta_when_totals_are_known(monkeypatch):
    """With the producers' totals known, each stage shows how far it is and its ETA at its recent rate, and the
    first line the run's (least advanced stage, latest ETA); a stage downstream expects what its writers send;
    a daemon stage (not in the plan) has no share in it."""
    from runner import progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    display = LiveDisplay(io.StringIO(), "demo", colors=False,
                          plan={"numbers": (100, ()), "work": (None, ("numbers",)), "sink": (None, ("work",))})

    def rows(sent, took, waiting, done, sink_done):
        base = {"processes": 1, "failed": 0, "skipped": 0, "dead_lettered": 0, "restarts": 0}
        return [
            {**base, "stage": "numbers", "kind": "producer", "state": "running", "items_in": 0, "items_out": sent,
             "finished": sent, "queue": None, "depth": 0},
            {**base, "stage": "work", "kind": "pool", "state": "running", "items_in": took, "items_out": done,
             "finished": done, "queue": "a", "depth": waiting},
            {**base, "stage": "sink", "kind": "consumer", "state": "running", "items_in": sink_done,
             "items_out": sink_done, "finished": sink_done, "queue": "b", "depth": done - sink_done},
            {**base, "stage": "monitor", "kind": "producer", "state": "running", "items_in": 0,  # a daemon: not planned
             "items_out": 0, "finished": 0, "queue": None, "depth": 0},
        ]

    display.render(rows(30, 20, 10, 15, 5))  # t=100: the first sample of the rates
    now[0] = 101.0
    lines = display.render(rows(50, 40, 10, 25, 10))  # t=101: 20, 10 and 5 items a second
    cells = {line.split()[0]: line.split() for line in lines[2:]}
    assert lines[1].split()[10:12] == ["done", "eta"]
    assert cells["numbers"][10:12] == ["50%", "2.5s"]  # 50 of 100 left at 20/s
    assert cells["work"][10:12] == ["25%", "7.5s"]  # 50 put when its writer is half-way: 100 expected, 75 left at 10/s
    assert cells["sink"][10:12] == ["10%", "18.0s"]  # 25 put, writer at 25%: 100 expected, 90 left at 5/s
    assert cells["monitor"][10:12] == ["-", "-"]
    assert lines[0].endswith("4 of 4 stages running  10%  ETA 18.0s")


def test_progress_shows_percent_done_under_a_pty(tmp_pipeline):
    """A run whose producer's total is known ends with every stage at 100% in the last frame."""
    path = tmp_pipeline(PIPELINE, TASKS)
    code, out = run_in_pty(str(path), cwd=path.parent)
    assert code == 0, out
    last = frames(out)[-1].splitlines()
    assert " 100%  ETA 0.0s" in last[0]
    assert {line.split()[0]: line.split()[10] for line in last[2:]} == {"numbers": "100%", "work": "100%", "sink": "100%"}
