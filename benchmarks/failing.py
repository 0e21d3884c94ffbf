"""A failing stage stays cheap: N items through a 2-process pool where one item in 10 raises, under
``on_error: skip``, against the same run where none fails.

    .venv/bin/python benchmarks/failing.py                 # 1,000,000 items, 3 runs each, medians
    .venv/bin/python benchmarks/failing.py --items 200000 --runs 1 --log-file
    .venv/bin/python benchmarks/failing.py --runs 5 --before /tmp/before   # and another checkout, side by side

Each run is ``mprun FILE --no-progress`` as a whole process, stderr read to the end (as a terminal or a CI
log would), timed from start to exit, the two pipelines interleaved. Printed: median and fastest seconds of
each, their ratio (target: at most 2; on a machine shared with other work the fastest runs are the steadier
figure), the median CPU seconds of all the run's processes (``getrusage`` of the children waited for), and
the stderr lines of the failing run (its skipped items summarised after the first few per place).
``--log-file``: the failing run also writes every record to a log file, whose lines are counted too.
``--before DIR``: the same runs with the code of DIR too (a ``git archive`` or worktree of another commit: its
folder first on ``PYTHONPATH``), all four pipelines interleaved run by run.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
MPRUN = str(Path(sys.executable).with_name("mprun"))
PIPELINE = """\
version: 1
name: failing
stages:
  - name: numbers
    kind: producer
    source: {{range: {{stop: {items}}}}}
    output: numbers
  - name: double
    kind: pool
    processes: 2
    input: numbers
    function: tasks:fail_every
    kwargs: {{every: {every}}}
    on_error: skip
    output: doubled
  - name: sink
    kind: consumer
    input: doubled
    function: tasks:add
"""


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(path: Path, log_file: Path | None, code: Path | None = None) -> tuple[float, float, int, int]:
    """Seconds, CPU seconds, stderr lines and log-file lines of one ``mprun`` run (with the code of ``code``)."""
    args = [MPRUN, str(path), "--no-progress"] + (["--log-file", str(log_file)] if log_file else [])
    env = dict(os.environ, PYTHONPATH=str(code)) if code else None
    cpu, t0 = _cpu(), time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, check=False, env=env)
    seconds, cpu = time.perf_counter() - t0, _cpu() - cpu
    if done.returncode != 0:
        sys.exit(f"mprun failed ({done.returncode}):\n{done.stderr[-2000:]}")
    logged = len(log_file.read_text().splitlines()) if log_file else 0
    return seconds, cpu, len(done.stderr.splitlines()), logged


def main() -> None:
    """Time both pipelines, interleaved, and print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--log-file", action="store_true", help="the failing run also writes a log file")
    parser.add_argument("--before", type=Path, help="a checkout of mprun to time as well, as 'before'")
    ns = parser.parse_args()
    checkouts: list[tuple[str, Path | None]] = [("before", ns.before.resolve())] if ns.before else []
    checkouts.append(("after" if ns.before else "", None))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "tasks.py").write_text((BENCH / "tasks.py").read_text())
        clean, failing = folder / "clean.yaml", folder / "failing.yaml"
        clean.write_text(PIPELINE.format(items=ns.items, every=0))
        failing.write_text(PIPELINE.format(items=ns.items, every=10))
        log_file = folder / "run.log" if ns.log_file else None
        for _, code in checkouts:
            for path in (clean, failing):
                run(path, None, code)  # the plan in the cache, the bytecode compiled: the timed runs are warm
        runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
        lines = dict.fromkeys((label for label, _ in checkouts), 0)
        logged = dict(lines)
        for _ in range(ns.runs):
            for label, code in checkouts:
                seconds, cpu, _, _ = run(clean, None, code)
                runs.setdefault((label, "clean"), []).append((seconds, cpu))
                seconds, cpu, lines[label], logged[label] = run(failing, log_file, code)
                runs.setdefault((label, "failing"), []).append((seconds, cpu))
    print(f"items: {ns.items:,}, 10% failing under on_error: skip, runs: {ns.runs} (median; fastest in brackets)")
    for label, _ in checkouts:
        (base, base_cpu), (slow, slow_cpu) = ((statistics.median(s for s, _ in runs[label, kind]),
                                               statistics.median(c for _, c in runs[label, kind]))
                                              for kind in ("clean", "failing"))
        fastest = min(s for s, _ in runs[label, "clean"]), min(s for s, _ in runs[label, "failing"])
        name = f"{label}: " if label else ""
        print(f"{name}no failures:  {base:.2f} s [{fastest[0]:.2f}]   CPU {base_cpu:.2f} s")
        print(f"{name}10% failing:  {slow:.2f} s [{fastest[1]:.2f}]   CPU {slow_cpu:.2f} s   "
              f"ratio {slow / base:.2f}x [{fastest[1] / fastest[0]:.2f}x], CPU {slow_cpu / base_cpu:.2f}x   "
              f"stderr lines {lines[label]:,}" + (f"   log-file lines {logged[label]:,}" if log_file else ""))


if __name__ == "__main__":
    main()
