"""LIFO queues: a ``Stack`` served by a manager process, and the ``LifoChannel`` that reaches it.

Apart from ``runner.queues`` so that a run without a LIFO queue never imports
``multiprocessing.managers`` (~7 ms in the main process and in the forkserver).  A worker that reads or
writes a LIFO queue gets its proxy pickled, and unpickling it imports this module there.
"""

from __future__ import annotations

import itertools
import threading
from multiprocessing.managers import BaseManager
from typing import Any

from runner.queues import LIFO_TAKE, Ids, dumps
from runner.topology import QueuePlan


class Stack:
    """A bounded LIFO stack with an end, served by the manager process (one thread per client)."""

    def __init__(self, maxsize: int) -> None:
        self._items: list[Any] = []
        self._ids: list[int | None] = []  # parallel to _items
        self._maxsize = maxsize
        self._closed = False
        self._changed = threading.Condition()

    def put_many(self, items: list[Any], ids: Ids | None = None) -> None:
        with self._changed:
            while self._maxsize and len(self._items) >= self._maxsize:
                self._changed.wait()
            self._ids.extend(ids if ids is not None else itertools.repeat(None, len(items)))
            self._items.extend(items)
            self._changed.notify_all()

    def get_many(self, most: int) -> list[Any] | None:
        """Pop up to ``most`` items, top first; ``None`` once the stack is closed and empty."""
        got = self.get_many_ids(most)
        return None if got is None else got[0]

    def get_many_ids(self, most: int) -> tuple[list[Any], list[int | None]] | None:
        """``get_many`` and the ids of the items popped."""
        with self._changed:
            while not self._items and not self._closed:
                self._changed.wait()
            if not self._items:
                return None
            taken, ids = self._items[-most:][::-1], self._ids[-most:][::-1]
            del self._items[-most:]
            del self._ids[-most:]
            self._changed.notify_all()
            return taken, ids

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class StackManager(BaseManager):
    """Serves ``Stack`` objects to every process of a run."""


StackManager.register("Stack", Stack)


class LifoChannel:
    """A LIFO queue: a proxy to a ``Stack`` in the manager process."""

    def __init__(self, manager: StackManager, plan: QueuePlan) -> None:
        self.name = plan.name
        self.batch = 1  # items are pushed as they come, so the newest is always on top
        self.readers = plan.reader_processes
        # Items, pushed by the writer stages and popped newest-first by the reader processes.
        self.stack = manager.Stack(plan.maxsize)  # type: ignore[attr-defined]

    def put(self, batch: list[Any], ids: Ids | None = None) -> None:
        dumps(batch)  # fail here, in the writer, for an unpicklable item
        self.stack.put_many(batch, list(ids) if ids is not None else None)

    def get(self) -> list[Any] | None:
        return self.stack.get_many(LIFO_TAKE)

    def get_ids(self) -> tuple[list[Any], Ids | None] | None:
        """Up to ``LIFO_TAKE`` items, newest first, and their ids; ``None`` at the end."""
        return self.stack.get_many_ids(LIFO_TAKE)

    def end(self, readers: int) -> None:
        self.stack.close()

    def close(self) -> None:
        """After the run (the manager is shut down by then): nothing to release."""
