"""What every backend's driver (the part of a run in the main process) does the same way.

    Driver.advance: stages that ended -> Schedule.finish; queues whose writers are all done -> end_queue;
                    stages that may start -> start_stage
    Driver.begin_stop: the first SIGINT/SIGTERM -> producers stopped, every stage runner told to stop
    Driver.snapshot / queue_depth: live counts for the display and the high-water marks
    Driver.result: the RunResult, with the same fields on every backend

A backend subclasses it and says how to start a stage, tell that it ended, end a queue, count what a
producer has sent so far and stop the producers (``runner.backends.local.driver``,
``runner.backends.ray.driver``). Its stage runners (``runner.backends.stage.StageRunnerCore``) give it
``finished``, ``error``, ``emitted``, ``sent_to(queue)``, ``dead_emitter``, ``stop()``, ``in_hand()`` and
``idle()``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

from runner import logs
from runner.backends.scheduler import Schedule
from runner.errors import RunFailed
from runner.results import RunResult, new_stats, queue_accounts
from runner.topology import StagePlan, Topology

MONITOR_TICK = 0.05  # seconds between samples of the queue depths
DISPLAY_EVERY = 4  # monitor ticks between two frames of the live display


class Driver:
    """The shared state and rules of a run's driver; subclasses supply the processes."""

    def __init__(self, topology: Topology) -> None:
        self.topo = topology
        self.schedule = Schedule(topology)
        self.log = logs.get_logger("mprun")
        self.stats = new_stats(topology)
        self.collected: dict[str, list[Any]] = {s.name: [] for s in topology.stages if s.function == "collect"}
        self.exit_codes: dict[str, int | None] = {}
        self.restarts: dict[str, int] = {}
        self.high_water: dict[str, int] = dict.fromkeys(topology.queues, 0)
        self.runners: dict[str, Any] = {}
        self.failure: str | None = None
        self.signal_received = 0
        self.id_names = tuple(s.name for s in topology.stages if s.kind == "producer")  # how items are numbered
        self._writers = {q: [s for s in topology.stages if q in s.outputs] for q in topology.queues}
        self._dead_writers = {q: [s for s in topology.stages if s.dead_letter == q] for q in topology.queues}
        self._readers = {q: [s for s in topology.stages if q in s.inputs] for q in topology.queues}
        self._monitor_stop = threading.Event()

    # -- what a backend supplies -----------------------------------------------------------------------

    def start_stage(self, stage: StagePlan) -> None:
        raise NotImplementedError

    def stage_ended(self, stage: StagePlan) -> bool:
        """All processes of a started stage are gone (a runner: its ``finished``)."""
        raise NotImplementedError

    def end_queue(self, name: str) -> None:
        raise NotImplementedError

    def producer_sent(self, stage: StagePlan) -> int:
        """Items a producer stage has sent so far."""
        raise NotImplementedError

    def stop_producers(self) -> None:
        raise NotImplementedError

    # -- the rules -------------------------------------------------------------------------------------

    def advance(self) -> None:
        """Mark stages that ended, end the queues they were the last writer of, start what may start."""
        for name in self.schedule.unfinished():
            if self.stage_ended(self.topo.stage(name)):
                self.schedule.finish(name)
                self.stats[name].seconds = self.schedule.seconds[name]
        for name in self.schedule.queues_to_end(self.idle):
            self.end_queue(name)
        for stage in self.schedule.startable():
            self.schedule.start(stage.name)
            self.start_stage(stage)

    def idle(self, stage: str) -> bool:
        """A stage that feeds its own input has nothing in flight and its input queue is empty."""
        runner = self.runners.get(stage)
        plan = self.topo.stage(stage)
        return runner is not None and runner.idle() and self.queue_depth(plan.inputs[0]) == 0

    def begin_stop(self) -> None:
        """First SIGINT/SIGTERM: stop producers, hand out nothing more, let chunks in flight finish, then end;
        within shutdown_timeout, after which everything left is stopped at once."""
        self.log.warning("stopping: producers stopped, chunks in flight finishing, queued items left",
                         signal=signal.Signals(self.signal_received).name, shutdown_timeout=self.topo.shutdown_timeout)
        self.schedule.begin_stop(self.topo.shutdown_timeout)
        self.stop_producers()
        for runner in self.runners.values():
            runner.stop()

    @contextlib.contextmanager
    def ending(self) -> Iterator[None]:
        """Around a run's loop: a second signal or a failure ends it, as the run's failure."""
        try:
            yield
        except KeyboardInterrupt:
            self.signal_received = self.signal_received or signal.SIGINT
            self.failure = self.failure or "stopped by SIGINT (second signal: stopped at once)"
        except RunFailed as e:
            self.failure = self.failure or str(e)

    def check_runners(self) -> None:
        """The first error of a stage runner becomes the run's failure."""
        for runner in self.runners.values():
            if runner.error and not self.failure:
                self.failure = runner.error

    def close_stats(self) -> None:
        """Wall time of the stages the shutdown ended."""
        for name in self.schedule.unfinished():
            self.schedule.finish(name)
            self.stats[name].seconds = self.schedule.seconds[name]

    def result(self, exit_code: int, seconds: float) -> RunResult:
        """The run's ``RunResult``; every field filled, whatever the backend."""
        self.sample_queues()
        if self.signal_received:
            exit_code = 128 + self.signal_received
            self.failure = self.failure or f"stopped by {signal.Signals(self.signal_received).name}"
        elif self.failure and not exit_code:
            exit_code = 1
        return RunResult(
            exit_code=exit_code,
            stats=self.stats,
            collected=self.collected,
            error=self.failure,
            seconds=seconds,
            exit_codes=self.exit_codes,
            queues=queue_accounts(self.topo, self.stats),
            high_water=dict(self.high_water),
            restarts=dict(self.restarts),
            process_stage={n: s.name for s in self.topo.stages for n in s.process_names},
            log_format=self.topo.log_format,
        )

    # -- live counts -----------------------------------------------------------------------------------

    def sent(self, stage: StagePlan, queue: str | None = None) -> int:
        """Items the stage has emitted so far (into ``queue``, for a stage with routes)."""
        if stage.kind == "producer":
            return self.producer_sent(stage)
        runner = self.runners.get(stage.name)
        if runner is None:
            st = self.stats[stage.name]
            return st.routed.get(queue, 0) if stage.routes and queue else st.items_out
        return runner.sent_to(queue) if queue else runner.emitted

    def queue_depth(self, name: str) -> int:
        """Items waiting in queue ``name`` now (sent by its writers, not yet taken by its readers); keeps the maximum.

        Called by the monitor thread and by a queue's runner right before it takes a batch (when the
        queue is deepest): a few additions per batch, nothing per item.
        """
        put = sum(self.sent(s, name) for s in self._writers[name])
        for s in self._dead_writers[name]:
            runner = self.runners.get(s.name)
            if runner is not None and runner.dead_emitter is not None:
                put += runner.dead_emitter.sent
        depth = max(0, put - sum(self.stats[s.name].items_in for s in self._readers[name]))
        self.high_water[name] = max(self.high_water[name], depth)
        return depth

    def sample_queues(self) -> dict[str, int]:
        """``queue_depth`` of every queue."""
        return {name: self.queue_depth(name) for name in self.topo.queues}

    def snapshot(self) -> list[dict[str, Any]]:
        """One row per stage for the live display (see ``progress.LiveDisplay.render``)."""
        depths = self.sample_queues()
        rows = []
        for stage in self.topo.stages:
            st = self.stats[stage.name]
            out = self.sent(stage)
            queue = stage.inputs[0] if stage.inputs else None
            finished = out if stage.kind == "producer" else st.settled
            runner = self.runners.get(stage.name)
            if runner is not None:  # items done in chunks still in workers' hands
                finished += runner.in_hand()
            calls = runner.calls() if runner is not None and stage.concurrency > 1 else None
            rows.append({
                "stage": stage.name, "kind": stage.kind, "state": self.schedule.state[stage.name].value,
                "processes": stage.processes, "items_in": st.items_in, "items_out": out, "finished": finished,
                "failed": st.failed, "skipped": st.skipped, "dead_lettered": st.dead_lettered,
                "restarts": st.restarts, "queue": queue, "depth": depths.get(queue, 0) if queue else 0,
                "calls": calls,
            })
        return rows

    def start_monitor(self, display: Any) -> threading.Thread:
        """The monitor thread: samples queue depths (high-water marks) and redraws the live display if shown."""
        thread = threading.Thread(target=self._monitor, args=(display,), name="monitor", daemon=True)
        thread.start()
        return thread

    def stop_monitor(self, thread: threading.Thread | None) -> None:
        self._monitor_stop.set()
        if thread is not None and thread.is_alive():
            thread.join()

    def _monitor(self, display: Any) -> None:
        if display is not None:
            display.start()
        tick = 0
        while not self._monitor_stop.wait(MONITOR_TICK):
            tick += 1
            try:
                if display is not None and tick % DISPLAY_EVERY == 0:
                    display.refresh(self.snapshot())
                else:
                    self.sample_queues()
            except Exception:  # noqa: BLE001 - a racing read while the run ends: the next tick redoes it
                continue


def make_display(topo: Topology, shown: bool) -> Any:
    """The live display of a run on stderr, or None."""
    if not shown:
        return None
    import sys

    from runner.progress import LiveDisplay, plan_of

    return LiveDisplay(sys.stderr, topo.name, plan=plan_of(topo))
