"""One stage runner for every backend: what a consumer or pool stage's runner thread does with results.

    backend runner (transport)                       StageRunnerCore (here)
    --------------------------                       ---------------------------------------------------
    fetch the input, cut chunks, hand them to        count each ChunkResult (per item), fail the stage on
    workers, wait for results, deaths and            an error, emit outputs (in input order when
    timeouts, start and stop workers                 ``ordered``), send dead letters, apply the error policy
                                                     to the item a dead worker held (``give_up``), the stop
                                                     protocol, the idle state of a self-fed stage, and the
                                                     accounting at the end (``_run``)

The local backend's runner (``runner.backends.local.stage``) moves chunks over pipes to processes; Ray's
(``runner.backends.ray.driver``) as calls to actors. Both subclass ``StageRunnerCore`` and supply
``_dispatch``, ``_busy``, ``_wait`` (the events of one turn of the loop), ``_stop_workers``, ``in_hand``
and ``unhanded`` (items read and never handed out).

Stop (the first SIGINT/SIGTERM): no new chunk is handed out, chunks in flight finish, their outputs are
counted but stay behind (left, like everything still queued), and the runner ends; items it had read
but not handed out go back to the count of its input queue.
"""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Callable
from typing import Any, TypeGuard, TypeVar

from runner import worker
from runner.messages import Decision
from runner.queues import Cancelled, Emitter, ItemId
from runner.results import StageStats, count_result
from runner.topology import LINGER, StagePlan

T = TypeVar("T")
KILL_GRACE = 2.0  # seconds a worker gets to stop when asked before it is killed

# What a worker answered for (part of) a chunk, as the runner passes it on: outputs, their ids, the
# outputs packed as queue messages by the worker ((n, bytes) each), and the queue of each output (routes).
Piece = tuple[list[Any], Any, "list[tuple[int, bytes]] | None", "list[int] | None"]


class StageFailed(Exception):
    """A stage cannot go on; the message names the stage and says why."""


