"""The pipes between a stage's runner (main process) and its workers, and why they cannot deadlock.

    StageRunner thread --Outbox (non-blocking)--> task pipe --> worker: conn.recv() (blocking)
    StageRunner thread <--recv (whole message)--- result pipe <-- worker: send_bytes() (blocking)

Each worker has two one-way pipes, never one duplex socket. The rule that makes this safe: **the runner
never blocks on a write**. Its end of a task pipe is non-blocking; a chunk is framed (the framing of
``multiprocessing.connection``, so the worker reads it with ``Connection.recv``) into the worker's
``Outbox``, which writes what the pipe takes and keeps the rest; the runner waits for the pipe to become
writable (``POLLOUT``) in the same ``poll`` in which it waits for results, and writes more then. So
whatever a worker is doing, blocked writing a large result included, the runner comes back to read it.
A worker blocks on its result pipe only while the runner is not reading; the runner reads a whole message
once ``poll`` says one has begun, and a worker writes a message it has begun to the end without waiting
for anything, so that read ends.

What may be in flight is bounded too: at most ``DEPTH`` chunks per worker, each cut to about
``BATCH_BYTES`` (see ``StageRunner``), so an outbox holds a few MiB at most. Large payloads cross as frames
of their own (a still-pickled input batch after its task, a worker's packed outputs after its result), so
the main process never copies them into a pickle and out again.

The Ray backend has no pipe of its own to wedge: items travel as Ray calls, its chunks and queue messages are
cut to about ``BATCH_BYTES`` as here, and the hub's queues count ``max_bytes`` too.
"""

from __future__ import annotations

import math
import os
import select
import struct
from collections import deque
from typing import Any

_SMALL = 1 << 16  # a frame up to this size is written in one piece (header and payload joined)
PIPE_SIZE = 1 << 20  # bytes a pipe holds (F_SETPIPE_SZ; Linux's default limit for unprivileged users)
_F_SETPIPE_SZ = 1031


def widen(conn: Any) -> None:
    """Let the pipe under ``conn`` hold ``PIPE_SIZE`` bytes where the system allows (fewer wake-ups)."""
    try:
        import fcntl

        fcntl.fcntl(conn.fileno(), _F_SETPIPE_SZ, PIPE_SIZE)
    except (OSError, ImportError):
        pass


def frame(data: bytes | memoryview) -> list[bytes | memoryview]:
    """``data`` framed as ``Connection.send_bytes`` frames it: a length header, then the bytes."""
    n = len(data)
    header = struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!i", -1) + struct.pack("!Q", n)
    return [header + bytes(data)] if n <= _SMALL else [header, memoryview(data)]


