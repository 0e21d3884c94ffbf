r"""Code that runs IN THE MAIN process: start the topology, watch it, end streams, shut it down.

    producer processes --FifoChannel / LifoChannel--> StageRunner thread (here) --task pipe--> worker processes
                                                             ^                 <--result pipe--
                                                             \--Emitter--> output channels, dead letters
    producer control pipes, runner doorbell, signal pipe --> Supervisor.loop
    every process --log queue--> Listener (here) --> stderr (through the live display, if shown), log_file
    producer counters (shared memory), runner counts --> monitor thread (here): queue depths, live display

Producers write to the shared queues directly. Each consumer or pool stage is read by one StageRunner
thread here, which hands chunks of items to its worker processes over a private task pipe each and reads
their results from a private result pipe each (never blocking on a write: ``runner.wire`` says why that
cannot deadlock), and emits them; so a worker that dies, is killed or hangs never touches a shared queue,
and the runner knows exactly which items it held.

The supervisor blocks in ``multiprocessing.connection.wait`` (process sentinels, pipes, a doorbell and a
signal pipe); it never polls.  When every stage writing to a queue has finished, it ends that queue (one
marker per reading stage, or closing a LIFO stack), so its readers drain it and stop.

Signals: children ignore SIGINT and SIGTERM (a terminal or CI runner signals the whole process group; the
stop is this process's to run) and are asked to stop with ``worker.STOP_SIGNAL``. The first signal stops the
producers and every runner (``StageRunner.stop``: chunks in flight finish, nothing more is handed out, what
is queued is left and counted); past ``shutdown_timeout`` every child is killed; every wait is bounded.

A monitor thread wakes 20 times a second: it samples each queue's depth in items (what its writers sent
minus what its readers took: producers publish their count per batch in shared memory, runner threads
count here) for the high-water marks, and 5 times a second redraws the live display (runner.progress).
"""

from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner import logs, wire, worker
from runner.errors import RunFailed
from runner.metrics import Latency
from runner.queues import Cancelled, Emitter, FifoChannel, IdRuns, ManagerGone
from runner.topology import BATCH_BYTES, FORKSERVER_PRELOAD, MAX_BATCH, StagePlan, Topology

if TYPE_CHECKING:
    from runner.lifo import StackManager
    from runner.queues import Channel

TIMEOUT_POLL = 0.05  # seconds between looks at a timed stage's worker whose call has not started yet
KILL_GRACE = 2.0  # seconds a terminated process gets to unwind before it is killed
FETCH_BYTES = 4 << 20  # a stage runner reads its input while fewer bytes than this (or a chunk per worker) wait
SIGNAL_GAP = 1.0  # seconds within which a second SIGINT/SIGTERM is the same stop delivered twice
DEPTH = 2  # chunks in flight per worker (one once items are known to be slow: see StageRunner._depth)
SLOW_ITEM = 0.001  # seconds per item from which a chunk's round trip to the runner no longer shows
CHUNK_SECONDS = 0.05  # work a chunk should hold, once a stage's time per item is known
FIRST_CHUNK = 8  # items in a stage's chunks until then
MONITOR_TICK = 0.05  # seconds between samples of the queue depths
DISPLAY_EVERY = 4  # monitor ticks between two frames of the live display


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

    @property
    def items_per_second(self) -> float:
        """Items handled per second of the stage's wall time."""
        items = max(self.items_in, self.items_out)
        return items / self.seconds if self.seconds > 0 else 0.0


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


def queue_accounts(topo: Topology, stats: dict[str, StageStats]) -> dict[str, dict[str, Any]]:
    """Per queue: items put by its writers (outputs and dead letters) and items taken by its readers."""
    accounts = {}
    for name in topo.queues:
        produced = sum(stats[s.name].items_out for s in topo.stages if name in s.outputs)
        produced += sum(stats[s.name].dead_lettered for s in topo.stages if s.dead_letter == name)
        delivered = sum(stats[s.name].items_in for s in topo.stages if name in s.inputs)
        accounts[name] = {"produced": produced, "delivered": delivered, "left": max(0, produced - delivered),
                          "balanced": produced == delivered}
    return accounts


class _Bell:
    """A self-pipe that threads ring to wake a ``wait``; safe to ring after it is closed.

    Ringing after ``close`` is a no-op: an abandoned thread could otherwise write into the same
    descriptor number, reused by the next run.
    """

    def __init__(self) -> None:
        self.r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._lock = threading.Lock()
        self._closed = False

    def ring(self) -> None:
        with self._lock:
            if not self._closed:
                with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
                    os.write(self._w, b"!")

    def clear(self) -> None:
        """Take the pending rings (call once ``wait`` said ``r`` is ready)."""
        os.read(self.r, 4096)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            os.close(self.r)
            os.close(self._w)


class _StageFailed(Exception):
    """A stage cannot go on; the message names the stage and says why."""


class _Signalled(Exception):
    def __init__(self, signum: int) -> None:
        self.signum = signum


@dataclass
class _Producer:
    stage: str
    name: str
    process: Any
    conn: Any
    done: bool = False


