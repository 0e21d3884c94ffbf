"""Start multiprocessing's forkserver and resource tracker by forking the ``mprun`` command, not exec'ing Python.

``forkserver.ensure_running()`` boots two new interpreters (the resource tracker, then the forkserver), each
paying Python's start-up and ``site`` (~25 ms of CPU), and the forkserver then imports its preload again. At
the top of the command this process is still one thread with little imported, which is all a forkserver
has to be: so it forks twice, and each child runs the same ``main`` the new interpreter would have run, with
the same file descriptors (the server imports what of its preload is not imported here yet). The parent
records them as ``ensure_running`` would, so every later ``Process.start`` finds both running. Where this
Python's multiprocessing keeps other internals than these (3.11 to 3.13; 3.14 authenticates the
forkserver), or a thread is already running, ``start`` returns False and the caller uses ``ensure_running``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing import connection, forkserver, resource_tracker, spawn, util
from typing import Any


def start(preload: list[str]) -> bool:
    """Fork the resource tracker and a forkserver that imports ``preload``; False if this is not possible.

    What this process needs as well is best imported before: the server then has it without importing it.
    """
    # CPython's private state, set as its own ensure_running would (typeshed does not know these names).
    server: Any = forkserver._forkserver
    tracker: Any = resource_tracker._resource_tracker
    expected = ("_forkserver_address", "_forkserver_alive_fd", "_forkserver_pid", "_preload_modules")
    if (threading.active_count() != 1 or not all(hasattr(server, a) for a in expected)
            or hasattr(server, "_forkserver_authkey") or server._forkserver_pid is not None
            or getattr(tracker, "_fd", 0) is not None or not hasattr(tracker, "_pid")):
        return False
    _fork_tracker(tracker)
    data = {k: v for k, v in spawn.get_preparation_data("ignore").items() if k in ("main_path", "sys_path")}
    with socket.socket(socket.AF_UNIX) as listener:
        address = connection.arbitrary_address("AF_UNIX")  # type: ignore[attr-defined]
        listener.bind(address)
        if not util.is_abstract_socket_namespace(address):
            os.chmod(address, 0o600)
        listener.listen()
        alive_r, alive_w = os.pipe()  # every client holds the write end; EOF tells the server to exit
        pid = os.fork()
        if pid == 0:
            os.close(tracker._fd)  # a spawned server would not have it: each request brings the tracker's fd
            tracker._fd = tracker._pid = None
            # A signal to the process group is the command's to handle: the server (and each child it forks,
            # until the child's own handlers are set: it restores what it found here) ignores SIGINT and
            # SIGTERM, and dies with the command.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            _die_with_parent()
            _child(lambda: forkserver.main(listener.fileno(), alive_r, preload, **data), alive_w)
        os.close(alive_r)
    server._preload_modules = preload
    server._forkserver_address, server._forkserver_alive_fd, server._forkserver_pid = address, alive_w, pid
    return True


def _fork_tracker(tracker: Any) -> None:
    r, w = os.pipe()
    # As ensure_running does: the child ignores SIGINT and SIGTERM only once its main runs.
    ignored: Any = resource_tracker._IGNORED_SIGNALS  # type: ignore[attr-defined]
    signal.pthread_sigmask(signal.SIG_BLOCK, ignored)
    try:
        pid = os.fork()
        if pid == 0:
            _child(lambda: resource_tracker.main(r), w)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, ignored)
    os.close(r)
    tracker._fd, tracker._pid = w, pid


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stop(timeout: float = 1.0) -> None:
    """End the forkserver and resource tracker this process runs (forked here or started by ``ensure_running``):
    close the pipes whose end tells them to leave, wait for them at most ``timeout`` seconds, kill what is left.

    The ``mprun`` command calls it as it leaves, so that no process of its tree outlives it.
    """
    server, tracker = forkserver._forkserver, resource_tracker._resource_tracker
    pids = []
    for holder, fd_name, pid_name in ((server, "_forkserver_alive_fd", "_forkserver_pid"), (tracker, "_fd", "_pid")):
        fd, pid = getattr(holder, fd_name, None), getattr(holder, pid_name, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
            setattr(holder, fd_name, None)
        if pid:
            setattr(holder, pid_name, None)
            pids.append(pid)
    deadline = time.monotonic() + timeout
    for pid in pids:
        with contextlib.suppress(OSError):
            fd = os.pidfd_open(pid)
            try:
                if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    os.kill(pid, signal.SIGKILL)
            finally:
                os.close(fd)
            os.waitpid(pid, 0)


def _child(main: Callable[[], object], close: int) -> None:
    """Run a server's ``main`` in a forked child; leave without the parent's exit handlers or buffers."""
    code = 1
    try:
        os.close(close)
        main()
        code = 0
    except SystemExit as e:  # how forkserver.main ends: every client has gone
        code = e.code if isinstance(e.code, int) else 0
    finally:
        os._exit(code)
