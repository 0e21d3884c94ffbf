"""Code that runs IN A CHILD process: bootstrap, the producer loop, the consumer loop, pool tasks.

A child talks to the supervisor over its own control pipe (``Control``); messages are small tuples:

    ("collect", stage, [items])                          items that reached a ``collect`` sink
    ("error", stage, process, summary, traceback, item)  a function raised; the process then exits 1
    ("stats", stage, process, items_in, items_out, busy_seconds)

Pool workers have no control pipe: ``pool_task`` returns a ``TaskResult`` to the pool's pump thread.
"""

from __future__ import annotations

import csv
import importlib
import inspect
import itertools
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner import logs
from runner.queues import Channel, Emitter, read
from runner.topology import StagePlan

BUILTINS = ("print", "collect", "jsonl", "identity")


class FunctionFailed(Exception):
    """A stage function raised; carries the child-side traceback text and the item."""

    def __init__(self, summary: str, tb: str, item: str) -> None:
        super().__init__(summary)
        self.summary, self.tb, self.item = summary, tb, item


def short_repr(value: Any, width: int = 200) -> str:
    """``repr`` cut to ``width`` characters."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def resolve(ref: str, base_dir: str) -> Any:
    """Import ``module:attribute`` (the module found beside the pipeline file first)."""
    if base_dir not in sys.path:
        sys.path.insert(0, base_dir)
    module_name, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class Control:
    """The child's end of its control pipe; sends are atomic with respect to SIGTERM."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            try:
                self._conn.send(message)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _terminated(signum: int, frame: Any) -> None:
    # Unwind normally: finally blocks run and queue feeder threads flush their logs before exit.
    raise SystemExit(128 + signum)


def bootstrap(base_dir: str, log_queue: Any, log_level: str, stage: str, process: str) -> None:
    """First thing in every child: signals, import path, name, logging."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    signal.signal(signal.SIGTERM, _terminated)
    if base_dir not in sys.path:
        sys.path.insert(0, base_dir)
    multiprocessing.current_process().name = process
    logs.configure(log_queue, log_level, stage=stage, process=process)


# -- the functions a stage calls ---------------------------------------------------------------------


def make_function(stage: StagePlan, base_dir: str, collect: Callable[[Any], None] | None) -> Callable[..., Any]:
    """The callable for ``stage.function``: a built-in, or ``module:attribute`` imported here."""
    name = stage.function or "identity"
    if name == "identity":
        return lambda item: item
    if name == "print":

        def _print(item: Any) -> Any:
            sys.stdout.write(f"{item}\n")  # one write: lines of concurrent processes never interleave
            sys.stdout.flush()
            return item

        return _print
    if name == "collect":

        def _collect(item: Any) -> Any:
            if collect is not None:
                collect(item)
            return item

        return _collect
    if name == "jsonl":
        path = Path(base_dir, str(stage.kwargs["path"]))
        out = path.open("a", encoding="utf-8")

        def _jsonl(item: Any) -> Any:
            out.write(json.dumps(item, default=repr) + "\n")
            out.flush()
            return item

        return _jsonl
    fn = resolve(name, base_dir)
    kwargs = stage.kwargs
    return (lambda item: fn(item, **kwargs)) if kwargs else fn


def call(fn: Callable[[Any], Any], item: Any, lock: Any, emit: Callable[[Any], None]) -> None:
    """Call ``fn(item)`` (holding ``lock`` if any) and emit its result: none, one, or each yielded."""
    try:
        if lock is None:
            result = fn(item)
        else:
            with lock:
                result = fn(item)
                if inspect.isgenerator(result):
                    result = list(result)
                    for out in result:
                        emit(out)
                    return
        if result is None:
            return
        if inspect.isgenerator(result):
            for out in result:
                emit(out)
        else:
            emit(result)
    except Exception as e:
        summary = f"{type(e).__name__}: {e}"
        raise FunctionFailed(summary, traceback.format_exc(), short_repr(item)) from None


# -- processes of producer and consumer stages ---------------------------------------------------------


@dataclass
class ProcessSpec:
    """What one child process of a producer or consumer stage needs (pickled to it)."""

    stage: StagePlan
    name: str
    index: int  # 0-based among the stage's processes
    base_dir: str
    log_queue: Any
    log_level: str
    ctl: Any  # the write end of this process's control pipe
    input: Channel | None = None
    outputs: list[Channel] = field(default_factory=list)
    lock: Any = None
    limit: int | None = None


def process_main(spec: ProcessSpec) -> None:
    """Target of every producer and consumer process."""
    stage = spec.stage
    bootstrap(spec.base_dir, spec.log_queue, spec.log_level, stage.name, spec.name)
    import structlog

    log = structlog.get_logger("mprun")
    ctl = Control(spec.ctl)
    log.info("process started")
    started = time.perf_counter()
    counts = {"in": 0, "busy": 0.0}
    emitter = Emitter(spec.outputs)
    collector = _collector(ctl, stage) if stage.function == "collect" else None
    try:
        if stage.kind == "producer":
            _produce(spec, emitter)
        else:
            _consume(spec, emitter, collector, counts)
        emitter.close()
        if collector is not None:
            collector.close()
    except FunctionFailed as e:
        log.error("function raised", error=e.summary, item=e.item, exception=e.tb)
        ctl.send(("error", stage.name, spec.name, e.summary, e.tb, e.item))
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - anything else is reported the same way, never lost
        summary = f"{type(e).__name__}: {e}"
        log.error("stage failed", error=summary)
        ctl.send(("error", stage.name, spec.name, summary, traceback.format_exc(), ""))
        sys.exit(1)
    finally:
        busy = counts["busy"] if stage.kind != "producer" else time.perf_counter() - started
        ctl.send(("stats", stage.name, spec.name, counts["in"], emitter.sent, busy))


def _collector(ctl: Control, stage: StagePlan) -> Emitter:
    return Emitter([], on_batch=lambda batch: ctl.send(("collect", stage.name, batch)))


def source_items(source: dict[str, Any], kwargs: dict[str, Any], base_dir: str) -> Iterable[Any]:
    """The items of a producer's source."""
    if "items" in source:
        return source["items"]
    if "range" in source:
        r = source["range"]
        return range(r.get("start", 0), r["stop"], r.get("step", 1))
    if "function" in source:
        result = resolve(source["function"], base_dir)(**kwargs)
        return () if result is None else result
    spec = source["file"]
    return _read_file(Path(base_dir, spec["path"]), spec.get("format", "lines"))


