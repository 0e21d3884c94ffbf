"""The machine-readable report of a run (``--metrics-json PATH``).

Schema (every count an integer, every time in seconds)::

    {"exit_code": 0, "error": null, "wall_seconds": 1.2,
     "stages": {NAME: {"kind", "processes", "items_in", "items_out", "delivered", "skipped", "retried",
                       "failed", "dead_lettered", "restarts", "seconds", "busy_seconds", "utilisation",
                       "balanced"}},
     "queues": {NAME: {"produced", "delivered", "balanced"}},
     "processes": {NAME: EXIT_CODE}}

``stages[*].balanced``: every item a consumer or pool took in was delivered, skipped or dead-lettered.
``queues[*].balanced``: every item put on the queue was taken by its readers.  A run that exits 0 is
balanced everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def metrics(result: Any) -> dict[str, Any]:
    """The report of ``result`` (a ``RunResult``) as plain data."""
    stages = {}
    for name, st in result.stats.items():
        capacity = st.seconds * max(st.processes, 1)
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
            "utilisation": round(st.busy_seconds / capacity, 4) if capacity > 0 else 0.0,
            "balanced": st.kind == "producer" or st.items_in == st.delivered + st.skipped + st.dead_lettered,
        }
    return {
        "exit_code": result.exit_code,
        "error": result.error,
        "wall_seconds": round(result.seconds, 6),
        "stages": stages,
        "queues": result.queues,
        "processes": result.exit_codes,
    }


def write_metrics(result: Any, path: str) -> None:
    """Write the report of ``result`` to ``path`` as JSON."""
    Path(path).write_text(json.dumps(metrics(result), indent=2) + "\n", encoding="utf-8")
