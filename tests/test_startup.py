"""Start-up and exit of the ``mprun`` command: its forkserver is a fork of the command (runner.zygote), it falls
back to multiprocessing's own when it cannot fork one, and a run's output survives the quick exit."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.conftest import ROOT, run_cli

TASKS = '''
import os
from pathlib import Path

def _cmdline(pid):
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\\0")[:-1]

def _parent(pid):
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

def lineage(x):
    server = os.getppid()
    return {"server": _cmdline(server), "server_parent": _cmdline(_parent(server))}

def triple(x):
    return 3 * x

def fail_on_7(x):
    if x == 7:
        raise ValueError("seven")
    return x
'''


def test_the_forkserver_of_the_command_is_forked_from_it(tmp_pipeline):
    """A worker's parent (the forkserver) runs the ``mprun`` command line, as does that one's parent: it was
    forked from the command, not started as ``python -c 'from multiprocessing.forkserver import main'``."""
    path = tmp_pipeline("""version: 1
settings: {start_method: forkserver}
stages:
  - {name: src, kind: producer, source: {items: [1, 2]}, output: a}
  - {name: who, kind: pool, processes: 2, input: a, function: "tasks_t:lineage", output: b}
  - {name: out, kind: consumer, input: b, function: collect}
""", TASKS)
    result = run_cli(str(path), "--no-summary")
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert len(seen) == 2
    for found in seen:
        assert found["server"] == found["server_parent"], found
        assert str(path) in found["server"] and "-c" not in found["server"], found


def test_forkserver_is_started_the_usual_way_while_a_thread_runs():
    """With a second thread alive, forking is unsafe: ``zygote.start`` declines and leaves multiprocessing's
    forkserver unstarted, so the command falls back to ``forkserver.ensure_running``."""
    code = textwrap.dedent("""
        import threading
        from multiprocessing import forkserver
        from runner import zygote

        stop = threading.Event()
        thread = threading.Thread(target=stop.wait)
        thread.start()
        try:
            print(zygote.start(["runner.worker"]), forkserver._forkserver._forkserver_pid)
        finally:
            stop.set()
            thread.join()
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "None"]


def test_output_logs_and_metrics_are_complete_after_the_quick_exit(tmp_pipeline, tmp_path):
    """The command ends without the interpreter's teardown after a run: stdout (far more than a pipe holds),
    the log file (each process's exit, logged last) and the metrics file are still complete, and a failed
    run still exits 1."""
    path = tmp_pipeline("""version: 1
settings: {log_level: info}
stages:
  - {name: src, kind: producer, source: {range: {stop: 30000}}, output: a}
  - {name: calc, kind: pool, processes: 2, input: a, function: "tasks_t:triple", output: b}
  - {name: out, kind: consumer, input: b, function: collect}
""", TASKS)
    log_file, metrics = tmp_path / "log.jsonl", tmp_path / "metrics.json"
    result = run_cli(str(path), "--log-file", str(log_file), "--metrics-json", str(metrics))
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(result.stdout)) == [3 * i for i in range(30000)]
    exited = [r for r in map(json.loads, log_file.read_text().splitlines()) if r["event"] == "process exited"]
    assert sorted(r["stage"] for r in exited) == ["calc", "calc", "out", "src"]
    assert json.loads(metrics.read_text())["stages"]["out"]["items_in"] == 30000
    assert "out" in result.stderr  # the summary table

    failing = run_cli(str(path), "--no-summary", "--set", "stages.calc.function=tasks_t:fail_on_7")
    assert failing.returncode == 1 and "seven" in failing.stderr


PRELOAD_TASKS = '''
import sys

PRELOADED = "structlog" in sys.modules  # before this module's own import: did the forkserver have it?

if "{uses}" == "yes":
    import structlog

def preloaded(x):
    return PRELOADED
'''


def test_the_forkserver_preloads_structlog_once_a_run_showed_the_stage_code_imports_it(tmp_pipeline):
    """The import check notes whether the functions' modules import structlog and the plan's cache keeps it:
    the next run's forkserver preloads structlog for them, and never for code that does not use it."""
    for uses, expected in (("yes", [[False, False], [True, True]]), ("no", [[False, False], [False, False]])):
        path = tmp_pipeline(f"""version: 1
name: preload_{uses}
settings: {{start_method: forkserver}}
stages:
  - {{name: src, kind: producer, source: {{items: [1, 2]}}, output: a}}
  - {{name: probe, kind: pool, processes: 2, input: a, function: "tasks_t:preloaded", output: b}}
  - {{name: out, kind: consumer, input: b, function: collect}}
""", PRELOAD_TASKS.replace("{uses}", uses), name=f"{uses}.yaml")
        seen = []
        for _ in expected:
            result = run_cli(str(path), "--no-summary")
            assert result.returncode == 0, result.stderr
            seen.append(json.loads(result.stdout))
        assert seen == expected, uses


def test_validate_checks_imports_in_a_forkserver_forked_from_the_command(tmp_pipeline, marks):
    """``mprun validate`` starts the forkserver as ``run`` does: the import check's parent runs the command."""
    tasks = '''
import os
from pathlib import Path

Path(os.environ["MARKS"], "server").write_bytes(Path(f"/proc/{os.getppid()}/cmdline").read_bytes())

def work(x):
    return x
'''
    path = tmp_pipeline("""version: 1
stages:
  - {name: src, kind: producer, source: {items: [1]}, output: a}
  - {name: work, kind: consumer, input: a, function: "tasks_t:work"}
""", tasks)
    result = run_cli("validate", str(path))
    assert result.returncode == 0 and result.stdout.strip() == f"ok {path}", result.stderr
    server = (marks / "server").read_bytes().decode().split("\0")[:-1]
    assert server[-2:] == ["validate", str(path)], server
