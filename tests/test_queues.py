"""The batching Emitter of runner/queues.py, in one process: order, no loss under the linger thread, trickles, errors."""

from __future__ import annotations

import multiprocessing
import threading
from typing import Any

import pytest

from runner import queues
from runner.queues import Emitter, FifoChannel, UnpicklableItem
from runner.topology import QueuePlan


class Recorder:
    """A channel stand-in that keeps every batch it is given (and can signal the first one)."""

    def __init__(self, batch: int = 1024, readers: int = 1) -> None:
        self.batch, self.readers = batch, readers
        self.batches: list[list[Any]] = []
        self.got = threading.Event()

    def put(self, batch: list[Any]) -> None:
        self.batches.append(list(batch))
        self.got.set()


def test_every_item_arrives_once_in_order_while_the_linger_thread_flushes(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a linger of 1 ms the linger thread flushes all the time beside emit: no item is lost, doubled or reordered."""
    monkeypatch.setattr(queues, "LINGER", 0.001)
    channel = Recorder(batch=64)
    emitter = Emitter([channel])
    for i in range(50_000):
        emitter.emit(i)
        if i % 1000 == 0:
            emitter.emit_many(list(range(-10, 0)))
    emitter.close()
    got = [x for batch in channel.batches for x in batch]
    expected = []
    for i in range(50_000):
        expected.append(i)
        if i % 1000 == 0:
            expected.extend(range(-10, 0))
    assert got == expected
    assert emitter.sent == len(expected)
    assert max(len(b) for b in channel.batches) <= 64


def test_first_batches_are_single_items_then_grow_to_the_channel_limit() -> None:
    """One single-item batch per reader first (so readers share the first items), then doubling up to the limit."""
    channel = Recorder(batch=8, readers=3)
    emitter = Emitter([channel])
    emitter.emit_many(list(range(40)))
    emitter.close()
    assert [len(b) for b in channel.batches][:6] == [1, 1, 1, 2, 4, 8]
    assert [x for b in channel.batches for x in b] == list(range(40))


def test_a_single_item_is_sent_without_waiting_for_more_or_for_close() -> None:
    """A slow trickle is not held back: a lone buffered item leaves on the linger deadline, before close."""
    channel = Recorder()
    emitter = Emitter([channel])
    emitter.emit("first")  # the first batch holds one item: sent at once
    channel.got.clear()
    emitter.emit("second")  # now the limit is 2: this one waits for the linger thread
    assert channel.got.wait(timeout=10), "the buffered item was never sent"
    assert channel.batches == [["first"], ["second"]]
    emitter.close()


def test_an_unpicklable_item_fails_in_the_writer_even_when_the_linger_thread_sends_it() -> None:
    """The error names the item and reaches the emitting thread at its next emit (and at close)."""
    ctx = multiprocessing.get_context("fork")
    plan = QueuePlan(name="q", type="fifo", maxsize=10, batch=10, writers=("w",), reader_processes=1)
    channel = FifoChannel(ctx, plan)
    emitter = Emitter([channel])
    emitter.emit(1)  # sent at once
    emitter.emit(threading.Lock())  # buffered; the linger thread tries to send it and fails
    emitter._thread.join(timeout=10)  # the linger thread ends after a failed send
    assert not emitter._thread.is_alive()
    with pytest.raises(UnpicklableItem, match="cannot be pickled"):
        emitter.emit(2)
    with pytest.raises(UnpicklableItem):
        emitter.close()
    assert channel.get() == [1]
