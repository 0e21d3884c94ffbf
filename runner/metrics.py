"""The machine-readable report of a run (``--metrics-json PATH``), and the latency histogram behind it.

Schema (every count an integer, every time in seconds; keys are only ever added)::

    {"exit_code": 0, "error": null, "wall_seconds": 1.2, "slowest_stage": "double",
     "stages": {NAME: {"kind", "processes", "items_in", "items_out", "delivered", "skipped", "retried",
                       "failed", "dead_lettered", "restarts", "seconds", "busy_seconds",
                       "busy_per_process", "utilisation", "items_per_second", "balanced",
                       "latency": {"samples", "p50", "p95", "p99", "max", "mean"} | null}},
     "queues": {NAME: {"produced", "delivered", "left", "balanced"}},
     "queue_high_water": {NAME: ITEMS},
     "processes": {NAME: EXIT_CODE},
     "process_stats": {NAME: {"stage", "exit_code", "restarts"}}}

Per stage: ``items_in`` items taken from its input queue; ``items_out`` items emitted; ``delivered``
items whose call succeeded; ``skipped`` / ``dead_lettered`` items given up on by the ``skip`` policy or
sent to the dead-letter queue; ``retried`` / ``failed`` attempts retried / failed (exceptions, timeouts,
dead workers); ``restarts`` worker processes replaced; ``seconds`` wall time from the stage's start to
its end; ``busy_seconds`` time its processes spent calling the function on items (a producer: its
processes' whole lives, waits on full queues included); ``busy_per_process`` that over ``processes``;
``utilisation`` busy seconds over ``seconds * processes`` (1.0: never idle); ``items_per_second``
``max(items_in, items_out) / seconds``.

``latency`` (consumer and pool stages; null for producers or when no item finished): the time one item
kept a worker busy, from the start of its first call to the end of its last (retries and their backoff
included), measured in the worker on a sample: every item of a chunk of up to 8 items, 8 items spread
evenly over a larger chunk (``runner.worker.run_items``).  Percentiles come from a log histogram with
8 buckets per doubling, so each is within 5% of the sampled value (and never outside the smallest and
largest sample); ``max`` is exact for the samples.
It is the call time only: time spent waiting in queues is not in it.

``slowest_stage``: the consumer or pool stage with the most busy seconds per process (the one whose
processes work the most), or null when the run has none.

``queue_high_water``: per queue, the most items seen waiting in it (sent by its writers and not yet
taken by its readers), sampled each time one of its readers takes a batch (when it is deepest), 20
times a second by the supervisor, and at the end; items still in a writer's unsent batch, or in a
batch a writer is blocked putting into a full queue, do not count.  ``processes``: the last exit code of
each process, by name;
``process_stats`` adds its stage and how many times it was restarted (replaced after a death or a
timeout).

``stages[*].balanced``: every item a consumer or pool took in was delivered, skipped or dead-lettered.
``queues[*].balanced``: every item put on the queue was taken by its readers.  A run that exits 0 is
balanced everywhere.  ``queues[*].left``: items put on the queue (or made by a stage for it) that no reader
took: ``produced - delivered``; what a run stopped by SIGINT/SIGTERM left unprocessed, 0 in a run that exits 0.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner.results import RunResult

BUCKETS_PER_DOUBLING = 8
_FLOOR = 1e-9  # seconds: smaller samples count as this


class Latency:
    """A log histogram of per-item seconds: bounded memory, mergeable, percentiles within ~5%."""

    def __init__(self) -> None:
        self.buckets: Counter[int] = Counter()
        self.count = 0
        self.total = 0.0
        self.max = 0.0
        self.min = math.inf

    def add(self, samples: Iterable[float]) -> None:
        """Count some samples (a chunk's: a handful, never one per item)."""
        for sample in samples:
            s = max(sample, _FLOOR)
            self.buckets[math.floor(math.log2(s) * BUCKETS_PER_DOUBLING)] += 1
            self.count += 1
            self.total += s
            self.max = max(self.max, s)
            self.min = min(self.min, s)

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0-100) of the samples: the middle of its bucket, within [min, max]."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        for bucket in sorted(self.buckets):
            seen += self.buckets[bucket]
            if seen >= rank:
                return min(max(2 ** ((bucket + 0.5) / BUCKETS_PER_DOUBLING), self.min), self.max)
        return self.max

    def report(self) -> dict[str, Any] | None:
        """``{"samples", "p50", "p95", "p99", "max", "mean"}`` or None without samples."""
        if not self.count:
            return None
        return {
            "samples": self.count,
            "p50": round(self.percentile(50), 9),
            "p95": round(self.percentile(95), 9),
            "p99": round(self.percentile(99), 9),
            "max": round(self.max, 9),
            "mean": round(self.total / self.count, 9),
        }


def busy_per_process(st: Any) -> float:
    """Busy seconds per process of a stage."""
    return st.busy_seconds / max(st.processes, 1)


def slowest_stage(stats: dict[str, Any]) -> str | None:
    """The consumer or pool stage whose processes are busiest (most busy seconds per process)."""
    workers = {name: busy_per_process(st) for name, st in stats.items() if st.kind != "producer"}
    return max(workers, key=workers.__getitem__) if workers and max(workers.values()) > 0 else None


def utilisation(st: Any) -> float:
    """Busy seconds over the seconds the stage's processes existed (0 when it never ran)."""
    capacity = st.seconds * max(st.processes, 1)
    return st.busy_seconds / capacity if capacity > 0 else 0.0


def metrics(result: RunResult) -> dict[str, Any]:
    """The report of ``result`` as plain data (every backend fills every field of a ``RunResult``)."""
    stages = {}
    for name, st in result.stats.items():
        latency = st.latency
        stages[name] = {
            "kind": st.kind,
            "processes": st.processes,
            "items_in": st.items_in,
            "items_out": st.items_out,
            "delivered": st.delivered,
            "skipped": st.skipped,
            "retried": st.retried,
            "failed": st.failed,
            "dead_lettered": st.dead_lettered,
            "restarts": st.restarts,
            "seconds": round(st.seconds, 6),
            "busy_seconds": round(st.busy_seconds, 6),
            "busy_per_process": round(busy_per_process(st), 6),
            "utilisation": round(utilisation(st), 4),
            "items_per_second": round(st.items_per_second, 3),
            "balanced": st.kind == "producer" or st.items_in == st.delivered + st.skipped + st.dead_lettered,
            "latency": latency.report() if st.kind != "producer" else None,
        }
    restarts, stage_of = result.restarts, result.process_stage
    return {
        "exit_code": result.exit_code,
        "error": result.error,
        "wall_seconds": round(result.seconds, 6),
        "slowest_stage": slowest_stage(result.stats),
        "stages": stages,
        "queues": result.queues,
        "queue_high_water": {name: result.high_water.get(name, 0) for name in result.queues},
        "processes": result.exit_codes,
        "process_stats": {
            name: {"stage": stage_of.get(name), "exit_code": code, "restarts": restarts.get(name, 0)}
            for name, code in result.exit_codes.items()
        },
    }


def write_metrics(result: RunResult, path: str) -> None:
    """Write the report of ``result`` to ``path`` as JSON."""
    Path(path).write_text(json.dumps(metrics(result), indent=2) + "\n", encoding="utf-8")
