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

Console lines (``ConsoleFormatter``) read as columns: time, level, stage, process, event, then
``key=value`` pairs and the traceback, if any; coloured only when stderr is a terminal.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import os
import sys
import traceback
from typing import Any

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_PLAIN = (str, int, float, bool, type(None))

item_id_source: Any = None  # set in a worker: () -> the item_id of the item in hand, or None


def _plain(value: Any) -> Any:
    """A value that pickles and renders as JSON: containers of plain values kept, the rest as repr."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


class ContextQueueHandler(logging.handlers.QueueHandler):
    """A ``QueueHandler`` that turns every record into an event dict carrying stage, process and pid."""

    def __init__(self, queue: Any, **context: Any) -> None:
        super().__init__(queue)
        self.context = context

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if isinstance(record.msg, dict):  # from structlog, via ProcessorFormatter.wrap_for_formatter
            event = dict(record.msg)
        else:  # plain stdlib logging
            event = {"event": record.getMessage()}
            if record.exc_info:
                event["exception"] = "".join(traceback.format_exception(*record.exc_info))
        event.setdefault("level", record.levelname.lower())
        event.setdefault("logger", record.name)
        event.setdefault(
            "timestamp", datetime.datetime.fromtimestamp(record.created, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        )
        for key, value in self.context.items():
            event.setdefault(key, value)
        if item_id_source is not None and "item_id" not in event:
            item_id = item_id_source()
            if item_id is not None:
                event["item_id"] = item_id
        return logging.makeLogRecord(
            {
                "name": record.name,
                "levelno": record.levelno,
                "levelname": record.levelname,
                "msg": _plain(event),
                "created": record.created,
            }
        )


def configure(log_queue: Any, level: str, **context: Any) -> None:
    """Route this process's stdlib logging and structlog to ``log_queue`` (call once per process).

    structlog is configured now if it is imported, else right after its first import (``_StructlogHook``):
    mprun's own records do not need it (``get_logger``), so a process whose code never logs through
    structlog never imports it (~30 ms with asyncio).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
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
        if self.logger.isEnabledFor(level):
            bound = sys.modules.get("structlog.contextvars")
            self.logger.log(level, {**(bound.get_contextvars() if bound else {}), "event": event, **fields})

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)


def get_logger(name: str = "mprun") -> EventLogger:
    """The logger mprun's own code writes its records with."""
    return EventLogger(name)


class EventFormatter(logging.Formatter):
    """Renders the event dict of a record: console columns (``ConsoleFormatter``), or one JSON object a line."""

    def __init__(self, fmt: str, *, colors: bool = False, widths: tuple[int, int] = (0, 0)) -> None:
        super().__init__()
        self.fmt = fmt
        self._console = ConsoleFormatter(colors=colors, widths=widths) if fmt == "console" else None

    def format(self, record: logging.LogRecord) -> str:
        event = dict(record.msg) if isinstance(record.msg, dict) else {"event": record.getMessage()}
        if self._console is None:
            return json.dumps(event, default=repr)
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


class Listener(logging.handlers.QueueListener):
    """The one listener of a run; ``stop`` drains the queue but never waits forever."""

    def stop(self, timeout: float = 10.0) -> None:  # type: ignore[override]
        if self._thread is None:
            return
        self.enqueue_sentinel()
        self._thread.join(timeout)
        self._thread = None


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
    listener = Listener(log_queue, *handlers, respect_handler_level=True)
    listener.start()
    return listener


def close_handlers(listener: Listener) -> None:
    """Close the listener's handlers (flushes the log file)."""
    for handler in listener.handlers:
        handler.flush()
        if isinstance(handler, logging.FileHandler):
            handler.close()
