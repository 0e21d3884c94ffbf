"""The actors of the Ray backend and what crosses to them; the driver is ``runner.backends.ray.driver``.

Run a compiled ``Topology`` on Ray: the same stages, queues, policies and summary as the local backend.

    driver (this process)                              Ray actors (one actor = one process of a stage)
    ---------------------                              ------------------------------------------------
    RaySupervisor: bell loop, starts stages,           producer actors --ray.put batch, put RefBatch--> _Hub:
                   ends queues                             FIFO queues of RefBatch, LIFO stacks of items,
    StageRunner thread per consumer/pool stage <--get-- _Hub       named locks, relay, wake-up flags
        --run_chunk(RefBatch slice)--> its worker actors --(ChunkResult, outputs ref)--> runner
        runner --RefBatch of the outputs--> _Hub
    relay thread <--take-- _Hub <--post-- every stage actor: log records, stdout/stderr lines
    relay thread --> log queue --> Listener (stderr, log_file); stdout lines --> sys.stdout

By reference: the items of a FIFO queue live in Ray's object store, pickled as a batch on the node of the
process that made them; the hub and the driver hold ``RefBatch`` messages (a count, a size and the
reference), never the items.  A worker actor resolves the reference of the batch it was handed a slice
of on its own node (Ray copies the bytes there once; the actor keeps the last batch it read, for its
next slice), and returns its outputs as a second return value, which Ray keeps on the worker's node
(objects under ~100 KiB travel inline in the reply to their owner, the driver: bytes for Ray's core
there, never unpickled).  The owner of an object must outlive it: a producer's batches are owned by
the producer actor, kept alive until the end of the run; a worker's outputs by the driver, so that a
worker that dies or retires takes none with it.  Items travel by value where the driver needs them:
LIFO stacks (the hub pops single items), ``collect`` stages, dead letters, and the items of a chunk
whose worker died (the error policy names the item in hand).

Producers are actors that put batches into the hub's queues.  Each consumer or pool stage is read by
one ``StageRunner`` thread of the driver, as on the local backend: it fetches one message at a time from
its input queue, hands slices of it to its worker actors, emits their results (in input order for
``ordered: true``) and applies the error policy to items held by a worker that died or timed out, then
replaces it.  Everything moves in batches: a Ray call costs about a millisecond, an item a microsecond.

The hub is one async actor for the whole run (every actor is a process that takes about a second to
start).  End of stream is the driver's: when every stage writing to a queue has finished, it ends the
queue: n ``None`` markers behind every message of a FIFO queue, or the LIFO stack closed so that its
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
from ray.exceptions import GetTimeoutError

from runner import logs, worker
from runner.queues import CANCEL_CHECK, LIFO_TAKE, Cancelled, Emitter, dumps
from runner.topology import BATCH_BYTES, LINGER, QueuePlan, StagePlan

RAY_BATCH = 8192  # most items one queue message carries (a Ray call costs about a millisecond)
RAY_BYTES = 8 << 20  # about the most bytes of a FIFO message in the object store (that only its readers fetch)
RAY_CHUNK = RAY_BATCH  # most items one call of a worker carries: a whole message, when it is little work
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


@dataclass
class RefBatch:
    """A FIFO queue message on Ray: ``n`` items, pickled as one list (``size`` bytes) in Ray's object store.

    Passed along inside this object, ``ref`` is never resolved: only the worker that runs the items reads them.
    """

    n: int
    size: int
    ref: Any  # ray.ObjectRef of queues.dumps(items); None for items nobody reads (a stage without outputs)


class _Queue:
    """One queue of the run, inside the hub: a FIFO of ``RefBatch`` messages or a LIFO stack of items, bounded
    in items (``maxsize``) and in bytes (``max_bytes``, pickled as their writers measured them); a lone
    message always passes."""

    def __init__(self, kind: str, maxsize: int, max_bytes: int = 0) -> None:
        self.kind = kind
        # FIFO: RefBatch messages put by the writer stages, taken whole by the readers, then one None marker
        # per reader.  LIFO: items pushed by the writer stages, popped newest first by the readers.
        self.items: deque[Any] = deque()
        self.sizes: deque[int] = deque()  # parallel to items: pickled bytes of each
        self.held = 0  # items in the queue (a FIFO message holds n)
        self.bytes = 0
        self.maxsize = maxsize  # 0: unbounded
        self.max_bytes = max_bytes
        self.closed = False  # LIFO: every writer has finished
        self.dropped = False  # the run is over: nothing waits any more
        self.changed = asyncio.Condition()

    def _full(self, n: int, size: int) -> bool:
        return self.held > 0 and (bool(self.maxsize and self.held + n > self.maxsize) or (
            bool(self.max_bytes) and self.bytes + size > self.max_bytes))

    async def put(self, message: Any, n: int, size: int) -> None:
        """Put a FIFO message (a RefBatch of ``n`` items) or push ``n`` LIFO items, once there is room."""
        async with self.changed:
            while self._full(n, size) and not self.dropped:
                await self.changed.wait()
            if self.dropped:
                return
            if self.kind == "fifo":
                self.items.append(message)
                self.sizes.append(size)
            else:
                self.items.extend(message)
                self.sizes.extend([size // max(1, n)] * n)
            self.held += n
            self.bytes += size
            self.changed.notify_all()

    async def get(self) -> tuple[Any, int]:
        """(a RefBatch (LIFO: up to LIFO_TAKE items, newest first), the items the queue held with it); the
        message ``None`` is the end of the stream."""
        async with self.changed:
            while not self.items and not self.closed and not self.dropped:
                await self.changed.wait()
            if not self.items:
                return None, 0
            held = self.held
            if self.kind == "fifo":
                taken = self.items.popleft()
                self.bytes -= self.sizes.popleft()
                self.held -= taken.n if taken is not None else 0
            else:
                n = min(LIFO_TAKE, len(self.items))
                taken = [self.items.pop() for _ in range(n)]
                self.bytes -= sum(self.sizes.pop() for _ in range(n))
                self.held -= n
            self.changed.notify_all()
            return taken, held

    async def end(self, readers: int) -> None:
        """FIFO: one end marker per reader behind every message (markers take no room); LIFO: closed."""
        async with self.changed:
            if self.kind == "lifo":
                self.closed = True
            elif not self.dropped:
                self.items.extend([None] * readers)
                self.sizes.extend([0] * readers)
            self.changed.notify_all()

    async def drop(self) -> None:
        async with self.changed:
            self.dropped = True
            self.items.clear()  # the references go: Ray frees what nothing else refers to
            self.sizes.clear()
            self.held = self.bytes = 0
            self.changed.notify_all()


@ray.remote(num_cpus=0)
class _Hub:
    """The run's broker: its queues, its named locks, the relay of records and output lines, wake-up flags.

    One actor for all of them: each Ray actor is a process that takes about a second to start.
    """

    def __init__(self, queues: dict[str, tuple[str, int, int]]) -> None:  # name: (type, maxsize, max_bytes)
        self.queues = {name: _Queue(*spec) for name, spec in queues.items()}
        # ("log", LogRecord) and ("out", "stdout"|"stderr", text) entries, posted by actors, taken by the driver.
        self.entries: list[tuple[Any, ...]] = []
        self.more = asyncio.Event()
        self.closed = False
        self.locks: dict[str, asyncio.Lock] = {}
        self.holders: dict[str, str] = {}
        self.flags: dict[str, asyncio.Event] = {}

    async def put(self, queue: str, message: Any, n: int, size: int) -> None:
        await self.queues[queue].put(message, n, size)

    async def get(self, queue: str) -> tuple[Any, int]:
        return await self.queues[queue].get()

    async def pid(self) -> int:
        """The hub's process id (benchmarks read its CPU time in /proc)."""
        return os.getpid()

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