class Outbox:
    """Framed messages to a child's pipe, written without ever blocking this thread.

    ``send`` writes what the pipe takes now and keeps the rest; ``flush`` writes more once the pipe is
    writable (the owner polls ``fileno`` for ``POLLOUT`` while ``pending``). Raises ``BrokenPipeError``
    when the reader is gone (the owner sees the child's death on its sentinel too).
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn  # kept so the descriptor stays open as long as the outbox
        self.fd = conn.fileno()
        os.set_blocking(self.fd, False)
        self._parts: deque[memoryview] = deque()

    def fileno(self) -> int:
        return self.fd

    @property
    def pending(self) -> bool:
        """Bytes are waiting for room in the pipe."""
        return bool(self._parts)

    def send(self, data: bytes | memoryview) -> None:
        """Queue one message (bytes, pickled by the caller) and write what fits now."""
        self._parts.extend(memoryview(p) for p in frame(data))
        self.flush()

    def flush(self) -> None:
        """Write queued bytes until the pipe is full or nothing is left."""
        parts = self._parts
        while parts:
            try:
                n = os.write(self.fd, parts[0])
            except BlockingIOError:
                return
            if n < len(parts[0]):
                parts[0] = parts[0][n:]
                return
            parts.popleft()

    def close(self) -> None:
        self._parts.clear()
        self.conn.close()


class Poller:
    """``poll`` over descriptors that rarely change (a runner's bell, its workers' pipes and sentinels).

    A poll object is kept and only changed where the set changes, where ``multiprocessing.connection.wait``
    builds a selector on every call (~14 us, thousands of times in a fast stage). ``reads`` are waited on
    for input (or hang-up), ``writes`` (objects with ``fileno``) for room; ``wait`` returns the objects ready.
    """

    def __init__(self) -> None:
        self._poll = select.poll()
        self._registered: dict[int, tuple[int, Any]] = {}  # fd -> (events, object)

    def wait(self, reads: list[Any], writes: list[Any], timeout: float | None) -> list[Any]:
        wanted: dict[int, tuple[int, Any]] = {}
        for obj in reads:
            wanted[obj if isinstance(obj, int) else obj.fileno()] = (select.POLLIN, obj)
        for obj in writes:
            wanted[obj.fileno()] = (select.POLLOUT, obj)
        if wanted != self._registered:
            for fd, (events, obj) in wanted.items():
                old = self._registered.get(fd)
                if old is None:
                    self._poll.register(fd, events)
                elif old != (events, obj):
                    self._poll.modify(fd, events)
            for fd in self._registered.keys() - wanted.keys():
                self._poll.unregister(fd)
            self._registered = wanted
        ms = None if timeout is None else math.ceil(timeout * 1000)
        return [self._registered[fd][1] for fd, _ in self._poll.poll(ms)]


_FRAGMENT = struct.Struct("!iIBH")  # writer pid, record number, last fragment?, payload length
_PIPE_BUF = select.PIPE_BUF  # a write of at most this many bytes to a pipe is never split or interleaved


class RecordPipe:
    """A pipe that every process of a run writes log records into and one listener reads; a writer that
    dies in the middle of a record (SIGKILL, a crash) cannot wedge it.

    ``multiprocessing.Queue`` takes a lock shared by all its writers around each message and writes a large
    message in several pieces: a writer killed while it holds the lock, or halfway through a message, blocks
    every other writer for ever and leaves the reader waiting for the rest of a message that never comes
    (the records of the whole run lost, and its end delayed by the listener's timeout). Here a record is
    pickled and cut into fragments of at most ``PIPE_BUF`` bytes with a small header (writer pid, record
    number, last?), each written with one ``write``, which a pipe keeps whole and never interleaves with
    another writer's; no lock is shared between processes. The reader reassembles each writer's fragments
    and drops a record whose writer went on to another one (or died) before finishing it.

    The interface is the part of ``queue.Queue`` that ``logging.handlers.QueueHandler`` and ``QueueListener``
    use: ``put_nowait`` in every process (a blocking write: the listener keeps reading), ``get`` in the
    listener's thread. Pickled into children with their process spec, like any ``Connection``.
    """

    def __init__(self, ctx: Any) -> None:
        self._reader, self._writer = ctx.Pipe(duplex=False)
        widen(self._writer)
        self.repeats_counted = False  # the listener wants counts of repeated warnings, not each (runner.logs)
        self._setup()

    def _setup(self) -> None:
        import threading

        self._pid = os.getpid()
        self._lock = threading.RLock()  # the fragments of one record stay together within this process
        self._number = 0
        self._inbox = bytearray()
        self._parts: dict[int, tuple[int, list[bytes]]] = {}  # writer pid -> (record number, fragments so far)
        self._ready: deque[Any] = deque()

    def __getstate__(self) -> tuple[Any, Any, bool]:
        return self._reader, self._writer, self.repeats_counted

    def __setstate__(self, state: tuple[Any, Any, bool]) -> None:
        self._reader, self._writer, self.repeats_counted = state
        self._setup()

    def put_nowait(self, record: Any) -> None:
        """Send one record (``None``: the listener's end marker)."""
        from multiprocessing.reduction import ForkingPickler

        if self._pid != os.getpid():  # forked with another process's state
            self._setup()
        data = bytes(ForkingPickler.dumps(record, 5))
        room = _PIPE_BUF - _FRAGMENT.size
        with self._lock:
            self._number = (self._number + 1) & 0xFFFFFFFF
            fd = self._writer.fileno()
            for start in range(0, max(len(data), 1), room):
                piece = data[start : start + room]
                os.write(fd, _FRAGMENT.pack(self._pid, self._number, start + room >= len(data), len(piece)) + piece)

    put = put_nowait

    def get(self, block: bool = True) -> Any:
        """The next whole record (blocking); ``None`` once a writer sent the end marker."""
        import pickle

        while not self._ready:
            self._inbox += os.read(self._reader.fileno(), 1 << 16)
            view, at = memoryview(self._inbox), 0
            while len(view) - at >= _FRAGMENT.size:
                pid, number, last, n = _FRAGMENT.unpack_from(view, at)
                if len(view) - at - _FRAGMENT.size < n:
                    break
                piece = bytes(view[at + _FRAGMENT.size : at + _FRAGMENT.size + n])
                at += _FRAGMENT.size + n
                held = self._parts.get(pid)
                parts = held[1] if held is not None and held[0] == number else []
                parts.append(piece)
                if last:
                    self._parts.pop(pid, None)
                    self._ready.append(pickle.loads(b"".join(parts)))
                else:
                    self._parts[pid] = (number, parts)
            view.release()
            del self._inbox[:at]
        return self._ready.popleft()

    def cancel_join_thread(self) -> None:
        """Nothing to do: no feeder thread (``multiprocessing.Queue``'s interface)."""

    def close(self) -> None:
        self._reader.close()
        self._writer.close()
