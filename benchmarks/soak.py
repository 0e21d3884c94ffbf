"""Soak: random pipelines with realistic data, random signals, for N minutes; every run checked.

    .venv/bin/python benchmarks/soak.py --minutes 10 [--seed 1] [--keep]

Each run draws a topology (a consumer, pool or ordered pool stage, 1-3 processes, some with 4 or 16 concurrent
calls each, FIFO or LIFO queue, an optional second stage), items (small ints, text lines, dicts, bytes from
100 B to 2 MiB), results 0.1x to 3x their items, a sink (jsonl or a user function writing one file per
process), a start method, a failure policy (every 97th item raises under ``on_error: skip``), and an event:
none, a SIGINT or SIGTERM to the process group after a random delay, or a SIGKILL of one worker (``on_error:
retry``). Then it checks:

- hangs: the run must end within its time limit (killed and counted otherwise);
- exit code: 0 (or 130/143 after a signal);
- lost and duplicated items: at exit 0 the sink saw every index exactly once, but the skipped ones; after a
  signal no index twice, and as many as the metrics say the sink delivered;
- leftovers: no process of the run alive after it ends.

Prints one line per failing run and a last line of totals; exits 1 if any run failed. Not part of CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import wait_gone  # noqa: E402 - importable once ROOT is on the path

MPRUN = str(Path(sys.executable).with_name("mprun"))

TASKS = '''
import os, time
from pathlib import Path

def make(n, shape, size):
    for i in range(n):
        if shape == "int":
            yield i
        elif shape == "line":
            yield f"{i:08d}" + "x" * size
        elif shape == "dict":
            yield {"i": i, "text": "y" * size, "tags": ["a", "b"], "value": i * 0.5}
        else:
            yield i.to_bytes(8, "big") + bytes(size)

def index(item):
    if isinstance(item, int):
        return item
    if isinstance(item, str):
        return int(item[:8])
    if isinstance(item, dict):
        return item["i"]
    return int.from_bytes(item[:8], "big")

def work(item, factor, fail, pause):
    i = index(item)
    if fail and i % 97 == 0:
        raise ValueError(i)
    if pause:
        time.sleep(pause)
    if isinstance(item, int):
        return item
    if isinstance(item, str):
        return item[:8] + "z" * int(len(item) * factor)
    if isinstance(item, dict):
        return {**item, "text": "z" * int(len(item["text"]) * factor)}
    return item[:8] + bytes(int(len(item) * factor))

def sink(item):
    with open(Path(os.environ["OUT"]) / f"seen-{os.getpid()}", "a") as f:
        f.write(f"{index(item)}\\n")

def jsonl_index(item):
    return index(item)
'''


def draw(rng: random.Random) -> dict:
    """One random run."""
    shape = rng.choice(["int", "line", "dict", "bytes"])
    size = {"int": 0, "line": rng.choice([10, 90, 200]), "dict": rng.choice([20, 200]),
            "bytes": rng.choice([100, 64 << 10, 1 << 20, 2 << 20])}[shape]
    n = max(5, min(20000, (40 << 20) // max(size, 64)))
    event = rng.choices(["none", "SIGINT", "SIGTERM", "kill-worker"], [5, 2, 2, 2])[0]
    return {
        "shape": shape, "size": size, "n": rng.randint(n // 4, n), "kind": rng.choice(["consumer", "pool", "ordered"]),
        "processes": rng.randint(1, 3), "queue": rng.choice(["fifo", "fifo", "lifo"]),
        "factor": rng.choice([0.1, 1, 3]), "sink": rng.choice(["user", "jsonl"]),
        "method": rng.choice(["fork", "forkserver", "spawn"]), "fail": rng.random() < 0.3 and event != "kill-worker",
        "second": rng.random() < 0.4, "event": event, "delay": rng.uniform(0.2, 2.0),
        "pause": 0.002 if event != "none" else 0.0, "concurrency": rng.choice([1, 1, 4, 16]),
    }


def pipeline(r: dict) -> str:
    policy = "on_error: retry, retry_backoff: 0" if r["event"] == "kill-worker" else "on_error: skip"
    kind = "pool" if r["kind"] == "ordered" else r["kind"]
    ordered = ", ordered: true" if r["kind"] == "ordered" else ""
    ordered += f", concurrency: {r['concurrency']}" if r.get("concurrency", 1) > 1 else ""
    work = (f'  - {{name: work, kind: {kind}, processes: {r["processes"]}, input: a, output: b{ordered}, '
            f'function: "soak_tasks:work", kwargs: {{factor: {r["factor"]}, fail: {str(r["fail"]).lower()}, '
            f'pause: {r["pause"]}}}, {policy}}}\n')
    second = ('  - {name: again, kind: consumer, processes: 2, input: b, output: c, function: identity}\n'
              if r["second"] else "")
    last = "c" if r["second"] else "b"
    if r["sink"] == "user":
        sink = f'  - {{name: sink, kind: consumer, processes: 2, input: {last}, function: "soak_tasks:sink"}}\n'
    else:
        sink = (f'  - {{name: idx, kind: consumer, input: {last}, output: d, function: "soak_tasks:jsonl_index"}}\n'
                '  - {name: sink, kind: consumer, input: d, function: jsonl, kwargs: {path: out.jsonl}}\n')
    return (f"version: 1\nsettings: {{start_method: {r['method']}, log_level: warning, shutdown_timeout: 10}}\n"
            f"queues: {{a: {{type: {r['queue']}}}}}\nstages:\n"
            f'  - {{name: src, kind: producer, source: {{function: "soak_tasks:make"}}, '
            f'kwargs: {{n: {r["n"]}, shape: {r["shape"]}, size: {r["size"]}}}, output: a}}\n' + work + second + sink)


def seen(folder: Path, r: dict) -> Counter[int]:
    if r["sink"] == "user":
        return Counter(int(line) for f in folder.glob("seen-*") for line in f.read_text().splitlines())
    out = folder / "out.jsonl"
    return Counter(json.loads(line) for line in out.read_text().splitlines()) if out.exists() else Counter()


def py_stacks(pid: int, folder: Path) -> None:
    """Write the Python stacks of ``pid`` and its descendants into ``folder`` (py-spy, when installed)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return
    pids = subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True, check=False).stdout.split()
    with (folder / "stacks.txt").open("w") as out:
        for each in pids:
            out.write(f"== {each}\n")
            out.flush()
            subprocess.run([spy, "dump", "--pid", each], stdout=out, stderr=subprocess.STDOUT, check=False, timeout=30)


