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


def wait(x: int, ms: float = 20.0) -> int:
    """The W5 work: an I/O-bound call, ``ms`` milliseconds of waiting (a fake HTTP request)."""
    time.sleep(ms / 1000)
    return x


def text(path: str, megabytes: int) -> str:
    """W6's input: ``megabytes`` of lines of words (made once, the same every time), at ``path``."""
    import random
    from pathlib import Path

    out = Path(path)
    if out.exists() and out.stat().st_size >= megabytes << 20:
        return path
    rng = random.Random(6)
    vocabulary = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
                  for _ in range(5000)]
    with out.open("w", encoding="utf-8") as f:
        written = 0
        while written < megabytes << 20:
            line = " ".join(rng.choices(vocabulary, k=14)) + "\n"
            f.write(line)
            written += len(line)
    return path


class WordCount:
    """W6's counting stage: each process counts the words of its lines, and gives its counts at the end."""

    def __init__(self) -> None:
        from collections import Counter

        self.counts: Counter[str] = Counter()

    def __call__(self, line: str) -> None:
        self.counts.update(line.split())

    def close(self) -> dict[str, int]:
        return dict(self.counts)


class MergeCounts:
    """W6's merge: adds the counts of every counting process, then prints the total and the distinct words."""

    def __init__(self) -> None:
        from collections import Counter

        self.counts: Counter[str] = Counter()

    def __call__(self, counts: dict[str, int]) -> None:
        self.counts.update(counts)

    def close(self) -> None:
        sys.stdout.write(f"sum={sum(self.counts.values())} count={len(self.counts)}\n")
        sys.stdout.flush()
