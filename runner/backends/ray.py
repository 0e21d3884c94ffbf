"""Run a compiled ``Topology`` on Ray: the same stages, queues, policies and summary as the local backend.

    driver (this process)                              Ray actors (one actor = one process of a stage)
    ---------------------                              ------------------------------------------------
    RaySupervisor: bell loop, starts stages,           producer actors --put--> _Hub: queues (fifo | lifo)
                   ends queues                                                        named locks
    StageRunner thread per consumer/pool stage <--get-- _Hub                         relay, wake-up flags
        --run_chunk--> its worker actors (process_names) --ChunkResult--> runner --Emitter--put--> _Hub
    relay thread <--take-- _Hub <--post-- every stage actor: log records, stdout/stderr lines
    relay thread --> log queue --> Listener (stderr, log_file); stdout lines --> sys.stdout

Producers are actors that put batches into the hub's queues.  Each consumer or pool stage is read by
one ``StageRunner`` thread of the driver, as on the local backend: it fetches one batch at a time from
its input queue, hands chunks to its worker actors, emits their results (in input order for
``ordered: true``) and applies the error policy to items held by a worker that died or timed out, then
replaces it.  Everything moves in batches: a Ray call costs about a millisecond, an item a microsecond.

The hub is one async actor for the whole run (every actor is a process that takes about a second to
start).  End of stream is the driver's: when every stage writing to a queue has finished, it ends the
queue: n ``None`` markers behind every batch of a FIFO queue, or the LIFO stack closed so that its
readers get ``None`` only once it is empty.

Every actor asks for no CPU (a pipeline never waits for resources it states as process counts); stage
actors are spread over the nodes.  A worker actor's death shows as its call failing with
``RayActorError``; a call that outlives ``timeout`` is found by asking the worker (a second thread of the
actor) how long its current call has run, and the worker is killed and replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import logging
import math
import multiprocessing
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

import runner
import schemas
from runner import logs, worker
from runner.errors import RunFailed, UsageError
from runner.queues import LIFO_TAKE, Emitter, dumps
from runner.supervisor import RunResult, StageStats, logging_state, queue_accounts, restore_logging
from runner.topology import BATCH_BYTES, LINGER, QueuePlan, StagePlan, Topology

RAY_BATCH = 8192  # most items one queue message carries (a Ray call costs about a millisecond)
RAY_CHUNK = 2048  # most items one call of a worker carries (a worker that dies loses at most its chunk)
CHUNK_SECONDS = 0.1  # chunks are sized to take about this long, from the measured time per item
FIRST_CHUNK = 16  # items of the first chunks, before any time per item is known
CONNECT_TIMEOUT = 5.0  # seconds to wait for a cluster's address to accept a connection
START_TIMEOUT = 30.0  # seconds a worker that got no item gets to start, at the end of its stage
KILL_GRACE = 2.0  # seconds an actor gets to flush its records before it is killed
RELAY_BATCH = 256  # records or output lines an actor buffers before it sends them anyway
SPREAD = "SPREAD"  # stage actors go round the nodes
RAY_MARKERS = (":actor_name:", ":task_name:", ":job_id:")  # lines Ray prints for its log files, not the user's


# -- the hub: one actor serving the run's queues, locks, relay and wake-up flags ------------------------------


class _Queue:
    """One queue of the run, inside the hub: a FIFO of batches (bounded in batches) or a LIFO stack (in items),
    and in bytes (``max_bytes``, as their writers measured them pickled; a lone message always passes)."""

    def __init__(self, kind: str, slots: int, maxsize: int, max_bytes: int = 0) -> None:
        self.kind = kind
        # FIFO: batches put by the writer stages, taken whole by the readers, then one None marker per reader.
        # LIFO: items pushed by the writer stages, popped newest first by the readers.
        self.items: deque[Any] = deque()
        self.sizes: deque[int] = deque()  # parallel to items: pickled bytes of each
        self.bytes = 0
        self.max_bytes = max_bytes
        self.room = slots if kind == "fifo" else maxsize  # 0: unbounded
        self.closed = False  # LIFO: every writer has finished
        self.dropped = False  # the run is over: nothing waits any more
        self.changed = asyncio.Condition()

    def _full(self, size: int) -> bool:
        return bool(self.room and len(self.items) >= self.room) or (
            bool(self.max_bytes) and self.bytes > 0 and self.bytes + size > self.max_bytes)

    async def _wait_for_room(self, size: int = 0) -> bool:
        while self._full(size) and not self.dropped:
            await self.changed.wait()
        return not self.dropped

    async def put(self, batch: list[Any], size: int = 0) -> None:
        async with self.changed:
            if await self._wait_for_room(size):
                if self.kind == "fifo":
                    self.items.append(batch)
                    self.sizes.append(size)
                else:
                    self.items.extend(batch)
                    self.sizes.extend([size // max(1, len(batch))] * len(batch))
                self.bytes += size
                self.changed.notify_all()

    async def get(self) -> list[Any] | None:
        """A batch (LIFO: up to LIFO_TAKE items, newest first); ``None`` is the end of the stream."""
        async with self.changed:
            while not self.items and not self.closed and not self.dropped:
                await self.changed.wait()
            if not self.items:
                return None
            if self.kind == "fifo":
                taken = self.items.popleft()
                self.bytes -= self.sizes.popleft()
            else:
                n = min(LIFO_TAKE, len(self.items))
                taken = [self.items.pop() for _ in range(n)]
                self.bytes -= sum(self.sizes.pop() for _ in range(n))
            self.changed.notify_all()
            return taken

    async def end(self, readers: int) -> None:
        async with self.changed:
            if self.kind == "lifo":
                self.closed = True
            else:
                for _ in range(readers):
                    if not await self._wait_for_room():
                        break
                    self.items.append(None)
                    self.sizes.append(0)
            self.changed.notify_all()

    async def drop(self) -> None:
        async with self.changed:
            self.dropped = True
            self.items.clear()
            self.sizes.clear()
            self.bytes = 0
            self.changed.notify_all()


@ray.remote(num_cpus=0)
class _Hub:
    """The run's broker: its queues, its named locks, the relay of records and output lines, wake-up flags.

    One actor for all of them: each Ray actor is a process that takes about a second to start.
    """

    def __init__(self, queues: dict[str, tuple[str, int, int]]) -> None:
        self.queues = {name: _Queue(*spec) for name, spec in queues.items()}
        # ("log", LogRecord) and ("out", "stdout"|"stderr", text) entries, posted by actors, taken by the driver.
        self.entries: list[tuple[Any, ...]] = []
        self.more = asyncio.Event()
        self.closed = False
        self.locks: dict[str, asyncio.Lock] = {}
        self.holders: dict[str, str] = {}
        self.flags: dict[str, asyncio.Event] = {}

    async def put(self, queue: str, batch: list[Any], size: int = 0) -> None:
        await self.queues[queue].put(batch, size)

    async def get(self, queue: str) -> list[Any] | None:
        return await self.queues[queue].get()

    async def end(self, queue: str, readers: int) -> None:
        await self.queues[queue].end(readers)

    async def drop_queues(self) -> None:
        """The run is over: every put or get still waiting returns (a stage blocked on a full queue ends)."""
        for q in self.queues.values():
            await q.drop()

    async def post(self, entries: list[tuple[Any, ...]]) -> None:
        self.entries.extend(entries)
        self.more.set()

    async def take(self) -> list[tuple[Any, ...]] | None:
        """Every entry posted so far, waiting for one; ``None`` once closed and empty."""
        while not self.entries and not self.closed:
            self.more.clear()
            await self.more.wait()
        if not self.entries:
            return None
        taken, self.entries = self.entries, []
        return taken

    async def close(self) -> None:
        self.closed = True
        self.more.set()

    async def ready(self) -> None:
        """Answers once the hub runs: the driver waits for that, at most START_TIMEOUT."""

    async def acquire(self, name: str, holder: str) -> None:
        lock = self.locks.setdefault(name, asyncio.Lock())
        await lock.acquire()
        self.holders[name] = holder

    async def release(self, name: str) -> None:
        self.holders.pop(name, None)
        self.locks[name].release()

    async def release_held(self, holder: str) -> None:
        """Release the locks a dead worker held."""
        for name, who in list(self.holders.items()):
            if who == holder:
                await self.release(name)

    async def wait_flag(self, name: str) -> None:
        await self.flags.setdefault(name, asyncio.Event()).wait()

    async def set_flag(self, name: str) -> None:
        self.flags.setdefault(name, asyncio.Event()).set()


# -- small objects that cross to the actors -------------------------------------------------------------------


def _batch(plan: QueuePlan) -> int:
    """Most items per message: a Ray call costs ~100x a pipe write, so FIFO batches are larger than the local
    backend's (within maxsize).  A LIFO batch is pushed in order, its newest item on top; small, so it waits little."""
    if plan.type == "lifo":
        return min(plan.batch, LIFO_TAKE)
    return min(RAY_BATCH, plan.maxsize) if plan.maxsize else RAY_BATCH


