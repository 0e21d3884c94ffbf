"""The plan of a run over time, with no processes in it: which stage may start, when a queue ends, when the
run is over, and the stop deadline. Every backend's driver asks it; ``tests/test_scheduler.py`` checks it alone.

    Lifecycle of a stage:  WAITING --start--> RUNNING --finish--> DONE
                                                 \\--stop--> STOPPING --finish--> DONE
    (a stage still WAITING when the run stops never starts: it is DONE at once)

A queue ends (its readers drain it, then stop) when every stage writing to it is DONE. A queue a stage
feeds itself (a work queue or stack) ends when every *other* writer is DONE and the backend reports that
the feeding stage is idle: its input queue empty and none of its items in flight.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from runner.topology import StagePlan, Topology


class Lifecycle(enum.Enum):
    """Where a stage is in its run (the live display shows the value)."""

    WAITING = "waiting"
    RUNNING = "running"
    STOPPING = "stopping"
    DONE = "done"


class Schedule:
    """Start order, ends of queues and the stop of one run (``clock``: seconds, monotonic)."""

    def __init__(self, topo: Topology, clock: Callable[[], float] = time.monotonic) -> None:
        self.topo = topo
        self.clock = clock
        self.state = {s.name: Lifecycle.WAITING for s in topo.stages}
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}  # wall time of each stage that is DONE
        self.ended: set[str] = set()  # queues whose end has been sent
        self.stop_deadline: float | None = None
        # Per queue: the stages whose end it waits for, and the stages feeding it as their own input.
        self.self_feeders = {q: tuple(s.name for s in topo.stages if s.self_fed and s.inputs[0] == q)
                             for q in topo.queues}
        self.writers = {q: tuple(w for w in plan.writers if w not in self.self_feeders[q])
                        for q, plan in topo.queues.items()}

    @property
    def stopping(self) -> bool:
        return self.stop_deadline is not None

    def startable(self) -> list[StagePlan]:
        """Stages that may start now: WAITING, every stage of their ``after`` DONE, the run not stopping."""
        if self.stopping:
            return []
        done = self.done
        waiting = [s for s in self.topo.stages if self.state[s.name] is Lifecycle.WAITING]
        return [s for s in waiting if all(a in done for a in s.after)]

    def start(self, name: str) -> None:
        self.state[name] = Lifecycle.RUNNING
        self.started[name] = self.clock()

    def finish(self, name: str) -> None:
        """The stage has ended (all its processes are gone)."""
        if self.state[name] is Lifecycle.DONE:
            return
        self.seconds[name] = self.clock() - self.started.get(name, self.clock())
        self.state[name] = Lifecycle.DONE

    @property
    def done(self) -> set[str]:
        return {name for name, state in self.state.items() if state is Lifecycle.DONE}

    def queues_to_end(self, idle: Callable[[str], bool] = lambda stage: False) -> list[str]:
        """Queues to end now (each once): every writer DONE, and every stage feeding it itself DONE or ``idle``."""
        done = self.done
        ending = []
        for q in self.topo.queues:
            if q in self.ended or not all(w in done for w in self.writers[q]):
                continue
            if all(s in done or idle(s) for s in self.self_feeders[q]):
                self.ended.add(q)
                ending.append(q)
        return ending

    def begin_stop(self, timeout: float) -> None:
        """The run stops: stages not started never will be; running ones are STOPPING until they finish."""
        self.stop_deadline = self.clock() + timeout
        for name, state in self.state.items():
            if state is Lifecycle.WAITING:
                self.started[name] = self.clock()
                self.finish(name)
            elif state is Lifecycle.RUNNING:
                self.state[name] = Lifecycle.STOPPING

    def time_left(self) -> float | None:
        """Seconds until the stop deadline (None: not stopping)."""
        return None if self.stop_deadline is None else max(0.0, self.stop_deadline - self.clock())

    def all_done(self) -> bool:
        """Every stage that is not a daemon is DONE (daemons are stopped by the shutdown)."""
        return all(self.state[s.name] is Lifecycle.DONE for s in self.topo.stages if not s.daemon)

    def unfinished(self) -> list[str]:
        """Stages started and not DONE (the shutdown ends them)."""
        return [n for n, s in self.state.items() if s in (Lifecycle.RUNNING, Lifecycle.STOPPING)]
