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
