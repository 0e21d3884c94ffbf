"""Code that runs IN A WORKER process (or inline): concurrent calls of a stage function (``concurrency: N``,
or an ``async def`` function or ``__call__``), imported only by stages that need it.

    plain function: chunk --settle_threads--> every unit a job of ``Lanes``: N daemon threads (kept across
                    chunks) that each take the next job, call it under the policy (retries sleep in the
                    thread) and hand back its ``Settled``, as a ThreadPoolExecutor's workers would
    async function: chunk --settle_all--> up to N unit tasks on this process's one asyncio event loop (kept
                    across chunks), each call under asyncio.wait_for(timeout)
    settled units are folded into the chunk's result in input order (``worker.Fold``), so outputs keep
    input order

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
import inspect
import os
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from runner import worker
from runner.queues import Ids, ItemId
from runner.topology import StagePlan
from runner.worker import Fold, FunctionFailed, Settled, attempt, call_outputs, route_outputs, short_repr, unit_failed

_TIMED_OUT = ("TimeoutError", "<timeout>", 0)  # where a timeout "was raised": its warnings name no traceback


def _timed_out(stage: StagePlan, arg: Any, how: str) -> FunctionFailed:
    """The failure of a call of ``arg`` past the stage's ``timeout`` (``how``: what became of the call)."""
    return FunctionFailed(f"TimeoutError: call timed out after {stage.timeout:g}s ({how})", "", short_repr(arg),
                          _TIMED_OUT)


class _Chunk:
    """What the lanes share about the chunk being settled (``settle_threads``)."""

    def __init__(self, fn: Callable[[Any], Any], stage: StagePlan, lock: Any, log: Any,
                 routes: dict[str, int] | None, fold: Fold) -> None:
        self.fn, self.stage, self.lock, self.log, self.routes = fn, stage, lock, log, routes
        self.seq, self.progress = fold.seq, fold.progress
        self.settled: queue.SimpleQueue[tuple[int, Settled]] = queue.SimpleQueue()  # (unit index, how it ended)
        self.stopped = False  # a unit stopped the run: the jobs still queued are dropped


class _Job:
    """One unit of a chunk for a lane: called under the policy until it is settled, unless abandoned."""

    def __init__(self, chunk: _Chunk, index: int, start: int, unit: list[Any], attempts: int, item_id: ItemId,
                 settled: Settled | None = None, backoff: float = 0.0) -> None:
        self.chunk, self.index, self.start, self.unit, self.attempts = chunk, index, start, unit, attempts
        self.item_id, self.backoff = item_id, backoff
        self.arg = unit if chunk.stage.batch else unit[0]  # what the function is called with
        self.s = settled or Settled()
        self.t0 = time.perf_counter()
        self.guard = threading.Lock()  # between the lane that calls and the thread that may abandon the call
        self.called_at = 0.0  # time.monotonic() when the call in hand started (0: none)
        self.abandoned = False

    def run(self) -> bool:
        """Settle the unit in this thread and hand its ``Settled`` over; False: the call was abandoned."""
        c = self.chunk
        if c.stopped:
            return True
        stage, s = c.stage, self.s
        worker._call_item.set(self.item_id)  # its log records name their own item
        end = self.start + len(self.unit)
        c.progress[6] = max(c.progress[6], end)
        while True:
            if self.backoff:
                time.sleep(self.backoff)
            self.called_at = time.monotonic()
            failure = None
            try:
                outputs, targets = attempt(c.fn, stage, self.arg, c.lock, c.routes)
            except FunctionFailed as e:
                failure = e
            with self.guard:
                if self.abandoned:  # timed out: its outputs are dropped and this thread leaves the lanes
                    return False
                self.called_at = 0.0
                if failure is None:
                    s.outputs, s.targets = outputs, targets
                    break
                self.attempts += 1
                if not unit_failed(stage, failure, self.unit, self.attempts, s, c.log):
                    break
            self.backoff = worker.backoff(stage, self.attempts)
        self.settle()
        return True

    def settle(self) -> None:
        """Hand the unit's ``Settled`` over (and mark it settled, for a sink: see ``worker.mark_settled``)."""
        c = self.chunk
        self.s.seconds = time.perf_counter() - self.t0
        worker.mark_settled(c.progress, c.seq, self.start, len(self.unit), self.s)
        c.settled.put((self.index, self.s))

    def time_out(self, lanes: Lanes) -> _Job | None:
        """Abandon the call in hand (past the stage's timeout; another thread takes its place): a failed
        attempt under the policy. Returns the job that calls the unit again (queued), else None."""
        c = self.chunk
        with self.guard:
            if self.called_at == 0.0 or self.abandoned:
                return None
            self.abandoned = True
        lanes.replace()
        self.attempts += 1
        e = _timed_out(c.stage, self.arg, "abandoned: its thread runs on to its end")
        token = worker._call_item.set(self.item_id)
        again = unit_failed(c.stage, e, self.unit, self.attempts, self.s, c.log)
        worker._call_item.reset(token)
        if not again:
            self.settle()
            return None
        job = _Job(c, self.index, self.start, self.unit, self.attempts, self.item_id, self.s,
                   worker.backoff(c.stage, self.attempts))
        lanes.jobs.put(job)
        return job


