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
from typing import Any

from runner import worker
from runner.messages import Decision
from runner.queues import Cancelled, Emitter
from runner.results import StageStats
from runner.topology import StagePlan

KILL_GRACE = 2.0  # seconds a worker gets to stop when asked before it is killed


class StageFailed(Exception):
    """A stage cannot go on; the message names the stage and says why."""


class StageRunnerCore:
    """The part of a stage runner that is the same on every backend (see the module docstring)."""

    def __init__(self, sup: Any, plan: StagePlan, emitter: Emitter, dead_emitter: Emitter | None) -> None:
        self.sup, self.plan = sup, plan
        self.stats: StageStats = sup.stats[plan.name]
        self.emitter, self.dead_emitter = emitter, dead_emitter
        # Outputs of chunks waiting for their turn (ordered): seq -> pieces (outputs, ids, packed); `ready`:
        # the chunks whose last piece has come.
        self.results: dict[int, list[tuple[list[Any], Any, Any]]] = {}
        self.ready: set[int] = set()
        self.next_seq = 0
        self.next_out = 0
        self.emitted = 0  # outputs of the stage's calls (sent on, or left behind by a stop)
        self.input_done = False
        self.stopping = False
        self.aborted = False
        self.finished = False
        self.quiet = False  # a self-fed stage: nothing in flight, waiting or buffered (see idle)
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

    def _wake(self) -> None:
        """Wake the runner thread from its wait (stop, abort)."""
        raise NotImplementedError

    def in_hand(self) -> int:
        """Items finished in chunks still in workers' hands (0 when the backend cannot know)."""
        raise NotImplementedError

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
        for emitter in (self.emitter, self.dead_emitter):
            if emitter is not None:
                emitter.abandon()

    # -- the runner thread -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self.aborted:
            if not self.stopping:
                self._dispatch()
            busy, waiting = self._busy(), self.unhanded()
            if not busy and (self.stopping or (self.input_done and not waiting)):
                return
            if self.plan.self_fed:
                self._settle_quiet(busy, waiting)
            self._wait()

    def _run(self) -> None:
        try:
            self._loop()
            if not self.aborted and not self.stopping:
                self.emitter.close()
                if self.dead_emitter is not None:
                    self.dead_emitter.close()
        except StageFailed as e:
            self.error = str(e)
        except Cancelled:  # a put that waited for room, given up as the run stops: counted as left behind
            pass
        except Exception as e:  # noqa: BLE001 - e.g. an unpicklable result: reported, never lost
            if not (self.stopping or self.aborted):
                self.error = f"stage {self.plan.name!r} failed: {type(e).__name__}: {e}"
        finally:
            self._stop_workers()
            for emitter in (self.emitter, self.dead_emitter):
                if emitter is not None:
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
            self.emitter.flush()  # what it fed itself is in the queue, and counted, before it says so
            self.quiet = True
            self.sup.ring()
        elif not quiet:
            self.quiet = False

    def _taking(self, n: int) -> None:
        """Count ``n`` items taken from the input queue."""
        self.quiet = False  # before the count: the driver must never see it quiet with this batch taken
        self.stats.items_in += n

    def _count(self, process: str, res: worker.ChunkResult) -> None:
        """Count a (partial) result per item; a result with an error fails the stage."""
        st = self.stats
        st.skipped += res.skipped
        st.retried += res.retried
        st.failed += res.failed
        st.busy_seconds += res.busy
        st.latency.add(res.latency)
        if res.error is not None:
            summary, tb, item = res.error
            on = f" on item {item}" if item else ""
            self.sup.log.error("stage failed", stage=self.plan.name, process=process, error=summary, item=item,
                               exception=tb)
            raise StageFailed(f"stage {self.plan.name!r} (process {process}) failed{on}: {summary}")
        st.delivered += res.done - res.skipped - len(res.dead)
        for letter, item_id in zip(res.dead, res.dead_ids or [None] * len(res.dead), strict=True):
            self._dead_letter(letter, item_id)

    def _emit(self, seq: int, pieces: list[tuple[list[Any], Any, Any]], *, final: bool = True) -> None:
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

    def _send_on(self, outputs: list[Any], ids: Any, packed: list[tuple[int, bytes]] | None) -> None:
        """Emit outputs (``packed``: as output queue messages made by the worker). While the run stops they are
        counted and left behind."""
        self.emitted += sum(n for n, _ in packed) if packed else len(outputs)
        if self.stopping and self.plan.outputs:
            return
        for n, data in packed or ():
            if not self.emitter.emit_packed(n, data):
                self.emitter.emit_many(*pickle.loads(data))
        if outputs:
            self.emitter.emit_many(outputs, ids)

    def _dead_letter(self, letter: dict[str, Any], item_id: int | None) -> None:
        assert self.dead_emitter is not None
        self.stats.dead_lettered += 1
        if not self.stopping:
            self.dead_emitter.emit_many([letter], [item_id])

    def give_up(self, process: str, item: Any, attempts: int, item_id: int | None, reason: str) -> Decision:
        """The error policy for the item a dead (or timed-out) worker held, its ``attempts``-th failure: the one
        recovery rule of every backend. Counts it, dead-letters it, or fails the stage."""
        st, plan = self.stats, self.plan
        st.failed += 1
        decided = worker.verdict(plan, attempts)
        if decided == Decision.RETRY:
            st.retried += 1
        elif decided == Decision.FAIL:
            raise StageFailed(f"stage {plan.name!r} (process {process}) failed on item {worker.short_repr(item)}: {reason}")
        elif decided == Decision.DEAD_LETTER:
            self._dead_letter(worker.give_up_letter(plan, item, reason, attempts), item_id)
        else:
            st.skipped += 1
        self.sup.log.warning("item in a dead worker", stage=plan.name, process=process, item=worker.short_repr(item),
                             item_id=worker.item_id_text(item_id, self.sup.id_names), attempts=attempts, reason=reason)
        return decided

    def replaced(self, process: str, reason: str) -> None:
        """Count and log a worker that died or timed out and is replaced."""
        self.stats.restarts += 1
        self.sup.restarts[process] = self.sup.restarts.get(process, 0) + 1
        self.sup.log.warning("worker replaced", stage=self.plan.name, process=process, reason=reason)

    def exited(self, process: str, code: int | None, **where: Any) -> None:
        """Record how a worker ended."""
        self.sup.exit_codes[process] = code
        self.sup.log.info("process exited", stage=self.plan.name, process=process, exitcode=code, **where)
