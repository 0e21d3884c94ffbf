"""The messages between the processes of a run and its driver, one shape each (no positional tuples).

Producers send ``ProducerDone`` (always, last) and ``ProducerFailed`` on their control pipe (local) or as
their call's result (Ray). The error policy's answer for an item is a ``Decision``.
"""

from __future__ import annotations

import enum
from typing import NamedTuple


class ProducerDone(NamedTuple):
    """A producer process has ended: items it sent, seconds it ran."""

    stage: str
    process: str
    sent: int
    seconds: float


class ProducerFailed(NamedTuple):
    """A producer's source failed: one-line summary, traceback ("" when the summary says all: bad data)."""

    stage: str
    process: str
    summary: str
    traceback: str = ""


class Decision(enum.StrEnum):
    """What the error policy does with an item that failed (``worker.verdict``)."""

    RETRY = "retry"  # call it again (after the backoff)
    FAIL = "fail"  # the run stops
    DEAD_LETTER = "dead_letter"  # a record goes to the dead-letter queue
    SKIP = "skip"  # counted skipped, the run goes on
