"""LIFO queues: a ``Stack`` served by a manager process, and the ``LifoChannel`` that reaches it.

Apart from ``runner.queues`` so that a run without a LIFO queue never imports
``multiprocessing.managers`` (~7 ms in the main process and in the forkserver).  A worker that reads or
writes a LIFO queue gets its proxy pickled, and unpickling it imports this module there.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator
from multiprocessing.managers import BaseManager
from typing import Any

from runner.queues import CANCEL_CHECK, LIFO_TAKE, Cancelled, Ids, ItemId, ManagerGone, dumps
from runner.topology import QueuePlan


class Stack:
    """A bounded LIFO stack with an end, served by the manager process (one thread per client)."""

    def __init__(self, maxsize: int, max_bytes: int = 0) -> None:
        self._items: list[Any] = []
        self._ids: list[ItemId] = []  # parallel to _items
        self._sizes: list[int] = []  # parallel to _items: pickled bytes of each (as its writer measured)
        self._bytes = 0
        self._maxsize = maxsize
        self._max_bytes = max_bytes
        self._closed = False
        self._changed = threading.Condition()

    def _full(self, size: int) -> bool:
        return bool(self._maxsize and len(self._items) >= self._maxsize) or (
            bool(self._max_bytes) and self._bytes > 0 and self._bytes + size > self._max_bytes)

    def put_many(self, items: list[Any], ids: Ids | None = None, size: int = 0, timeout: float | None = None) -> bool:
        """Push ``items`` (``size``: their pickled bytes) once there is room; False if ``timeout`` passed first."""
        with self._changed:
            if not self._changed.wait_for(lambda: not self._full(size), timeout):
                return False
            self._ids.extend(ids if ids is not None else itertools.repeat(None, len(items)))
            self._items.extend(items)
            each = size // max(1, len(items))
            self._sizes.extend(itertools.repeat(each, len(items)))
            self._bytes += each * len(items)
            self._changed.notify_all()
            return True

    def get_many(self, most: int) -> list[Any] | None:
        """Pop up to ``most`` items, top first; ``None`` once the stack is closed and empty."""
        got = self.get_many_ids(most)
        return None if got is None else got[0]

    def get_many_ids(self, most: int) -> tuple[list[Any], list[ItemId]] | None:
        """``get_many`` and the ids of the items popped."""
        with self._changed:
            while not self._items and not self._closed:
                self._changed.wait()
            if not self._items:
                return None
            taken, ids = self._items[-most:][::-1], self._ids[-most:][::-1]
            self._bytes -= sum(self._sizes[-most:])
            del self._items[-most:]
            del self._ids[-most:]
            del self._sizes[-most:]
            self._changed.notify_all()
            return taken, ids

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class StackManager(BaseManager):
    """Serves ``Stack`` objects to every process of a run."""

    @property
    def process(self) -> Any:
        """The manager's process (once started)."""
        return self._process  # type: ignore[attr-defined]


StackManager.register("Stack", Stack)


class LifoChannel:
    """A LIFO queue: a proxy to a ``Stack`` in the manager process."""

    def __init__(self, manager: StackManager, plan: QueuePlan) -> None:
        self.name = plan.name
        self.batch = 1  # items are pushed as they come, so the newest is always on top
        self.readers = plan.reader_processes
        # Items, pushed by the writer stages and popped newest-first by the reader processes.
        self.stack = manager.Stack(plan.maxsize, plan.max_bytes)  # type: ignore[attr-defined]

    def put(self, batch: list[Any], ids: Ids | None = None, cancel: threading.Event | None = None) -> int:
        """Push a batch once there is room; ``cancel``: as ``FifoChannel.put_packed``. Returns its pickled size."""
        size = len(dumps(batch))  # fail here, in the writer, for an unpicklable item
        ids = list(ids) if ids is not None else None
        with _manager_calls(self.name):
            while not self.stack.put_many(batch, ids, size, None if cancel is None else CANCEL_CHECK):
                if cancel is not None and cancel.is_set():
                    raise Cancelled(self.name)
        return size

    def get(self) -> list[Any] | None:
        got = self.get_ids()
        return None if got is None else got[0]

    def get_ids(self) -> tuple[list[Any], Ids | None] | None:
        """Up to ``LIFO_TAKE`` items, newest first, and their ids; ``None`` at the end."""
        with _manager_calls(self.name):
            return self.stack.get_many_ids(LIFO_TAKE)

    def end(self, readers: int) -> None:
        with _manager_calls(self.name):
            self.stack.close()

    def close(self) -> None:
        """After the run (the manager is shut down by then): nothing to release."""


@contextlib.contextmanager
def _manager_calls(queue: str) -> Iterator[None]:
    """Calls to the manager: a lost connection is the manager's death, said in one line."""
    try:
        yield
    except (EOFError, ConnectionError, BrokenPipeError, OSError) as e:
        msg = f"the manager process serving LIFO queue {queue!r} is gone ({type(e).__name__})"
        raise ManagerGone(msg) from None