class StageRunnerCore:
    """The part of a stage runner that is the same on every backend (see the module docstring)."""

    def __init__(self, sup: Any, plan: StagePlan, emitter: Callable[[list[Any]], Emitter], outputs: list[Any],
                 dead_emitter: Emitter | None) -> None:
        """``emitter(channels)``: the backend's Emitter of outputs into those channels; ``outputs``: the channels
        of ``plan.outputs``."""
        self.sup, self.plan = sup, plan
        self.stats: StageStats = sup.stats[plan.name]
        # A list `output`: one emitter sends every output to every queue. Routes: one emitter per queue.
        self.emitter = emitter([] if plan.routes else outputs)
        self.routed = [emitter([channel]) for channel in outputs] if plan.routes else []
        self.dead_emitter = dead_emitter
        self.emitters = [e for e in (self.emitter, *self.routed, self.dead_emitter) if e is not None]
        # Outputs of chunks waiting for their turn (ordered): seq -> pieces (outputs, ids, packed); `ready`:
        # the chunks whose last piece has come.
        self.results: dict[int, list[Piece]] = {}
        self.ready: set[int] = set()
        self.next_seq = 0
        self.next_out = 0
        self.emitted = 0  # outputs of the stage's calls (sent on, or left behind by a stop)
        self.input_done = False
        self.closing = False  # close requests sent to the workers (after the input has ended)
        self.stopping = False
        self.aborted = False
        self.finished = False
        self.quiet = False  # a self-fed stage: nothing in flight, waiting or buffered (see idle)
        self.waiting_since = 0.0  # when the first of the items now waiting for a worker arrived (time.monotonic)
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name=f"stage-{plan.name}", daemon=True)

    # -- what a backend supplies -----------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Hand chunks to workers that have room for one."""
        raise NotImplementedError

    def _busy(self) -> bool:
        """A worker holds a chunk."""
        raise NotImplementedError

    def _wait(self) -> None:
        """Ask for input if there is room, wait for the next events (input, results, deaths, a wake-up, a
        deadline) and handle them."""
        raise NotImplementedError

    def _stop_workers(self) -> None:
        raise NotImplementedError

    def _close_workers(self) -> None:
        """Send every worker a close request (``worker.CLOSE``); each answers with what its ``close()`` gives,
        and counts as busy until then."""
        raise NotImplementedError

    def _wake(self) -> None:
        """Wake the runner thread from its wait (stop, abort)."""
        raise NotImplementedError

    def in_hand(self) -> int:
        """Items finished in chunks still in workers' hands (0 when the backend cannot know)."""
        raise NotImplementedError

    def calls(self) -> int | None:
        """Calls in flight now, for a stage with ``concurrency`` (None: not shown, or not known)."""
        return None

    def unhanded(self) -> int:
        """Items read from the input and never handed out (or handed back by dead workers)."""
        raise NotImplementedError

    def _ended(self) -> None:
        """Called last by the runner thread (a backend frees what it holds)."""

    # -- the driver's side -----------------------------------------------------------------------------

    def stop(self) -> None:
        """The run is stopping: hand out nothing more, let the chunks in flight finish, then end."""
        self.stopping = True
        self._abandon()
        self._wake()

    def abort(self, *, kill: bool = False) -> None:
        """Stop the stage now (a failure elsewhere, a daemon stage at the end, a shutdown)."""
        self.aborted = True
        self._abandon()
        self._wake()

    def idle(self) -> bool:
        """A self-fed stage has nothing in flight or waiting, and all it emitted is in its queues."""
        return self.quiet

    def _abandon(self) -> None:
        for emitter in self.emitters:
            emitter.abandon()

    def sent_to(self, queue: str) -> int:
        """Outputs sent into ``queue`` so far (dead letters aside)."""
        if self.routed:
            return self.routed[self.plan.outputs.index(queue)].sent
        return self.emitter.sent

    # -- the runner thread -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self.aborted:
            if not self.stopping:
                self._dispatch()
            busy, waiting = self._busy(), self.unhanded()
            if not busy and (self.stopping or (self.input_done and not waiting)):
                if self.stopping or self.closing:
                    return
                self.closing = True  # the input has ended and every item is settled: close() in each worker
                self._close_workers()
                continue
            if self.plan.self_fed:
                self._settle_quiet(busy, waiting)
            self._wait()

    def _run(self) -> None:
        try:
            self._loop()
            if not self.aborted and not self.stopping:
                for emitter in self.emitters:
                    emitter.close()
        except StageFailed as e:
            self.error = str(e)
        except Cancelled:  # a put that waited for room, given up as the run stops: counted as left behind
            pass
        except Exception as e:  # noqa: BLE001 - e.g. an unpicklable result: reported, never lost
            if not (self.stopping or self.aborted):
                self.error = f"stage {self.plan.name!r} failed: {type(e).__name__}: {e}"
        finally:
            self._stop_workers()
            for emitter in self.emitters:
                emitter.stop(KILL_GRACE)  # after close: at once; else its linger thread sends nothing more
            if self.stopping:  # read, never handed out: they count as still in the input queue
                self.stats.items_in -= self.unhanded()
            self.stats.items_out = self.emitted
            self.finished = True
            self._ended()
            self.sup.ring()

    def _settle_quiet(self, busy: bool, waiting: int) -> None:
        """A self-fed stage that has just run out of work says so (the driver may then end its input)."""
        quiet = not busy and not waiting
        if quiet and not self.quiet:
            for emitter in (self.emitter, *self.routed):
                emitter.flush()  # what it fed itself is in the queue, and counted, before it says so
            self.quiet = True
            self.sup.ring()
        elif not quiet:
            self.quiet = False

    def _accepting(self, got: T | None) -> TypeGuard[T]:
        """Whether a read of the input brought items to take: not its end (``None``: the input is done), nor
        anything read while the run stops (never counted as taken: it stays in the count of the input queue).
        Taken, it is sampled as the queue's high-water mark: the queue is deepest now."""
        if got is None:
            self.input_done = True
            return False
        if self.stopping:
            return False
        self.sup.queue_depth(self.plan.inputs[0])
        return True

    def _taking(self, n: int) -> None:
        """Count ``n`` items taken from the input queue."""
        self.quiet = False  # before the count: the driver must never see it quiet with this batch taken
        if not self.unhanded():
            self.waiting_since = time.monotonic()
        self.stats.items_in += n

    def _holding(self, waiting: int) -> float | None:
        """A ``batch`` stage holds fewer than ``batch`` waiting items while more input may come, for at most
        ``batch_timeout`` from when the first of them arrived; a stage with ``concurrency`` holds fewer items
        than it has calls at once for at most ``LINGER`` (a call of one item would make a worker wait for it
        alone): the seconds left, or None (hand them out)."""
        plan = self.plan
        want, hold = (plan.batch, plan.batch_timeout) if plan.batch else (plan.concurrency, LINGER)
        if want < 2 or not waiting or waiting >= want or self.input_done or self.stopping:
            return None
        left = self.waiting_since + hold - time.monotonic()
        return left if left > 0 else None

    def _whole_batches(self, size: int) -> int:
        """A chunk of ``size`` items cut to whole batches of a ``batch`` stage (at least one batch)."""
        batch = self.plan.batch
        return size if not batch else max(batch, size - size % batch)

    def _count(self, process: str, res: worker.ChunkResult) -> None:
        """Count a (partial) result per item; a result with an error fails the stage."""
        failed = count_result(self.stats, res, self.plan.name, process, self.sup.log)
        if failed:
            raise StageFailed(failed)
        for letter, item_id in zip(res.dead, res.dead_ids or [None] * len(res.dead), strict=True):
            self._dead_letter(letter, item_id)

    def _emit(self, seq: int, pieces: list[Piece], *, final: bool = True) -> None:
        """Send a chunk's outputs on (in input order for ``ordered: true``, once its ``final`` piece is in)."""
        if not self.plan.ordered:
            for piece in pieces:
                self._send_on(*piece)
            return
        self.results.setdefault(seq, []).extend(pieces)
        if final:
            self.ready.add(seq)
        while self.next_out in self.ready:
            self.ready.discard(self.next_out)
            for piece in self.results.pop(self.next_out):
                self._send_on(*piece)
            self.next_out += 1

    def _send_on(self, outputs: list[Any], ids: Any, packed: list[tuple[int, bytes]] | None,
                 targets: list[int] | None = None) -> None:
        """Emit outputs (``packed``: as output queue messages made by the worker; ``targets``: the queue of each,
        for a stage with routes). While the run stops they are counted and left behind."""
        self.emitted += sum(n for n, _ in packed) if packed else len(outputs)
        if targets is not None:
            self._send_routed(outputs, ids, targets)
            return
        if self.stopping and self.plan.outputs:
            return
        for n, data in packed or ():
            if not self.emitter.emit_packed(n, data):
                self.emitter.emit_many(*pickle.loads(data))
        if outputs:
            self.emitter.emit_many(outputs, ids)

    def _send_routed(self, outputs: list[Any], ids: Any, targets: list[int]) -> None:
        """Each output to the queue of its route (counted per queue, even when a stop leaves them behind)."""
        groups: dict[int, tuple[list[Any], list[Any]]] = {}
        for out, target, item_id in zip(outputs, targets, ids if ids is not None else [None] * len(outputs),
                                        strict=True):
            group = groups.setdefault(target, ([], []))
            group[0].append(out)
            group[1].append(item_id)
        routed = self.stats.routed
        for target, (outs, out_ids) in groups.items():
            queue = self.plan.outputs[target]
            routed[queue] = routed.get(queue, 0) + len(outs)
            if not self.stopping:
                self.routed[target].emit_many(outs, out_ids)

    def _dead_letter(self, letter: dict[str, Any], item_id: ItemId) -> None:
        assert self.dead_emitter is not None
        self.stats.dead_lettered += 1
        if not self.stopping:
            self.dead_emitter.emit_many([letter], [item_id])

    def give_up(self, process: str, item: Any, attempts: int, item_id: ItemId, reason: str) -> Decision:
        """The error policy for the item a dead (or timed-out) worker held, its ``attempts``-th failure: the one
        recovery rule of every backend. Counts it, dead-letters it, or fails the stage."""
        st, plan = self.stats, self.plan
        st.failed += 1
        decided = worker.verdict(plan, attempts)
        if decided == Decision.RETRY:
            st.retried += 1
        elif decided == Decision.FAIL:
            on = worker.short_repr(item)
            raise StageFailed(f"stage {plan.name!r} (process {process}) failed on item {on}: {reason}")
        elif decided == Decision.DEAD_LETTER:
            self._dead_letter(worker.give_up_letter(plan, item, reason, attempts), item_id)
        else:
            st.skipped += 1
        self.sup.log.warning("item in a dead worker", stage=plan.name, process=process, item=worker.short_repr(item),
                             item_id=worker.item_id_text(item_id, self.sup.id_names), attempts=attempts, reason=reason)
        return decided

    def died_closing(self, process: str, seq: int, reason: str) -> None:
        """A worker died in its ``close()``: what it held is gone (under ``on_error: fail`` the stage fails)."""
        if self.plan.on_error == "fail":
            raise StageFailed(f"stage {self.plan.name!r} (process {process}) failed in close(): {reason}")
        self.sup.log.warning("worker died in close(): what it held is lost", stage=self.plan.name, process=process,
                             reason=reason)
        self._emit(seq, [])

    def replaced(self, process: str, reason: str) -> None:
        """Count and log a worker that died or timed out and is replaced."""
        self.stats.restarts += 1
        self.sup.restarts[process] = self.sup.restarts.get(process, 0) + 1
        self.sup.log.warning("worker replaced", stage=self.plan.name, process=process, reason=reason)

    def exited(self, process: str, code: int | None, **where: Any) -> None:
        """Record how a worker ended."""
        self.sup.exit_codes[process] = code
        self.sup.log.info("process exited", stage=self.plan.name, process=process, exitcode=code, **where)
