r"""The runner of one consumer or pool stage on the local backend: a thread of the main process.

    input channel --fetcher thread--> StageRunner --task pipe (runner.wire.Outbox)--> worker processes
                                          ^          <--result pipe-- ChunkResults (partial ones first)
                                          \--Emitter--> output channels, dead letters

The runner hands chunks of items to its workers over a private task pipe each and reads their results
from a private result pipe each, never blocking on a write (``runner.wire`` says why that cannot
deadlock); so a worker that dies, is killed or hangs never touches a shared queue, and the runner knows
exactly which items it held (shared memory ``progress``: the item in hand).
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any

from runner import wire, worker
from runner.backends.local.children import KILL_GRACE, died_message, exit_code_of, start_child, stop_child
from runner.backends.stage import StageFailed, StageRunnerCore
from runner.messages import Decision
from runner.queues import Emitter, FifoChannel, IdRuns
from runner.topology import BATCH_BYTES, MAX_BATCH, StagePlan

if TYPE_CHECKING:
    from runner.backends.local.driver import Supervisor
    from runner.queues import Channel

TIMEOUT_POLL = 0.05  # seconds between looks at a timed stage's worker whose call has not started yet
FETCH_BYTES = 4 << 20  # a stage runner reads its input while fewer bytes than this (or a chunk per worker) wait
DEPTH = 2  # chunks in flight per worker (one once items are known to be slow: see StageRunner._depth)
SLOW_ITEM = 0.001  # seconds per item from which a chunk's round trip to the runner no longer shows
CHUNK_SECONDS = 0.05  # work a chunk should hold, once a stage's time per item is known
FIRST_CHUNK = 8  # items in a stage's chunks until then


class Bell:
    """A self-pipe that threads ring to wake a ``wait``; safe to ring after it is closed.

    Ringing after ``close`` is a no-op: an abandoned thread could otherwise write into the same
    descriptor number, reused by the next run.
    """

    def __init__(self) -> None:
        self.r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._lock = threading.Lock()
        self._closed = False

    def ring(self) -> None:
        with self._lock:
            if not self._closed:
                with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
                    os.write(self._w, b"!")

    def clear(self) -> None:
        """Take the pending rings (call once ``wait`` said ``r`` is ready)."""
        os.read(self.r, 4096)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            os.close(self.r)
            os.close(self._w)


@dataclass
class _Task:
    """A chunk handed to a worker, as the runner keeps it in case the worker dies holding it."""

    seq: int
    items: list[Any] | bytes | str  # bytes: a whole batch of the input queue, still pickled; str: worker.CLOSE
    tries: list[int] | None  # failed attempts of each item so far (None: none failed yet)
    ids: Any
    n: int  # items in it
    settled: int = 0  # items at its start already answered by partial results (see worker.run_items)

    def frames(self) -> list[Any]:
        """What the worker receives (``worker.worker_main``): a still-pickled batch as a frame of its own after
        the task, so that it is never copied into a pickle here."""
        if type(self.items) is bytes:
            return [ForkingPickler.dumps((self.seq, None, self.tries, self.ids), pickle.HIGHEST_PROTOCOL), self.items]
        return [ForkingPickler.dumps((self.seq, self.items, self.tries, self.ids), pickle.HIGHEST_PROTOCOL)]


@dataclass
class _Worker:
    """A worker process of a stage, seen from its runner."""

    name: str
    process: Any
    outbox: wire.Outbox  # chunks to it (its task pipe, never blocking this thread)
    results: Any  # the read end of its result pipe
    progress: Any
    # Chunks sent and not answered yet, oldest first; up to DEPTH, so a worker finds its next chunk waiting
    # in its pipe when it finishes one.
    tasks: deque[_Task] = field(default_factory=deque)
    retiring: bool = False
    timed_out: bool = False
    kill_at: float | None = None


class StageRunner(StageRunnerCore):
    """A consumer or pool stage, run from one thread of the main process.

    Reads the input queue (a fetcher thread gets one batch at a time, on demand), hands chunks to idle
    workers, emits their results (in input order for ``ordered: true``), applies the error policy to
    items held by workers that died or timed out, and replaces those workers.

    Memory is bounded in bytes as well as items: it fetches while fewer than ``FETCH_BYTES`` (and
    ``2 * MAX_BATCH`` items) wait, cuts chunks to about ``BATCH_BYTES`` from the size of the batches it
    reads, and keeps at most ``DEPTH`` chunks in flight per worker (the transport: ``runner.wire``).

    ``stop`` (the first SIGINT/SIGTERM): no new chunk is handed out, chunks in flight finish, their
    outputs are counted but stay behind (left in the output queues, like everything still queued), and
    the runner ends; items it had read but not handed out go back to the count of its input queue.
    """

    def __init__(self, sup: Supervisor, plan: StagePlan, outputs: list[Channel]) -> None:
        collect = sup.collected[plan.name].extend if plan.function == "collect" else None

        def emitter(channels: list[Channel]) -> Emitter:
            return Emitter(channels, on_batch=collect, ids=bool(channels))  # a sink passes no ids on

        super().__init__(sup, plan, emitter, outputs,
                         Emitter([sup.channels[plan.dead_letter]], ids=True) if plan.dead_letter else None)
        self.sup: Supervisor = sup
        self.input = sup.channels[plan.inputs[0]]
        self.lock = sup.locks.get(plan.lock) if plan.lock else None
        self.workers: list[_Worker] = []
        self.buffer: list[Any] = []  # items waiting for a worker (sliced, never walked item by item here)
        self.ids = IdRuns()  # the ids of the items in `buffer`, in runs
        # Batches of a FIFO input still pickled, (n, bytes), after `buffer`: one that fits a chunk goes to
        # a worker as it is, so the items are never unpickled and pickled again in this process.
        self.packed: deque[tuple[int, bytes]] | None = deque() if isinstance(self.input, FifoChannel) else None
        self.packed_items = 0
        self.packed_bytes = 0
        self.item_bytes = 0.0  # pickled bytes of an item, as the last batch read measured (0: not known yet)
        self.again: deque[_Task] = deque()  # chunks of dead workers, to hand out again
        self.fetched: deque[tuple[Any, Any] | None] = deque()
        self.want = threading.Event()
        self.bell = Bell()  # the fetcher, stop() and abort() ring it
        self.poller = wire.Poller()
        self.fetching = False
        self.kill = False  # abort with SIGKILL at once (the shutdown timeout has passed)
        self.fetch_error: str | None = None

    def start(self) -> None:
        for name in self.plan.process_names:
            self.workers.append(self._spawn(name, self.sup.ctx.RawArray("q", worker.progress_slots(self.plan))))
        threading.Thread(target=self._fetch, name=f"fetch-{self.plan.name}", daemon=True).start()
        self.thread.start()

    def _spawn(self, name: str, progress: Any) -> _Worker:
        task_r, task_w = self.sup.ctx.Pipe(duplex=False)  # chunks: this thread -> the worker
        result_r, result_w = self.sup.ctx.Pipe(duplex=False)  # ChunkResults: the worker -> this thread
        for conn in (task_w, result_w):
            wire.widen(conn)
        progress[:] = [0] * len(progress)  # a successor's marks must not be read as its own (same seq)
        progress[2] = -1
        spec = worker.WorkerSpec(
            stage=self.plan,
            name=name,
            base_dir=self.sup.topo.base_dir,
            log_queue=self.sup.log_queue,
            log_level=self.sup.topo.log_level,
            parent_pid=self.sup.pid,
            conn=task_r,
            results=result_w,
            progress=progress,
            lock=self.lock,
            id_names=self.sup.id_names,
            pack=self.emitter.packed_max,
        )
        process = self.sup.ctx.Process(target=worker.worker_main, args=(spec,), name=name, daemon=self.plan.daemon)
        start_child(process)
        task_r.close()
        result_w.close()
        return _Worker(name, process, wire.Outbox(task_w), result_r, progress)

    def _fetch(self) -> None:
        """Fetcher thread: one blocking read of the input queue each time the runner asks."""
        while True:
            self.want.wait()
            self.want.clear()
            try:
                batch = self.input.get_packed() if isinstance(self.input, FifoChannel) else self.input.get_ids()
            except Exception as e:  # noqa: BLE001 - e.g. the LIFO manager is gone: the stage fails, clearly
                self.fetch_error = (f"stage {self.plan.name!r}: cannot read queue {self.plan.inputs[0]!r}: "
                                    f"{type(e).__name__}: {e}")
                self.bell.ring()
                return
            self.fetched.append(batch)
            self.bell.ring()
            if batch is None:
                return

    def abort(self, *, kill: bool = False) -> None:
        """Stop the stage now (``kill``: SIGKILL its workers at once: the shutdown timeout has passed)."""
        self.kill = self.kill or kill
        super().abort()

    def _wake(self) -> None:
        self.bell.ring()

    def in_hand(self) -> int:
        """Items finished in chunks still in workers' hands (``progress[0]``: the index of the item in hand)."""
        return sum(int(w.progress[0]) for w in list(self.workers) if w.tasks)

    def calls(self) -> int | None:
        """Calls in flight (``progress[6]``: one past the last item started; ``[0]``: the first unsettled one)."""
        if self.plan.concurrency == 1:
            return None
        return sum(max(0, int(w.progress[6]) - int(w.progress[0])) for w in list(self.workers) if w.tasks)

    def unhanded(self) -> int:
        return self.waiting + sum(t.n - t.settled for t in self.again)

    def _ended(self) -> None:
        self.bell.close()

    # -- the runner thread -----------------------------------------------------------------------------

    def _close_workers(self) -> None:
        for w in self.workers:
            if w.retiring:  # maxtasksperchild: it leaves, and its state with it
                continue
            task = _Task(self.next_seq, worker.CLOSE, None, None, 0)
            self.next_seq += 1
            w.tasks.append(task)
            with contextlib.suppress(OSError):  # it died: its sentinel is ready, and _exited settles the request
                w.outbox.send(ForkingPickler.dumps((task.seq, worker.CLOSE, None, None), pickle.HIGHEST_PROTOCOL))

    def _busy(self) -> bool:
        return any(w.tasks for w in self.workers)

    def _wait(self) -> None:
        if not (self.stopping or self.input_done or self.fetching) and self._wants_input():
            self.fetching = True
            self.want.set()
        reads: list[Any] = [self.bell.r]
        writes = []
        for w in self.workers:
            reads += [w.results, w.process.sentinel]
            if w.outbox.pending:
                writes.append(w.outbox)
        for ready in self.poller.wait(reads, writes, self._next_deadline()):
            if ready == self.bell.r:
                self._take_fetched()
            elif isinstance(ready, wire.Outbox):
                with contextlib.suppress(OSError):  # a dead worker: its sentinel says so
                    ready.flush()
            else:
                self._worker_ready(ready)
        self._enforce_timeouts()

    def _wants_input(self) -> bool:
        """Fewer than ``2 * MAX_BATCH`` items and ``FETCH_BYTES`` (or a chunk per worker) wait for a worker."""
        waiting_bytes = self.packed_bytes + len(self.buffer) * self.item_bytes
        room = max(FETCH_BYTES, 2 * DEPTH * len(self.workers) * BATCH_BYTES)
        return self.waiting < 2 * MAX_BATCH and waiting_bytes < room

    def _take_fetched(self) -> None:
        self.bell.clear()
        if self.fetch_error and not self.stopping:  # while stopping, the input no longer matters
            raise StageFailed(self.fetch_error)
        while self.fetched:
            batch = self.fetched.popleft()
            self.fetching = False
            if not self._accepting(batch):
                continue
            if self.packed is not None:
                n, data = batch
                self._taking(n)  # before the batch waits: it notes when the first waiting item came
                self.packed.append(batch)
                self.packed_items += n
                self.packed_bytes += len(data)
                self.item_bytes = len(data) / n
            else:
                items = batch[0]
                if items:
                    self.item_bytes = len(pickle.dumps(items[0], pickle.HIGHEST_PROTOCOL))
                self._taking(len(items))
                self._buffer(*batch)

    def _dispatch(self) -> None:
        for depth in range(1, self._depth() + 1):  # every worker's first chunk before anyone's second
            for w in self.workers:
                if len(w.tasks) >= depth or w.retiring or w.kill_at is not None:
                    continue
                task = self._next_task()
                if task is None:
                    return
                w.tasks.append(task)
                try:
                    for frame in task.frames():
                        w.outbox.send(frame)
                except OSError:  # it died: its sentinel is ready, and _exited hands its chunks out again
                    break

    def _next_task(self) -> _Task | None:
        """The next chunk to hand out: a dead worker's first, then what waits (None: nothing)."""
        if self.again:
            return self.again.popleft()
        if not self.waiting or self._holding(self.waiting) is not None:
            return None
        size = self._whole_batches(self.plan.chunksize or self._chunk_size())
        # Once the time per item is known and while more input comes, a batch that is not too much
        # work for one worker goes whole (the others get the next ones); the first items are split.
        known = self.stats.busy_seconds > 0 and not self.input_done
        whole = self.plan.chunksize or (self._chunk_size(MAX_BATCH) if known else size)
        if not self.buffer and self.packed and self._least() <= self.packed[0][0] <= whole:
            n, data = self.packed.popleft()  # a whole batch: the worker unpickles it
            self.packed_items -= n
            self.packed_bytes -= len(data)
            task = _Task(self.next_seq, data, None, None, n)
        else:
            while len(self.buffer) < size and self.packed:
                self._unpack()
            chunk = self.buffer[:size]
            del self.buffer[:size]
            task = _Task(self.next_seq, chunk, None, self.ids.take(len(chunk)), len(chunk))
        self.next_seq += 1
        return task

    @property
    def waiting(self) -> int:
        """Items read from the input and not yet handed to a worker."""
        return len(self.buffer) + self.packed_items

    def _unpack(self) -> None:
        """Move the first still-pickled batch into ``buffer`` (it is to be split, or joined with other items)."""
        assert self.packed is not None
        n, data = self.packed.popleft()
        self.packed_items -= n
        self.packed_bytes -= len(data)
        self._buffer(*pickle.loads(data))

    def _buffer(self, items: list[Any], ids: Any) -> None:
        """Append a batch and its ids (None: the writer gave none) to what waits for a worker."""
        self.ids.add(ids if ids is not None else [None] * len(items))
        self.buffer.extend(items)

    def _depth(self) -> int:
        """Chunks in flight per worker: DEPTH, so that a worker finds its next short chunk waiting in its
        pipe; one once items take SLOW_ITEM or more, so that at the end of the input no chunk waits behind
        a busy worker while another worker has nothing left to do. With ``concurrency`` a worker waits on its
        calls, not on its CPU: it always has its next chunk waiting."""
        st = self.stats
        done = st.delivered + st.skipped + st.dead_lettered
        slow = done and st.busy_seconds / done >= SLOW_ITEM and self.plan.concurrency == 1
        return 1 if slow else DEPTH

    def _chunk_size(self, share: int = 0) -> int:
        """Items for the next chunk: a share of what waits, about CHUNK_SECONDS of work once the time per
        item is known (few items until then), so slow functions balance and fast ones move in bulk; never
        much more than BATCH_BYTES."""
        most = MAX_BATCH if not self.item_bytes else max(1, min(MAX_BATCH, int(BATCH_BYTES / self.item_bytes)))
        share = min(most, share or max(1, math.ceil(self.waiting / len(self.workers))))
        st = self.stats
        done = st.delivered + st.skipped + st.dead_lettered
        wave = min(most, self._least())
        if not done:
            return max(min(share, FIRST_CHUNK), wave)
        per_item = st.busy_seconds / done
        paced = share if per_item <= 0 else int(CHUNK_SECONDS / per_item)
        more = 8 * wave if self.plan.concurrency > 1 else wave  # a worker ends a chunk before it starts the next
        return max(1, min(share, max(paced, more)), wave)

    def _least(self) -> int:
        """The fewest items a chunk should hold (however few wait per worker): a batch of a ``batch`` stage,
        times ``concurrency``: the calls a worker makes at once take as long as one."""
        return (self.plan.batch or 1) * self.plan.concurrency

    def _worker_ready(self, ready: Any) -> None:
        for w in list(self.workers):
            if ready is w.results:
                self._receive(w)
            elif ready == w.process.sentinel:
                self._receive(w)
                self._exited(w)

    def _receive(self, w: _Worker) -> None:
        """Every result the worker has begun to send (a worker writes a message it began to the end)."""
        try:
            while w.results.poll():
                res = w.results.recv()
                if res.packed:
                    res.packed = [(n, w.results.recv_bytes()) for n in res.packed]
                self._result(w, res)
        except (EOFError, OSError):
            pass

    def _result(self, w: _Worker, res: worker.ChunkResult) -> None:
        self._count(w.name, res)
        if res.partial:
            w.tasks[0].settled += res.done
        else:
            w.tasks.popleft()
            w.retiring = res.retire
        self._emit(res.seq, [(res.outputs, res.ids, res.packed, res.targets)], final=not res.partial)

    def _exited(self, w: _Worker) -> None:
        code = exit_code_of(w.process)
        self.exited(w.name, code, pid=w.process.pid)
        self.workers.remove(w)
        w.outbox.close()
        w.results.close()
        if w.retiring and code == 0:  # maxtasksperchild: chunks it did not read go to its successor
            self.again.extendleft(reversed(w.tasks))
            self.workers.append(self._spawn(w.name, w.progress))
            return
        reason = (
            f"call timed out after {self.plan.timeout:g}s (worker {w.name} replaced)"
            if w.timed_out
            else died_message(self.plan.name, w.name, code)
        )
        if w.tasks and w.tasks[0].items == worker.CLOSE:
            self.died_closing(w.name, w.tasks.popleft().seq, reason)
        elif w.tasks and int(w.progress[2]) == w.tasks[0].seq:
            self._recover(w, reason)
        else:  # it died between chunks: nothing was in its hands
            self.again.extendleft(reversed(w.tasks))
        if not w.timed_out and not self.plan.restart:
            raise StageFailed(f"{died_message(self.plan.name, w.name, code)}; restart: false, so the run stops")
        self.replaced(w.name, reason)
        if not self.stopping:  # else nothing more will be handed out: no successor
            self.workers.append(self._spawn(w.name, w.progress))

    def _recover(self, w: _Worker, reason: str) -> None:
        """Settle the chunk a dead worker held: exactly once where that can be known.

        Items answered by partial results are settled. The calls completed after them (before the item in
        hand) had their effects: in a sink (no output queue) they count as delivered and are never called
        again (their skips and failures come from the worker's shared counters); in a stage with outputs,
        their outputs died with the worker, so they are called again (logged). With concurrency, a sink's
        items settled out of order (``worker.mark_settled``) count too, and the item in hand is the first
        one not settled. The item in hand counts one failed attempt and the error policy decides about it.
        The items after it, and the worker's other chunks, are handed out again.
        """
        task = w.tasks.popleft()
        items, ids = task.items, task.ids
        if type(items) is bytes:  # a batch sent still pickled
            items, ids = pickle.loads(items)
        ids = list(ids) if ids is not None else [None] * len(items)
        self.again.extendleft(reversed(w.tasks))  # chunks it had not started: handed out again as they are
        tries = task.tries or [0] * len(items)
        index = min(int(w.progress[0]), len(items) - 1)
        st, plan = self.stats, self.plan
        redo = list(range(task.settled, index))  # calls completed whose result died with the worker
        if redo and not plan.outputs:
            skipped, failed, retried = (int(w.progress[i]) for i in (3, 4, 5))
            st.skipped += skipped
            st.failed += failed
            st.retried += retried
            st.delivered += len(redo) - skipped
            redo = []
        elif redo:
            self.sup.log.warning("calling again items whose outputs died with their worker", stage=plan.name,
                                 process=w.name, items=len(redo),
                                 first_item_id=worker.item_id_text(ids[redo[0]], self.sup.id_names))
        after = self._unsettled(w, task.seq, index, len(items))
        if not after:  # the calls had all ended
            self._emit(task.seq, [], final=True)
            return
        index = after[0]
        attempts = tries[index] + 1
        keep = [*redo, *after[1:]]
        if self.give_up(w.name, items[index], attempts, ids[index], reason) == Decision.RETRY:
            keep.insert(len(redo), index)
        if keep:
            again_tries = [attempts if i == index else tries[i] for i in keep]
            again = _Task(task.seq, [items[i] for i in keep], again_tries, [ids[i] for i in keep], len(keep))
            self.again.appendleft(again)
        else:
            self._emit(task.seq, [], final=True)

    def _unsettled(self, w: _Worker, seq: int, index: int, n: int) -> list[int]:
        """Items ``index .. n`` of the dead worker's chunk ``seq`` that its marks do not show settled (all of
        them but for a sink with concurrency); those marked are counted here."""
        marks, first = w.progress, worker.PROGRESS_SLOTS
        if len(marks) == first:
            return list(range(index, n))
        how = [int(marks[first + i]) - seq * 4 if i < worker.MARKED else 0 for i in range(index, n)]
        self.stats.delivered += how.count(worker.DELIVERED)
        self.stats.skipped += how.count(worker.SKIPPED)
        return [i for i, h in zip(range(index, n), how, strict=True) if h not in (worker.DELIVERED, worker.SKIPPED)]

    def _next_deadline(self) -> float | None:
        """Seconds until the runner must look at its workers again without being woken (None: never)."""
        now = time.monotonic()
        deadlines = [w.kill_at for w in self.workers if w.kill_at is not None]
        held = self._holding(self.waiting)
        if held is not None:
            deadlines.append(now + held)
        if self.plan.timeout:
            for w in self.workers:
                if w.tasks:
                    started = w.progress[1]
                    # A chunk whose call has not started yet may start one that never ends and never wakes
                    # this thread: look again soon, so its timeout is enforced from when it started.
                    deadlines.append(started / 1e9 + self.plan.timeout if started > 0 else now + TIMEOUT_POLL)
        return None if not deadlines else max(0.0, min(deadlines) - now)

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.kill_at is not None:
                if now >= w.kill_at and w.process.is_alive():
                    w.process.kill()
            elif self.plan.timeout and w.tasks and w.progress[1] > 0 and now >= w.progress[1] / 1e9 + self.plan.timeout:
                w.timed_out = True
                w.kill_at = now + KILL_GRACE
                stop_child(w.process)

    def _stop_workers(self) -> None:
        """End every worker: an idle one is told to leave; one with work (or after an abort) is asked to stop;
        whatever is still there after KILL_GRACE (or at once, with ``kill``) is killed."""
        for w in self.workers:
            if self.kill:
                w.process.kill()
                continue
            if not (self.aborted or w.tasks):
                with contextlib.suppress(OSError):
                    w.outbox.send(ForkingPickler.dumps(None))
                if not w.outbox.pending:
                    continue
            stop_child(w.process)
        deadline = time.monotonic() + KILL_GRACE
        for w in self.workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(KILL_GRACE)
            w.outbox.close()
            w.results.close()
            self.exited(w.name, w.process.exitcode, pid=w.process.pid)
        self.workers.clear()
