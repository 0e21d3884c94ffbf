"""``mprun test``: run the ``tests:`` cases of pipeline files with the normal runner.

Each case becomes a pipeline of its own (``case_pipeline``): the producers it names get the case's
source, and every stage writing to a queue the case checks also writes to a hidden FIFO "tap" queue,
read by a hidden ``collect`` stage::

    producer (case source) --results--> reader ...         the pipeline as written
                 \\--_tap_results--> _tap_results (collect)  added: records every item put on 'results'

A case never touches real outputs: its ``set`` entries are applied as ``--set`` would, built-in file sinks
write into a scratch folder deleted after the case, and a sink calling a ``module:attribute`` function is
replaced by ``identity`` unless the case lists it in ``run_sinks``.  A dead-letter queue is tapped
through a hidden stage its writers dead-letter into::

    double --_dead_failed--> _dead_failed (identity) --failed--> the queue's readers
                                                     \\--_tap_failed--> _tap_failed (collect)

The case then runs like any pipeline (``run_pipeline``), and what each tap collected is compared with
``expect``: as a multiset by default, in order with ``ordered: true`` (the order items were put).
Results go out as text lines, one JSON document (``--format json``) and/or JUnit XML (``--junit-xml``).

While the cases run, file descriptors 1 and 2 point to one capture file, so stage prints and log
records (of every process, including the forkserver ``mprun test`` starts once the capture is on, and
every process it forks) stay out of the report; the output of a failing case is shown under it.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TextIO

from runner.errors import MprunError, PipelineInvalid
from schemas import Pipeline, TestCase, topology_problems

if TYPE_CHECKING:
    from runner.diagnostics import Diagnostic

TAP = "_tap_"  # prefix of the hidden queues and collect stages
OUTPUT_TAIL = 20  # lines of a failing case's captured output shown


FILE_SINKS = ("jsonl", "csv", "lines")  # built-ins writing kwargs.path: in a case they write into a scratch folder


@dataclass
class CaseResult:
    """The outcome of one case: passed or not, and the lines that say why not."""

    passed: bool
    details: list[str] = field(default_factory=list)
    exit_code: int = 0


class CaseInvalid(ValueError):
    """A case whose ``set`` leads nowhere or makes the pipeline invalid; ``path`` is where, under the case."""

    def __init__(self, path: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.path = path


def case_pipeline(pipeline: Pipeline, case: TestCase, scratch: str) -> tuple[Pipeline, dict[str, str]]:
    """``pipeline`` as ``case`` runs it: its ``set`` and sources applied, outputs kept away from real files, taps added.

    Built-in file sinks write into ``scratch`` (unless the case's ``set`` gives their kwargs); sinks calling
    a ``module:attribute`` function do nothing unless the case lists them in ``run_sinks``.  A dead-letter
    queue is tapped through a hidden ``identity`` stage its writers dead-letter into, which forwards every
    letter to the queue and to the tap; so is a queue that a stage writes through a named route (except
    into the stage's own input: a relay there would make a cycle).

    Returns:
        The new pipeline (``tests`` removed) and, for each expected queue, the name of its tap stage.

    Raises:
        CaseInvalid: the case's ``set`` leads nowhere, or the pipeline it makes is invalid.
    """
    from pydantic import ValidationError

    from runner.diagnostics import format_path
    from runner.overrides import set_path

    data = pipeline.model_dump()
    data.pop("tests", None)
    given: set[int] = set()  # stages whose kwargs the case sets
    for dotted, value in case.set_.items():
        try:
            path = set_path(data, dotted, copy.deepcopy(value))
        except ValueError as e:
            raise CaseInvalid(("set", dotted), str(e)) from None
        if path[:1] == ("stages",) and len(path) >= 2 and (len(path) == 2 or path[2] == "kwargs"):
            given.add(int(path[1]))
    stages = data["stages"] if isinstance(data.get("stages"), list) else []
    taken = {s.get("name") for s in stages if isinstance(s, dict)} | set(pipeline.queue_names())
    taps = {queue: _fresh(TAP + queue, taken) for queue in case.expect}
    dead = {q: _fresh("_dead_" + q, taken) for q in taps
            if any(isinstance(s, dict) and s.get("dead_letter") == q for s in stages)}
    routed: dict[str, str] = {}  # a tapped queue written through a route -> the queue its relay reads
    for index, stage in enumerate(stages):
        if not isinstance(stage, dict):  # a `set` made it so: validation below says what is wrong
            continue
        if stage.get("name") in case.sources:
            stage["source"] = case.sources[stage["name"]].model_dump()
        function, kwargs = stage.get("function"), stage.get("kwargs")
        kwargs = kwargs if isinstance(kwargs, dict) else {}
        if function in FILE_SINKS and index not in given and str(kwargs.get("path", "-")) != "-":
            stage["kwargs"] = {**kwargs, "path": str(Path(scratch, f"{index}-{Path(str(kwargs['path'])).name}"))}
        elif ":" in str(function or "") and not stage.get("output") and stage.get("name") not in case.run_sinks:
            stage.update(function="identity", kwargs={}, init=None)
        output = stage.get("output")
        outputs = [output] if isinstance(output, str) else list(output) if isinstance(output, list) else []
        extra = [taps[q] for q in outputs if q in taps]
        if extra:
            stage["output"] = outputs + extra
        if isinstance(output, dict):  # a route leads to one queue: a tapped one is reached through a relay
            for route, queue in output.items():
                if queue not in taps:
                    continue
                if queue == stage.get("input"):
                    msg = (f"stage {stage.get('name')!r} feeds queue {queue!r} back to itself by its route {route!r}, "
                           "which a case cannot watch; expect a queue its items reach later")
                    raise CaseInvalid(("expect", queue), msg)
                if queue not in routed:
                    routed[queue] = _fresh("_routed_" + queue, taken)
                output[route] = routed[queue]
        if stage.get("dead_letter") in dead:
            stage["dead_letter"] = dead[stage["dead_letter"]]
    for queue, via in (dead | routed).items():
        stages.append(
            {"name": via, "kind": "consumer", "input": via, "function": "identity", "output": [queue, taps[queue]]}
        )
    for tap in taps.values():
        stages.append({"name": tap, "kind": "consumer", "input": tap, "function": "collect"})
    try:
        new = Pipeline.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = format_path(tuple(p for p in err["loc"] if p not in ("producer", "consumer", "pool")))
        raise CaseInvalid(("set",), f"{where}: {err['msg']}") from None
    if case.set_:
        for loc, message in topology_problems(new):
            raise CaseInvalid(("set",), f"{format_path(loc)}: {message}")
    new._base_dir = pipeline.base_dir
    return new, taps


def _fresh(name: str, taken: set[Any]) -> str:
    """``name``, with ``_`` in front until no stage or queue has it; then taken."""
    while name in taken:
        name = "_" + name
    taken.add(name)
    return name


def case_problems(pipeline: Pipeline) -> list[Diagnostic]:
    """Cases whose ``set`` leads nowhere or makes the pipeline invalid, located at the case."""
    from runner.diagnostics import Marks

    marks = pipeline._marks or Marks(pipeline.name or "<pipeline>")
    problems = []
    for i, case in enumerate(pipeline.tests):
        if case.set_:
            try:
                case_pipeline(pipeline, case, tempfile.gettempdir())
            except CaseInvalid as e:
                problems.append(marks.error(("tests", i, *e.path), f"in this case: {e}"))
    return problems


def _canon(item: Any) -> str:
    """A comparable text for any item: YAML values and results compare as their JSON."""
    return json.dumps(item, sort_keys=True, default=repr)


def _show(items: list[Any]) -> str:
    return ", ".join(json.dumps(i, default=repr) for i in items)


def compare(queue: str, expected: list[Any], got: list[Any], *, ordered: bool) -> list[str]:
    """What differs between the expected and the actual items of ``queue``; empty when they match."""
    if ordered:
        for i, (e, g) in enumerate(zip(expected, got, strict=False)):
            if _canon(e) != _canon(g):
                return [f"queue {queue!r}: first difference at position {i}: expected {_show([e])}, got {_show([g])}"]
        counts = f"queue {queue!r}: {len(got)} items, expected {len(expected)}"
        if len(expected) > len(got):
            return [f"{counts}; missing at the end: {_show(expected[len(got):])}"]
        if len(got) > len(expected):
            return [f"{counts}; unexpected at the end: {_show(got[len(expected):])}"]
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

    with tempfile.TemporaryDirectory(prefix="mprun-case-") as scratch:
        try:
            test_pipeline, taps = case_pipeline(pipeline, case, scratch)
            result = run_pipeline(test_pipeline)
        except CaseInvalid as e:
            return CaseResult(False, [f"cannot run: {e}"], 2)
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


@dataclass
class Report:
    """What ``mprun test`` found, for the text, JSON and JUnit reports."""

    cases: list[dict[str, Any]] = field(default_factory=list)  # {file, name, passed, seconds, details, output}
    invalid: dict[str, list[Any]] = field(default_factory=dict)  # file -> its problems (Diagnostic lines)
    bare: list[str] = field(default_factory=list)  # files without cases

    def count(self, passed: bool) -> int:
        """How many cases passed (or failed)."""
        return sum(1 for c in self.cases if c["passed"] is passed)

    def as_json(self) -> dict[str, Any]:
        """``{passed, failed, cases, invalid, no_cases}``: ``invalid`` lists ``{file, line, col, path, message}``."""
        from runner.validate import as_dict

        return {
            "passed": self.count(True),
            "failed": self.count(False),
            "cases": self.cases,
            "invalid": [as_dict(p, file) for file, problems in self.invalid.items() for p in problems],
            "no_cases": self.bare,
        }


def run_tests(
    files: list[str], *, fmt: str = "text", junit_xml: str | None = None, start: Callable[[], None] | None = None
) -> int:
    """Run every case of every file; report each case (``fmt`` text or json), optionally as JUnit XML too.

    ``start`` runs first, once the output is captured: the command starts its forkserver there, so that
    what the processes it forks print is captured too (they write to the server's descriptors).

    Returns:
        0 when every case passed, 1 when one failed or no file has a case, 2 when a file is invalid,
        130/143 when stopped.
    """
    import time

    from runner import load_pipeline

    report = Report()
    worst = 0
    with _Capture() as cap:
        if start is not None:
            start()

        def say(line: str) -> None:
            if fmt == "text":
                print(line, file=cap.report)

        for file in files:
            try:
                pipeline = load_pipeline(file)
                problems = case_problems(pipeline)
                if problems:
                    raise PipelineInvalid(problems)
            except PipelineInvalid as e:
                worst = 2
                report.invalid[file] = list(e.diagnostics)
                for line in e.diagnostics:
                    say(line)
                continue
            if not pipeline.tests:
                report.bare.append(file)
                say(f"no tests in {file}")
            for case in pipeline.tests:
                mark, began = cap.mark(), time.perf_counter()
                result = run_case(pipeline, case)
                entry = {"file": file, "name": case.name, "passed": result.passed,
                         "seconds": round(time.perf_counter() - began, 3), "details": result.details, "output": []}
                report.cases.append(entry)
                if result.passed:
                    say(f"PASS {file}::{case.name}")
                    continue
                worst = max(worst, 1)
                say(f"FAIL {file}::{case.name}")
                for line in result.details:
                    say(f"    {line}")
                output = cap.since(mark).splitlines()
                entry["output"] = output
                if output:
                    shown = output[-OUTPUT_TAIL:]
                    more = f" (last {len(shown)} of {len(output)} lines)" if len(shown) < len(output) else ""
                    say(f"    output of the run{more}:")
                    for line in shown:
                        say(f"      | {line}")
                if result.exit_code >= 128:  # stopped by SIGINT/SIGTERM: run no more cases
                    worst = result.exit_code
                    break
            else:
                continue
            break
        if not report.cases and not report.invalid:
            worst = max(worst, 1)
            say(f"no test cases in {', '.join(files)}: add a tests: list to a pipeline file")
        say(f"{report.count(True)} passed, {report.count(False)} failed")
        if fmt == "json":
            print(json.dumps(report.as_json(), indent=2, default=repr), file=cap.report)
    if junit_xml:
        write_junit(report, junit_xml)
    return worst


_XML_ILLEGAL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def write_junit(report: Report, path: str) -> None:
    """Write ``report`` as JUnit XML: a ``testsuite`` per file, a ``testcase`` per case, a ``failure`` each.

    Raises:
        UsageError: the file cannot be written.
    """
    import xml.etree.ElementTree as ET

    from runner.errors import UsageError

    def text(lines: list[Any]) -> str:
        return _XML_ILLEGAL.sub("", "\n".join(map(str, lines)))

    root = ET.Element("testsuites", name="mprun test", tests=str(len(report.cases)),
                      failures=str(report.count(False)), errors=str(len(report.invalid)))
    files = list(dict.fromkeys([*report.invalid, *(c["file"] for c in report.cases), *report.bare]))
    for file in files:
        cases = [c for c in report.cases if c["file"] == file]
        problems = report.invalid.get(file)
        suite = ET.SubElement(root, "testsuite", name=file, tests=str(len(cases) + bool(problems)),
                              failures=str(sum(not c["passed"] for c in cases)), errors=str(int(bool(problems))),
                              time=f"{sum(c['seconds'] for c in cases):.3f}")
        if problems:
            case = ET.SubElement(suite, "testcase", classname=file, name="(the file is invalid)", time="0")
            ET.SubElement(case, "error", message=text(problems[:1]), type="PipelineInvalid").text = text(problems)
        for c in cases:
            case = ET.SubElement(suite, "testcase", classname=file, name=c["name"], time=f"{c['seconds']:.3f}")
            if not c["passed"]:
                ET.SubElement(case, "failure", message=text(c["details"][:1])).text = text(c["details"])
                if c["output"]:
                    ET.SubElement(case, "system-out").text = text(c["output"])
    ET.indent(root)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
    except OSError as e:
        msg = f"cannot write the JUnit report {path}: {e.strerror or e}"
        raise UsageError(msg) from None