def store(batch: list[Any]) -> RefBatch:
    """Pickle a batch into this node's object store (``dumps`` names an unpicklable item, in its writer)."""
    data = dumps(batch)
    return RefBatch(len(batch), len(data), ray.put(data))


class RayChannel:
    """A queue of the hub, with the interface ``runner.queues.Emitter`` and readers use."""

    def __init__(self, hub: Any, plan: QueuePlan) -> None:
        self.hub = hub
        self.name = plan.name
        self.kind = plan.type
        self.readers = plan.reader_processes
        self.batch = _batch(plan)

    def put(self, batch: list[Any]) -> int:
        """Put a batch (waits while the queue is full): into the object store for a FIFO queue, by value onto a
        LIFO stack; returns its pickled size (the Emitter cuts batches by it)."""
        if self.kind == "fifo":
            message = store(batch)
            self.put_ref(message)
            return message.size
        size = len(dumps(batch))  # an unpicklable item fails here, in its writer, naming the item
        ray.get(self.hub.put.remote(self.name, batch, len(batch), size))
        return size

    def put_ref(self, message: RefBatch, cancel: threading.Event | None = None) -> None:
        """Put a message of a FIFO queue once there is room; ``cancel`` set (the run stops): ``Cancelled``."""
        ref = self.hub.put.remote(self.name, message, message.n, message.size)
        while True:
            try:
                ray.get(ref, timeout=CANCEL_CHECK)
                return
            except GetTimeoutError:
                if cancel is not None and cancel.is_set():
                    raise Cancelled(self.name) from None

    def get_ref(self) -> Any:
        """The reference of (the next message: a RefBatch (FIFO), a list of items (LIFO), or None at the end; the
        items the queue held with it)."""
        return self.hub.get.remote(self.name)

    def end(self, readers: int) -> None:
        self.hub.end.remote(self.name, readers)


