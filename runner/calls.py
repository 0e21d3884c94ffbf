"""Code that runs IN A WORKER process (or inline): concurrent calls of a stage function (``concurrency: N``,
or an ``async def`` function or ``__call__``), imported only by stages that need it.

    chunk --settle_all--> up to N unit tasks on this process's one asyncio event loop (kept across chunks)
        async function: the loop awaits fn(arg) itself, each call under asyncio.wait_for(timeout)
        plain function: each call runs in a thread of ``Threads`` (daemon threads, started as needed);
                        the loop awaits it under asyncio.wait_for(timeout)
    a unit's failures go through the policy here (retries wait with asyncio.sleep); settled units are
    folded into the chunk's result in input order (``worker.Fold``), so outputs keep input order

Timeouts are the worker's here: an async call past its timeout is cancelled. A thread cannot be killed, so
a plain call past its timeout is abandoned: it counts as a failed attempt ("call timed out"), its thread
runs on to the call's end, its outputs are dropped, and another thread takes its place, so N calls can
still run at once (a call that never returns keeps its daemon thread until the process ends).
With a ``timeout``, ``progress[1]`` is a heartbeat (refreshed every ``timeout / 4`` seconds, at most 1 s,
while a chunk runs): the runner, which kills a worker once ``progress[1] + timeout`` has passed, then
kills only a worker whose loop is stuck (a call that holds the GIL, or blocks inside an ``async def``).

The loop and the threads belong to one process: a forked child starts its own (``os.register_at_fork``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import os
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from runner import worker
from runner.queues import Ids
from runner.topology import StagePlan
from runner.worker import Fold, FunctionFailed, Settled, attempt, call_outputs, route_outputs, short_repr, unit_failed

_TIMED_OUT = ("TimeoutError", "<timeout>", 0)  # where a timeout "was raised": its warnings name no traceback


class Threads:
    """Daemon threads that make blocking calls for the event loop: one starts whenever no thread is idle,
    so there are as many as calls in flight, plus abandoned calls still running."""

    def __init__(self) -> None:
        # Calls for the threads: (loop, future, fn, args), or None: "end"; put by ``run``, taken by ``_serve``.
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._idle = 0
        self._closed = False
        self._lock = threading.Lock()

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Call ``fn(*args)`` in a thread; the future (of the running loop) gets its value or exception."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            start = self._idle == 0
            self._idle -= not start
        if start:
            threading.Thread(target=self._serve, name="mprun-call", daemon=True).start()
        self._jobs.put((loop, future, fn, args))
        return future

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, fn, args = job
            try:
                value, error = fn(*args), None
            except BaseException as e:  # noqa: BLE001 - handed to whoever awaits the call
                value, error = None, e
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for this call any more
                loop.call_soon_threadsafe(_resolve, future, value, error)
            job = loop = future = fn = args = value = error = None
            with self._lock:
                if self._closed:
                    return
                self._idle += 1

    def close(self) -> None:
        """End the idle threads now and the busy ones after their call."""
        with self._lock:
            idle, self._idle, self._closed = self._idle, 0, True
        for _ in range(idle):
            self._jobs.put(None)


def _resolve(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled: the call timed out and was abandoned
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)


class _Here:
    """This process's event loop and threads, made on first use (a forked child forgets its parent's)."""

    state: tuple[asyncio.AbstractEventLoop, Threads] | None = None

    @classmethod
    def forget(cls) -> None:
        cls.state = None


os.register_at_fork(after_in_child=_Here.forget)


def _loop_and_threads() -> tuple[asyncio.AbstractEventLoop, Threads]:
    if _Here.state is None or _Here.state[0].is_closed():
        _Here.state = (asyncio.new_event_loop(), Threads())
    return _Here.state


def run(awaitable: Awaitable[Any]) -> Any:
    """Run ``awaitable`` to its end on this process's event loop (made on first use, kept for the next)."""
    return _loop_and_threads()[0].run_until_complete(awaitable)


def release() -> None:
    """Close this process's event loop and end its threads (the inline backend, at the end of a run)."""
    if _Here.state is not None:
        loop, threads = _Here.state
        _Here.state = None
        threads.close()
        loop.close()


async def settle_awaitable(out: Any) -> Any:
    """The value of a coroutine, or the items of an async generator, as a list."""
    if inspect.isasyncgen(out):
        return [item async for item in out]
    return await out


