"""Code that runs IN THE MAIN process: start the topology, watch it, end streams, shut it down.

    producer processes --FifoChannel/LifoChannel--> consumer processes --...--> sinks
                                 \\--> pool stage: pump thread (here) --apply_async--> Pool workers
    every child --control pipe--> Supervisor.loop (stats, collected items, errors)
    every process --log queue--> Listener (here) --> stderr, log_file

The supervisor blocks in ``multiprocessing.connection.wait`` on every control pipe, every process
sentinel and a signal pipe; it never polls.  When every stage writing to a queue has finished, it ends
that queue (one marker per reader process, or closing a LIFO stack), so readers drain it and stop.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import structlog

from runner import logs, worker
from runner.errors import RunFailed
from runner.queues import Channel, Emitter, FifoChannel, LifoChannel, StackManager, read
from runner.topology import StagePlan, Topology

JOIN_TIMEOUT = 5.0  # seconds a terminated process gets before it is killed


@dataclass
class StageStats:
    """Counts and timing of one stage."""

    items_in: int = 0
    items_out: int = 0
    seconds: float = 0.0
    busy_seconds: float = 0.0
    processes: int = 0

    @property
    def items_per_second(self) -> float:
        """Items handled per second of the stage's wall time."""
        items = max(self.items_in, self.items_out)
        return items / self.seconds if self.seconds > 0 else 0.0


@dataclass
class RunResult:
    """What a run ended with: ``exit_code``, per-stage ``stats``, and items of ``collect`` sinks."""

    exit_code: int
    stats: dict[str, StageStats] = field(default_factory=dict)
    collected: dict[str, list[Any]] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


@dataclass
class _Unit:
    """A process (or a pool's pump thread) of a stage, with the read end of its control pipe."""

    stage: str
    name: str
    conn: Any
    process: Any = None
    done: bool = False


class _Signalled(Exception):
    def __init__(self, signum: int) -> None:
        self.signum = signum