class RayEmitter(Emitter):
    """An ``Emitter`` over the hub's queues: a batch for the FIFO queues is put into the object store once and
    each of them gets its reference (batches of up to ~RAY_BYTES: only their readers fetch them); LIFO stacks
    get the items (batches of ~BATCH_BYTES, as locally: they cross the hub).  ``emit_packed`` sends a ``RefBatch`` made
    elsewhere (a worker's outputs) as it is."""

    def __init__(self, channels: list[RayChannel], on_batch: Any = None, counter: Any = None) -> None:
        super().__init__(channels, on_batch, counter=counter)  # type: ignore[arg-type]
        self.fifo = [c for c in channels if c.kind == "fifo"]
        self.lifo = [c for c in channels if c.kind != "fifo"]
        self.halted = False  # a stopped producer: the next batch raises Cancelled instead of leaving

    def _put(self, batch: list[Any], ids: Any) -> None:
        n = len(batch)
        if self.halted:
            raise Cancelled(self.fifo[0].name if self.fifo else "")
        if self.fifo:
            message = store(batch)
            self._cap = max(1, min(self._max, n * RAY_BYTES // max(1, message.size)))
            for channel in self.fifo:
                channel.put_ref(message, self._cancel)
        for channel in self.lifo:
            size = channel.put(batch)
            self._cap = max(1, min(self._cap, n * BATCH_BYTES // max(1, size)))  # by value: as locally

    def emit_packed(self, n: int, data: Any) -> bool:
        """Send the ``n`` items of ``data`` (a RefBatch) to every queue, after what is buffered."""
        self._flush()
        with self._flushing:
            if self._error is not None:
                raise self._error
            for channel in self.fifo:
                channel.put_ref(data, self._cancel)
            self.sent += n
        return True


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
        # A worker of a stage with concurrency: (its name, its progress); its calls in flight go to the driver
        # as ("calls", process, n) entries when they change (the live display's ``calls`` column).
        self.calls: tuple[str, list[int]] | None = None
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
        shown = 0
        while True:
            time.sleep(LINGER)
            if self.calls is not None:
                process, progress = self.calls
                if (n := max(0, progress[6] - progress[0])) != shown:
                    self.add(("calls", process, n))
                    shown = n
            with self.lock:
                self._send()

    def flush(self) -> None:
        with self.lock:
            self._send()
            self._send()


class _Sent:
    """A producer's ``Emitter`` counter: the items sent so far, after each batch, go to the driver with the
    records (``("sent", process, n)`` entries of the relay), for the live display and the queue depths."""

    def __init__(self, relay: _Relay, process: str) -> None:
        self.relay, self.process = relay, process

    def __setitem__(self, index: int, sent: int) -> None:
        self.relay.add(("sent", self.process, sent))


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
    by_ref: bool = False  # a worker returns its outputs pickled, as a second return value (see run_chunk)


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
    """One process of a producer stage: its share of the source, in batches, to every output queue.

    It owns the batches it put into the object store: the driver kills it only at the end of the run.
    """

    def __init__(self, spec: ActorSpec) -> None:
        self.spec = spec
        self.relay, self.base_dir, self.log = _bootstrap(spec)
        self.emitter = RayEmitter(spec.outputs, counter=_Sent(self.relay, spec.name))
        self.started: float | None = None
        self.ended = threading.Event()

    def __repr__(self) -> str:
        return self.spec.name

    def run(self) -> tuple[int, float, str | None, dict[str, Any]]:
        """Emit the items; returns (items sent, seconds, error or None, where it ran)."""
        spec, stage, emitter = self.spec, self.spec.stage, self.emitter
        self.log.info("process started")
        started = self.started = time.perf_counter()
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
        except Cancelled:  # stopped (see stop)
            pass
        except Exception as e:  # noqa: BLE001 - reported to the driver, never lost
            error = f"{type(e).__name__}: {e}"
            tb = "" if isinstance(e, worker.SourceError) else traceback.format_exc()  # bad data: its file and line
            self.log.error("source failed", error=error, **({"exception": tb} if tb else {}))
        finally:
            _flush(self.relay)
            self.ended.set()
        return emitter.sent, time.perf_counter() - started, error, _where()

    def stop(self) -> tuple[int, float, dict[str, Any]]:
        """Stop emitting (the next batch raises ``Cancelled`` in ``run``), wait a moment for ``run`` to end, send
        every buffered record and line; (items sent, seconds, where)."""
        self.emitter.abandon()
        self.emitter.halted = True
        self.ended.wait(KILL_GRACE / 2)
        _flush(self.relay)
        seconds = time.perf_counter() - self.started if self.started is not None else 0.0
        return self.emitter.sent, seconds, _where()


@ray.remote(**STAGE_ACTOR)
class _WorkerActor:
    """One process of a consumer or pool stage: chunks in, ``worker.ChunkResult`` out (one call at a time)."""

    def __init__(self, spec: ActorSpec) -> None:
        self.spec = spec
        self.relay, self.base_dir, self.log = _bootstrap(spec)
        # As a local worker's (worker.WorkerSpec.progress): [0] item in hand, [1] call start.
        self.progress = [0] * worker.PROGRESS_SLOTS
        if spec.stage.concurrency > 1:
            self.relay.calls = (spec.name, self.progress)
        self.fn: Any = None
        self.tasks = 0
        self.last: tuple[Any, list[Any]] = (None, [])  # the last batch read: (its reference, its items)

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

    def _items(self, parts: list[tuple[RefBatch, int, int]]) -> list[Any]:
        """Items ``start:stop`` of each message in the object store, read on this node (the last one is kept)."""
        got: list[Any] = []
        for message, start, stop in parts:
            ref, items = self.last
            if ref != message.ref:
                items = pickle.loads(ray.get(message.ref))
                self.last = (message.ref, items)
            got += items[start:stop]
        return got

    @ray.method(num_returns=2)
    def run_chunk(
        self, seq: int, chunk: list[tuple[Any, int]], parts: list[tuple[RefBatch, int, int]] | None = None
    ) -> tuple[tuple[worker.ChunkResult, int | None, int], bytes | None]:
        """Run a chunk: ``chunk`` (item, failed attempts) pairs, or ``parts``: (message, start, stop) slices of
        messages in the object store.

        Returns ((result, outputs, size), data): with ``by_ref``, the outputs leave as ``data`` (pickled,
        ``size`` bytes; None for a stage without outputs) and ``outputs`` counts them; else they are in the
        result and ``outputs`` is None.
        """
        stage, spec = self.spec.stage, self.spec
        if parts:
            items = self._items(parts)
            result = worker.run_items(self.fn, stage, seq, items, None, spec.lock, self.progress, self.log)
        else:
            items = [item for item, _ in chunk]
            result = worker.run_chunk(self.fn, stage, seq, chunk, spec.lock, self.progress, self.log)
        self.tasks += 1
        result.retire = bool(stage.maxtasksperchild and self.tasks >= stage.maxtasksperchild)
        ends, result.ends = result.ends, []
        try:  # as on the local backend: an output that cannot be pickled fails its item, under the policy
            return self._answer(result)
        except Exception:  # noqa: BLE001
            result.ends = ends
            return self._answer(worker._without_unpicklable(stage, result, items, self.log))

    def _answer(self, result: worker.ChunkResult) -> tuple[tuple[worker.ChunkResult, int | None, int], bytes | None]:
        if not self.spec.by_ref:
            pickle.dumps(result, pickle.HIGHEST_PROTOCOL)
            return (result, None, 0), None
        outputs, n = result.outputs, len(result.outputs)
        data = pickle.dumps(outputs, pickle.HIGHEST_PROTOCOL) if n else None
        result.outputs = []
        if not self.spec.outputs:  # pickled as the local backend does, and dropped: nobody reads them
            return (result, n, 0), None
        return (result, n, len(data) if data else 0), data

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
