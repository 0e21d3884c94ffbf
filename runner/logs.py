"""Logging across processes: every process sends records to one listener in the main process.

    child process                                             main process
    structlog / logging --> ContextQueueHandler ~~log queue~~> Listener --> stderr (console | json)
    (stage, process, pid, item_id added;                                |   (through the live progress
     the record made plain data)                                        |    display when it is shown)
                                                                        \\-> log_file (JSON lines)

mprun's own records are event dicts on stdlib loggers (``get_logger``), the shape structlog's take once
they reach the handler, so a process imports structlog only when stage code does (``configure``).

Children attach only a ``ContextQueueHandler``; the listener owns the real handlers and is stopped
(drained) before the run returns, so no record is lost.  ``configure`` sets the root logger's level to
the run's ``log_level`` in every process, so a record below it is dropped where it is made.

``item_id``: a worker sets ``item_id_source`` (``runner.worker.current_item_id``); the handler calls
it when a record is made, so a record a stage function writes while it handles an item carries that
item's id (``"<producer stage>:<n>"``), the same in every stage the item passes.

Repeats: after ``SHOWN`` warnings or errors of one place (stage, level, logger, event, exception type), a
process sends the next ones of that place in batches (``_Batch``), and the listener writes one ``<event>: N
more like this`` line per place a second to stderr instead of each, while the log file gets every record.
Without a log file no one reads the repeats themselves: the listener says so on its queue
(``repeats_counted``), and each process sends only how many there were (``_Counts``).

Console lines (``ConsoleFormatter``) read as columns: time, level, stage, process, event, then
``key=value`` pairs and the traceback, if any; coloured only when stderr is a terminal.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import logging.handlers
import multiprocessing
import multiprocessing.queues
import os
import queue as queue_module
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from typing import Any, Self

from runner import wire

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_PLAIN = (str, int, float, bool, type(None))
_SCALARS = frozenset(_PLAIN)
NUMBERS = frozenset({int, float, bool, type(None)})  # JSON as long as the repr (-Infinity: 9 characters)

item_id_source: Any = None  # set in a worker: () -> the item_id of the item in hand, or None


class Shown(str):
    """An item as text for messages (its short repr), carrying the item itself as ``value`` for log records,
    so that a JSON record holds the item as a JSON value (``"item": {"a": 1}``), not as Python's repr."""

    value: Any

    def __new__(cls, text: str, value: Any) -> Self:
        self = super().__new__(cls, text)
        self.value = value
        return self

    def __reduce__(self) -> Any:
        return (Shown, (str(self), self.value))


def shown(value: Any, text: str, width: int = 200) -> str:
    """``text`` (the repr of ``value``), as a ``Shown`` when ``value`` is plain data whose JSON fits ``width``."""
    if type(value) in NUMBERS and width >= 24:  # its JSON is no longer than its repr (or "Infinity")
        return Shown(text, value)
    if not _json_like(value):  # holds something JSON has no form for: the repr says more
        return text
    plain = _plain(value)
    return Shown(text, plain) if len(json.dumps(plain)) <= width else text


def _json_like(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, list | tuple):
        return all(map(_json_like, value))
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_like(v) for k, v in value.items())
    return False


def _plain(value: Any) -> Any:
    """A value that pickles and renders as JSON: containers of plain values kept, the rest as repr."""
    if type(value) is Shown:
        return value.value  # plain already (``shown``)
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, list | tuple):
        return [v if type(v) in _SCALARS else _plain(v) for v in value]
    if isinstance(value, dict):
        return {k if type(k) is str else str(k): v if type(v) in _SCALARS else _plain(v) for k, v in value.items()}
    return repr(value)


_STR = frozenset({str})
_second: list[Any] = [None, ""]  # the whole second last formatted, and its text: one strftime a second


def _timestamp(created: float) -> str:
    """``created`` as ``2024-01-31T12:00:01.234567Z`` (UTC), formatting the date and time once a second."""
    whole = int(created)
    if whole != _second[0]:
        _second[0], _second[1] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second[1]}.{int((created - whole) * 1e6):06d}Z"


