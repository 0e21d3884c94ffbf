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

When the producers' totals are known (``items``, ``range``, the lines of a file, each cut by ``--limit``),
two more columns say how far each stage is and when it should be done, and the first line says it for the
run (its least advanced stage, its latest ETA)::

    mprun w1_pool  2.4s  1 of 3 stages running  61%  ETA 1.5s
    stage    state    procs  ...  restarts  done   eta  input queue
    numbers  done         1  ...         -  100%     -
    double   running      2  ...         0   92%  0.2s  numbers 14,656
    sink     running      1  ...         0   61%  1.5s  doubled 1,024

A producer is as far as its items sent over its total. A stage downstream is as far as the items it has
finished over the items it should get: those put on its input queue so far (taken, plus waiting), divided by
how far the stages writing that queue are, so a filter or a generator upstream is accounted for as it goes.
Its ETA is what remains at its rate of the last second or so.

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
COUNT_LINES_UP_TO = 64 << 20  # bytes: a larger file source is not read ahead to count its lines

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

    def __init__(self, out: Any, title: str, *, colors: bool = True, plan: Plan | None = None) -> None:
        self.out = out
        self.title = title
        self.colors = colors
        self.plan = plan or {}  # per stage: (total items of a producer or None, stages writing its input)
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
            return dict.fromkeys(counts)
        return {name: (count - old.get(name, 0)) / (now - then) for name, count in counts.items()}

    def render(self, rows: list[dict[str, Any]]) -> list[str]:
        """The lines of one frame.

        Args:
            rows: one dict per stage: ``stage``, ``kind``, ``state`` (waiting | running | stopping | done),
                ``processes``, ``items_in``, ``items_out``, ``finished`` (items done, counting those done in
                chunks still in the workers' hands: what the rate counts),
                ``failed``, ``skipped``, ``dead_lettered``, ``restarts``, ``queue`` (its input queue's name
                or None) and ``depth`` (items waiting in it); ``calls`` (optional): calls in flight of a stage
                with ``concurrency`` (a column of its own when any stage has it).
        """
        rates = self._rates(rows)
        running = sum(r["state"] in ("running", "stopping") for r in rows)
        stopping = any(r["state"] == "stopping" for r in rows)
        ahead = self._ahead(rows, rates) if any(total is not None for total, _ in self.plan.values()) else None
        concurrent = any(r.get("calls") is not None for r in rows)
        head = ("stage", "state", "procs", *(("calls",) if concurrent else ()), "in", "out", "items/s", "failed",
                "skipped", "dead", "restarts",
                *(("done", "eta") if ahead else ()), "input queue")
        table = [head]
        for r in rows:
            producer = r["kind"] == "producer"
            rate = rates.get(r["stage"])
            table.append((
                r["stage"],
                r["state"],
                str(r["processes"]),
                *(("-" if r.get("calls") is None else f"{r['calls']:,}",) if concurrent else ()),
                "-" if producer else f"{r['items_in']:,}",
                f"{r['items_out']:,}",
                "-" if rate is None or r["state"] not in ("running", "stopping") else f"{rate:,.0f}",
                *(("-",) * 4 if producer else (f"{r['failed']:,}", f"{r['skipped']:,}", f"{r['dead_lettered']:,}",
                                                f"{r['restarts']:,}")),
                *((_percent(ahead.get(r["stage"], (None, None))[0]),
                   "-" if r["state"] == "done" else _duration(ahead.get(r["stage"], (None, None))[1]))
                  if ahead else ()),
                f"{r['queue']} {r['depth']:,}" if r["queue"] else "",
            ))
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        title = f"  {time.monotonic() - self._t0:.1f}s  " + (
            f"stopping: {running} of {len(rows)} stages finishing their chunks in flight" if stopping
            else f"{running} of {len(rows)} stages running")
        if ahead and not stopping:
            title += _overall(ahead)
        lines = [self._c(_BOLD, f"mprun {self.title}") + title]
        for n, row in enumerate(table):
            cells = [
                c.ljust(w) if i in (0, 1, len(head) - 1) else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=False))
            ]
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


    def _ahead(
        self, rows: list[dict[str, Any]], rates: dict[str, float | None]
    ) -> dict[str, tuple[float | None, float | None]]:
        """Per stage: the fraction done (None: unknown) and the seconds left at its recent rate (None: unknown)."""
        by_name = {r["stage"]: r for r in rows}
        fractions: dict[str, float | None] = {}
        ahead: dict[str, tuple[float | None, float | None]] = {}
        for r in rows:  # file order: producers and writers come before the stages they feed, as a rule
            if r["stage"] not in self.plan:  # a daemon stage: never done, no share of the run's progress
                continue
            total, writers = self.plan[r["stage"]]
            expected: float | None = None
            if r["state"] == "done":
                fraction: float | None = 1.0
            elif r["kind"] == "producer":
                expected = total
                fraction = min(r["items_out"] / total, 1.0) if total else (1.0 if total == 0 else None)
            else:
                ups = [fractions.get(w, 1.0 if by_name.get(w, {}).get("state") == "done" else None) for w in writers]
                upstream = min(u for u in ups if u is not None) if ups and None not in ups else None
                put = r["items_in"] + r["depth"]
                expected = put / upstream if upstream else None
                fraction = min(r["finished"] / expected, 1.0) if expected else (None if upstream is None else 0.0)
            fractions[r["stage"]] = fraction
            rate = rates.get(r["stage"])
            left = None
            if fraction == 1.0:
                left = 0.0
            elif expected is not None and rate:
                left = max(expected - r["finished"], 0) / rate
            ahead[r["stage"]] = (fraction, left)
        return ahead