def one_run(r: dict, limit: float, keep: bool) -> str | None:
    """Run ``r``; None if every check holds, else what went wrong."""
    folder = Path(tempfile.mkdtemp(prefix="soak-"))
    (folder / "soak_tasks.py").write_text(TASKS)
    (folder / "p.yaml").write_text(pipeline(r))
    token = uuid.uuid4().hex
    env = {**os.environ, "OUT": str(folder), "MPRUN_TEST_TOKEN": token}
    cmd = [MPRUN, str(folder / "p.yaml"), "--no-progress", "--metrics-json", str(folder / "m.json"),
           "--log-file", str(folder / "log.jsonl"), "--log-level", "info"]
    proc = subprocess.Popen(cmd, env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    problem = None
    try:
        if r["event"] in ("SIGINT", "SIGTERM"):
            try:
                proc.wait(r["delay"])
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, getattr(signal, r["event"]))
        elif r["event"] == "kill-worker":
            time.sleep(r["delay"])
            log = folder / "log.jsonl"
            records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
            workers = [
                rec["pid"] for rec in records if rec.get("stage") == "work" and rec["event"] == "process started"
            ]
            if workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(random.choice(workers), signal.SIGKILL)
        try:
            _, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            py_stacks(proc.pid, folder)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            problem = f"HANG after {limit:.0f}s"
            return f"{problem} [{folder}]"
        code = proc.returncode
        signalled = r["event"] in ("SIGINT", "SIGTERM") and code in (130, 143)
        # On a loaded machine the signal may come while the interpreter starts, before mprun's first line
        # runs (and any Python program dies of it then): nothing was started, no log file opened.
        signalled |= r["event"] in ("SIGINT", "SIGTERM") and code == -getattr(signal, r["event"]) and not (
            folder / "log.jsonl").exists()
        got = seen(folder, r)
        twice = [i for i, c in got.items() if c > 1]
        if code != 0 and not signalled:
            problem = f"exit {code}: {err.strip().splitlines()[-1:] if err.strip() else ''}"
        elif twice:
            problem = f"DUPLICATED {len(twice)} items, e.g. {twice[:5]}"
        elif code == 0:
            expected = {i for i in range(r["n"]) if not (r["fail"] and i % 97 == 0)}
            lost = expected - set(got)
            if lost or set(got) - expected:
                problem = f"LOST {len(lost)} items, e.g. {sorted(lost)[:5]}"
        elif not (folder / "m.json").exists():  # signalled before the run began (while loading the file)
            if got:
                problem = f"after {r['event']} before the run: {sum(got.values())} items seen, no report"
        else:
            delivered = json.loads((folder / "m.json").read_text())["stages"]["sink"]["delivered"]
            if delivered != sum(got.values()):
                problem = f"after {r['event']}: the sink delivered {delivered} by its count, {sum(got.values())} seen"
    finally:
        left = wait_gone(token, deadline=5)
        if left:
            problem = (problem + "; " if problem else "") + f"LEFTOVER processes {left}"
            for pid in left:
                os.kill(pid, signal.SIGKILL)
        if not keep and problem is None:
            subprocess.run(["rm", "-rf", str(folder)], check=False)
    return None if problem is None else f"{problem} [{folder}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--limit", type=float, default=90.0, help="seconds a run may take before it is a hang")
    parser.add_argument("--keep", action="store_true", help="keep the folders of runs that passed too")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    end = time.monotonic() + args.minutes * 60
    runs, failed, kinds = 0, Counter(), Counter()
    while time.monotonic() < end:
        r = draw(rng)
        problem = one_run(r, args.limit, args.keep)
        runs += 1
        kinds[r["event"]] += 1
        if problem:
            failed[problem.split()[0]] += 1
            print(f"run {runs}: {problem}\n  {json.dumps(r)}", flush=True)
    print(f"seed {seed}: {runs} runs ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}); "
          f"hangs {failed['HANG']}, lost {failed['LOST']}, duplicated {failed['DUPLICATED']}, "
          f"leftovers {failed['LEFTOVER']}, "
          f"other failures {sum(failed.values()) - sum(failed[k] for k in ('HANG', 'LOST', 'DUPLICATED', 'LEFTOVER'))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