class _Event(logging.LogRecord):
    """A record carrying an event dict: what crosses to the listener. Made without ``LogRecord.__init__``
    (which asks the system for the pid, thread and time again: ~25 us where a system call is slow); the
    attributes no one reads are class defaults, so a pickled record holds five values."""

    args = None
    exc_info = exc_text = stack_info = None
    pathname = filename = module = funcName = ""
    lineno = 0
    msg: Any  # the event dict (a batch's: its places)

    def __init__(self, name: str, levelno: int, levelname: str, msg: Any, created: float) -> None:
        self.name, self.levelno, self.levelname, self.msg, self.created = name, levelno, levelname, msg, created

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.levelno, self.levelname, self.msg, self.created))


class _Batch(_Event):
    """Repeated warnings of one process, sent as one record.

    ``msg``: ``{place: (name, levelno, levelname, first event, [(created, changed), ...], keys)}``, so what the
    repeats of a place share (stage, process, event, logger, traceback note...) crosses once. ``changed``: what
    differs from the first, or the values of the fields named by ``keys`` (a tuple pickles in a third of the time).
    """

    def events(self) -> Iterator[_Event]:
        """Every record of the batch, whole again."""
        for name, levelno, levelname, first, rows, keys in self.msg.values():
            for created, changed in rows:
                event = {**first, **_fields(changed, keys)}
                if "timestamp" not in changed:
                    event["timestamp"] = _timestamp(created)
                if event.get("item_id", "") is None:
                    del event["item_id"]
                yield _Event(name, levelno, levelname, event, created)


class _Counts(_Event):
    """Repeated warnings of one process, counted rather than sent, for a listener that writes no log file.

    ``msg``: ``{place: (first event, repeats, the last one's error)}``: what the ``N more like this`` line of the
    place needs (``Listener.summarise``), whatever the repeats held.
    """


def _fields(changed: dict[str, Any] | tuple[Any, ...], keys: tuple[str, ...] | None) -> dict[str, Any]:
    """The fields of a repeat in a ``_Batch``."""
    if isinstance(changed, tuple):
        return dict(zip(keys or (), changed, strict=True))
    return changed


def place(event: dict[str, Any], levelno: int) -> tuple[Any, ...]:
    """Where a record comes from, for counting repeats: stage, level, logger, event, exception type of ``error``."""
    error = event.get("error")
    kind = error.partition(":")[0] if isinstance(error, str) else None
    return (event.get("stage"), levelno, event.get("logger"), event.get("event"), kind)


SHOWN = 5  # warnings (and errors) of one place sent (and rendered on stderr) one by one, before repeats are counted
BATCH = 1000  # repeats a process sends as one record
BATCH_SECONDS = 0.25  # at most this long a repeat waits to be sent


