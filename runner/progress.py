"""The live progress display of a run on a terminal (``mprun run --progress``), in the main process.

    Supervisor monitor thread --rows, 5 times a second--> LiveDisplay.refresh --> stderr (the block)
    log Listener --records--> LiveDisplay.stream --> clear the block, write the record, redraw the block

One line per stage: its state, processes, items in and out, the rate of items it finished over the last
second or so, its errors (failed attempts, skipped, dead-lettered) and the depth of its input queue in
items (put by its writers and not yet taken by its readers), which shows where items pile up::

    mprun w1_pool  2.4s  1 of 3 stages running
    stage    state    procs       in      out  items/s  failed  skipped  dead  restarts  input queue
    numbers  done         1        -  200,000        -       -        -     -         -
    double   running      2  185,344  184,320   91,200       0        0     0         0  numbers 14,656
    sink     running      1  183,296  183,296   90,112       0        0     0         0  doubled 1,024

Only plain ANSI escapes (cursor up, erase below): no dependency.  Every write to the terminal goes
through one lock, and the log listener writes its records through ``stream``, so a log line never
lands inside the block: the block is cleared, the record written, the block drawn again below it.
Lines are cut to the terminal's width, so the block never wraps (which would break the clearing).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import deque
from typing import Any

RATE_WINDOW = 1.5  # seconds of history the rate is computed over

_BOLD, _DIM, _RED, _GREEN, _RESET = "\x1b[1m", "\x1b[2m", "\x1b[31m", "\x1b[32m", "\x1b[0m"


class _Above:
    """A text stream whose writes go above the live block (what the log listener writes to)."""

    def __init__(self, display: LiveDisplay) -> None:
        self._display = display

    def write(self, text: str) -> int:
        self._display.write_above(text)
        return len(text)

    def flush(self) -> None:
        self._display.flush()


class LiveDisplay:
    """A block of lines at the bottom of a terminal, redrawn in place; text written above it scrolls.

    Args:
        out: the terminal's text stream (stderr).
        title: the first line's name (the pipeline's).
        colors: use ANSI colours (the display is only shown on a terminal, so normally true).
    """

    def __init__(self, out: Any, title: str, *, colors: bool = True) -> None:
        self.out = out
        self.title = title
        self.colors = colors
        self.stream = _Above(self)
        self._lock = threading.Lock()
        self._lines = 0  # lines of the block now on screen
        self._frame: list[str] = []
        self._history: deque[tuple[float, dict[str, int]]] = deque()
        self._t0 = time.monotonic()
        self._active = False

    def start(self) -> None:
        """Begin drawing (``refresh``) ."""
        with self._lock:
            self._active = True
            self._t0 = time.monotonic()

    def stop(self, rows: list[dict[str, Any]] | None = None) -> None:
        """Draw the last frame (``rows``, if given) and remove the block: the summary follows it."""
        if rows is not None:
            self.refresh(rows)
        with self._lock:
            self._clear()
            self._active = False
            self.out.flush()

    def write_above(self, text: str) -> None:
        """Write ``text`` (whole lines) above the block."""
        with self._lock:
            if not self._active:
                self.out.write(text)
                return
            self._clear()
            self.out.write(text)
            self._draw()
            self.out.flush()

    def flush(self) -> None:
        with self._lock:
            self.out.flush()

    def refresh(self, rows: list[dict[str, Any]]) -> None:
        """Render ``rows`` (see ``render``) and redraw the block."""
        frame = self.render(rows)
        with self._lock:
            if not self._active:
                return
            self._clear()
            self._frame = frame
            self._draw()
            self.out.flush()

    def _clear(self) -> None:
        if self._lines:
            self.out.write(f"\r\x1b[{self._lines}A\x1b[J")  # up to the block's first line, erase to the end
            self._lines = 0

    def _draw(self) -> None:
        width = max(20, shutil.get_terminal_size((120, 24)).columns - 1)
        for line in self._frame:
            self.out.write(_cut(line, width) + "\n")
        self._lines = len(self._frame)

    def _c(self, code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if self.colors else text

    def _rates(self, rows: list[dict[str, Any]]) -> dict[str, float | None]:
        """Items finished per second over the last ``RATE_WINDOW`` seconds, per stage."""
        now = time.monotonic()
        counts = {r["stage"]: r["finished"] for r in rows}
        self._history.append((now, counts))
        while len(self._history) > 2 and now - self._history[1][0] >= RATE_WINDOW:
            self._history.popleft()
        then, old = self._history[0]
        if now - then <= 0:
            return {name: None for name in counts}
        return {name: (count - old.get(name, 0)) / (now - then) for name, count in counts.items()}

    def render(self, rows: list[dict[str, Any]]) -> list[str]:
        """The lines of one frame.

        Args:
            rows: one dict per stage: ``stage``, ``kind``, ``state`` (waiting | running | stopping | done),
                ``processes``, ``items_in``, ``items_out``, ``finished`` (items done, counting those done in
                chunks still in the workers' hands: what the rate counts),
                ``failed``, ``skipped``, ``dead_lettered``, ``restarts``, ``queue`` (its input queue's name
                or None) and ``depth`` (items waiting in it).
        """
        rates = self._rates(rows)
        running = sum(r["state"] in ("running", "stopping") for r in rows)
        stopping = any(r["state"] == "stopping" for r in rows)
        head = ("stage", "state", "procs", "in", "out", "items/s", "failed", "skipped", "dead", "restarts", "input queue")
        table = [head]
        for r in rows:
            producer = r["kind"] == "producer"
            rate = rates.get(r["stage"])
            table.append((
                r["stage"],
                r["state"],
                str(r["processes"]),
                "-" if producer else f"{r['items_in']:,}",
                f"{r['items_out']:,}",
                "-" if rate is None or r["state"] not in ("running", "stopping") else f"{rate:,.0f}",
                *(("-",) * 4 if producer else (f"{r['failed']:,}", f"{r['skipped']:,}", f"{r['dead_lettered']:,}",
                                                f"{r['restarts']:,}")),
                f"{r['queue']} {r['depth']:,}" if r["queue"] else "",
            ))
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        lines = [self._c(_BOLD, f"mprun {self.title}") + f"  {time.monotonic() - self._t0:.1f}s  "
                 + (f"stopping: {running} of {len(rows)} stages finishing their chunks in flight" if stopping
                    else f"{running} of {len(rows)} stages running")]
        for n, row in enumerate(table):
            cells = [c.ljust(w) if i in (0, 1, 10) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
            if n == 0:
                lines.append(self._c(_DIM, "  ".join(cells).rstrip()))
                continue
            if row[1] == "done":
                cells[1] = self._c(_GREEN, cells[1])
            for i in range(6, 10):  # errors stand out
                if row[i] not in ("0", "-"):
                    cells[i] = self._c(_RED, cells[i])
            lines.append("  ".join(cells).rstrip())
        return lines


def _cut(line: str, width: int) -> str:
    """``line`` cut to ``width`` visible characters (ANSI escapes do not count; a cut line resets colour)."""
    visible = 0
    out = []
    i = 0
    while i < len(line):
        if line[i] == "\x1b":
            end = line.find("m", i)
            end = len(line) - 1 if end < 0 else end
            out.append(line[i : end + 1])
            i = end + 1
            continue
        if visible >= width:
            out.append(_RESET if "\x1b" in line else "")
            break
        out.append(line[i])
        visible += 1
        i += 1
    return "".join(out)
