r"""The local backend's driver: start the topology on this machine, watch it, end streams, shut it down.

    producer processes --FifoChannel / LifoChannel--> StageRunner thread (here) --task pipe--> worker processes
                                                             ^                 <--result pipe--
                                                             \--Emitter--> output channels, dead letters
    producer control pipes, runner doorbell, signal pipe --> Supervisor._loop
    every process --log queue--> Listener (here) --> stderr (through the live display, if shown), log_file
    producer counters (shared memory), runner counts --> monitor thread (here): queue depths, live display

Producers write to the shared queues directly. Each consumer or pool stage is read by one StageRunner
thread here (``runner.backends.local.stage``). What a stage may do when, and when a queue ends, is the
shared ``Schedule``; the rules every backend follows are ``runner.backends.driver.Driver``'s.

The supervisor blocks in ``multiprocessing.connection.wait`` (process sentinels, pipes, a doorbell and a
signal pipe); it never polls.  When every stage writing to a queue has finished, it ends that queue (one
marker per reading stage, or closing a LIFO stack), so its readers drain it and stop.

Signals (``children``): the first SIGINT/SIGTERM stops the producers and every runner (chunks in flight
finish, nothing more is handed out, what is queued is left and counted); past ``shutdown_timeout`` every
child is killed; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Any

from runner import logs, wire, worker
from runner.backends.driver import Driver, make_display
from runner.backends.local.children import (
    KILL_GRACE,
    died_message,
    exit_code_of,
    install_signals,
    manager_init,
    restore_signals,
    start_child,
    stop_child,
    stop_signals_blocked,
)
from runner.backends.local.stage import Bell, StageRunner
from runner.errors import RunFailed
from runner.messages import ProducerDone, ProducerFailed
from runner.queues import FifoChannel, ManagerGone
from runner.results import RunResult
from runner.topology import FORKSERVER_PRELOAD, StagePlan, Topology

if TYPE_CHECKING:
    from runner.lifo import StackManager
    from runner.queues import Channel


@dataclass
class _Producer:
    stage: str
    name: str
    process: Any
    conn: Any
    done: bool = False


class Supervisor(Driver):
    """Runs one ``Topology`` on this machine with multiprocessing."""

    def __init__(self, topology: Topology, *, progress: bool = False) -> None:
        super().__init__(topology)
        self.progress = progress
        self.ctx: Any = multiprocessing.get_context(topology.start_method)
        if topology.start_method == "forkserver":
            concurrent = any(s.concurrency > 1 for s in topology.stages)
            self.ctx.set_forkserver_preload([*FORKSERVER_PRELOAD, *(["runner.calls"] if concurrent else [])])
        self.pid = os.getpid()
        self.producers: list[_Producer] = []
        self.manager: StackManager | None = None
        self.channels: dict[str, Channel] = {}
        self.locks: dict[str, Any] = {}
        self.signal_at = 0.0  # when the first signal came (time.monotonic)
        self.killing = False  # past the shutdown timeout: every child is killed
        self.counters: dict[str, list[Any]] = {s.name: [] for s in topology.stages}  # producer items sent, live
        self._bell = Bell()  # runners ring it when they finish or go idle

    # -- the run ---------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Start, supervise and shut down the whole topology."""
        t0 = time.perf_counter()
        # Records from every process of the run (log records made plain data); read by the listener.
        self.log_queue = wire.RecordPipe(self.ctx)
        display = make_display(self.topo, self.progress)
        widths = (max(len(s.name) for s in self.topo.stages),
                  max(len(n) for s in self.topo.stages for n in s.process_names))
        listener = logs.start_listener(self.log_queue, self.topo.log_level, self.topo.log_format, self.topo.log_file,
                                       stream=display.stream if display else None,
                                       widths=(max(widths[0], 1), widths[1]))
        saved = logs.logging_state()
        logs.configure(self.log_queue, self.topo.log_level, stage="-", process="MainProcess")
        sig_r, sig_w = os.pipe()
        os.set_blocking(sig_w, False)
        previous = install_signals(self, sig_w)
        monitor = None
        try:
            with self.ending():
                self._setup()
                monitor = self.start_monitor(display)
                self._loop(sig_r)
        finally:
            restore_signals(previous)
            self._shutdown()
            os.close(sig_r)
            os.close(sig_w)
            self._bell.close()
            self.stop_monitor(monitor)
            listener.stop()
            logs.close_handlers(listener)
            if display is not None:
                display.stop(self.snapshot())
            # The run is over: never let interpreter exit wait on a queue nobody reads any more.
            self.log_queue.cancel_join_thread()
            logs.restore_logging(saved)
        return self.result(0, time.perf_counter() - t0)

    def producer_sent(self, stage: StagePlan) -> int:
        return sum(int(c[0]) for c in self.counters[stage.name])

    def _setup(self) -> None:
        if self.topo.start_method == "fork":
            worker.prepare_fork()
        for plan in self.topo.queues.values():
            if plan.type == "lifo":
                from runner.lifo import LifoChannel, StackManager

                if self.manager is None:
                    # Serves the LIFO stacks of this run; private socket, random key, shut down with the run.
                    manager = StackManager(authkey=os.urandom(32), ctx=self.ctx)
                    with stop_signals_blocked():
                        manager.start(manager_init, (self.pid,))
                    self.manager = manager
                self.channels[plan.name] = LifoChannel(self.manager, plan)
            else:
                self.channels[plan.name] = FifoChannel(self.ctx, plan)
        # One lock per name, held around each call of the stages that name it.
        self.locks = {name: self.ctx.Lock() for name in self.topo.locks}

    def _loop(self, sig_r: int) -> None:
        self.advance()
        while not self.schedule.all_done():
            waitables: list[Any] = [sig_r, self._bell.r]
            if self.manager is not None:
                waitables.append(self.manager.process.sentinel)
            for p in self.producers:
                if not p.done:
                    waitables += [p.process.sentinel] + ([p.conn] if p.conn is not None else [])
            ready = wait(waitables, self.schedule.time_left())
            if self.schedule.stopping and not self.schedule.time_left():
                self.log.warning("shutdown timeout passed: killing what is left", timeout=self.topo.shutdown_timeout)
                self._kill_all()
                raise RunFailed(f"stopped by {signal.Signals(self.signal_received).name}")
            for r in ready:
                if r == sig_r:
                    os.read(sig_r, 64)
                    if self.signal_received:  # a write from anywhere else is not a signal
                        self.begin_stop()
                elif r == self._bell.r:
                    self._bell.clear()
                elif self.manager is not None and r == self.manager.process.sentinel:
                    self.failure = self._manager_died()
                else:
                    self._producer_ready(r)
            self.check_runners()
            if self.failure:
                if self.manager is not None and "LIFO queue" in self.failure:  # a consequence: name the cause
                    self.manager.process.join(KILL_GRACE)
                    if self.manager.process.exitcode is not None:
                        self.failure = self._manager_died()
                raise RunFailed(self.failure)
            self.advance()

    def _manager_died(self) -> str:
        assert self.manager is not None
        code = exit_code_of(self.manager.process)
        why = died_message("-", "manager", code).split(": ", 1)[1].replace("process manager ", "", 1)
        return f"the manager process serving the LIFO queues {why}; the run cannot go on without it"

    def stop_producers(self) -> None:
        for p in self.producers:
            if not p.done:
                stop_child(p.process)

    def stage_ended(self, stage: StagePlan) -> bool:
        runner = self.runners.get(stage.name)
        return runner.finished if runner else all(p.done for p in self.producers if p.stage == stage.name)

    def end_queue(self, name: str) -> None:
        with contextlib.suppress(ManagerGone):  # reported as the manager's death
            self.channels[name].end(self.topo.queues[name].reader_processes)

    def _producer_ready(self, ready: Any) -> None:
        for p in self.producers:
            if p.done:
                continue
            if p.conn is ready:
                self._drain(p)
            elif p.process.sentinel == ready:
                self._drain(p)
                code = exit_code_of(p.process)
                p.done = True
                self.exit_codes[p.name] = code
                self.log.info("process exited", stage=p.stage, process=p.name, pid=p.process.pid, exitcode=code)
                expected = code == 0 or (self.signal_received and code in (143, -signal.SIGTERM))
                if not expected and not self.failure:
                    self.failure = died_message(p.stage, p.name, code)

    def _drain(self, p: _Producer) -> None:
        if p.conn is None:
            return
        try:
            while p.conn.poll():
                message = p.conn.recv()
                if isinstance(message, ProducerDone):
                    self.stats[message.stage].items_out += message.sent
                    self.stats[message.stage].busy_seconds += message.seconds
                elif isinstance(message, ProducerFailed) and not self.failure:
                    self.failure = f"stage {message.stage!r} (process {message.process}) failed: {message.summary}"
        except (EOFError, OSError):
            p.conn = None

    def start_stage(self, stage: StagePlan) -> None:
        outputs = [self.channels[q] for q in stage.outputs]
        if stage.kind != "producer":
            runner = StageRunner(self, stage, outputs)
            self.runners[stage.name] = runner
            runner.start()
            return
        for index, name in enumerate(stage.process_names):
            reader, writer = self.ctx.Pipe(duplex=False)
            counter = self.ctx.RawArray("q", 1)  # items this producer has sent, written per batch
            self.counters[stage.name].append(counter)
            spec = worker.ProcessSpec(
                stage=stage,
                name=name,
                index=index,
                base_dir=self.topo.base_dir,
                log_queue=self.log_queue,
                log_level=self.topo.log_level,
                parent_pid=self.pid,
                ctl=writer,
                outputs=outputs,
                limit=self.topo.limit,
                id_names=self.id_names,
                counter=counter,
            )
            process = self.ctx.Process(target=worker.producer_main, args=(spec,), name=name, daemon=stage.daemon)
            start_child(process)
            writer.close()
            self.producers.append(_Producer(stage.name, name, process, reader))

    def ring(self) -> None:
        """Wake the supervisor loop (called by runner threads)."""
        self._bell.ring()

    # -- the end ---------------------------------------------------------------------------------------

    def _kill_all(self) -> None:
        """The shutdown timeout has passed: SIGKILL every child, whatever it is doing."""
        self.killing = True
        for runner in self.runners.values():
            runner.abort(kill=True)
            for w in list(runner.workers):
                w.process.kill()
        for p in self.producers:
            if not p.done:
                p.process.kill()
        if self.manager is not None:
            self.manager.process.kill()

    def _shutdown(self) -> None:
        """Stop whatever still runs (daemon stages at a normal end; everything after a failure). Every wait
        here is bounded: a child that does not stop when asked is killed."""
        for runner in self.runners.values():
            runner.abort(kill=self.killing)
        alive = [p for p in self.producers if not p.done]
        for p in alive:
            (p.process.kill if self.killing else functools.partial(stop_child, p.process))()
        for runner in self.runners.values():
            runner.thread.join(2 * KILL_GRACE + 1)
        deadline = time.monotonic() + KILL_GRACE
        for p in alive:
            p.process.join(max(0.0, deadline - time.monotonic()))
            if p.process.is_alive():
                p.process.kill()
                p.process.join(KILL_GRACE)
            self._drain(p)
            p.done = True
            self.exit_codes[p.name] = p.process.exitcode
            self.log.info("process exited", stage=p.stage, process=p.name, pid=p.process.pid,
                          exitcode=p.process.exitcode)
        self.close_stats()
        if self.manager is not None:
            self.manager.shutdown()
        for channel in self.channels.values():
            channel.close()
