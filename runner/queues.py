"""Queues between stages, FIFO and LIFO, behind one small interface, and the batching on both ends.

Items travel in batches (lists), pickled by the writer so that an unpicklable item fails in the stage
that produced it rather than in a queue's feeder thread::

    writer process                          queue                         reader process(es)
    Emitter.emit(item) -> buffer --flush--> FifoChannel: multiprocessing.Queue of (n, pickled batch) --> Reader
                                            LifoChannel: proxy to a Stack in the manager process -->

End of stream is the supervisor's: once every writer of a queue has finished, it calls ``end(n)`` with
n = the number of reader processes.  A FIFO queue gets n ``None`` markers behind every item; a LIFO
stack is closed, and its readers get ``None`` only once it is empty, so a marker never overtakes items.

Item ids (``item_id`` in log records) travel beside the items, never inside them: a batch carries its
items and a parallel sequence of integer ids, a ``range`` while the ids run in steps (what a producer
emits, and what a stage that returns one result per item passes on) or a list otherwise.  Producers
number their items (``Emitter(numbering=...)``); every other stage passes on the ids of the items its
outputs came from.  ``IdRuns`` keeps the ids of a buffer as whole runs, so the main process only slices
(a ``range`` sliced is a ``range``) and never walks ids one by one.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import signal
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from runner import wire
from runner.topology import BATCH_BYTES, LINGER, QueuePlan

LIFO_TAKE = 64  # most items a LIFO reader pops at once
CANCEL_CHECK = 0.1  # seconds between looks at the stop flag of a writer waiting for room


class UnpicklableItem(Exception):
    """An item (or result) cannot be pickled to cross to another process."""


def dumps(batch: list[Any]) -> bytes:
    """Pickle a batch, naming the first item that cannot be pickled."""
    try:
        return pickle.dumps(batch, pickle.HIGHEST_PROTOCOL)
    except Exception:
        for item in batch:
            try:
                pickle.dumps(item, pickle.HIGHEST_PROTOCOL)
            except Exception as e:  # noqa: BLE001 - whatever pickle raises, the item is named
                msg = f"item {_short(item)} cannot be pickled: {type(e).__name__}: {e}"
                raise UnpicklableItem(msg) from None
        raise


def pack(batch: list[Any], ids: Ids | None) -> bytes:
    """Pickle a batch and its ids as one queue message (``dumps`` names an unpicklable item)."""
    try:
        return pickle.dumps((batch, ids), pickle.HIGHEST_PROTOCOL)
    except Exception:
        dumps(batch)
        raise


# An item's id: an int numbered by its producer (see worker.item_id_text), a str that names its place
# (``stage:file:line``, an item of a glob source), or None (an item without an id).
ItemId = int | str | None
Ids = Sequence[ItemId]  # the ids of a batch: a range, or a list


def join_ids(runs: list[Ids]) -> Ids:
    """One sequence of the ids of consecutive runs: a range when they continue each other, else a list."""
    if len(runs) == 1:
        return runs[0]
    first, last = runs[0], runs[-1]
    if isinstance(first, range) and isinstance(last, range) and all(
            isinstance(a, range) and isinstance(b, range) and a.stop == b.start and a.step == b.step
            for a, b in itertools.pairwise(runs)):
        return range(first.start, last.stop, first.step)
    return list(itertools.chain.from_iterable(runs))


class IdRuns:
    """The ids of a buffer of items, kept as whole runs: per batch work only, never per item."""

    def __init__(self) -> None:
        self._runs: deque[Ids] = deque()
        self._lock = threading.Lock()  # add (the stage's thread) and take (a linger flush) may race

    def add(self, ids: Ids) -> None:
        """Append the ids of items appended to the buffer (before the items, so a flush never lacks ids)."""
        if not len(ids):
            return
        with self._lock:
            runs = self._runs
            last = runs[-1] if runs else None
            if isinstance(ids, range) and isinstance(last, range) and last.stop == ids.start and last.step == ids.step:
                runs[-1] = range(last.start, ids.stop, ids.step)
                return
            runs.append(ids)

    def take(self, n: int) -> Ids:
        """Remove and return the ids of the first ``n`` items."""
        with self._lock:
            runs, taken = self._runs, []
            while n > 0 and runs:
                run = runs.popleft()
                if len(run) > n:
                    runs.appendleft(run[n:])
                    run = run[:n]
                taken.append(run)
                n -= len(run)
        if n > 0:  # items emitted without ids
            taken.append([None] * n)
        return join_ids(taken) if taken else []


def _short(item: Any, width: int = 80) -> str:
    text = repr(item)
    return text if len(text) <= width else text[: width - 3] + "..."


class Cancelled(Exception):
    """A put that waited for room was given up: the run is stopping."""


STOP_SIGNAL = signal.SIGUSR1  # how the main process asks a child to stop (SIGINT and SIGTERM are its own)
STOPPED = 143  # the exit code of a child that stopped when the main process asked it to


class Stopped(SystemExit):
    """The main process asked this child to stop (``STOP_SIGNAL``)."""


_locked = 0  # cross-process locks the threads of this process hold now (see stop_now)
_locked_guard = threading.Lock()
_stop_asked = False


def stop_now(signum: int, frame: Any) -> None:
    """The handler of a child's stop signal: unwind now (``Stopped``), unless the process holds a lock that
    other processes share (a queue's room), which an exception would leave broken for them; then when it
    lets go (``_shared_lock``)."""
    global _stop_asked
    if _locked:
        _stop_asked = True
        return
    raise Stopped(STOPPED)


@contextlib.contextmanager
def _shared_lock(lock: Any) -> Iterator[None]:
    """Hold a lock shared with other processes; a stop asked meanwhile unwinds once it is released."""
    global _locked
    with _locked_guard:
        _locked += 1
    try:
        with lock:
            yield
    finally:
        with _locked_guard:
            _locked -= 1
    if _stop_asked and not _locked:
        if threading.current_thread() is threading.main_thread():
            raise Stopped(STOPPED)
        os.kill(os.getpid(), STOP_SIGNAL)  # the stop is the main thread's: ask again


class ManagerGone(Exception):
    """The manager process serving the LIFO queues is gone (it died, or was killed)."""


class FifoChannel:
    """A ``multiprocessing.Queue`` of pickled batches, bounded in messages and in bytes; ``None`` ends it for a reader.

    The ``multiprocessing.Queue`` itself is unbounded: room is counted here, in shared memory under a
    ``Condition``, so that a writer waits while the queue holds ``slots`` messages or ``max_bytes`` bytes
    (a single message larger than that still passes into an empty queue), and a writer of this process
    that waits can be given up on (``cancel``) when the run stops. Readers are the stage runners' fetcher
    threads in the main process; writers are producers and stage runners.
    """

    def __init__(self, ctx: Any, plan: QueuePlan) -> None:
        self.name = plan.name
        self.batch = plan.batch
        self.readers = plan.reader_processes
        self.slots = plan.slots
        self.max_bytes = plan.max_bytes
        # Pickled (batch of items, their ids) as (n, bytes); written by the stages whose `output` names this
        # queue, read by the stages whose `input` names it, plus one None per reader process at the end.
        self.queue = ctx.Queue()
        wire.widen(self.queue._reader)  # a 1 MiB pipe: a large message in one write, not sixteen
        self._room = ctx.Condition(ctx.Lock())  # writers wait on it for room; readers notify it
        self._held = ctx.RawArray("q", 2)  # messages and bytes in the queue now (under _room)

    def _full(self, size: int) -> bool:
        held = self._held
        return bool(self.slots and held[0] >= self.slots) or (
            bool(self.max_bytes) and held[1] > 0 and held[1] + size > self.max_bytes)

    def put(self, batch: list[Any], ids: Ids | None = None) -> None:
        self.put_packed(len(batch), pack(batch, ids))

    def put_packed(self, n: int, data: bytes, cancel: threading.Event | None = None) -> None:
        """Put a batch pickled elsewhere (``pack`` of n items and their ids) as it is, once there is room.

        ``cancel``: once it is set (checked at least every ``CANCEL_CHECK`` seconds of waiting) the put is
        given up with ``Cancelled``; in a child asked to stop meanwhile, ``Stopped`` ends it.
        """
        size = len(data)
        with _shared_lock(self._room):
            while self._full(size):
                if cancel is not None and cancel.is_set():
                    raise Cancelled(self.name)
                if _stop_asked:
                    return  # leaving the lock raises Stopped
                self._room.wait(CANCEL_CHECK)
            self._held[0] += 1
            self._held[1] += size
        self.queue.put((n, data))

    def get(self) -> list[Any] | None:
        got = self.get_ids()
        return None if got is None else got[0]

    def get_ids(self) -> tuple[list[Any], Ids | None] | None:
        """A batch and its ids (None when the writer gave none); ``None`` at the end."""
        got = self.get_packed()
        return None if got is None else pickle.loads(got[1])

    def get_packed(self) -> tuple[int, bytes] | None:
        """A batch as it travelled: (number of items, pickled (items, ids)); ``None`` at the end.

        A stage runner hands such a batch to a worker whole, without unpickling it in the main process.
        """
        got = self.queue.get()
        if got is not None:
            with self._room:
                self._held[0] -= 1
                self._held[1] -= len(got[1])
                self._room.notify_all()
        return got

    def end(self, readers: int) -> None:
        """One end marker per reader, behind every item (never waits: markers take no room)."""
        for _ in range(readers):
            self.queue.put(None)

    def close(self) -> None:
        """After the run (or in a writer that is stopped): drop what nobody will read, so this process never
        waits to flush it."""
        self.queue.cancel_join_thread()
        self.queue.close()


class Channel(Protocol):
    """A queue as its writers and readers see it: ``FifoChannel`` here, ``runner.lifo.LifoChannel`` (a stack in
    the manager process) and, for writers, the Ray backend's ``RayChannel``."""

    name: str
    batch: int  # most items per message
    readers: int  # reading processes (one end marker each)

    def put(self, batch: list[Any], ids: Ids | None = None) -> int | None:
        """Put a batch (waiting for room); its pickled size when the channel measured it."""
        ...

    def get(self) -> list[Any] | None: ...
    def get_ids(self) -> tuple[list[Any], Ids | None] | None: ...
    def end(self, readers: int) -> None: ...
    def close(self) -> None: ...


def read(channel: Channel) -> Iterator[list[Any]]:
    """Batches from ``channel`` until its end marker."""
    while True:
        batch = channel.get()
        if batch is None:
            return
        yield batch


class Emitter:
    """Buffers items and sends them to every output channel in batches.

    A batch leaves when it is full, when its oldest item has waited about ``LINGER`` seconds (a
    background thread sees to that, so a slow function or a slow source never holds items back), or on
    ``close``.  The first batches hold one item each, one for every reader process, so the first items
    of a stream spread across the readers; then batches double up to the channels' limit, so a fast
    stream still moves in large batches.

    ``emit`` is the hot path of every stage (one call per item), so it takes no lock: it appends to the
    buffer, an atomic list operation, and only a flush takes ``_flushing``.  A flush takes the items
    present when it starts (``buffer[:n]`` then ``del buffer[:n]``); appends of another thread land
    behind them, so nothing is lost or reordered.  The linger thread wakes every ``LINGER / 2`` and
    flushes when the oldest buffered item was already the oldest at its previous wake-up.

    Ids (see the module docstring): with ``numbering=(first, step)`` (a producer) the k-th item sent gets
    the id ``first + k * step``, computed per batch as a ``range``; with ``ids=True`` (a consumer or pool
    stage) ``emit_many`` takes the ids of its items and they leave beside them; otherwise batches carry
    no ids.  ``counter`` (shared memory, one slot) receives ``sent`` after every batch, so the main
    process sees a producer's progress live at no per-item cost.
    """

    def __init__(
        self,
        channels: list[Channel],
        on_batch: Any = None,
        *,
        numbering: tuple[int, int] | None = None,
        ids: bool = False,
        counter: Any = None,
    ) -> None:
        self._channels = channels
        self._numbering = numbering
        self._ids = IdRuns() if ids else None
        self._counter = counter
        self._on_batch = on_batch  # called with each batch instead of (or besides) the channels
        self._max = min([c.batch for c in channels], default=1024)
        self._cap = self._max  # most items of a batch of about BATCH_BYTES, as the last batch measured
        self._limit = 1
        self._singles = max([c.readers for c in channels], default=1)  # one-item batches still to send
        self._buffer: list[Any] = []
        # Most items of a batch pickled elsewhere that emit_packed may send whole (0: never).
        self._fifo = any(type(c) is FifoChannel for c in channels)
        every_fifo = bool(channels) and all(type(c) is FifoChannel for c in channels)
        self.packed_max = self._max if every_fifo and on_batch is None and numbering is None else 0
        self._flushing = threading.Lock()
        self._closed = threading.Event()
        self._cancel = threading.Event()  # set by abandon(): a put waiting for room gives up
        self.sent = 0  # items taken out of the buffer and handed to the channels
        self._error: BaseException | None = None  # raised by the linger thread, re-raised by emit/close
        self._thread = threading.Thread(target=self._linger, name="emitter-linger", daemon=True)
        self._thread.start()

    def emit(self, item: Any) -> None:
        """Buffer one item; send the buffer when it holds a batch."""
        buffer = self._buffer
        buffer.append(item)
        if len(buffer) >= self._limit:
            self._flush()

    def emit_many(self, items: list[Any] | tuple[Any, ...], ids: Ids | None = None) -> None:
        """Buffer a list of items at once (a chunk of results): ``emit`` of each, without the per-item cost."""
        if self._ids is not None:  # ids first: a concurrent flush takes only items whose ids are there
            self._ids.add(ids if ids is not None else [None] * len(items))
        buffer = self._buffer
        buffer.extend(items)
        if len(buffer) >= self._limit:
            self._flush()

    def emit_packed(self, n: int, data: bytes) -> bool:
        """Send ``n`` items pickled elsewhere (a worker's outputs, ``pack``ed with their ids) whole, after
        what is buffered.  Only once batches have grown to full size and if ``n`` fits one; False (nothing
        sent) otherwise, and the caller emits the items."""
        if not 0 < n <= self.packed_max or self._limit < min(self._max, self._cap):
            return False
        self._flush()
        with self._flushing:
            if self._error is not None:
                raise self._error
            for channel in self._channels:  # packed_max > 0: every channel is a FifoChannel
                assert isinstance(channel, FifoChannel)
                channel.put_packed(n, data, self._cancel)
            self.sent += n
            if self._counter is not None:
                self._counter[0] = self.sent
        return True

    def flush(self) -> None:
        """Send what is buffered now; when it returns, no flush of this emitter is under way (``sent`` is exact)."""
        self._flush()

    def _flush(self) -> None:
        """Send the items buffered now, in batches of at most the current limit (which grows as they go)."""
        with self._flushing:
            if self._error is not None:
                raise self._error
            buffer = self._buffer
            todo = len(buffer)  # items appended from now on wait for the next flush
            while todo > 0:
                n = min(todo, self._limit)
                batch = buffer[:n]
                del buffer[:n]
                todo -= n
                self._send(batch)

    def _send(self, batch: list[Any]) -> None:
        n = len(batch)
        ids: Ids | None = None
        if self._numbering is not None:
            first, step = self._numbering
            ids = range(first + self.sent * step, first + (self.sent + n) * step, step)
        elif self._ids is not None:
            ids = self._ids.take(n)
        try:
            if self._on_batch is not None:
                self._on_batch(batch)
            self._put(batch, ids)
        except BaseException as e:
            self._error = e
            self._limit = 0  # the stage's next emit flushes, and so raises this error in the stage's thread
            raise
        self.sent += n
        if self._counter is not None:
            self._counter[0] = self.sent
        if self._singles > 1:
            self._singles -= 1
        else:
            self._limit = max(1, min(self._limit * 2, self._max, self._cap))

    def _put(self, batch: list[Any], ids: Ids | None) -> None:
        """Put one batch into every channel: pickled once for the FIFO ones, in halves while it is larger than
        ``BATCH_BYTES`` (what it measured caps the next batches)."""
        n, data = len(batch), b""
        if self._fifo:
            data = pack(batch, ids)
            self._cap = max(1, min(self._max, n * BATCH_BYTES // max(1, len(data))))
            if len(data) > BATCH_BYTES and n > 1:
                half = n // 2
                self._put(batch[:half], None if ids is None else ids[:half])
                self._put(batch[half:], None if ids is None else ids[half:])
                return
        for channel in self._channels:
            if type(channel) is FifoChannel:
                channel.put_packed(n, data, self._cancel)
                continue
            size = channel.put(batch) if ids is None else channel.put(batch, ids)
            if size:  # its pickled size, as the channel measured it: caps the next batches
                self._cap = max(1, min(self._cap, n * BATCH_BYTES // size))

    def _linger(self) -> None:
        tick = LINGER / 2
        seen = -1  # the `sent` count when the linger thread last saw items waiting
        while not self._closed.wait(tick):
            if not self._buffer:
                seen = -1
                continue
            if seen != self.sent:  # the oldest waiting item is new since the last wake-up: give it a tick
                seen = self.sent
                continue
            try:
                self._flush()
            except BaseException:  # noqa: BLE001 - kept in _error: emit/close raise it in the stage's thread
                return
            seen = -1

    def abandon(self) -> None:
        """The run is stopping: a put that waits for room (now or later) gives up with ``Cancelled``."""
        self._cancel.set()

    def stop(self, timeout: float | None) -> None:
        """Stop the linger thread, waiting at most ``timeout`` (None: until it ends) for a flush it is in.
        Alone (a stopped stage), it sends nothing more: what is buffered was never sent (``sent`` does not
        count it)."""
        self._closed.set()
        self._thread.join(timeout)

    def close(self) -> None:
        """Send what is buffered and stop the linger thread."""
        self.stop(None)
        if self._error is not None:
            raise self._error
        self._flush()