class ContextQueueHandler(logging.handlers.QueueHandler):
    """A ``QueueHandler`` that turns every record into an event dict carrying stage, process and pid.

    After ``SHOWN`` warnings or errors of one place (``place``), the next ones of that place are sent in
    batches (``_Batch``: up to ``BATCH`` records, or what ``BATCH_SECONDS`` gathered) rather than one queue
    message each: a stage that fails on every tenth item would otherwise spend most of its time logging.
    Any other record first sends what is waiting, so a process's records keep their order; what is waiting
    is also sent when the process ends and when the handler is replaced.  When the queue's reader writes no
    log file (the queue's ``repeats_counted``, set by ``start_listener``), a repeat is only counted, with its
    error, and the counts are sent instead (``_Counts``), at the same times.
    """

    def __init__(self, queue: Any, **context: Any) -> None:
        super().__init__(queue)
        self.context = context
        self._stage = context.get("stage")
        self._seen: dict[tuple[Any, ...], int] = {}
        self._waiting: dict[tuple[Any, ...], tuple[Any, ...]] = {}  # place -> as in a _Batch
        # place -> the fields of its first record that a repeat must have too: a repeat takes the others
        # (level, logger, time, this process's context) from the first, when it is made whole again
        self._needs: dict[tuple[Any, ...], frozenset[str]] = {}
        self._keys: dict[tuple[Any, ...], tuple[str, ...]] = {}  # place -> the fields of its repeats, in order
        self._filled = frozenset({"level", "logger", "timestamp", "item_id", *context})
        self._count = 0  # records waiting
        self._pid = os.getpid()
        # Batches on a run's record pipe, multiprocessing's queues and inline runs' queue.Queue; a queue of its
        # own (the Ray relay, which batches what it sends) gets each record.
        self._batching = isinstance(queue, wire.RecordPipe | multiprocessing.queues.Queue | queue_module.Queue)
        self._counting = self._batching and getattr(queue, "repeats_counted", False) is True
        self._timer: threading.Timer | None = None
        if multiprocessing.parent_process() is not None:  # a child: send what waits when it ends
            from multiprocessing import util

            # before the queue's own finalizer (priority 10) stops its feeder thread
            util.Finalize(None, self.send_waiting, exitpriority=20)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._send(self.prepare(record))
        except Exception:  # noqa: BLE001 - logging's own rule: a record that fails is reported, never raised
            self.handleError(record)

    def emit_event(self, name: str, levelno: int, event: dict[str, Any]) -> None:
        """``EventLogger``'s record, without a ``LogRecord`` or the caller lookup (what ``emit`` would send).

        A repeat waits as the fields it was given (plus its item id): its level, logger, stage, process and
        timestamp are filled in by the listener from the first of its place and its time.
        """
        created = time.time()
        with self.lock:  # type: ignore[union-attr]
            try:
                if levelno >= logging.WARNING and self._batching:
                    error = event.get("error")
                    where = (event.get("stage", self._stage), levelno, event.get("logger", name), event.get("event"),
                             error.partition(":")[0] if isinstance(error, str) else None)
                    group = self._waiting.get(where)
                    if group is not None and self._counting:
                        self._counted(group, error)
                        return
                    # a repeat (its place is past SHOWN: _seen counts no further) with each field of the first
                    if group is not None and self._needs[where] <= event.keys():
                        item_id = item_id_source() if item_id_source is not None else None
                        if item_id is not None or "item_id" in group[3]:
                            event["item_id"] = item_id
                        if not _SCALARS.issuperset(map(type, event.values())):
                            event = _plain(event)
                        keys = self._keys.get(where)
                        if keys is None:
                            keys = self._keys[where] = tuple(event)
                        group[4].append((created, tuple(event.values()) if tuple(event) == keys else event))
                        self._count += 1
                        if self._count >= BATCH or self._timer is None:
                            self._wait()
                        return
                self._send(self._event(name, levelno, logging.getLevelName(levelno), event, created))
            except Exception:  # noqa: BLE001 - as emit
                self.handleError(_Event(name, levelno, logging.getLevelName(levelno), event, created))

    def count(self, name: str, levelno: int, event: str, error: str) -> bool:
        """Count a record of ``event`` with ``error`` (and no other stage, logger or level) without it being made,
        when it is a repeat this handler only counts (``repeats_counted``): what ``emit_event`` would do with it.
        False: it is not, and must be logged."""
        if not self._counting or levelno < logging.WARNING:
            return False
        where = (self._stage, levelno, name, event, error.partition(":")[0])
        with self.lock:  # type: ignore[union-attr]
            group = self._waiting.get(where)
            if group is None:  # not past SHOWN yet
                return False
            self._counted(group, error)
            return True

    def _counted(self, group: tuple[Any, ...], error: Any) -> None:
        """A repeat of ``group``'s place is counted (its error kept for the summary line), to be sent as ``_Counts``."""
        group[4].append(error)
        self._count += 1
        if self._count >= BATCH or self._timer is None:
            self._wait()

    def _send(self, record: _Event) -> None:
        if record.levelno >= logging.WARNING and self._batching:
            where = place(record.msg, record.levelno)
            seen = self._seen[where] = self._seen.get(where, 0) + 1
            if seen > SHOWN:
                event = record.msg
                group = self._waiting.get(where)
                if self._counting:
                    if group is None:
                        group = self._waiting[where] = (record.name, record.levelno, record.levelname, event, [])
                    group[4].append(event.get("error"))
                else:
                    if group is None or not self._needs[where] <= event.keys():  # this one starts the group anew
                        if self._count:
                            self._send_waiting()
                        group = self._waiting[where] = (record.name, record.levelno, record.levelname, event, [])
                        self._needs[where] = frozenset(event.keys() - self._filled)
                    first = group[3]
                    changed = {k: v for k, v in event.items() if k not in first or first[k] != v}
                    if "item_id" in first and "item_id" not in event:
                        changed["item_id"] = None  # none: dropped when made whole
                    group[4].append((record.created, changed))
                self._count += 1
                self._wait()
                return
        if self._count:
            self._send_waiting()
        self.enqueue(record)

    def _wait(self) -> None:
        """A repeat has been added to its group: send the batch when it is full, else see that the timer runs."""
        if self._count >= BATCH:
            self._send_waiting()
        elif self._timer is None:  # left running when a full batch is sent: at most one thread start a period
            self._timer = threading.Timer(BATCH_SECONDS, self._time_up)
            self._timer.daemon = True
            self._timer.start()

    def _time_up(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._timer = None
            self._send_waiting()

    def send_waiting(self) -> None:
        """Send the repeats waiting, if any (at exit, when replaced)."""
        with self.lock:  # type: ignore[union-attr]
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._send_waiting()

    def _send_waiting(self) -> None:
        """Send what waits; each place keeps its group (emptied), so its next repeat waits at once again."""
        if self._count:
            if self._counting:
                waiting = {where: (group[3], len(group[4]), _plain(group[4][-1]))
                           for where, group in self._waiting.items() if group[4]}
            else:
                waiting = {where: (*group, self._keys.get(where)) for where, group in self._waiting.items() if group[4]}
            self._waiting = {where: (*group[:4], []) for where, group in self._waiting.items()}
            self._count = 0
            kind = _Counts if self._counting else _Batch
            self.enqueue(kind("mprun", logging.WARNING, "WARNING", waiting, time.time()))

    def prepare(self, record: logging.LogRecord) -> _Event:
        if isinstance(record.msg, dict):  # from structlog, via ProcessorFormatter.wrap_for_formatter
            event = dict(record.msg)
        else:  # plain stdlib logging
            event = {"event": record.getMessage()}
            if record.exc_info:
                event["exception"] = "".join(traceback.format_exception(*record.exc_info))
        return self._event(record.name, record.levelno, record.levelname, event, record.created)

    def _event(self, name: str, levelno: int, levelname: str, event: dict[str, Any], created: float) -> _Event:
        """The record that crosses to the listener: ``event`` with level, logger, timestamp, this process's context."""
        event.setdefault("level", levelname.lower())
        event.setdefault("logger", name)
        if "timestamp" not in event:
            event["timestamp"] = _timestamp(created)
        for key, value in self.context.items():
            event.setdefault(key, value)
        if item_id_source is not None and "item_id" not in event:
            item_id = item_id_source()
            if item_id is not None:
                event["item_id"] = item_id
        if not _SCALARS.issuperset(map(type, event.values())) or not _STR.issuperset(map(type, event)):
            event = _plain(event)
        return _Event(name, levelno, levelname, event, created)


def configure(log_queue: Any, level: str, **context: Any) -> None:
    """Route this process's stdlib logging and structlog to ``log_queue`` (call once per process).

    structlog is configured now if it is imported, else right after its first import (``_StructlogHook``):
    mprun's own records do not need it (``get_logger``), so a process whose code never logs through
    structlog never imports it (~30 ms with asyncio).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, ContextQueueHandler) and handler._pid == os.getpid():  # not one inherited by fork
            handler.send_waiting()
        root.removeHandler(handler)
    context.setdefault("pid", os.getpid())
    root.addHandler(ContextQueueHandler(log_queue, **context))
    root.setLevel(LEVELS[level])
    if "structlog" in sys.modules:
        _configure_structlog()
    elif not any(isinstance(finder, _StructlogHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _StructlogHook())


def _configure_structlog() -> None:
    import structlog

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.filter_by_level,
            structlog.stdlib.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


class _StructlogHook:
    """A ``sys.meta_path`` finder that lets the first ``import structlog`` run, then configures structlog."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "structlog":
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            load = spec.loader.exec_module

            def exec_module(module: Any) -> None:
                load(module)
                _configure_structlog()

            spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


class EventLogger:
    """mprun's own records: ``log.info("event", key=value)`` as structlog's, without importing structlog.

    The event dict goes to a stdlib logger as the record's message, which is what structlog's records
    are once ``ContextQueueHandler`` gets them (it adds level, logger, timestamp and the process's context);
    context bound with ``structlog.contextvars`` is merged in when structlog is in use.
    """

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)
        self._seen: set[Any] = set()

    def first(self, key: Any) -> bool:
        """True the first time this logger is asked about ``key``: to write something once, such as the
        traceback of an exception raised again and again from the same place."""
        if key in self._seen:
            return False
        self._seen.add(key)
        return True

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        logger = self.logger
        if logger.isEnabledFor(level):
            bound = sys.modules.get("structlog.contextvars")
            record = {**(bound.get_contextvars() if bound else {}), "event": event, **fields}
            handler = _only_handler(logger)
            if handler is not None:  # where logger.log would take it, ~15 us sooner (a failing stage logs a lot)
                handler.emit_event(logger.name, level, record)
            else:
                logger.log(level, record)

    def count(self, event: str, error: str, level: int = logging.WARNING) -> bool:
        """Dispose of a record of ``event`` with ``error`` that no one would read, without making it: True when it
        is below the run's level or only counted (a repeat past ``SHOWN`` of its place, and no log file: see
        ``ContextQueueHandler.count``), so the caller need not log it; False: log it as usual."""
        logger = self.logger
        if not logger.isEnabledFor(level):
            return True
        bound = sys.modules.get("structlog.contextvars")
        if bound is not None and bound.get_contextvars():  # its fields may name another stage or event
            return False
        handler = _only_handler(logger)
        return handler is not None and handler.count(logger.name, level, event, error)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)