def _slots(plan: QueuePlan) -> int:
    """Batches a FIFO queue holds before writers wait (about maxsize items); 0 = unbounded."""
    return 0 if plan.maxsize == 0 else max(1, plan.maxsize // _batch(plan))


class RayChannel:
    """A queue of the hub, with the interface ``runner.queues.Emitter`` and readers use."""

    def __init__(self, hub: Any, plan: QueuePlan) -> None:
        self.hub = hub
        self.name = plan.name
        self.readers = plan.reader_processes
        self.batch = _batch(plan)

    def put(self, batch: list[Any]) -> int:
        """Put a batch (waits while the queue is full); returns its pickled size (the Emitter cuts batches by it)."""
        size = len(dumps(batch))  # an unpicklable item fails here, in its writer, naming the item
        ray.get(self.hub.put.remote(self.name, batch, size))
        return size

    def get_ref(self) -> Any:
        return self.hub.get.remote(self.name)

    def end(self, readers: int) -> None:
        self.hub.end.remote(self.name, readers)


class RayLock:
    """A named lock served by the hub; ``with lock:`` around each call, as ``worker.call`` does."""

    def __init__(self, hub: Any, name: str, holder: str) -> None:
        self.hub, self.name, self.holder = hub, name, holder

    def __enter__(self) -> Self:
        ray.get(self.hub.acquire.remote(self.name, self.holder))
        return self

    def __exit__(self, *exc: object) -> None:
        ray.get(self.hub.release.remote(self.name))


class _Relay:
    """Actor side of the relay: buffers entries, sends them every ``LINGER`` seconds, one post in flight.

    It is the queue of the actor's ``ContextQueueHandler`` (``put_nowait``), and what its ``sys.stdout``
    and ``sys.stderr`` write to.  ``flush`` returns once everything is at the hub.
    """

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.buffer: list[tuple[Any, ...]] = []
        self.pending: Any = None
        self.lock = threading.RLock()  # a record logged while sending (by Ray itself) must not deadlock
        threading.Thread(target=self._linger, name="relay-linger", daemon=True).start()

    def put_nowait(self, record: logging.LogRecord) -> None:
        self.add(("log", record))

    def add(self, entry: tuple[Any, ...]) -> None:
        with self.lock:
            self.buffer.append(entry)
            if len(self.buffer) >= RELAY_BATCH:
                self._send()

    def _send(self) -> None:
        if self.pending is not None:
            with contextlib.suppress(Exception):  # a lost hub: the run is over, nothing to relay to
                ray.get(self.pending)  # posts arrive in order, never overtaking each other
            self.pending = None
        if self.buffer:
            batch, self.buffer = self.buffer, []
            self.pending = self.hub.post.remote(batch)

    def _linger(self) -> None:
        while True:
            time.sleep(LINGER)
            with self.lock:
                self._send()

    def flush(self) -> None:
        with self.lock:
            self._send()
            self._send()


class _Lines(io.TextIOBase):
    """A text stream that relays whole lines (a ``print`` writes text, then a newline)."""

    encoding = "utf-8"

    def __init__(self, relay: _Relay, stream: str) -> None:
        super().__init__()
        self.relay, self.stream, self.partial = relay, stream, ""
        self.lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self.lock:
            whole = self.partial + text
            cut = whole.rfind("\n") + 1
            self.partial = whole[cut:]
            lines = whole[:cut]
            if lines.startswith(RAY_MARKERS):  # Ray's own ":actor_name:..." line, meant for its log files
                lines = "".join(line for line in lines.splitlines(True) if not line.startswith(RAY_MARKERS))
            if lines:
                self.relay.add(("out", self.stream, lines))
        return len(text)

    def flush(self) -> None:
        with self.lock:
            if self.partial:
                self.relay.add(("out", self.stream, self.partial))
                self.partial = ""



@dataclass
class ActorSpec:
    """What one actor of a stage needs (pickled to it)."""

    stage: StagePlan
    name: str
    index: int
    base_dir: str | None  # None: the tasks modules came with runtime_env working_dir, the actor's cwd
    log_level: str
    hub: Any
    outputs: list[RayChannel] = field(default_factory=list)
    lock: RayLock | None = None
    limit: int | None = None


def _bootstrap(spec: ActorSpec) -> tuple[_Relay, str, Any]:
    """First thing in every stage actor: import path, name, logging and output through the relay."""
    base_dir = spec.base_dir or os.getcwd()
    if base_dir not in sys.path:
        sys.path.insert(0, base_dir)
    multiprocessing.current_process().name = spec.name
    relay = _Relay(spec.hub)
    node = ray.util.get_node_ip_address()
    logs.configure(relay, spec.log_level, stage=spec.stage.name, process=spec.name, node=node)
    sys.stdout = _Lines(relay, "stdout")  # type: ignore[assignment]
    sys.stderr = _Lines(relay, "stderr")  # type: ignore[assignment]
    return relay, base_dir, logs.get_logger("mprun")


def _where() -> dict[str, Any]:
    """The pid and node of this actor, for the driver's records about it."""
    return {"pid": os.getpid(), "node": ray.util.get_node_ip_address()}


def _flush(relay: _Relay) -> None:
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    relay.flush()


@ray.remote(num_cpus=0, max_concurrency=2)
class _ProducerActor:
    """One process of a producer stage: its share of the source, in batches, to every output queue."""

    def __init__(self, spec: ActorSpec) -> None:
        self.spec = spec
        self.relay, self.base_dir, self.log = _bootstrap(spec)

    def __repr__(self) -> str:
        return self.spec.name

    def run(self) -> tuple[int, float, str | None, dict[str, Any]]:
        """Emit the items; returns (items sent, seconds, error or None, where it ran)."""
        spec, stage = self.spec, self.spec.stage
        self.log.info("process started")
        started = self.started = time.perf_counter()
        emitter = self.emitter = Emitter(spec.outputs)  # type: ignore[arg-type]
        error = None
        try:
            items: Any = worker.source_items(stage.source or {}, stage.kwargs, self.base_dir)
            if spec.limit is not None:
                items = itertools.islice(items, spec.limit)
            if stage.processes > 1:
                items = itertools.islice(items, spec.index, None, stage.processes)
            for item in items:
                emitter.emit(item)
            emitter.close()
        except Exception as e:  # noqa: BLE001 - reported to the driver, never lost
            error = f"{type(e).__name__}: {e}"
            self.log.error("source failed", error=error, exception=traceback.format_exc())
        finally:
            _flush(self.relay)
        return emitter.sent, time.perf_counter() - started, error, _where()

    def stop(self) -> tuple[int, float, dict[str, Any]]:
        """Send every buffered record and line (the driver then kills the actor); (items sent, seconds, where)."""
        _flush(self.relay)
        emitter = getattr(self, "emitter", None)
        seconds = time.perf_counter() - self.started if emitter else 0.0
        return (emitter.sent if emitter else 0), seconds, _where()


@ray.remote(num_cpus=0, max_concurrency=2)
class _WorkerActor:
    """One process of a consumer or pool stage: chunks in, ``worker.ChunkResult`` out (one call at a time)."""

    def __init__(self, spec: ActorSpec) -> None:
        self.spec = spec
        self.relay, self.base_dir, self.log = _bootstrap(spec)
        self.progress = [0] * worker.PROGRESS_SLOTS  # as a local worker's (worker.WorkerSpec.progress): [0] item in hand, [1] call start
        self.fn: Any = None
        self.tasks = 0

    def __repr__(self) -> str:
        return self.spec.name

    def start(self) -> tuple[str | None, dict[str, Any]]:
        """Run ``init`` and import the function; (the error that stops the stage or None, where it runs)."""
        self.log.info("process started")
        stage = self.spec.stage
        try:
            if stage.init:
                worker.resolve(stage.init, self.base_dir)()
            self.fn = worker.make_function(stage, self.base_dir, None)
        except Exception as e:  # noqa: BLE001 - the stage cannot start: say why, once
            summary = f"{type(e).__name__}: {e}"
            self.log.error("worker could not start", error=summary, exception=traceback.format_exc())
            return summary, _where()
        return None, _where()

    def run_chunk(self, seq: int, chunk: list[tuple[Any, int]]) -> worker.ChunkResult:
        stage = self.spec.stage
        result = worker.run_chunk(self.fn, stage, seq, chunk, self.spec.lock, self.progress, self.log)
        self.tasks += 1
        result.retire = bool(stage.maxtasksperchild and self.tasks >= stage.maxtasksperchild)
        ends, result.ends = result.ends, []
        try:  # as on the local backend: an output that cannot be pickled fails its item, under the policy
            pickle.dumps(result, pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001
            result.ends = ends
            result = worker._without_unpicklable(stage, result, [item for item, _ in chunk], self.log)
        return result

    def elapsed(self) -> tuple[int, float]:
        """(index of the item in hand, seconds its call has run; -1 when no call runs)."""
        index, started = self.progress[:2]
        return int(index), (time.monotonic() - started / 1e9 if started > 0 else -1.0)

    def stop(self) -> None:
        """Send every buffered record and line (the driver then kills the actor)."""
        _flush(self.relay)


# -- the driver --------------------------------------------------------------------------------------------


class _StageFailed(Exception):
    """A stage cannot go on; the message names the stage and says why."""


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


class RaySupervisor:
    """Runs one ``Topology`` on Ray (a local instance, or the cluster at ``address`` / ``RAY_ADDRESS``)."""

    def __init__(self, topology: Topology, address: str | None = None) -> None:
        self.topo = topology
        self.given_address = address
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.log = logs.get_logger("mprun")
        self.stats = {s.name: StageStats(processes=s.processes, kind=s.kind) for s in topology.stages}
        self.collected: dict[str, list[Any]] = {s.name: [] for s in topology.stages if s.function == "collect"}
        self.exit_codes: dict[str, int | None] = {}
        self.producers: list[_Producer] = []
        self.runners: dict[str, StageRunner] = {}
        self.started: dict[str, float] = {}
        self.finished: set[str] = set()
        self.ended_queues: set[str] = set()
        self.failure: str | None = None
        self.channels: dict[str, RayChannel] = {}
        self.hub: Any = None
        self.relay_thread: threading.Thread | None = None
        self.signal_received = 0
        self.stop_deadline: float | None = None
        # Wakes the loop: ("signal", signum) from the handler, ("producer", p) and ("runner", name) when one ends,
        # ("failed", message) when the run cannot go on.
        self.bell: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.base_dir: str | None = topology.base_dir

    # -- the run ---------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Connect to Ray, start, supervise and shut down the whole topology."""
        t0 = time.perf_counter()
        # Records of the driver and, through the relay thread, of every actor; read by the listener.
        self.log_queue: queue.Queue[Any] = queue.Queue()
        listener = logs.start_listener(self.log_queue, self.topo.log_level, self.topo.log_format, self.topo.log_file)
        saved = logging_state()
        logs.configure(self.log_queue, self.topo.log_level, stage="-", process="MainProcess")
        owned = False
        previous = None
        try:
            owned = self._connect()
            previous = _install_signals(self)
            self._setup()
            self._loop()
        except KeyboardInterrupt:
            self.signal_received = self.signal_received or signal.SIGINT
            self.failure = self.failure or "stopped by SIGINT (second signal: stopped at once)"
        except RunFailed as e:
            self.failure = str(e)
        finally:
            _restore_signals(previous)
            try:
                if ray.is_initialized():
                    self._shutdown()
            finally:
                if owned:
                    _no_auto_connect()
                    ray.shutdown()
                listener.stop()
                logs.close_handlers(listener)
                restore_logging(saved)
        exit_code = 128 + self.signal_received if self.signal_received else 1 if self.failure else 0
        if self.signal_received:
            self.failure = self.failure or f"stopped by {signal.Signals(self.signal_received).name}"
        queues = queue_accounts(self.topo, self.stats)
        return RunResult(exit_code, self.stats, self.collected, self.failure, time.perf_counter() - t0, self.exit_codes, queues)

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
        self.hub = _Hub.remote({q.name: (q.type, _slots(q), q.maxsize, q.max_bytes) for q in plans})
        self.relay_thread = threading.Thread(target=self._relay, name="ray-relay", daemon=True)
        self.relay_thread.start()
        self.channels = {plan.name: RayChannel(self.hub, plan) for plan in plans}
        for stage in self.topo.stages:
            if stage.function == "jsonl":
                Path(self.topo.base_dir, str(stage.kwargs["path"])).write_text("")

    def _relay(self) -> None:
        """Relay thread: records to the listener's queue, output lines to this process's streams.

        It first waits (bounded) for the hub to run: an actor Ray never starts would otherwise leave every
        stage, and the run, waiting for ever.
        """
        try:
            ray.get(self.hub.ready.remote(), timeout=START_TIMEOUT)
        except GetTimeoutError:
            self.bell.put(("failed", f"Ray did not start the queue hub actor within {START_TIMEOUT:g}s"))
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
                else:
                    stream = sys.stdout if entry[1] == "stdout" else sys.stderr
                    stream.write(entry[2])
                    stream.flush()

    def _loop(self) -> None:
        self._start_ready_stages()
        while not self._all_done():
            timeout = None if self.stop_deadline is None else max(0.0, self.stop_deadline - time.monotonic())
            try:
                message = self.bell.get(timeout=timeout)
            except queue.Empty:
                self.log.warning("shutdown timeout passed: stopping what is left", timeout=self.topo.shutdown_timeout)
                return
            if message[0] == "signal":
                if self.stop_deadline is not None:
                    raise KeyboardInterrupt
                self.signal_received = message[1]
                self._begin_stop()
            elif message[0] == "producer":
                self._producer_done(message[1])
            elif message[0] == "failed":
                self.failure = self.failure or message[1]
            for r in self.runners.values():
                if r.error and not self.failure:
                    self.failure = r.error
            if self.failure:
                raise RunFailed(self.failure)
            self._advance()

    def _begin_stop(self) -> None:
        """First SIGINT/SIGTERM: stop producers, let in-flight items finish within shutdown_timeout."""
        name = signal.Signals(self.signal_received).name
        self.log.warning("stopping: producers stopped, in-flight items finishing", signal=name,
                         shutdown_timeout=self.topo.shutdown_timeout)
        self.stop_deadline = time.monotonic() + self.topo.shutdown_timeout
        for p in self.producers:
            if not p.done:
                p.stopping = True
                self._stopped(p, _stop_actor(p.actor))
        for stage in self.topo.stages:  # stages not started yet never will be
            self.started.setdefault(stage.name, time.perf_counter())
            if stage.name not in self.runners and stage.kind != "producer":
                self.finished.add(stage.name)

    def _all_done(self) -> bool:
        return all(s.name in self.finished for s in self.topo.stages if not s.daemon)

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
            if error is not None:
                code = 1
                self.failure = self.failure or f"stage {p.stage!r} (process {p.name}) failed: {error}"
        self.exit_codes[p.name] = code
        self.log.info("process exited", stage=p.stage, process=p.name, exitcode=code, **p.where)
        _kill(p.actor)  # its run is over (a no-op for a dead actor)

    def _advance(self) -> None:
        """Mark finished stages, end the queues they were the last writer of, start what may start."""
        for stage in self.topo.stages:
            if stage.name in self.finished or stage.name not in self.started:
                continue
            r = self.runners.get(stage.name)
            done = r.finished if r else all(p.done for p in self.producers if p.stage == stage.name)
            if done:
                self.finished.add(stage.name)
                self.stats[stage.name].seconds = time.perf_counter() - self.started[stage.name]
        for name, plan in self.topo.queues.items():
            if name not in self.ended_queues and all(w in self.finished for w in plan.writers):
                self.ended_queues.add(name)
                self.channels[name].end(plan.reader_processes)  # a remote call: never waits here
        if self.stop_deadline is None:
            self._start_ready_stages()

    def _start_ready_stages(self) -> None:
        for stage in self.topo.stages:
            if stage.name not in self.started and all(a in self.finished for a in stage.after):
                self._start_stage(stage)

    def _start_stage(self, stage: StagePlan) -> None:
        self.started[stage.name] = time.perf_counter()
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
            p.ref.future().add_done_callback(lambda _f, p=p: self.bell.put(("producer", p)))

    def spec(self, stage: StagePlan, name: str) -> ActorSpec:
        """The spec of a worker actor of ``stage``."""
        lock = RayLock(self.hub, stage.lock, name) if stage.lock else None
        outputs = [self.channels[q] for q in stage.outputs]
        return ActorSpec(stage, name, 0, self.base_dir, self.topo.log_level, self.hub, outputs, lock)

    # -- the end ---------------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Stop whatever still runs, let every actor send its records, then close the relay."""
        for r in self.runners.values():
            r.abort()
        for p in self.producers:
            if not p.done:
                self._stopped(p, _stop_actor(p.actor))
                p.done = True
                self.exit_codes[p.name] = None
                self.log.info("process exited", stage=p.stage, process=p.name, exitcode=None, **p.where)
        if self.hub is not None:
            with contextlib.suppress(Exception):
                ray.get(self.hub.drop_queues.remote(), timeout=KILL_GRACE)
        for r in self.runners.values():
            r.thread.join(KILL_GRACE * 4 + START_TIMEOUT)
        now = time.perf_counter()
        for name, t in self.started.items():
            if name not in self.finished:
                self.stats[name].seconds = now - t
        if self.hub is not None:
            with contextlib.suppress(Exception):  # a lost hub: the relay thread has ended already
                ray.get(self.hub.close.remote(), timeout=KILL_GRACE)
            if self.relay_thread is not None:
                self.relay_thread.join(KILL_GRACE + 5)
            _kill(self.hub)


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


def _stop_actor(actor: Any) -> Any:
    """Let a stage actor send its buffered records (bounded), then kill it; what its ``stop`` returned, or None."""
    said = None
    with contextlib.suppress(Exception):  # dead or stuck: killed all the same
        said = ray.get(actor.stop.remote(), timeout=KILL_GRACE)
    _kill(actor)
    return said


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
    """A chunk a worker holds: (item, failed attempts so far) pairs; ``pos`` set: sent one item at a time."""

    seq: int
    chunk: list[tuple[Any, int]]
    pos: int | None = None  # after a worker died holding the chunk: the item being run alone
    acc: worker.ChunkResult | None = None  # results of the items before pos


@dataclass
class _Worker:
    """A worker actor of a stage, seen from its runner."""

    name: str
    actor: Any
    ready: Any  # the ref of start(), until it is done
    ref: Any = None  # the ref of the call in flight
    task: _Task | None = None
    check_at: float | None = None  # when to ask how long the current call has run (timeouts)
    timed_out: int | None = None  # index in the sent piece of the item whose call timed out
    where: dict[str, Any] = field(default_factory=dict)  # its pid and node, once started


class StageRunner:
    """A consumer or pool stage, run from one thread of the driver (see the module docstring)."""

    def __init__(self, sup: RaySupervisor, plan: StagePlan) -> None:
        self.sup, self.plan = sup, plan
        self.stats = sup.stats[plan.name]
        self.input = sup.channels[plan.inputs[0]]
        collect = sup.collected[plan.name].extend if plan.function == "collect" else None
        self.emitter = Emitter([sup.channels[q] for q in plan.outputs], on_batch=collect)  # type: ignore[misc]
        self.dead_emitter = Emitter([sup.channels[plan.dead_letter]]) if plan.dead_letter else None  # type: ignore[list-item]
        self.workers: list[_Worker] = []
        self.buffer: deque[tuple[Any, int]] = deque()  # (item, failed attempts so far), waiting for a worker
        self.again: deque[_Task] = deque()  # chunks of dead workers, to hand out again
        self.results: dict[int, list[Any]] = {}  # outputs of finished chunks waiting for their turn (ordered)
        self.next_seq = 0
        self.next_out = 0
        self.per_item: float | None = None  # seconds one item takes a worker (moving average), for chunk sizes
        self.item_bytes = 0  # pickled bytes of an item, sampled from the last batch read (chunks of ~BATCH_BYTES)
        self.fetch: Any = None  # the ref of the input get in flight
        self.input_done = False
        self.aborted = False
        self.finished = False
        self.error: str | None = None
        self.wake: Any = None
        self.thread = threading.Thread(target=self._run, name=f"stage-{plan.name}", daemon=True)

    def start(self) -> None:
        self.wake = self.sup.hub.wait_flag.remote(self.plan.name)
        for name in self.plan.process_names:
            self._spawn(name)
        self.thread.start()

    def _spawn(self, name: str) -> None:
        actor = _WorkerActor.options(scheduling_strategy=SPREAD).remote(self.sup.spec(self.plan, name))
        self.workers.append(_Worker(name, actor, actor.start.remote()))

    def abort(self) -> None:
        """Stop the stage now (a failure elsewhere, a daemon stage at the end, a shutdown)."""
        self.aborted = True
        self.sup.hub.set_flag.remote(self.plan.name)

    # -- the runner thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
            if not self.aborted:
                self.emitter.close()
                if self.dead_emitter is not None:
                    self.dead_emitter.close()
        except _StageFailed as e:
            self.error = str(e)
        except Exception as e:  # noqa: BLE001 - e.g. an unpicklable result: reported, never lost
            self.error = f"stage {self.plan.name!r} failed: {type(e).__name__}: {e}"
        finally:
            self._stop_workers()
            for emitter in (self.emitter, self.dead_emitter):
                if emitter is not None:  # closed already after a normal end; else it must not call Ray later
                    emitter.stop(KILL_GRACE)
            self.stats.items_out = self.emitter.sent
            self.finished = True
            self.sup.bell.put(("runner", self.plan.name))

    def _loop(self) -> None:
        while not self.aborted:
            self._dispatch()
            if self.input_done and not self.buffer and not self.again and not any(w.task for w in self.workers):
                return
            if not self.input_done and self.fetch is None and len(self.buffer) < RAY_BATCH:
                self.fetch = self.input.get_ref()
            refs = [self.wake] + ([self.fetch] if self.fetch is not None else [])
            refs += [w.ready for w in self.workers if w.ready is not None]
            refs += [w.ref for w in self.workers if w.ref is not None]
            ready, _ = ray.wait(refs, num_returns=1, timeout=self._next_deadline())
            for ref in ready:
                if ref == self.fetch:
                    self._take_fetched()
                elif ref != self.wake:
                    self._worker_ready(ref)
            self._enforce_timeouts()

    def _take_fetched(self) -> None:
        batch = ray.get(self.fetch)
        self.fetch = None
        if batch is None:
            self.input_done = True
        else:
            self.stats.items_in += len(batch)
            self.buffer.extend((item, 0) for item in batch)
            if batch:  # chunks of about BATCH_BYTES, as the local backend cuts them
                self.item_bytes = len(pickle.dumps(batch[0], pickle.HIGHEST_PROTOCOL))

    def _dispatch(self) -> None:
        for w in self.workers:
            if w.ready is not None or w.ref is not None:
                continue
            if w.task is None:
                if self.again:
                    w.task = self.again.popleft()
                elif self.buffer:
                    size = min(self._chunk_size(), len(self.buffer))
                    w.task = _Task(self.next_seq, [self.buffer.popleft() for _ in range(size)])
                    self.next_seq += 1
                else:
                    continue
            task = w.task
            piece = task.chunk if task.pos is None else task.chunk[task.pos : task.pos + 1]
            w.ref = w.actor.run_chunk.remote(task.seq, piece)
            w.timed_out = None
            w.check_at = time.monotonic() + self.plan.timeout if self.plan.timeout else None

    def _chunk_size(self) -> int:
        """``chunksize``, else a fair share of the buffer that takes about CHUNK_SECONDS at the measured pace."""
        if self.plan.chunksize:
            return self.plan.chunksize
        fair = math.ceil(len(self.buffer) / len(self.workers))
        paced = FIRST_CHUNK if self.per_item is None else int(CHUNK_SECONDS / max(self.per_item, 1e-7))
        return max(1, min(RAY_CHUNK, fair, paced, BATCH_BYTES // max(1, self.item_bytes)))

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
            raise _StageFailed(msg) from None
        if ref == w.ready:
            w.ready = None
            error, w.where = value
            if error is not None:
                raise _StageFailed(f"stage {self.plan.name!r} (process {w.name}) failed: {error}")
            return
        w.ref = None
        self._result(w, value)
        if w.timed_out is not None and w in self.workers:  # it finished just before being killed: replace it
            self.workers.remove(w)
            self.sup.exit_codes[w.name] = None
            self.sup.log.info("process exited", stage=self.plan.name, process=w.name, exitcode=None, **w.where)
            self.stats.restarts += 1
            self._spawn(w.name)

    def _result(self, w: _Worker, res: worker.ChunkResult) -> None:
        if res.error is not None:
            summary, tb, item = res.error
            on = f" on item {item}" if item else ""
            self.sup.log.error("stage failed", stage=self.plan.name, process=w.name, error=summary, item=item, exception=tb)
            raise _StageFailed(f"stage {self.plan.name!r} (process {w.name}) failed{on}: {summary}")
        task = w.task
        assert task is not None
        retire = res.retire
        if res.done:
            pace = res.busy / res.done
            self.per_item = pace if self.per_item is None else 0.7 * self.per_item + 0.3 * pace
        if task.pos is not None:  # one item of a chunk sent alone: add it up until the chunk is done
            acc = task.acc = task.acc or worker.ChunkResult(task.seq, [], [])
            acc.outputs += res.outputs
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
            res = acc
        w.task = None
        self._finish(task.seq, res)
        if retire:
            self._retire(w)

    def _finish(self, seq: int, res: worker.ChunkResult) -> None:
        """Count a finished chunk, send its dead letters and emit its outputs."""
        st = self.stats
        st.skipped += res.skipped
        st.retried += res.retried
        st.failed += res.failed
        st.busy_seconds += res.busy
        st.delivered += res.done - res.skipped - len(res.dead)
        for letter in res.dead:
            self._dead_letter(letter)
        self._emit(seq, res.outputs)

    def _retire(self, w: _Worker) -> None:
        """maxtasksperchild: replace the worker with a fresh one of the same name."""
        _stop_actor(w.actor)
        self.workers.remove(w)
        self.sup.exit_codes[w.name] = 0
        self.sup.log.info("process exited", stage=self.plan.name, process=w.name, exitcode=0, **w.where)
        self._spawn(w.name)

    def _emit(self, seq: int, outputs: list[Any]) -> None:
        if not self.plan.ordered:
            self.emitter.emit_many(outputs)
            return
        self.results[seq] = outputs
        while self.next_out in self.results:
            self.emitter.emit_many(self.results.pop(self.next_out))
            self.next_out += 1

    def _dead_letter(self, letter: dict[str, Any]) -> None:
        assert self.dead_emitter is not None
        self.stats.dead_lettered += 1
        self.dead_emitter.emit(letter)

    def _exited(self, w: _Worker) -> None:
        """A worker actor died (or was killed for a timeout): policy for its item, then a replacement."""
        self.workers.remove(w)
        self.sup.exit_codes[w.name] = None
        if self.plan.lock:
            self.sup.hub.release_held.remote(w.name)
        timed_out = w.timed_out is not None
        died = died_message(self.plan.name, w.name)
        if w.ready is not None:  # it never started: a replacement would die the same way
            raise _StageFailed(f"{died}, while starting (its init, or importing its function?)")
        reason = f"call timed out after {self.plan.timeout:g}s (worker {w.name} replaced)" if timed_out else died
        self.sup.log.info("process exited", stage=self.plan.name, process=w.name, exitcode=None, reason=reason, **w.where)
        task = w.task
        if task is not None:
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
                msg = f"stage {self.plan.name!r} (process {w.name}) failed holding {len(task.chunk)} items from {first}: {died}"
                raise _StageFailed(msg)
            elif self.plan.restart:
                # Which item killed it is unknown: run the chunk again one item at a time, to find out.
                self.stats.failed += 1
                task.pos, task.acc = 0, None
                self.again.appendleft(task)
                self.sup.log.warning("chunk in a dead worker: run again one item at a time", stage=self.plan.name,
                                     process=w.name, items=len(task.chunk))
        if not timed_out and not self.plan.restart:
            raise _StageFailed(f"{died}; restart: false, so the run stops")
        self.stats.restarts += 1
        self.sup.log.warning("worker replaced", stage=self.plan.name, process=w.name, reason=reason)
        self._spawn(w.name)

    def _recover(self, w: _Worker, task: _Task, index: int, reason: str) -> None:
        """Apply the error policy to the item a dead worker held; hand the rest of its chunk out again.

        Sent whole, the items before ``index`` ran but their outputs died with the worker: they run again.
        Sent one at a time (``task.pos`` = ``index``), the items before it are done and added up already.
        """
        chunk = list(task.chunk)
        item, attempts = chunk[index]
        attempts += 1
        self.stats.failed += 1
        plan = self.plan
        decided = worker.verdict(plan, attempts)
        if decided == "retry":
            self.stats.retried += 1
            chunk[index] = (item, attempts)
        elif decided == "fail":
            raise _StageFailed(f"stage {plan.name!r} (process {w.name}) failed on item {worker.short_repr(item)}: {reason}")
        else:
            del chunk[index]
            if decided == "dead_letter":
                self._dead_letter(worker.give_up_letter(plan, item, reason, attempts))
            else:
                self.stats.skipped += 1
        self.sup.log.warning("item in a dead worker", stage=plan.name, process=w.name, item=worker.short_repr(item),
                             attempts=attempts, reason=reason)
        task.chunk = chunk
        if task.pos is not None and task.pos >= len(chunk):
            self._finish(task.seq, task.acc or worker.ChunkResult(task.seq, [], []))
        elif not chunk:
            self._emit(task.seq, [])
        else:
            self.again.appendleft(task)

    def _next_deadline(self) -> float | None:
        checks = [w.check_at for w in self.workers if w.ref is not None and w.check_at is not None]
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
            code = 0 if not self.aborted and w.task is None else None
            self.sup.exit_codes[w.name] = code
            self.sup.log.info("process exited", stage=self.plan.name, process=w.name, exitcode=code, **w.where)
        self.workers.clear()


def _install_signals(sup: RaySupervisor) -> dict[int, Any] | None:
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        sup.bell.put(("signal", signum))  # SimpleQueue.put is safe in a signal handler

    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous: dict[int, Any] | None) -> None:
    for signum, old in (previous or {}).items():
        signal.signal(signum, old)
