"""The Ray backend's driver: the same stages, queues, policies and summary as the local backend.

    driver (this process)                              Ray actors (one actor = one process of a stage)
    ---------------------                              ------------------------------------------------
    RaySupervisor (a runner.backends.driver.Driver):   producer actors --RefBatch--> _Hub: FIFO queues of
       bell loop, starts stages, ends queues               RefBatch, LIFO stacks of items, named locks,
    StageRunner thread per consumer/pool stage <--get-- _Hub       relay, wake-up flags
        --run_chunk(slice of a RefBatch)--> its worker actors --(ChunkResult, outputs ref)--> runner
        runner --RayEmitter--RefBatch of the outputs--> _Hub
    relay thread <--take-- _Hub <--post-- every stage actor: log records, stdout/stderr lines, items sent
    relay thread --> log queue --> Listener (stderr, log_file); stdout lines --> sys.stdout;
                     producers' items sent so far --> producer_sent (live display, queue depths)

The actors, the hub and what crosses to them are ``runner.backends.ray.actors`` (whose docstring says how
items stay in Ray's object store: this process handles references, counts and control). Each consumer or
pool stage is read by one ``StageRunner`` thread of the driver, as on the local backend: it fetches one
message at a time from its input queue, hands slices of it to its worker actors, forwards their outputs (in
input order for ``ordered: true``) and applies the error policy to items held by a worker that died or
timed out, then replaces it.  Everything moves in batches: a Ray call costs about a millisecond, an item a
microsecond.  When a stage may start, when a queue ends and the stop are the shared ``Schedule`` and
``Driver``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

import runner
import schemas
from runner import logs, worker
from runner.backends.driver import Driver, make_display
from runner.backends.ray import actors
from runner.backends.ray.actors import (
    CHUNK_SECONDS,
    CONNECT_TIMEOUT,
    FIRST_CHUNK,
    KILL_GRACE,
    RAY_BATCH,
    RAY_BYTES,
    RAY_CHUNK,
    SPREAD,
    START_TIMEOUT,
    ActorSpec,
    RayChannel,
    RayEmitter,
    RayLock,
    RefBatch,
)
from runner.backends.stage import StageFailed, StageRunnerCore
from runner.errors import RunFailed, UsageError
from runner.messages import Decision
from runner.results import RunResult
from runner.topology import StagePlan, Topology

# The actor classes (Ray's type stubs know how to call remote functions, not actor classes).
_Hub: Any = actors._Hub
_ProducerActor: Any = actors._ProducerActor
_WorkerActor: Any = actors._WorkerActor


class Signal(NamedTuple):
    signum: int


class ProducerEnded(NamedTuple):
    producer: Any  # _Producer


class RunnerEnded(NamedTuple):
    pass


class Failed(NamedTuple):
    error: str


def died_message(stage: str, process: str) -> str:
    """Why a worker actor is gone, with the likely causes (Ray's own text is many lines)."""
    return (
        f"stage {stage!r}: process {process} (a Ray actor) died: killed from outside, out of memory, a crash in "
        "native code, os._exit or sys.exit in the stage function, or its node was lost"
    )


@dataclass
class _Producer:
    stage: str
    name: str
    actor: Any
    ref: Any
    done: bool = False
    stopping: bool = False
    counted: bool = False  # its items sent are in the stats
    where: dict[str, Any] = field(default_factory=dict)


class RaySupervisor(Driver):
    """Runs one ``Topology`` on Ray (a local instance, or the cluster at ``address`` / ``RAY_ADDRESS``)."""

    def __init__(self, topology: Topology, address: str | None = None, *, progress: bool = False) -> None:
        super().__init__(topology)
        self.progress = progress
        self.given_address = address
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.producers: list[_Producer] = []
        self.sent_live: dict[str, int] = {}  # items each producer has sent so far, as it reported (see _relay)
        self.calls_live: dict[str, int] = {}  # calls in flight in each worker of a stage with concurrency, ditto
        self.channels: dict[str, RayChannel] = {}
        self.hub: Any = None
        self.relay_thread: threading.Thread | None = None
        # Wakes the loop: a Signal from the handler, a ProducerEnded, a RunnerEnded, or a Failed.
        self.bell: queue.SimpleQueue[Signal | ProducerEnded | RunnerEnded | Failed] = queue.SimpleQueue()
        self.base_dir: str | None = topology.base_dir

    # -- the run ---------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Connect to Ray, start, supervise and shut down the whole topology."""
        t0 = time.perf_counter()
        # Records of the driver and, through the relay thread, of every actor; read by the listener.
        self.log_queue: queue.Queue[Any] = queue.Queue()
        display = make_display(self.topo, self.progress)
        listener = logs.start_listener(self.log_queue, self.topo.log_level, self.topo.log_format, self.topo.log_file,
                                       stream=display.stream if display else None)
        saved = logs.logging_state()
        logs.configure(self.log_queue, self.topo.log_level, stage="-", process="MainProcess")
        owned = False
        previous = None
        monitor = None
        try:
            with self.ending():
                owned = self._connect()
                previous = _install_signals(self)
                self._setup()
                monitor = self.start_monitor(display)
                self._loop()
        finally:
            _restore_signals(previous)
            try:
                if ray.is_initialized():
                    self._shutdown()
            finally:
                self.stop_monitor(monitor)
                if owned:
                    _no_auto_connect()
                    ray.shutdown()
                listener.stop()
                logs.close_handlers(listener)
                if display is not None:
                    display.stop(self.snapshot())
                logs.restore_logging(saved)
        return self.result(0, time.perf_counter() - t0)

    def _connect(self) -> bool:
        """Use the Ray instance this process is already connected to, else start or join one; True if ours."""
        if ray.is_initialized():
            if self.given_address:
                msg = f"this process is already connected to Ray: it cannot run on {self.given_address} as well"
                raise UsageError(msg)
            return False
        options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
        if self.address:
            # A cluster: the tasks modules (the pipeline's folder) and mprun itself travel to every node.
            options["runtime_env"] = {
                "working_dir": self.topo.base_dir,
                "py_modules": [runner, schemas],
                "excludes": [".git", ".venv", "__pycache__", "*.pyc"],
            }
            self.base_dir = None
        else:  # a fresh instance of our own, never one a `ray start` left behind on this machine
            options["num_cpus"] = os.cpu_count() or 1
            options["include_dashboard"] = False
        if self.address:
            _check_reachable(self.address)
        try:
            ray.init(address=self.address or "local", **options)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            msg = f"cannot start or reach {where}: {first}"
            raise UsageError(msg) from None
        return True

    def _setup(self) -> None:
        plans = self.topo.queues.values()
        self.hub = _Hub.remote({q.name: (q.type, q.maxsize, q.max_bytes) for q in plans})
        self.relay_thread = threading.Thread(target=self._relay, name="ray-relay", daemon=True)
        self.relay_thread.start()
        self.channels = {plan.name: RayChannel(self.hub, plan) for plan in plans}

    def _relay(self) -> None:
        """Relay thread: records to the listener's queue, output lines to this process's streams.

        It first waits (bounded) for the hub to run: an actor Ray never starts would otherwise leave every
        stage, and the run, waiting for ever.
        """
        try:
            ray.get(self.hub.ready.remote(), timeout=START_TIMEOUT)
        except GetTimeoutError:
            self.bell.put(Failed(f"Ray did not start the queue hub actor within {START_TIMEOUT:g}s"))
            return
        except Exception:  # noqa: BLE001 - the hub is gone: nothing will come
            return
        while True:
            try:
                entries = ray.get(self.hub.take.remote())
            except Exception:  # noqa: BLE001 - the hub is gone: nothing more will come
                return
            if entries is None:
                return
            for entry in entries:
                if entry[0] == "log":
                    self.log_queue.put_nowait(entry[1])
                elif entry[0] == "sent":
                    self.sent_live[entry[1]] = entry[2]
                elif entry[0] == "calls":
                    self.calls_live[entry[1]] = entry[2]
                else:
                    stream = sys.stdout if entry[1] == "stdout" else sys.stderr
                    stream.write(entry[2])
                    stream.flush()

    def _loop(self) -> None:
        self.advance()
        while not self.schedule.all_done():
            try:
                message = self.bell.get(timeout=self.schedule.time_left())
            except queue.Empty:
                self.log.warning("shutdown timeout passed: stopping what is left", timeout=self.topo.shutdown_timeout)
                return
            if isinstance(message, Signal):
                if self.schedule.stopping:
                    raise KeyboardInterrupt
                self.signal_received = message.signum
                self.begin_stop()
            elif isinstance(message, ProducerEnded):
                self._producer_done(message.producer)
            elif isinstance(message, Failed):
                self.failure = self.failure or message.error
            self.check_runners()
            if self.failure:
                raise RunFailed(self.failure)
            self.advance()

    def stop_producers(self) -> None:
        for p in self.producers:
            if not p.done:
                p.stopping = True
                self._stopped(p, _ask_stop(p.actor))  # not killed: it owns its batches still queued

    def producer_sent(self, stage: StagePlan) -> int:
        """What its ended producers sent, plus what the others reported so far (after each batch)."""
        live = sum(self.sent_live.get(p.name, 0) for p in self.producers if p.stage == stage.name and not p.counted)
        return self.stats[stage.name].items_out + live

    def stage_ended(self, stage: StagePlan) -> bool:
        r = self.runners.get(stage.name)
        return r.finished if r else all(p.done for p in self.producers if p.stage == stage.name)

    def end_queue(self, name: str) -> None:
        self.channels[name].end(self.topo.queues[name].reader_processes)  # a remote call: never waits here

    def ring(self) -> None:
        """Wake the driver loop (called by runner threads)."""
        self.bell.put(RunnerEnded())

    def _stopped(self, p: _Producer, said: Any) -> None:
        """Count what a producer stopped before its end had sent."""
        if said is not None and not p.counted:
            p.counted = True
            sent, seconds, p.where = said
            self.stats[p.stage].items_out += sent
            self.stats[p.stage].busy_seconds += seconds

    def _producer_done(self, p: _Producer) -> None:
        if p.done:
            return
        p.done = True
        code: int | None = 0
        try:
            sent, seconds, error, p.where = ray.get(p.ref)
        except RayActorError:
            code = None
            if not p.stopping and not self.failure:
                self.failure = died_message(p.stage, p.name)
        else:
            self._stopped(p, (sent, seconds, p.where))
            if p.stopping:
                code = None
            elif error is not None:
                code = 1
                self.failure = self.failure or f"stage {p.stage!r} (process {p.name}) failed: {error}"
        self.exit_codes[p.name] = code
        self.log.info("process exited", stage=p.stage, process=p.name, exitcode=code, **p.where)
        # Its run is over, its actor stays: it owns the batches it put into the object store (killed at the end).

    def start_stage(self, stage: StagePlan) -> None:
        if stage.kind != "producer":
            r = StageRunner(self, stage)
            self.runners[stage.name] = r
            r.start()
            return
        outputs = [self.channels[q] for q in stage.outputs]
        for index, name in enumerate(stage.process_names):
            spec = ActorSpec(stage, name, index, self.base_dir, self.topo.log_level, self.hub, outputs,
                             limit=self.topo.limit)
            actor = _ProducerActor.options(scheduling_strategy=SPREAD).remote(spec)
            p = _Producer(stage.name, name, actor, actor.run.remote())
            self.producers.append(p)
            p.ref.future().add_done_callback(lambda _f, p=p: self.bell.put(ProducerEnded(p)))

    def spec(self, stage: StagePlan, name: str) -> ActorSpec:
        """The spec of a worker actor of ``stage``."""
        lock = RayLock(self.hub, stage.lock, name) if stage.lock else None
        outputs = [self.channels[q] for q in stage.outputs]
        return ActorSpec(stage, name, 0, self.base_dir, self.topo.log_level, self.hub, outputs, lock,
                         by_ref=by_reference(stage, outputs))

    # -- the end ---------------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Stop whatever still runs, let every actor send its records, then close the relay."""
        for r in self.runners.values():
            r.abort()
        for p in self.producers:
            if not p.done:
                self._stopped(p, _ask_stop(p.actor))
                p.done = True
                self.exit_codes[p.name] = None
                self.log.info("process exited", stage=p.stage, process=p.name, exitcode=None, **p.where)
        if self.hub is not None:
            with contextlib.suppress(Exception):
                ray.get(self.hub.drop_queues.remote(), timeout=KILL_GRACE)
        for r in self.runners.values():
            r.thread.join(KILL_GRACE * 4 + START_TIMEOUT)
        for p in self.producers:  # nothing reads their batches any more
            _kill(p.actor)
        self.close_stats()
        if self.hub is not None:
            with contextlib.suppress(Exception):  # a lost hub: the relay thread has ended already
                ray.get(self.hub.close.remote(), timeout=KILL_GRACE)
            if self.relay_thread is not None:
                self.relay_thread.join(KILL_GRACE + 5)
            _kill(self.hub)


FLAG_POLL = 1.0  # seconds at most between a stage runner's looks at its stop and abort flags


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes (Ray retries for long), when ``[ray://]HOST:PORT`` accepts no connection.

    Raises:
        UsageError: nothing listens there (exit code 2).
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local" and the like: Ray's to resolve
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        msg = f"cannot reach the Ray cluster at {address}: {e.strerror or e} (is a Ray head node running there?)"
        raise UsageError(msg) from None


def _ask_stop(actor: Any) -> Any:
    """Ask a stage actor to stop and send its buffered records (bounded); what its ``stop`` returned, or None."""
    with contextlib.suppress(Exception):  # dead or stuck: None
        return ray.get(actor.stop.remote(), timeout=KILL_GRACE)
    return None


def _stop_actor(actor: Any) -> Any:
    """``_ask_stop``, then kill the actor; what its ``stop`` returned, or None."""
    said = _ask_stop(actor)
    _kill(actor)
    return said


def by_reference(stage: StagePlan, outputs: list[RayChannel]) -> bool:
    """A stage's outputs go by reference (its workers return them pickled, the driver forwards the reference)
    unless the driver needs the items: a ``collect`` stage, routes (the driver sends each output to the queue
    of its route), or an output that is a LIFO stack."""
    return stage.function != "collect" and not stage.routes and all(c.kind == "fifo" for c in outputs)


def _no_auto_connect() -> None:
    """Before this run's own Ray instance stops: a call a thread of the run still makes (all are bounded, none
    is joined for ever) must fail, not start a new instance (Ray's auto-connect) that would outlive the run."""
    with contextlib.suppress(Exception):  # a Ray without the hook: nothing to turn off
        from ray._private import auto_init_hook

        auto_init_hook.enable_auto_connect = False


def _kill(actor: Any) -> None:
    """``ray.kill``, waiting at most KILL_GRACE: Ray first waits for the actor's creation to be registered,
    and a registration that never arrives (seen after a ``fork`` of this process) would wait for ever."""
    def kill() -> None:
        with contextlib.suppress(Exception):  # gone already, or Ray is shutting down
            ray.kill(actor)

    killer = threading.Thread(target=kill, name="ray-kill", daemon=True)
    killer.start()
    killer.join(KILL_GRACE)


@dataclass
class _Task:
    """A chunk a worker holds: ``parts``, slices of messages in the object store (first attempts), or ``chunk``,
    (item, failed attempts so far) pairs by value; ``pos`` set: sent one item at a time (by value)."""

    seq: int
    chunk: list[tuple[Any, int]]
    parts: list[tuple[RefBatch, int, int]] = field(default_factory=list)  # (message, start, stop) each
    pos: int | None = None  # after a worker died holding the chunk: the item being run alone
    acc: worker.ChunkResult | None = None  # results of the items before pos
    outs: list[tuple[int, RefBatch]] = field(default_factory=list)  # their outputs by reference
    closing: bool = False  # the close request (worker.CLOSE): no items

    def size(self) -> int:
        """Items of the chunk."""
        return sum(stop - start for _, start, stop in self.parts) if self.parts else len(self.chunk)


@dataclass
class _Worker:
    """A worker actor of a stage, seen from its runner."""

    name: str
    actor: Any
    ready: Any  # the ref of start(), until it is done
    ref: Any = None  # the ref of the call in flight (its result)
    out: Any = None  # the ref of its outputs (by reference)
    task: _Task | None = None
    check_at: float | None = None  # when to ask how long the current call has run (timeouts)
    timed_out: int | None = None  # index in the sent piece of the item whose call timed out
    where: dict[str, Any] = field(default_factory=dict)  # its pid and node, once started
    close_after_start: bool = False  # the stage's input ended while it was starting: close it once started


class StageRunner(StageRunnerCore):
    """A consumer or pool stage, run from one thread of the driver (see the module docstring).

    What it does with results, dead workers' items and a stop is ``StageRunnerCore``'s, as on the local
    backend; here: fetching messages from the hub and calling the worker actors.  From a FIFO queue it
    gets ``RefBatch`` messages and hands out slices of them; the workers' outputs come back as references
    that it forwards (the items are fetched only for a ``collect`` stage, a LIFO output, or the chunk of a
    worker that died).  A worker that dies holding a chunk says nothing of how far it got: unless a
    timeout told which item was in hand, the chunk runs again one item at a time, to find the item that
    kills it.
    """

    def __init__(self, sup: RaySupervisor, plan: StagePlan) -> None:
        collect = sup.collected[plan.name].extend if plan.function == "collect" else None
        self.outputs = [sup.channels[q] for q in plan.outputs]

        def emitter(channels: list[RayChannel]) -> RayEmitter:
            return RayEmitter(channels, on_batch=collect)

        dead = RayEmitter([sup.channels[plan.dead_letter]]) if plan.dead_letter else None
        super().__init__(sup, plan, emitter, self.outputs, dead)
        self.sup: RaySupervisor = sup
        self.input = sup.channels[plan.inputs[0]]
        self.workers: list[_Worker] = []
        self.buffer: deque[tuple[Any, int]] = deque()  # (item, failed attempts so far) from a LIFO, for a worker
        self.parts: deque[list[Any]] = deque()  # [RefBatch, next item to hand out] from a FIFO, for workers
        self.buffered = 0  # items in buffer and parts
        self.again: deque[_Task] = deque()  # chunks of dead workers, to hand out again
        self.per_item: float | None = None  # seconds one item takes a worker (moving average), for chunk sizes
        self.item_bytes = 0  # pickled bytes of an item, from the last batch read (chunks of at most ~RAY_BYTES)
        self.fetch: Any = None  # the ref of the input get in flight
        self.wake: Any = None

    def start(self) -> None:
        self.wake = self.sup.hub.wait_flag.remote(self.plan.name)
        for name in self.plan.process_names:
            self._spawn(name)
        self.thread.start()

    def _spawn(self, name: str) -> None:
        actor = _WorkerActor.options(scheduling_strategy=SPREAD).remote(self.sup.spec(self.plan, name))
        self.workers.append(_Worker(name, actor, actor.start.remote()))

    def _wake(self) -> None:
        self.sup.hub.set_flag.remote(self.plan.name)

    def in_hand(self) -> int:
        """Not known on Ray until the chunk returns."""
        return 0

    def calls(self) -> int | None:
        """Calls in flight, as the workers last reported them (every ``LINGER`` while they change)."""
        if self.plan.concurrency == 1:
            return None
        return sum(self.sup.calls_live.get(w.name, 0) for w in list(self.workers))

    def unhanded(self) -> int:
        return self.buffered + sum(t.size() - (t.pos or 0) for t in self.again)

    # -- the runner thread -----------------------------------------------------------------------------

    def _close_workers(self) -> None:
        for w in self.workers:
            if w.ready is not None:  # still starting: asked once it has started
                w.close_after_start = True
            elif w.task is None:
                self._send_close(w)

    def _send_close(self, w: _Worker) -> None:
        w.task = _Task(self.next_seq, [], closing=True)
        self.next_seq += 1
        w.ref = w.actor.close_stage.remote(w.task.seq)
        w.check_at = time.monotonic() + self.plan.timeout if self.plan.timeout else None

    def _busy(self) -> bool:
        return any(w.task is not None or w.close_after_start for w in self.workers)

    def _wait(self) -> None:
        # Up to two messages ahead: a chunk is at most what is left of one, and a fair share of what is read.
        if not (self.input_done or self.stopping) and self.fetch is None and self.buffered < 2 * RAY_BATCH:
            self.fetch = self.input.get_ref()
        refs = ([self.wake] if self.wake is not None else []) + ([self.fetch] if self.fetch is not None else [])
        refs += [w.ready for w in self.workers if w.ready is not None]
        refs += [w.ref for w in self.workers if w.ref is not None]
        # stop() and abort() wake it through the hub: if the hub is gone (it never started, or died), it still
        # looks at its flags every FLAG_POLL seconds.
        deadline = self._next_deadline()
        ready, _ = ray.wait(refs, num_returns=1, timeout=FLAG_POLL if deadline is None else min(deadline, FLAG_POLL))
        for ref in ready:
            if ref == self.fetch:
                self._take_fetched()
            elif ref == self.wake:
                self.wake = None  # set once, for stop or abort: both are flags of this runner now
            else:
                self._worker_ready(ref)
        self._enforce_timeouts()

    def _take_fetched(self) -> None:
        got, held = ray.get(self.fetch)  # a RefBatch (FIFO), a list of items (LIFO), None at the end
        self.fetch = None
        if not self._accepting(got):
            return
        name = self.plan.inputs[0]  # the hub's count of the queue is a high-water sample too
        self.sup.high_water[name] = max(self.sup.high_water[name], held)
        if isinstance(got, RefBatch):
            self._taking(got.n)
            self.buffered += got.n
            self.parts.append([got, 0])
            self.item_bytes = got.size // max(1, got.n)
        else:
            self._taking(len(got))
            self.buffered += len(got)
            self.buffer.extend((item, 0) for item in got)
            if got:
                self.item_bytes = len(pickle.dumps(got[0], pickle.HIGHEST_PROTOCOL))

    def _next_task(self) -> _Task | None:
        """A chunk from the dead workers' chunks, else cut from what was read: within one message, but for a
        ``batch`` stage, whose chunks are whole batches."""
        if self.again:
            return self.again.popleft()
        if not self.buffered or self._holding(self.buffered) is not None:
            return None
        size = min(self._whole_batches(self._chunk_size()), self.buffered)
        task = _Task(self.next_seq, [])
        if self.parts:
            if not self.plan.batch:
                size = min(size, self.parts[0][0].n - self.parts[0][1])
            left = size
            while left:
                part = self.parts[0]
                message, start = part
                stop = min(message.n, start + left)
                task.parts.append((message, start, stop))
                left -= stop - start
                part[1] = stop
                if stop == message.n:
                    self.parts.popleft()
        else:
            task.chunk = [self.buffer.popleft() for _ in range(size)]
        self.buffered -= size
        self.next_seq += 1
        return task

    def _dispatch(self) -> None:
        for w in self.workers:
            if w.ready is not None or w.ref is not None:
                continue
            if w.task is None:
                w.task = self._next_task()
                if w.task is None:
                    continue
            task = w.task
            if task.parts:
                w.ref, w.out = w.actor.run_chunk.remote(task.seq, [], task.parts)
            else:
                piece = task.chunk if task.pos is None else task.chunk[task.pos : task.pos + 1]
                w.ref, w.out = w.actor.run_chunk.remote(task.seq, piece)
            w.timed_out = None
            w.check_at = time.monotonic() + self.plan.timeout if self.plan.timeout else None

    def _chunk_size(self) -> int:
        """``chunksize``, else a fair share of what was read that takes about CHUNK_SECONDS at the measured pace,
        within a message of the output queues (a worker's outputs go on as one)."""
        if self.plan.chunksize:
            return self.plan.chunksize
        fair = math.ceil(self.buffered / len(self.workers))
        paced = FIRST_CHUNK if self.per_item is None else int(CHUNK_SECONDS / max(self.per_item, 1e-7))
        slots = self.plan.concurrency * (self.plan.batch or 1)  # items a worker can have in calls at once
        most = min([c.batch for c in self.outputs if c.kind == "fifo"], default=RAY_CHUNK)
        return max(1, min(RAY_CHUNK, most, fair, max(paced, slots), RAY_BYTES // max(1, self.item_bytes)))

    def _worker_ready(self, ref: Any) -> None:
        w = next(w for w in self.workers if ref in (w.ready, w.ref))
        try:
            value = ray.get(ref)
        except RayActorError:
            self._exited(w)
            return
        except RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            first = (str(cause).strip().splitlines() or [""])[0]
            msg = f"stage {self.plan.name!r} (process {w.name}) failed: {type(cause).__name__}: {first}"
            raise StageFailed(msg) from None
        if ref == w.ready:
            w.ready = None
            error, w.where = value
            if error is not None:
                raise StageFailed(f"stage {self.plan.name!r} (process {w.name}) failed: {error}")
            if w.close_after_start:
                w.close_after_start = False
                self._send_close(w)
            return
        w.ref = None
        if isinstance(value, worker.ChunkResult):  # the answer to a close request: by value
            res, n, size = value, None, 0
        else:
            res, n, size = value
        outs = [(n, RefBatch(n, size, w.out if size else None))] if n else []
        w.out = None
        self._result(w, res, outs)
        if w.timed_out is not None and w in self.workers:  # it finished just before being killed: replace it
            self.workers.remove(w)
            self.exited(w.name, None, **w.where)
            self.replaced(w.name, f"call timed out after {self.plan.timeout:g}s")
            self._spawn(w.name)

    def _result(self, w: _Worker, res: worker.ChunkResult, outs: list[tuple[int, RefBatch]]) -> None:
        """A worker's answer; ``outs``: its outputs by reference (else they are in ``res``)."""
        if res.error is not None:
            self._count(w.name, res)  # raises StageFailed
        task = w.task
        assert task is not None
        retire = res.retire
        if res.done:
            pace = res.busy / res.done
            self.per_item = pace if self.per_item is None else 0.7 * self.per_item + 0.3 * pace
        if task.pos is not None:  # one item of a chunk sent alone: add it up until the chunk is done
            acc = task.acc = task.acc or self._empty(task.seq)
            acc.outputs += res.outputs
            if acc.targets is not None and res.targets is not None:
                acc.targets += res.targets
            task.outs += outs
            acc.dead += res.dead
            for name in ("done", "skipped", "retried", "failed", "busy"):
                setattr(acc, name, getattr(acc, name) + getattr(res, name))
            task.pos += 1
            if task.pos < len(task.chunk):
                if retire:  # the rest of the chunk goes to the next worker
                    self.again.appendleft(task)
                    w.task = None
                    self._retire(w)
                return
            res, outs = acc, task.outs
        w.task = None
        self._finish(task.seq, res, outs)
        if retire:
            self._retire(w)

    def _empty(self, seq: int) -> worker.ChunkResult:
        """A result with nothing in it yet (with routes: no targets yet)."""
        return worker.ChunkResult(seq, [], [], targets=[] if self.plan.routes else None)

    def _finish(self, seq: int, res: worker.ChunkResult, outs: list[tuple[int, RefBatch]]) -> None:
        """Count a finished chunk, send its dead letters and emit its outputs (``outs``: by reference, which
        ``RayEmitter.emit_packed`` forwards)."""
        self._count(self.plan.name, res)
        packed: Any = outs or None  # RayEmitter.emit_packed takes a RefBatch where a local emitter takes bytes
        self._emit(seq, [(res.outputs, None, packed, res.targets)])

    def _retire(self, w: _Worker) -> None:
        """maxtasksperchild: replace the worker with a fresh one of the same name."""
        _stop_actor(w.actor)
        self.workers.remove(w)
        self.exited(w.name, 0, **w.where)
        self._spawn(w.name)

    def _exited(self, w: _Worker) -> None:
        """A worker actor died (or was killed for a timeout): policy for its item, then a replacement."""
        self.workers.remove(w)
        if self.plan.lock:
            self.sup.hub.release_held.remote(w.name)
        timed_out = w.timed_out is not None
        died = died_message(self.plan.name, w.name)
        if w.ready is not None:  # it never started: a replacement would die the same way
            raise StageFailed(f"{died}, while starting (its init, or importing its function?)")
        reason = f"call timed out after {self.plan.timeout:g}s (worker {w.name} replaced)" if timed_out else died
        self.exited(w.name, None, reason=reason, **w.where)
        task = w.task
        if task is not None and task.closing:
            self.died_closing(w.name, task.seq, reason)
        elif task is not None:
            self._by_value(task)
            if task.pos is not None:
                index: int | None = task.pos
            elif timed_out:
                index = w.timed_out
            else:
                index = 0 if len(task.chunk) == 1 else None
            if index is not None:
                self._recover(w, task, index, reason)
            elif self.plan.on_error == "fail":
                first = worker.short_repr(task.chunk[0][0])
                msg = (f"stage {self.plan.name!r} (process {w.name}) failed holding {len(task.chunk)} items "
                       f"from {first}: {died}")
                raise StageFailed(msg)
            elif self.plan.restart:
                # Which item killed it is unknown: run the chunk again one item at a time, to find out.
                self.stats.failed += 1
                task.pos, task.acc = 0, None
                self.again.appendleft(task)
                self.sup.log.warning("chunk in a dead worker: run again one item at a time", stage=self.plan.name,
                                     process=w.name, items=len(task.chunk))
        if not timed_out and not self.plan.restart:
            raise StageFailed(f"{died}; restart: false, so the run stops")
        self.replaced(w.name, reason)
        if not self.stopping:
            self._spawn(w.name)

    def _recover(self, w: _Worker, task: _Task, index: int, reason: str) -> None:
        """Apply the error policy to the item a dead worker held; hand the rest of its chunk out again.

        Sent whole, the items before ``index`` ran but their outputs died with the worker: they run again.
        Sent one at a time (``task.pos`` = ``index``), the items before it are done and added up already.
        """
        chunk = list(task.chunk)
        item, attempts = chunk[index]
        attempts += 1
        if self.give_up(w.name, item, attempts, None, reason) == Decision.RETRY:
            chunk[index] = (item, attempts)
        else:
            del chunk[index]
        task.chunk = chunk
        if task.pos is not None and task.pos >= len(chunk):
            self._finish(task.seq, task.acc or self._empty(task.seq), task.outs)
        elif not chunk:
            self._emit(task.seq, [])
        else:
            self.again.appendleft(task)

    def _by_value(self, task: _Task) -> None:
        """The items of a chunk by reference, fetched (a worker died holding them: the policy names the item)."""
        for message, start, stop in task.parts:
            task.chunk += [(item, 0) for item in pickle.loads(ray.get(message.ref))[start:stop]]
        task.parts = []

    def _next_deadline(self) -> float | None:
        checks = [w.check_at for w in self.workers if w.ref is not None and w.check_at is not None]
        held = self._holding(self.buffered)
        if held is not None:
            checks.append(time.monotonic() + held)
        return None if not checks else max(0.0, min(checks) - time.monotonic())

    def _enforce_timeouts(self) -> None:
        if not self.plan.timeout:
            return
        now = time.monotonic()
        for w in self.workers:
            if w.ref is None or w.check_at is None or now < w.check_at or w.timed_out is not None:
                continue
            try:
                index, elapsed = ray.get(w.actor.elapsed.remote(), timeout=KILL_GRACE)
            except GetTimeoutError:  # too stuck even to answer: its call is past the timeout
                index, elapsed = -1, self.plan.timeout
            except RayActorError:
                continue  # its death shows on its call
            if elapsed >= self.plan.timeout:
                w.timed_out = max(index, 0)
                w.check_at = None
                _kill(w.actor)  # its call then fails with RayActorError: _exited applies the policy
            else:
                w.check_at = now + (self.plan.timeout - elapsed if elapsed >= 0 else self.plan.timeout)

    def _stop_workers(self) -> None:
        for w in self.workers:
            if w.ready is not None and not self.aborted:  # a worker still starting ends started, as locally
                with contextlib.suppress(Exception):
                    _, w.where = ray.get(w.ready, timeout=START_TIMEOUT)
            _stop_actor(w.actor)
            self.exited(w.name, 0 if not self.aborted and w.task is None else None, **w.where)
        self.workers.clear()


def _install_signals(sup: RaySupervisor) -> dict[int, Any] | None:
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        sup.bell.put(Signal(signum))  # SimpleQueue.put is safe in a signal handler

    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous: dict[int, Any] | None) -> None:
    for signum, old in (previous or {}).items():
        signal.signal(signum, old)
