"""What a run ends with, whatever ran it: ``RunResult`` and per-stage ``StageStats``.

Every backend (``runner.backends``) fills the same fields, so the summary, ``--metrics-json``
(``runner.metrics``) and the tests read one shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runner.metrics import Latency
from runner.topology import Topology


@dataclass
class StageStats:
    """Counts and timing of one stage."""

    items_in: int = 0
    items_out: int = 0
    delivered: int = 0  # items whose call succeeded (consumer, pool)
    skipped: int = 0
    retried: int = 0
    failed: int = 0  # failed attempts: exceptions, timeouts, deaths
    dead_lettered: int = 0
    restarts: int = 0
    seconds: float = 0.0
    busy_seconds: float = 0.0
    processes: int = 0
    kind: str = ""
    latency: Latency = field(default_factory=Latency)  # sampled per-item call times (consumer, pool)
    routed: dict[str, int] = field(default_factory=dict)  # a stage with routes: outputs sent to each queue

    @property
    def items_per_second(self) -> float:
        """Items handled per second of the stage's wall time."""
        items = max(self.items_in, self.items_out)
        return items / self.seconds if self.seconds > 0 else 0.0

    @property
    def settled(self) -> int:
        """Items of a consumer or pool stage whose fate is known: delivered, skipped or dead-lettered."""
        return self.delivered + self.skipped + self.dead_lettered


@dataclass
class RunResult:
    """What a run ended with: ``exit_code``, per-stage ``stats``, and items of ``collect`` sinks."""

    exit_code: int
    stats: dict[str, StageStats] = field(default_factory=dict)
    collected: dict[str, list[Any]] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    exit_codes: dict[str, int | None] = field(default_factory=dict)  # last exit code of each process, by name
    queues: dict[str, dict[str, Any]] = field(default_factory=dict)  # per queue: produced, delivered, balanced
    high_water: dict[str, int] = field(default_factory=dict)  # per queue: most items seen waiting in it
    restarts: dict[str, int] = field(default_factory=dict)  # per process name: times it was replaced
    process_stage: dict[str, str] = field(default_factory=dict)  # per process name: its stage
    log_format: str = "console"  # how stderr records were rendered: the summary follows suit (cli)


def new_stats(topo: Topology) -> dict[str, StageStats]:
    """Empty ``StageStats`` for every stage of ``topo``."""
    return {s.name: StageStats(processes=s.processes, kind=s.kind) for s in topo.stages}


def queue_accounts(topo: Topology, stats: dict[str, StageStats]) -> dict[str, dict[str, Any]]:
    """Per queue: items put by its writers (outputs, those of its route for a stage with named routes, and dead
    letters) and items taken by its readers."""
    accounts = {}
    for name in topo.queues:
        produced = sum(stats[s.name].routed.get(name, 0) if s.routes else stats[s.name].items_out
                       for s in topo.stages if name in s.outputs)
        produced += sum(stats[s.name].dead_lettered for s in topo.stages if s.dead_letter == name)
        delivered = sum(stats[s.name].items_in for s in topo.stages if name in s.inputs)
        accounts[name] = {"produced": produced, "delivered": delivered, "left": max(0, produced - delivered),
                          "balanced": produced == delivered}
    return accounts
