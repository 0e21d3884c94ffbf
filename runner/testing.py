"""``mprun test``: run the ``tests:`` cases of pipeline files with the normal runner.

Each case becomes a pipeline of its own (``case_pipeline``): the producers it names get the case's
source, and every stage writing to a queue the case checks also writes to a hidden FIFO "tap" queue,
read by a hidden ``collect`` stage::

    producer (case source) --results--> reader ...         the pipeline as written
                 \\--_tap_results--> _tap_results (collect)  added: records every item put on 'results'

The case then runs like any pipeline (``run_pipeline``), and what each tap collected is compared with
``expect``: as a multiset by default, in order with ``ordered: true`` (the order items were put).

While the cases run, file descriptors 1 and 2 point to one capture file, so stage prints and log
records (of every process, including a forkserver started by the first case) stay out of the report;
the output of a failing case is shown under it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Self, TextIO

from runner.errors import MprunError, PipelineInvalid
from schemas import Pipeline, TestCase

TAP = "_tap_"  # prefix of the hidden queues and collect stages
OUTPUT_TAIL = 20  # lines of a failing case's captured output shown


@dataclass
class CaseResult:
    """The outcome of one case: passed or not, and the lines that say why not."""

    passed: bool
    details: list[str] = field(default_factory=list)
    exit_code: int = 0


def case_pipeline(pipeline: Pipeline, case: TestCase) -> tuple[Pipeline, dict[str, str]]:
    """``pipeline`` with the case's sources and a tap on every expected queue.

    Returns:
        The new pipeline (``tests`` removed) and, for each expected queue, the name of its tap stage.
    """
    data = pipeline.model_dump()
    data.pop("tests", None)
    taken = {s["name"] for s in data["stages"]} | set(pipeline.queue_names())
    taps: dict[str, str] = {}
    for queue in case.expect:
        tap = TAP + queue
        while tap in taken:
            tap = "_" + tap
        taken.add(tap)
        taps[queue] = tap
    for stage in data["stages"]:
        if stage["name"] in case.sources:
            stage["source"] = case.sources[stage["name"]].model_dump()
        outputs = [stage["output"]] if isinstance(stage["output"], str) else list(stage["output"] or [])
        extra = [taps[q] for q in outputs if q in taps]
        if extra:
            stage["output"] = outputs + extra
    for tap in taps.values():
        data["stages"].append({"name": tap, "kind": "consumer", "input": tap, "function": "collect"})
    new = Pipeline.model_validate(data)
    new._base_dir = pipeline.base_dir
    return new, taps


def _canon(item: Any) -> str:
    """A comparable text for any item: YAML values and results compare as their JSON."""
    return json.dumps(item, sort_keys=True, default=repr)


def _show(items: list[Any]) -> str:
    return ", ".join(json.dumps(i, default=repr) for i in items)


def compare(queue: str, expected: list[Any], got: list[Any], *, ordered: bool) -> list[str]:
    """What differs between the expected and the actual items of ``queue``; empty when they match."""
    if ordered:
        for i, (e, g) in enumerate(zip(expected, got)):
            if _canon(e) != _canon(g):
                return [f"queue {queue!r}: first difference at position {i}: expected {_show([e])}, got {_show([g])}"]
        if len(expected) > len(got):
            return [f"queue {queue!r}: {len(got)} items, expected {len(expected)}; missing at the end: {_show(expected[len(got):])}"]
        if len(got) > len(expected):
            return [f"queue {queue!r}: {len(got)} items, expected {len(expected)}; unexpected at the end: {_show(got[len(expected):])}"]
        return []
    want = Counter(_canon(i) for i in expected)
    have = Counter(_canon(i) for i in got)
    short, extra = want - have, have - want
    missing = [i for i in expected if _take(short, i)]
    unexpected = [i for i in got if _take(extra, i)]
    lines = []
    if missing:
        lines.append(f"queue {queue!r}: missing {len(missing)} item(s): {_show(missing)}")
    if unexpected:
        lines.append(f"queue {queue!r}: unexpected {len(unexpected)} item(s): {_show(unexpected)}")
    return lines


def _take(counter: Counter[str], item: Any) -> bool:
    """Whether ``item`` is (still) in ``counter``; takes one of it."""
    key = _canon(item)
    if counter[key] > 0:
        counter[key] -= 1
        return True
    return False


def run_case(pipeline: Pipeline, case: TestCase) -> CaseResult:
    """Run one case with the normal runner and compare what flowed with what it expects."""
    from runner import run_pipeline

    test_pipeline, taps = case_pipeline(pipeline, case)
    try:
        result = run_pipeline(test_pipeline)
    except MprunError as e:
        return CaseResult(False, [f"cannot run: {e}"], e.exit_code)
    if result.exit_code != 0:
        return CaseResult(False, [f"the run failed (exit {result.exit_code}): {result.error}"], result.exit_code)
    details = []
    for queue, expected in case.expect.items():
        details += compare(queue, expected, result.collected.get(taps[queue], []), ordered=case.ordered)
    return CaseResult(not details, details)


class _Capture:
    """Points file descriptors 1 and 2 (inherited by every child) at one file; ``report`` is the real stdout."""

    def __enter__(self) -> Self:
        sys.stdout.flush()
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile(mode="w+b")
        self.saved = (os.dup(1), os.dup(2))
        self.report: TextIO = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        os.dup2(self.file.fileno(), 1)
        os.dup2(self.file.fileno(), 2)
        return self

    def mark(self) -> int:
        """Where the output written from now on starts."""
        sys.stdout.flush()
        sys.stderr.flush()
        return os.lseek(self.file.fileno(), 0, os.SEEK_END)

    def since(self, offset: int) -> str:
        """The output written since ``mark`` returned ``offset``."""
        end = self.mark()
        self.file.seek(offset)
        return self.file.read(end - offset).decode("utf-8", "replace")

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        self.report.close()
        self.file.close()


def run_tests(files: list[str]) -> int:
    """Run every case of every file; print a line per case and ``N passed, N failed``.

    Returns:
        0 when every case passed, 1 when one failed, 2 when a file is invalid, 130/143 when stopped.
    """
    from runner import load_pipeline

    passed = failed = 0
    worst = 0
    with _Capture() as cap:
        for file in files:
            try:
                pipeline = load_pipeline(file)
            except PipelineInvalid as e:
                worst = 2
                for line in e.diagnostics:
                    print(line, file=cap.report)
                continue
            if not pipeline.tests:
                print(f"no tests in {file}", file=cap.report)
            for case in pipeline.tests:
                start = cap.mark()
                result = run_case(pipeline, case)
                if result.passed:
                    passed += 1
                    print(f"PASS {file}::{case.name}", file=cap.report)
                    continue
                failed += 1
                worst = max(worst, 1)
                print(f"FAIL {file}::{case.name}", file=cap.report)
                for line in result.details:
                    print(f"    {line}", file=cap.report)
                output = cap.since(start).splitlines()
                if output:
                    shown = output[-OUTPUT_TAIL:]
                    more = f" (last {len(shown)} of {len(output)} lines)" if len(shown) < len(output) else ""
                    print(f"    output of the run{more}:", file=cap.report)
                    for line in shown:
                        print(f"      | {line}", file=cap.report)
                if result.exit_code >= 128:  # stopped by SIGINT/SIGTERM: run no more cases
                    worst = result.exit_code
                    break
            else:
                continue
            break
        print(f"{passed} passed, {failed} failed", file=cap.report)
    return worst
