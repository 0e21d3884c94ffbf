"""Local backend against the ray backend on W1 and W2 (the pipelines of benchmarks/run.py), one table.

    .venv/bin/python benchmarks/ray_vs_local.py              # W1 2,000,000 items, W2 400 calls, 3 runs each
    .venv/bin/python benchmarks/ray_vs_local.py --quick      # W1 with 200,000 items
    .venv/bin/python benchmarks/ray_vs_local.py --runs 5

Needs the ray extra (``pip install -e '.[ray]'``).  Three ways to run the same file:

- ``local``: ``mprun FILE`` (multiprocessing), a whole process timed from start to exit;
- ``ray, cold``: ``mprun FILE --backend ray``, a whole process that starts a local Ray instance with this
  machine's CPUs and shuts it down (what a user of one machine sees);
- ``ray, warm``: ``run_pipeline(FILE, backend="ray")`` in this process, connected once to a local Ray
  instance beforehand (what a run on a cluster that is already up costs).

Every run must exit 0 and its sink must have taken every item (checked with ``--metrics-json`` or on the
RunResult), so a run that drops items fails loudly instead of looking fast.  Figures are medians.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MPRUN = str(Path(sys.executable).with_name("mprun"))
WORKLOADS = {
    "W1": ("W1: range -> 2-process pool doubling -> sum", BENCH / "w1_pool.yaml", 2_000_000),
    "W2": ("W2: 400 calls of ~6 ms CPU on a 2-process pool", BENCH / "w2_pool.yaml", 400),
}


def cold(cmd: list[str], items: int) -> float:
    """Wall seconds of one whole ``mprun`` process; checks (--metrics-json) that its sink took ``items`` items."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp, "metrics.json")
        t0 = time.perf_counter()
        proc = subprocess.run(
            [*cmd, "--metrics-json", str(metrics)], capture_output=True, text=True, cwd=ROOT, check=False
        )
        wall = time.perf_counter() - t0
        taken = json.loads(metrics.read_text())["stages"]["sink"]["items_in"] if metrics.exists() else None
    if proc.returncode != 0 or taken != items:
        msg = f"{' '.join(cmd)}: exit {proc.returncode}, sink took {taken} of {items}\n{proc.stderr[-2000:]}"
        raise SystemExit(msg)
    return wall


def warm(path: Path, items: int, limit: int | None) -> float:
    """Wall seconds of ``run_pipeline`` on the ray backend, Ray already connected."""
    from runner import run_pipeline

    t0 = time.perf_counter()
    result = run_pipeline(path, backend="ray", limit=limit)
    wall = time.perf_counter() - t0
    if result.exit_code != 0 or result.stats["sink"].items_in != items:
        raise SystemExit(f"{path}: exit {result.exit_code}, sink took {result.stats['sink'].items_in}: {result.error}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="W1 with 200,000 items")
    args = parser.parse_args()
    import ray

    rows = []
    for key, (title, path, items) in WORKLOADS.items():
        limit = 200_000 if args.quick and key == "W1" else None
        n = limit or items
        extra = ["--limit", str(limit)] if limit else []
        local_cmd = [MPRUN, "run", str(path), "--no-summary", *extra]
        ray_cmd = [*local_cmd, "--backend", "ray"]
        walls: dict[str, list[float]] = {"local": [], "ray, cold": [], "ray, warm": []}
        for _ in range(args.runs):  # interleaved, so a noisy neighbour hits them alike
            walls["local"].append(cold(local_cmd, n))
            walls["ray, cold"].append(cold(ray_cmd, n))
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        try:
            for _ in range(args.runs):
                walls["ray, warm"].append(warm(path, n, limit))
        finally:
            ray.shutdown()
        reference = statistics.median(walls["local"])
        for how, values in walls.items():
            wall = statistics.median(values)
            rows.append((title, how, f"{n:,}", f"{wall:.3f}", f"{n / wall:,.0f}", f"{wall / reference:.2f}x"))
    header = ("workload", "backend", "items", "wall s (median)", "items/s", "vs local")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    print(f"ray {ray.__version__}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {args.runs} runs")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
