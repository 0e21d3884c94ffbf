"""What users write instead of mprun, one function per contender; run as ``python contenders.py NAME N``.

Every contender doubles ``range(N)`` with 2 worker processes and sums the results in the parent, then
prints ``sum=S count=C`` so that ``run.py`` can check the answer.  ``tasks.double`` is the work.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tasks import blobs, burn, double, rebuild, wait

WORKERS = 2


def imap1000(n: int) -> tuple[int, int]:
    """``Pool(2).imap(f, it, chunksize=1000)``."""
    with mp.Pool(WORKERS) as pool:
        return _total(pool.imap(double, range(n), chunksize=1000))


def imap1(n: int) -> tuple[int, int]:
    """``Pool(2).imap(f, it, chunksize=1)``."""
    with mp.Pool(WORKERS) as pool:
        return _total(pool.imap(double, range(n), chunksize=1))


def executor1000(n: int) -> tuple[int, int]:
    """``ProcessPoolExecutor(2).map(f, it, chunksize=1000)``."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(WORKERS) as ex:
        return _total(ex.map(double, range(n), chunksize=1000))


def mpire(n: int) -> tuple[int, int]:
    """mpire ``WorkerPool(2).map`` (default chunk size)."""
    from mpire import WorkerPool

    with WorkerPool(WORKERS) as pool:
        return _total(pool.map(double, range(n)))


def pypeln(n: int) -> tuple[int, int]:
    """pypeln ``pl.process.map(f, it, workers=2)``."""
    import pypeln as pl

    return _total(pl.process.map(double, range(n), workers=WORKERS))


def _tutorial_producer(n: int, out: mp.Queue) -> None:
    for i in range(n):
        out.put(i)
    for _ in range(WORKERS):
        out.put(None)


def _tutorial_worker(inq: mp.Queue, out: mp.Queue) -> None:
    while (item := inq.get()) is not None:
        out.put(double(item))
    out.put(None)


def tutorial(n: int) -> tuple[int, int]:
    """The tutorial style: Process objects, one ``Queue.put`` per item, a ``None`` sentinel per worker."""
    numbers: mp.Queue = mp.Queue(10_000)
    results: mp.Queue = mp.Queue(10_000)
    procs = [mp.Process(target=_tutorial_producer, args=(n, numbers))]
    procs += [mp.Process(target=_tutorial_worker, args=(numbers, results)) for _ in range(WORKERS)]
    for p in procs:
        p.start()
    total = count = ended = 0
    while ended < WORKERS:
        item = results.get()
        if item is None:
            ended += 1
        else:
            total += item
            count += 1
    for p in procs:
        p.join()
    return total, count


def serial(n: int) -> tuple[int, int]:
    """One process, no parallelism: ``sum(map(f, range(N)))``."""
    return _total(map(double, range(n)))


def serial_burn(n: int) -> tuple[int, int]:
    """W2 reference: ``n`` calls of ``tasks.burn`` (~6 ms each) in a plain loop."""
    return _total(map(burn, range(n)))


def pool_burn(n: int) -> tuple[int, int]:
    """W2 as a hand-written pool would do it: ``Pool(2).imap_unordered(burn, it)`` (chunksize 1, fork)."""
    with mp.Pool(WORKERS) as pool:
        return _total(pool.imap_unordered(burn, range(n)))


def imap1_blobs(n: int) -> tuple[int, int]:
    """W4 by hand: ``Pool(2).imap(rebuild, blobs, chunksize=1)`` over ``n`` items of 1 MiB; sums their indices."""
    with mp.Pool(WORKERS) as pool:
        return _total(int.from_bytes(r[:8], "big") for r in pool.imap(rebuild, blobs(n), chunksize=1))


def executor100_wait(n: int) -> tuple[int, int]:
    """W5 by hand: ``ThreadPoolExecutor(100).map(wait, range(n))`` (20 ms of waiting per call)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(100) as pool:
        return _total(pool.map(wait, range(n)))


def _count_lines(lines: list[str]) -> dict[str, int]:
    from collections import Counter

    counts: Counter[str] = Counter()
    for line in lines:
        counts.update(line.split())
    return counts


def imap_wordcount(n: int) -> tuple[int, int]:
    """W6 by hand: the file's lines in chunks of 10,000 through ``Pool(2).imap_unordered``, Counters merged here.
    ``n``: megabytes of the text file (``tasks.text``, in benchmarks/results/)."""
    import itertools
    from collections import Counter

    path = Path(__file__).resolve().parent / "results" / "w6_text.txt"
    total: Counter[str] = Counter()
    with path.open(encoding="utf-8") as f, mp.Pool(WORKERS) as pool:
        chunks = iter(lambda: list(itertools.islice(f, 10_000)), [])
        for counts in pool.imap_unordered(_count_lines, chunks):
            total.update(counts)
    return sum(total.values()), len(total)


def _total(results: object) -> tuple[int, int]:
    total = count = 0
    for r in results:  # type: ignore[attr-defined]
        total += r
        count += 1
    return total, count


if __name__ == "__main__":
    name, n = sys.argv[1], int(sys.argv[2])
    s, c = globals()[name](n)
    print(f"sum={s} count={c}")