Plan = dict[str, tuple[int | None, tuple[str, ...]]]


def plan_of(topology: Any) -> Plan:
    """Per stage of ``topology``: how many items it emits when that is known before the run (a producer of
    ``items``, a ``range`` or a file's lines, cut by ``--limit``), and the stages writing its input queue.
    Daemon stages are left out: they run until the rest has finished."""
    plan: Plan = {}
    for stage in topology.stages:
        if stage.daemon:
            continue
        total = _source_total(stage.source, topology.base_dir) if stage.kind == "producer" and stage.source else None
        if total is not None and topology.limit is not None:
            total = min(total, topology.limit)
        writers = tuple(w.name for q in stage.inputs for w in topology.writers_of(q))
        plan[stage.name] = (total, writers)
    return plan


def _source_total(source: dict[str, Any], base_dir: str) -> int | None:
    """The number of items ``source`` yields, when it can be known cheaply; else None."""
    import os

    if isinstance(source.get("items"), list):
        return len(source["items"])
    if isinstance(source.get("range"), dict):
        r = source["range"]
        return len(range(r.get("start", 0), r["stop"], r.get("step", 1)))
    spec = source.get("file")
    if not isinstance(spec, dict):
        return None
    path = os.path.join(base_dir, str(spec.get("path")))
    try:
        if os.path.getsize(path) > COUNT_LINES_UP_TO:
            return None
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    fmt = spec.get("format", "lines")
    if fmt == "jsonl":
        return sum(1 for line in lines if line.strip())
    return max(len(lines) - 1, 0) if fmt == "csv" else len(lines)


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction:.0%}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _overall(ahead: dict[str, tuple[float | None, float | None]]) -> str:
    """``  61%  ETA 1.5s`` for the run: its least advanced stage, its latest ETA (when every stage's is known)."""
    fractions = [f for f, _ in ahead.values()]
    lefts = [left for _, left in ahead.values()]
    text = f"  {_percent(min(fractions))}" if None not in fractions else ""  # type: ignore[type-var]
    if None not in lefts:
        text += f"  ETA {_duration(max(lefts))}"  # type: ignore[type-var]
    return text


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