class Supervisor:
    """Runs one ``Topology`` on this machine with multiprocessing."""

    def __init__(self, topology: Topology, *, progress: bool = False) -> None:
        self.topo = topology
        self.progress = progress
        self.ctx = multiprocessing.get_context(topology.start_method)
        if topology.start_method == "forkserver":
            self.ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
        self.log = logs.get_logger("mprun")
        self.pid = os.getpid()
        self.stats = {s.name: StageStats(processes=s.processes, kind=s.kind) for s in topology.stages}
        self.collected: dict[str, list[Any]] = {s.name: [] for s in topology.stages if s.function == "collect"}
        self.exit_codes: dict[str, int | None] = {}
        self.producers: list[_Producer] = []
        self.runners: dict[str, StageRunner] = {}
        self.started: dict[str, float] = {}
        self.finished: set[str] = set()
        self.ended_queues: set[str] = set()
        self.failure: str | None = None
        self.manager: StackManager | None = None
        self.channels: dict[str, Channel] = {}
        self.locks: dict[str, Any] = {}
        self.signal_received = 0
        self.signal_at = 0.0  # when the first signal came (time.monotonic)
        self.stop_deadline: float | None = None
        self.killing = False  # past the shutdown timeout: every child is killed
        self.id_names = tuple(s.name for s in topology.stages if s.kind == "producer")  # how items are numbered
        self.counters: dict[str, list[Any]] = {s.name: [] for s in topology.stages}  # producer items sent, live
        self.restarts: dict[str, int] = {}
        self.high_water: dict[str, int] = dict.fromkeys(topology.queues, 0)
        self._monitor_stop = threading.Event()
        self._writers = {q: [s for s in topology.stages if q in s.outputs] for q in topology.queues}
        self._dead_writers = {q: [s for s in topology.stages if s.dead_letter == q] for q in topology.queues}
        self._readers = {q: [s for s in topology.stages if q in s.inputs] for q in topology.queues}
        self._bell = _Bell()  # runners ring it when they finish

    # -- the run ---------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Start, supervise and shut down the whole topology."""
        t0 = time.perf_counter()
        # Records from every process of the run (log records made plain data); read by the listener.
        self.log_queue = wire.RecordPipe(self.ctx)
        display = None
        if self.progress:
            import sys

            from runner.progress import LiveDisplay, plan_of

            display = LiveDisplay(sys.stderr, self.topo.name, plan=plan_of(self.topo))
        widths = (max(len(s.name) for s in self.topo.stages),
                  max(len(n) for s in self.topo.stages for n in s.process_names))
        listener = logs.start_listener(self.log_queue, self.topo.log_level, self.topo.log_format, self.topo.log_file,
                                       stream=display.stream if display else None, widths=(max(widths[0], 1), widths[1]))
        monitor = threading.Thread(target=self._monitor, args=(display,), name="monitor", daemon=True)
        saved = logging_state()
        logs.configure(self.log_queue, self.topo.log_level, stage="-", process="MainProcess")
        sig_r, sig_w = os.pipe()
        os.set_blocking(sig_w, False)
        previous = _install_signals(self, sig_w)
        exit_code = 0
        try:
            self._setup()
            monitor.start()
            self._loop(sig_r)
        except _Signalled as e:
            self.failure = self.failure or f"stopped by {signal.Signals(e.signum).name}"
        except KeyboardInterrupt:
            self.signal_received = self.signal_received or signal.SIGINT
            self.failure = self.failure or "stopped by SIGINT (second signal: stopped at once)"
        except RunFailed as e:
            self.failure = str(e)
        finally:
            _restore_signals(previous)
            self._shutdown()
            if self.signal_received:
                exit_code = 128 + self.signal_received
                self.failure = self.failure or f"stopped by {signal.Signals(self.signal_received).name}"
            elif self.failure:
                exit_code = 1
            os.close(sig_r)
            os.close(sig_w)
            self._bell.close()
            self._monitor_stop.set()
            if monitor.is_alive():
                monitor.join()
            listener.stop()
            logs.close_handlers(listener)
            if display is not None:
                display.stop(self.snapshot())
            # The run is over: never let interpreter exit wait on a queue nobody reads any more.
            self.log_queue.cancel_join_thread()
            restore_logging(saved)
        self._sample_queues()
        return RunResult(
            exit_code,
            self.stats,
            self.collected,
            self.failure,
            time.perf_counter() - t0,
            self.exit_codes,
            queue_accounts(self.topo, self.stats),
            dict(self.high_water),
            dict(self.restarts),
            {n: s.name for s in self.topo.stages for n in s.process_names},
        )

    # -- live counts: the monitor thread ---------------------------------------------------------------

    def _monitor(self, display: Any) -> None:
        """Sample queue depths (high-water marks) and, if shown, redraw the live display; never fails the run."""
        if display is not None:
            display.start()
        tick = 0
        while not self._monitor_stop.wait(MONITOR_TICK):
            tick += 1
            try:
                if display is not None and tick % DISPLAY_EVERY == 0:
                    display.refresh(self.snapshot())
                else:
                    self._sample_queues()
            except Exception:  # noqa: BLE001, S112 - a racing read while the run ends: the next tick redoes it
                continue

    def _sent(self, stage: StagePlan) -> int:
        """Items the stage has emitted so far (producers: their shared counters; others: their emitter)."""
        if stage.kind == "producer":
            return sum(int(c[0]) for c in self.counters[stage.name])
        runner = self.runners.get(stage.name)
        return runner.emitter.sent if runner is not None else self.stats[stage.name].items_out

    def queue_depth(self, name: str) -> int:
        """Items waiting in queue ``name`` now (sent by its writers, not yet taken by its readers); keeps the maximum.

        Called by the monitor thread and by a queue's runner right before it takes a batch (when the
        queue is deepest): a few additions per batch, nothing per item.
        """
        put = sum(self._sent(s) for s in self._writers[name])
        for s in self._dead_writers[name]:
            runner = self.runners.get(s.name)
            if runner is not None and runner.dead_emitter is not None:
                put += runner.dead_emitter.sent
        depth = max(0, put - sum(self.stats[s.name].items_in for s in self._readers[name]))
        self.high_water[name] = max(self.high_water[name], depth)
        return depth

    def _sample_queues(self) -> dict[str, int]:
        """``queue_depth`` of every queue."""
        return {name: self.queue_depth(name) for name in self.topo.queues}

    def snapshot(self) -> list[dict[str, Any]]:
        """One row per stage for the live display (see ``progress.LiveDisplay.render``)."""
        depths = self._sample_queues()
        rows = []
        for stage in self.topo.stages:
            st = self.stats[stage.name]
            state = ("done" if stage.name in self.finished else "waiting" if stage.name not in self.started
                     else "stopping" if self.stop_deadline is not None else "running")
            out = self._sent(stage)
            queue = stage.inputs[0] if stage.inputs else None
            finished = out if stage.kind == "producer" else st.delivered + st.skipped + st.dead_lettered
            runner = self.runners.get(stage.name)
            if runner is not None:  # items done in chunks still in workers' hands (progress[0]: the item in hand)
                finished += sum(int(w.progress[0]) for w in list(runner.workers) if w.task is not None)
            rows.append({
                "stage": stage.name, "kind": stage.kind, "state": state, "processes": stage.processes,
                "items_in": st.items_in, "items_out": out,
                "finished": finished,
                "failed": st.failed, "skipped": st.skipped, "dead_lettered": st.dead_lettered,
                "restarts": st.restarts, "queue": queue, "depth": depths.get(queue, 0) if queue else 0,
            })
        return rows

    def _setup(self) -> None:
        if self.topo.start_method == "fork":
            worker.prepare_fork()
        for plan in self.topo.queues.values():
            if plan.type == "lifo":
                from runner.lifo import LifoChannel, StackManager

                if self.manager is None:
                    # Serves the LIFO stacks of this run; private socket, random key, shut down with the run.
                    self.manager = StackManager(authkey=os.urandom(32), ctx=self.ctx)
                    with stop_signals_blocked():
                        self.manager.start(_manager_init, (self.pid,))
                self.channels[plan.name] = LifoChannel(self.manager, plan)
            else:
                self.channels[plan.name] = FifoChannel(self.ctx, plan)
        # One lock per name, held around each call of the stages that name it.
        self.locks = {name: self.ctx.Lock() for name in self.topo.locks}
        for stage in self.topo.stages:
            if stage.function == "jsonl":
                Path(self.topo.base_dir, str(stage.kwargs["path"])).write_text("")

    def _loop(self, sig_r: int) -> None:
        self._start_ready_stages()
        while not self._all_done():
            waitables: list[Any] = [sig_r, self._bell.r]
            if self.manager is not None:
                waitables.append(self.manager._process.sentinel)
            for p in self.producers:
                if not p.done:
                    waitables += [p.process.sentinel] + ([p.conn] if p.conn is not None else [])
            timeout = None if self.stop_deadline is None else max(0.0, self.stop_deadline - time.monotonic())
            ready = wait(waitables, timeout)
            if self.stop_deadline is not None and time.monotonic() >= self.stop_deadline:
                self.log.warning("shutdown timeout passed: killing what is left", timeout=self.topo.shutdown_timeout)
                self._kill_all()
                raise _Signalled(self.signal_received)
            for r in ready:
                if r == sig_r:
                    os.read(sig_r, 64)
                    if self.signal_received:  # a write from anywhere else is not a signal
                        self._begin_stop()
                elif r == self._bell.r:
                    self._bell.clear()
                elif self.manager is not None and r == self.manager._process.sentinel:
                    self.failure = self._manager_died()
                else:
                    self._producer_ready(r)
            for runner in self.runners.values():
                if runner.error and not self.failure:
                    self.failure = runner.error
            if self.failure:
                if self.manager is not None and "LIFO queue" in self.failure:  # a consequence: name the cause
                    self.manager._process.join(KILL_GRACE)
                    if self.manager._process.exitcode is not None:
                        self.failure = self._manager_died()
                raise RunFailed(self.failure)
            self._advance()

    def _manager_died(self) -> str:
        assert self.manager is not None
        code = exit_code_of(self.manager._process)
        why = died_message("-", "manager", code).split(": ", 1)[1].replace("process manager ", "", 1)
        return f"the manager process serving the LIFO queues {why}; the run cannot go on without it"

    def _begin_stop(self) -> None:
        """First SIGINT/SIGTERM: stop producers, hand out nothing more, let chunks in flight finish, then end;
        within shutdown_timeout, after which everything left is killed."""
        name = signal.Signals(self.signal_received).name
        self.log.warning("stopping: producers stopped, chunks in flight finishing, queued items left", signal=name,
                         shutdown_timeout=self.topo.shutdown_timeout)
        self.stop_deadline = time.monotonic() + self.topo.shutdown_timeout
        for p in self.producers:
            if not p.done:
                stop_child(p.process)
        for runner in self.runners.values():
            runner.stop()
        for stage in self.topo.stages:  # stages not started yet never will be
            self.started.setdefault(stage.name, time.perf_counter())
            if stage.name not in self.runners and stage.kind != "producer":
                self.finished.add(stage.name)

    def _all_done(self) -> bool:
        return all(s.name in self.finished for s in self.topo.stages if not s.daemon)

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
                if message[0] == "stats":
                    self.stats[message[1]].items_out += message[4]
                    self.stats[message[1]].busy_seconds += message[5]
                elif message[0] == "error" and not self.failure:
                    self.failure = f"stage {message[1]!r} (process {message[2]}) failed: {message[3]}"
        except (EOFError, OSError):
            p.conn = None

    def _advance(self) -> None:
        """Mark finished stages, end the queues they were the last writer of, start what may start."""
        for stage in self.topo.stages:
            if stage.name in self.finished or stage.name not in self.started:
                continue
            runner = self.runners.get(stage.name)
            done = runner.finished if runner else all(p.done for p in self.producers if p.stage == stage.name)
            if done:
                self.finished.add(stage.name)
                self.stats[stage.name].seconds = time.perf_counter() - self.started[stage.name]
        for name, plan in self.topo.queues.items():
            if name not in self.ended_queues and all(w in self.finished for w in plan.writers):
                self.ended_queues.add(name)
                with contextlib.suppress(ManagerGone):  # reported as the manager's death
                    self.channels[name].end(plan.reader_processes)
        if self.stop_deadline is None:
            self._start_ready_stages()

    def _start_ready_stages(self) -> None:
        for stage in self.topo.stages:
            if stage.name not in self.started and all(a in self.finished for a in stage.after):
                self._start_stage(stage)

    def _start_stage(self, stage: StagePlan) -> None:
        self.started[stage.name] = time.perf_counter()
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
            self.manager._process.kill()

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
            self.log.info("process exited", stage=p.stage, process=p.name, pid=p.process.pid, exitcode=p.process.exitcode)
        now = time.perf_counter()
        for name, t in self.started.items():
            if name not in self.finished:
                self.stats[name].seconds = now - t
        if self.manager is not None:
            self.manager.shutdown()
        for channel in self.channels.values():
            channel.close()