def _only_handler(logger: logging.Logger) -> ContextQueueHandler | None:
    """The handler a record of ``logger`` reaches, when that is this process's ``ContextQueueHandler`` alone
    (nothing on the way filters, handles or stops it); else None."""
    node: Any = logger
    while node is not logging.root:
        if node.handlers or node.filters or not node.propagate or node.disabled:
            return None
        node = node.parent
    handlers = node.handlers
    if node.filters or len(handlers) != 1 or not isinstance(handlers[0], ContextQueueHandler):
        return None
    return handlers[0] if not handlers[0].filters and handlers[0].level == logging.NOTSET else None


def get_logger(name: str = "mprun") -> EventLogger:
    """The logger mprun's own code writes its records with."""
    return EventLogger(name)


_JSON = json.JSONEncoder(default=repr)  # json.dumps(event, default=repr) without making an encoder each time


class EventFormatter(logging.Formatter):
    """Renders the event dict of a record: console columns (``ConsoleFormatter``), or one JSON object a line."""

    def __init__(self, fmt: str, *, colors: bool = False, widths: tuple[int, int] = (0, 0)) -> None:
        super().__init__()
        self.fmt = fmt
        self._console = ConsoleFormatter(colors=colors, widths=widths) if fmt == "console" else None

    def format(self, record: logging.LogRecord) -> str:
        event = dict(record.msg) if isinstance(record.msg, dict) else {"event": record.getMessage()}
        if self._console is None:
            return _JSON.encode(event)
        return self._console.render(event)


