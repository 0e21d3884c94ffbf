"""Stage functions of the benchmark pipelines (and of the hand-written contenders in contenders.py)."""

from __future__ import annotations

import os
import sys
import time
from multiprocessing import util

_total = {"sum": 0, "count": 0}


def doubler(number: int, delay: float = 0.0) -> int:
    """W3: pipelines/tasks.py's doubler (double, say which process did it); ``delay`` is 0 there."""
    time.sleep(delay)
    result = number * 2
    sys.stdout.write(f"{number} doubled to {result} by process id: {os.getpid()}\n")
    sys.stdout.flush()
    return result


def double(x: int) -> int:
    """The W1 work: double a small int."""
    return x * 2


def add(x: int) -> None:
    """The W1 sink: add the item to this process's running sum; it is printed when the process exits."""
    _total["sum"] += x
    _total["count"] += 1


def _print_total() -> None:
    sys.stdout.write(f"sum={_total['sum']} count={_total['count']} pid={os.getpid()}\n")
    sys.stdout.flush()


def sink_init() -> None:
    """``init`` of the sink stage: print the sum once the process ends (multiprocessing runs Finalize then)."""
    util.Finalize(None, _print_total, exitpriority=10)


def blobs(stop: int, size: int = 1 << 20) -> object:
    """W4's source: ``stop`` items of ``size`` bytes, each starting with its index."""
    for i in range(stop):
        yield i.to_bytes(8, "big") + bytes(size - 8)


def rebuild(blob: bytes) -> bytes:
    """The W4 work: a new result as large as the item (its index, then zeros)."""
    return blob[:8] + bytes(len(blob) - 8)


def add_index(blob: bytes) -> None:
    """The W4 sink: ``add`` of the item's index."""
    add(int.from_bytes(blob[:8], "big"))


def burn(x: int, ms: float = 6.0) -> int:
    """The W2 work: about ``ms`` milliseconds of pure-Python CPU, calibrated by ``calibrate``."""
    total = 0
    for i in range(int(ms * LOOPS_PER_MS)):
        total += i * i
    return x if total >= 0 else -x  # always x; the loop's result is used so the work is real


LOOPS_PER_MS = int(os.environ.get("MPRUN_BENCH_LOOPS_PER_MS", "25000"))


def fail_every(x: int, every: int = 10) -> int:
    """The failing-stage work: double ``x``, raising ValueError for one item in ``every`` (never when 0)."""
    if every and x % every == 0:
        msg = f"bad item {x}"
        raise ValueError(msg)
    return x * 2
