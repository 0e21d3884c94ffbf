"""Children of the local backend's main process: start them with the stop signals blocked, ask them to stop,
read how they ended, and the main process's own SIGINT/SIGTERM handler.

Children ignore SIGINT and SIGTERM (a terminal or CI runner signals the whole process group; the stop is
the main process's to run) and are asked to stop with ``worker.STOP_SIGNAL``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from runner import worker

KILL_GRACE = 2.0  # seconds a terminated process gets to unwind before it is killed
SIGNAL_GAP = 1.0  # seconds within which a second SIGINT/SIGTERM is the same stop delivered twice


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """SIGINT and SIGTERM blocked in this thread, so that a child started meanwhile starts with them blocked:
    a signal to the whole process group cannot end it before it ignores them (``worker.bootstrap``)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start_child(process: Any) -> None:
    """``process.start()`` under ``stop_signals_blocked``."""
    with stop_signals_blocked():
        process.start()


def stop_child(process: Any) -> None:
    """Ask a child to stop (``worker.STOP_SIGNAL``: it unwinds and flushes its records)."""
    with contextlib.suppress(ProcessLookupError, TypeError):  # gone already, or never started
        os.kill(process.pid, worker.STOP_SIGNAL)


def exit_code_of(process: Any) -> int | None:
    """Join a process that has ended (its sentinel is ready) and return its exit code.

    ``Process.start`` in another thread (a runner replacing a worker) reaps every ended child of this
    process through ``Popen.poll``; a join racing with it finds the child gone and no code yet, and the
    code appears as soon as that poll stores it.
    """
    process.join()
    for _ in range(1000):
        if process.exitcode is not None:
            break
        time.sleep(0.001)
    return process.exitcode


def died_message(stage: str, process: str, code: int | None) -> str:
    """Why a process ended, with the likely cause."""
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        causes = {
            "SIGKILL": " (killed from outside, or by the kernel for lack of memory)",
            "SIGSEGV": " (a crash in native code)",
            "SIGABRT": " (aborted by native code)",
        }
        return f"stage {stage!r}: process {process} was killed by {name}{causes.get(name, '')}"
    return f"stage {stage!r}: process {process} exited with code {code} (os._exit or sys.exit in the stage function?)"


def manager_init(parent_pid: int) -> None:
    worker.leave_signals_to_parent(parent_pid)


def install_signals(sup: Any, sig_w: int) -> dict[int, Any] | None:
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != sup.pid:
            # A child started with `fork` that has not set its own handlers yet shares this pipe: it must
            # not wake the supervisor. It ignores SIGINT (the supervisor's to handle) and dies of SIGTERM.
            if signum == signal.SIGTERM:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        if sup.signal_received:
            if time.monotonic() - sup.signal_at < SIGNAL_GAP:
                return  # the same stop delivered twice (`timeout` signals its child and then the whole group)
            raise KeyboardInterrupt  # a second signal: stop at once
        sup.signal_received, sup.signal_at = signum, time.monotonic()
        os.write(sig_w, b"!")

    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def restore_signals(previous: dict[int, Any] | None) -> None:
    for signum, old in (previous or {}).items():
        signal.signal(signum, old)