@dataclass
class _Task:
    """A chunk handed to a worker, as the runner keeps it in case the worker dies holding it."""

    seq: int
    items: list[Any] | bytes  # bytes: a whole batch of the input queue, still pickled (items and ids)
    tries: list[int] | None  # failed attempts of each item so far (None: none failed yet)
    ids: Any
    n: int  # items in it
    settled: int = 0  # items at its start already answered by partial results (see worker.run_items)

    def frames(self) -> list[Any]:
        """What the worker receives (``worker.worker_main``): a still-pickled batch as a frame of its own after
        the task, so that it is never copied into a pickle here."""
        if type(self.items) is bytes:
            return [ForkingPickler.dumps((self.seq, None, self.tries, self.ids), pickle.HIGHEST_PROTOCOL), self.items]
        return [ForkingPickler.dumps((self.seq, self.items, self.tries, self.ids), pickle.HIGHEST_PROTOCOL)]


@dataclass
class _Worker:
    """A worker process of a stage, seen from its runner."""

    name: str
    process: Any
    outbox: wire.Outbox  # chunks to it (its task pipe, never blocking this thread)
    results: Any  # the read end of its result pipe
    progress: Any
    # Chunks sent and not answered yet, oldest first; up to DEPTH, so a worker finds its next chunk waiting
    # in its pipe when it finishes one.
    tasks: deque[_Task] = field(default_factory=deque)
    retiring: bool = False
    timed_out: bool = False
    kill_at: float | None = None