async def settle_all(fn: Callable[[Any], Any], stage: StagePlan, items: list[Any], tries: list[int] | None,
                     lock: Any, log: Any, fold: Fold, ids: Ids | None, routes: dict[str, int] | None) -> None:
    """Settle a chunk's units (batches, or single items), up to ``stage.concurrency`` at once, into ``fold`` in
    input order; stop at the first that stops the run."""
    size = stage.batch or 1
    starts = range(0, len(items), size)
    asynchronous = worker.is_async(fn)
    threads = _loop_and_threads()[1]
    settled: dict[int, Settled] = {}
    running: dict[asyncio.Future[Settled], int] = {}
    task: asyncio.Future[Settled]
    ahead = behind = 0  # the next unit to start; the first not folded yet
    beat = asyncio.ensure_future(_heartbeat(stage, fold.progress)) if stage.timeout is not None else None
    try:
        while behind < len(starts):
            while ahead < len(starts) and len(running) < stage.concurrency:
                start = starts[ahead]
                unit = items[start : start + size]
                attempts = max(tries[start : start + size]) if tries else 0
                # The task (and the thread of each of its calls) logs with the id of its own item.
                token = worker._call_item.set(ids[start] if ids is not None else None)
                settling = _settle(fn, stage, unit, attempts, lock, log, asynchronous, threads, routes)
                task = asyncio.ensure_future(settling)
                worker._call_item.reset(token)
                running[task] = ahead
                ahead += 1
                fold.progress[6] = start + len(unit)
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                settled[running.pop(task)] = task.result()
            while behind in settled:
                start = starts[behind]
                if fold.add(start, min(size, len(items) - start), settled.pop(behind)):
                    return
                behind += 1
    finally:
        left: list[asyncio.Future[Any]] = [*running, *([beat] if beat is not None else [])]
        for future in left:
            future.cancel()
        if left:
            await asyncio.wait(left, timeout=1.0)


async def _heartbeat(stage: StagePlan, progress: Any) -> None:
    period = min(float(stage.timeout or 0) / 4, 1.0)
    while True:
        progress[1] = time.monotonic_ns()
        await asyncio.sleep(period)


async def _settle(fn: Callable[[Any], Any], stage: StagePlan, unit: list[Any], attempts: int, lock: Any, log: Any,
                  asynchronous: bool, threads: Threads, routes: dict[str, int] | None) -> Settled:
    """Call ``fn`` on a unit under the policy (``attempts``: failed attempts so far), each call within ``timeout``."""
    s = Settled()
    t0 = time.perf_counter()
    arg = unit if stage.batch else unit[0]
    while True:
        if asynchronous:
            call: Awaitable[Any] = _attempt_async(fn, stage, arg, lock, threads, routes)
        else:
            call = threads.run(contextvars.copy_context().run, attempt, fn, stage, arg, lock, routes)
        try:
            s.outputs, s.targets = await asyncio.wait_for(call, stage.timeout)
            break
        except TimeoutError:
            how = "cancelled" if asynchronous else "abandoned: its thread runs on to its end"
            e = FunctionFailed(f"TimeoutError: call timed out after {stage.timeout:g}s ({how})", "", short_repr(arg),
                               _TIMED_OUT)
        except FunctionFailed as failure:
            e = failure
        attempts += 1
        if not unit_failed(stage, e, unit, attempts, s, log):
            break
        await asyncio.sleep(stage.retry_backoff * 2 ** (attempts - 1))
    s.seconds = time.perf_counter() - t0
    return s


async def _attempt_async(fn: Callable[[Any], Any], stage: StagePlan, arg: Any, lock: Any, threads: Threads,
                         routes: dict[str, int] | None) -> tuple[list[Any], list[int] | None]:
    """``worker.attempt`` for an async function: one call awaited on this loop (the lock taken in a thread)."""
    try:
        if lock is not None:
            await _acquire(lock, threads)
        try:
            out = fn(arg)
            if inspect.isasyncgen(out):  # each item it yields is an output
                outs = [item async for item in out]
            else:
                outs = call_outputs(await out if inspect.isawaitable(out) else out, bool(stage.batch))
        finally:
            if lock is not None:
                lock.release()
        return (outs, None) if routes is None else route_outputs(stage, outs, routes)
    except Exception as e:  # noqa: BLE001 - whatever the user's function raises fails this item (or batch)
        raise FunctionFailed.of(e, arg) from None


async def _acquire(lock: Any, threads: Threads) -> None:
    """Take ``lock`` without blocking the loop; if the call is cancelled meanwhile, release it once taken."""
    taken = threads.run(lock.acquire)
    try:
        await asyncio.shield(taken)
    except asyncio.CancelledError:
        taken.add_done_callback(lambda f: None if f.cancelled() or f.exception() else lock.release())
        raise