class Lanes:
    """The daemon threads that call a stage's plain function concurrently: each takes the next job from one
    queue, as many threads as the stage's ``concurrency`` (plus abandoned calls still running)."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()  # None: a thread ends
        self.count = 0  # threads taking jobs (an abandoned call's thread no longer counts)

    def ensure(self, n: int) -> None:
        """Have ``n`` threads taking jobs."""
        while self.count < n:
            self.replace()
            self.count += 1

    def replace(self) -> None:
        """Start a thread in the place of one whose call was abandoned."""
        threading.Thread(target=self._serve, name="mprun-call", daemon=True).start()

    def _serve(self) -> None:
        while (job := self.jobs.get()) is not None and job.run():
            job = None

    def close(self) -> None:
        """End the threads after their jobs."""
        for _ in range(self.count):
            self.jobs.put(None)
        self.count = 0


class _Here:
    """This process's event loop and lanes (per stage), made on first use (a forked child forgets its
    parent's)."""

    loop: asyncio.AbstractEventLoop | None = None
    lanes: dict[str, Lanes] = {}  # noqa: RUF012 - one process's state, reset by ``forget``

    @classmethod
    def forget(cls) -> None:
        cls.loop, cls.lanes = None, {}


os.register_at_fork(after_in_child=_Here.forget)


def run(awaitable: Awaitable[Any]) -> Any:
    """Run ``awaitable`` to its end on this process's event loop (made on first use, kept for the next)."""
    if _Here.loop is None or _Here.loop.is_closed():
        _Here.loop = asyncio.new_event_loop()
    return _Here.loop.run_until_complete(awaitable)


def release() -> None:
    """Close this process's event loop and end its lanes (the inline backend, at the end of a run)."""
    loop, lanes = _Here.loop, _Here.lanes
    _Here.forget()
    for each in lanes.values():
        each.close()
    if loop is not None:
        loop.close()


def settle_threads(fn: Callable[[Any], Any], stage: StagePlan, items: list[Any], tries: list[int] | None,
                   lock: Any, log: Any, fold: Fold, ids: Ids | None, routes: dict[str, int] | None) -> None:
    """Settle a chunk's units (batches, or single items) of a plain function, up to ``stage.concurrency`` at
    once in this process's lanes, into ``fold`` in input order; stop at the first that stops the run."""
    size = stage.batch or 1
    lanes = _Here.lanes.setdefault(stage.name, Lanes())
    lanes.ensure(stage.concurrency)
    chunk = _Chunk(fn, stage, lock, log, routes, fold)
    jobs = []
    for index, start in enumerate(range(0, len(items), size)):
        attempts = max(tries[start : start + size]) if tries else 0
        job = _Job(chunk, index, start, items[start : start + size], attempts, ids[start] if ids is not None else None)
        jobs.append(job)
        lanes.jobs.put(job)
    period = None if stage.timeout is None else min(float(stage.timeout) / 4, 1.0)
    settled: dict[int, Settled] = {}
    behind = 0  # the first unit not folded yet
    try:
        while behind < len(jobs):
            if period is not None:
                fold.progress[1] = time.monotonic_ns()
            try:
                index, s = chunk.settled.get(timeout=period)
            except queue.Empty:
                _time_out(jobs, lanes, float(stage.timeout or 0))
                continue
            settled[index] = s
            while behind in settled:
                job = jobs[behind]
                if fold.add(job.start, len(job.unit), settled.pop(behind)):
                    return
                behind += 1
            if period is not None:
                _time_out(jobs, lanes, float(stage.timeout or 0))
    finally:
        chunk.stopped = True