class StageRunner:
    """A consumer or pool stage, run from one thread of the main process.

    Reads the input queue (a fetcher thread gets one batch at a time, on demand), hands chunks to idle
    workers, emits their results (in input order for ``ordered: true``), applies the error policy to
    items held by workers that died or timed out, and replaces those workers.

    Memory is bounded in bytes as well as items: it fetches while fewer than ``FETCH_BYTES`` (and
    ``2 * MAX_BATCH`` items) wait, cuts chunks to about ``BATCH_BYTES`` from the size of the batches it
    reads, and keeps at most ``DEPTH`` chunks in flight per worker (the transport: ``runner.wire``).

    ``stop`` (the first SIGINT/SIGTERM): no new chunk is handed out, chunks in flight finish, their
    outputs are counted but stay behind (left in the output queues, like everything still queued), and
    the runner ends; items it had read but not handed out go back to the count of its input queue.
    """

    def __init__(self, sup: Supervisor, plan: StagePlan, outputs: list[Channel]) -> None:
        self.sup, self.plan = sup, plan
        self.stats = sup.stats[plan.name]
        self.input = sup.channels[plan.inputs[0]]
        collect = sup.collected[plan.name].extend if plan.function == "collect" else None
        self.emitter = Emitter(outputs, on_batch=collect, ids=bool(outputs))  # a sink passes no ids on
        self.dead_emitter = Emitter([sup.channels[plan.dead_letter]], ids=True) if plan.dead_letter else None
        self.lock = sup.locks.get(plan.lock) if plan.lock else None
        self.workers: list[_Worker] = []
        self.buffer: list[Any] = []  # items waiting for a worker (sliced, never walked item by item here)
        self.ids = IdRuns()  # the ids of the items in `buffer`, in runs
        # Batches of a FIFO input still pickled, (n, bytes), after `buffer`: one that fits a chunk goes to
        # a worker as it is, so the items are never unpickled and pickled again in this process.
        self.packed: deque[tuple[int, bytes]] | None = deque() if isinstance(self.input, FifoChannel) else None
        self.packed_items = 0
        self.packed_bytes = 0
        self.item_bytes = 0.0  # pickled bytes of an item, as the last batch read measured (0: not known yet)
        self.again: deque[_Task] = deque()  # chunks of dead workers, to hand out again
        # Outputs of chunks waiting for their turn (ordered): seq -> pieces (outputs, ids, packed); `ready`:
        # the chunks whose last piece has come.
        self.results: dict[int, list[tuple[list[Any], Any, Any]]] = {}
        self.ready: set[int] = set()
        self.next_seq = 0
        self.next_out = 0
        self.emitted = 0  # outputs of the stage's calls (sent on, or left behind by a stop)
        self.fetched: deque[tuple[Any, Any] | None] = deque()
        self.want = threading.Event()
        self.bell = _Bell()  # the fetcher, stop() and abort() ring it
        self.poller = wire.Poller()
        self.input_done = False
        self.fetching = False
        self.stopping = False
        self.aborted = False
        self.kill = False  # abort with SIGKILL at once (the shutdown timeout has passed)
        self.finished = False
        self.error: str | None = None
        self.fetch_error: str | None = None
        self.thread = threading.Thread(target=self._run, name=f"stage-{plan.name}", daemon=True)

    def start(self) -> None:
        for name in self.plan.process_names:
            self.workers.append(self._spawn(name, self.sup.ctx.RawArray("q", worker.PROGRESS_SLOTS)))
        threading.Thread(target=self._fetch, name=f"fetch-{self.plan.name}", daemon=True).start()
        self.thread.start()

    def _spawn(self, name: str, progress: Any) -> _Worker:
        task_r, task_w = self.sup.ctx.Pipe(duplex=False)  # chunks: this thread -> the worker
        result_r, result_w = self.sup.ctx.Pipe(duplex=False)  # ChunkResults: the worker -> this thread
        for conn in (task_w, result_w):
            wire.widen(conn)
        progress[:] = [0] * worker.PROGRESS_SLOTS
        progress[2] = -1
        spec = worker.WorkerSpec(
            stage=self.plan,
            name=name,
            base_dir=self.sup.topo.base_dir,
            log_queue=self.sup.log_queue,
            log_level=self.sup.topo.log_level,
            parent_pid=self.sup.pid,
            conn=task_r,
            results=result_w,
            progress=progress,
            lock=self.lock,
            id_names=self.sup.id_names,
            pack=self.emitter.packed_max,
        )
        process = self.sup.ctx.Process(target=worker.worker_main, args=(spec,), name=name, daemon=self.plan.daemon)
        start_child(process)
        task_r.close()
        result_w.close()
        return _Worker(name, process, wire.Outbox(task_w), result_r, progress)

    def _fetch(self) -> None:
        """Fetcher thread: one blocking read of the input queue each time the runner asks."""
        while True:
            self.want.wait()
            self.want.clear()
            try:
                batch = self.input.get_ids() if self.packed is None else self.input.get_packed()
            except Exception as e:  # noqa: BLE001 - e.g. the LIFO manager is gone: the stage fails, clearly
                self.fetch_error = f"stage {self.plan.name!r}: cannot read queue {self.plan.inputs[0]!r}: {type(e).__name__}: {e}"
                self.bell.ring()
                return
            self.fetched.append(batch)
            self.bell.ring()
            if batch is None:
                return

    def stop(self) -> None:
        """The run is stopping: hand out nothing more, let the chunks in flight finish, then end."""
        self.stopping = True
        self._abandon()
        self.bell.ring()

    def abort(self, *, kill: bool = False) -> None:
        """Stop the stage now (a failure elsewhere, a daemon stage at the end, a shutdown; ``kill``: SIGKILL
        its workers at once)."""
        self.kill = self.kill or kill
        self.aborted = True
        self._abandon()
        self.bell.ring()

    def _abandon(self) -> None:
        for emitter in (self.emitter, self.dead_emitter):
            if emitter is not None:
                emitter.abandon()

    # -- the runner thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
            if not self.aborted and not self.stopping:
                self.emitter.close()
                if self.dead_emitter is not None:
                    self.dead_emitter.close()
        except _StageFailed as e:
            self.error = str(e)
        except Cancelled:  # a put that waited for room, given up as the run stops: counted as left behind
            pass
        except Exception as e:  # noqa: BLE001 - e.g. an unpicklable result: reported, never lost
            if not (self.stopping or self.aborted):
                self.error = f"stage {self.plan.name!r} failed: {type(e).__name__}: {e}"
        finally:
            self._stop_workers()
            for emitter in (self.emitter, self.dead_emitter):
                if emitter is not None:
                    emitter.stop(KILL_GRACE)  # after close: at once; else its linger thread sends nothing more
            if self.stopping:  # read, never handed out: they count as still in the input queue
                self.stats.items_in -= self.waiting + sum(t.n - t.settled for t in self.again)
            self.stats.items_out = self.emitted
            self.finished = True
            self.bell.close()
            self.sup.ring()

    def _loop(self) -> None:
        while not self.aborted:
            if not self.stopping:
                self._dispatch()
            busy = any(w.tasks for w in self.workers)
            if not busy and (self.stopping or (self.input_done and not self.waiting and not self.again)):
                return
            if not (self.stopping or self.input_done or self.fetching) and self._wants_input():
                self.fetching = True
                self.want.set()
            reads: list[Any] = [self.bell.r]
            writes = []
            for w in self.workers:
                reads += [w.results, w.process.sentinel]
                if w.outbox.pending:
                    writes.append(w.outbox)
            for ready in self.poller.wait(reads, writes, self._next_deadline()):
                if ready == self.bell.r:
                    self._take_fetched()
                elif isinstance(ready, wire.Outbox):
                    with contextlib.suppress(OSError):  # a dead worker: its sentinel says so
                        ready.flush()
                else:
                    self._worker_ready(ready)
            self._enforce_timeouts()

    def _wants_input(self) -> bool:
        """Fewer than ``2 * MAX_BATCH`` items and ``FETCH_BYTES`` (or a chunk per worker) wait for a worker."""
        waiting_bytes = self.packed_bytes + len(self.buffer) * self.item_bytes
        return self.waiting < 2 * MAX_BATCH and waiting_bytes < max(FETCH_BYTES, 2 * DEPTH * len(self.workers) * BATCH_BYTES)

    def _take_fetched(self) -> None:
        self.bell.clear()
        if self.fetch_error and not self.stopping:  # while stopping, the input no longer matters
            raise _StageFailed(self.fetch_error)
        while self.fetched:
            batch = self.fetched.popleft()
            self.fetching = False
            if batch is None:
                self.input_done = True
                continue
            if self.stopping:  # never counted as taken: it stays in the count of the input queue
                continue
            self.sup.queue_depth(self.plan.inputs[0])  # the queue is deepest now: a high-water sample
            if self.packed is not None:
                n, data = batch
                self.packed.append(batch)
                self.packed_items += n
                self.packed_bytes += len(data)
                self.item_bytes = len(data) / n
                self.stats.items_in += n
            else:
                items = batch[0]
                if items:
                    self.item_bytes = len(pickle.dumps(items[0], pickle.HIGHEST_PROTOCOL))
                self.stats.items_in += len(items)
                self._buffer(*batch)

    def _dispatch(self) -> None:
        for depth in range(1, self._depth() + 1):  # every worker's first chunk before anyone's second
            for w in self.workers:
                if len(w.tasks) >= depth or w.retiring or w.kill_at is not None:
                    continue
                task = self._next_task()
                if task is None:
                    return
                w.tasks.append(task)
                try:
                    for frame in task.frames():
                        w.outbox.send(frame)
                except OSError:  # it died: its sentinel is ready, and _exited hands its chunks out again
                    break

    def _next_task(self) -> _Task | None:
        """The next chunk to hand out: a dead worker's first, then what waits (None: nothing)."""
        if self.again:
            return self.again.popleft()
        if not self.waiting:
            return None
        size = self.plan.chunksize or self._chunk_size()
        # Once the time per item is known and while more input comes, a batch that is not too much
        # work for one worker goes whole (the others get the next ones); the first items are split.
        known = self.stats.busy_seconds > 0 and not self.input_done
        whole = self.plan.chunksize or (self._chunk_size(MAX_BATCH) if known else size)
        if not self.buffer and self.packed and self.packed[0][0] <= whole:
            n, data = self.packed.popleft()  # a whole batch: the worker unpickles it
            self.packed_items -= n
            self.packed_bytes -= len(data)
            task = _Task(self.next_seq, data, None, None, n)
        else:
            if len(self.buffer) < size and self.packed:
                self._unpack()
            chunk = self.buffer[:size]
            del self.buffer[:size]
            task = _Task(self.next_seq, chunk, None, self.ids.take(len(chunk)), len(chunk))
        self.next_seq += 1
        return task

    @property
    def waiting(self) -> int:
        """Items read from the input and not yet handed to a worker."""
        return len(self.buffer) + self.packed_items

    def _unpack(self) -> None:
        """Move the first still-pickled batch into ``buffer`` (it is to be split, or joined with other items)."""
        assert self.packed is not None
        n, data = self.packed.popleft()
        self.packed_items -= n
        self.packed_bytes -= len(data)
        self._buffer(*pickle.loads(data))

    def _buffer(self, items: list[Any], ids: Any) -> None:
        """Append a batch and its ids (None: the writer gave none) to what waits for a worker."""
        self.ids.add(ids if ids is not None else [None] * len(items))
        self.buffer.extend(items)

    def _depth(self) -> int:
        """Chunks in flight per worker: DEPTH, so that a worker finds its next short chunk waiting in its
        pipe; one once items take SLOW_ITEM or more, so that at the end of the input no chunk waits behind
        a busy worker while another worker has nothing left to do."""
        st = self.stats
        done = st.delivered + st.skipped + st.dead_lettered
        return 1 if done and st.busy_seconds / done >= SLOW_ITEM else DEPTH

    def _chunk_size(self, share: int = 0) -> int:
        """Items for the next chunk: a share of what waits, about CHUNK_SECONDS of work once the time per
        item is known (few items until then), so slow functions balance and fast ones move in bulk; never
        much more than BATCH_BYTES."""
        most = MAX_BATCH if not self.item_bytes else max(1, min(MAX_BATCH, int(BATCH_BYTES / self.item_bytes)))
        share = min(most, share or max(1, math.ceil(self.waiting / len(self.workers))))
        st = self.stats
        done = st.delivered + st.skipped + st.dead_lettered
        if not done:
            return min(share, FIRST_CHUNK)
        per_item = st.busy_seconds / done
        return share if per_item <= 0 else max(1, min(share, int(CHUNK_SECONDS / per_item)))

    def _worker_ready(self, ready: Any) -> None:
        for w in list(self.workers):
            if ready is w.results:
                self._receive(w)
            elif ready == w.process.sentinel:
                self._receive(w)
                self._exited(w)

    def _receive(self, w: _Worker) -> None:
        """Every result the worker has begun to send (a worker writes a message it began to the end)."""
        try:
            while w.results.poll():
                res = w.results.recv()
                if res.packed:
                    res.packed = [(n, w.results.recv_bytes()) for n in res.packed]
                self._result(w, res)
        except (EOFError, OSError):
            pass

    def _result(self, w: _Worker, res: worker.ChunkResult) -> None:
        st = self.stats
        st.skipped += res.skipped
        st.retried += res.retried
        st.failed += res.failed
        st.busy_seconds += res.busy
        st.latency.add(res.latency)
        if res.error is not None:
            summary, tb, item = res.error
            on = f" on item {item}" if item else ""
            self.sup.log.error("stage failed", stage=self.plan.name, process=w.name, error=summary, item=item, exception=tb)
            msg = f"stage {self.plan.name!r} (process {w.name}) failed{on}: {summary}"
            raise _StageFailed(msg)
        st.delivered += res.done - res.skipped - len(res.dead)
        if res.partial:
            w.tasks[0].settled += res.done
        else:
            w.tasks.popleft()
            w.retiring = res.retire
        for letter, item_id in zip(res.dead, res.dead_ids, strict=True):
            self._dead_letter(letter, item_id)
        self._emit(res.seq, [(res.outputs, res.ids, res.packed)], final=not res.partial)

    def _emit(self, seq: int, pieces: list[tuple[list[Any], Any, Any]], *, final: bool = True) -> None:
        """Send a chunk's outputs on (in input order for ``ordered: true``, once its ``final`` piece is in)."""
        if not self.plan.ordered:
            for piece in pieces:
                self._send_on(*piece)
            return
        self.results.setdefault(seq, []).extend(pieces)
        if final:
            self.ready.add(seq)
        while self.next_out in self.ready:
            self.ready.discard(self.next_out)
            for piece in self.results.pop(self.next_out):
                self._send_on(*piece)
            self.next_out += 1

    def _send_on(self, outputs: list[Any], ids: Any, packed: list[tuple[int, bytes]] | None) -> None:
        """Emit outputs (``packed``: as output queue messages made by the worker). While the run stops they are
        counted and left behind."""
        self.emitted += sum(n for n, _ in packed) if packed else len(outputs)
        if self.stopping and self.plan.outputs:
            return
        for n, data in packed or ():
            if not self.emitter.emit_packed(n, data):
                self.emitter.emit_many(*pickle.loads(data))
        if outputs:
            self.emitter.emit_many(outputs, ids)

    def _dead_letter(self, letter: dict[str, Any], item_id: int | None) -> None:
        assert self.dead_emitter is not None
        self.stats.dead_lettered += 1
        if not self.stopping:
            self.dead_emitter.emit_many([letter], [item_id])

    def _exited(self, w: _Worker) -> None:
        code = exit_code_of(w.process)
        self.sup.exit_codes[w.name] = code
        self.sup.log.info("process exited", stage=self.plan.name, process=w.name, pid=w.process.pid, exitcode=code)
        self.workers.remove(w)
        w.outbox.close()
        w.results.close()
        if w.retiring and code == 0:  # maxtasksperchild: chunks it did not read go to its successor
            self.again.extendleft(reversed(w.tasks))
            self.workers.append(self._spawn(w.name, w.progress))
            return
        reason = (
            f"call timed out after {self.plan.timeout:g}s (worker {w.name} replaced)"
            if w.timed_out
            else died_message(self.plan.name, w.name, code)
        )
        if w.tasks and int(w.progress[2]) == w.tasks[0].seq:
            self._recover(w, reason)
        else:  # it died between chunks: nothing was in its hands
            self.again.extendleft(reversed(w.tasks))
        if not w.timed_out and not self.plan.restart:
            raise _StageFailed(f"{died_message(self.plan.name, w.name, code)}; restart: false, so the run stops")
        self.stats.restarts += 1
        self.sup.restarts[w.name] = self.sup.restarts.get(w.name, 0) + 1
        if self.stopping:  # nothing more will be handed out: no successor
            return
        self.sup.log.warning("worker replaced", stage=self.plan.name, process=w.name, reason=reason)
        self.workers.append(self._spawn(w.name, w.progress))

    def _recover(self, w: _Worker, reason: str) -> None:
        """Settle the chunk a dead worker held: exactly once where that can be known.

        Items answered by partial results are settled. The calls completed after them (before the item in
        hand) had their effects: in a sink (no output queue) they count as delivered and are never called
        again (their skips and failures come from the worker's shared counters); in a stage with outputs,
        their outputs died with the worker, so they are called again (logged). The item in hand counts one
        failed attempt and the error policy decides about it. The items after it, and the worker's other
        chunks, are handed out again.
        """
        task = w.tasks.popleft()
        items, ids = task.items, task.ids
        if type(items) is bytes:  # a batch sent still pickled
            items, ids = pickle.loads(items)
        ids = list(ids) if ids is not None else [None] * len(items)
        self.again.extendleft(reversed(w.tasks))  # chunks it had not started: handed out again as they are
        tries = task.tries or [0] * len(items)
        index = min(int(w.progress[0]), len(items) - 1)
        st, plan = self.stats, self.plan
        redo = list(range(task.settled, index))  # calls completed whose result died with the worker
        if redo and not plan.outputs:
            skipped, failed, retried = (int(w.progress[i]) for i in (3, 4, 5))
            st.skipped += skipped
            st.failed += failed
            st.retried += retried
            st.delivered += len(redo) - skipped
            redo = []
        elif redo:
            self.sup.log.warning("calling again items whose outputs died with their worker", stage=plan.name,
                                 process=w.name, items=len(redo),
                                 first_item_id=worker.item_id_text(ids[redo[0]], self.sup.id_names))
        item, attempts, item_id = items[index], tries[index] + 1, ids[index]
        st.failed += 1
        decided = worker.verdict(plan, attempts)
        keep = [*redo, *range(index + 1, len(items))]
        if decided == "retry":
            st.retried += 1
            keep.insert(len(redo), index)
        elif decided == "fail":
            raise _StageFailed(f"stage {plan.name!r} (process {w.name}) failed on item {worker.short_repr(item)}: {reason}")
        elif decided == "dead_letter":
            self._dead_letter(worker.give_up_letter(plan, item, reason, attempts), item_id)
        else:
            st.skipped += 1
        self.sup.log.warning("item in a dead worker", stage=plan.name, process=w.name, item=worker.short_repr(item),
                             item_id=worker.item_id_text(item_id, self.sup.id_names), attempts=attempts, reason=reason)
        if keep:
            again_tries = [attempts if i == index else tries[i] for i in keep]
            self.again.appendleft(_Task(task.seq, [items[i] for i in keep], again_tries, [ids[i] for i in keep], len(keep)))
        else:
            self._emit(task.seq, [], final=True)

    def _next_deadline(self) -> float | None:
        """Seconds until the runner must look at its workers again without being woken (None: never)."""
        now = time.monotonic()
        deadlines = [w.kill_at for w in self.workers if w.kill_at is not None]
        if self.plan.timeout:
            for w in self.workers:
                if w.tasks:
                    started = w.progress[1]
                    # A chunk whose call has not started yet may start one that never ends and never wakes
                    # this thread: look again soon, so its timeout is enforced from when it started.
                    deadlines.append(started / 1e9 + self.plan.timeout if started > 0 else now + TIMEOUT_POLL)
        return None if not deadlines else max(0.0, min(deadlines) - now)

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.kill_at is not None:
                if now >= w.kill_at and w.process.is_alive():
                    w.process.kill()
            elif self.plan.timeout and w.tasks and w.progress[1] > 0 and now >= w.progress[1] / 1e9 + self.plan.timeout:
                w.timed_out = True
                w.kill_at = now + KILL_GRACE
                stop_child(w.process)

    def _stop_workers(self) -> None:
        """End every worker: an idle one is told to leave; one with work (or after an abort) is asked to stop;
        whatever is still there after KILL_GRACE (or at once, with ``kill``) is killed."""
        for w in self.workers:
            if self.kill:
                w.process.kill()
                continue
            if not (self.aborted or w.tasks):
                with contextlib.suppress(OSError):
                    w.outbox.send(ForkingPickler.dumps(None))
                if not w.outbox.pending:
                    continue
            stop_child(w.process)
        deadline = time.monotonic() + KILL_GRACE
        for w in self.workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(KILL_GRACE)
            w.outbox.close()
            w.results.close()
            self.sup.exit_codes[w.name] = w.process.exitcode
            self.sup.log.info("process exited", stage=self.plan.name, process=w.name, pid=w.process.pid,
                              exitcode=w.process.exitcode)
        self.workers.clear()


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """SIGINT and SIGTERM blocked in this thread, so that a child started meanwhile starts with them blocked:
    a signal to the whole process group cannot end it before it ignores them (``worker.bootstrap``)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start_child(process: Any) -> None:
    """``process.start()`` under ``stop_signals_blocked``."""
    with stop_signals_blocked():
        process.start()


def stop_child(process: Any) -> None:
    """Ask a child to stop (``worker.STOP_SIGNAL``: it unwinds and flushes its records)."""
    with contextlib.suppress(ProcessLookupError, TypeError):  # gone already, or never started
        os.kill(process.pid, worker.STOP_SIGNAL)


def exit_code_of(process: Any) -> int | None:
    """Join a process that has ended (its sentinel is ready) and return its exit code.

    ``Process.start`` in another thread (a runner replacing a worker) reaps every ended child of this
    process through ``Popen.poll``; a join racing with it finds the child gone and no code yet, and the
    code appears as soon as that poll stores it.
    """
    process.join()
    for _ in range(1000):
        if process.exitcode is not None:
            break
        time.sleep(0.001)
    return process.exitcode


def died_message(stage: str, process: str, code: int | None) -> str:
    """Why a process ended, with the likely cause."""
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        causes = {
            "SIGKILL": " (killed from outside, or by the kernel for lack of memory)",
            "SIGSEGV": " (a crash in native code)",
            "SIGABRT": " (aborted by native code)",
        }
        return f"stage {stage!r}: process {process} was killed by {name}{causes.get(name, '')}"
    return f"stage {stage!r}: process {process} exited with code {code} (os._exit or sys.exit in the stage function?)"


def _manager_init(parent_pid: int) -> None:
    worker.leave_signals_to_parent(parent_pid)


def _install_signals(sup: Supervisor, sig_w: int) -> dict[int, Any] | None:
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != sup.pid:
            # A child started with `fork` that has not set its own handlers yet shares this pipe: it must
            # not wake the supervisor. It ignores SIGINT (the supervisor's to handle) and dies of SIGTERM.
            if signum == signal.SIGTERM:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        if sup.signal_received:
            if time.monotonic() - sup.signal_at < SIGNAL_GAP:
                return  # the same stop delivered twice (`timeout` signals its child and then the whole group)
            raise KeyboardInterrupt  # a second signal: stop at once
        sup.signal_received, sup.signal_at = signum, time.monotonic()
        os.write(sig_w, b"!")

    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous: dict[int, Any] | None) -> None:
    for signum, old in (previous or {}).items():
        signal.signal(signum, old)


def logging_state() -> tuple[list[Any], int]:
    """The root logger's handlers and level, to restore after a run."""
    import logging

    root = logging.getLogger()
    return list(root.handlers), root.level


def restore_logging(state: tuple[list[Any], int]) -> None:
    """Put back the root logger's handlers and level."""
    import logging

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in state[0]:
        root.addHandler(handler)
    root.setLevel(state[1])
