"""Logging across processes: every process sends records to one listener in the main process.

    child process                                             main process
    structlog / logging --> ContextQueueHandler ~~log queue~~> Listener --> stderr (console | json)
    (stage, process, pid added; the record made plain data)             \\-> log_file (JSON lines)

Children attach only a ``ContextQueueHandler``; the listener owns the real handlers and is stopped
(drained) before the run returns, so no record is lost.
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

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_PLAIN = (str, int, float, bool, type(None))


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
    """Route this process's structlog and stdlib logging to ``log_queue`` (call once per process)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    context.setdefault("pid", os.getpid())
    root.addHandler(ContextQueueHandler(log_queue, **context))
    root.setLevel(LEVELS[level])
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


class EventFormatter(logging.Formatter):
    """Renders the event dict of a record: structlog's console renderer, or one JSON object a line."""

    def __init__(self, fmt: str, *, colors: bool = False) -> None:
        super().__init__()
        self.fmt = fmt
        self._console = structlog.dev.ConsoleRenderer(colors=colors) if fmt == "console" else None

    def format(self, record: logging.LogRecord) -> str:
        event = dict(record.msg) if isinstance(record.msg, dict) else {"event": record.getMessage()}
        if self._console is None:
            return json.dumps(event, default=repr)
        return str(self._console(None, "", event))


class Listener(logging.handlers.QueueListener):
    """The one listener of a run; ``stop`` drains the queue but never waits forever."""

    def stop(self, timeout: float = 10.0) -> None:  # type: ignore[override]
        if self._thread is None:
            return
        self.enqueue_sentinel()
        self._thread.join(timeout)
        self._thread = None


def start_listener(log_queue: Any, level: str, fmt: str, log_file: str | None) -> Listener:
    """Start the listener that renders every process's records to stderr and ``log_file``."""
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(EventFormatter(fmt, colors=fmt == "console" and sys.stderr.isatty()))
    handlers: list[logging.Handler] = [stderr]
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        file_handler = logging.FileHandler(log_file, mode="w", encoding="utf-8")
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