def _time_out(jobs: list[_Job], lanes: Lanes, timeout: float) -> None:
    """Abandon the calls in hand for longer than ``timeout``; their retries take their places in ``jobs``."""
    late = time.monotonic() - timeout
    for i, job in enumerate(jobs):
        if 0.0 < job.called_at < late and (again := job.time_out(lanes)) is not None:
            jobs[i] = again


async def settle_awaitable(out: Any) -> Any:
    """The value of a coroutine, or the items of an async generator, as a list."""
    if inspect.isasyncgen(out):
        return [item async for item in out]
    return await out


async def settle_all(fn: Callable[[Any], Any], stage: StagePlan, items: list[Any], tries: list[int] | None,
                     lock: Any, log: Any, fold: Fold, ids: Ids | None, routes: dict[str, int] | None) -> None:
    """Settle a chunk's units (batches, or single items) of an async function, up to ``stage.concurrency`` at
    once, into ``fold`` in input order; stop at the first that stops the run."""
    size = stage.batch or 1
    starts = range(0, len(items), size)
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
                # The task logs with the id of its own item.
                token = worker._call_item.set(ids[start] if ids is not None else None)
                settling = _settle(fn, stage, unit, attempts, lock, log, routes)
                task = asyncio.ensure_future(settling)
                worker._call_item.reset(token)
                running[task] = ahead
                ahead += 1
                fold.progress[6] = start + len(unit)
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = running.pop(task)
                settled[index] = task.result()
                start = starts[index]
                worker.mark_settled(fold.progress, fold.seq, start, min(size, len(items) - start), settled[index])
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
                  routes: dict[str, int] | None) -> Settled:
    """Call ``fn`` on a unit under the policy (``attempts``: failed attempts so far), each call within ``timeout``."""
    s = Settled()
    t0 = time.perf_counter()
    arg = unit if stage.batch else unit[0]
    while True:
        try:
            s.outputs, s.targets = await asyncio.wait_for(_attempt_async(fn, stage, arg, lock, routes), stage.timeout)
            break
        except TimeoutError:
            e = _timed_out(stage, arg, "cancelled")
        except FunctionFailed as failure:
            e = failure
        attempts += 1
        if not unit_failed(stage, e, unit, attempts, s, log):
            break
        await asyncio.sleep(worker.backoff(stage, attempts))
    s.seconds = time.perf_counter() - t0
    return s


async def _attempt_async(fn: Callable[[Any], Any], stage: StagePlan, arg: Any, lock: Any,
                         routes: dict[str, int] | None) -> tuple[list[Any], list[int] | None]:
    """``worker.attempt`` for an async function: one call awaited on this loop (the lock taken in a thread)."""
    try:
        if lock is not None:
            await _acquire(lock)
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


async def _acquire(lock: Any) -> None:
    """Take ``lock`` without blocking the loop (in a thread of the loop's executor); if the call is cancelled
    meanwhile, release it once taken."""
    taken = asyncio.get_running_loop().run_in_executor(None, lock.acquire)
    try:
        await asyncio.shield(taken)
    except asyncio.CancelledError:
        taken.add_done_callback(lambda f: None if f.cancelled() or f.exception() else lock.release())
        raise
