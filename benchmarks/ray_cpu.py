"""CPU seconds the Ray backend's driver and queue hub spend per 1M items (W1) and per GiB of items (W4).

    .venv/bin/python benchmarks/ray_cpu.py                        # this checkout, 3 runs of each
    .venv/bin/python benchmarks/ray_cpu.py --before /tmp/before   # and another checkout of mprun, as "before"
    .venv/bin/python benchmarks/ray_cpu.py --w1 200000 --w4 64 --runs 5    # W1 2,000,000 and W4 512 by default

With ``--before DIR`` (e.g. ``git worktree add /tmp/before ff5cbfd``) the same runs are made with the code of
DIR (its ``runner`` and ``schemas`` first on ``PYTHONPATH``, inherited by the Ray instance and so by every
actor) and both are printed in one table.  Needs the ray extra.

Each checkout is measured in a process of its own that starts a local Ray instance (this machine's CPUs),
makes one small untimed run, then the runs of W1 (``benchmarks/w1_pool.yaml``: a range doubled by a
2-process pool into a summing sink) and W4 (``benchmarks/w4_blobs.yaml``: 1 MiB items rebuilt by a
2-process pool) interleaved, each with ``run_pipeline(..., backend="ray", limit=N)``, and a run of W1
with 1,000 items: what any run costs (actors started and stopped, records relayed).  Per run:

- driver: user + system CPU of that process (``os.times``) across the run: the driver's threads, Ray's
  core worker threads in it included, less the thread watching the hub;
- hub: user + system CPU of the hub actor's process (``/proc/PID/stat``, the process whose command line
  names ``_Hub``), sampled every 20 ms from its first sighting to its last (Ray may hand the hub a worker
  process that started earlier: what it spent before being the hub is not counted).

Every run must exit 0 with the sink's ``items_in`` equal to N, or the benchmark stops.  Figures are medians.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TICK = os.sysconf("SC_CLK_TCK")
WORKLOADS = {"W1": BENCH / "w1_pool.yaml", "W4": BENCH / "w4_blobs.yaml"}
BLOB = 1 << 20  # bytes of a W4 item


def _cpu(pid: int) -> float | None:
    """User + system seconds of a process, or None once it is gone."""
    try:
        fields = Path("/proc", str(pid), "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


class HubWatch:
    """Samples the CPU time of the hub actor of this Ray instance (its processes carry ``token``)."""

    def __init__(self, token: str) -> None:
        self.needle = f"MPRUN_BENCH_TOKEN={token}".encode()
        self.first: float | None = None
        self.last: float | None = None
        self.own = 0.0  # CPU seconds of this watching thread (in the driver's process: not the driver's)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _find(self) -> int | None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmdline = Path("/proc", entry, "cmdline").read_bytes()
                if b"_Hub" in cmdline and self.needle in Path("/proc", entry, "environ").read_bytes().split(b"\0"):
                    return int(entry)
            except OSError:
                continue
        return None

    def _watch(self) -> None:
        pid = None
        while not self.done.wait(0.02):
            pid = pid or self._find()
            cpu = _cpu(pid) if pid else None
            if cpu is None:
                pid = None
                continue
            if self.first is None:
                self.first = cpu
            self.last = cpu
        self.own = time.thread_time()

    def seconds(self) -> tuple[float, float]:
        """(the hub's CPU seconds seen, this thread's own); after the run (its hub is killed at its end)."""
        self.done.set()
        self.thread.join()
        return (self.last or 0.0) - (self.first or 0.0), self.own


def measure(args: argparse.Namespace) -> None:
    """In a process of its own: start Ray, run every workload ``runs`` times, print the samples as JSON."""
    import ray

    from runner import run_pipeline

    token = uuid.uuid4().hex
    os.environ["MPRUN_BENCH_TOKEN"] = token  # inherited by the Ray instance's processes, the hub among them
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    samples: dict[str, list[dict[str, float]]] = {"W1": [], "W4": [], "fixed": []}
    try:
        run_pipeline(WORKLOADS["W1"], backend="ray", limit=1000)  # untimed: imports, actor start-up paths
        for _ in range(args.runs):
            for key, path, n in (("W1", WORKLOADS["W1"], args.w1), ("W4", WORKLOADS["W4"], args.w4),
                                 ("fixed", WORKLOADS["W1"], 1000)):
                watch = HubWatch(token)
                t0, wall0 = os.times(), time.perf_counter()
                result = run_pipeline(path, backend="ray", limit=n)
                t1, wall = os.times(), time.perf_counter() - wall0
                hub, watching = watch.seconds()
                if result.exit_code != 0 or result.stats["sink"].items_in != n:
                    taken = result.stats["sink"].items_in
                    sys.exit(f"{path}: exit {result.exit_code}, sink took {taken} of {n}: {result.error}")
                driver = (t1.user - t0.user) + (t1.system - t0.system) - watching
                samples[key].append({"driver": driver, "hub": hub, "wall": wall, "n": n})
    finally:
        ray.shutdown()
    print(json.dumps(samples))


def run_checkout(code: Path, args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    """The samples of the code in ``code`` (its runner/ and schemas/ first on the path)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), str(BENCH)])}
    cmd = [sys.executable, __file__, "--measure", "--runs", str(args.runs), "--w1", str(args.w1), "--w4", str(args.w4)]
    proc = subprocess.run(cmd, env=env, cwd=code, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{code}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--w1", type=int, default=2_000_000, help="W1 items per run")
    parser.add_argument("--w4", type=int, default=512, help="W4 items (1 MiB each) per run")
    parser.add_argument("--before", type=Path, help="a checkout of mprun to measure as well, as 'before'")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args)
        return
    import ray

    checkouts = [("before", args.before.resolve())] if args.before else []
    checkouts.append(("after" if args.before else "this checkout", ROOT))
    header = ("workload", "code", "items", "driver CPU s", "hub CPU s", "wall s", "driver + hub per unit")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, code in checkouts:
        samples = run_checkout(code, args)
        for key, runs in samples.items():
            n = int(runs[0]["n"])
            driver, hub, wall = (statistics.median(r[k] for r in runs) for k in ("driver", "hub", "wall"))
            if key == "fixed":
                per = "(the cost of any run)"
            else:
                units = n / 1e6 if key == "W1" else n * BLOB / (1 << 30)
                unit = "1M items" if key == "W1" else "GiB"
                per = f"{driver / units:.2f} + {hub / units:.2f} s per {unit}"
            lines.append(f"| {key} | {label} | {n:,} | {driver:.2f} | {hub:.2f} | {wall:.2f} | {per} |")
    print(f"ray {ray.__version__}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, medians of {args.runs} runs")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
