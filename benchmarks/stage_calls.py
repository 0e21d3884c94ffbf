"""What the worker's call paths cost, in one process (``runner.worker.run_items``; no queues, no processes).

    .venv/bin/python benchmarks/stage_calls.py              # 3 runs each, medians
    .venv/bin/python benchmarks/stage_calls.py --runs 5

Printed, per case: median seconds and items (calls) per second.
- ``plain``: 200,000 items of ``identity`` in chunks of 4,096 (the tight loop every simple stage runs);
- ``batch 100``: the same items, a list of 100 per call (``run_units``);
- ``routes``: the same items through ``run_units`` with a ``default`` route;
- ``sleep 20 ms``: 200 calls of ``time.sleep(0.02)``, serially (one call per item, ~4 s), with
  ``concurrency: 50`` in threads, and ``asyncio.sleep(0.02)`` with ``concurrency: 50`` on the event loop
  (target: both near 200 / 50 * 0.02 = 0.08 s plus the loop's cost).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from runner import worker
from runner.topology import StagePlan


class _Log:
    def first(self, key: object) -> bool:
        return False

    def __getattr__(self, level: str):  # warning, error...: dropped
        return lambda event, **fields: None


def _stage(**fields: object) -> StagePlan:
    return StagePlan("bench", "pool", ("bench",), inputs=("a",), outputs=("b",), **fields)  # type: ignore[arg-type]


def _run(fn, stage: StagePlan, items: list, chunk: int) -> float:
    progress = [0] * worker.PROGRESS_SLOTS
    t0 = time.perf_counter()
    for start in range(0, len(items), chunk):
        worker.run_items(fn, stage, 0, items[start : start + chunk], None, None, progress, _Log())
    return time.perf_counter() - t0


def _sleep(n: int) -> int:
    time.sleep(0.02)
    return n


async def _asleep(n: int) -> int:
    await asyncio.sleep(0.02)
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    many, few = list(range(200_000)), list(range(200))
    cases = [
        ("plain", lambda item: item, _stage(), many, 4096),
        ("batch 100", lambda items: items, _stage(batch=100), many, 4096),
        ("routes", lambda item: item, _stage(routes={"default": "b"}), many, 4096),
        ("sleep 20 ms, serial", _sleep, _stage(), few, 200),
        ("sleep 20 ms, 50 threads", _sleep, _stage(concurrency=50), few, 200),
        ("sleep 20 ms, 50 async", _asleep, _stage(concurrency=50), few, 200),
    ]
    for name, fn, stage, items, chunk in cases:
        runs = [_run(fn, stage, items, chunk) for _ in range(args.runs if "serial" not in name else 1)]
        seconds = statistics.median(runs)
        print(f"{name:26} {seconds:8.3f} s {len(items) / seconds:14,.0f} items/s")


if __name__ == "__main__":
    main()