class Supervisor:
    """Runs one ``Topology`` on this machine with multiprocessing."""

    def __init__(self, topology: Topology) -> None:
        self.topo = topology
        self.ctx = multiprocessing.get_context(topology.start_method)
        if topology.start_method == "forkserver":
            self.ctx.set_forkserver_preload(["runner.worker"])
        self.log = structlog.get_logger("mprun")
        self.units: list[_Unit] = []
        self.stats = {s.name: StageStats() for s in topology.stages}
        self.collected: dict[str, list[Any]] = {s.name: [] for s in topology.stages if s.function == "collect"}
        self.started: dict[str, float] = {}
        self.finished: set[str] = set()
        self.ended_queues: set[str] = set()
        self.pools: dict[str, _PoolStage] = {}
        self.failure: str | None = None
        self.manager: StackManager | None = None
        self.channels: dict[str, Channel] = {}
        self.locks: dict[str, Any] = {}

    # -- the run ---------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Start, supervise and shut down the whole topology."""
        t0 = time.perf_counter()
        # Records from every process of the run (log records made plain data); read by the listener.
        log_queue = self.ctx.Queue()
        self.log_queue = log_queue
        listener = logs.start_listener(log_queue, self.topo.log_level, self.topo.log_format, self.topo.log_file)
        root = logging_state()
        logs.configure(log_queue, self.topo.log_level, stage="-", process="MainProcess")
        sig_r, sig_w = os.pipe()
        os.set_blocking(sig_w, False)
        previous = _install_signals(self, sig_w)
        exit_code = 0
        try:
            self._setup()
            self._loop(sig_r)
        except _Signalled as e:
            exit_code = 128 + e.signum
            self.failure = f"stopped by {signal.Signals(e.signum).name}"
        except KeyboardInterrupt:
            exit_code = 130
            self.failure = "stopped by SIGINT"
        except RunFailed as e:
            exit_code = 1
            self.failure = str(e)
        finally:
            _restore_signals(previous)
            self._shutdown()
            os.close(sig_r)
            os.close(sig_w)
            listener.stop()
            logs.close_handlers(listener)
            restore_logging(root)
        elapsed = time.perf_counter() - t0
        return RunResult(exit_code, self.stats, self.collected, self.failure, elapsed)

    def _setup(self) -> None:
        for plan in self.topo.queues.values():
            if plan.type == "lifo":
                if self.manager is None:
                    # Serves the LIFO stacks of this run; private socket, random key, shut down with the run.
                    self.manager = StackManager(authkey=os.urandom(32), ctx=self.ctx)
                    self.manager.start(_ignore_sigint)
                self.channels[plan.name] = LifoChannel(self.manager, plan)
            else:
                self.channels[plan.name] = FifoChannel(self.ctx, plan)
        # One lock per name, held around each call of the stages that name it.
        self.locks = {name: self.ctx.Lock() for name in self.topo.locks}
        for stage in self.topo.stages:
            if stage.function == "jsonl":
                Path(self.topo.base_dir, str(stage.kwargs["path"])).write_text("")

    def _loop(self, sig_r: int) -> None:
        self._start_ready_stages()
        while not self._all_done():
            waitables: list[Any] = [sig_r]
            for unit in self.units:
                if unit.done:
                    continue
                if unit.conn is not None:
                    waitables.append(unit.conn)
                if unit.process is not None:
                    waitables.append(unit.process.sentinel)
            for ready in wait(waitables):
                if ready == sig_r:
                    os.read(sig_r, 64)
                    raise _Signalled(self.signal_received)
                self._handle_ready(ready)
            if self.failure:
                raise RunFailed(self.failure)
            self._advance()

    def _all_done(self) -> bool:
        return all(s.name in self.finished for s in self.topo.stages if not s.daemon)

    def _handle_ready(self, ready: Any) -> None:
        for unit in self.units:
            if unit.done:
                continue
            if unit.conn is ready:
                self._drain(unit)
            elif unit.process is not None and unit.process.sentinel == ready:
                self._drain(unit)
                unit.process.join()
                unit.done = True
                code = unit.process.exitcode
                self.log.info("process exited", stage=unit.stage, process=unit.name, pid=unit.process.pid, exitcode=code)
                if code != 0 and not self.failure:
                    self.failure = _died(unit.stage, unit.name, code)

    def _drain(self, unit: _Unit) -> None:
        if unit.conn is None:
            return
        try:
            while unit.conn.poll():
                self._message(unit, unit.conn.recv())
        except (EOFError, OSError):
            unit.conn = None

    def _message(self, unit: _Unit, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "collect":
            self.collected[message[1]].extend(message[2])
        elif kind == "stats":
            _, stage, _, items_in, items_out, busy = message
            st = self.stats[stage]
            st.items_in += items_in
            st.items_out += items_out
            st.busy_seconds += busy
        elif kind == "error":
            _, stage, process, summary, _tb, item = message
            on = f" on item {item}" if item else ""
            self.failure = self.failure or f"stage {stage!r} (process {process}) failed{on}: {summary}"
        elif kind == "done":
            unit.done = True

    def _advance(self) -> None:
        """Mark finished stages, end the queues they were the last writer of, start what may start."""
        for stage in self.topo.stages:
            if stage.name in self.started and stage.name not in self.finished:
                units = [u for u in self.units if u.stage == stage.name]
                if all(u.done for u in units):
                    self.finished.add(stage.name)
                    self.stats[stage.name].seconds = time.perf_counter() - self.started[stage.name]
        for name, plan in self.topo.queues.items():
            if name not in self.ended_queues and all(w in self.finished for w in plan.writers):
                self.ended_queues.add(name)
                # Ending a bounded queue may wait for room: do it beside the loop, never in it.
                channel = self.channels[name]
                threading.Thread(target=channel.end, args=(plan.reader_processes,), daemon=True).start()
        self._start_ready_stages()

    def _start_ready_stages(self) -> None:
        for stage in self.topo.stages:
            if stage.name not in self.started and all(a in self.finished for a in stage.after):
                self._start_stage(stage)

    def _start_stage(self, stage: StagePlan) -> None:
        self.started[stage.name] = time.perf_counter()
        self.stats[stage.name].processes = stage.processes
        lock = self.locks.get(stage.lock) if stage.lock else None
        outputs = [self.channels[q] for q in stage.outputs]
        if stage.kind == "pool":
            reader, writer = multiprocessing.Pipe(duplex=False)
            pool = _PoolStage(self, stage, self.channels[stage.inputs[0]], outputs, lock, writer)
            self.pools[stage.name] = pool
            self.units.append(_Unit(stage.name, stage.name, reader))
            pool.start()
            return
        for index, name in enumerate(stage.process_names):
            reader, writer = self.ctx.Pipe(duplex=False)
            spec = worker.ProcessSpec(
                stage=stage,
                name=name,
                index=index,
                base_dir=self.topo.base_dir,
                log_queue=self.log_queue,
                log_level=self.topo.log_level,
                ctl=writer,
                input=self.channels[stage.inputs[0]] if stage.inputs else None,
                outputs=outputs,
                lock=lock,
                limit=self.topo.limit if stage.kind == "producer" else None,
            )
            process = self.ctx.Process(target=worker.process_main, args=(spec,), name=name, daemon=stage.daemon)
            process.start()
            writer.close()
            self.units.append(_Unit(stage.name, name, reader, process))

    # -- the end ---------------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Stop whatever still runs (daemon stages at a normal end; everything after a failure)."""
        for unit in self.units:
            if unit.stage in self.pools and not unit.done:
                self.pools[unit.stage].stop()
        alive = [u for u in self.units if u.process is not None and not u.done]
        for unit in alive:
            if unit.process.is_alive():
                unit.process.terminate()
        deadline = time.monotonic() + JOIN_TIMEOUT
        for unit in alive:
            unit.process.join(max(0.0, deadline - time.monotonic()))
            if unit.process.is_alive():
                unit.process.kill()
                unit.process.join()
            self._drain(unit)
            unit.done = True
            self.log.info("process exited", stage=unit.stage, process=unit.name, pid=unit.process.pid, exitcode=unit.process.exitcode)
        now = time.perf_counter()
        for name, t in self.started.items():
            if name not in self.finished:
                self.stats[name].seconds = now - t
        if self.manager is not None:
            self.manager.shutdown()


class _PoolStage:
    """A pool stage: a ``multiprocessing.Pool`` fed, from a pump thread of the main process, by the input queue.

    The pump reads batches, cuts them into chunks and submits each with ``apply_async``; at most
    ``window`` chunks are in flight, which bounds memory and the reorder buffer of ``ordered: true``.
    Results are emitted from the pool's result thread (in input order when ordered).
    """

    def __init__(self, sup: Supervisor, plan: StagePlan, input_: Channel, outputs: list[Channel], lock: Any, conn: Any) -> None:
        self.sup, self.plan, self.input, self.lock = sup, plan, input_, lock
        self.ctl = worker.Control(conn)
        collect = sup.collected[plan.name].extend if plan.function == "collect" else None
        self.emitter = Emitter(outputs, on_batch=collect)
        self.window = 2 * plan.processes + 2
        self.slots = threading.Semaphore(self.window)
        self.pending: dict[int, worker.TaskResult] = {}
        self.next_seq = 0
        self.busy = 0.0
        self.failed = False
        self.pool: Any = None
        self.thread = threading.Thread(target=self._pump, name=f"pool-{plan.name}", daemon=True)

    def start(self) -> None:
        spec = worker.PoolSpec(self.plan, self.sup.topo.base_dir, self.sup.log_queue, self.sup.topo.log_level, self.lock)
        self.pool = self.sup.ctx.Pool(
            self.plan.processes, worker.pool_init, (spec,), self.plan.maxtasksperchild
        )
        self.thread.start()

    def _pump(self) -> None:
        n_in, seq, workers = 0, 0, self.plan.processes
        try:
            for batch in read(self.input):
                n_in += len(batch)
                size = self.plan.chunksize or max(1, math.ceil(len(batch) / workers))
                for i in range(0, len(batch), size):
                    self.slots.acquire()
                    if self.failed:
                        return
                    self.pool.apply_async(
                        worker.pool_task, (seq, batch[i : i + size]), callback=self._done, error_callback=self._error
                    )
                    seq += 1
            for _ in range(self.window):
                self.slots.acquire()
            if self.failed:
                return
            self.pool.close()
            self.pool.join()
            self.emitter.close()
            self.ctl.send(("stats", self.plan.name, self.plan.name, n_in, self.emitter.sent, self.busy))
            self.ctl.send(("done",))
        except Exception as e:  # noqa: BLE001 - reported to the supervisor, never lost
            self._fail(f"{type(e).__name__}: {e}", "")

    def _done(self, result: worker.TaskResult) -> None:
        """Runs in the pool's result thread."""
        try:
            self.busy += result.busy
            if result.error is not None:
                summary, tb, item = result.error
                self.sup.log.error("function raised", stage=self.plan.name, error=summary, item=item, exception=tb)
                self._fail(summary, item)
                return
            if self.plan.ordered:
                self.pending[result.seq] = result
                while self.next_seq in self.pending:
                    for out in self.pending.pop(self.next_seq).outputs:
                        self.emitter.emit(out)
                    self.next_seq += 1
            else:
                for out in result.outputs:
                    self.emitter.emit(out)
        except Exception as e:  # noqa: BLE001 - e.g. an unpicklable result
            self._fail(f"{type(e).__name__}: {e}", "")
        finally:
            self.slots.release()

    def _error(self, exc: BaseException) -> None:
        self._fail(f"{type(exc).__name__}: {exc}", "")
        self.slots.release()

    def _fail(self, summary: str, item: str) -> None:
        if not self.failed:
            self.failed = True
            self.ctl.send(("error", self.plan.name, self.plan.name, summary, "", item))

    def stop(self) -> None:
        """Terminate the pool's workers (a no-op once it has closed and joined)."""
        self.failed = True
        self.slots.release(self.window + 1)
        if self.pool is not None:
            self.pool.terminate()


def _died(stage: str, process: str, code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        cause = " (out of memory?)" if name == "SIGKILL" else " (a crash in native code?)" if name == "SIGSEGV" else ""
        return f"stage {stage!r}: process {process} was killed by {name}{cause}"
    return f"stage {stage!r}: process {process} exited with code {code}"


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _install_signals(sup: Supervisor, sig_w: int) -> dict[int, Any] | None:
    if threading.current_thread() is not threading.main_thread():
        return None
    sup.signal_received = 0

    def handler(signum: int, frame: Any) -> None:
        if sup.signal_received:  # a second signal: stop at once
            raise KeyboardInterrupt
        sup.signal_received = signum
        os.write(sig_w, b"!")

    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous: dict[int, Any] | None) -> None:
    for signum, old in (previous or {}).items():
        signal.signal(signum, old)


def logging_state() -> tuple[list[Any], int]:
    """The root logger's handlers and level, to restore after a run."""
    import logging

    root = logging.getLogger()
    return list(root.handlers), root.level


def restore_logging(state: tuple[list[Any], int]) -> None:
    import logging

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in state[0]:
        root.addHandler(handler)
    root.setLevel(state[1])