def _read_file(path: Path, fmt: str) -> Iterator[Any]:
    with path.open(encoding="utf-8", newline="" if fmt == "csv" else None) as f:
        if fmt == "csv":
            yield from csv.DictReader(f)
        elif fmt == "jsonl":
            for line in f:
                if line.strip():
                    yield json.loads(line)
        else:
            for line in f:
                yield line.rstrip("\n")


def _produce(spec: ProcessSpec, emitter: Emitter) -> None:
    stage = spec.stage
    assert stage.source is not None
    items: Iterable[Any] = source_items(stage.source, stage.kwargs, spec.base_dir)
    if spec.limit is not None:
        items = itertools.islice(items, spec.limit)
    if stage.processes > 1:
        items = itertools.islice(items, spec.index, None, stage.processes)
    emit = emitter.emit
    for item in items:
        emit(item)


def _consume(spec: ProcessSpec, emitter: Emitter, collector: Emitter | None, counts: dict[str, Any]) -> None:
    stage = spec.stage
    assert spec.input is not None
    if stage.init:
        resolve(stage.init, spec.base_dir)()
    fn = make_function(stage, spec.base_dir, collector.emit if collector else None)
    lock, emit = spec.lock, emitter.emit
    clock = time.perf_counter
    for batch in read(spec.input):
        counts["in"] += len(batch)
        t0 = clock()
        for item in batch:
            call(fn, item, lock, emit)
        counts["busy"] += clock() - t0


# -- pool workers --------------------------------------------------------------------------------------


@dataclass
class PoolSpec:
    """What every worker of a pool stage needs (passed once, through the pool's initializer)."""

    stage: StagePlan
    base_dir: str
    log_queue: Any
    log_level: str
    lock: Any = None


@dataclass
class TaskResult:
    """What a pool task sends back: its sequence number, outputs, and the error that stopped it, if any."""

    seq: int
    outputs: list[Any]
    busy: float
    error: tuple[str, str, str] | None = None  # (summary, traceback, item)


_pool: dict[str, Any] = {}  # this pool worker's state, set by pool_init


def pool_init(spec: PoolSpec) -> None:
    """Initializer of every pool worker: bootstrap, then the stage's ``init``."""
    me = multiprocessing.current_process()
    number = me._identity[-1] if me._identity else os.getpid()
    names = spec.stage.process_names
    name = names[(number - 1) % len(names)] if len(names) > 1 else f"{spec.stage.name}-{number}"
    bootstrap(spec.base_dir, spec.log_queue, spec.log_level, spec.stage.name, name)
    import structlog

    structlog.get_logger("mprun").debug("process started")
    if spec.stage.init:
        resolve(spec.stage.init, spec.base_dir)()
    _pool["fn"] = make_function(spec.stage, spec.base_dir, None)
    _pool["lock"] = spec.lock


def pool_task(seq: int, items: list[Any]) -> TaskResult:
    """Run the stage function over one chunk of items, in a pool worker."""
    fn, lock = _pool["fn"], _pool["lock"]
    outputs: list[Any] = []
    t0 = time.perf_counter()
    try:
        for item in items:
            call(fn, item, lock, outputs.append)
    except FunctionFailed as e:
        return TaskResult(seq, outputs, time.perf_counter() - t0, (e.summary, e.tb, e.item))
    return TaskResult(seq, outputs, time.perf_counter() - t0)
