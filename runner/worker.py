"""Code that runs IN A CHILD process: bootstrap, the producer loop, the worker loop of consumers and pools.

    producer process: source --Emitter--> output channels          (shared queues, written directly)
                      control pipe --> the driver: ProducerFailed, ProducerDone (runner.messages)
    worker process:   its own duplex pipe <--> the stage's runner thread in the main process
                      receives Task(seq, [(item, attempts)]), calls the function with the error policy,
                      sends back a ChunkResult (outputs, dead letters, counts, the error that stops the run)

Workers never touch a shared queue, so a worker that dies or is killed cannot corrupt or block one; the
runner knows which chunk it held, and ``progress`` (shared memory: index of the item being called, and
when the call started) says which item was in its hands, for timeouts and deaths.

A stage's function is made once per worker process (``make_function``: a class stage is one instance).
Stages with ``batch``, ``concurrency``, an ``async def`` function or named routes go through ``run_units``
(concurrent calls: ``runner.calls``). When the stage's input has ended the runner sends each worker a
close request, the task ``(seq, CLOSE, None, None)``, answered by ``close_result`` (the outputs of the
instance's ``close()``), and then the usual None. A result of a stage with named routes carries
``targets``: each output goes to the one queue ``stage.outputs[target]`` (``by_target`` splits it per queue);
such results are never packed as queue messages.

Item ids: a producer numbers the items it emits (item k of process i of a stage with P processes is item
``n = i + k * P`` of the source, logged as ``item_id="<stage>:<n>"``); a task carries the ids of its
items and a ``ChunkResult`` the ids of its outputs (each output inherits the id of the item it came
from).  While a worker handles a chunk, ``_chunk`` holds the chunk's ids and ``progress``; a log record
made during a call reads ``progress[0]`` to find the id of the item in hand (``current_item_id``), so
the loop pays nothing per item for it.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import functools
import glob
import importlib
import inspect
import io
import itertools
import json
import math
import multiprocessing
import operator
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from multiprocessing import sharedctypes  # noqa: F401 - imported here so the forkserver preloads it for every worker
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner import Route, logs, queues
from runner.messages import Decision, ProducerDone, ProducerFailed
from runner.queues import Emitter, Ids, ItemId
from runner.topology import BATCH_BYTES, MAX_BATCH, StagePlan

if TYPE_CHECKING:
    from runner.queues import Channel

LATENCY_SAMPLES = 8  # items of a chunk whose call is timed (every item of a chunk of up to 8)
PLACED_BATCH = 64  # items of a glob source read before they are handed to the emitter (with their ids)
_ONE_EACH = list(range(1, 4097))  # `ends` of a chunk where every item gave exactly one output

_id_names: tuple[str, ...] = ()  # producer stage names: an id n is item n // len of stage n % len
_chunk: tuple[Ids | None, Any] = (None, None)  # ids of the chunk in hand and its progress array
# The id of the item (or first item of the batch) a concurrent call is on: set in each call's asyncio task
# and in the thread that runs it (runner.calls), so that its log records name their own item.
_call_item: contextvars.ContextVar[ItemId] = contextvars.ContextVar("mprun_call_item")
_NO_ID: Any = object()


def item_id_text(n: ItemId, names: tuple[str, ...] | None = None) -> str | None:
    """The ``item_id`` of the id ``n``: ``<producer stage>:<index in its source>`` for an integer id, the id
    itself for a str (``<producer stage>:<file>:<line>``, an item of a glob source).

    ``names``: the producer stages of the run, in order (default: this worker's, set by ``bootstrap``).
    """
    if isinstance(n, str):
        return n
    names = _id_names if names is None else names
    if n is None or not names:
        return None
    return f"{names[n % len(names)]}:{n // len(names)}"


def current_item_id() -> str | None:
    """The ``item_id`` of the item this worker is calling the stage function on, if any (read at log time)."""
    n = _call_item.get(_NO_ID)
    if n is not _NO_ID:
        return item_id_text(n)
    ids, progress = _chunk
    if ids is None:
        return None
    index = int(progress[0])
    if index >= len(ids) or (n := ids[index]) is None or isinstance(n, str) or not _id_names:
        return n if isinstance(n, str) else None
    return f"{_id_names[n % len(_id_names)]}:{n // len(_id_names)}"  # item_id_text, inlined: called per record


def output_ids(ids: Ids | None, ends: list[int], outputs: int) -> Ids | None:
    """The ids of a chunk's outputs: each output inherits the id of its item (``ends``: outputs after each item)."""
    if ids is None or not outputs:
        return None if ids is None else []
    n = len(ends)
    if outputs == n and n <= len(_ONE_EACH) and ends == _ONE_EACH[:n]:
        return ids[:n]  # one output per item: the same ids (a range stays a range)
    counts = list(map(operator.sub, ends, [0, *ends]))  # operator.sub: twice as fast as int.__sub__ here
    if max(counts) == 1:  # one output or none per item (some failed, or were filtered out)
        return list(itertools.compress(ids, counts))
    return list(itertools.chain.from_iterable(map(itertools.repeat, ids, counts)))


class FunctionFailed(Exception):
    """A stage function raised; carries the child-side traceback text, the item, and where it was raised.

    The traceback is formatted only when it is read (``tb``): formatting one costs ~150 us, far more than
    the call, and a stage that skips many items logs the traceback of each place once.  The item's text
    too (``item``): a warning holds a number as itself (``shown``), which is what its text would become.
    """

    def __init__(self, summary: str, tb: str | BaseException, item: str | None,
                 where: tuple[str, str, int] | None = None, value: Any = None) -> None:
        super().__init__(summary)
        self.summary, self._tb, self._item, self.where, self.value = summary, tb, item, where, value

    @property
    def item(self) -> str:
        """The item as text (``short_repr``)."""
        if self._item is None:
            self._item = short_repr(self.value)
        return self._item

    @property
    def shown(self) -> Any:
        """The item as a log record holds it once made plain data (``logs._plain`` of ``item``)."""
        if self._item is None and type(self.value) in logs.NUMBERS and len(repr(self.value)) <= SHORT:
            return self.value
        return self.item

    @property
    def tb(self) -> str:
        """The traceback text of the failure, as the worker saw it."""
        if isinstance(self._tb, BaseException):
            self._tb = "".join(traceback.format_exception(self._tb))
        return self._tb

    @classmethod
    def of(cls, e: BaseException, item: Any) -> FunctionFailed:
        """The failure of ``fn(item)`` that raised ``e`` (being handled): ``where`` is the exception's type
        and the file and line of the innermost frame."""
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = (type(e).__qualname__, tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb is not None else None
        return cls(f"{type(e).__name__}: {e}", e, None, where, item)

    def traceback_fields(self, log: Any) -> dict[str, str]:
        """The traceback for a warning about this failure: the first from each place in this process;
        after that a note, so that a run that skips or retries many items logs each traceback once."""
        return {"exception": self.tb} if log.first(self.where) else {"traceback": AS_EARLIER}


SHORT = 200  # characters of an item's repr in messages
AS_EARLIER = "as earlier in this process"  # a warning's traceback after the first of its place


def short_repr(value: Any, width: int = SHORT) -> str:
    """``repr`` cut to ``width`` characters; a log record shows plain data as its JSON value (``logs.Shown``)."""
    text = repr(value)
    return logs.shown(value, text, width) if len(text) <= width else text[: width - 3] + "..."


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

    def send(self, message: ProducerDone | ProducerFailed) -> None:
        with self._lock:
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            try:
                self._conn.send(message)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)


STOP_SIGNAL = queues.STOP_SIGNAL  # how the main process asks a child to stop (SIGINT and SIGTERM are its own)
PROGRESS_SLOTS = 7  # a worker's progress array: see WorkerSpec.progress
# A sink with `concurrency` (no output queue) settles the items of a chunk out of order: its progress array
# goes on with a mark per item of the chunk (the first MARKED), ``seq * 4 + DELIVERED`` or ``+ SKIPPED`` once
# the item's unit is settled so, so that if the worker dies, the runner neither calls again what the sink
# has done nor loses count of it (``mark_settled``; read by the local runner).
MARKED = 4096
DELIVERED, SKIPPED = 1, 2


def progress_slots(stage: StagePlan) -> int:
    """The length of a worker's progress array for ``stage``."""
    return PROGRESS_SLOTS + (MARKED if stage.concurrency > 1 and not stage.outputs else 0)


def mark_settled(progress: Any, seq: int, start: int, n: int, s: Settled) -> None:
    """Mark items ``start .. start + n`` of chunk ``seq`` settled as ``s`` says, in a sink's progress array (no
    mark: not settled, or given up to a dead letter, which dies with the worker and is settled again)."""
    if len(progress) == PROGRESS_SLOTS or s.error is not None or s.dead:
        return
    mark = seq * 4 + (SKIPPED if s.skipped else DELIVERED)
    for i in range(PROGRESS_SLOTS + start, PROGRESS_SLOTS + min(start + n, MARKED)):
        progress[i] = mark
_PR_SET_PDEATHSIG = 1


def leave_signals_to_parent(parent_pid: int) -> None:
    """First thing in every child of a run (workers, producers, the LIFO manager): ignore SIGINT and SIGTERM,
    which a terminal's Ctrl-C, ``timeout``, a CI runner or ``docker stop`` send to the whole process group
    and which must stop the run once, through the main process; then unblock them (the main process starts
    children with them blocked, so that such a signal cannot end one before this), and die with the parent."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    die_with_parent(parent_pid)


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent ends (``PR_SET_PDEATHSIG``): it needs no thread
    of this process, so it works while the process holds the GIL in native code. The parent is the main
    process (fork, spawn) or the forkserver, which itself ends with the main process. A pidfd watch of the
    main process backs it up where the parent is neither."""
    with contextlib.suppress(OSError, AttributeError):
        _libc_prctl()(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent ended before the line above
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()


_prctl: Any = None


def _libc_prctl() -> Any:
    """libc's ``prctl``, looked up once (``prepare_fork`` does it in the parent: a child forked from a process
    whose other threads may hold the dynamic loader's lock must not ``dlopen``)."""
    global _prctl
    if _prctl is None:
        import ctypes

        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    return _prctl


def prepare_fork() -> None:
    """Before a ``fork`` start: look ``prctl`` up here, in the parent, so that a forked child never needs the
    dynamic loader, whose lock another thread of this process may hold at the moment of the fork."""
    with contextlib.suppress(OSError, AttributeError):
        _libc_prctl()


def _watch_parent(parent_pid: int) -> None:
    """End this process at once when the main process is gone (even when it was killed with SIGKILL)."""
    try:
        fd = os.pidfd_open(parent_pid)
    except (OSError, AttributeError):
        return
    select.select([fd], [], [])
    os.kill(os.getpid(), signal.SIGKILL)  # nobody is left to read what an orderly exit would flush


def bootstrap(
    base_dir: str,
    log_queue: Any,
    log_level: str,
    stage: str,
    process: str,
    parent_pid: int,
    id_names: tuple[str, ...] = (),
) -> None:
    """First thing in every child: signals, parent watch, import path, name, logging, item ids."""
    global _id_names
    _id_names = id_names
    signal.signal(STOP_SIGNAL, queues.stop_now)  # unwind: finally blocks run, queue threads flush the logs
    leave_signals_to_parent(parent_pid)
    if base_dir not in sys.path:
        sys.path.insert(0, base_dir)
    multiprocessing.current_process().name = process
    logs.configure(log_queue, log_level, stage=stage, process=process)
    logs.item_id_source = current_item_id


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
    if name in FILE_SINKS:
        return _file_sink(name, str(stage.kwargs["path"]), base_dir, stage.kwargs.get("columns"))
    fn: Any = resolve(name, base_dir)
    kwargs = stage.kwargs
    if inspect.isclass(fn):  # a class stage: one instance per worker process, made before its first item
        instance: Any = fn(**kwargs)
        return instance
    return functools.partial(fn, **kwargs) if kwargs else fn


_ASYNC_FLAGS = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def is_async(fn: Callable[..., Any]) -> bool:
    """``fn`` (a function, or an instance whose ``__call__`` is) is ``async def``: its calls run on an event loop."""
    plain = fn.func if type(fn) is functools.partial else fn
    if type(plain) is types.FunctionType:  # the common case, asked per chunk: ~0.2 us instead of ~10
        return bool(plain.__code__.co_flags & _ASYNC_FLAGS)
    return any(inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f) for f in (fn, type(fn).__call__))


class RouteError(ValueError):
    """An output of a stage with named routes names no route of the stage, or has none and there is no ``default``."""


def route_index(stage: StagePlan) -> dict[str, int] | None:
    """Route name -> index in ``stage.outputs`` of its queue; None for a stage without named routes."""
    return {name: stage.outputs.index(queue) for name, queue in stage.routes.items()} if stage.routes else None


def route_outputs(
    stage: StagePlan, outs: list[Any], index: dict[str, int] | None = None
) -> tuple[list[Any], list[int]]:
    """The outputs of a stage with named routes, unwrapped from ``runner.route``, and the index in
    ``stage.outputs`` of the queue each goes to (``index``: ``route_index(stage)``, if at hand); an output
    without a route goes to the route ``default``.

    Raises:
        RouteError: an output names no route of the stage, or has none and there is no ``default``.
    """
    index = (route_index(stage) or {}) if index is None else index
    values, targets = [], []
    for output in outs:
        name, out = (output.name, output.item) if type(output) is Route else ("default", output)
        target = index.get(name)
        if target is None:
            known = ", ".join(stage.routes)
            if name == "default":
                msg = (f"output {short_repr(out, 80)} has no route and stage {stage.name!r} has no route 'default' "
                       f"(its routes: {known}): return runner.route(NAME, item)")
            else:
                msg = f"no route {name!r} in stage {stage.name!r} (its routes: {known})"
            raise RouteError(msg)
        values.append(out)
        targets.append(target)
    return values, targets


def by_target(
    outputs: list[Any], ids: Ids | None, targets: list[int], queues: int
) -> list[tuple[list[Any], Ids | None]]:
    """A routed result's outputs and their ids, per queue (index in ``stage.outputs``), each in its order."""
    split: list[tuple[list[Any], list[Any] | None]] = [([], None if ids is None else []) for _ in range(queues)]
    for i, (out, target) in enumerate(zip(outputs, targets, strict=True)):
        outs, out_ids = split[target]
        outs.append(out)
        if out_ids is not None:
            out_ids.append(ids[i])  # type: ignore[index]
    return split  # type: ignore[return-value]


def call_outputs(result: Any, batch: bool) -> list[Any]:
    """The outputs of one call that returned ``result``: none for None, each item of a generator (of any
    iterable for a ``batch`` call), else the one item.

    Raises:
        TypeError: a batch call returned something that is not an iterable of outputs.
    """
    if result is None:
        return []
    if batch:
        if isinstance(result, str | bytes | bytearray | Mapping) or not isinstance(result, Iterable):
            msg = (f"a stage with batch must return an iterable of outputs (a list, a generator) or None, "
                   f"not {type(result).__name__}")
            raise TypeError(msg)
        return list(result)
    return list(result) if isinstance(result, types.GeneratorType) else [result]


def attempt(fn: Callable[[Any], Any], stage: StagePlan, arg: Any, lock: Any,
            routes: dict[str, int] | None) -> tuple[list[Any], list[int] | None]:
    """One call ``fn(arg)`` (``arg``: an item, or the list of a batch), holding ``lock`` if any: its outputs,
    and their targets for a stage with named routes (``routes``: its ``route_index``; else None).

    Raises:
        FunctionFailed: the call raised, or returned what the stage cannot emit.
    """
    try:
        if lock is None:
            outs = call_outputs(fn(arg), bool(stage.batch))
        else:
            with lock:
                outs = call_outputs(fn(arg), bool(stage.batch))
        return (outs, None) if routes is None else route_outputs(stage, outs, routes)
    except Exception as e:  # noqa: BLE001 - whatever the user's function raises fails this item (or batch)
        raise FunctionFailed.of(e, arg) from None


def close_result(fn: Any, stage: StagePlan, seq: int, log: Any) -> ChunkResult:
    """The answer to a close request (``CLOSE``: the stage's input has ended): what ``fn.close()`` returns, as
    outputs (``done=0``; no ids). A function, or an instance without ``close()``, answers with no output.

    ``close()`` may return None, an iterable of items (a list, a generator...), or one item (anything else,
    and a str, bytes or a dict); it may be ``async def``.  Its outputs are checked to pickle here.  Its
    failure is an error of the stage, under ``on_error``: ``fail`` (or ``retry`` with no dead-letter queue)
    sets ``result.error`` (``"close() failed: ..."``: the run stops); otherwise it is logged and its outputs
    are dropped.
    """
    result = ChunkResult(seq, [], [], targets=[] if stage.routes else None)
    close = getattr(fn, "close", None)
    if inspect.isfunction(fn) or isinstance(fn, functools.partial) or not callable(close):
        return result
    t0 = time.perf_counter()
    try:
        out = close()
        if inspect.isawaitable(out) or inspect.isasyncgen(out):
            from runner import calls

            out = calls.run(calls.settle_awaitable(out))
        if out is None:
            outs = []
        elif isinstance(out, str | bytes | bytearray | Mapping) or not isinstance(out, Iterable):
            outs = [out]
        else:
            outs = list(out)
        queues.dumps(outs)  # what cannot cross to the output queues fails close(), not the runner
        if stage.routes:
            result.outputs, result.targets = route_outputs(stage, outs)
        else:
            result.outputs = outs
    except Exception as e:  # noqa: BLE001 - an error of the stage, under its policy
        failure = FunctionFailed.of(e, None)
        summary = f"close() failed: {failure.summary}"
        result.outputs, result.failed = [], 1
        result.targets = [] if stage.routes else None
        if verdict(stage, 1, retryable=False) is Decision.FAIL:
            result.error = (summary, failure.tb, "")
        else:
            log.error("close() failed: its outputs are lost", error=failure.summary, exception=failure.tb)
    result.busy = time.perf_counter() - t0
    return result


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
    except Exception as e:  # noqa: BLE001 - whatever the user's function raises fails this item
        raise FunctionFailed.of(e, item) from None


# -- producer processes --------------------------------------------------------------------------------


@dataclass
class ProcessSpec:
    """What one producer process needs (pickled to it)."""

    stage: StagePlan
    name: str
    index: int  # 0-based among the stage's processes
    base_dir: str
    log_queue: Any
    log_level: str
    parent_pid: int
    ctl: Any  # the write end of this process's control pipe
    outputs: list[Channel] = field(default_factory=list)
    limit: int | None = None
    id_names: tuple[str, ...] = ()  # producer stages of the run, in order (how ids are numbered and named)
    counter: Any = None  # RawArray('q', 1): items sent so far, updated per batch (live progress)


def producer_main(spec: ProcessSpec) -> None:
    """Target of every producer process."""
    stage = spec.stage
    bootstrap(spec.base_dir, spec.log_queue, spec.log_level, stage.name, spec.name, spec.parent_pid, spec.id_names)
    log = logs.get_logger("mprun")
    ctl = Control(spec.ctl)
    log.info("process started")
    started = time.perf_counter()
    numbering = None
    placed = glob_source(stage) is not None  # each item's id is its place: `stage:file:line`
    if stage.name in spec.id_names and not placed:  # id of item k here: (index + k * processes) * K + position
        k, position = len(spec.id_names), spec.id_names.index(stage.name)
        numbering = (position + spec.index * k, stage.processes * k)
    emitter = Emitter(spec.outputs, numbering=numbering, ids=placed, counter=spec.counter)
    try:
        _produce(spec, emitter)
        emitter.close()
    except queues.Stopped:
        for channel in spec.outputs:  # what is still on its way stays behind: never wait to flush it
            if isinstance(channel, queues.FifoChannel):
                channel.close()
        raise
    except Exception as e:  # noqa: BLE001 - reported to the supervisor, never lost
        summary = f"{type(e).__name__}: {e}"
        # bad data names its file and line; a lost LIFO manager is named by the supervisor
        tb = "" if isinstance(e, SourceError | queues.ManagerGone) else traceback.format_exc()
        log.error("source failed", error=summary, **({"exception": tb} if tb else {}))
        ctl.send(ProducerFailed(stage.name, spec.name, summary, tb))
        sys.exit(1)
    finally:
        ctl.send(ProducerDone(stage.name, spec.name, emitter.sent, time.perf_counter() - started))


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
    path, fmt = spec["path"], spec.get("format", "lines")
    if path == "-":
        return _read_file(STDIN, fmt, "<stdin>")
    if glob.has_magic(path):
        return (item for _, item in glob_items(base_dir, path, fmt))
    return _read_file(Path(base_dir, path), fmt, path)


def glob_source(stage: StagePlan) -> tuple[str, str] | None:
    """``(pattern, format)`` of a stage whose source is a glob of files, else None."""
    spec = (stage.source or {}).get("file")
    if spec is None or not glob.has_magic(spec["path"]):
        return None
    return spec["path"], spec.get("format", "lines")


class SourceError(ValueError):
    """A file source holds data its format does not allow; the message starts with ``FILE:LINE:``."""


STDIN = "-"  # the path of a file source that reads standard input


def _open_source(path: Path | str, fmt: str) -> Any:
    """A text stream of a file source's file, or of standard input for ``STDIN``.

    In a child of the run, multiprocessing has put ``/dev/null`` in place of standard input (and so has the
    forkserver), so a producer process opens the main process's descriptor 0 through ``/proc`` (Linux): a
    pipe or terminal is then read from where it stands, a redirected file from its start.
    """
    newline = "" if fmt == "csv" else None
    if path != STDIN:
        return Path(path).open(encoding="utf-8", newline=newline)
    parent = multiprocessing.parent_process()
    if parent is None:  # the main process (--inline): its own standard input
        return open(0, encoding="utf-8", newline=newline, closefd=False)  # closed by the caller
    try:
        return open(f"/proc/{parent.pid}/fd/0", encoding="utf-8", newline=newline)
    except OSError as e:
        msg = f"<stdin>: cannot read the standard input of mprun from a producer process: {e.strerror or e}"
        raise SourceError(msg) from None


def glob_items(base_dir: str, pattern: str, fmt: str) -> Iterator[tuple[str, Any]]:
    """``(where, item)`` of every item of every file matching ``pattern`` (relative to ``base_dir``), file by
    file in sorted order; ``where`` is ``<file>:<line>``.

    A record ``reading file`` (``file``, ``first_item``: the index of its first item in the source) says
    where each file starts, and bad data is named by its file and line.
    """
    files = sorted(f for f in glob.glob(pattern, root_dir=base_dir, recursive=True) if Path(base_dir, f).is_file())
    if not files:
        msg = f"{pattern}: no file matches (a relative pattern starts at the pipeline file's folder)"
        raise SourceError(msg)
    log = logs.get_logger("mprun")
    n = 0
    for name in files:
        log.info("reading file", file=name, first_item=n)
        at = [0]
        for item in _read_file(Path(base_dir, name), fmt, name, at):
            n += 1
            yield f"{name}:{at[0]}", item


def _read_file(path: Path | str, fmt: str, shown: str | None = None, at: list[int] | None = None) -> Iterator[Any]:
    """The items of a file source (``STDIN``: standard input); bad data stops it with a ``SourceError`` naming
    ``shown`` (the path as written in the pipeline) and the line: invalid JSON, a CSV row with more or fewer
    fields than the header. ``at[0]``: the line where the item just yielded starts."""
    name, line = shown or str(path), 0
    at = [0] if at is None else at
    with _open_source(path, fmt) as f:
        try:
            if fmt == "csv":
                rows = csv.reader(f)
                header = next(rows, None)
                line = rows.line_num
                for row in rows:
                    at[0], line = line + 1, rows.line_num  # a quoted field may span lines: where the row starts
                    if not row:
                        continue
                    if header is not None and len(row) != len(header):
                        msg = f"{name}:{line}: the row has {len(row)} fields, the header (line 1) has {len(header)}"
                        raise SourceError(msg)
                    yield dict(zip(header or (), row, strict=True))
            elif fmt == "jsonl":
                for line, text in enumerate(f, 1):
                    if text.strip():
                        try:
                            value = json.loads(text)
                        except json.JSONDecodeError as e:
                            column = min(e.pos, len(text.rstrip("\r\n"))) + 1
                            msg = f"{name}:{line}: invalid JSON: {e.msg} (column {column})"
                            raise SourceError(msg) from None
                        at[0] = line
                        yield value
            else:
                for line, text in enumerate(f, 1):
                    at[0] = line
                    yield text.rstrip("\n")
        except UnicodeDecodeError as e:
            msg = f"{name}:{line + 1}: the file is not UTF-8 ({e.reason})"
            raise SourceError(msg) from None
        except csv.Error as e:
            msg = f"{name}:{line + 1}: {e}"
            raise SourceError(msg) from None


# -- built-in file sinks (called by make_function) ---------------------------------------------------


FILE_SINKS = ("jsonl", "csv", "lines")  # the built-ins writing kwargs.path (schemas.stages.FILE_SINKS)


def _file_sink(kind: str, path: str, base_dir: str, columns: list[str] | None) -> Callable[[Any], Any]:
    """The built-in sink ``kind`` writing to ``path`` (``-``: standard output), one line per item.

    Each line is one ``write`` of an append-mode file (emptied by ``paths.prepare_outputs`` when the run
    starts), flushed at once: lines of the stage's processes and threads never interleave, and a killed run
    loses at most the line being written.  ``csv`` takes its columns from ``columns``, else from the file's
    header if another process of the stage wrote it, else from the first item's keys: the process that
    finds the file empty writes the header, holding an exclusive ``flock`` so that two never both do.  An
    item that is not a dict, or has keys that are not columns, fails as that item's error.
    """
    lock = threading.Lock()  # the calls of one process may run in several threads (concurrency)
    if path == "-":
        out: Any = sys.stdout
    else:
        target = Path(base_dir, path)
        target.parent.mkdir(parents=True, exist_ok=True)  # a missing folder is created (SPEC 1b)
        out = target.open("a+" if kind == "csv" else "a", encoding="utf-8", newline="")  # csv reads its header
    if kind == "lines":

        def _lines(item: Any) -> Any:
            line = f"{item}\n"
            with lock:
                out.write(line)
                out.flush()
            return item

        return _lines
    if kind == "jsonl":

        def _jsonl(item: Any) -> Any:
            line = json.dumps(item, default=repr) + "\n"
            with lock:
                out.write(line)
                out.flush()
            return item

        return _jsonl
    header: list[str] | None = list(columns) if columns else None
    started = False

    def row(values: list[Any]) -> str:
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerow(values)
        return text.getvalue()

    def _csv(item: Any) -> Any:
        nonlocal header, started
        if not isinstance(item, dict):
            msg = f"the csv sink writes dicts (one column per key), got {type(item).__name__}: {short_repr(item)}"
            raise TypeError(msg)
        with lock:
            if not started:
                with _exclusive(out):
                    found = _csv_header(out)
                    header = header or found or [str(k) for k in item]
                    if not found:
                        out.write(row(header))
                        out.flush()
                    started = True
        assert header is not None
        extra = [k for k in item if str(k) not in header]
        if extra:
            msg = (f"the item has keys that are not columns of the csv sink: {', '.join(map(str, extra))} "
                   f"(columns: {', '.join(header)})")
            raise ValueError(msg)
        values = {str(k): v for k, v in item.items()}
        line = row([values.get(c, "") for c in header])
        with lock:
            out.write(line)
            out.flush()
        return item

    return _csv


@contextlib.contextmanager
def _exclusive(out: Any) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``out`` (nothing for standard output)."""
    if out is sys.stdout:
        yield
        return
    import fcntl

    fcntl.flock(out.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(out.fileno(), fcntl.LOCK_UN)


def _csv_header(out: Any) -> list[str] | None:
    """The columns of the header an append-mode csv file already starts with, or None when it is empty."""
    if out is sys.stdout:
        return None
    fd, data = out.fileno(), b""
    while b"\n" not in data:  # read without moving the file's offset (appends go to the end anyway)
        chunk = os.pread(fd, 1 << 16, len(data))
        if not chunk:
            break
        data += chunk
    first = data.split(b"\n", 1)[0].decode("utf-8", errors="replace")
    return next(csv.reader([first]), None) or None


def _produce(spec: ProcessSpec, emitter: Emitter) -> None:
    stage = spec.stage
    assert stage.source is not None
    globbed = glob_source(stage)
    items: Any = (source_items(stage.source, stage.kwargs, spec.base_dir) if globbed is None
                  else glob_items(spec.base_dir, *globbed))
    in_memory = isinstance(items, range | list | tuple)
    if spec.limit is not None:
        items = items[: spec.limit] if in_memory else itertools.islice(items, spec.limit)
    if stage.processes > 1:
        step = stage.processes
        items = items[spec.index :: step] if in_memory else itertools.islice(items, spec.index, None, step)
    if in_memory:  # nothing to wait for between items: hand them over in slices, not one call each
        for start in range(0, len(items), MAX_BATCH):
            emitter.emit_many(items[start : start + MAX_BATCH])
        return
    if globbed is not None:
        _emit_placed(emitter, stage.name, items)
        return
    emit = emitter.emit
    for item in items:
        emit(item)


def _emit_placed(emitter: Emitter, stage: str, entries: Iterable[tuple[str, Any]]) -> None:
    """Emit ``(where, item)`` pairs, each item with the id ``<stage>:<where>``, PLACED_BATCH at a time."""
    items: list[Any] = []
    ids: list[ItemId] = []
    for where, item in entries:
        items.append(item)
        ids.append(f"{stage}:{where}")
        if len(items) == PLACED_BATCH:
            emitter.emit_many(items, ids)
            items, ids = [], []
    if items:
        emitter.emit_many(items, ids)


# -- worker processes of consumer and pool stages ----------------------------------------------------------


@dataclass
class WorkerSpec:
    """What one worker process of a consumer or pool stage needs (pickled to it)."""

    stage: StagePlan
    name: str
    base_dir: str
    log_queue: Any
    log_level: str
    parent_pid: int
    conn: Any  # the read end of this worker's task pipe (chunks from the stage's runner; see runner.wire)
    results: Any  # the write end of its result pipe (ChunkResults to the runner)
    # RawArray('q', PROGRESS_SLOTS), written here, read by the runner: index of the item in hand in its chunk,
    # its call's start (monotonic_ns; 0: none), the chunk's seq, and items skipped, failed attempts and retries
    # of the chunk since its last (partial) result. With concurrency (run_units): [0] is the first item not yet
    # settled, [3:6] count the settled items before it, [1] is a heartbeat of the worker's event loop, and [6]
    # is one past the last item whose call has started: items [0] .. [6] may be in its hands (else [6] is 0).
    progress: Any
    lock: Any = None
    id_names: tuple[str, ...] = ()  # producer stages of the run, in order (how ids are named)
    pack: int = 0  # outputs of a chunk up to this many are sent pickled for the output queues (0: never)


@dataclass
class ChunkResult:
    """What a worker sends back for one chunk."""

    seq: int
    outputs: list[Any]
    dead: list[dict[str, Any]]  # dead letters: {"item", "error", "stage", "attempts"}
    done: int = 0  # items finished (delivered, skipped or dead-lettered)
    skipped: int = 0
    retried: int = 0
    failed: int = 0  # failed attempts
    busy: float = 0.0
    error: tuple[str, str, str] | None = None  # (summary, traceback, item): stops the run
    retire: bool = False  # the worker exits after this chunk (maxtasksperchild)
    ends: list[int] = field(default_factory=list)  # len(outputs) after each item (to find a bad output's item)
    ids: Ids | None = None  # ids of the outputs (each inherits its item's id); None: the items had none
    dead_ids: list[ItemId] = field(default_factory=list)  # ids of the items in `dead`
    latency: list[float] = field(default_factory=list)  # seconds of the sampled items (see run_items)
    # Instead of outputs and ids: FIFO queue messages of them, (n, bytes); on the wire only each n, and the
    # messages follow as frames of their own (see _result_frames).
    packed: list[tuple[int, bytes]] | None = None
    partial: bool = False  # more results of the chunk follow (this one ends at an item given up on)
    # A stage with routes: for each output, the index in stage.outputs of the queue it goes to (None: a list
    # `output`, every output to every queue).
    targets: list[int] | None = None


# The runner's request to close a worker's stage function, sent once the stage's input has ended and every
# chunk of the worker is answered: the task ``(seq, CLOSE, None, None)``. The worker answers it with
# ``close_result`` (an ordinary ChunkResult with done=0), then waits for the usual None to exit.
CLOSE = "close"


def worker_main(spec: WorkerSpec) -> None:
    """Target of every consumer and pool worker: chunks in, results out, until told to stop."""
    stage = spec.stage
    bootstrap(spec.base_dir, spec.log_queue, spec.log_level, stage.name, spec.name, spec.parent_pid, spec.id_names)
    global _chunk
    log = logs.get_logger("mprun")
    log.info("process started")
    conn = spec.conn
    send = spec.results.send_bytes
    # The same shared memory through a memoryview: a write per item costs half of a ctypes array's.
    progress = memoryview(spec.progress).cast("B").cast("q")
    try:
        if stage.init:
            resolve(stage.init, spec.base_dir)()
        fn = make_function(stage, spec.base_dir, None)
    except Exception as e:  # noqa: BLE001 - the stage cannot start: say why, once
        summary = f"{type(e).__name__}: {e}"
        log.error("worker could not start", error=summary, exception=traceback.format_exc())
        send(pickle.dumps(ChunkResult(-1, [], [], error=(summary, traceback.format_exc(), ""))))
        return
    tasks = 0
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the runner is gone
            return
        if task is None:
            return
        seq, items, tries, ids = task
        if type(items) is str:  # CLOSE: the input has ended
            progress[2] = seq  # a death in close() is seen as a death with this task in hand
            progress[0] = 0
            progress[1] = time.monotonic_ns() if stage.timeout is not None else 0  # close() has `timeout` too
            closed = close_result(fn, stage, seq, log)
            progress[1] = 0
            _Answer(send, stage, spec.pack, [], None, log)(closed)
            continue
        tasks += 1
        if items is None:  # a whole batch of the input queue, as it travelled: the next frame
            items, ids = pickle.loads(conn.recv_bytes())
        progress[2] = seq  # the runner can tell a chunk it started from one still in its pipe
        _chunk = (ids, progress)
        answer = _Answer(send, stage, spec.pack, items, ids, log)
        result = run_items(fn, stage, seq, items, tries, spec.lock, progress, log, ids, answer)
        _chunk = (None, None)
        result.retire = bool(stage.maxtasksperchild and tasks >= stage.maxtasksperchild)
        answer(result)
        if result.retire:
            return


class _Answer:
    """Sends the results of one chunk to the runner, partial ones first; each covers the next ``done`` items."""

    def __init__(self, send: Callable[[bytes], None], stage: StagePlan, pack: int, items: list[Any], ids: Ids | None,
                 log: Any) -> None:
        self.send, self.stage, self.pack, self.items, self.ids, self.log = send, stage, pack, items, ids, log
        self.first = 0  # items answered so far

    def __call__(self, result: ChunkResult) -> None:
        a, b = self.first, self.first + result.done
        piece_ids = None if self.ids is None else self.ids[a:b]
        for frame in _result_frames(self.stage, self.pack, result, self.items[a:b], piece_ids, self.log):
            self.send(frame)
        self.first = b


def _result_frames(stage: StagePlan, pack: int, result: ChunkResult, items: list[Any], ids: Ids | None,
                   log: Any) -> list[bytes]:
    """A (partial) result of ``items`` for the runner: the pickled ``ChunkResult``, then, when its outputs (at
    most ``pack`` of them) are packed as output queue messages of about ``BATCH_BYTES``, each message as a
    frame of its own (``result.packed`` says how many items each holds), so no large message is copied
    into a pickle here or out of one in the runner."""
    ends, result.ends = result.ends, []
    result.ids = output_ids(ids, ends, len(result.outputs)) if stage.outputs else None
    pieces: list[tuple[int, bytes]] = []
    if 0 < len(result.outputs) <= pack and result.error is None and result.targets is None:
        with contextlib.suppress(Exception):  # an unpicklable output: handled below, under the policy
            pieces = pack_pieces(result.outputs, result.ids)
            result.packed = [n for n, _ in pieces]  # type: ignore[misc]
            result.outputs, result.ids = [], None
    try:
        return [pickle.dumps(result, pickle.HIGHEST_PROTOCOL), *(data for _, data in pieces)]
    except Exception:  # noqa: BLE001 - an unpicklable result fails its item, under the policy
        result.ends = ends
        return [pickle.dumps(_without_unpicklable(stage, result, items, log, ids), pickle.HIGHEST_PROTOCOL)]


def pack_pieces(outputs: list[Any], ids: Ids | None) -> list[tuple[int, bytes]]:
    """``outputs`` and their ids as FIFO queue messages (``queues.pack``) of about ``BATCH_BYTES`` each."""
    data = queues.pack(outputs, ids)
    n = len(outputs)
    if len(data) <= BATCH_BYTES or n == 1:
        return [(n, data)]
    step = max(1, n * BATCH_BYTES // len(data))
    return [(len(outputs[i : i + step]), queues.pack(outputs[i : i + step], None if ids is None else ids[i : i + step]))
            for i in range(0, n, step)]


def _without_unpicklable(
    stage: StagePlan, result: ChunkResult, chunk: list[Any], log: Any, ids: Ids | None = None
) -> ChunkResult:
    """The result with each unpicklable output failed under the policy (retrying it would not help)."""
    kept: list[Any] = []
    kept_ids: list[ItemId] = []
    kept_targets: list[int] = []
    starts = [0, *result.ends]
    sources = [item for item, end, start in zip(chunk, result.ends, starts, strict=False) for _ in range(end - start)]
    out_ids = list(result.ids) if result.ids is not None else [None] * len(result.outputs)
    targets: list[int] = result.targets if result.targets is not None else [0] * len(result.outputs)
    for out, item, item_id, target in zip(result.outputs, sources, out_ids, targets, strict=True):
        try:
            pickle.dumps(out, pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # noqa: BLE001
            summary = f"result {short_repr(out, 80)} cannot be pickled: {type(e).__name__}: {e}"
            result.failed += 1
            log.error("unpicklable result", error=summary, item=short_repr(item))
            decided = verdict(stage, 1, retryable=False)
            if decided == "fail":
                result.error = (summary, "", short_repr(item))
                result.outputs = []
                result.targets = None if result.targets is None else []
                return result
            if decided == "dead_letter":
                result.dead.append(give_up_letter(stage, item, summary, 1))
                result.dead_ids.append(item_id)
            else:
                result.skipped += 1
            continue
        kept.append(out)
        kept_ids.append(item_id)
        kept_targets.append(target)
    result.outputs, result.ends = kept, []
    result.ids = kept_ids if ids is not None else None
    result.targets = kept_targets if result.targets is not None else None
    return result


def verdict(stage: StagePlan, attempts: int, *, retryable: bool = True) -> Decision:
    """What the stage's error policy does with an item that has failed ``attempts`` times:
    ``"retry"``, ``"fail"`` (the run stops), ``"dead_letter"`` or ``"skip"``.

    Retries run out after ``retries``; an item given up on goes to the dead-letter queue when there is
    one, else it is skipped (``on_error: skip``) or stops the run (``fail``, or ``retry`` with nowhere to
    put it).  ``retryable=False``: a failure that would repeat (an unpicklable result).
    """
    if stage.on_error == "retry" and retryable and attempts <= stage.retries:
        return Decision.RETRY
    if stage.on_error == "fail" or (stage.on_error == "retry" and not stage.dead_letter):
        return Decision.FAIL
    return Decision.DEAD_LETTER if stage.dead_letter else Decision.SKIP


def backoff(stage: StagePlan, attempts: int) -> float:
    """Seconds to wait before calling again an item (or batch) that has failed ``attempts`` times."""
    return stage.retry_backoff * 2 ** (attempts - 1)


def give_up_letter(stage: StagePlan, item: Any, error: str, attempts: int) -> dict[str, Any]:
    """The dead letter of an item given up on."""
    return {"item": item, "error": error, "stage": stage.name, "attempts": attempts}


def run_chunk(
    fn: Callable[[Any], Any],
    stage: StagePlan,
    seq: int,
    chunk: list[tuple[Any, int]],
    lock: Any,
    progress: Any,
    log: Any,
) -> ChunkResult:
    """``run_items`` for a chunk of ``(item, failed attempts so far)`` pairs."""
    tries = [attempts for _, attempts in chunk]
    return run_items(fn, stage, seq, [item for item, _ in chunk], tries if any(tries) else None, lock, progress, log)


def run_items(
    fn: Callable[[Any], Any],
    stage: StagePlan,
    seq: int,
    items: list[Any],
    tries: list[int] | None,
    lock: Any,
    progress: Any,
    log: Any,
    ids: Ids | None = None,
    partial: Callable[[ChunkResult], None] | None = None,
) -> ChunkResult:
    """Call ``fn`` on each item under the stage's error policy; ``tries``: failed attempts so far, if any.

    The common case (no lock, first attempt, no exception) stays in a tight loop; anything else goes
    through ``_with_policy``.  ``progress[0]`` always holds the index of the item in hand, and with a
    ``timeout`` ``progress[1]`` holds when its call started (``time.monotonic_ns()``).

    Latency: ``LATENCY_SAMPLES`` items spread evenly over the chunk (every item of a smaller chunk) are
    timed from the top of their loop turn to the top of the next (their call, retries and backoff
    included, plus ~0.1 us of loop); ``result.latency`` holds those seconds.  The loop pays one integer
    comparison per item for it.  ``ids``: the items' ids, to give each dead letter its item's id.

    ``partial``: called with the result so far (``partial=True``) right after an item is dead-lettered, and
    the loop goes on with a new result: a dead letter never dies with its worker, so the runner knows
    exactly which items of a chunk are settled if the worker dies later (see ``StageRunner._recover``).
    ``progress[3:6]`` mirror the result's skipped, failed and retried counts, for the same reason.

    A stage with ``batch``, ``concurrency`` above 1, an ``async def`` function or named routes goes through
    ``run_units`` (same contract; see there).
    """
    if stage.batch or stage.concurrency > 1 or stage.routes or is_async(fn):
        return run_units(fn, stage, seq, items, tries, lock, progress, log, ids, partial)
    result = ChunkResult(seq, [], [])
    outputs, ends, samples = result.outputs, result.ends, result.latency
    append, extend = outputs.append, outputs.extend
    timed = stage.timeout is not None
    generator = types.GeneratorType
    clock = time.perf_counter
    stride = max(1, math.ceil(len(items) / LATENCY_SAMPLES))
    mark, t_mark = 0, 0.0  # the next index where a sample starts or ends; when the open sample started
    t0 = clock()
    progress[3] = progress[4] = progress[5] = 0
    simple = lock is None and tries is None and not timed  # the common case: a tight loop
    skipping = stage.on_error == "skip" and not stage.dead_letter  # a failed item is given up on at once
    # While every item so far gave exactly one output (regular) or none (silent: a sink), `ends` is implicit
    # and filled in later; the first item that breaks the pattern makes it explicit.
    regular = silent = True
    for index, item in enumerate(items):
        progress[0] = index
        if index == mark:
            now = clock()
            if t_mark:
                samples.append(now - t_mark)
                t_mark = 0.0
            if index % stride == 0:
                t_mark, mark = now, index + 1
            else:
                mark = index - index % stride + stride
        if simple:
            try:
                out = fn(item)
            except Exception as e:  # noqa: BLE001 - handled by the policy below
                if skipping:  # what _with_policy would do, without leaving the loop
                    if regular or silent:
                        ends.extend(_implicit_ends(regular, index))
                        regular = silent = False
                    result.failed += 1
                    progress[4] = result.failed
                    _skip_raised(e, item, result, progress, log)
                    ends.append(len(outputs))
                    continue
                failure: FunctionFailed | None = FunctionFailed.of(e, item)
            else:
                if out is None:
                    if silent:
                        regular = False
                        continue
                elif regular and type(out) is not generator:
                    silent = False
                    append(out)
                    continue
                if regular or silent:
                    ends.extend(_implicit_ends(regular, index))
                    regular = silent = False
                failure = None
                if type(out) is generator:
                    before = len(outputs)
                    try:
                        extend(out)
                    except Exception as e:  # noqa: BLE001 - what a failing generator yielded does not count
                        del outputs[before:]
                        failure = FunctionFailed.of(e, item)
                elif out is not None:
                    append(out)
                if failure is None:
                    ends.append(len(outputs))
                    continue
        else:
            failure = None
        if regular or silent:
            ends.extend(_implicit_ends(regular, index))
            regular = silent = False
        if timed:
            progress[1] = time.monotonic_ns()
        dead = len(result.dead)
        if _with_policy(fn, stage, item, tries[index] if tries else 0, failure, lock, progress, result, log):
            break
        ends.append(len(outputs))
        if len(result.dead) > dead:
            result.dead_ids.append(ids[index] if ids is not None else None)
            if partial is not None:
                result.done, result.busy, result.partial = len(ends), clock() - t0, True
                partial(result)
                progress[3] = progress[4] = progress[5] = 0
                result = ChunkResult(seq, [], [])
                outputs, ends, samples = result.outputs, result.ends, result.latency
                append, extend = outputs.append, outputs.extend
                t0 = clock()
    if regular or silent:
        ends.extend(_implicit_ends(regular, len(items)))
    t1 = clock()
    if t_mark:
        samples.append(t1 - t_mark)
    progress[1] = 0
    result.done = len(ends)
    result.busy = t1 - t0
    return result


def _implicit_ends(regular: bool, n: int) -> Iterable[int]:
    """``ends`` of n items that gave one output each (regular) or none each."""
    return range(1, n + 1) if regular else itertools.repeat(0, n)


def _with_policy(
    fn: Callable[[Any], Any],
    stage: StagePlan,
    item: Any,
    attempts: int,
    failure: FunctionFailed | None,
    lock: Any,
    progress: Any,
    result: ChunkResult,
    log: Any,
) -> bool:
    """Call ``fn(item)`` (unless it has just failed with ``failure``) and retry, skip, dead-letter or fail
    it as the stage says.  Returns True when the run must stop (``result.error`` is set)."""
    outputs = result.outputs
    while True:
        if failure is None:
            if stage.timeout is not None:
                progress[1] = time.monotonic_ns()
            mark = len(outputs)
            try:
                call(fn, item, lock, outputs.append)
                return False
            except FunctionFailed as e:
                del outputs[mark:]
                failure = e
        error, failure = failure, None
        attempts += 1
        result.failed += 1
        progress[1] = 0
        progress[4] = result.failed
        decided = verdict(stage, attempts)
        if decided == "retry":
            result.retried += 1
            progress[5] = result.retried
            log.warning("retrying", error=error.summary, item=error.shown, attempt=attempts,
                        **error.traceback_fields(log))
            time.sleep(backoff(stage, attempts))
            continue
        if decided == "fail":
            result.error = (error.summary, error.tb, error.item)
            return True
        if decided == "dead_letter":
            result.dead.append(give_up_letter(stage, item, error.summary, attempts))
            _given_up(error, attempts, log)
        else:
            _skip(error, attempts, result, progress, log)
        return False


def _skip(e: FunctionFailed, attempts: int, result: ChunkResult, progress: Any, log: Any) -> None:
    """Count an item skipped after ``attempts`` failures (the last one ``e``) and say so."""
    result.skipped += 1
    progress[3] = result.skipped
    _given_up(e, attempts, log)


def _skip_raised(e: Exception, item: Any, result: ChunkResult, progress: Any, log: Any) -> None:
    """``_skip`` of an item whose first call raised ``e``; no ``FunctionFailed`` is made for a repeat only counted."""
    result.skipped += 1
    progress[3] = result.skipped
    if not log.count("item given up", f"{type(e).__name__}: {e}"):
        _say_given_up(FunctionFailed.of(e, item), 1, log)


def _given_up(e: FunctionFailed, attempts: int, log: Any) -> None:
    """Say that an item was given up after ``attempts`` failures, the last one ``e``, unless that is a repeat
    only counted (``EventLogger.count``)."""
    if not log.count("item given up", e.summary):
        _say_given_up(e, attempts, log)


def _say_given_up(e: FunctionFailed, attempts: int, log: Any) -> None:
    if log.first(e.where):
        log.warning("item given up", error=e.summary, item=e.shown, attempts=attempts, exception=e.tb)
    else:
        log.warning("item given up", error=e.summary, item=e.shown, attempts=attempts, traceback=AS_EARLIER)


# -- batches, concurrent calls, async functions and named routes -------------------------------------------


@dataclass(slots=True)
class Settled:
    """How one unit (an item, or the items of a batch) ended under the policy, after its last attempt."""

    outputs: list[Any] = field(default_factory=list)
    targets: list[int] | None = None  # with named routes: the queue index of each output
    failed: int = 0  # failed attempts, per item (a failed batch call counts one for each of its items)
    retried: int = 0
    skipped: int = 0  # items
    dead: list[dict[str, Any]] = field(default_factory=list)  # one dead letter per item given up on
    error: tuple[str, str, str] | None = None  # (summary, traceback, item): the run stops
    seconds: float = 0.0  # from the start of its first call to the end of its last (backoff included)


def unit_failed(stage: StagePlan, e: FunctionFailed, unit: list[Any], attempts: int, s: Settled, log: Any) -> bool:
    """Apply the policy to a unit whose ``attempts``-th call failed with ``e``: count it in ``s``, log it,
    give it up (a dead letter per item, its items skipped, or ``s.error``). True: call it again (after the
    backoff, which the caller waits)."""
    n = len(unit)
    s.failed += n
    decided = verdict(stage, attempts)
    if decided is Decision.RETRY:
        s.retried += n
        log.warning("retrying", error=e.summary, item=e.shown, attempt=attempts, **e.traceback_fields(log))
        return True
    if decided is Decision.FAIL:
        s.error = (e.summary, e.tb, e.item)
        return False
    if decided is Decision.DEAD_LETTER:
        s.dead = [give_up_letter(stage, item, e.summary, attempts) for item in unit]
    else:
        s.skipped = n
    _given_up(e, attempts, log)
    return False


def settle(fn: Callable[[Any], Any], stage: StagePlan, unit: list[Any], attempts: int, lock: Any, progress: Any,
           log: Any, routes: dict[str, int] | None, failure: FunctionFailed | None = None) -> Settled:
    """Call ``fn`` on a unit in this thread (unless it has just failed with ``failure``), under the policy
    (``attempts``: failed attempts so far); with a ``timeout``, ``progress[1]`` holds when the call in hand
    started (the runner kills a worker past it)."""
    s = Settled()
    t0 = time.perf_counter()
    arg = unit if stage.batch else unit[0]
    timed = stage.timeout is not None
    while True:
        if failure is None:
            if timed:
                progress[1] = time.monotonic_ns()
            try:
                s.outputs, s.targets = attempt(fn, stage, arg, lock, routes)
                break
            except FunctionFailed as e:
                failure = e
        error, failure = failure, None
        progress[1] = 0
        attempts += 1
        if not unit_failed(stage, error, unit, attempts, s, log):
            break
        time.sleep(backoff(stage, attempts))
    progress[1] = 0
    s.seconds = time.perf_counter() - t0
    return s


class Fold:
    """Builds a chunk's ``ChunkResult`` from its units' ``Settled``, taken in input order (``add``)."""

    def __init__(self, stage: StagePlan, seq: int, n_units: int, ids: Ids | None, progress: Any,
                 partial: Callable[[ChunkResult], None] | None) -> None:
        self.stage, self.seq, self.ids, self.progress, self.partial = stage, seq, ids, progress, partial
        self.stride = max(1, math.ceil(n_units / LATENCY_SAMPLES))  # which units are latency samples
        self.units = 0
        self.result = self._new()
        progress[0] = progress[3] = progress[4] = progress[5] = progress[6] = 0

    def _new(self) -> ChunkResult:
        self.t0 = time.perf_counter()
        return ChunkResult(self.seq, [], [], targets=[] if self.stage.routes else None)

    def add(self, start: int, n: int, s: Settled) -> bool:
        """Take the unit of items ``start .. start + n``; True when the run must stop (``result.error``)."""
        r, progress = self.result, self.progress
        r.failed += s.failed
        r.retried += s.retried
        r.skipped += s.skipped
        if self.units % self.stride == 0:
            r.latency.append(s.seconds)
        self.units += 1
        if s.error is not None:
            r.error = s.error
            return True
        r.outputs.extend(s.outputs)
        if r.targets is not None and s.targets is not None:
            r.targets.extend(s.targets)
        r.ends.extend(itertools.repeat(len(r.outputs), n))  # a batch's outputs all come from its first item
        progress[0] = start + n
        progress[3], progress[4], progress[5] = r.skipped, r.failed, r.retried
        if s.dead:
            r.dead.extend(s.dead)
            r.dead_ids.extend(self.ids[start : start + n] if self.ids is not None else [None] * n)
            if self.partial is not None:  # a dead letter never dies with its worker (see run_items)
                r.done, r.busy, r.partial = len(r.ends), time.perf_counter() - self.t0, True
                self.partial(r)
                progress[3] = progress[4] = progress[5] = 0
                self.result = self._new()
        return False

    def ok(self, start: int, n: int, outputs: list[Any], targets: list[int] | None) -> None:
        """Take a unit whose first call succeeded and which is no latency sample (``sampled`` is False)."""
        r = self.result
        self.units += 1
        r.outputs.extend(outputs)
        if targets is not None:
            r.targets.extend(targets)  # type: ignore[union-attr]
        r.ends.extend(itertools.repeat(len(r.outputs), n))
        self.progress[0] = start + n

    @property
    def sampled(self) -> bool:
        """The next unit is a latency sample."""
        return self.units % self.stride == 0

    def finish(self) -> ChunkResult:
        """The result of the chunk (after the last partial one)."""
        r = self.result
        r.done = len(r.ends)
        r.busy = time.perf_counter() - self.t0
        self.progress[1] = 0
        return r


def run_units(
    fn: Callable[[Any], Any],
    stage: StagePlan,
    seq: int,
    items: list[Any],
    tries: list[int] | None,
    lock: Any,
    progress: Any,
    log: Any,
    ids: Ids | None = None,
    partial: Callable[[ChunkResult], None] | None = None,
) -> ChunkResult:
    """``run_items`` for a stage with ``batch``, ``concurrency``, an ``async def`` function or named routes.

    The chunk is cut into units: batches of ``stage.batch`` items (the function gets the list), else single
    items.  Each unit is settled under the policy: skip, retry and dead letters apply to the whole unit,
    counted per item (a failed batch call is a failed attempt of each of its items; a dead letter per item).
    Results are taken in input order, so outputs leave in input order within the chunk; ``ends`` stays per
    item (a batch's outputs count as its first item's: they inherit its id); ``targets`` gives each output's
    queue for named routes.  With ``concurrency`` above 1 or an async function, up to ``concurrency`` units
    are called at once (``runner.calls``); else one after another in this thread.

    ``progress[0]``: the first item of the earliest unit not yet settled (with concurrency, later units may be
    done or in hand too; everything before it is settled).  ``progress[3:6]``: counts of the settled units
    before it.  ``progress[1]``: without concurrency, when the call in hand started, as in ``run_items``;
    with it, the worker enforces ``timeout`` itself and ``progress[1]`` is a heartbeat of its event loop
    while calls are in flight (see ``runner.calls``), and ``progress[6]`` is one past the last item whose
    call has started (the items from ``progress[0]`` to it may be in hand: a death cannot be pinned on one).
    """
    size = stage.batch or 1
    starts = range(0, len(items), size)
    fold = Fold(stage, seq, len(starts), ids, progress, partial)
    routes = route_index(stage)
    if stage.concurrency > 1 or is_async(fn):
        from runner import calls

        if is_async(fn):
            calls.run(calls.settle_all(fn, stage, items, tries, lock, log, fold, ids, routes))
        else:
            calls.settle_threads(fn, stage, items, tries, lock, log, fold, ids, routes)
        return fold.finish()
    simple = lock is None and tries is None and stage.timeout is None
    for start in starts:
        unit = items[start : start + size]
        progress[0] = start
        failure = None
        if simple and not fold.sampled:  # the common case in short: a first call that succeeds
            try:
                outputs, targets = attempt(fn, stage, unit if stage.batch else unit[0], None, routes)
            except FunctionFailed as e:
                failure = e
            else:
                fold.ok(start, len(unit), outputs, targets)
                continue
        attempts = max(tries[start : start + size]) if tries else 0
        s = settle(fn, stage, unit, attempts, lock, progress, log, routes, failure)
        if fold.add(start, len(unit), s):
            break
    return fold.finish()