_RESET, _DIM, _BOLD = "\x1b[0m", "\x1b[2m", "\x1b[1m"
_LEVEL_COLOURS = {"debug": "\x1b[34m", "info": "\x1b[32m", "warning": "\x1b[33m", "error": "\x1b[31;1m",
                  "critical": "\x1b[41;1m"}
_COLUMNS = ("timestamp", "level", "stage", "process", "event", "exception", "logger", "pid")


class ConsoleFormatter:
    """One record as aligned columns: ``12:00:01.234 info    double  double-1  event  key=value ...``.

    Stage and process columns are as wide as the longest name given (``widths``) or seen so far; the
    event is padded so the ``key=value`` pairs of successive lines start in one column where they can;
    ``item_id`` comes first among them; a traceback follows on its own lines.  ANSI colours only with
    ``colors`` (the listener asks for them when stderr is a terminal).
    """

    def __init__(self, *, colors: bool = False, widths: tuple[int, int] = (0, 0)) -> None:
        self.colors = colors
        self.stage_width, self.process_width = widths

    def _c(self, code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if self.colors and text else text

    def render(self, event: dict[str, Any]) -> str:
        """The text of one event dict (several lines when it holds a traceback)."""
        stamp = str(event.get("timestamp", ""))
        clock = stamp[11:23] if len(stamp) >= 23 and stamp[10] == "T" else stamp
        level = str(event.get("level", "info"))
        stage, process = str(event.get("stage", "-")), str(event.get("process", "-"))
        self.stage_width = max(self.stage_width, len(stage))
        self.process_width = max(self.process_width, len(process))
        pairs = {k: v for k, v in event.items() if k not in _COLUMNS}
        if "item_id" in pairs:
            pairs = {"item_id": pairs.pop("item_id"), **pairs}
        logger = event.get("logger")
        if logger not in (None, "mprun", "root"):
            pairs["logger"] = logger
        text = " ".join(f"{self._c(_DIM, k + '=')}{v if isinstance(v, str) and ' ' not in v else _repr(v)}"
                        for k, v in pairs.items())
        message = str(event.get("event", ""))
        line = " ".join([
            self._c(_DIM, clock),
            self._c(_LEVEL_COLOURS.get(level, ""), level.ljust(7)),
            self._c(_BOLD, stage.ljust(self.stage_width)),
            process.ljust(self.process_width),
            (message.ljust(28) if text else message),
        ])
        line = f"{line} {text}".rstrip() if text else line.rstrip()
        exception = event.get("exception")
        if exception:
            line += "\n" + str(exception).rstrip("\n")
        return line


def _repr(value: Any) -> str:
    return json.dumps(value, default=repr) if isinstance(value, str | list | dict) else repr(value)


class LogFile(logging.FileHandler):
    """The run's ``log_file``: when a write fails (disk full, file gone), one line on stderr, then no more tries."""

    def __init__(self, path: str) -> None:
        super().__init__(path, mode="w", encoding="utf-8")
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handle_many(self, records: Sequence[logging.LogRecord]) -> None:
        """Write several records with one write and one flush (a batch of repeats), not one of each per record."""
        records = [r for r in records if r.levelno >= self.level]
        if self.failed or not records or self.stream is None:
            return
        with self.lock:  # type: ignore[union-attr]
            try:
                self.stream.write("".join(f"{self.format(r)}\n" for r in records))
                self.flush()
            except Exception:  # noqa: BLE001 - as emit: reported once, as a line
                self.handleError(records[0])

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as e:
            self._failed(e)

    def close(self) -> None:
        try:
            super().close()
        except OSError as e:  # the last buffered records could not be written
            self._failed(e)

    def handleError(self, record: logging.LogRecord) -> None:
        self._failed(sys.exc_info()[1])

    def _failed(self, error: BaseException | None) -> None:
        if self.failed:
            return
        self.failed = True
        reason = getattr(error, "strerror", None) or error
        sys.stderr.write(f"mprun: error: cannot write the log file {self.baseFilename}: {reason}; "
                         "later records are not in it\n")


SUMMARY_EVERY = 1.0  # seconds between two "N more like this" lines of one place


class Listener(logging.handlers.QueueListener):
    """The one listener of a run; ``stop`` drains the queue but never waits forever.

    Repeats are summarised on stderr: a place is a stage, level, logger, event and the exception type of its
    ``error`` (``ValueError`` of ``error="ValueError: bad 7"``); after ``SHOWN`` warnings or errors of one
    place, stderr gets at most one ``<event>: N more like this`` line per place a second (and at the end)
    instead of each, while the log file (``file_handlers``) still gets every record.  This keeps a stage
    that skips 100,000 items readable and cheap: its repeats are counted, not formatted and written.
    """

    def __init__(self, queue: Any, *handlers: logging.Handler, console: logging.Handler | None = None,
                 respect_handler_level: bool = True) -> None:
        super().__init__(queue, *handlers, respect_handler_level=respect_handler_level)
        self.console = console  # the handler that repeats are kept from
        self._seen: dict[tuple[Any, ...], int] = {}
        self._pending: dict[tuple[Any, ...], tuple[int, dict[str, Any]]] = {}  # place -> (repeats, last event)
        self._summarised = 0.0  # monotonic time of the last summary lines

    def handle(self, record: logging.LogRecord) -> None:
        if isinstance(record, _Counts):  # repeats counted where they were made: for stderr only
            for where, (first, repeats, error) in record.msg.items():
                self._seen[where] = self._seen.get(where, 0) + repeats
                count = self._pending.get(where, (0, first))[0]
                self._pending[where] = (count + repeats, first if error is None else {**first, "error": error})
            if time.monotonic() - self._summarised >= SUMMARY_EVERY:
                self.summarise()
            return
        if isinstance(record, _Batch):  # repeats: counted for stderr, each to the log file
            for where, (_, _, _, first, rows, keys) in record.msg.items():
                self._seen[where] = self._seen.get(where, 0) + len(rows)
                count = self._pending.get(where, (0, first))[0]
                self._pending[where] = (count + len(rows), {**first, **_fields(rows[-1][1], keys)})
            files = [h for h in self.handlers if h is not self.console]
            events = list(record.events()) if files else []
            for handler in files:
                if isinstance(handler, LogFile):
                    handler.handle_many(events)
                    continue
                for one in events:
                    if not self.respect_handler_level or one.levelno >= handler.level:
                        handler.handle(one)
            if time.monotonic() - self._summarised >= SUMMARY_EVERY:
                self.summarise()
            return
        record = self.prepare(record)
        event = record.msg if isinstance(record.msg, dict) else None
        skip = None
        if event is not None and record.levelno >= logging.WARNING and self.console is not None:
            where = place(event, record.levelno)
            seen = self._seen[where] = self._seen.get(where, 0) + 1
            if seen > SHOWN:
                skip = self.console
                count = self._pending.get(where, (0, event))[0]
                self._pending[where] = (count + 1, event)
        for handler in self.handlers:
            if handler is not skip and (not self.respect_handler_level or record.levelno >= handler.level):
                handler.handle(record)
        if self._pending and time.monotonic() - self._summarised >= SUMMARY_EVERY:
            self.summarise()

    def summarise(self) -> None:
        """Write one ``<event>: N more like this`` line per place with repeats not shown yet."""
        pending, self._pending = self._pending, {}
        self._summarised = time.monotonic()
        if self.console is None:
            return
        where = " (every one is in the log file)" if len(self.handlers) > 1 else ""
        for (_, levelno, _, _, _), (count, last) in pending.items():
            event: dict[str, Any] = {k: last[k] for k in ("stage", "logger", "level", "error") if k in last}
            event["event"] = f"{last.get('event')}: {count:,} more like this{where}"
            event["timestamp"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            if "error" in event:
                event["last_error"] = event.pop("error")
            record = logging.makeLogRecord({"name": "mprun", "levelno": levelno,
                                            "levelname": logging.getLevelName(levelno), "msg": event})
            if record.levelno >= self.console.level:
                self.console.handle(record)

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        for handler in logging.getLogger().handlers:  # this process's repeats waiting to be sent (inline runs)
            if isinstance(handler, ContextQueueHandler) and handler._pid == os.getpid():
                handler.send_waiting()
        self.enqueue_sentinel()
        self._thread.join(timeout)
        self._thread = None
        if self._pending:
            self.summarise()


def start_listener(
    log_queue: Any,
    level: str,
    fmt: str,
    log_file: str | None,
    *,
    stream: Any = None,
    widths: tuple[int, int] = (0, 0),
) -> Listener:
    """Start the listener that renders every process's records to stderr and ``log_file``.

    Without ``log_file``, ``log_queue.repeats_counted`` is set: the handlers of the processes that write to it
    (given it after this) send repeats as counts (``_Counts``), since stderr shows only how many there were.

    Args:
        stream: where stderr records go instead of ``sys.stderr`` (the live display's, so a record is
            written above the progress block rather than through it).
        widths: the longest stage and process names of the run (console columns).
    """
    colors = fmt == "console" and sys.stderr.isatty() and not os.environ.get("NO_COLOR")
    stderr = logging.StreamHandler(stream if stream is not None else sys.stderr)
    stderr.setFormatter(EventFormatter(fmt, colors=colors, widths=widths))
    handlers: list[logging.Handler] = [stderr]
    if log_file:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
            file_handler = LogFile(log_file)
        except OSError as e:  # checked before the run (runner.paths), yet gone since
            from runner.errors import UsageError

            msg = f"cannot write the log file {log_file}: {e.strerror or e}"
            raise UsageError(msg) from None
        file_handler.setFormatter(EventFormatter("json"))
        handlers.append(file_handler)
    for handler in handlers:
        handler.setLevel(LEVELS[level])
    with contextlib.suppress(AttributeError):  # read by the writers' handlers (a queue without it: each repeat)
        log_queue.repeats_counted = not log_file
    listener = Listener(log_queue, *handlers, console=stderr, respect_handler_level=True)
    listener.start()
    return listener


def close_handlers(listener: Listener) -> None:
    """Close the listener's handlers (flushes the log file)."""
    for handler in listener.handlers:
        handler.flush()
        if isinstance(handler, logging.FileHandler):
            handler.close()
def logging_state() -> tuple[list[Any], int]:
    """The root logger's handlers and level, to restore after a run."""
    import logging

    root = logging.getLogger()
    return list(root.handlers), root.level


def restore_logging(state: tuple[list[Any], int]) -> None:
    """Put back the root logger's handlers and level."""
    import logging

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in state[0]:
        root.addHandler(handler)
    root.setLevel(state[1])
