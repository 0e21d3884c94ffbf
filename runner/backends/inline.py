"""``mprun run --inline``: every stage in this one process, one after another, so ``breakpoint()`` and pdb work.

    stage 1 (all its items) --deque--> stage 2 (all its items) --deque--> ... in topological order
    (writers of a queue before its readers, a stage's own writes to its input aside; ``after`` respected;
    file order otherwise)

A queue is a deque: a FIFO queue is read in the order its items were put, a LIFO queue newest first (every
other writer has finished before a reader starts, as if the reader waited ``after`` them). A stage that feeds
its own input (a work queue or stack) reads it until it is empty: what it puts there while it works is read
too, FIFO or LIFO, so its stream ends when the queue is empty and no item of it is in hand. Items are pickled
on their way through a queue, as in a normal run, so results are copies and an unpicklable item fails in
the stage that made it. The functions (class stages: one instance, closed at the end of its input, whose
``close()`` outputs are emitted), sources, built-ins, error policies (skip, retry, dead letters), batches,
concurrent calls and named routes are the worker's own (``make_function``, ``source_items``, ``run_items``,
``close_result``); collected items, stats, per-queue counts and errors come back as a ``RunResult`` with the
same exit codes and one-line errors as a normal run. What needs processes does not apply: ``restart``,
``lock``, and ``timeout`` of a stage without ``concurrency`` (a call may sit in the debugger; with
``concurrency`` the calls' own timeouts hold). Daemon stages never end, so they are skipped (a warning
record says so); their queues are read only by daemon stages, which are skipped too.
"""

from __future__ import annotations

import itertools
import multiprocessing
import pickle
import queue
import signal
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any

from runner import calls, logs
from runner.logs import logging_state, restore_logging
from runner.queues import dumps
from runner.results import RunResult, StageStats, count_result, queue_accounts
from runner.topology import StagePlan, Topology
from runner.worker import (
    PROGRESS_SLOTS,
    ChunkResult,
    SourceError,
    by_target,
    close_result,
    make_function,
    resolve,
    run_items,
    source_items,
)
from schemas import Pipeline


class _Stopped(Exception):
    """SIGTERM arrived during an inline run."""


def stage_order(topo: Topology) -> list[StagePlan]:
    """Stages in an order where every writer of a queue and every ``after`` stage comes before its readers."""
    pending = list(topo.stages)
    done: set[str] = set()
    order = []
    while pending:
        for stage in pending:
            upstream = set(stage.after) | {w.name for q in stage.inputs for w in topo.writers_of(q)} - {stage.name}
            if upstream <= done:
                break
        else:  # validation rejects cycles; keep file order rather than loop forever
            stage = pending[0]
        pending.remove(stage)
        done.add(stage.name)
        order.append(stage)
    return order


def run_inline_pipeline(
    path_or_pipeline: str | Path | Pipeline,
    overrides: list[str] | None = None,
    *,
    limit: int | None = None,
    log_level: str | None = None,
    log_format: str | None = None,
    log_file: str | None = None,
) -> RunResult:
    """Load (if given a path) and run a pipeline inline; the settings given replace the file's.

    Raises:
        PipelineInvalid: the file is invalid (exit code 2).
    """
    from runner import plan_run

    # The checks of a normal run (imports, files read and written) before any stage starts.
    return run_inline(plan_run(path_or_pipeline, overrides, limit=limit, log_level=log_level, log_format=log_format,
                               log_file=log_file))


