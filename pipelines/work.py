"""Stage code of the "stages for real work" examples: class stages, batches, async calls, routes, a work stack."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from collections.abc import Iterator

import runner


class WordCount:
    """Counts the words of the lines this process gets; gives its counts when the input has ended."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __call__(self, line: str) -> None:
        self.counts.update(line.lower().split())

    def close(self) -> dict[str, int]:
        return dict(self.counts)


class Merge:
    """Adds up the counts of every counting process; gives the totals, most frequent first, at the end."""

    def __init__(self) -> None:
        self.totals: Counter[str] = Counter()

    def __call__(self, counts: dict[str, int]) -> None:
        self.totals.update(counts)

    def close(self) -> dict[str, int]:
        return dict(sorted(self.totals.items(), key=lambda kv: (-kv[1], kv[0])))


class RowWriter:
    """Writes rows to an SQLite table, one transaction per batch; at the end, how many rows it wrote."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, check_same_thread=False)  # calls may come from another thread (Ray)
        self.db.execute("CREATE TABLE IF NOT EXISTS readings (sensor TEXT, value REAL)")
        self.rows = 0

    def __call__(self, rows: list[dict[str, object]]) -> None:
        with self.db:  # one commit for the whole batch
            self.db.executemany("INSERT INTO readings VALUES (:sensor, :value)", rows)
        self.rows += len(rows)

    def close(self) -> dict[str, int]:
        self.db.close()
        return {"rows_written": self.rows}


async def fetch(url: str) -> dict[str, object]:
    """A pretend HTTP request: 20 ms of waiting; URLs with "flaky" in them fail every time."""
    await asyncio.sleep(0.02)
    if "flaky" in url:
        raise ConnectionError(f"connection reset fetching {url}")
    return {"url": url, "status": 200}


def check(record: dict[str, object]) -> runner.Routed:
    """Valid records (a name and a non-negative age) to the `valid` route, the rest to `invalid`."""
    age = record.get("age")
    if record.get("name") and isinstance(age, int) and age >= 0:
        return runner.route("valid", record)
    return runner.route("invalid", {**record, "problem": "needs a name and an age >= 0"})


def expand(node: str) -> Iterator[runner.Routed]:
    """A node of a generated tree ("r", "r.0", "r.1", ...): the node is visited; its children, down to depth 3,
    go back onto the stack."""
    yield runner.route("visited", node)
    if node.count(".") < 3:
        for child in range(2):
            yield runner.route("todo", f"{node}.{child}")
