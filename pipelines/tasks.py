"""Stage functions of the example pipelines, after the multiprocessing tutorial this project grew from."""

from __future__ import annotations

import logging
import os
import sys
import time
from multiprocessing import current_process

import structlog


def say(text: object) -> None:
    """Print one line with a single write, so lines of concurrent processes never interleave."""
    sys.stdout.write(f"{text}\n")
    sys.stdout.flush()


def doubler(number: int, delay: float = 0.0) -> int:
    """Double a number and say which process did it (tutorial: Process and os.getpid)."""
    time.sleep(delay)  # stands for real work, so that every process gets a share of the items
    result = number * 2
    say(f"{number} doubled to {result} by process id: {os.getpid()}")
    return result


def named_doubler(number: int, delay: float = 0.0) -> int:
    """Double a number and say which process, by name, did it (tutorial: current_process().name)."""
    time.sleep(delay)
    result = number * 2
    say(f"{number} doubled to {result} by: {current_process().name}")
    return result


def double(number: int, delay: float = 0.0) -> int:
    """Double a number quietly (tutorial: Pool.map and apply_async); ``delay`` stands for real work."""
    time.sleep(delay)
    return number * 2


def printer(item: object) -> None:
    """Print an item; the stage holds a shared lock around the call (tutorial: Lock)."""
    say(item)


def logged_printer(item: object) -> None:
    """Print an item and log it with structlog and with stdlib logging (tutorial: logging)."""
    structlog.get_logger("tasks").info("printing", item=item)
    logging.getLogger("tasks").info("printed %s", item)
    say(item)


def process_data(data: int) -> int:
    """The tutorial's queue consumer: say what was found, print it doubled, pass it on."""
    say(f"data found to be processed: {data}")
    processed = data * 2
    say(processed)
    return processed


def announce() -> list[object]:
    """The tutorial's creator: announce, then hand over the data (no sentinel: the runner ends the stream)."""
    say("Creating data and putting it on the queue")
    return [5, 10, 13]


def show(message: str) -> str:
    """Print a message taken from a LIFO queue."""
    say(message)
    return message


def monitor(interval: float = 0.05) -> None:
    """A background monitor that never returns: a daemon stage, stopped when the rest has finished."""
    log = structlog.get_logger("monitor")
    while True:
        log.info("monitor alive", pid=os.getpid())
        time.sleep(interval)