def run_inline(topo: Topology) -> RunResult:
    """Run a compiled topology in this process; never raises for a failing stage (see ``RunResult.error``)."""
    t0 = time.perf_counter()
    # Records of this run (stage functions and the runner), rendered by the listener as in a normal run.
    log_queue: queue.Queue[Any] = queue.Queue()
    listener = logs.start_listener(log_queue, topo.log_level, topo.log_format, topo.log_file)
    root = logging_state()
    me = multiprocessing.current_process()
    own_name = me.name
    main_thread = threading.current_thread() is threading.main_thread()
    # Stage code runs here (pdb included): SIGINT is Python's KeyboardInterrupt, SIGTERM ends the run as it.
    handlers = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _on_sigterm}
    previous = {s: signal.signal(s, handler) for s, handler in handlers.items()} if main_thread else {}
    stats = {s.name: StageStats() for s in topo.stages}
    collected: dict[str, list[Any]] = {s.name: [] for s in topo.stages if s.function == "collect"}
    # Every queue of the run: the pickled items put on it, in the order they were put.
    queues: dict[str, deque[bytes]] = {name: deque() for name in topo.queues}
    exit_code, error = 0, None
    try:
        for stage in stage_order(topo):
            me.name = stage.process_names[0]
            logs.configure(log_queue, topo.log_level, stage=stage.name, process=me.name)
            log = logs.get_logger("mprun")
            if stage.daemon:
                log.warning("daemon stage skipped: --inline runs every stage to its end, and a daemon never ends")
                continue
            error = _run_stage(topo, stage, queues, stats[stage.name], collected.get(stage.name), log)
            if error:
                exit_code = 1
                break
    except KeyboardInterrupt:
        exit_code, error = 130, "stopped by SIGINT"
    except _Stopped:
        exit_code, error = 143, "stopped by SIGTERM"
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        me.name = own_name
        calls.release()
        listener.stop()
        logs.close_handlers(listener)
        restore_logging(root)
    result = RunResult(exit_code, stats, collected, error, time.perf_counter() - t0, queues=queue_accounts(topo, stats))
    result.log_format = topo.log_format
    return result


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Stopped


def _run_stage(
    topo: Topology, stage: StagePlan, queues: dict[str, deque[bytes]], st: StageStats, sink: list[Any] | None,
    log: Any,
) -> str | None:
    """Run one stage over all its input; the one-line error of a normal run if it fails."""
    st.processes, st.kind = 1, stage.kind

    def emit(item: Any, target: int | None = None) -> None:
        data = dumps([item])
        if target is None:
            for name in stage.outputs:
                queues[name].append(data)
        else:  # a named route: one queue
            name = stage.outputs[target]
            queues[name].append(data)
            st.routed[name] = st.routed.get(name, 0) + 1
        st.items_out += 1

    def emit_result(res: ChunkResult) -> str | None:
        failed = count_result(st, res, stage.name, process, log)
        if failed:
            return failed
        if res.targets is None:
            for out in res.outputs:
                emit(out)
        else:  # named routes: each output to its own queue
            for target, (outs, _) in enumerate(by_target(res.outputs, None, res.targets, len(stage.outputs))):
                for out in outs:
                    emit(out, target)
        for letter in res.dead:
            queues[str(stage.dead_letter)].append(dumps([letter]))
            st.dead_lettered += 1
        return None

    started = time.perf_counter()
    process = stage.process_names[0]
    try:
        if stage.kind == "producer":
            assert stage.source is not None
            items: Any = source_items(stage.source, stage.kwargs, topo.base_dir)
            if topo.limit is not None:
                items = itertools.islice(items, topo.limit)
            for item in items:
                emit(item)
        else:
            if stage.init:
                resolve(stage.init, topo.base_dir)()
            fn = make_function(stage, topo.base_dir, sink.append if sink is not None else None)
            name = stage.inputs[0]
            taken = queues[name]
            take = taken.pop if topo.queues[name].type == "lifo" else taken.popleft
            # Items per call of run_items: one (a debugger sees one item at a time), or enough for a batch per
            # concurrent call.
            size = (stage.batch or 1) * stage.concurrency
            progress = [0] * PROGRESS_SLOTS  # run_items reports the item in hand and its counts here
            seq, closed = 0, False
            while True:
                while taken:  # a stage fed by itself finds here what it put while it worked
                    chunk = [pickle.loads(take())[0] for _ in range(min(size, len(taken)))]
                    st.items_in += len(chunk)
                    # The stage's error policy (fail, skip, retry, dead_letter), exactly as a worker applies it.
                    error = emit_result(run_items(fn, stage, seq, chunk, None, None, progress, log))
                    seq += 1
                    if error:
                        return error
                if closed:
                    break
                closed = True  # close() once; what it puts on a stage's own input is read, then the stage ends
                error = emit_result(close_result(fn, stage, seq, log))
                if error:
                    return error
    except Exception as e:  # noqa: BLE001 - reported like a normal run's failing stage
        summary = f"{type(e).__name__}: {e}"
        tb = "" if isinstance(e, SourceError) else traceback.format_exc()  # bad data names its file and line
        log.error("stage failed", error=summary, **({"exception": tb} if tb else {}))
        return f"stage {stage.name!r} (process {process}) failed: {summary}"
    finally:
        st.seconds = time.perf_counter() - started
        st.busy_seconds = st.seconds
    return None
