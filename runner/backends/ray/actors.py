"""The actors of the Ray backend and what crosses to them; the driver is ``runner.backends.ray.driver``.

Run a compiled ``Topology`` on Ray: the same stages, queues, policies and summary as the local backend.

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
import multiprocessing
import os
import pickle
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Self

import ray

from runner import logs, worker
from runner.queues import LIFO_TAKE, Emitter, dumps
from runner.topology import LINGER, QueuePlan, StagePlan

RAY_BATCH = 8192  # most items one queue message carries (a Ray call costs about a millisecond)
RAY_CHUNK = 2048  # most items one call of a worker carries (a worker that dies loses at most its chunk)
CHUNK_SECONDS = 0.1  # chunks are sized to take about this long, from the measured time per item
FIRST_CHUNK = 16  # items of the first chunks, before any time per item is known
CONNECT_TIMEOUT = 5.0  # seconds to wait for a cluster's address to accept a connection
START_TIMEOUT = 30.0  # seconds a worker that got no item gets to start, at the end of its stage
KILL_GRACE = 2.0  # seconds an actor gets to flush its records before it is killed
RELAY_BATCH = 256  # records or output lines an actor buffers before it sends them anyway
STAGE_ACTOR: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 2}  # a second thread answers stop, elapsed
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
    sys.stdout = _Lines(relay, "stdout")
    sys.stderr = _Lines(relay, "stderr")
    return relay, base_dir, logs.get_logger("mprun")


def _where() -> dict[str, Any]:
    """The pid and node of this actor, for the driver's records about it."""
    return {"pid": os.getpid(), "node": ray.util.get_node_ip_address()}


def _flush(relay: _Relay) -> None:
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    relay.flush()


@ray.remote(**STAGE_ACTOR)
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
            tb = "" if isinstance(e, worker.SourceError) else traceback.format_exc()  # bad data: its file and line
            self.log.error("source failed", error=error, **({"exception": tb} if tb else {}))
        finally:
            _flush(self.relay)
        return emitter.sent, time.perf_counter() - started, error, _where()

    def stop(self) -> tuple[int, float, dict[str, Any]]:
        """Send every buffered record and line (the driver then kills the actor); (items sent, seconds, where)."""
        _flush(self.relay)
        emitter = getattr(self, "emitter", None)
        seconds = time.perf_counter() - self.started if emitter else 0.0
        return (emitter.sent if emitter else 0), seconds, _where()


@ray.remote(**STAGE_ACTOR)
class _WorkerActor:
    """One process of a consumer or pool stage: chunks in, ``worker.ChunkResult`` out (one call at a time)."""

    def __init__(self, spec: ActorSpec) -> None:
        self.spec = spec
        self.relay, self.base_dir, self.log = _bootstrap(spec)
        # As a local worker's (worker.WorkerSpec.progress): [0] item in hand, [1] call start.
        self.progress = [0] * worker.PROGRESS_SLOTS
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

    def close_stage(self, seq: int) -> worker.ChunkResult:
        """The stage's input has ended: what the instance's ``close()`` gives (``worker.close_result``)."""
        stage = self.spec.stage
        self.progress[0] = 0
        self.progress[1] = time.monotonic_ns() if stage.timeout is not None else 0  # close() has `timeout` too
        try:
            return worker.close_result(self.fn, stage, seq, self.log)
        finally:
            self.progress[1] = 0

    def elapsed(self) -> tuple[int, float]:
        """(index of the item in hand, seconds its call has run; -1 when no call runs)."""
        index, started = self.progress[:2]
        return int(index), (time.monotonic() - started / 1e9 if started > 0 else -1.0)

    def stop(self) -> None:
        """Send every buffered record and line (the driver then kills the actor)."""
        _flush(self.relay)

