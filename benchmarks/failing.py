"""A failing stage stays cheap: N items through a 2-process pool where one item in 10 raises, under
``on_error: skip``, against the same run where none fails.

    .venv/bin/python benchmarks/failing.py                 # 1,000,000 items, 3 runs each, medians
    .venv/bin/python benchmarks/failing.py --items 200000 --runs 1 --log-file

Each run is ``mprun FILE --no-progress`` as a whole process, stderr read to the end (as a terminal or a CI
log would), timed from start to exit, the two pipelines interleaved. Printed: median and fastest seconds of
each, their ratio (target: at most 2; on a machine shared with other work the fastest runs are the steadier
figure), and the stderr lines of the failing run (its skipped items summarised after the first few per place).
``--log-file``: the failing run also writes every record to a log file, whose lines are counted too.
"""

from __future__ import annotations

import argparse
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


def run(path: Path, log_file: Path | None) -> tuple[float, int, int]:
    """Seconds, stderr lines and log-file lines of one ``mprun`` run."""
    args = [MPRUN, str(path), "--no-progress"] + (["--log-file", str(log_file)] if log_file else [])
    t0 = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"mprun failed ({done.returncode}):\n{done.stderr[-2000:]}")
    logged = len(log_file.read_text().splitlines()) if log_file else 0
    return seconds, len(done.stderr.splitlines()), logged


def main() -> None:
    """Time both pipelines, interleaved, and print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--log-file", action="store_true", help="the failing run also writes a log file")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "tasks.py").write_text((BENCH / "tasks.py").read_text())
        clean, failing = folder / "clean.yaml", folder / "failing.yaml"
        clean.write_text(PIPELINE.format(items=ns.items, every=0))
        failing.write_text(PIPELINE.format(items=ns.items, every=10))
        log_file = folder / "run.log" if ns.log_file else None
        for path in (clean, failing):
            run(path, None)  # the plan in the cache, the bytecode compiled: the timed runs are warm
        times: dict[str, list[float]] = {"clean": [], "failing": []}
        lines = logged = 0
        for _ in range(ns.runs):
            times["clean"].append(run(clean, None)[0])
            seconds, lines, logged = run(failing, log_file)
            times["failing"].append(seconds)
    base, slow = statistics.median(times["clean"]), statistics.median(times["failing"])
    fastest = min(times["clean"]), min(times["failing"])
    print(f"items: {ns.items:,}, 10% failing under on_error: skip, runs: {ns.runs} (median; fastest in brackets)")
    print(f"no failures:  {base:.2f} s [{fastest[0]:.2f}]")
    print(f"10% failing:  {slow:.2f} s [{fastest[1]:.2f}]   ratio {slow / base:.2f}x [{fastest[1] / fastest[0]:.2f}x]"
          f"   stderr lines {lines:,}" + (f"   log-file lines {logged:,}" if log_file else ""))


if __name__ == "__main__":
    main()
